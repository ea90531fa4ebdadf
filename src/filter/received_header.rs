//! `received_header`: prepends a `Received:` trace header (`spec/filters.md` §6.3).
//!
//! The body is withheld from the rest of the chain until it is complete, then passed on as
//! `Received: ...` + the original body ([`MessageBody::prepend`]: the stored blob is not
//! copied). The header is built once per transaction and reused on later runs, so every
//! run sends upstream the same bytes.

use bytes::Bytes;
use serde_json::Value;

use super::{ChainTx, Filter, FilterBuildError, LocalFuture, MessageBody, Next};
use crate::config::ReceivedHeaderFilter;

/// Signal key of the `remote_host` filter (PTR name and forward-confirmation).
pub const REMOTE_HOST_SIGNAL: &str = "koukan.remote_host_filter.RemoteHostFilter";

pub struct ReceivedHeader {
    hostname: Option<String>,
    header: Option<Bytes>,
    now: fn() -> i64,
}

impl ReceivedHeader {
    /// `received_hostname` absent: this host's name (from the kernel), if it can be read.
    pub fn new(cfg: &ReceivedHeaderFilter) -> Result<ReceivedHeader, FilterBuildError> {
        let hostname = cfg.received_hostname.clone().or_else(system_hostname);
        Ok(ReceivedHeader {
            hostname,
            header: None,
            now: unix_now,
        })
    }

    /// The header for `tx` at time `now` (seconds since the epoch), CRLF-terminated.
    pub fn header(&self, tx: &ChainTx, now: i64) -> String {
        let t = &tx.tx;
        let literal = t.remote_host.as_ref().map(|h| address_literal(&h.host));
        let (ptr, fcrdns) = match tx.signals.get(REMOTE_HOST_SIGNAL) {
            Some(s) => (
                s.get("remote_hostname").and_then(Value::as_str),
                s.get("fcrdns").and_then(Value::as_bool).unwrap_or(false),
            ),
            None => (None, false),
        };
        let confirmed_ptr = ptr.filter(|_| fcrdns).map(clean);
        let host = match (&confirmed_ptr, &literal) {
            (Some(p), Some(l)) => Some(format!("{p} {l}")),
            (_, l) => l.clone(),
        };
        let utf8 = t
            .mail_from
            .as_ref()
            .is_some_and(|m| m.param("SMTPUTF8").is_some());
        let (ehlo, protocol) = match &t.smtp_meta {
            Some(meta) => {
                let mut p = String::from(if utf8 {
                    "UTF8SMTP"
                } else if truthy(meta.get("esmtp")) {
                    "ESMTP"
                } else {
                    "SMTP"
                });
                if truthy(meta.get("tls")) {
                    p.push('S');
                }
                if truthy(meta.get("auth")) {
                    p.push('A');
                }
                let ehlo = meta.get("ehlo_host").and_then(Value::as_str).map(clean);
                (ehlo, p)
            }
            None => (
                confirmed_ptr.clone().or_else(|| literal.clone()),
                "X-RESTMTP".to_string(),
            ),
        };
        let mut clauses = Vec::new();
        if let (Some(e), Some(h)) = (&ehlo, &host) {
            clauses.push(format!("from {e} ({h})"));
        }
        if let Some(by) = &self.hostname {
            clauses.push(format!("by {}", clean(by)));
        }
        clauses.push(format!("with {protocol}"));
        if let [rcpt] = t.rcpt_to.as_slice() {
            clauses.push(format!("for {}", clean(&rcpt.mailbox)));
        }
        format!(
            "Received: {};\r\n\t{}\r\n",
            clauses.join("\r\n\t"),
            rfc5322_date(now, 0)
        )
    }
}

impl Filter for ReceivedHeader {
    fn on_update<'a>(&'a mut self, tx: &'a mut ChainTx, next: Next<'a>) -> LocalFuture<'a, ()> {
        Box::pin(async move {
            let Some(original) = tx.body.take() else {
                return next.run(tx).await;
            };
            // Withheld until complete; builder specs are not RFC 822 yet (message_builder
            // must come first), so they pass untouched.
            let upstream = if tx.tx.cancelled || matches!(original, MessageBody::Builder { .. }) {
                Some(original.clone())
            } else if original.finalized() {
                let now = (self.now)();
                let header = match &self.header {
                    Some(h) => h.clone(),
                    None => {
                        let h = Bytes::from(self.header(tx, now));
                        self.header = Some(h.clone());
                        h
                    }
                };
                Some(original.prepend(header))
            } else {
                None
            };
            tx.body = upstream;
            next.run(tx).await;
            tx.body = Some(original);
        })
    }
}

fn truthy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(_)) => true,
    }
}

/// Drops control characters so that a client-chosen value (EHLO name, recipient) cannot
/// end the header line and inject fields.
fn clean(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).collect()
}

/// `[1.2.3.4]`, `[IPv6:::1]` (RFC 5321 address literal); other strings bracketed as given.
fn address_literal(host: &str) -> String {
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(a)) => format!("[IPv6:{a}]"),
        Ok(a) => format!("[{a}]"),
        Err(_) => format!("[{}]", clean(host)),
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn system_hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// RFC 5322 date-time, e.g. `Wed, 06 Mar 2024 10:42:31 -0800`, for `unix_secs` shown at
/// `tz_offset` seconds east of UTC (rounded down to whole minutes).
pub fn rfc5322_date(unix_secs: i64, tz_offset: i64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let local = unix_secs + tz_offset;
    let days = local.div_euclid(86400);
    let secs = local.rem_euclid(86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let sign = if tz_offset < 0 { '-' } else { '+' };
    let off = tz_offset.abs() / 60;
    format!(
        "{}, {:02} {} {:04} {:02}:{:02}:{:02} {}{:02}{:02}",
        DAYS[days.rem_euclid(7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        sign,
        off / 60,
        off % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::{Chain, MemoryBlob};
    use crate::{EsmtpParam, HostPort, Mailbox, Response};
    use std::cell::RefCell;
    use std::rc::Rc;

    const T: i64 = 1_234_567_890; // Fri, 13 Feb 2009 23:31:30 +0000

    fn filter(name: Option<&str>) -> ReceivedHeader {
        let mut f = ReceivedHeader::new(&ReceivedHeaderFilter {
            received_hostname: name.map(str::to_string),
        })
        .unwrap();
        f.now = || T;
        f
    }

    fn smtp_tx() -> ChainTx {
        let mut tx = ChainTx::default();
        tx.tx.remote_host = Some(HostPort::new("1.2.3.4", 12345));
        tx.tx.mail_from = Some(Mailbox::new("alice@domain"));
        tx.tx.rcpt_to = vec![Mailbox::new("bob@domain")];
        let meta = serde_json::json!({"ehlo_host": "gargantua1", "esmtp": true, "tls": true});
        tx.tx.smtp_meta = meta.as_object().cloned();
        tx.signals.insert(
            REMOTE_HOST_SIGNAL.into(),
            serde_json::json!({"remote_hostname": "gargantua1", "fcrdns": true}),
        );
        tx
    }

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(T, 0), "Fri, 13 Feb 2009 23:31:30 +0000");
        assert_eq!(
            rfc5322_date(1_709_750_551, -28800),
            "Wed, 06 Mar 2024 10:42:31 -0800"
        );
        assert_eq!(rfc5322_date(0, 19800), "Thu, 01 Jan 1970 05:30:00 +0530");
    }

    #[test]
    fn smtp_header_matches_reference() {
        let f = filter(Some("gargantua1"));
        assert_eq!(
            f.header(&smtp_tx(), T),
            "Received: from gargantua1 (gargantua1 [1.2.3.4])\r\n\
             \tby gargantua1\r\n\twith ESMTPS\r\n\tfor bob@domain;\r\n\
             \tFri, 13 Feb 2009 23:31:30 +0000\r\n"
        );
    }

    #[test]
    fn protocols() {
        let f = filter(Some("mx"));
        let mut tx = smtp_tx();
        let meta = tx.tx.smtp_meta.as_mut().unwrap();
        meta.insert("tls".into(), false.into());
        meta.insert("esmtp".into(), false.into());
        assert!(f.header(&tx, T).contains("\twith SMTP\r\n"));
        let meta = tx.tx.smtp_meta.as_mut().unwrap();
        meta.insert("esmtp".into(), true.into());
        meta.insert("auth".into(), true.into());
        assert!(f.header(&tx, T).contains("\twith ESMTPA\r\n"));
        tx.tx.mail_from =
            Some(Mailbox::new("jösé@domain").with_params(vec![EsmtpParam::new("SMTPUTF8", None)]));
        tx.tx.rcpt_to = vec![Mailbox::new("bøb@dömain")];
        let h = f.header(&tx, T);
        assert!(h.contains("\twith UTF8SMTPA\r\n"), "{h}");
        assert!(h.contains("\tfor bøb@dömain;"), "{h}");
        // No PTR confirmation: the literal alone.
        tx.signals.clear();
        assert!(
            f.header(&tx, T)
                .starts_with("Received: from gargantua1 ([1.2.3.4])\r\n")
        );
    }

    #[test]
    fn rest_submission() {
        let f = filter(Some("gargantua1"));
        let mut tx = ChainTx::default();
        tx.tx.mail_from = Some(Mailbox::new("alice@example.com"));
        tx.tx.rcpt_to = vec![Mailbox::new("bob@example.com")];
        assert_eq!(
            f.header(&tx, T),
            "Received: by gargantua1\r\n\twith X-RESTMTP\r\n\tfor bob@example.com;\r\n\
             \tFri, 13 Feb 2009 23:31:30 +0000\r\n"
        );
        // Several recipients: no `for`; an injected CRLF cannot start a new field.
        tx.tx.rcpt_to.push(Mailbox::new("carol@example.com"));
        tx.tx.remote_host = Some(HostPort::new("::1", 1));
        let meta = serde_json::json!({"ehlo_host": "evil\r\nX-Injected: 1"});
        tx.tx.smtp_meta = meta.as_object().cloned();
        let h = f.header(&tx, T);
        assert!(
            h.starts_with("Received: from evilX-Injected: 1 ([IPv6:::1])\r\n"),
            "{h}"
        );
        assert!(!h.contains("for "));
    }

    /// Records the body it is given.
    struct Sink(Rc<RefCell<Vec<Option<Vec<u8>>>>>);
    impl Filter for Sink {
        fn on_update<'a>(&'a mut self, tx: &'a mut ChainTx, _: Next<'a>) -> LocalFuture<'a, ()> {
            Box::pin(async move {
                let b = match &tx.body {
                    Some(b) => Some(b.read_all(1 << 20).await.unwrap()),
                    None => None,
                };
                self.0.borrow_mut().push(b);
                if tx.body_finalized() {
                    tx.tx.data_response = Some(Response::new(250, "ok"));
                }
            })
        }
    }

    /// A blob still being uploaded.
    struct Partial;
    impl crate::filter::BlobSource for Partial {
        fn len(&self) -> u64 {
            3
        }
        fn finalized(&self) -> bool {
            false
        }
        fn read(
            &self,
            _: u64,
            _: usize,
        ) -> LocalFuture<'_, Result<Bytes, super::super::BodyError>> {
            Box::pin(async { Ok(Bytes::new()) })
        }
    }

    #[test]
    fn withholds_then_prepends_without_copying() {
        let seen = Rc::new(RefCell::new(Vec::new()));
        let mut chain = Chain::new(vec![
            Box::new(filter(Some("mx"))),
            Box::new(Sink(seen.clone())),
        ]);
        let mut tx = smtp_tx();
        tx.tx.rcpt_response = vec![Some(Response::new(250, "ok"))];
        tx.body = Some(MessageBody::blob(Rc::new(Partial)));
        futures_util::FutureExt::now_or_never(chain.update(&mut tx)).unwrap();
        assert_eq!(seen.borrow()[0], None, "incomplete body is withheld");

        let msg = Bytes::from_static(b"Subject: hi\r\n\r\nhello\r\n");
        tx.body = Some(MessageBody::blob(Rc::new(MemoryBlob(msg.clone()))));
        futures_util::FutureExt::now_or_never(chain.update(&mut tx)).unwrap();
        futures_util::FutureExt::now_or_never(chain.update(&mut tx)).unwrap();
        let seen = seen.borrow();
        let got = seen[1].as_ref().unwrap();
        assert!(got.starts_with(b"Received: from gargantua1"));
        assert!(got.ends_with(&msg));
        assert_eq!(seen[1], seen[2], "the same header on every run");
        // Downstream keeps its own body; the segments share the stored blob.
        let Some(MessageBody::Raw(segs)) = &tx.body else {
            panic!()
        };
        assert_eq!(segs.len(), 1);
        assert_eq!(tx.tx.data_response.as_ref().unwrap().code, 250);
    }
}

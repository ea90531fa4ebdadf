//! The transaction: one message envelope, its body and the responses to each request.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use thiserror::Error;

use crate::{Mailbox, Response};

/// A `[host, port]` pair: the SMTP peer, the listener socket, or a next hop.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl HostPort {
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        HostPort {
            host: host.into(),
            port,
        }
    }
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl Serialize for HostPort {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (&self.host, self.port).serialize(s)
    }
}

// Elements 0 and 1 of any array are taken (a 4-tuple IPv6 peer name is truncated).
impl<'de> Deserialize<'de> for HostPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Vec::<Value>::deserialize(d)?;
        match (v.first(), v.get(1)) {
            (Some(Value::String(h)), Some(Value::Number(p))) => {
                let port = p
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .ok_or_else(|| D::Error::custom("port out of range"))?;
                Ok(HostPort::new(h.clone(), port))
            }
            _ => Err(D::Error::custom("expected [host, port]")),
        }
    }
}

/// The principal a transaction was submitted as, and its optional sub-selector.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sender {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

impl Sender {
    pub fn new(name: impl Into<String>, tag: Option<String>) -> Self {
        Sender {
            name: name.into(),
            tag,
        }
    }
}

/// Upload state of one blob: bytes held so far and the declared total, once known.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlobState {
    pub length: u64,
    pub total: Option<u64>,
}

impl BlobState {
    pub fn finalized(&self) -> bool {
        self.total == Some(self.length)
    }
}

/// The message body as the router holds it.
#[derive(Clone, Debug, PartialEq)]
pub enum Body {
    /// A raw RFC 822 message (inline, uploaded or reused).
    Message(BlobState),
    /// A message-builder spec plus its named blobs, rendered to MIME on output.
    MessageBuilder {
        spec: Value,
        blobs: Vec<(String, BlobState)>,
    },
}

impl Body {
    /// Every blob of the body is complete.
    pub fn finalized(&self) -> bool {
        match self {
            Body::Message(b) => b.finalized(),
            Body::MessageBuilder { blobs, .. } => blobs.iter().all(|(_, b)| b.finalized()),
        }
    }
}

/// One transaction. Fields are set once and never removed; responses are appended.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Transaction {
    pub remote_host: Option<HostPort>,
    pub local_host: Option<HostPort>,
    pub mail_from: Option<Mailbox>,
    pub mail_response: Option<Response>,
    pub rcpt_to: Vec<Mailbox>,
    /// Index-aligned with `rcpt_to`; shorter while responses are pending.
    pub rcpt_response: Vec<Option<Response>>,
    pub data_response: Option<Response>,
    /// Number of delivery attempts started.
    pub attempt_count: Option<u32>,
    pub body: Option<Body>,
    /// Send a DSN on final failure.
    pub notification: bool,
    /// Retries are enabled.
    pub retry: bool,
    /// `ehlo_host`, `esmtp`, `tls`, `auth` from the SMTP gateway.
    pub smtp_meta: Option<Map<String, Value>>,
    pub cancelled: bool,
    /// Set when the router will not try again.
    pub final_attempt_reason: Option<String>,
    pub sender: Option<Sender>,
}

/// An incremental update (the PATCH dialect): a sender and/or more recipients.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Update {
    pub mail_from: Option<Mailbox>,
    pub rcpt_to: Vec<Mailbox>,
    /// Number of recipients the client believes are already present.
    pub rcpt_to_list_offset: usize,
}

impl Update {
    pub fn is_empty(&self) -> bool {
        self.mail_from.is_none() && self.rcpt_to.is_empty()
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum UpdateError {
    #[error("mail_from already set to a different mailbox")]
    MailFromChanged,
    #[error("rcpt_to_list_offset {offset} does not match the {present} recipients present")]
    RcptOffset { offset: usize, present: usize },
    #[error("recipients cannot be added after the body")]
    RcptAfterBody,
}

impl Transaction {
    /// Nothing given so far still waits for an answer: MAIL (if sent) and every RCPT are
    /// answered (a failed MAIL answers for the recipients) and, once the body is complete
    /// and some recipient was accepted, DATA too; or the transaction has ended. What a
    /// `Prefer: wait` request waits for.
    pub fn settled(&self, body_complete: bool) -> bool {
        if self.final_attempt_reason.is_some() || self.cancelled {
            return true;
        }
        if self.mail_from.is_some() {
            match &self.mail_response {
                None => return false,
                Some(m) if m.err() => return true,
                Some(_) => {}
            }
        }
        let n = self.rcpt_to.len();
        if self.rcpt_response.len() < n || self.rcpt_response[..n].iter().any(Option::is_none) {
            return false;
        }
        let accepted = self.rcpt_response.iter().flatten().any(Response::ok);
        !body_complete || !accepted || self.data_response.is_some()
    }

    /// Applies an incremental update. Returns whether anything changed.
    pub fn apply(&mut self, update: &Update) -> Result<bool, UpdateError> {
        if let (Some(old), Some(new)) = (&self.mail_from, &update.mail_from)
            && old != new
        {
            return Err(UpdateError::MailFromChanged);
        }
        if !update.rcpt_to.is_empty() {
            if update.rcpt_to_list_offset != self.rcpt_to.len() {
                return Err(UpdateError::RcptOffset {
                    offset: update.rcpt_to_list_offset,
                    present: self.rcpt_to.len(),
                });
            }
            if self.body.is_some() {
                return Err(UpdateError::RcptAfterBody);
            }
        }
        let mut changed = false;
        if self.mail_from.is_none() && update.mail_from.is_some() {
            self.mail_from = update.mail_from.clone();
            changed = true;
        }
        if !update.rcpt_to.is_empty() {
            self.rcpt_to.extend(update.rcpt_to.iter().cloned());
            changed = true;
        }
        Ok(changed)
    }

    /// The envelope as stored in the database (no responses, no body).
    pub fn to_db_json(&self) -> Value {
        serde_json::to_value(DbEnvelope {
            remote_host: self.remote_host.clone(),
            local_host: self.local_host.clone(),
            mail_from: self.mail_from.clone(),
            rcpt_to: self.rcpt_to.clone(),
            notification: self.notification.then(Map::new),
            retry: self.retry.then(Map::new),
            smtp_meta: self.smtp_meta.clone(),
            cancelled: self.cancelled.then_some(true),
            sender: self.sender.clone(),
        })
        .expect("envelope serializes")
    }

    /// Restores the envelope fields from their database form.
    pub fn from_db_json(v: &Value) -> Result<Transaction, serde_json::Error> {
        let e = DbEnvelope::deserialize(v)?;
        Ok(Transaction {
            remote_host: e.remote_host,
            local_host: e.local_host,
            mail_from: e.mail_from,
            rcpt_to: e.rcpt_to,
            notification: e.notification.is_some(),
            retry: e.retry.is_some(),
            smtp_meta: e.smtp_meta,
            cancelled: e.cancelled.unwrap_or(false),
            sender: e.sender,
            ..Default::default()
        })
    }

    /// The upstream responses of one attempt, as stored with that attempt.
    pub fn responses_json(&self) -> Value {
        serde_json::to_value(AttemptResponses {
            mail_response: self.mail_response.clone(),
            rcpt_response: self.rcpt_response.clone(),
            data_response: self.data_response.clone(),
        })
        .expect("responses serialize")
    }

    /// Merges an attempt's stored responses into this transaction.
    pub fn set_responses_json(&mut self, v: &Value) -> Result<(), serde_json::Error> {
        let r = AttemptResponses::deserialize(v)?;
        self.mail_response = r.mail_response;
        self.rcpt_response = r.rcpt_response;
        self.data_response = r.data_response;
        Ok(())
    }
}

#[derive(Serialize, Deserialize)]
struct DbEnvelope {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    remote_host: Option<HostPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    local_host: Option<HostPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mail_from: Option<Mailbox>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    rcpt_to: Vec<Mailbox>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    notification: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retry: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    smtp_meta: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cancelled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sender: Option<Sender>,
}

#[derive(Serialize, Deserialize)]
struct AttemptResponses {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mail_response: Option<Response>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    rcpt_response: Vec<Option<Response>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data_response: Option<Response>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EsmtpParam;

    #[test]
    fn settled_when_nothing_waits_for_an_answer() {
        let ok = || Some(Response::new(250, "ok"));
        let mut t = Transaction {
            mail_from: Some(Mailbox::new("a@example.com")),
            rcpt_to: vec![Mailbox::new("b@example.com"), Mailbox::new("c@example.com")],
            ..Default::default()
        };
        assert!(!t.settled(false));
        t.mail_response = ok();
        t.rcpt_response = vec![ok(), None];
        assert!(!t.settled(false), "a recipient is unanswered");
        t.rcpt_response = vec![ok(), Some(Response::new(550, "no"))];
        assert!(t.settled(false));
        assert!(!t.settled(true), "the body waits for DATA");
        t.data_response = ok();
        assert!(t.settled(true));
        // A failed MAIL answers for everything; so do refused recipients for DATA.
        let mut m = Transaction {
            mail_from: Some(Mailbox::new("a@example.com")),
            rcpt_to: vec![Mailbox::new("b@example.com")],
            mail_response: Some(Response::new(550, "no")),
            ..Default::default()
        };
        assert!(m.settled(true));
        m.mail_response = ok();
        m.rcpt_response = vec![Some(Response::new(450, "later"))];
        assert!(m.settled(true));
        // An ended transaction is settled whatever is missing.
        let mut e = Transaction {
            rcpt_to: vec![Mailbox::new("b@example.com")],
            ..Default::default()
        };
        assert!(!e.settled(false));
        e.final_attempt_reason = Some("cancelled".into());
        assert!(e.settled(true));
    }

    fn tx() -> Transaction {
        Transaction {
            remote_host: Some(HostPort::new("1.2.3.4", 25)),
            mail_from: Some(
                Mailbox::new("alice@example.com")
                    .with_params(vec![EsmtpParam::new("SIZE", Some("100".into()))]),
            ),
            rcpt_to: vec![Mailbox::new("bob@example.com")],
            retry: true,
            sender: Some(Sender::new("submission", None)),
            ..Default::default()
        }
    }

    #[test]
    fn db_round_trip() {
        let t = tx();
        let j = t.to_db_json();
        assert_eq!(
            j.to_string(),
            r#"{"mail_from":{"e":[{"k":"SIZE","p":"100"}],"m":"alice@example.com"},"rcpt_to":[{"m":"bob@example.com"}],"remote_host":["1.2.3.4",25],"retry":{},"sender":{"name":"submission"}}"#
        );
        assert_eq!(Transaction::from_db_json(&j).unwrap(), t);
    }

    #[test]
    fn responses_round_trip() {
        let mut t = tx();
        t.mail_response = Some(Response::new(250, "ok"));
        t.rcpt_response = vec![None, Some(Response::new(550, "no"))];
        let j = t.responses_json();
        let mut u = Transaction::default();
        u.set_responses_json(&j).unwrap();
        assert_eq!(u.rcpt_response, t.rcpt_response);
        assert_eq!(u.mail_response, t.mail_response);
    }

    #[test]
    fn apply_updates() {
        let mut t = Transaction::default();
        let u = Update {
            mail_from: Some(Mailbox::new("a@x")),
            ..Default::default()
        };
        assert_eq!(t.apply(&u), Ok(true));
        assert_eq!(t.apply(&u), Ok(false), "identical mail_from is ignored");
        let bad = Update {
            mail_from: Some(Mailbox::new("b@x")),
            ..Default::default()
        };
        assert_eq!(t.apply(&bad), Err(UpdateError::MailFromChanged));
        let r1 = Update {
            rcpt_to: vec![Mailbox::new("r1@x")],
            ..Default::default()
        };
        assert_eq!(t.apply(&r1), Ok(true));
        assert_eq!(
            t.apply(&r1),
            Err(UpdateError::RcptOffset {
                offset: 0,
                present: 1
            })
        );
        let r2 = Update {
            rcpt_to: vec![Mailbox::new("r2@x")],
            rcpt_to_list_offset: 1,
            ..Default::default()
        };
        assert_eq!(t.apply(&r2), Ok(true));
        assert_eq!(t.rcpt_to.len(), 2);
    }

    #[test]
    fn host_port_json() {
        let h: HostPort = serde_json::from_str(r#"["::1", 25, 0, 0]"#).unwrap();
        assert_eq!(h, HostPort::new("::1", 25));
        assert_eq!(h.to_string(), "[::1]:25");
        assert!(serde_json::from_str::<HostPort>(r#"{"host":"a"}"#).is_err());
        assert!(serde_json::from_str::<HostPort>(r#"["a", 70000]"#).is_err());
        assert!(serde_json::from_str::<HostPort>(r#"["a"]"#).is_err());
    }
}

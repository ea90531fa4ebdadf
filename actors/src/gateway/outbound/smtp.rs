//! Pure SMTP client helpers: DATA dot-stuffing across chunk boundaries, ESMTP parameter
//! checks against the peer's EHLO, reply conversion.

use koukan::{EsmtpParam, Mailbox, Response};
use smtp_proto::*;

/// Dot-stuffs a body streamed in arbitrary pieces. A '.' is doubled at the start of the body
/// and after every CR or LF (not only CRLF): receivers that end lines on a bare LF or CR must
/// not see a lone dot either, which is what SMTP smuggling exploits.
#[derive(Debug)]
pub struct DotStuffer {
    at_line_start: bool,
    last_two: [u8; 2],
    total: u64,
}

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer {
            at_line_start: true,
            last_two: [0, 0],
            total: 0,
        }
    }
}

impl DotStuffer {
    /// Appends the stuffed form of `input` to `out`.
    pub fn stuff(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut start = 0;
        for (i, &b) in input.iter().enumerate() {
            if b == b'.' && self.at_line_start {
                out.extend_from_slice(&input[start..=i]);
                out.push(b'.');
                start = i + 1;
            }
            self.at_line_start = b == b'\n' || b == b'\r';
        }
        out.extend_from_slice(&input[start..]);
        match input {
            [] => {}
            [b] => self.last_two = [self.last_two[1], *b],
            [.., a, b] => self.last_two = [*a, *b],
        }
        self.total += input.len() as u64;
    }

    /// The end-of-data marker, preceded by a CRLF when the body does not end with one.
    pub fn terminator(&self) -> &'static [u8] {
        if self.total == 0 || self.last_two == *b"\r\n" {
            b".\r\n"
        } else {
            b"\r\n.\r\n"
        }
    }
}

/// A server reply as a REST response: the enhanced status code (if any) stays part of the
/// text, continuation lines are joined with '\n' (the parser already does this).
pub fn to_response(r: &smtp_proto::Response<String>) -> Response {
    let message = if r.esc[0] != 0 {
        format!("{}.{}.{} {}", r.esc[0], r.esc[1], r.esc[2], r.message)
    } else {
        r.message.clone()
    };
    Response::new(r.code, message)
}

fn has(ehlo: &EhloResponse<String>, ext: u32) -> bool {
    ehlo.capabilities & ext != 0
}

/// Text that may go into a command line: no controls, no brackets that would end the path.
fn clean(s: &str) -> bool {
    !s.bytes()
        .any(|b| b < 0x20 || b == 0x7f || b == b'<' || b == b'>')
}

fn valid_keyword(k: &str) -> bool {
    !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn valid_value(v: &str) -> bool {
    !v.is_empty() && v.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b'=')
}

/// Which extension a parameter needs. `None`: unknown keyword.
fn required_ext(keyword: &str, rcpt: bool) -> Option<u32> {
    let k = keyword.to_ascii_uppercase();
    Some(match (k.as_str(), rcpt) {
        ("SMTPUTF8", false) => EXT_SMTP_UTF8,
        ("RET" | "ENVID", false) | ("NOTIFY" | "ORCPT", true) => EXT_DSN,
        ("REQUIRETLS", false) => EXT_REQUIRE_TLS,
        ("AUTH", false) => EXT_AUTH,
        ("MT-PRIORITY", false) => EXT_MT_PRIORITY,
        ("BY", false) => EXT_DELIVER_BY,
        ("HOLDFOR" | "HOLDUNTIL", false) => EXT_FUTURE_RELEASE,
        ("MTRK", false) => EXT_MTRK,
        ("RRVS", true) => EXT_RRVS,
        ("CONPERM", false) => EXT_CONPERM,
        ("CONNEG", true) => EXT_CONNEG,
        _ => return None,
    })
}

fn not_advertised(verb: &str, keyword: &str) -> Response {
    Response::new(
        504,
        format!("5.5.4 smtp_endpoint: {verb} esmtp param not advertised by peer: {keyword}"),
    )
}

/// Checks every parameter against the peer's extensions and renders the ones to send.
/// SIZE goes only to a server that advertises it (and then must fit its limit); BODY=7BIT
/// needs nothing.
fn render_params(
    params: &[EsmtpParam],
    ehlo: &EhloResponse<String>,
    rcpt: bool,
) -> Result<String, Response> {
    let verb = if rcpt { "RCPT" } else { "MAIL" };
    let mut out = String::new();
    for p in params {
        let k = p.keyword.as_str();
        let v = p.value.as_deref();
        if !valid_keyword(k) || v.is_some_and(|v| !valid_value(v)) {
            return Err(Response::new(
                501,
                format!("5.5.4 invalid {verb} parameter {k}"),
            ));
        }
        if !rcpt && k.eq_ignore_ascii_case("SIZE") {
            if !has(ehlo, EXT_SIZE) {
                continue;
            }
            let n: u64 = v
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| Response::new(501, format!("5.5.4 invalid SIZE parameter {v:?}")))?;
            // A bare SIZE keyword (limit 0) means no fixed limit.
            if ehlo.size > 0 && n > ehlo.size as u64 {
                return Err(Response::new(
                    552,
                    format!("5.3.4 size={n} > upstream {}", ehlo.size),
                ));
            }
        } else if !rcpt && k.eq_ignore_ascii_case("BODY") {
            let ok = match v.map(str::to_ascii_uppercase).as_deref() {
                Some("7BIT") => true,
                Some("8BITMIME") => has(ehlo, EXT_8BIT_MIME),
                Some("BINARYMIME") => has(ehlo, EXT_BINARY_MIME),
                _ => false,
            };
            if !ok {
                return Err(Response::new(
                    504,
                    format!("5.5.4 body={} and not advertised", v.unwrap_or("")),
                ));
            }
        } else {
            match required_ext(k, rcpt) {
                Some(ext) if has(ehlo, ext) => {}
                _ => return Err(not_advertised(verb, k)),
            }
        }
        out.push(' ');
        out.push_str(k);
        if let Some(v) = v {
            out.push('=');
            out.push_str(v);
        }
    }
    Ok(out)
}

/// `MAIL FROM:<..> params`, or the response that replaces the server's.
pub fn mail_command(from: &Mailbox, ehlo: &EhloResponse<String>) -> Result<String, Response> {
    if !clean(&from.mailbox) {
        return Err(Response::new(501, "5.1.7 invalid reverse-path"));
    }
    let params = render_params(&from.esmtp, ehlo, false)?;
    Ok(format!("MAIL FROM:<{}>{params}\r\n", from.mailbox))
}

pub fn rcpt_command(to: &Mailbox, ehlo: &EhloResponse<String>) -> Result<String, Response> {
    if to.mailbox.is_empty() || !clean(&to.mailbox) {
        return Err(Response::new(501, "5.1.3 invalid forward-path"));
    }
    let params = render_params(&to.esmtp, ehlo, true)?;
    Ok(format!("RCPT TO:<{}>{params}\r\n", to.mailbox))
}

/// One REST data response from LMTP's per-recipient replies: success only if every
/// recipient accepted; otherwise a temporary failure wins over a permanent one, because a
/// retry (a possible duplicate) is better than a bounce of a message someone did get.
pub fn combine_lmtp(replies: &[Response]) -> Response {
    if let Some(r) = replies.iter().find(|r| r.temp()) {
        return r.clone();
    }
    if let Some(r) = replies.iter().find(|r| !r.ok()) {
        return r.clone();
    }
    replies
        .first()
        .cloned()
        .unwrap_or_else(|| Response::new(450, "4.3.0 no LMTP reply"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stuff_all(pieces: &[&[u8]]) -> Vec<u8> {
        let mut s = DotStuffer::default();
        let mut out = Vec::new();
        for p in pieces {
            s.stuff(p, &mut out);
        }
        out.extend_from_slice(s.terminator());
        out
    }

    #[test]
    fn stuffing_across_chunks() {
        assert_eq!(stuff_all(&[b".a\r\n"]), b"..a\r\n.\r\n");
        assert_eq!(stuff_all(&[b"a\r", b"\n", b".b\r\n"]), b"a\r\n..b\r\n.\r\n");
        assert_eq!(stuff_all(&[b"a\r\n", b"."]), b"a\r\n..\r\n.\r\n");
        assert_eq!(
            stuff_all(&[b"line1\n\r\n", b".dot\r\n"]),
            b"line1\n\r\n..dot\r\n.\r\n"
        );
        assert_eq!(stuff_all(&[b"x\n.\n"]), b"x\n..\n\r\n.\r\n");
        assert_eq!(stuff_all(&[b"no newline"]), b"no newline\r\n.\r\n");
        assert_eq!(stuff_all(&[]), b".\r\n");
        assert_eq!(stuff_all(&[b"a.b\r\n"]), b"a.b\r\n.\r\n");
        assert_eq!(stuff_all(&[b"a\r", b"\n"]), b"a\r\n.\r\n");
    }

    fn ehlo(caps: u32, size: usize) -> EhloResponse<String> {
        EhloResponse {
            hostname: "x".into(),
            capabilities: caps,
            size,
            ..Default::default()
        }
    }

    fn p(k: &str, v: Option<&str>) -> EsmtpParam {
        EsmtpParam::new(k, v.map(str::to_string))
    }

    #[test]
    fn params() {
        let from =
            Mailbox::new("a@x").with_params(vec![p("SIZE", Some("100")), p("SMTPUTF8", None)]);
        // SIZE dropped, and the parameter after it still checked.
        assert_eq!(mail_command(&from, &ehlo(0, 0)).unwrap_err().code, 504);
        assert_eq!(
            mail_command(&from, &ehlo(EXT_SMTP_UTF8, 0)).unwrap(),
            "MAIL FROM:<a@x> SMTPUTF8\r\n"
        );
        assert_eq!(
            mail_command(&from, &ehlo(EXT_SMTP_UTF8 | EXT_SIZE, 0)).unwrap(),
            "MAIL FROM:<a@x> SIZE=100 SMTPUTF8\r\n"
        );
        assert_eq!(
            mail_command(&from, &ehlo(EXT_SMTP_UTF8 | EXT_SIZE, 50))
                .unwrap_err()
                .code,
            552
        );
        let big = Mailbox::new("a@x").with_params(vec![p("SIZE", Some("999999999999"))]);
        assert_eq!(
            mail_command(&big, &ehlo(0, 0)).unwrap(),
            "MAIL FROM:<a@x>\r\n"
        );
        let seven = Mailbox::new("").with_params(vec![p("BODY", Some("7BIT"))]);
        assert_eq!(
            mail_command(&seven, &ehlo(0, 0)).unwrap(),
            "MAIL FROM:<> BODY=7BIT\r\n"
        );
        let eight = Mailbox::new("a@x").with_params(vec![p("BODY", Some("8BITMIME"))]);
        assert_eq!(mail_command(&eight, &ehlo(0, 0)).unwrap_err().code, 504);
        assert!(mail_command(&Mailbox::new("a\r\nRSET"), &ehlo(0, 0)).is_err());
        assert!(rcpt_command(&Mailbox::new("b@x>"), &ehlo(0, 0)).is_err());
        let inject = Mailbox::new("a@x").with_params(vec![p("X", Some("1\r\nRSET"))]);
        assert_eq!(mail_command(&inject, &ehlo(0, 0)).unwrap_err().code, 501);
        let notify = Mailbox::new("b@x").with_params(vec![p("NOTIFY", Some("NEVER"))]);
        assert_eq!(
            rcpt_command(&notify, &ehlo(EXT_DSN, 0)).unwrap(),
            "RCPT TO:<b@x> NOTIFY=NEVER\r\n"
        );
        assert_eq!(rcpt_command(&notify, &ehlo(0, 0)).unwrap_err().code, 504);
    }

    #[test]
    fn lmtp_combination() {
        let ok = Response::new(250, "ok");
        let temp = Response::new(452, "full");
        let perm = Response::new(550, "no");
        assert_eq!(combine_lmtp(&[ok.clone(), ok.clone()]), ok);
        assert_eq!(
            combine_lmtp(&[ok.clone(), perm.clone(), temp.clone()]),
            temp
        );
        assert_eq!(combine_lmtp(&[ok, perm.clone()]), perm);
    }
}

//! Whether a finished attempt bounces, and the DSN transaction that carries the bounce.

use bytes::Bytes;
use koukan::filter::MessageBody;
use koukan::{Mailbox, Response, Sender, Transaction};
use koukan_db::{NewBody, NewTransaction};

use super::dsn::Dsn;

/// Only the header block of the original goes into a DSN.
const HEADER_WINDOW: u64 = 64 * 1024;

/// The response a DSN reports for `tx` (envelope plus this attempt's responses), if any:
/// failures only — permanent ones, or temporary ones on the last attempt — and never to the
/// null reverse path or for a multi-recipient transaction.
pub fn bounce_response(tx: &Transaction, last_attempt: bool) -> Option<Response> {
    if tx.mail_from.as_ref().is_none_or(Mailbox::is_null) {
        return None;
    }
    let mail = tx.mail_response.as_ref()?;
    let selected = if mail.err() {
        mail.clone()
    } else {
        let answered: Vec<&Response> = tx.rcpt_response.iter().flatten().collect();
        match answered.as_slice() {
            [] => return None,
            [one] if one.err() => (*one).clone(),
            [_] => tx.data_response.clone()?,
            _ => return None,
        }
    };
    (selected.perm() || (selected.temp() && last_attempt)).then_some(selected)
}

/// The first bytes of a body up to its blank line, decoded lossily (8-bit headers must not
/// stop a bounce).
pub async fn original_headers(body: Option<&MessageBody>) -> String {
    let Some(body) = body else {
        return String::new();
    };
    let mut reader = body.reader(8192);
    let mut buf = Vec::new();
    while (buf.len() as u64) < HEADER_WINDOW {
        match reader.next().await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
            _ => break,
        }
        if let Some(end) = find_blank_line(&buf) {
            buf.truncate(end);
            return String::from_utf8_lossy(&buf).into_owned();
        }
    }
    match find_blank_line(&buf) {
        Some(end) => String::from_utf8_lossy(&buf[..end]).into_owned(),
        None => String::new(),
    }
}

fn find_blank_line(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// The DSN transaction: from the null reverse path to the original sender, under the
/// notification sender; retried per that sender's configuration, never bounced itself.
pub struct DsnRequest<'a> {
    pub rest_id: String,
    pub sender: Sender,
    pub retry: bool,
    pub mailer_daemon: &'a str,
    pub tx: &'a Transaction,
    pub response: &'a Response,
    pub headers: &'a str,
    pub arrival: i64,
    pub now: i64,
}

impl DsnRequest<'_> {
    pub fn build(self) -> Option<NewTransaction> {
        let return_path = self.tx.mail_from.as_ref()?;
        let recipient = self.tx.rcpt_to.first().map_or("", |m| m.mailbox.as_str());
        let message = Dsn {
            mailer_daemon: self.mailer_daemon,
            return_path: &return_path.mailbox,
            recipient,
            original_headers: self.headers,
            arrival: Some(self.arrival),
            now: self.now,
            response: self.response,
        }
        .render();
        Some(NewTransaction {
            rest_id: self.rest_id,
            tx: Transaction {
                mail_from: Some(Mailbox::new("")),
                rcpt_to: vec![Mailbox::new(return_path.mailbox.clone())],
                sender: Some(self.sender),
                retry: self.retry,
                notification: false,
                ..Default::default()
            },
            body: NewBody::Inline(Bytes::from(message)),
            leased: false,
            start_attempt: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tx(mail: u16, rcpts: &[u16], data: Option<u16>) -> Transaction {
        Transaction {
            mail_from: Some(Mailbox::new("alice@example.com")),
            mail_response: Some(Response::new(mail, "m")),
            rcpt_to: rcpts
                .iter()
                .map(|_| Mailbox::new("bob@example.net"))
                .collect(),
            rcpt_response: rcpts.iter().map(|c| Some(Response::new(*c, "r"))).collect(),
            data_response: data.map(|c| Response::new(c, "d")),
            ..Default::default()
        }
    }

    #[test]
    fn which_failures_bounce() {
        assert_eq!(
            bounce_response(&tx(550, &[], None), false).unwrap().code,
            550
        );
        assert_eq!(
            bounce_response(&tx(450, &[], None), false),
            None,
            "temp, not last"
        );
        assert_eq!(
            bounce_response(&tx(450, &[], None), true).unwrap().code,
            450
        );
        assert_eq!(
            bounce_response(&tx(250, &[550], None), false).unwrap().code,
            550
        );
        assert_eq!(
            bounce_response(&tx(250, &[250], Some(554)), false)
                .unwrap()
                .code,
            554
        );
        assert_eq!(
            bounce_response(&tx(250, &[250], Some(250)), true),
            None,
            "delivered"
        );
        assert_eq!(
            bounce_response(&tx(250, &[550, 550], None), true),
            None,
            "multi-recipient"
        );
        let mut null = tx(550, &[], None);
        null.mail_from = Some(Mailbox::new(""));
        assert_eq!(bounce_response(&null, true), None, "null reverse path");
    }

    #[test]
    fn header_block() {
        let body = MessageBody::bytes("Subject: x\r\nFrom: \u{e9}\r\n\r\nbody\r\n");
        let h = futures_util::FutureExt::now_or_never(original_headers(Some(&body))).unwrap();
        assert_eq!(h, "Subject: x\r\nFrom: \u{e9}\r\n\r\n");
        let h = futures_util::FutureExt::now_or_never(original_headers(Some(&MessageBody::bytes(
            vec![0xffu8, b'\r', b'\n', b'\r', b'\n'],
        ))))
        .unwrap();
        assert_eq!(h, "\u{fffd}\r\n\r\n");
    }
}

//! RCPT: one PATCH per recipient (`rest-api.md` §10.3), then the wait for its response.

use std::borrow::Cow;

use koukan::Mailbox;
use koukan::transaction::Update;
use smtp_proto::RcptTo;

use super::mail::{is_postmaster, params_text};
use super::reply::Reply;
use super::session::Session;

/// Recipients per transaction (the RFC 5321 §4.5.3.1.8 minimum).
const MAX_RECIPIENTS: usize = 100;

impl Session {
    pub(super) async fn rcpt(&mut self, to: RcptTo<Cow<'_, str>>, line: &[u8]) {
        if self.helo.is_none() {
            self.reply(503, "5.5.1", "Error: send HELO first");
            return;
        }
        if let Some(r) = &self.env.failed {
            let r = r.clone();
            self.send(&r);
            return;
        }
        if !self.env.mail_ok {
            self.reply(503, "5.5.1", "Error: need MAIL command");
            return;
        }
        if self.env.body.is_some() {
            self.reply(503, "5.5.1", "Error: RCPT after BDAT");
            return;
        }
        if !params_text(line).is_empty() {
            self.reply(
                555,
                "5.5.4",
                "RCPT TO parameters not recognized or not implemented",
            );
            return;
        }
        let address = if !to.address.is_empty() {
            to.address.into_owned()
        } else if is_postmaster(line) {
            "postmaster".to_string()
        } else {
            self.reply(553, "5.1.3", "Error: malformed address");
            return;
        };
        if self.env.rcpts >= MAX_RECIPIENTS {
            self.reply(452, "4.5.3", "Too many recipients");
            return;
        }
        let deadline = self.rcpt_deadline();
        let index = self.env.rcpts;
        let rest = self.env.rest.as_mut().expect("MAIL accepted");
        let update = Update {
            rcpt_to: vec![Mailbox::new(address)],
            ..Default::default()
        };
        let result = match rest.update(&update).await {
            Ok(()) => {
                self.env.rcpts += 1;
                rest.wait_rcpt(index, deadline).await
            }
            Err(e) => Err(e),
        };
        self.rcpt_reply(result).await;
    }

    pub(super) fn rcpt_deadline(&self) -> std::time::Instant {
        Self::deadline(self.svc.cfg.rcpt_timeout.min(self.svc.client.timeout))
    }

    /// The `RCPT TO:<address>` lines pipelined right behind MAIL, up to the first one the
    /// full RCPT path would have to refuse or special-case: their addresses, to send with
    /// the create.
    pub(super) fn pipelined_rcpts(&self) -> Vec<String> {
        let mut rcpts = Vec::new();
        for line in self.conn.peek_lines().take(MAX_RECIPIENTS) {
            match smtp_proto::Request::parse(&mut line.iter()) {
                Ok(smtp_proto::Request::Rcpt { to })
                    if !to.address.is_empty() && params_text(line).is_empty() =>
                {
                    rcpts.push(to.address.into_owned())
                }
                _ => break,
            }
        }
        rcpts
    }

    /// Answers a RCPT from the router's response (or the exchange's failure).
    pub(super) async fn rcpt_reply(
        &mut self,
        result: Result<koukan::Response, crate::client::ClientError>,
    ) {
        match result {
            Ok(r) => {
                if r.ok() {
                    self.env.rcpts_ok += 1;
                }
                self.send(&Reply::from_response(&r, "2.1.5"));
            }
            Err(e) => {
                let r = self.fail_tx(&e).await;
                self.send(&r);
            }
        }
    }
}

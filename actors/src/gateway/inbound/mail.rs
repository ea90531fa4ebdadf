//! MAIL: creates the router transaction (`rest-api.md` §10.2) and waits for its
//! `mail_response`.

use std::borrow::Cow;

use koukan::{EsmtpParam, Mailbox, Sender, Transaction};
use serde_json::{Map, Value, json};
use smtp_proto::{MAIL_BODY_7BIT, MAIL_BODY_8BITMIME, MAIL_SMTPUTF8, MailFrom};

use super::reply::Reply;
use super::session::Session;
use crate::client::{HttpClient, RestTransaction};

/// The text after the closing `>` of a MAIL/RCPT path: the ESMTP parameters.
pub(super) fn params_text(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let after = text.rfind('>').map_or("", |i| &text[i + 1..]);
    after.trim().to_string()
}

/// `<postmaster>` and `<>` both parse as an empty address; tell them apart.
pub(super) fn is_postmaster(line: &[u8]) -> bool {
    let text = String::from_utf8_lossy(line).to_ascii_lowercase();
    text.contains("<postmaster>")
}

/// Parameters upper-cased, in the client's order (as the original forwards them).
fn esmtp_params(text: &str) -> Vec<EsmtpParam> {
    text.split_ascii_whitespace()
        .map(|p| {
            let p = p.to_ascii_uppercase();
            match p.split_once('=') {
                Some((k, v)) => EsmtpParam::new(k, Some(v.to_string())),
                None => EsmtpParam::new(p, None),
            }
        })
        .collect()
}

impl Session {
    pub(super) async fn mail(&mut self, from: MailFrom<Cow<'_, str>>, line: &[u8]) {
        let Some(helo) = &self.helo else {
            self.reply(503, "5.5.1", "Error: send HELO first");
            return;
        };
        if self.env.mail_ok && self.env.failed.is_none() {
            self.reply(503, "5.5.1", "Error: nested MAIL command");
            return;
        }
        let params = params_text(line);
        if !helo.esmtp && !params.is_empty() {
            self.reply(501, "5.5.4", "Syntax: MAIL FROM: <address>");
            return;
        }
        let known = MAIL_BODY_7BIT | MAIL_BODY_8BITMIME | MAIL_SMTPUTF8;
        let extra = from.flags & !known != 0
            || from.trans_id.is_some()
            || from.env_id.is_some()
            || from.solicit.is_some()
            || from.mtrk.is_some()
            || from.auth.is_some()
            || from.by != 0
            || from.hold_for != 0
            || from.hold_until != 0
            || from.mt_priority != 0;
        if extra {
            self.reply(
                555,
                "5.5.4",
                "MAIL FROM parameters not recognized or not implemented",
            );
            return;
        }
        if from.size as u64 > self.svc.cfg.max_message_size {
            self.reply(
                552,
                "5.3.4",
                "Error: message size exceeds fixed maximum message size",
            );
            return;
        }
        // A new MAIL after a failed one starts over; the old router tx is cancelled.
        self.reset_tx().await;

        let address = if from.address.is_empty() && is_postmaster(line) {
            "postmaster".to_string()
        } else {
            from.address.into_owned()
        };
        let helo = self.helo.as_ref().expect("checked above");
        let meta: Map<String, Value> = json!({
            "ehlo_host": helo.host,
            "esmtp": helo.esmtp,
            "tls": self.tls,
            "auth": self.auth.is_some(),
        })
        .as_object()
        .cloned()
        .expect("object literal");
        // RCPTs pipelined behind MAIL go with the create: one request and one wait
        // instead of a PATCH and a wait each.
        let rcpts = self.pipelined_rcpts();
        let tx = Transaction {
            remote_host: self.remote.clone(),
            local_host: self.local.clone(),
            mail_from: Some(Mailbox::new(address).with_params(esmtp_params(&params))),
            rcpt_to: rcpts.iter().map(|a| Mailbox::new(a.clone())).collect(),
            smtp_meta: Some(meta),
            sender: Some(Sender::new(
                self.svc.cfg.sender.clone(),
                Some(self.svc.cfg.tag.clone()),
            )),
            ..Default::default()
        };

        let settings = self.svc.client.clone();
        let deadline = Self::deadline(settings.timeout);
        let created = match HttpClient::shared(&settings.verify) {
            Ok(http) => {
                RestTransaction::create(http, settings, &self.svc.rest.endpoint, &tx, None).await
            }
            Err(e) => Err(e),
        };
        let mut rest = match created {
            Ok(t) => t,
            Err(e) => {
                tracing::info!(error = %e.detail(), "router create failed");
                self.send(&Reply::from_client_error(&e));
                return;
            }
        };
        if !rcpts.is_empty() {
            // All replies from one long poll where possible; a slow recipient must not
            // cost the MAIL reply, so only the MAIL response is required here.
            let _ = rest.wait_mail_and_rcpts(rcpts.len(), deadline).await;
        }
        match rest.wait_mail(deadline).await {
            Ok(r) => {
                self.send(&Reply::from_response(&r, "2.1.0"));
                if r.ok() {
                    self.env.mail_ok = true;
                    self.env.rest = Some(rest);
                    // The RCPT lines were handled with the create: answer each in turn.
                    for i in 0..rcpts.len() {
                        self.conn.skip_line();
                        self.env.rcpts = i + 1;
                        let deadline = self.rcpt_deadline();
                        let Some(rest) = self.env.rest.as_mut() else {
                            // An earlier recipient's wait failed the transaction.
                            let r = self.env.failed.clone().expect("failed transaction");
                            self.send(&r);
                            continue;
                        };
                        let result = rest.wait_rcpt(i, deadline).await;
                        self.rcpt_reply(result).await;
                    }
                } else {
                    // The RCPT lines stay and are refused on their own (no MAIL).
                    rest.cancel().await;
                }
            }
            Err(e) => {
                tracing::info!(error = %e.detail(), "no mail_response");
                rest.cancel().await;
                self.send(&Reply::from_client_error(&e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_in_client_order() {
        let p = params_text(b"MAIL FROM:<a@b> size=100 body=8bitmime SMTPUTF8\r\n");
        assert_eq!(p, "size=100 body=8bitmime SMTPUTF8");
        let e = esmtp_params(&p);
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"[{"k":"SIZE","p":"100"},{"k":"BODY","p":"8BITMIME"},{"k":"SMTPUTF8"}]"#
        );
        assert!(is_postmaster(b"MAIL FROM:<Postmaster>\r\n"));
        assert!(!is_postmaster(b"MAIL FROM:<>\r\n"));
    }
}

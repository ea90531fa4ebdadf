//! EHLO / HELO and HELP.

use super::session::{Helo, Session};

impl Session {
    /// EHLO and HELO end any transaction in progress (its router transaction is
    /// cancelled, not abandoned) and answer with the capabilities of this connection.
    pub(super) async fn ehlo(&mut self, host: String, esmtp: bool) {
        self.reset_tx().await;
        let name = self.svc.hostname.clone();
        if !esmtp {
            self.helo = Some(Helo { host, esmtp });
            self.reply(250, "", name);
            return;
        }
        let mut caps = vec![
            format!("{name} Hello {host}"),
            "PIPELINING".to_string(),
            "8BITMIME".to_string(),
            "SMTPUTF8".to_string(),
            format!("SIZE {}", self.svc.cfg.max_message_size),
            "ENHANCEDSTATUSCODES".to_string(),
        ];
        if self.svc.cfg.enable_bdat {
            caps.push("CHUNKING".into());
        }
        if self.starttls_offered() {
            caps.push("STARTTLS".into());
        }
        if self.auth_offered() {
            caps.push("AUTH PLAIN LOGIN".into());
        }
        caps.push("HELP".into());
        self.helo = Some(Helo { host, esmtp });
        self.reply(250, "", caps.join("\n"));
    }

    pub(super) fn help(&mut self) {
        let mut cmds = vec![
            "DATA", "EHLO", "HELO", "HELP", "MAIL", "NOOP", "QUIT", "RCPT", "RSET", "VRFY",
        ];
        if self.svc.cfg.enable_bdat {
            cmds.push("BDAT");
        }
        if self.svc.secrets.is_some() {
            cmds.push("AUTH");
        }
        if self.svc.tls.is_some() && !self.svc.cfg.smtps {
            cmds.push("STARTTLS");
        }
        cmds.sort_unstable();
        self.reply(
            214,
            "2.0.0",
            format!("Supported commands: {}", cmds.join(" ")),
        );
    }
}

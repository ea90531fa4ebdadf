//! `koukan send`: a minimal SMTP/LMTP client (the `ssmtp` tool of `tools.md` §1) on top of
//! mail-send's low-level client. Sends one message — a file verbatim, or a generated
//! text message — and reports every reply, so that it doubles as a protocol probe.

use std::sync::Arc;
use std::time::Duration;

use koukan::config::TlsVerify;
use mail_send::SmtpClient;
use smtp_proto::Response;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(Debug, Error)]
pub enum SendError {
    #[error("connecting to {server}: {detail}")]
    Connect { server: String, detail: String },
    #[error("{step}: {detail}")]
    Protocol { step: String, detail: String },
    #[error("TLS: {0}")]
    Tls(String),
}

#[derive(Clone, Debug)]
pub struct SendOptions {
    /// `host:port`.
    pub server: String,
    pub ehlo: String,
    /// Envelope sender (`""` for the null reverse-path).
    pub from: String,
    pub to: Vec<String>,
    pub starttls: bool,
    /// TLS certificate checking for STARTTLS.
    pub verify: TlsVerify,
    /// AUTH user and secret (needs STARTTLS on the gateway).
    pub auth: Option<(String, String)>,
    /// Speak LMTP (LHLO, one data reply per accepted recipient).
    pub lmtp: bool,
    /// Bound on each command.
    pub timeout: Duration,
    /// The message, sent as is (dot-stuffed on the wire).
    pub message: Vec<u8>,
}

/// One server reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub text: String,
}

impl Reply {
    fn of(r: &Response<String>) -> Reply {
        Reply {
            code: r.code,
            text: r.message.clone(),
        }
    }

    pub fn ok(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// As on the wire: one line per line of text.
    pub fn lines(&self) -> Vec<String> {
        let lines: Vec<&str> = self.text.split('\n').collect();
        lines
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let sep = if i + 1 == lines.len() { ' ' } else { '-' };
                format!("{}{sep}{}", self.code, l.trim_end_matches('\r'))
            })
            .collect()
    }
}

/// What the server answered.
#[derive(Clone, Debug, Default)]
pub struct SendReport {
    pub mail: Option<Reply>,
    pub rcpts: Vec<Reply>,
    /// SMTP: one; LMTP: one per accepted recipient.
    pub data: Vec<Reply>,
}

impl SendReport {
    /// Every recipient and the data were accepted.
    pub fn delivered(&self) -> bool {
        self.mail.as_ref().is_some_and(Reply::ok)
            && !self.rcpts.is_empty()
            && self.rcpts.iter().all(Reply::ok)
            && !self.data.is_empty()
            && self.data.iter().all(Reply::ok)
    }
}

/// A plain text message like the original tool's: From, To, Date, Message-ID, Subject.
pub fn generate_message(from: &str, to: &[String], subject: &str, body: &str) -> Vec<u8> {
    mail_builder::MessageBuilder::new()
        .from(from)
        .to(to.iter().map(String::as_str).collect::<Vec<_>>())
        .subject(subject)
        .text_body(body)
        .write_to_vec()
        .unwrap_or_default()
}

fn protocol(step: &str, e: impl std::fmt::Display) -> SendError {
    SendError::Protocol {
        step: step.to_string(),
        detail: e.to_string(),
    }
}

/// Standard base64 with padding (AUTH).
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The message with SMTP transparency: a leading dot on any line doubled, then the
/// terminator (after a CRLF added if the message lacks a final one).
fn dot_stuff(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + message.len() / 64 + 5);
    let mut line_start = true;
    for &b in message {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
    }
    if !message.is_empty() && !message.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

struct Session<'a, F: FnMut(&str)> {
    opts: &'a SendOptions,
    log: F,
}

impl<F: FnMut(&str)> Session<'_, F> {
    async fn cmd<T: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        c: &mut SmtpClient<T>,
        line: &str,
        shown: &str,
    ) -> Result<Reply, SendError> {
        (self.log)(&format!(">>> {shown}"));
        let r = c
            .cmd(format!("{line}\r\n"))
            .await
            .map_err(|e| protocol(shown, e))?;
        Ok(self.show(&r))
    }

    fn show(&mut self, r: &Response<String>) -> Reply {
        let r = Reply::of(r);
        for l in r.lines() {
            (self.log)(&format!("<<< {l}"));
        }
        r
    }

    async fn hello<T: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        c: &mut SmtpClient<T>,
    ) -> Result<Reply, SendError> {
        let verb = if self.opts.lmtp { "LHLO" } else { "EHLO" };
        let line = format!("{verb} {}", self.opts.ehlo);
        let r = self.cmd(c, &line, &line).await?;
        if !r.ok() {
            return Err(protocol(verb, format!("refused: {}", r.code)));
        }
        Ok(r)
    }

    async fn auth<T: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        c: &mut SmtpClient<T>,
        ehlo: &Reply,
    ) -> Result<(), SendError> {
        let Some((user, secret)) = &self.opts.auth else {
            return Ok(());
        };
        let mechs: Vec<String> = ehlo
            .text
            .lines()
            .filter_map(|l| {
                let l = l.trim().to_ascii_uppercase();
                l.strip_prefix("AUTH").map(|m| m.trim().to_string())
            })
            .flat_map(|m| m.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .collect();
        let r = if mechs.iter().any(|m| m == "PLAIN") || mechs.is_empty() {
            let token = base64(format!("\0{user}\0{secret}").as_bytes());
            self.cmd(c, &format!("AUTH PLAIN {token}"), "AUTH PLAIN ***")
                .await?
        } else {
            self.cmd(c, "AUTH LOGIN", "AUTH LOGIN").await?;
            self.cmd(c, &base64(user.as_bytes()), "(user)").await?;
            self.cmd(c, &base64(secret.as_bytes()), "***").await?
        };
        if r.code != 235 {
            return Err(protocol("AUTH", format!("refused: {} {}", r.code, r.text)));
        }
        Ok(())
    }

    async fn transaction<T: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        c: &mut SmtpClient<T>,
    ) -> Result<SendReport, SendError> {
        let mut report = SendReport::default();
        let size = self.opts.message.len();
        let line = format!("MAIL FROM:<{}> SIZE={size}", self.opts.from);
        let mail = self.cmd(c, &line, &line).await?;
        let mail_ok = mail.ok();
        report.mail = Some(mail);
        if !mail_ok {
            return Ok(report);
        }
        for to in &self.opts.to {
            let line = format!("RCPT TO:<{to}>");
            let r = self.cmd(c, &line, &line).await?;
            report.rcpts.push(r);
        }
        let accepted = report.rcpts.iter().filter(|r| r.ok()).count();
        if accepted == 0 {
            return Ok(report);
        }
        let r = self.cmd(c, "DATA", "DATA").await?;
        if r.code != 354 {
            report.data.push(r);
            return Ok(report);
        }
        (self.log)(&format!(
            ">>> ({} bytes of message, then .)",
            self.opts.message.len()
        ));
        let wire = dot_stuff(&self.opts.message);
        let timeout = self.opts.timeout.max(Duration::from_secs(60));
        tokio::time::timeout(timeout, async {
            c.stream.write_all(&wire).await?;
            c.stream.flush().await
        })
        .await
        .map_err(|_| protocol("DATA", "timeout writing the message"))?
        .map_err(|e| protocol("DATA", e))?;
        let replies = if self.opts.lmtp { accepted } else { 1 };
        for _ in 0..replies {
            let r = tokio::time::timeout(timeout, c.read())
                .await
                .map_err(|_| protocol("DATA", "timeout"))?
                .map_err(|e| protocol("DATA", e))?;
            let r = self.show(&r);
            report.data.push(r);
        }
        Ok(report)
    }

    async fn quit<T: AsyncRead + AsyncWrite + Unpin>(&mut self, c: &mut SmtpClient<T>) {
        let _ = self.cmd(c, "QUIT", "QUIT").await;
    }
}

/// Sends the message; `log` gets every command (`>>> `) and reply line (`<<< `).
pub async fn send(opts: &SendOptions, log: impl FnMut(&str)) -> Result<SendReport, SendError> {
    let mut s = Session { opts, log };
    let stream = tokio::time::timeout(opts.timeout, TcpStream::connect(&opts.server))
        .await
        .map_err(|_| SendError::Connect {
            server: opts.server.clone(),
            detail: "timeout".into(),
        })?
        .map_err(|e| SendError::Connect {
            server: opts.server.clone(),
            detail: e.to_string(),
        })?;
    let mut c = SmtpClient {
        stream,
        timeout: opts.timeout,
    };
    let greeting = c.read().await.map_err(|e| protocol("greeting", e))?;
    let greeting = s.show(&greeting);
    if greeting.code != 220 {
        return Err(protocol("greeting", format!("refused: {}", greeting.code)));
    }
    let ehlo = s.hello(&mut c).await?;
    if !opts.starttls {
        s.auth(&mut c, &ehlo).await?;
        let report = s.transaction(&mut c).await;
        s.quit(&mut c).await;
        return report;
    }
    let r = s.cmd(&mut c, "STARTTLS", "STARTTLS").await?;
    if r.code != 220 {
        return Err(protocol(
            "STARTTLS",
            format!("refused: {} {}", r.code, r.text),
        ));
    }
    let mut config =
        crate::client::tls_client_config(&opts.verify).map_err(|e| SendError::Tls(e.detail()))?;
    config.alpn_protocols.clear();
    let connector = TlsConnector::from(Arc::new(config));
    let host = opts
        .server
        .rsplit_once(':')
        .map_or(opts.server.as_str(), |(h, _)| h)
        .trim_matches(['[', ']']);
    let mut c = c
        .into_tls(&connector, host)
        .await
        .map_err(|e| SendError::Tls(e.to_string()))?;
    (s.log)("*** TLS established");
    let ehlo = s.hello(&mut c).await?;
    s.auth(&mut c, &ehlo).await?;
    let report = s.transaction(&mut c).await;
    s.quit(&mut c).await;
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transparency_and_encoding() {
        assert_eq!(dot_stuff(b".a\r\n.\r\nb\r\n"), b"..a\r\n..\r\nb\r\n.\r\n");
        assert_eq!(dot_stuff(b"x"), b"x\r\n.\r\n");
        assert_eq!(base64(b"\0u\0p"), "AHUAcA==");
        assert_eq!(base64(b"abc"), "YWJj");
        let r = Reply {
            code: 250,
            text: "a\nb".into(),
        };
        assert_eq!(r.lines(), vec!["250-a", "250 b"]);
    }
}

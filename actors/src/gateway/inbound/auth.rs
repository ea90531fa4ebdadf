//! SMTP AUTH PLAIN and LOGIN against the secrets file (`spec/gateway.md` §3).

use std::collections::HashMap;
use std::path::Path;

use mail_auth::common::crypto::{HashContext, HashImpl, Sha256};
use mail_auth::common::headers::Writer;
use mail_parser::decoders::base64::base64_decode;
use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN};
use thiserror::Error;

use super::session::{Line, MAX_AUTH_LINE, Session, Stop};

#[derive(Debug, Error)]
pub enum SecretsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: expected a JSON object of user name to hex SHA-256: {detail}")]
    Format { path: String, detail: String },
}

/// User name → SHA-256 of the secret.
#[derive(Clone, Debug)]
pub struct Secrets {
    users: HashMap<String, [u8; 32]>,
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let mut h = Sha256::hasher();
    h.write(data);
    let out = h.complete();
    let mut d = [0u8; 32];
    d.copy_from_slice(out.as_ref());
    d
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let nib = |c: u8| (c as char).to_digit(16).map(|v| v as u8);
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = nib(b[2 * i])? << 4 | nib(b[2 * i + 1])?;
    }
    Some(out)
}

/// Equal length digests compared without an early exit.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

impl Secrets {
    pub fn load(path: &Path) -> Result<Secrets, SecretsError> {
        let p = path.display().to_string();
        let text = std::fs::read(path).map_err(|source| SecretsError::Read {
            path: p.clone(),
            source,
        })?;
        Secrets::parse(&text).map_err(|detail| SecretsError::Format { path: p, detail })
    }

    pub fn parse(json: &[u8]) -> Result<Secrets, String> {
        let map: HashMap<String, String> =
            serde_json::from_slice(json).map_err(|e| e.to_string())?;
        let mut users = HashMap::new();
        for (user, hex) in map {
            // Either hex case is accepted.
            let d = unhex(&hex).ok_or_else(|| format!("{user:?}: not 64 hex digits"))?;
            users.insert(user, d);
        }
        Ok(Secrets { users })
    }

    /// Checks a user's secret; the hash is computed and compared even for an unknown
    /// user so that timing does not tell which users exist.
    pub fn check(&self, user: &str, secret: &str) -> bool {
        let d = sha256(secret.as_bytes());
        match self.users.get(user) {
            Some(stored) => same(stored, &d),
            None => {
                let _ = same(&[0u8; 32], &d);
                false
            }
        }
    }
}

/// "User Name\0" and "Password\0", as the original challenges.
const LOGIN_USER: &str = "VXNlciBOYW1lAA==";
const LOGIN_PASSWORD: &str = "UGFzc3dvcmQA";

enum Step {
    Value(Vec<u8>),
    Abort,
    BadBase64,
}

impl Session {
    pub(super) fn auth_offered(&self) -> bool {
        self.svc.secrets.is_some() && self.tls && self.auth.is_none()
    }

    /// A client response to a challenge (or the initial response).
    async fn auth_response(&mut self, initial: Option<String>) -> Result<Step, Stop> {
        let text = match initial {
            Some(t) => t,
            None => match self.read_line(MAX_AUTH_LINE, false).await? {
                Line::Ok(l) => String::from_utf8_lossy(&l).trim_end().to_string(),
                Line::TooLong => return Ok(Step::BadBase64),
            },
        };
        if text == "*" {
            return Ok(Step::Abort);
        }
        if text == "=" {
            return Ok(Step::Value(Vec::new()));
        }
        Ok(match base64_decode(text.as_bytes()) {
            Some(v) => Step::Value(v),
            None => Step::BadBase64,
        })
    }

    pub(super) async fn auth(&mut self, mechanism: u64, initial: String) -> Result<(), Stop> {
        match &self.helo {
            None => {
                self.reply(503, "5.5.1", "Error: send EHLO first");
                return Ok(());
            }
            Some(h) if !h.esmtp => {
                self.reply(500, "5.5.1", "Error: command \"AUTH\" not recognized");
                return Ok(());
            }
            Some(_) => {}
        }
        if self.svc.secrets.is_none() {
            self.reply(502, "5.5.1", "Error: AUTH not available");
            return Ok(());
        }
        if !self.tls {
            self.reply(
                538,
                "5.7.11",
                "Encryption required for requested authentication mechanism",
            );
            return Ok(());
        }
        if self.auth.is_some() {
            self.reply(503, "5.5.1", "Already authenticated");
            return Ok(());
        }
        if self.env.mail_ok {
            self.reply(
                503,
                "5.5.1",
                "Error: AUTH not permitted during a mail transaction",
            );
            return Ok(());
        }
        let initial = Some(initial).filter(|s| !s.is_empty());
        let creds = match mechanism {
            AUTH_PLAIN => {
                if initial.is_none() {
                    self.reply(334, "", "");
                }
                match self.auth_response(initial).await? {
                    Step::Value(v) => {
                        let parts: Vec<&[u8]> = v.split(|&b| b == 0).collect();
                        if parts.len() != 3 {
                            self.reply(501, "5.5.2", "Can't split auth value");
                            return Ok(());
                        }
                        // The authorization identity is ignored.
                        Some((parts[1].to_vec(), parts[2].to_vec()))
                    }
                    Step::Abort => None,
                    Step::BadBase64 => {
                        self.reply(501, "5.5.2", "Can't decode base64");
                        return Ok(());
                    }
                }
            }
            AUTH_LOGIN => {
                if initial.is_none() {
                    self.reply(334, "", LOGIN_USER);
                }
                let user = match self.auth_response(initial).await? {
                    Step::Value(v) => v,
                    Step::Abort => {
                        self.reply(501, "5.7.0", "Auth aborted");
                        return Ok(());
                    }
                    Step::BadBase64 => {
                        self.reply(501, "5.5.2", "Can't decode base64");
                        return Ok(());
                    }
                };
                self.reply(334, "", LOGIN_PASSWORD);
                match self.auth_response(None).await? {
                    Step::Value(p) => Some((user, p)),
                    Step::Abort => None,
                    Step::BadBase64 => {
                        self.reply(501, "5.5.2", "Can't decode base64");
                        return Ok(());
                    }
                }
            }
            _ => {
                self.reply(504, "5.5.4", "Unrecognized authentication type");
                return Ok(());
            }
        };
        let Some((user, secret)) = creds else {
            self.reply(501, "5.7.0", "Auth aborted");
            return Ok(());
        };
        let ok = match (String::from_utf8(user), String::from_utf8(secret)) {
            (Ok(u), Ok(s)) => {
                let ok = self.svc.secrets.as_ref().is_some_and(|x| x.check(&u, &s));
                ok.then_some(u)
            }
            _ => None,
        };
        match ok {
            Some(user) => {
                tracing::info!(user = %user, "SMTP AUTH succeeded");
                self.auth = Some(user);
                self.reply(235, "2.7.0", "Authentication successful");
            }
            None => self.reply(535, "5.7.8", "Authentication credentials invalid"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets() {
        let s = Secrets::parse(
            br#"{"my-application": "186EF76E9D6A723ECB570D4D9C287487D001E5D35F7ED4A313350A407950318E"}"#,
        )
        .unwrap();
        assert!(s.check("my-application", "my-secret"));
        assert!(!s.check("my-application", "other"));
        assert!(!s.check("nobody", "my-secret"));
        assert!(Secrets::parse(br#"{"a": "xyz"}"#).is_err());
        assert!(Secrets::parse(br#"[]"#).is_err());
    }
}

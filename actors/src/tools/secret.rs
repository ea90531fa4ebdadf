//! `koukan secret`: generates an SMTP AUTH secret and the hash the gateway stores
//! (`tools.md` §6): the secret is 16 random bytes as unpadded base64url, the hash the
//! lower-case hex SHA-256 of the secret's bytes. The gateway's `auth_secrets` file is a
//! JSON object of user name to that hash (`gateway/inbound/auth.rs`).

use std::path::Path;

use mail_auth::common::crypto::{HashContext, HashImpl, Sha256};
use mail_auth::common::headers::Writer;
use rand::RngCore;
use serde_json::{Map, Value};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SecretError {
    #[error("{path}: {detail}")]
    File { path: String, detail: String },
}

/// A generated secret and its stored form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Secret {
    pub secret: String,
    pub hash: String,
}

impl Secret {
    /// A fresh random secret.
    pub fn generate() -> Secret {
        let mut bytes = [0u8; 16];
        rand::rng().fill_bytes(&mut bytes);
        Secret::from_secret(&base64url(&bytes))
    }

    /// The hash of a chosen secret.
    pub fn from_secret(secret: &str) -> Secret {
        Secret {
            secret: secret.to_string(),
            hash: hash(secret),
        }
    }

    /// `<secret> <hash>`, the original tool's output line.
    pub fn line(&self) -> String {
        format!("{} {}", self.secret, self.hash)
    }
}

/// Lower-case hex SHA-256 of the secret's UTF-8 bytes.
pub fn hash(secret: &str) -> String {
    let mut h = Sha256::hasher();
    h.write(secret.as_bytes());
    h.complete()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Unpadded base64url.
fn base64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..c.len() + 1 {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// Adds or replaces `user` in the secrets file (created if missing), keeping the others.
pub fn store(path: &Path, user: &str, hash: &str) -> Result<(), SecretError> {
    let err = |detail: String| SecretError::File {
        path: path.display().to_string(),
        detail,
    };
    let mut users: Map<String, Value> = match std::fs::read(path) {
        Ok(text) => serde_json::from_slice(&text).map_err(|e| err(e.to_string()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Map::new(),
        Err(e) => return Err(err(e.to_string())),
    };
    users.insert(user.to_string(), Value::String(hash.to_string()));
    let mut text = serde_json::to_vec_pretty(&users).expect("json serializes");
    text.push(b'\n');
    std::fs::write(path, text).map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worked_example_and_format() {
        // tools.md §6.
        assert_eq!(
            hash("my-secret"),
            "186ef76e9d6a723ecb570d4d9c287487d001e5d35f7ed4a313350a407950318e"
        );
        assert_eq!(base64url(b"\xfb\xff"), "-_8");
        assert_eq!(base64url(b"abc"), "YWJj");
        let s = Secret::generate();
        assert_eq!(s.secret.len(), 22);
        assert_eq!(s.hash.len(), 64);
        assert_eq!(s.line().split(' ').count(), 2);
    }

    #[test]
    fn store_merges_users() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secrets.json");
        store(&p, "alice", &hash("a")).unwrap();
        store(&p, "bob", &hash("b")).unwrap();
        let m: Map<String, Value> = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m["bob"], hash("b"));
    }
}

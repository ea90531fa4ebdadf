//! `dkim_sign`: DKIM-signs the message (`spec/filters.md` §6.4) with mail-auth.
//!
//! The key (RSA → rsa-sha256, Ed25519 → ed25519-sha256, PEM PKCS#8 or PKCS#1) is read when
//! the filter is built, so a missing or bad key is a configuration error, not a failed
//! delivery. The body is withheld from the rest of the chain until complete, then signed by
//! streaming it through mail-auth's `DkimSigningStream` in chunks: only the header block is
//! held in memory (mail-auth buffers it until the blank line; we refuse header blocks over
//! [`MAX_HEADER_BYTES`]); the body is hashed as it is read. Upstream gets the
//! `DKIM-Signature` header + the original body (the stored blob is not copied).
//!
//! Signed headers: every header field present except `Return-Path`, `Received`,
//! `Comments`, `Keywords` and `DKIM-Signature` (trace and volatile fields); `Bcc` is signed
//! as the reference does. Canonicalization relaxed/simple.

use std::path::Path;

use bytes::Bytes;
use mail_auth::common::crypto::{DkimKey, Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

use super::{ChainTx, Filter, FilterBuildError, LocalFuture, MessageBody, Next};
use crate::Response;
use crate::config::DkimSignFilter;

/// Largest header block signed (the body has no limit: it is streamed).
pub const MAX_HEADER_BYTES: usize = 1 << 20;
const CHUNK: usize = 64 * 1024;
const NOT_SIGNED: &[&str] = &[
    "return-path",
    "received",
    "comments",
    "keywords",
    "dkim-signature",
];

pub struct DkimSign {
    signer: DkimSigner<DkimKey, Done>,
    /// The signature header once made (later runs send the same bytes).
    header: Option<Result<Bytes, String>>,
}

impl DkimSign {
    /// Reads the key now: a missing or unusable key (or a missing `domain`/`selector`) is an
    /// error. A config without `key` means the filter is disabled (the chain builder drops it);
    /// building it anyway is an error too.
    pub fn new(cfg: &DkimSignFilter) -> Result<DkimSign, FilterBuildError> {
        let path = cfg
            .key
            .as_ref()
            .ok_or_else(|| FilterBuildError::config("dkim_sign", "no key (filter disabled)"))?;
        let (Some(domain), Some(selector)) = (&cfg.domain, &cfg.selector) else {
            return Err(FilterBuildError::config(
                "dkim_sign",
                "domain and selector are required with key",
            ));
        };
        let key = load_key(path)?;
        let signer = DkimSigner::from_key(key)
            .domain(domain.clone())
            .selector(selector.clone())
            .headers(["From"])
            .header_canonicalization(Canonicalization::Relaxed)
            .body_canonicalization(Canonicalization::Simple);
        Ok(DkimSign {
            signer,
            header: None,
        })
    }

    /// The `DKIM-Signature: ...\r\n` header for `body`, reading it in chunks.
    pub async fn sign(&mut self, body: &MessageBody) -> Result<String, String> {
        let mut reader = body.reader(CHUNK);
        // The header block first, to know which fields are there to sign.
        let mut head: Vec<u8> = Vec::new();
        let mut end = None;
        while end.is_none() {
            let Some(chunk) = reader.next().await.map_err(|e| e.to_string())? else {
                break;
            };
            let from = head.len().saturating_sub(3);
            head.extend_from_slice(&chunk);
            end = find_blank_line(&head, from);
            if end.is_none() && head.len() > MAX_HEADER_BYTES {
                return Err(format!("header block exceeds {MAX_HEADER_BYTES} bytes"));
            }
        }
        let names = header_names(&head[..end.unwrap_or(head.len())]);
        if !names.iter().any(|n| n.eq_ignore_ascii_case("from")) {
            return Err("no From header".into());
        }
        self.signer.template.h = names;
        let mut stream = self.signer.sign_streaming();
        stream.write(&head);
        drop(head);
        while let Some(chunk) = reader.next().await.map_err(|e| e.to_string())? {
            stream.write(&chunk);
        }
        let sig = stream.finish().map_err(|e| e.to_string())?;
        Ok(sig.to_header())
    }
}

fn load_key(path: &Path) -> Result<DkimKey, FilterBuildError> {
    let err = |message: String| FilterBuildError::File {
        filter: "dkim_sign",
        path: path.to_path_buf(),
        message,
    };
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let der =
        PrivateKeyDer::from_pem_slice(&pem).map_err(|e| err(format!("not a PEM key: {e}")))?;
    match der {
        PrivateKeyDer::Pkcs1(_) => RsaKey::<Sha256>::from_key_der(der)
            .map(DkimKey::Rsa)
            .map_err(|e| err(e.to_string())),
        PrivateKeyDer::Pkcs8(ref p8) => {
            // PKCS#8 holds either kind; ring tells them apart by refusing the other.
            if let Ok(k) = Ed25519Key::from_pkcs8_maybe_unchecked_der(p8.secret_pkcs8_der()) {
                return Ok(DkimKey::Ed25519(k));
            }
            RsaKey::<Sha256>::from_key_der(der)
                .map(DkimKey::Rsa)
                .map_err(|e| err(format!("neither an RSA nor an Ed25519 key: {e}")))
        }
        _ => Err(err("unsupported key type (need RSA or Ed25519)".into())),
    }
}

/// Offset just past the header block's terminating blank line (CRLF CRLF, or bare LF LF).
fn find_blank_line(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' {
            if buf[i + 1] == b'\n' {
                return Some(i + 2);
            }
            if buf[i + 1] == b'\r' && buf.get(i + 2) == Some(&b'\n') {
                return Some(i + 3);
            }
        }
        i += 1;
    }
    None
}

/// Field names of a header block, first-seen order, once each, minus [`NOT_SIGNED`].
fn header_names(block: &[u8]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in block.split(|b| *b == b'\n') {
        if line
            .first()
            .is_none_or(|b| *b == b' ' || *b == b'\t' || *b == b'\r')
        {
            continue;
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let Ok(name) = std::str::from_utf8(&line[..colon]) else {
            continue;
        };
        let name = name.trim_end();
        if name.is_empty()
            || name.contains(|c: char| !c.is_ascii_graphic())
            || NOT_SIGNED.iter().any(|n| n.eq_ignore_ascii_case(name))
            || out.iter().any(|n| n.eq_ignore_ascii_case(name))
        {
            continue;
        }
        out.push(name.to_string());
    }
    out
}

impl Filter for DkimSign {
    fn on_update<'a>(&'a mut self, tx: &'a mut ChainTx, next: Next<'a>) -> LocalFuture<'a, ()> {
        Box::pin(async move {
            let Some(original) = tx.body.take() else {
                return next.run(tx).await;
            };
            // Builder specs are not RFC 822 yet: message_builder must come first.
            let upstream = if tx.tx.cancelled || matches!(original, MessageBody::Builder { .. }) {
                Some(original.clone())
            } else if original.finalized() {
                if self.header.is_none() {
                    let r = self.sign(&original).await.map(Bytes::from);
                    self.header = Some(r);
                }
                match self.header.as_ref() {
                    Some(Ok(h)) => Some(original.prepend(h.clone())),
                    Some(Err(e)) => {
                        if tx.tx.data_response.is_none() {
                            tx.tx.data_response = Some(Response::new(
                                500,
                                format!("5.6.0 signing failed (DkimSignFilter): {e}"),
                            ));
                        }
                        None
                    }
                    None => None,
                }
            } else {
                None
            };
            tx.body = upstream;
            next.run(tx).await;
            tx.body = Some(original);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::dns_resolution::tests::TestDns;
    use crate::filter::{Chain, MemoryBlob};
    use crate::{Mailbox, Response};
    use base64::Engine;
    use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
    use hickory_resolver::proto::rr::RData;
    use hickory_resolver::proto::rr::rdata::TXT;
    use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator};
    use std::cell::RefCell;
    use std::path::PathBuf;
    use std::rc::Rc;
    use std::time::Duration;

    fn testdata(f: &str) -> PathBuf {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/src/filter/testdata")).join(f)
    }

    fn cfg(key: PathBuf) -> DkimSignFilter {
        DkimSignFilter {
            key: Some(key),
            domain: Some("example.com".into()),
            selector: Some("sel".into()),
        }
    }

    fn public_key(path: &Path) -> (&'static str, String) {
        let b64 = |b: Vec<u8>| base64::engine::general_purpose::STANDARD.encode(b);
        match load_key(path).unwrap() {
            DkimKey::Rsa(k) => ("rsa", b64(k.public_key())),
            DkimKey::Ed25519(k) => ("ed25519", b64(k.public_key())),
        }
    }

    /// Verifies `msg` against the key at `path`, published as `sel._domainkey.example.com`
    /// by a DNS server on loopback.
    async fn verify(msg: &[u8], path: &Path) -> Vec<DkimResult> {
        let (k, p) = public_key(path);
        let record = format!("v=DKIM1; k={k}; p={p}");
        let chunks = record
            .as_bytes()
            .chunks(255)
            .map(|c| String::from_utf8(c.to_vec()).unwrap())
            .collect();
        let dns = TestDns::start(
            vec![("sel._domainkey.example.com.", RData::TXT(TXT::new(chunks)))],
            &[],
        )
        .await;
        let mut ns = NameServerConfig::udp_and_tcp(dns.addr.ip());
        for c in ns.connections.iter_mut() {
            c.port = dns.addr.port();
        }
        let mut opts = ResolverOpts::default();
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 1;
        let auth =
            MessageAuthenticator::new(ResolverConfig::from_name_servers(vec![ns]), opts).unwrap();
        let m = AuthenticatedMessage::parse(msg).unwrap();
        auth.verify_dkim(&m)
            .await
            .iter()
            .map(|o| o.result().clone())
            .collect()
    }

    const MSG: &[u8] =
        b"From: alice@example.com\r\nTo: bob@example.org\r\nBcc: carol@example.org\r\n\
Received: from x by y; Fri, 13 Feb 2009 23:31:30 +0000\r\nSubject: hello\r\n\
X-Custom: 1\r\n\r\nhello, world!\r\nline two\r\n";

    /// The message as stored: split across a prepended header and a blob.
    fn body(msg: &'static [u8]) -> MessageBody {
        MessageBody::blob(Rc::new(MemoryBlob(Bytes::from_static(&msg[40..]))))
            .prepend(Bytes::from_static(&msg[..40]))
    }

    async fn sign_and_verify(key: &str) {
        let path = testdata(key);
        let mut f = DkimSign::new(&cfg(path.clone())).unwrap();
        let header = f.sign(&body(MSG)).await.unwrap();
        assert!(header.starts_with("DKIM-Signature: "), "{header}");
        assert!(header.ends_with("\r\n"));
        assert!(header.contains("c=relaxed/simple"), "{header}");
        let h_tag: String = header
            .split("h=")
            .nth(1)
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .into();
        let h_tag: String = h_tag.chars().filter(|c| !c.is_whitespace()).collect();
        // mail-auth lists fields bottom-up (the order verifiers pick duplicates in).
        assert_eq!(h_tag, "X-Custom:Subject:Bcc:To:From");
        let signed = [header.as_bytes(), MSG].concat();
        assert_eq!(verify(&signed, &path).await, vec![DkimResult::Pass]);
        // A changed body fails.
        let tampered = [header.as_bytes(), &MSG[..MSG.len() - 3], b"!\r\n"].concat();
        let r = verify(&tampered, &path).await;
        assert!(
            matches!(r[..], [DkimResult::Fail(_) | DkimResult::Neutral(_)]),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn rsa_sign_verify() {
        sign_and_verify("dkim-rsa.pem").await;
        assert!(header_contains_algo("dkim-rsa.pem", "a=rsa-sha256").await);
    }

    #[tokio::test]
    async fn ed25519_sign_verify() {
        sign_and_verify("dkim-ed25519.pem").await;
        assert!(header_contains_algo("dkim-ed25519.pem", "a=ed25519-sha256").await);
    }

    async fn header_contains_algo(key: &str, algo: &str) -> bool {
        let mut f = DkimSign::new(&cfg(testdata(key))).unwrap();
        f.sign(&body(MSG)).await.unwrap().contains(algo)
    }

    #[tokio::test]
    async fn large_body_streams() {
        // 5 MiB body, read in 64 KiB chunks.
        let mut big = b"From: a@example.com\r\nSubject: big\r\n\r\n".to_vec();
        for i in 0..(5 << 20) / 64 {
            big.extend_from_slice(format!("{i:062}\r\n").as_bytes());
        }
        let big: &'static [u8] = Box::leak(big.into_boxed_slice());
        let path = testdata("dkim-ed25519.pem");
        let mut f = DkimSign::new(&cfg(path.clone())).unwrap();
        let header = f.sign(&body(big)).await.unwrap();
        let signed = [header.as_bytes(), big].concat();
        assert_eq!(verify(&signed, &path).await, vec![DkimResult::Pass]);
    }

    #[test]
    fn bad_keys_fail_at_construction() {
        let e = DkimSign::new(&cfg("/nonexistent/key.pem".into()))
            .err()
            .unwrap();
        assert!(matches!(e, FilterBuildError::File { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/key.pem"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(
            &junk,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        assert!(DkimSign::new(&cfg(junk)).is_err());
        let text = dir.path().join("text.pem");
        std::fs::write(&text, "not a key").unwrap();
        assert!(DkimSign::new(&cfg(text)).is_err());
        let mut no_domain = cfg(testdata("dkim-rsa.pem"));
        no_domain.domain = None;
        assert!(DkimSign::new(&no_domain).is_err());
        assert!(
            DkimSign::new(&DkimSignFilter {
                key: None,
                domain: None,
                selector: None
            })
            .is_err()
        );
    }

    #[test]
    fn names_and_blank_line() {
        assert_eq!(
            header_names(
                b"From: a\r\nfrom: b\r\nSubject: x\r\n  folded\r\nReceived: r\r\nbogus\r\n"
            ),
            vec!["From", "Subject"]
        );
        assert_eq!(find_blank_line(b"a: b\r\n\r\nbody", 0), Some(8));
        assert_eq!(find_blank_line(b"a: b\n\nbody", 0), Some(6));
        assert_eq!(find_blank_line(b"a: b\r\n", 0), None);
    }

    /// Records the body it is given.
    struct Sink(Rc<RefCell<Vec<Option<Vec<u8>>>>>);
    impl Filter for Sink {
        fn on_update<'a>(&'a mut self, tx: &'a mut ChainTx, _: Next<'a>) -> LocalFuture<'a, ()> {
            Box::pin(async move {
                let b = match &tx.body {
                    Some(b) => Some(b.read_all(1 << 24).await.unwrap()),
                    None => None,
                };
                self.0.borrow_mut().push(b);
                if tx.body_finalized() && tx.tx.data_response.is_none() {
                    tx.tx.data_response = Some(Response::new(250, "ok"));
                }
            })
        }
    }

    fn chain_tx(body: MessageBody) -> ChainTx {
        let mut t = ChainTx::default();
        t.tx.mail_from = Some(Mailbox::new("alice@example.com"));
        t.tx.mail_response = Some(Response::new(250, "ok"));
        t.tx.rcpt_to = vec![Mailbox::new("bob@example.org")];
        t.tx.rcpt_response = vec![Some(Response::new(250, "ok"))];
        t.body = Some(body);
        t
    }

    #[tokio::test]
    async fn filter_prepends_signature() {
        let seen = Rc::new(RefCell::new(Vec::new()));
        let f = DkimSign::new(&cfg(testdata("dkim-rsa.pem"))).unwrap();
        let mut chain = Chain::new(vec![Box::new(f), Box::new(Sink(seen.clone()))]);
        let mut t = chain_tx(body(MSG));
        chain.update(&mut t).await;
        chain.update(&mut t).await;
        let seen = seen.borrow().clone();
        let got = seen[0].as_ref().unwrap();
        assert!(got.starts_with(b"DKIM-Signature: "));
        assert!(got.ends_with(MSG));
        assert_eq!(seen[0], seen[1], "signed once");
        assert_eq!(t.tx.data_response.as_ref().unwrap().code, 250);
        assert_eq!(
            verify(got, &testdata("dkim-rsa.pem")).await,
            vec![DkimResult::Pass]
        );
    }

    #[tokio::test]
    async fn unsignable_message_is_a_500() {
        let seen = Rc::new(RefCell::new(Vec::new()));
        let f = DkimSign::new(&cfg(testdata("dkim-ed25519.pem"))).unwrap();
        let mut chain = Chain::new(vec![Box::new(f), Box::new(Sink(seen.clone()))]);
        // No From header.
        let mut t = chain_tx(MessageBody::bytes("Subject: x\r\n\r\nbody\r\n"));
        chain.update(&mut t).await;
        let r = t.tx.data_response.as_ref().unwrap();
        assert_eq!(r.code, 500);
        assert!(r.message.contains("signing failed (DkimSignFilter)"), "{r}");
        assert_eq!(seen.borrow()[0], None, "nothing sent upstream");
        // Endless header block.
        let mut f = DkimSign::new(&cfg(testdata("dkim-ed25519.pem"))).unwrap();
        let huge = format!("From: a@b\r\n{}", "X: y\r\n".repeat(MAX_HEADER_BYTES / 4));
        assert!(f.sign(&MessageBody::bytes(huge)).await.is_err());
    }
}

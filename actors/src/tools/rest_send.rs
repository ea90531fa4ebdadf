//! `koukan rest-send`: submits messages over the REST API (the `send_message` tool of
//! `tools.md` §3): a message-builder spec whose parts may name local files
//! (`"content": {"create_id": …, "filename": …}`), or a raw RFC 5322 file. One transaction
//! per recipient: create, upload what is not finalized, then poll until the transaction is
//! done (`final_attempt_reason` present, README decision 1).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use awc::http::StatusCode;
use serde_json::{Map, Value, json};
use thiserror::Error;

/// Longest answer read.
const MAX_JSON: usize = 1 << 20;
/// Hanging GETs ask for at most this.
const POLL: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum RestSendError {
    #[error("{path}: {detail}")]
    File { path: String, detail: String },
    #[error("message-builder spec: {0}")]
    Spec(String),
    #[error("{step}: {detail}")]
    Http { step: String, detail: String },
}

/// What to send.
#[derive(Clone, Debug)]
pub enum Message {
    /// A message-builder spec and the contents of the blobs it creates, by `create_id`.
    Builder {
        spec: Value,
        blobs: BTreeMap<String, Vec<u8>>,
    },
    /// A pre-formatted message, uploaded as the raw body.
    Rfc822(Vec<u8>),
}

impl Message {
    /// Loads a spec file: each part's `filename` (relative to the working directory, or
    /// else to the spec's directory) is read as the blob of its `create_id` and removed
    /// from the spec; `date` and `message-id` headers are added when missing.
    pub fn builder_file(path: &Path) -> Result<Message, RestSendError> {
        let ferr = |p: &Path, e: &dyn std::fmt::Display| RestSendError::File {
            path: p.display().to_string(),
            detail: e.to_string(),
        };
        let text = std::fs::read(path).map_err(|e| ferr(path, &e))?;
        let spec: Value = serde_json::from_slice(&text).map_err(|e| ferr(path, &e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Message::builder(spec, |f| {
            let p = PathBuf::from(f);
            let p = if p.is_absolute() || p.exists() {
                p
            } else {
                base.join(p)
            };
            std::fs::read(&p).map_err(|e| ferr(&p, &e))
        })
    }

    /// A spec whose `filename`s are resolved by `read`.
    pub fn builder(
        mut spec: Value,
        mut read: impl FnMut(&str) -> Result<Vec<u8>, RestSendError>,
    ) -> Result<Message, RestSendError> {
        let Value::Object(top) = &mut spec else {
            return Err(RestSendError::Spec("not a JSON object".into()));
        };
        let mut blobs = BTreeMap::new();
        for list in ["text_body", "related_attachments", "file_attachments"] {
            let Some(Value::Array(parts)) = top.get_mut(list) else {
                continue;
            };
            for part in parts {
                let Some(Value::Object(content)) = part.get_mut("content") else {
                    continue;
                };
                let Some(Value::String(file)) = content.remove("filename") else {
                    continue;
                };
                let Some(Value::String(id)) = content.get("create_id") else {
                    return Err(RestSendError::Spec(format!(
                        "part with filename {file:?} has no create_id"
                    )));
                };
                blobs.insert(id.clone(), read(&file)?);
            }
        }
        let headers = top
            .entry("headers")
            .or_insert_with(|| Value::Array(Vec::new()));
        let Value::Array(headers) = headers else {
            return Err(RestSendError::Spec("headers must be an array".into()));
        };
        let has = |headers: &[Value], name: &str| {
            headers.iter().any(|h| {
                h.get(0)
                    .and_then(Value::as_str)
                    .is_some_and(|n| n.eq_ignore_ascii_case(name))
            })
        };
        if !has(headers, "date") {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            headers.push(json!(["date", {"unix_secs": now}]));
        }
        if !has(headers, "message-id") {
            headers.push(json!(["message-id", [message_id()]]));
        }
        Ok(Message::Builder { spec, blobs })
    }
}

fn message_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{hex}@localhost")
}

#[derive(Clone, Debug)]
pub struct RestSendOptions {
    /// Create URL, `http://host:port/senders/<sender>/transactions`.
    pub base_url: String,
    pub mail_from: String,
    pub tag: Option<String>,
    /// How long to wait for each transaction to be done.
    pub timeout: Duration,
}

/// How one transaction ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Data response 2xx.
    Success,
    /// Done without a 2xx data response, or refused at create.
    Failure,
    /// Not done before the timeout.
    Inflight,
}

#[derive(Clone, Debug)]
pub struct SendResult {
    pub rcpt: String,
    pub outcome: Outcome,
    pub location: Option<String>,
    /// The last read JSON (or the create's error answer).
    pub json: Value,
}

fn http_err(step: &str, detail: impl std::fmt::Display) -> RestSendError {
    RestSendError::Http {
        step: step.to_string(),
        detail: detail.to_string(),
    }
}

fn client() -> awc::Client {
    awc::Client::builder()
        .disable_timeout()
        .max_redirects(10)
        .finish()
}

/// Joins a possibly relative URI with the URL it came from.
fn absolute(base: &str, uri: &str) -> String {
    if uri.contains("://") {
        return uri.to_string();
    }
    let origin = base
        .find("://")
        .and_then(|s| base[s + 3..].find('/').map(|p| s + 3 + p))
        .map_or(base, |end| &base[..end]);
    format!("{origin}/{}", uri.trim_start_matches('/'))
}

async fn put(c: &awc::Client, url: &str, data: Vec<u8>) -> Result<(), RestSendError> {
    let mut resp = c
        .put(url)
        .timeout(Duration::from_secs(300))
        .send_body(data)
        .await
        .map_err(|e| http_err(&format!("PUT {url}"), e))?;
    if resp.status() != StatusCode::OK {
        let body = resp.body().await.unwrap_or_default();
        return Err(http_err(
            &format!("PUT {url}"),
            format!("{} {}", resp.status(), String::from_utf8_lossy(&body)),
        ));
    }
    Ok(())
}

fn code(v: &Value) -> Option<u64> {
    v.get("code").and_then(Value::as_u64)
}

/// Sends `message` to `rcpt` in one transaction; `log` gets progress lines.
pub async fn send_one(
    opts: &RestSendOptions,
    message: &Message,
    rcpt: &str,
    mut log: impl FnMut(&str),
) -> Result<SendResult, RestSendError> {
    let c = client();
    let mut create = Map::new();
    create.insert("mail_from".into(), json!({"m": opts.mail_from}));
    create.insert("rcpt_to".into(), json!([{"m": rcpt}]));
    if let Some(tag) = &opts.tag {
        create.insert("sender".into(), json!({"tag": tag}));
    }
    if let Message::Builder { spec, .. } = message {
        create.insert("body".into(), json!({"message_builder": spec}));
    }
    let mut resp = c
        .post(&opts.base_url)
        .insert_header(("content-type", "application/json"))
        .timeout(Duration::from_secs(30))
        .send_body(Value::Object(create).to_string())
        .await
        .map_err(|e| http_err("create", e))?;
    let body = resp.body().limit(MAX_JSON).await.unwrap_or_default();
    if resp.status() != StatusCode::CREATED {
        log(&format!(
            "create: {} {}",
            resp.status(),
            String::from_utf8_lossy(&body)
        ));
        return Ok(SendResult {
            rcpt: rcpt.to_string(),
            outcome: Outcome::Failure,
            location: None,
            json: json!({"status": resp.status().as_u16(),
                         "error": String::from_utf8_lossy(&body)}),
        });
    }
    let location = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(|l| absolute(&opts.base_url, l))
        .ok_or_else(|| http_err("create", "201 without location"))?;
    let mut etag = resp
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut read: Value = serde_json::from_slice(&body).map_err(|e| http_err("create", e))?;
    log(&format!("created {location}"));

    // Upload what the router does not have yet.
    match message {
        Message::Builder { blobs, .. } => {
            let status = read["body"]["message_builder"]["blob_status"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            for (id, s) in status {
                if s["finalized"] == json!(true) {
                    continue;
                }
                let uri = s["uri"]
                    .as_str()
                    .ok_or_else(|| http_err("create", format!("blob {id} without uri")))?;
                let data = blobs
                    .get(&id)
                    .ok_or_else(|| http_err("create", format!("router wants unknown blob {id}")))?;
                put(&c, &absolute(&location, uri), data.clone()).await?;
                log(&format!("uploaded blob {id} ({} bytes)", data.len()));
            }
        }
        Message::Rfc822(data) => {
            let uri = read["body"]["blob_status"]["uri"]
                .as_str()
                .ok_or_else(|| http_err("create", "no body.blob_status.uri"))?;
            put(&c, &absolute(&location, uri), data.clone()).await?;
            log(&format!("uploaded body ({} bytes)", data.len()));
        }
    }

    // Poll until done.
    let deadline = Instant::now() + opts.timeout;
    loop {
        if read.get("final_attempt_reason").is_some() {
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            log("timed out waiting for the transaction to be done");
            return Ok(SendResult {
                rcpt: rcpt.to_string(),
                outcome: Outcome::Inflight,
                location: Some(location),
                json: read,
            });
        }
        let hang = POLL.min(deadline - now).as_secs().max(1);
        let mut req = c
            .get(&location)
            .timeout(Duration::from_secs(hang + 10))
            .insert_header(("request-timeout", hang.to_string()));
        if let Some(e) = &etag {
            req = req.insert_header(("if-none-match", e.as_str()));
        }
        let started = Instant::now();
        let mut resp = req.send().await.map_err(|e| http_err("GET", e))?;
        match resp.status() {
            StatusCode::OK => {
                let body = resp
                    .body()
                    .limit(MAX_JSON)
                    .await
                    .map_err(|e| http_err("GET", e))?;
                etag = resp
                    .headers()
                    .get("etag")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                read = serde_json::from_slice(&body).map_err(|e| http_err("GET", e))?;
            }
            StatusCode::NOT_MODIFIED => {
                // Anti-spin against a server that does not hang.
                let spent = started.elapsed();
                if spent < Duration::from_secs(1) {
                    actix_rt::time::sleep(Duration::from_secs(1) - spent).await;
                }
            }
            s => return Err(http_err("GET", s)),
        }
    }
    let data_ok = read
        .get("data_response")
        .and_then(code)
        .is_some_and(|c| c < 300);
    Ok(SendResult {
        rcpt: rcpt.to_string(),
        outcome: if data_ok {
            Outcome::Success
        } else {
            Outcome::Failure
        },
        location: Some(location),
        json: read,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_files_become_blobs() {
        let spec = json!({"headers": [["subject", "hello"]],
            "text_body": [{"content_type": "text/plain",
                           "content": {"create_id": "p", "filename": "body.txt"}}]});
        let m = Message::builder(spec, |f| Ok(format!("contents of {f}").into_bytes())).unwrap();
        let Message::Builder { spec, blobs } = m else {
            panic!()
        };
        assert_eq!(blobs["p"], b"contents of body.txt");
        assert_eq!(spec["text_body"][0]["content"], json!({"create_id": "p"}));
        let headers = spec["headers"].as_array().unwrap();
        assert_eq!(headers.len(), 3);
        assert_eq!(headers[1][0], "date");
        assert_eq!(headers[2][0], "message-id");
        assert_eq!(
            absolute("http://h:1/senders/x/transactions", "/transactions/a"),
            "http://h:1/transactions/a"
        );
    }
}

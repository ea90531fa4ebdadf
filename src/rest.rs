//! The REST JSON of a transaction, shared by servers (router, gateway) and clients (the
//! gateway's router client, the router's `rest_output`, tools).
//!
//! Three directions exist: the create POST body, the PATCH body, and the read view returned
//! by every answer. Each accepts only its own keys; an unknown key, a `null` or an empty
//! array makes the whole document invalid.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;

use crate::transaction::Update;
use crate::{HostPort, Response, Transaction};

/// Name of the raw message body among a transaction's blobs.
pub const BODY_BLOB: &str = "__internal_tx_body";
/// Client-supplied blob ids may not use this prefix.
pub const RESERVED_BLOB_PREFIX: &str = "__internal";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RestJsonError {
    #[error("invalid tx json: {0}")]
    Invalid(String),
    #[error("tx json sender may only contain name,tag")]
    SenderKeys,
    #[error("invalid body: {0}")]
    Body(String),
}

fn invalid(msg: impl Into<String>) -> RestJsonError {
    RestJsonError::Invalid(msg.into())
}

fn object(bytes: &[u8]) -> Result<Map<String, Value>, RestJsonError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(invalid("not a JSON object")),
        Err(e) => Err(invalid(format!("malformed JSON: {e}"))),
    }
}

fn field<T: serde::de::DeserializeOwned>(key: &str, v: Value) -> Result<T, RestJsonError> {
    if v.is_null() {
        return Err(invalid(format!("{key}: null")));
    }
    if v.as_array().is_some_and(|a| a.is_empty()) {
        return Err(invalid(format!("{key}: empty list")));
    }
    serde_json::from_value(v).map_err(|e| invalid(format!("{key}: {e}")))
}

/// A reference to a finalized blob of another transaction: `/transactions/<tx>/body` or
/// `/transactions/<tx>/blob/<id>`, as a path or an absolute URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobUri {
    pub tx: String,
    /// `BODY_BLOB` for the message body.
    pub blob: String,
}

impl BlobUri {
    pub fn parse(uri: &str) -> Option<BlobUri> {
        // Only the path counts; scheme and authority are dropped.
        let path = match uri.split_once("://") {
            Some((_, rest)) => &rest[rest.find('/')?..],
            None => uri,
        };
        let path = path.split(['?', '#']).next()?;
        let rest = path.strip_prefix("/transactions/")?;
        let mut parts = rest.split('/');
        let tx = parts
            .next()
            .filter(|t| crate::rest_id::is_valid_rest_id(t))?;
        let blob = match (parts.next(), parts.next(), parts.next()) {
            (Some("body"), None, None) => BODY_BLOB.to_string(),
            (Some("blob"), Some(id), None) if !id.is_empty() => id.to_string(),
            _ => return None,
        };
        Some(BlobUri {
            tx: tx.to_string(),
            blob,
        })
    }

    pub fn path(&self) -> String {
        if self.blob == BODY_BLOB {
            format!("/transactions/{}/body", self.tx)
        } else {
            format!("/transactions/{}/blob/{}", self.tx, self.blob)
        }
    }
}

/// Where the bytes of one message-builder blob come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlobSource {
    /// Uploaded later with `PUT /transactions/<tx>/blob/<id>`.
    Create,
    /// Given inline in the spec; finalized at creation.
    Inline(String),
    /// A finalized blob of an earlier transaction, shared, not copied.
    Reuse(BlobUri),
}

/// A body given in a create request.
#[derive(Clone, Debug, PartialEq)]
pub enum BodyRequest {
    Inline(String),
    Reuse(BlobUri),
    /// The spec with every part's `content` rewritten to `{"create_id": id}`, and the blobs.
    MessageBuilder {
        spec: Value,
        blobs: Vec<(String, BlobSource)>,
    },
}

/// The parts lists of a message-builder spec that carry blobs, in blob-index order.
const PART_LISTS: [&str; 3] = ["text_body", "related_attachments", "file_attachments"];
const SPEC_STANZAS: [&str; 4] = [
    "headers",
    "text_body",
    "related_attachments",
    "file_attachments",
];

impl BodyRequest {
    fn parse(v: Value) -> Result<Option<BodyRequest>, RestJsonError> {
        let Value::Object(mut m) = v else {
            return Err(RestJsonError::Body("body must be an object".into()));
        };
        if let Some(mb) = m.remove("message_builder")
            && mb.as_object().is_some_and(|o| !o.is_empty())
        {
            return Self::parse_message_builder(mb).map(Some);
        }
        if m.contains_key("blob_status") {
            return Err(RestJsonError::Body(
                "blob_status is a read-only field".into(),
            ));
        }
        if let Some(inline) = m.remove("inline") {
            return match inline {
                Value::String(s) => Ok(Some(BodyRequest::Inline(s))),
                _ => Err(RestJsonError::Body("inline must be a string".into())),
            };
        }
        if let Some(uri) = m.remove("reuse_uri") {
            let uri = uri
                .as_str()
                .ok_or_else(|| RestJsonError::Body("reuse_uri must be a string".into()))?;
            let parsed = BlobUri::parse(uri)
                .filter(|u| u.blob == BODY_BLOB)
                .ok_or_else(|| {
                    RestJsonError::Body(format!("reuse_uri {uri:?} is not /transactions/<id>/body"))
                })?;
            return Ok(Some(BodyRequest::Reuse(parsed)));
        }
        Ok(None)
    }

    fn parse_message_builder(mut spec: Value) -> Result<BodyRequest, RestJsonError> {
        let bad = |m: String| RestJsonError::Body(m);
        let obj = spec.as_object_mut().expect("checked by caller");
        if !SPEC_STANZAS.iter().any(|k| obj.contains_key(*k)) {
            return Err(bad(
                "message_builder needs headers, text_body, related_attachments or file_attachments"
                    .into(),
            ));
        }
        let mut blobs: Vec<(String, BlobSource)> = Vec::new();
        let mut index = 0usize;
        for list in PART_LISTS {
            let Some(parts) = obj.get_mut(list) else {
                continue;
            };
            let parts = parts
                .as_array_mut()
                .ok_or_else(|| bad(format!("{list} must be a list")))?;
            for part in parts.iter_mut() {
                let content = part
                    .get_mut("content")
                    .and_then(Value::as_object_mut)
                    .ok_or_else(|| bad(format!("{list}[{index}]: missing content")))?;
                let str_key = |k: &str| content.get(k).and_then(Value::as_str).map(str::to_string);
                let (id, source) = if let Some(uri) = str_key("reuse_uri") {
                    let u = BlobUri::parse(&uri)
                        .filter(|u| u.blob != BODY_BLOB)
                        .ok_or_else(|| bad(format!("{list}[{index}]: bad reuse_uri {uri:?}")))?;
                    (u.blob.clone(), BlobSource::Reuse(u))
                } else if let Some(id) = str_key("create_id") {
                    (id, BlobSource::Create)
                } else if let Some(text) = str_key("inline") {
                    (format!("inline{index}"), BlobSource::Inline(text))
                } else {
                    return Err(bad(format!(
                        "{list}[{index}]: content needs create_id, inline or reuse_uri"
                    )));
                };
                if id.is_empty() || id.starts_with(RESERVED_BLOB_PREFIX) || id.contains('/') {
                    return Err(bad(format!("{list}[{index}]: invalid blob id {id:?}")));
                }
                if blobs.iter().any(|(b, _)| *b == id) {
                    return Err(bad(format!("duplicate blob id {id:?}")));
                }
                *content = Map::from_iter([("create_id".to_string(), Value::String(id.clone()))]);
                blobs.push((id, source));
                index += 1;
            }
        }
        Ok(BodyRequest::MessageBuilder { spec, blobs })
    }
}

/// A parsed create POST.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CreateRequest {
    /// Envelope fields only (`sender` is left to the caller: the name comes from the path).
    pub tx: Transaction,
    pub tag: Option<String>,
    pub body: Option<BodyRequest>,
}

impl CreateRequest {
    pub fn parse(bytes: &[u8]) -> Result<CreateRequest, RestJsonError> {
        let mut req = CreateRequest::default();
        for (key, v) in object(bytes)? {
            match key.as_str() {
                "remote_host" => req.tx.remote_host = Some(field(&key, v)?),
                "local_host" => req.tx.local_host = Some(field(&key, v)?),
                "mail_from" => req.tx.mail_from = Some(field(&key, v)?),
                "rcpt_to" => req.tx.rcpt_to = field(&key, v)?,
                "smtp_meta" => req.tx.smtp_meta = Some(field(&key, v)?),
                // Accepted for compatibility, never stored or echoed.
                "filter_output" => {
                    let _: Map<String, Value> = field(&key, v)?;
                }
                "sender" => {
                    let Value::Object(s) = v else {
                        return Err(invalid("sender: must be an object"));
                    };
                    if s.keys().any(|k| k != "name" && k != "tag") {
                        return Err(RestJsonError::SenderKeys);
                    }
                    match s.get("tag") {
                        None => {}
                        Some(Value::String(t)) => req.tag = Some(t.clone()),
                        Some(_) => return Err(invalid("sender.tag: must be a string")),
                    }
                }
                "body" => {
                    if v.is_null() {
                        return Err(invalid("body: null"));
                    }
                    req.body = BodyRequest::parse(v)?;
                }
                other => return Err(invalid(format!("unknown field {other:?}"))),
            }
        }
        Ok(req)
    }
}

/// Parses a PATCH body into an incremental update.
pub fn parse_update(bytes: &[u8]) -> Result<Update, RestJsonError> {
    let mut update = Update::default();
    let mut offset = None;
    for (key, v) in object(bytes)? {
        match key.as_str() {
            "mail_from" => update.mail_from = Some(field(&key, v)?),
            "rcpt_to" => update.rcpt_to = field(&key, v)?,
            "rcpt_to_list_offset" => offset = Some(field::<usize>(&key, v)?),
            "filter_output" => {
                let _: Map<String, Value> = field(&key, v)?;
            }
            "body" => return Err(invalid("body cannot be sent in an update")),
            k if k.ends_with("_list_offset") => {}
            other => return Err(invalid(format!("unknown field {other:?}"))),
        }
    }
    update.rcpt_to_list_offset = offset.unwrap_or(0);
    Ok(update)
}

/// Upload status of one blob in a read view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobStatus {
    pub uri: String,
    /// Emitted only when true; `false` is accepted on input.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub finalized: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageBuilderView {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob_status: Option<BTreeMap<String, BlobStatus>>,
}

/// The `body` member of a read view. The router fills one of the two; receivers may fill
/// both (the raw body URI and where to POST the parsed message).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BodyView {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob_status: Option<BlobStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_builder: Option<MessageBuilderView>,
}

fn placeholder() -> Map<String, Value> {
    Map::new()
}

/// The read view, keys in the order the original emits them.
#[derive(Serialize)]
struct ReadJson<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_host: Option<&'a HostPort>,
    #[serde(skip_serializing_if = "Option::is_none")]
    local_host: Option<&'a HostPort>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mail_from: Option<Map<String, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mail_response: Option<&'a Response>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rcpt_to: Option<Vec<Map<String, Value>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rcpt_response: Option<&'a [Option<Response>]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_response: Option<&'a Response>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempt_count: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<&'a BodyView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    notification: Option<Map<String, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry: Option<Map<String, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cancelled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    final_attempt_reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sender: Option<Map<String, Value>>,
}

/// Renders the read view of `tx` (compact JSON, exactly what servers send).
pub fn render_read(tx: &Transaction, body: Option<&BodyView>) -> Vec<u8> {
    // Trailing pending recipients are simply not reported yet.
    let answered = tx
        .rcpt_response
        .iter()
        .rposition(Option::is_some)
        .map_or(0, |i| i + 1);
    let view = ReadJson {
        remote_host: tx.remote_host.as_ref(),
        local_host: tx.local_host.as_ref(),
        mail_from: tx.mail_from.as_ref().map(|_| placeholder()),
        mail_response: tx.mail_response.as_ref(),
        rcpt_to: (!tx.rcpt_to.is_empty()).then(|| vec![placeholder(); tx.rcpt_to.len()]),
        rcpt_response: (answered > 0).then(|| &tx.rcpt_response[..answered]),
        data_response: tx.data_response.as_ref(),
        attempt_count: tx.attempt_count,
        body,
        notification: tx.notification.then(placeholder),
        retry: tx.retry.then(placeholder),
        cancelled: tx.cancelled.then_some(true),
        final_attempt_reason: tx.final_attempt_reason.as_deref(),
        sender: tx.sender.as_ref().map(|_| placeholder()),
    };
    serde_json::to_vec(&view).expect("read view serializes")
}

/// A read view as a client sees it: placeholders are reduced to presence.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReadTx {
    pub remote_host: Option<HostPort>,
    pub local_host: Option<HostPort>,
    pub mail_from: bool,
    pub mail_response: Option<Response>,
    pub rcpt_to: usize,
    pub rcpt_response: Vec<Option<Response>>,
    pub data_response: Option<Response>,
    pub attempt_count: Option<u32>,
    pub body: Option<BodyView>,
    pub notification: bool,
    pub retry: bool,
    pub cancelled: bool,
    pub final_attempt_reason: Option<String>,
    pub sender: bool,
    pub filter_output: bool,
}

fn expect_placeholder(key: &str, v: &Value) -> Result<(), RestJsonError> {
    match v {
        Value::Object(m) if m.is_empty() => Ok(()),
        _ => Err(invalid(format!("{key}: expected {{}} placeholder"))),
    }
}

impl ReadTx {
    pub fn parse(bytes: &[u8]) -> Result<ReadTx, RestJsonError> {
        let mut r = ReadTx::default();
        for (key, v) in object(bytes)? {
            match key.as_str() {
                "remote_host" => r.remote_host = Some(field(&key, v)?),
                "local_host" => r.local_host = Some(field(&key, v)?),
                "mail_from" => {
                    expect_placeholder(&key, &v)?;
                    r.mail_from = true
                }
                "sender" => {
                    expect_placeholder(&key, &v)?;
                    r.sender = true
                }
                "filter_output" => {
                    // Receivers echo signals; only the presence matters to a client.
                    let _: Map<String, Value> = field(&key, v)?;
                    r.filter_output = true
                }
                "mail_response" => r.mail_response = Some(field(&key, v)?),
                "rcpt_to" => r.rcpt_to = field::<Vec<Value>>(&key, v)?.len(),
                "rcpt_response" => r.rcpt_response = field(&key, v)?,
                "data_response" => r.data_response = Some(field(&key, v)?),
                "attempt_count" => r.attempt_count = Some(field(&key, v)?),
                "body" => r.body = Some(field(&key, v)?),
                "notification" => {
                    let _: Map<String, Value> = field(&key, v)?;
                    r.notification = true
                }
                "retry" => {
                    let _: Map<String, Value> = field(&key, v)?;
                    r.retry = true
                }
                "cancelled" => r.cancelled = field(&key, v)?,
                "final_attempt_reason" => r.final_attempt_reason = Some(field(&key, v)?),
                other => return Err(invalid(format!("unknown field {other:?}"))),
            }
        }
        Ok(r)
    }
}

/// The create POST a client sends for `tx` (envelope fields only).
pub fn render_create(tx: &Transaction, body: Option<&Value>) -> Vec<u8> {
    let mut m = Map::new();
    let mut put = |k: &str, v: Value| {
        m.insert(k.to_string(), v);
    };
    if let Some(h) = &tx.remote_host {
        put("remote_host", serde_json::to_value(h).unwrap());
    }
    if let Some(h) = &tx.local_host {
        put("local_host", serde_json::to_value(h).unwrap());
    }
    if let Some(mf) = &tx.mail_from {
        put("mail_from", serde_json::to_value(mf).unwrap());
    }
    if !tx.rcpt_to.is_empty() {
        put("rcpt_to", serde_json::to_value(&tx.rcpt_to).unwrap());
    }
    if let Some(meta) = &tx.smtp_meta {
        put("smtp_meta", Value::Object(meta.clone()));
    }
    if let Some(s) = &tx.sender {
        put("sender", serde_json::to_value(s).unwrap());
    }
    if let Some(b) = body {
        put("body", b.clone());
    }
    serde_json::to_vec(&m).expect("create serializes")
}

/// The PATCH a client sends for an incremental update.
pub fn render_update(update: &Update) -> Vec<u8> {
    let mut m = Map::new();
    if let Some(mf) = &update.mail_from {
        m.insert("mail_from".into(), serde_json::to_value(mf).unwrap());
    }
    if !update.rcpt_to.is_empty() {
        m.insert(
            "rcpt_to".into(),
            serde_json::to_value(&update.rcpt_to).unwrap(),
        );
        if update.rcpt_to_list_offset > 0 {
            m.insert(
                "rcpt_to_list_offset".into(),
                Value::from(update.rcpt_to_list_offset),
            );
        }
    }
    serde_json::to_vec(&m).expect("update serializes")
}

//! `message_builder`: renders a message-builder spec (`MessageBody::Builder`, the REST
//! submission JSON) into MIME (`spec/message-format.md` §1, `spec/filters.md` §6.1).
//!
//! Raw bodies pass through untouched. A builder body is validated as soon as it is seen
//! (a dry run with placeholder blob contents), withheld while its blobs are uploading, and
//! rendered once they are all complete; upstream then gets the rendered RFC 822 message.
//! Rendering needs every part in memory (base64 of whole parts), so the parts may total at
//! most [`MAX_MESSAGE_BYTES`]; above that the data response is `552 5.3.4`. An invalid spec
//! is a permanent failure of the transaction (`550`, the reference's text plus the cause).
//!
//! MIME structure and headers are serialized with mail-builder (boundaries, parameter
//! quoting and RFC 2231, RFC 2047 of unstructured fields); address lists, dates and
//! message ids are written here because mail-builder's forms differ from the reference's
//! (`alice a <alice@example.com>`, `to: bob@example.com`, dates with a zone offset).
//!
//! Deliberate deviations (`message-format.md`): `bcc` is not rendered (its recipients
//! would be disclosed); special header names match case-insensitively; `unix_secs: 0`,
//! empty inline content and a string message id are accepted; a message with only
//! attachments gets `MIME-Version`; a user `content-transfer-encoding` is dropped with
//! `content-type` when a body is set.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::rc::Rc;

use base64::Engine;
use bytes::Bytes;
use mail_builder::headers::Header;
use mail_builder::headers::HeaderType;
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::raw::Raw;
use mail_builder::headers::text::Text;
use mail_builder::mime::{BodyPart, MimePart};
use serde_json::Value;
use thiserror::Error;

use super::received_header::rfc5322_date;
use super::router::parse_addr_spec;
use super::{BlobSource, ChainTx, Filter, FilterBuildError, LocalFuture, MessageBody, Next};
use crate::Response;

/// Upper bound on the parts' total size (they are rendered in memory).
pub const MAX_MESSAGE_BYTES: u64 = 64 << 20;

/// Why a spec cannot be rendered.
#[derive(Debug, Error, PartialEq)]
pub enum BuildError {
    #[error("invalid message_builder json: {0}")]
    Invalid(String),
    #[error("message parts total {0} bytes, above the limit of {MAX_MESSAGE_BYTES}")]
    TooBig(u64),
    #[error("reading blob {0}: {1}")]
    Blob(String, String),
}

impl BuildError {
    pub fn response(&self) -> Response {
        match self {
            BuildError::TooBig(_) => Response::new(552, format!("5.3.4 {self} (MessageBuilder)")),
            // Text of the reference (clients may match on it), then the cause.
            BuildError::Invalid(_) => Response::new(
                550,
                format!(
                    "unexpected exception in MessageBuilder, likely invalid message_builder \
                     json ({self})"
                ),
            ),
            BuildError::Blob(..) => Response::new(450, format!("4.3.0 MessageBuilder {self}")),
        }
    }
}

fn invalid(m: impl Into<String>) -> BuildError {
    BuildError::Invalid(m.into())
}

/// Headers of which a message may have at most one.
const UNIQUE: &[&str] = &[
    "subject",
    "date",
    "from",
    "to",
    "cc",
    "bcc",
    "sender",
    "reply-to",
    "message-id",
    "mime-version",
    "content-type",
    "content-disposition",
    "content-transfer-encoding",
    "orig-date",
];

/// Renders `spec`; `blob` gives the bytes of a `create_id` (or `None` if unknown).
pub fn render(spec: &Value, blob: &dyn Fn(&str) -> Option<Bytes>) -> Result<Vec<u8>, BuildError> {
    let spec = spec
        .as_object()
        .ok_or_else(|| invalid("the spec is not an object"))?;
    let parts = |key: &str| -> Result<Vec<&Value>, BuildError> {
        match spec.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(a)) => Ok(a.iter().collect()),
            Some(_) => Err(invalid(format!("{key} is not an array"))),
        }
    };
    let text = parts("text_body")?;
    let related = parts("related_attachments")?;
    let files = parts("file_attachments")?;
    let has_body = !(text.is_empty() && related.is_empty() && files.is_empty());

    let mut out = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    let mut user_mime_version = false;
    let headers = match spec.get("headers") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(h)) => h.iter().collect(),
        Some(_) => return Err(invalid("headers is not an array")),
    };
    for h in headers {
        let Some([name, value]) = h.as_array().map(Vec::as_slice) else {
            continue; // entries that are not pairs are skipped, as the reference
        };
        let name = name
            .as_str()
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_graphic() && b != b':'))
            .ok_or_else(|| invalid(format!("bad header name {name}")))?;
        let lower = name.to_ascii_lowercase();
        if UNIQUE.contains(&lower.as_str()) {
            if seen.contains(&lower) {
                return Err(invalid(format!("duplicate header {name}")));
            }
            seen.push(lower.clone());
        }
        if has_body && (lower == "content-type" || lower == "content-transfer-encoding") {
            continue; // the body's own MIME headers win
        }
        if lower == "mime-version" {
            user_mime_version = true;
        }
        write_header(&mut out, name, &lower, value)?;
    }

    if !has_body {
        out.extend_from_slice(b"\r\n");
        return Ok(out);
    }
    let leaf = |v: &Value, related: bool| leaf_part(v, related, blob);
    // Structure of message-format.md §1.4.
    let mut root: Option<MimePart<'static>> = match text.first() {
        Some(t) => Some(leaf(t, false)?),
        None => None,
    };
    if !related.is_empty() {
        let mut v: Vec<MimePart<'static>> = root.into_iter().collect();
        for r in &related {
            v.push(leaf(r, true)?);
        }
        root = Some(multipart("multipart/related", v));
    }
    if text.len() > 1 {
        let mut v: Vec<MimePart<'static>> = root.into_iter().collect();
        for t in &text[1..] {
            v.push(leaf(t, false)?);
        }
        root = Some(multipart("multipart/alternative", v));
    }
    if !files.is_empty() {
        let mut v: Vec<MimePart<'static>> = root.into_iter().collect();
        for f in &files {
            v.push(leaf(f, false)?);
        }
        root = Some(multipart("multipart/mixed", v));
    }
    let mut root = root.expect("has_body");
    if !user_mime_version {
        // Root single part: after Content-Transfer-Encoding (the reference's layout).
        let at = usize::from(matches!(root.contents, BodyPart::Binary(_)));
        root.headers.insert(
            at.min(root.headers.len()),
            ("MIME-Version".into(), Raw::new("1.0").into()),
        );
    }
    root.write_part(&mut out);
    Ok(out)
}

fn multipart(ct: &'static str, parts: Vec<MimePart<'static>>) -> MimePart<'static> {
    MimePart {
        headers: vec![("Content-Type".into(), ContentType::new(ct).into())],
        contents: BodyPart::Multipart(parts),
    }
}

fn leaf_part(
    v: &Value,
    related: bool,
    blob: &dyn Fn(&str) -> Option<Bytes>,
) -> Result<MimePart<'static>, BuildError> {
    let o = v
        .as_object()
        .ok_or_else(|| invalid("a part is not an object"))?;
    let ct = o
        .get("content_type")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("a part has no content_type"))?
        .to_ascii_lowercase();
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?=".contains(&b))
    };
    match ct.split_once('/') {
        Some((a, b)) if token(a) && token(b) => {}
        _ => return Err(invalid(format!("bad content_type {ct:?}"))),
    }
    let content = o
        .get("content")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid("a part has no content object"))?;
    let bytes = if let Some(s) = content.get("inline") {
        Bytes::from(
            s.as_str()
                .ok_or_else(|| invalid("inline content is not a string"))?
                .to_string(),
        )
    } else if let Some(id) = content.get("create_id") {
        let id = id
            .as_str()
            .ok_or_else(|| invalid("create_id is not a string"))?;
        blob(id).ok_or_else(|| invalid(format!("no blob {id:?}")))?
    } else {
        return Err(invalid(
            "part content must be {\"inline\": ...} or {\"create_id\": ...}",
        ));
    };
    let is_text = ct.starts_with("text/");
    if is_text && std::str::from_utf8(&bytes).is_err() {
        return Err(invalid(format!("{ct} content is not UTF-8")));
    }
    let mut type_header = ContentType::new(ct);
    if is_text {
        type_header = type_header.attribute("charset", "utf-8");
    }
    let cte: (Cow<'static, str>, HeaderType<'static>) = (
        "Content-Transfer-Encoding".into(),
        Raw::new("base64").into(),
    );
    let ctype: (Cow<'static, str>, HeaderType<'static>) =
        ("Content-Type".into(), type_header.into());
    let mut headers = if is_text {
        vec![cte, ctype]
    } else {
        vec![ctype, cte]
    };
    let opt_str = |k: &str| -> Result<Option<String>, BuildError> {
        match o.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if !s.contains(['\r', '\n']) => Ok(Some(s.clone())),
            Some(_) => Err(invalid(format!("bad {k}"))),
        }
    };
    let filename = opt_str("filename")?;
    if related {
        headers.push((
            "content-disposition".into(),
            ContentType::new("inline").into(),
        ));
    } else if let Some(f) = filename {
        headers.push((
            "content-disposition".into(),
            ContentType::new("attachment")
                .attribute("filename", f)
                .into(),
        ));
    }
    if let Some(id) = opt_str("content_id")? {
        headers.push(("content-id".into(), Raw::new(id).into()));
    }
    // Pre-encoded: mail-builder writes a part with a Content-Transfer-Encoding verbatim.
    Ok(MimePart {
        headers,
        contents: BodyPart::Binary(base64_lines(&bytes).into()),
    })
}

/// Base64 in lines of 76 characters, each ending CRLF.
fn base64_lines(b: &[u8]) -> Vec<u8> {
    let enc = base64::engine::general_purpose::STANDARD.encode(b);
    let mut out = Vec::with_capacity(enc.len() + enc.len() / 38 + 2);
    for line in enc.as_bytes().chunks(76) {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn write_header(out: &mut Vec<u8>, name: &str, lower: &str, v: &Value) -> Result<(), BuildError> {
    let bad = |what: &str| invalid(format!("{name}: {what}"));
    match lower {
        "from" | "to" | "cc" | "bcc" => {
            let list = v
                .as_array()
                .ok_or_else(|| bad("expected an address list"))?;
            let mut items = Vec::new();
            for a in list {
                items.push(address(a).map_err(|e| bad(&e))?);
            }
            if items.is_empty() || lower == "bcc" {
                return Ok(()); // an empty list omits the header; bcc is never disclosed
            }
            fold_list(out, name, &items, ", ");
        }
        "date" => {
            let o = v
                .as_object()
                .ok_or_else(|| bad("expected {unix_secs, tz_offset}"))?;
            let secs = o
                .get("unix_secs")
                .and_then(Value::as_i64)
                .ok_or_else(|| bad("unix_secs is not an integer"))?;
            let tz = match o.get("tz_offset") {
                None | Some(Value::Null) => 0,
                Some(t) => t
                    .as_i64()
                    .ok_or_else(|| bad("tz_offset is not an integer"))?,
            };
            if tz.abs() >= 86400 || !(-(1 << 40)..(1 << 40)).contains(&secs) {
                return Err(bad("date out of range"));
            }
            out.extend_from_slice(format!("{name}: {}\r\n", rfc5322_date(secs, tz)).as_bytes());
        }
        "message-id" | "in-reply-to" | "references" => {
            let ids: Vec<&str> = match v {
                Value::String(s) => vec![s.as_str()],
                Value::Array(a) => a
                    .iter()
                    .map(|i| i.as_str().ok_or_else(|| bad("ids must be strings")))
                    .collect::<Result<_, _>>()?,
                _ => return Err(bad("expected a list of ids")),
            };
            let mut ids: Vec<String> = ids
                .into_iter()
                .map(|i| {
                    let i = i.trim_start_matches('<').trim_end_matches('>');
                    if i.is_empty() || i.contains(|c: char| c.is_whitespace() || c.is_control()) {
                        Err(bad("bad message id"))
                    } else {
                        Ok(format!("<{i}>"))
                    }
                })
                .collect::<Result<_, _>>()?;
            if lower == "message-id" {
                ids.truncate(1);
            }
            if !ids.is_empty() {
                fold_list(out, name, &ids, " ");
            }
        }
        _ => {
            let s = v.as_str().ok_or_else(|| bad("value is not a string"))?;
            if s.contains(['\r', '\n']) {
                return Err(bad("value contains a line break"));
            }
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            Text::new(s.to_string()).write_header(out, name.len() + 2);
        }
    }
    Ok(())
}

/// `name: a, b, c` folded before an item that would pass column 78.
fn fold_list(out: &mut Vec<u8>, name: &str, items: &[String], sep: &str) {
    let one_line = format!("{name}: {}", items.join(sep));
    if one_line.len() <= 78 {
        out.extend_from_slice(one_line.as_bytes());
        out.extend_from_slice(b"\r\n");
        return;
    }
    out.extend_from_slice(name.as_bytes());
    out.push(b':');
    let mut col = 78; // start every list on a fresh line, as the reference folds
    for (i, item) in items.iter().enumerate() {
        let piece = if i + 1 < items.len() {
            format!("{item}{}", sep.trim_end())
        } else {
            item.clone()
        };
        if col + 1 + piece.len() > 78 {
            out.extend_from_slice(b"\r\n ");
            col = 1;
        } else {
            out.push(b' ');
            col += 1;
        }
        out.extend_from_slice(piece.as_bytes());
        col += piece.len();
    }
    out.extend_from_slice(b"\r\n");
}

/// One `{"address", "display_name"}` as `name <addr>` or a bare addr-spec.
fn address(v: &Value) -> Result<String, String> {
    let o = v.as_object().ok_or("an address is not an object")?;
    let addr = o
        .get("address")
        .and_then(Value::as_str)
        .filter(|a| !a.is_empty())
        .ok_or("an address has no \"address\"")?;
    if parse_addr_spec(addr).is_none() {
        return Err(format!("invalid address {addr:?}"));
    }
    let name = match o.get("display_name") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) if !s.chars().any(char::is_control) => Some(s.as_str()),
        Some(_) => return Err("bad display_name".into()),
    };
    Ok(match name {
        None => addr.to_string(),
        Some(n) => format!("{} <{addr}>", phrase(n)),
    })
}

/// A display name as an atom sequence, a quoted string, or RFC 2047 words.
fn phrase(n: &str) -> String {
    if !n.is_ascii() {
        let b64 = base64::engine::general_purpose::STANDARD;
        // Encoded words of at most 75 characters: 45 bytes of text each, split on chars.
        let mut words = Vec::new();
        let mut cur = String::new();
        for c in n.chars() {
            if cur.len() + c.len_utf8() > 45 {
                words.push(format!("=?utf-8?b?{}?=", b64.encode(&cur)));
                cur.clear();
            }
            cur.push(c);
        }
        words.push(format!("=?utf-8?b?{}?=", b64.encode(&cur)));
        return words.join(" ");
    }
    let special = |c: char| "()<>[]:;@\\,.\"".contains(c);
    if n.chars().any(special) || n.starts_with(' ') || n.ends_with(' ') || n.contains("  ") {
        let esc = n.replace('\\', "\\\\").replace('"', "\\\"");
        format!("\"{esc}\"")
    } else {
        n.to_string()
    }
}

/// The `create_id`s a spec refers to.
fn blob_ids(spec: &Value) -> Vec<String> {
    let mut ids = Vec::new();
    for key in ["text_body", "related_attachments", "file_attachments"] {
        for p in spec
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(id) = p
                .get("content")
                .and_then(|c| c.get("create_id"))
                .and_then(Value::as_str)
            {
                ids.push(id.to_string());
            }
        }
    }
    ids
}

/// Renders a builder body whose blobs are complete, reading the blobs it refers to.
pub async fn render_body(
    spec: &Value,
    blobs: &BTreeMap<String, Rc<dyn BlobSource>>,
) -> Result<Bytes, BuildError> {
    let ids = blob_ids(spec);
    let mut total: u64 = 0;
    for id in &ids {
        total += blobs.get(id).map_or(0, |b| b.len());
    }
    // Inline text is part of the spec JSON, already in memory.
    if total > MAX_MESSAGE_BYTES {
        return Err(BuildError::TooBig(total));
    }
    let mut data: BTreeMap<String, Bytes> = BTreeMap::new();
    for id in ids {
        if data.contains_key(&id) {
            continue;
        }
        let Some(b) = blobs.get(&id) else {
            continue; // reported as "no blob" by render
        };
        let bytes = MessageBody::blob(b.clone())
            .read_all(MAX_MESSAGE_BYTES)
            .await
            .map_err(|e| BuildError::Blob(id.clone(), e.to_string()))?;
        data.insert(id, Bytes::from(bytes));
    }
    render(spec, &|id| data.get(id).cloned()).map(Bytes::from)
}

/// Renders with placeholder contents: validates a spec before its blobs arrive.
pub fn validate(
    spec: &Value,
    blobs: &BTreeMap<String, Rc<dyn BlobSource>>,
) -> Result<(), BuildError> {
    render(spec, &|id| {
        blobs.contains_key(id).then(|| Bytes::from_static(b"xyz"))
    })
    .map(drop)
}

/// The `message_builder` filter.
pub struct MessageBuilder {
    /// The rendered message (or why not), once the blobs were complete.
    rendered: Option<Result<Bytes, BuildError>>,
    /// The dry run's verdict.
    validated: Option<Result<(), BuildError>>,
}

impl MessageBuilder {
    /// The filter has no configuration keys.
    pub fn new() -> Result<MessageBuilder, FilterBuildError> {
        Ok(MessageBuilder {
            rendered: None,
            validated: None,
        })
    }
}

impl Filter for MessageBuilder {
    fn on_update<'a>(&'a mut self, tx: &'a mut ChainTx, next: Next<'a>) -> LocalFuture<'a, ()> {
        Box::pin(async move {
            let Some(MessageBody::Builder { spec, blobs }) = &tx.body else {
                return next.run(tx).await;
            };
            let (spec, blobs) = (spec.clone(), blobs.clone());
            let mut failure = None;
            let upstream = if tx.body_finalized() {
                if self.rendered.is_none() {
                    self.rendered = Some(render_body(&spec, &blobs).await);
                }
                match self.rendered.as_ref().expect("just set") {
                    Ok(b) => Some(MessageBody::bytes(b.clone())),
                    Err(e) => {
                        failure = Some(e.response());
                        None
                    }
                }
            } else {
                let v = self
                    .validated
                    .get_or_insert_with(|| validate(&spec, &blobs));
                if let Err(e) = v {
                    failure = Some(e.response());
                }
                None
            };
            let original = std::mem::replace(&mut tx.body, upstream);
            next.run(tx).await;
            tx.body = original;
            if let Some(r) = failure
                && tx.tx.data_response.is_none()
            {
                tx.tx.data_response = Some(r);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::{Chain, MemoryBlob};
    use crate::{Mailbox, Response};
    use serde_json::json;
    use std::cell::RefCell;

    fn golden_spec() -> Value {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/koukan-reference/testdata/message_builder.json"
        );
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    }

    fn render_str(spec: &Value) -> String {
        String::from_utf8(render(spec, &|_| None).unwrap()).unwrap()
    }

    #[test]
    fn reference_example() {
        let out = render_str(&golden_spec());
        for s in [
            "from: alice a <alice@example.com>\r\n",
            "to: bob@example.com\r\n",
            "subject: hello\r\n",
            "date: Wed, 06 Mar 2024 10:42:31 -0800\r\n",
            "message-id: <abc@xyz>\r\n",
            "in-reply-to: <abd@xyz>\r\n",
            "references: <abd@xyz> <abe@xyz>\r\n",
            "Content-Type: multipart/mixed",
            "Content-Type: multipart/alternative",
            "Content-Type: multipart/related",
            "Content-Type: text/html",
            "Content-Type: text/plain",
            "Content-Type: image/png",
            "content-disposition: inline\r\ncontent-id: xyz123",
            "content-disposition: attachment; filename=\"hipstercat.png\"",
            "PGI+aGVsbG88L2I+",
            "aGVsbG8=",
            "cmVsYXRlZCBpbWFnZSBjb250ZW50cw==",
            "YXR0YWNobWVudCBjb250ZW50cw==",
        ] {
            assert!(out.contains(s), "{s:?} not in\n{out}");
        }
        // Structure: mixed[alternative[related[html, png], plain], png].
        let ct: Vec<&str> = out
            .lines()
            .filter_map(|l| l.strip_prefix("Content-Type: "))
            .map(|l| l.split(';').next().unwrap())
            .collect();
        assert_eq!(
            ct,
            [
                "multipart/mixed",
                "multipart/alternative",
                "multipart/related",
                "text/html",
                "image/png",
                "text/plain",
                "image/png"
            ]
        );
        assert_eq!(out.matches("MIME-Version: 1.0").count(), 1);
        assert!(
            !out.contains('\n') || !out.replace("\r\n", "").contains('\n'),
            "CRLF only"
        );
        // mail-parser reads it back.
        let m = mail_parser::MessageParser::default()
            .parse(out.as_bytes())
            .unwrap();
        assert_eq!(m.subject(), Some("hello"));
        assert_eq!(
            m.attachment(0).unwrap().contents(),
            b"related image contents"
        );
        assert_eq!(m.body_text(0).as_deref(), Some("hello"));
    }

    #[test]
    fn single_part_layout() {
        let spec = json!({
            "headers": [["subject", "hello"], ["from", [{"address": "alice@example.com"}]],
                        ["date", {"unix_secs": 1709750551}]],
            "text_body": [{"content_type": "text/plain", "content": {"inline": "hello, world!"}}]
        });
        assert_eq!(
            render_str(&spec),
            "subject: hello\r\nfrom: alice@example.com\r\n\
             date: Wed, 06 Mar 2024 18:42:31 +0000\r\n\
             Content-Transfer-Encoding: base64\r\nMIME-Version: 1.0\r\n\
             Content-Type: text/plain; charset=\"utf-8\"\r\n\r\naGVsbG8sIHdvcmxkIQ==\r\n"
        );
        // Headers only.
        assert_eq!(
            render_str(&json!({"headers": [["subject", "hello"]]})),
            "subject: hello\r\n\r\n"
        );
    }

    #[test]
    fn headers() {
        let spec = json!({"headers": [
            ["From", [{"address": "john@example.com", "display_name": "Smith, John"},
                      {"address": "jose@example.com", "display_name": "Jösé"}]],
            ["bcc", [{"address": "secret@example.com"}]],
            ["cc", []],
            ["Message-ID", "abc@xyz"],
            ["subject", "héllo wörld"],
            ["x-long", "a very long subject line that goes on and on and on and on and on and on and on and on and on"],
            ["bogus"],
            ["date", {"unix_secs": 0, "tz_offset": 3600}]
        ]});
        let out = render_str(&spec);
        assert!(
            out.contains("From:\r\n \"Smith, John\" <john@example.com>, =?utf-8?b?SsO2c8Op?= <jose@example.com>\r\n")
                || out.contains("From: \"Smith, John\" <john@example.com>, =?utf-8?b?SsO2c8Op?= <jose@example.com>\r\n"),
            "{out}"
        );
        assert!(!out.to_lowercase().contains("bcc"), "bcc is not disclosed");
        assert!(!out.contains("cc:"));
        assert!(out.contains("Message-ID: <abc@xyz>\r\n"));
        assert!(out.contains("date: Thu, 01 Jan 1970 01:00:00 +0100\r\n"));
        let subject = out.lines().find(|l| l.starts_with("subject: ")).unwrap();
        assert!(subject.contains("=?"), "{subject}");
        assert!(out.lines().all(|l| l.len() <= 78), "{out}");
        let m = mail_parser::MessageParser::default()
            .parse(out.as_bytes())
            .unwrap();
        assert_eq!(m.subject(), Some("héllo wörld"));
        let from = m.from().unwrap();
        assert_eq!(from.first().unwrap().name(), Some("Smith, John"));
        assert_eq!(from.last().unwrap().name(), Some("Jösé"));
    }

    #[test]
    fn bad_specs() {
        let text = |c: Value| json!({"text_body": [{"content_type": "text/plain", "content": c}]});
        for (spec, why) in [
            (json!([]), "not an object"),
            (
                json!({"headers": [["to", [{"address": "nodomain"}]]]}),
                "invalid address",
            ),
            (
                json!({"headers": [["subject", "a"], ["Subject", "b"]]}),
                "duplicate",
            ),
            (json!({"headers": [["subject", 3]]}), "not a string"),
            (
                json!({"headers": [["subject", "a\r\nBcc: x@y"]]}),
                "line break",
            ),
            (
                json!({"headers": [["date", {"unix_secs": "x"}]]}),
                "unix_secs",
            ),
            (json!({"headers": [["bad name", "x"]]}), "header name"),
            (
                json!({"text_body": [{"content_type": "text", "content": {"inline": "x"}}]}),
                "content_type",
            ),
            (
                json!({"text_body": [{"content_type": "a/b/c", "content": {"inline": "x"}}]}),
                "content_type",
            ),
            (
                text(json!({"reuse_uri": "/transactions/1/blob/2"})),
                "part content",
            ),
            (text(json!({"create_id": "missing"})), "no blob"),
            (text(json!({"inline": 5})), "not a string"),
            (json!({"text_body": {}}), "not an array"),
        ] {
            let e = render(&spec, &|_| None).unwrap_err();
            assert!(e.to_string().contains(why), "{spec}: {e}");
            let r = e.response();
            assert_eq!(r.code, 550);
            assert!(
                r.message
                    .starts_with("unexpected exception in MessageBuilder")
            );
        }
        // Text that is not UTF-8.
        let spec = text(json!({"create_id": "b"}));
        let e = render(&spec, &|_| Some(Bytes::from_static(b"\xff\xfe"))).unwrap_err();
        assert!(e.to_string().contains("not UTF-8"), "{e}");
        // Empty inline content is fine.
        assert!(render(&text(json!({"inline": ""})), &|_| None).is_ok());
    }

    #[test]
    fn shapes() {
        let att = json!({"content_type": "application/pdf", "filename": "a b.pdf", "content": {"inline": "%PDF"}});
        let out = render_str(&json!({"file_attachments": [att]}));
        assert!(
            out.starts_with("MIME-Version: 1.0\r\nContent-Type: multipart/mixed"),
            "{out}"
        );
        assert!(out.contains("Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\ncontent-disposition: attachment; filename=\"a b.pdf\"\r\n"), "{out}");
        let out = render_str(&json!({
            "headers": [["content-type", "text/bogus"], ["MIME-Version", "1.0"]],
            "text_body": [{"content_type": "text/plain", "content": {"inline": "a\nb\n"}},
                          {"content_type": "text/html", "content": {"inline": "<p>"}}]}));
        assert!(!out.contains("text/bogus"));
        assert_eq!(out.matches("MIME-Version").count(), 1, "{out}");
        assert!(out.contains("YQpiCg==\r\n"), "bare LF kept: {out}");
        assert!(out.contains("Content-Type: multipart/alternative"));
    }

    struct Partial;
    impl BlobSource for Partial {
        fn len(&self) -> u64 {
            1
        }
        fn finalized(&self) -> bool {
            false
        }
        fn read(
            &self,
            _: u64,
            _: usize,
        ) -> LocalFuture<'_, Result<Bytes, super::super::BodyError>> {
            Box::pin(async { Ok(Bytes::new()) })
        }
    }

    /// Records the body it is given and accepts it once complete.
    struct Sink(Rc<RefCell<Vec<Option<Vec<u8>>>>>);
    impl Filter for Sink {
        fn on_update<'a>(&'a mut self, tx: &'a mut ChainTx, _: Next<'a>) -> LocalFuture<'a, ()> {
            Box::pin(async move {
                let b = match &tx.body {
                    Some(b @ MessageBody::Raw(_)) => Some(b.read_all(1 << 24).await.unwrap()),
                    Some(MessageBody::Builder { .. }) => panic!("builder body upstream"),
                    None => None,
                };
                self.0.borrow_mut().push(b);
                if tx.body_finalized() && tx.tx.data_response.is_none() {
                    tx.tx.data_response = Some(Response::new(250, "ok"));
                }
            })
        }
    }

    fn chain_tx(spec: Value, blobs: Vec<(&str, Rc<dyn BlobSource>)>) -> ChainTx {
        let mut t = ChainTx::default();
        t.tx.mail_from = Some(Mailbox::new("alice@example.com"));
        t.tx.mail_response = Some(Response::new(250, "ok"));
        t.tx.rcpt_to = vec![Mailbox::new("bob@example.org")];
        t.tx.rcpt_response = vec![Some(Response::new(250, "ok"))];
        t.body = Some(MessageBody::Builder {
            spec,
            blobs: blobs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        });
        t
    }

    #[tokio::test]
    async fn filter_renders_when_blobs_complete() {
        let spec = json!({
            "headers": [["from", [{"address": "alice@example.com", "display_name": "alice a"}]]],
            "text_body": [{"content_type": "text/plain", "content": {"create_id": "b0"}}]});
        let seen = Rc::new(RefCell::new(Vec::new()));
        let mut chain = Chain::new(vec![
            Box::new(MessageBuilder::new().unwrap()),
            Box::new(Sink(seen.clone())),
        ]);
        let mut t = chain_tx(spec.clone(), vec![("b0", Rc::new(Partial))]);
        chain.update(&mut t).await;
        assert_eq!(seen.borrow()[0], None, "withheld while uploading");
        assert!(t.tx.data_response.is_none());
        let blob: Rc<dyn BlobSource> = Rc::new(MemoryBlob(Bytes::from_static(b"hello, world!\n")));
        t.body = Some(MessageBody::Builder {
            spec,
            blobs: [("b0".to_string(), blob)].into(),
        });
        chain.update(&mut t).await;
        let out = String::from_utf8(seen.borrow()[1].clone().unwrap()).unwrap();
        assert!(out.contains("from: alice a <alice@example.com>\r\n"));
        assert!(out.contains("aGVsbG8sIHdvcmxkIQo="));
        assert_eq!(t.tx.data_response.as_ref().unwrap().code, 250);
        assert!(
            matches!(t.body, Some(MessageBody::Builder { .. })),
            "downstream body kept"
        );
    }

    #[tokio::test]
    async fn invalid_spec_fails_early_with_550() {
        let spec = json!({"headers": [["to", [{"address": "bob"}]]],
                          "text_body": [{"content_type": "text/plain", "content": {"create_id": "b0"}}]});
        let seen = Rc::new(RefCell::new(Vec::new()));
        let mut chain = Chain::new(vec![
            Box::new(MessageBuilder::new().unwrap()),
            Box::new(Sink(seen.clone())),
        ]);
        let mut t = chain_tx(spec, vec![("b0", Rc::new(Partial))]);
        chain.update(&mut t).await;
        let r = t.tx.data_response.as_ref().unwrap();
        assert_eq!(r.code, 550, "{r}");
        assert_eq!(seen.borrow()[0], None);
    }

    /// A blob that claims to be huge (never read).
    struct Huge;
    impl BlobSource for Huge {
        fn len(&self) -> u64 {
            MAX_MESSAGE_BYTES + 1
        }
        fn finalized(&self) -> bool {
            true
        }
        fn read(
            &self,
            _: u64,
            _: usize,
        ) -> LocalFuture<'_, Result<Bytes, super::super::BodyError>> {
            panic!("must not be read")
        }
    }

    #[tokio::test]
    async fn too_big_is_552() {
        let spec = json!({"file_attachments": [{"content_type": "application/octet-stream", "content": {"create_id": "h"}}]});
        let mut chain = Chain::new(vec![
            Box::new(MessageBuilder::new().unwrap()),
            Box::new(Sink(Rc::new(RefCell::new(Vec::new())))),
        ]);
        let mut t = chain_tx(spec, vec![("h", Rc::new(Huge))]);
        chain.update(&mut t).await;
        assert_eq!(t.tx.data_response.as_ref().unwrap().code, 552);
    }

    #[tokio::test]
    async fn raw_bodies_pass_through() {
        let seen = Rc::new(RefCell::new(Vec::new()));
        let mut chain = Chain::new(vec![
            Box::new(MessageBuilder::new().unwrap()),
            Box::new(Sink(seen.clone())),
        ]);
        let mut t = chain_tx(json!({}), vec![]);
        t.body = Some(MessageBody::bytes("Subject: x\r\n\r\nx\r\n"));
        chain.update(&mut t).await;
        assert_eq!(
            seen.borrow()[0].as_deref(),
            Some(&b"Subject: x\r\n\r\nx\r\n"[..])
        );
    }
}

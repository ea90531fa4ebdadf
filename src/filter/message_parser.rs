//! `message_parser`: MIME → message-builder-shaped JSON plus part blobs, for REST receivers
//! whose route has `receive_parsing` (`spec/message-format.md` §2, `spec/filters.md` §6.2).
//!
//! Enabled per transaction by the route option `receive_parsing` (set by `router`); other
//! transactions pass through untouched. When enabled, the body is withheld until complete,
//! parsed once (mail-parser needs the whole message in memory: bodies above
//! [`MAX_PARSE_BYTES`] are delivered unparsed), and the result is put in
//! [`ChainTx::parsed`]: the JSON document and its blobs by id. `ChainTx::body` stays the
//! raw message, which receivers always get too. A message that cannot be parsed is delivered
//! raw without `parsed` (the reference lost the body, F12).
//!
//! Differences from the reference's golden files, per the spec's recommendations: raw 8-bit
//! header bytes are decoded as UTF-8 with U+FFFD (never lone surrogates); an unparsable
//! `Date` is emitted as the raw string; unknown charsets fall back to UTF-8; degenerate
//! multiparts are skipped when flattening instead of crashing; nesting deeper than 10
//! levels is sent as one blob of the raw subtree.

use std::collections::BTreeMap;
use std::rc::Rc;

use bytes::Bytes;
use mail_parser::{
    Address, HeaderName, HeaderValue, Message, MessageParser as Parser, MessagePart, MimeHeaders,
    PartType,
};
use serde_json::{Map, Value, json};

use super::{
    BlobSource, ChainTx, Filter, FilterBuildError, LocalFuture, MemoryBlob, MessageBody, Next,
};

/// Largest message parsed (it is held in memory with its decoded parts).
pub const MAX_PARSE_BYTES: u64 = 64 << 20;
/// Multipart nesting beyond this is not descended into.
const MAX_DEPTH: usize = 10;

/// A message parsed for a REST receiver: the JSON of `message-format.md` §2.2 and the
/// contents of its `{"create_id": n}` parts.
#[derive(Clone)]
pub struct ParsedMessage {
    pub json: Value,
    pub blobs: BTreeMap<String, Rc<dyn BlobSource>>,
}

impl std::fmt::Debug for ParsedMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ParsedMessage({} blobs)", self.blobs.len())
    }
}

fn parser() -> Parser {
    Parser::new()
        .with_mime_headers()
        .with_date_headers()
        .header_address(HeaderName::From)
        .header_address(HeaderName::To)
        .header_address(HeaderName::Cc)
        .header_address(HeaderName::Bcc)
        .header_id(HeaderName::MessageId)
}

struct Walk {
    max_inline: usize,
    inlined: usize,
    next_id: usize,
    blobs: BTreeMap<String, Rc<dyn BlobSource>>,
}

impl Walk {
    fn content(&mut self, text: Option<String>, bytes: Vec<u8>) -> Value {
        if let Some(t) = text {
            if self.inlined + t.len() < self.max_inline {
                self.inlined += t.len();
                return json!({"inline": t});
            }
            return self.blob(t.into_bytes());
        }
        self.blob(bytes)
    }

    fn blob(&mut self, bytes: Vec<u8>) -> Value {
        let id = self.next_id.to_string();
        self.next_id += 1;
        self.blobs
            .insert(id.clone(), Rc::new(MemoryBlob(Bytes::from(bytes))));
        json!({"create_id": id})
    }
}

/// Parses `raw`; blob ids start at `*next_id` (which is advanced). `None` if the bytes are
/// not a message at all.
pub fn parse_message(raw: &[u8], max_inline: usize, next_id: &mut usize) -> Option<ParsedMessage> {
    let fixed = separate_headers(raw);
    let msg = parser().parse(fixed.as_deref().unwrap_or(raw))?;
    let mut w = Walk {
        max_inline,
        inlined: 0,
        next_id: *next_id,
        blobs: BTreeMap::new(),
    };
    let root = message_node(&mut w, &msg, 0, false);
    *next_id = w.next_id;
    let mut doc = Map::new();
    let flat = flatten(&root);
    doc.insert("parts".into(), root);
    for (k, v) in ["text_body", "related_attachments", "file_attachments"]
        .into_iter()
        .zip(flat)
    {
        if !v.is_empty() {
            doc.insert(k.into(), Value::Array(v));
        }
    }
    Some(ParsedMessage {
        json: Value::Object(doc),
        blobs: w.blobs,
    })
}

/// Where a header block holds a line that is neither a field nor a continuation, the block
/// ends there and that line starts the body (as the reference's parser reads it; mail-parser
/// would swallow the line into the headers). Returns the message with the missing blank
/// lines inserted, or `None` if none is missing.
fn separate_headers(raw: &[u8]) -> Option<Vec<u8>> {
    let mut boundaries: Vec<Vec<u8>> = Vec::new();
    let mut in_headers = true;
    let mut inserts = Vec::new();
    let mut pos = 0;
    for line in raw.split_inclusive(|b| *b == b'\n') {
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        if in_headers {
            if text.is_empty() {
                in_headers = false;
            } else if text[0] == b' ' || text[0] == b'\t' || is_field(text) {
                collect_boundary(text, &mut boundaries);
            } else {
                inserts.push((pos, line.ends_with(b"\r\n")));
                in_headers = false;
            }
        }
        if !in_headers && let Some(rest) = text.strip_prefix(b"--") {
            let rest = rest.trim_ascii_end();
            if boundaries.iter().any(|b| b == rest) {
                in_headers = true;
            }
        }
        pos += line.len();
    }
    if inserts.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(raw.len() + inserts.len() * 2);
    let mut last = 0;
    for (at, crlf) in inserts {
        out.extend_from_slice(&raw[last..at]);
        out.extend_from_slice(if crlf { b"\r\n" } else { b"\n" });
        last = at;
    }
    out.extend_from_slice(&raw[last..]);
    Some(out)
}

fn is_field(line: &[u8]) -> bool {
    match line.iter().position(|b| *b == b':') {
        Some(n) => n > 0 && line[..n].iter().all(|b| b.is_ascii_graphic()),
        None => false,
    }
}

fn collect_boundary(line: &[u8], out: &mut Vec<Vec<u8>>) {
    let lower = line.to_ascii_lowercase();
    let Some(i) = lower.windows(9).position(|w| w == b"boundary=") else {
        return;
    };
    let v = &line[i + 9..];
    let b = match v.strip_prefix(b"\"") {
        Some(q) => q.split(|b| *b == b'"').next().unwrap_or_default(),
        None => v
            .split(|b| *b == b';' || b.is_ascii_whitespace())
            .next()
            .unwrap_or_default(),
    };
    if !b.is_empty() {
        out.push(b.to_vec());
    }
}

fn message_node(w: &mut Walk, msg: &Message<'_>, depth: usize, digest: bool) -> Value {
    match msg.parts.first() {
        Some(_) => part_node(w, msg, 0, depth, digest),
        None => {
            json!({"headers": [], "content_type": "text/plain", "content": w.content(Some(String::new()), Vec::new())})
        }
    }
}

fn content_type(part: &MessagePart<'_>, digest: bool) -> String {
    match part.content_type() {
        Some(ct) => match &ct.c_subtype {
            Some(s) => format!("{}/{}", ct.c_type, s).to_ascii_lowercase(),
            None => ct.c_type.to_ascii_lowercase(),
        },
        None if digest => "message/rfc822".into(),
        None => "text/plain".into(),
    }
}

fn part_node(w: &mut Walk, msg: &Message<'_>, id: usize, depth: usize, digest: bool) -> Value {
    let raw = msg.raw_message();
    let part = &msg.parts[id];
    let ct = content_type(part, digest);
    let mut node = Map::new();
    node.insert("headers".into(), headers_json(&part.headers, raw));
    node.insert("content_type".into(), ct.clone().into());
    match &part.body {
        PartType::Multipart(children) => {
            if depth >= MAX_DEPTH {
                let sub = raw
                    .get(part.offset_header as usize..part.offset_end as usize)
                    .unwrap_or_default();
                node.insert("content".into(), w.blob(sub.to_vec()));
            } else {
                let is_digest = ct == "multipart/digest";
                let parts = children
                    .iter()
                    .map(|c| part_node(w, msg, *c as usize, depth + 1, is_digest))
                    .collect();
                node.insert("parts".into(), Value::Array(parts));
            }
        }
        PartType::Message(inner) => {
            let n = message_node(w, inner, depth + 1, false);
            node.insert("parts".into(), Value::Array(vec![n]));
        }
        _ if ct == "message/delivery-status" => {
            let text = String::from_utf8_lossy(&decoded(part)).into_owned();
            let blocks = status_blocks(&text)
                .into_iter()
                .map(|h| {
                    let c = w.content(Some(String::new()), Vec::new());
                    json!({"headers": h, "content_type": "text/plain", "content": c})
                })
                .collect();
            node.insert("parts".into(), Value::Array(blocks));
        }
        _ if ct == "text/rfc822-headers" => {
            let bytes = decoded(part);
            let headers = parser()
                .parse_headers(&bytes[..])
                .and_then(|m| {
                    m.parts
                        .first()
                        .map(|p| headers_json(&p.headers, m.raw_message()))
                })
                .unwrap_or_else(|| json!([]));
            node.insert("parts".into(), json!([{"headers": headers}]));
        }
        PartType::Text(t) | PartType::Html(t) => {
            let text = if part.encoding == mail_parser::Encoding::Base64 {
                t.to_string()
            } else {
                lf(t)
            };
            node.insert("content".into(), w.content(Some(text), Vec::new()));
        }
        PartType::Binary(b) | PartType::InlineBinary(b) => {
            // A text/* part mail-parser kept as binary (e.g. an attachment) is still text.
            let text = ct.starts_with("text/").then(|| {
                let s = String::from_utf8_lossy(b);
                if part.encoding == mail_parser::Encoding::Base64 {
                    s.into_owned()
                } else {
                    lf(&s)
                }
            });
            node.insert("content".into(), w.content(text, b.to_vec()));
        }
    }
    Value::Object(node)
}

/// The part's transfer-decoded bytes.
fn decoded(part: &MessagePart<'_>) -> Vec<u8> {
    match &part.body {
        PartType::Text(t) | PartType::Html(t) => t.as_bytes().to_vec(),
        PartType::Binary(b) | PartType::InlineBinary(b) => b.to_vec(),
        _ => Vec::new(),
    }
}

/// Text with every CRLF and lone CR turned into LF (the reference's universal newlines).
fn lf(s: &str) -> String {
    s.replace("\r\n", "\n").replace('\r', "\n")
}

/// The field blocks of a `message/delivery-status` body (blank-line separated).
fn status_blocks(text: &str) -> Vec<Value> {
    let text = lf(text);
    let mut blocks = Vec::new();
    for block in text.split("\n\n") {
        let mut fields: Vec<(String, String)> = Vec::new();
        for line in block.lines() {
            if line.starts_with([' ', '\t']) {
                if let Some((_, v)) = fields.last_mut() {
                    v.push_str(line);
                }
                continue;
            }
            if let Some((n, v)) = line.split_once(':') {
                fields.push((n.trim().to_ascii_lowercase(), v.trim_start().to_string()));
            }
        }
        if !fields.is_empty() {
            blocks.push(Value::Array(
                fields
                    .into_iter()
                    .map(|(n, v)| json!([n, v.trim_end()]))
                    .collect(),
            ));
        }
    }
    blocks
}

fn headers_json(headers: &[mail_parser::Header<'_>], raw: &[u8]) -> Value {
    let mut out = Vec::new();
    for h in headers {
        let name = h.name.as_str().to_ascii_lowercase();
        let raw_value = || {
            let b = raw
                .get(h.offset_start as usize..h.offset_end as usize)
                .unwrap_or_default();
            unstructured(b)
        };
        let v = match (name.as_str(), &h.value) {
            ("from" | "to" | "cc" | "bcc", HeaderValue::Address(a)) => addresses(a),
            ("from" | "to" | "cc" | "bcc", HeaderValue::Empty) => json!([]),
            ("date", HeaderValue::DateTime(d)) if d.is_valid() => {
                let off = (i64::from(d.tz_hour) * 3600 + i64::from(d.tz_minute) * 60)
                    * if d.tz_before_gmt { -1 } else { 1 };
                json!({"unix_secs": d.to_timestamp(), "tz_offset": off})
            }
            ("message-id", HeaderValue::Text(id)) => Value::String(id.to_string()),
            ("content-type" | "content-disposition", HeaderValue::ContentType(ct)) => {
                let t = match (&ct.c_subtype, name.as_str()) {
                    (Some(s), "content-type") => format!("{}/{}", ct.c_type, s),
                    _ => ct.c_type.to_string(),
                };
                let params: Map<String, Value> = ct
                    .attributes
                    .iter()
                    .flatten()
                    .map(|a| {
                        (
                            a.name.to_ascii_lowercase(),
                            Value::String(a.value.to_string()),
                        )
                    })
                    .collect();
                json!([t.to_ascii_lowercase(), params])
            }
            _ => Value::String(raw_value()),
        };
        out.push(json!([name, v]));
    }
    Value::Array(out)
}

fn addresses(a: &Address<'_>) -> Value {
    let one = |a: &mail_parser::Addr<'_>| {
        json!({
            "display_name": a.name.as_deref().unwrap_or(""),
            "address": a.address.as_deref().unwrap_or(""),
        })
    };
    match a {
        Address::List(l) => l.iter().map(one).collect(),
        Address::Group(g) => g.iter().flat_map(|g| g.addresses.iter().map(one)).collect(),
    }
}

/// An unstructured field value: unfolded (line breaks removed, the whitespace after them
/// kept), trimmed, RFC 2047 words decoded, invalid UTF-8 replaced.
fn unstructured(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    let unfolded: String = s.replace("\r\n", "").replace('\n', "");
    decode_2047(unfolded.trim())
}

/// Decodes `=?charset?b|q?text?=` words; whitespace between adjacent words is dropped.
fn decode_2047(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    let mut pending_ws = String::new();
    let mut last_was_word = false;
    while !rest.is_empty() {
        if let Some((text, len)) = encoded_word(rest) {
            if !last_was_word {
                out.push_str(&pending_ws);
            }
            pending_ws.clear();
            out.push_str(&text);
            rest = &rest[len..];
            last_was_word = true;
            continue;
        }
        let c = rest.chars().next().expect("non-empty");
        if c == ' ' || c == '\t' {
            pending_ws.push(c);
        } else {
            out.push_str(&pending_ws);
            pending_ws.clear();
            out.push(c);
            last_was_word = false;
        }
        rest = &rest[c.len_utf8()..];
    }
    out.push_str(&pending_ws);
    out
}

fn encoded_word(s: &str) -> Option<(String, usize)> {
    let body = s.strip_prefix("=?")?;
    let (charset, body) = body.split_once('?')?;
    let (enc, body) = body.split_once('?')?;
    let end = body.find("?=")?;
    let text = &body[..end];
    if text.contains(' ') || charset.is_empty() {
        return None;
    }
    let bytes = match enc {
        "b" | "B" => {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(text.trim_end_matches('='))
                .or_else(|_| {
                    base64::engine::general_purpose::STANDARD_NO_PAD
                        .decode(text.trim_end_matches('='))
                })
                .ok()?
        }
        "q" | "Q" => {
            let mut v = Vec::new();
            let b = text.as_bytes();
            let mut i = 0;
            while i < b.len() {
                match b[i] {
                    b'_' => v.push(b' '),
                    b'=' if i + 2 < b.len() => {
                        let h = std::str::from_utf8(&b[i + 1..i + 3]).ok()?;
                        v.push(u8::from_str_radix(h, 16).ok()?);
                        i += 2;
                    }
                    c => v.push(c),
                }
                i += 1;
            }
            v
        }
        _ => return None,
    };
    let cs = charset.split('*').next().unwrap_or("").to_ascii_lowercase();
    let text = if cs == "iso-8859-1" || cs == "latin1" {
        bytes.iter().map(|b| char::from(*b)).collect()
    } else {
        // UTF-8, US-ASCII and anything unknown: UTF-8 with replacement.
        String::from_utf8_lossy(&bytes).into_owned()
    };
    Some((text, 2 + charset.len() + 1 + enc.len() + 1 + end + 2))
}

fn ct_of(n: &Value) -> &str {
    n.get("content_type").and_then(Value::as_str).unwrap_or("")
}

fn children(n: &Value) -> &[Value] {
    n.get("parts")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// `text_body`, `related_attachments`, `file_attachments` (`message-format.md` §2.7).
fn flatten(root: &Value) -> [Vec<Value>; 3] {
    let mut text = Vec::new();
    let mut related: Option<Vec<Value>> = None;
    let mut files = Vec::new();
    let mut cur = Some(root);
    if let Some(c) = cur
        && ct_of(c) == "multipart/signed"
    {
        cur = children(c).first();
    }
    if let Some(c) = cur
        && ct_of(c) == "multipart/mixed"
        && let [first, rest @ ..] = children(c)
    {
        files = rest.iter().map(flat_part).collect();
        cur = Some(first);
    }
    if let Some(c) = cur
        && ct_of(c) == "multipart/related"
        && let [first, rest @ ..] = children(c)
    {
        related = Some(rest.iter().map(flat_part).collect());
        if ct_of(first) == "text/html" {
            text.push(flat_part(first));
            cur = None;
        } else {
            cur = Some(first);
        }
    }
    if let Some(c) = cur
        && ct_of(c) == "multipart/alternative"
    {
        match children(c) {
            [first, second, ..] if ct_of(first) == "text/plain" => {
                text.push(flat_part(first));
                cur = Some(second);
            }
            [_, _, ..] => cur = None,
            // Degenerate (the reference crashed): leave it alone.
            _ => {}
        }
    }
    if related.is_none()
        && let Some(c) = cur
        && ct_of(c) == "multipart/related"
        && let [first, rest @ ..] = children(c)
    {
        related = Some(rest.iter().map(flat_part).collect());
        cur = Some(first);
    }
    if let Some(c) = cur
        && matches!(ct_of(c), "text/plain" | "text/html")
        && c.get("content").is_some()
    {
        text.push(flat_part(c));
    }
    [text, related.unwrap_or_default(), files]
}

fn flat_part(n: &Value) -> Value {
    let mut m = Map::new();
    m.insert("content_type".into(), ct_of(n).into());
    for h in n
        .get("headers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match (h.get(0).and_then(Value::as_str), h.get(1)) {
            (Some("content-disposition"), Some(Value::Array(d)))
                if d.first().and_then(Value::as_str) == Some("attachment") =>
            {
                if let Some(f) = d.get(1).and_then(|p| p.get("filename")) {
                    m.insert("filename".into(), f.clone());
                }
                break;
            }
            (Some("content-id"), Some(v)) => {
                m.insert("content_id".into(), v.clone());
                break;
            }
            _ => {}
        }
    }
    if let Some(c) = n.get("content") {
        m.insert("content".into(), c.clone());
    }
    Value::Object(m)
}

/// The `message_parser` filter.
pub struct MessageParser {
    done: bool,
    parsed: Option<ParsedMessage>,
}

impl MessageParser {
    /// The filter has no configuration keys (`max_inline` comes from the route).
    pub fn new() -> Result<MessageParser, FilterBuildError> {
        Ok(MessageParser {
            done: false,
            parsed: None,
        })
    }
}

impl Filter for MessageParser {
    fn on_update<'a>(&'a mut self, tx: &'a mut ChainTx, next: Next<'a>) -> LocalFuture<'a, ()> {
        Box::pin(async move {
            let Some(rp) = tx.route.options.receive_parsing.clone() else {
                return next.run(tx).await;
            };
            let raw = matches!(tx.body, Some(MessageBody::Raw(_)));
            if !raw || tx.tx.cancelled {
                return next.run(tx).await;
            }
            if !tx.body_finalized() {
                let withheld = tx.body.take();
                next.run(tx).await;
                tx.body = withheld;
                return;
            }
            if !self.done {
                self.done = true;
                let body = tx.body.as_ref().expect("raw body");
                // Unparsable or too big: delivered raw, without `parsed` (F12).
                if let Ok(bytes) = body.read_all(MAX_PARSE_BYTES).await {
                    let mut id = 0;
                    self.parsed = parse_message(&bytes, rp.max_inline, &mut id);
                }
            }
            tx.parsed = self.parsed.clone();
            next.run(tx).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ReceiveParsing;
    use crate::filter::Chain;
    use crate::{Mailbox, Response};
    use std::cell::RefCell;

    fn testdata(f: &str) -> Vec<u8> {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/koukan-reference/testdata/"
        );
        std::fs::read(format!("{dir}{f}")).unwrap()
    }

    fn blob_text(p: &ParsedMessage, id: &str) -> String {
        let b = MessageBody::blob(p.blobs[id].clone());
        String::from_utf8(
            futures_util::FutureExt::now_or_never(b.read_all(1 << 20))
                .unwrap()
                .unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn golden_files() {
        // One id counter across the three files, as the reference test.
        let mut id = 0;
        for name in ["multipart", "multipart2", "related"] {
            let p = parse_message(&testdata(&format!("{name}.msg")), 1000, &mut id).unwrap();
            let want: Value = serde_json::from_slice(&testdata(&format!("{name}.json"))).unwrap();
            assert_eq!(
                p.json,
                want,
                "{name}:\n{}",
                serde_json::to_string_pretty(&p.json).unwrap()
            );
        }
        assert_eq!(id, 5);
        let p = parse_message(&testdata("multipart.msg"), 1000, &mut 0).unwrap();
        assert_eq!(blob_text(&p, "0"), "yolocat");
        assert_eq!(blob_text(&p, "1"), "yolocat2");
    }

    #[test]
    fn max_inline() {
        let p = parse_message(&testdata("multipart.msg"), 8, &mut 0).unwrap();
        let j = &p.json;
        assert_eq!(j["text_body"][0]["content"], json!({"inline": "hello"}));
        assert_eq!(j["text_body"][1]["content"], json!({"create_id": "0"}));
        assert_eq!(
            j["related_attachments"][0]["content"],
            json!({"create_id": "1"})
        );
        assert_eq!(
            j["file_attachments"][0]["content"],
            json!({"create_id": "2"})
        );
        assert_eq!(blob_text(&p, "0"), "<b>hello</b>");
        let p = parse_message(&testdata("multipart.msg"), 0, &mut 0).unwrap();
        assert_eq!(p.blobs.len(), 4);
    }

    fn header<'a>(node: &'a Value, name: &str) -> Option<&'a Value> {
        node["headers"]
            .as_array()?
            .iter()
            .find(|h| h[0] == name)
            .map(|h| &h[1])
    }

    #[test]
    fn dsn() {
        for (f, third) in [
            ("dsn.msg", "message/rfc822"),
            ("dsn-text-rfc822-headers.msg", "text/rfc822-headers"),
        ] {
            let p = parse_message(&testdata(f), 0, &mut 0).unwrap();
            let root = &p.json["parts"];
            let ct = header(root, "content-type").unwrap();
            assert_eq!(ct[0], "multipart/report", "{f}");
            assert_eq!(ct[1]["report-type"], "delivery-status");
            let ds = &root["parts"][1];
            assert_eq!(ds["content_type"], "message/delivery-status");
            assert_eq!(
                header(&ds["parts"][0], "reporting-mta"),
                Some(&json!("dns; googlemail.com")),
                "{f}: {ds}"
            );
            assert_eq!(
                header(&ds["parts"][1], "final-recipient"),
                Some(&json!("rfc822; xyz@sandbox.gloop.org"))
            );
            assert_eq!(root["parts"][2]["content_type"], third, "{f}");
            assert!(
                !root["parts"][2]["parts"][0]["headers"]
                    .as_array()
                    .unwrap()
                    .is_empty()
            );
            assert!(
                p.json.get("text_body").is_none(),
                "reports are not flattened"
            );
        }
    }

    #[test]
    fn every_testdata_message_parses() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/koukan-reference/testdata/"
        );
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            if path.extension().is_some_and(|x| x == "msg") {
                let raw = std::fs::read(&path).unwrap();
                let p = parse_message(&raw, 100, &mut 0)
                    .unwrap_or_else(|| panic!("{}", path.display()));
                // Strict JSON: serializes and re-parses (no lone surrogates).
                let s = serde_json::to_string(&p.json).unwrap();
                serde_json::from_str::<Value>(&s).unwrap();
                n += 1;
            }
        }
        assert!(n >= 15);
    }

    #[test]
    fn header_values() {
        let raw =
            b"From: =?utf-8?q?J=C3=B6s=C3=A9?= <jose@example.com>, undisclosed-recipients:;\r\n\
Subject: =?utf-8?b?aMOpbGxv?= =?utf-8?q?_w=C3=B6rld?=\r\n\
Received: from localhost ([127.0.0.1])\r\n\tby gargantua1\r\n\twith ESMTP; x\r\n\
X-Bytes: hello \xff\xfe\r\n\
Date: not a date\r\n\
References: <a@b> <c@d>\r\n\r\nbody\r\n";
        let p = parse_message(raw, 100, &mut 0).unwrap();
        let root = &p.json["parts"];
        assert_eq!(
            header(root, "from").unwrap(),
            &json!([{"display_name": "Jösé", "address": "jose@example.com"}])
        );
        assert_eq!(header(root, "subject").unwrap(), "héllo wörld");
        assert_eq!(
            header(root, "received").unwrap(),
            "from localhost ([127.0.0.1])\tby gargantua1\twith ESMTP; x"
        );
        assert_eq!(header(root, "x-bytes").unwrap(), "hello \u{fffd}\u{fffd}");
        assert_eq!(header(root, "date").unwrap(), "not a date");
        assert_eq!(header(root, "references").unwrap(), "<a@b> <c@d>");
        assert_eq!(root["content"], json!({"inline": "body\n"}));
        assert_eq!(
            p.json["text_body"][0]["content"],
            json!({"inline": "body\n"})
        );
    }

    #[test]
    fn broken_inputs_do_not_panic() {
        for raw in [
            &b""[..],
            b"no header separator at all",
            b"Content-Type: multipart/mixed; boundary=x\r\n\r\n",
            b"Content-Type: multipart/alternative; boundary=x\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\nonly one\r\n--x--\r\n",
            b"Content-Type: text/plain; charset=x-unknown\r\n\r\n\xff\xfe",
            b"Content-Type: multipart/mixed\r\n\r\n--\r\n",
        ] {
            if let Some(p) = parse_message(raw, 10, &mut 0) {
                serde_json::to_string(&p.json).unwrap();
            }
        }
        // No header/body separator: everything is body, no headers (as the reference).
        let p = parse_message(b"just text\r\nmore\r\n", 100, &mut 0).unwrap();
        assert_eq!(p.json["parts"]["headers"], json!([]));
        assert_eq!(
            p.json["parts"]["content"],
            json!({"inline": "just text\nmore\n"})
        );
        // Deep nesting: the subtree below the limit is one blob.
        let mut m = String::new();
        for i in 0..15 {
            m.push_str(&format!(
                "Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n"
            ));
        }
        m.push_str("Content-Type: text/plain\r\n\r\ndeep\r\n");
        for i in (0..15).rev() {
            m.push_str(&format!("--b{i}--\r\n"));
        }
        let p = parse_message(m.as_bytes(), 10, &mut 0).unwrap();
        serde_json::to_string(&p.json).unwrap();
    }

    /// Records what it is given.
    type Seen = Rc<RefCell<Vec<(Option<Vec<u8>>, Option<Value>)>>>;
    struct Sink(Seen);
    impl Filter for Sink {
        fn on_update<'a>(&'a mut self, tx: &'a mut ChainTx, _: Next<'a>) -> LocalFuture<'a, ()> {
            Box::pin(async move {
                let b = match &tx.body {
                    Some(b) => Some(b.read_all(1 << 24).await.unwrap()),
                    None => None,
                };
                self.0
                    .borrow_mut()
                    .push((b, tx.parsed.as_ref().map(|p| p.json.clone())));
                if tx.body_finalized() && tx.tx.data_response.is_none() {
                    tx.tx.data_response = Some(Response::new(250, "ok"));
                }
            })
        }
    }

    struct Partial;
    impl BlobSource for Partial {
        fn len(&self) -> u64 {
            0
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

    fn chain_tx(parsing: bool) -> ChainTx {
        let mut t = ChainTx::default();
        t.tx.mail_from = Some(Mailbox::new("alice@example.com"));
        t.tx.rcpt_to = vec![Mailbox::new("bob@example.org")];
        t.tx.rcpt_response = vec![Some(Response::new(250, "ok"))];
        if parsing {
            t.route.options.receive_parsing = Some(ReceiveParsing { max_inline: 1000 });
        }
        t
    }

    #[tokio::test]
    async fn filter() {
        let seen = Rc::new(RefCell::new(Vec::new()));
        let mut chain = Chain::new(vec![
            Box::new(MessageParser::new().unwrap()),
            Box::new(Sink(seen.clone())),
        ]);
        let mut t = chain_tx(true);
        t.body = Some(MessageBody::blob(Rc::new(Partial)));
        chain.update(&mut t).await;
        assert_eq!(seen.borrow()[0], (None, None), "withheld until complete");
        let raw = testdata("multipart.msg");
        t.body = Some(MessageBody::bytes(raw.clone()));
        chain.update(&mut t).await;
        let (body, json) = seen.borrow()[1].clone();
        assert_eq!(
            body.as_deref(),
            Some(&raw[..]),
            "the raw body still goes upstream"
        );
        let json = json.unwrap();
        assert_eq!(json["parts"]["content_type"], "multipart/mixed");
        assert_eq!(t.parsed.as_ref().unwrap().blobs.len(), 2);

        // Without receive_parsing: pass-through.
        let seen = Rc::new(RefCell::new(Vec::new()));
        let mut chain = Chain::new(vec![
            Box::new(MessageParser::new().unwrap()),
            Box::new(Sink(seen.clone())),
        ]);
        let mut t = chain_tx(false);
        t.body = Some(MessageBody::bytes(raw.clone()));
        chain.update(&mut t).await;
        assert_eq!(seen.borrow()[0], (Some(raw), None));
    }

    #[tokio::test]
    async fn unparsable_body_is_delivered_raw() {
        let seen = Rc::new(RefCell::new(Vec::new()));
        let mut chain = Chain::new(vec![
            Box::new(MessageParser::new().unwrap()),
            Box::new(Sink(seen.clone())),
        ]);
        let mut t = chain_tx(true);
        t.body = Some(MessageBody::bytes(""));
        chain.update(&mut t).await;
        assert_eq!(seen.borrow()[0].0.as_deref(), Some(&b""[..]));
        assert_eq!(t.tx.data_response.as_ref().unwrap().code, 250);
    }
}

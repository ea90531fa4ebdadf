//! `rest_output`: the terminal filter that hands a transaction to an HTTP destination
//! speaking the Koukan REST API (the SMTP gateway, a receiver application, another router).

use std::collections::BTreeMap;
use std::time::Instant;

use koukan::config::RestOutputFilter;
use koukan::filter::message_parser::{MAX_PARSE_BYTES, ParsedMessage, parse_message};
use koukan::filter::{ChainTx, Filter, LocalFuture, MessageBody, Next, Route};
use koukan::transaction::Update;
use koukan::{HostPort, Transaction};
use serde_json::{Map, Value};

use crate::client::{ClientError, ClientSettings, HttpClient, RestTransaction};

pub struct RestOutput {
    cfg: RestOutputFilter,
    upstream: Option<RestTransaction>,
    /// Downstream index of each recipient sent upstream, in upstream order: recipients an
    /// earlier filter answered (rejected) are never sent.
    sent: Vec<usize>,
    /// The create failed on every host: later runs change nothing.
    failed: bool,
    body_sent: bool,
    /// Signals as last sent upstream (`send_filter_output`): later runs PATCH the changes.
    signals_sent: BTreeMap<String, Value>,
    /// The route the upstream transaction was created for. The `router` filter sets
    /// `ChainTx::route` only on runs that route a pending recipient, so later runs (the
    /// body) may come without it.
    route: Option<Route>,
}

impl RestOutput {
    pub fn new(cfg: RestOutputFilter) -> Self {
        RestOutput {
            cfg,
            upstream: None,
            sent: Vec::new(),
            failed: false,
            body_sent: false,
            signals_sent: BTreeMap::new(),
            route: None,
        }
    }

    fn settings(&self) -> ClientSettings {
        ClientSettings {
            timeout: self.cfg.rcpt_timeout,
            data_timeout: self.cfg.data_timeout,
            chunk_size: self.cfg.chunk_size.unwrap_or(1 << 20),
            // The delivery loop sends our heartbeats when downstream is quiet.
            refresh_interval: None,
            verify: self.cfg.verify.clone(),
            prefer_wait: true,
        }
    }

    /// What the destination gets: the envelope, presented as the route's sender.
    fn create_tx(tx: &ChainTx, host: Option<&HostPort>, rcpts: &[usize]) -> Transaction {
        let route = &tx.route;
        Transaction {
            remote_host: route.remote_host.clone().or_else(|| host.cloned()),
            local_host: tx.tx.local_host.clone(),
            mail_from: tx.tx.mail_from.clone(),
            rcpt_to: rcpts.iter().map(|i| tx.tx.rcpt_to[*i].clone()).collect(),
            smtp_meta: route.smtp_meta.clone().or_else(|| tx.tx.smtp_meta.clone()),
            sender: route.sender.clone(),
            ..Default::default()
        }
    }

    /// Creates the upstream transaction, trying each next hop in order: the next one on an
    /// HTTP failure or a temporary MAIL failure (but the last host's answer stands).
    async fn start(&mut self, tx: &mut ChainTx) {
        let pending: Vec<usize> = tx.pending_rcpts().collect();
        if pending.is_empty() && !tx.tx.rcpt_to.is_empty() {
            // Every recipient was answered before us (rejected): nothing to send.
            if tx.tx.mail_response.is_none() {
                tx.tx.mail_response =
                    Some(koukan::Response::new(250, "MAIL ok (no recipient to send)"));
            }
            return;
        }
        let Some(url) = self
            .cfg
            .static_endpoint
            .clone()
            .or_else(|| tx.route.endpoint.clone())
        else {
            tx.fill_inflight(&ClientError::NoEndpoint.response());
            self.failed = true;
            return;
        };
        let http = match HttpClient::shared(&self.cfg.verify) {
            Ok(h) => h,
            Err(e) => {
                tx.fill_inflight(&e.response());
                self.failed = true;
                return;
            }
        };
        let hosts: Vec<Option<HostPort>> = match &tx.route.resolution {
            Some(list) if !list.is_empty() => list.iter().cloned().map(Some).collect(),
            _ => vec![None],
        };
        // filter_output goes upstream only when the route asks for it (§11.6).
        let mut extra = Map::new();
        if tx.route.options.send_filter_output() && !tx.signals.is_empty() {
            extra.insert("filter_output".into(), signals_json(&tx.signals));
            self.signals_sent = tx.signals.clone();
        }
        let mut last_err = None;
        for (i, host) in hosts.iter().enumerate() {
            let is_last = i + 1 == hosts.len();
            let deadline = Instant::now() + self.cfg.rcpt_timeout;
            let create = Self::create_tx(tx, host.as_ref(), &pending);
            let upstream = match RestTransaction::create_with(
                http.clone(),
                self.settings(),
                &url,
                &create,
                None,
                &extra,
            )
            .await
            {
                // Held from the start: a cancel that interrupts the waits below still
                // finds it to cancel.
                Ok(u) => self.upstream.insert(u),
                Err(e) => {
                    tracing::info!(url, host = ?host, "rest_output create: {}", e.detail());
                    last_err = Some(e);
                    continue;
                }
            };
            let mail = match upstream.wait_mail(deadline).await {
                Ok(r) => r,
                Err(e) => {
                    last_err = Some(e);
                    upstream.cancel().await;
                    self.upstream = None;
                    continue;
                }
            };
            if mail.temp() && !is_last {
                // Abandoned attempts are cancelled, not left for the destination's GC.
                upstream.cancel().await;
                self.upstream = None;
                last_err = None;
                tx.tx.mail_response = Some(mail);
                continue;
            }
            tx.tx.mail_response = Some(mail);
            for (u, d) in pending.iter().enumerate() {
                let resp = upstream
                    .wait_rcpt(u, deadline)
                    .await
                    .unwrap_or_else(|e| e.response());
                tx.set_rcpt_response(*d, resp);
            }
            self.sent = pending;
            self.route = Some(tx.route.clone());
            return;
        }
        if let Some(e) = last_err {
            tx.tx.mail_response = None;
            tx.fill_inflight(&e.response());
        }
        self.failed = true;
    }

    async fn add_rcpts(&mut self, tx: &mut ChainTx) {
        let Some(upstream) = self.upstream.as_mut() else {
            return;
        };
        if tx.mail_failed() {
            return;
        }
        let new: Vec<usize> = tx
            .pending_rcpts()
            .filter(|i| !self.sent.contains(i))
            .collect();
        if new.is_empty() {
            return;
        }
        let offset = upstream.rcpt_sent();
        let update = Update {
            rcpt_to: new.iter().map(|i| tx.tx.rcpt_to[*i].clone()).collect(),
            rcpt_to_list_offset: offset,
            ..Default::default()
        };
        let deadline = Instant::now() + self.cfg.rcpt_timeout;
        if let Err(e) = upstream.update(&update).await {
            for i in &new {
                tx.set_rcpt_response(*i, e.response());
            }
            return;
        }
        for (k, d) in new.iter().enumerate() {
            let resp = upstream
                .wait_rcpt(offset + k, deadline)
                .await
                .unwrap_or_else(|e| e.response());
            tx.set_rcpt_response(*d, resp);
        }
        self.sent.extend(new);
    }

    /// PATCHes the signals that changed since they were last sent. Returns whether a
    /// PATCH went out (it doubles as a heartbeat).
    async fn send_signals(&mut self, tx: &ChainTx) -> bool {
        if !tx.route.options.send_filter_output() {
            return false;
        }
        let Some(upstream) = self.upstream.as_mut() else {
            return false;
        };
        let changed: BTreeMap<String, Value> = tx
            .signals
            .iter()
            .filter(|(k, v)| self.signals_sent.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if changed.is_empty() {
            return false;
        }
        let Value::Object(m) = signals_json(&changed) else {
            unreachable!("signals_json builds an object")
        };
        if let Err(e) = upstream.update_filter_output(&m).await {
            tracing::info!(
                url = upstream.url(),
                "rest_output filter_output: {}",
                e.detail()
            );
            return false;
        }
        self.signals_sent.extend(changed);
        true
    }

    async fn send_body(&mut self, tx: &mut ChainTx) {
        let (Some(upstream), Some(body)) = (self.upstream.as_mut(), tx.body.as_ref()) else {
            return;
        };
        self.body_sent = true;
        let parsed = match (&tx.parsed, &tx.route.options.receive_parsing) {
            (_, None) => None,
            (Some(p), Some(_)) => Some(p.clone()),
            // message_parser did not run for this route (it lost the route, see `route`):
            // parse here. Unparsable or too big: delivered raw, as message_parser does.
            (None, Some(rp)) => match body.read_all(MAX_PARSE_BYTES).await {
                Ok(bytes) => parse_message(&bytes, rp.max_inline, &mut 0),
                Err(_) => None,
            },
        };
        let chunk_size = self.cfg.chunk_size.unwrap_or(1 << 20);
        let result: Result<(), ClientError> = async {
            if let Some(p) = &parsed {
                send_parsed(upstream, p).await?;
            }
            send_raw(upstream, body, chunk_size).await
        }
        .await;
        let resp = match result {
            Ok(()) => {
                // The data wait is bounded by data_timeout, not rcpt_timeout (§11.8).
                let deadline = Instant::now() + self.cfg.data_timeout;
                upstream
                    .wait_data(deadline)
                    .await
                    .unwrap_or_else(|e| e.response())
            }
            Err(e) => {
                tracing::info!(url = upstream.url(), "rest_output body: {}", e.detail());
                e.response()
            }
        };
        tx.tx.data_response = Some(resp);
    }
}

/// The signals as the `filter_output` object.
fn signals_json(signals: &BTreeMap<String, Value>) -> Value {
    Value::Object(
        signals
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    )
}

/// `receive_parsing` (§11.4): the parsed message to `body.message_builder.uri`, then each
/// blob, in numeric id order, to the URI the receiver listed for it.
async fn send_parsed(upstream: &mut RestTransaction, p: &ParsedMessage) -> Result<(), ClientError> {
    upstream.post_message_builder(&p.json).await?;
    let mut ids: Vec<&String> = p.blobs.keys().collect();
    ids.sort_by_key(|id| (id.len(), *id));
    for id in ids {
        let uri = upstream
            .blob_uri(id)
            .ok_or_else(|| ClientError::MessageBuilder {
                what: "bad resp no blob uri",
                detail: format!("no blob_status for blob {id:?}"),
            })?;
        let data = MessageBody::blob(p.blobs[id].clone())
            .read_all(MAX_PARSE_BYTES)
            .await
            .map_err(|e| ClientError::UploadTransport {
                detail: e.to_string(),
            })?;
        upstream.put_blob(&uri, data.into()).await?;
    }
    Ok(())
}

/// The raw message to `body.blob_status.uri`, in `chunk_size` PUTs.
async fn send_raw(
    upstream: &mut RestTransaction,
    body: &MessageBody,
    chunk_size: usize,
) -> Result<(), ClientError> {
    let total = body.len().unwrap_or(0);
    if total == 0 {
        return upstream.put_chunk(bytes::Bytes::new(), true).await;
    }
    let mut reader = body.reader(chunk_size);
    let mut sent = 0u64;
    // A body made of pieces (a prepended Received: header and the stored blob) is sent in
    // as few PUTs as `chunk_size` allows: small pieces are gathered, not PUT one by one.
    let mut pending = bytes::BytesMut::new();
    while let Some(chunk) = reader
        .next()
        .await
        .map_err(|e| ClientError::UploadTransport {
            detail: e.to_string(),
        })?
    {
        sent += chunk.len() as u64;
        let last = sent >= total;
        let piece = if pending.is_empty() && (last || chunk.len() >= chunk_size) {
            chunk
        } else {
            pending.extend_from_slice(&chunk);
            if !last && pending.len() < chunk_size {
                continue;
            }
            pending.split().freeze()
        };
        upstream.put_chunk(piece, last).await?;
    }
    if !pending.is_empty() {
        // The reader ended short of the announced length: send what came, unfinalized.
        upstream.put_chunk(pending.freeze(), false).await?;
    }
    if !upstream.body_finalized() {
        // The reader ended short of the length it announced.
        return Err(ClientError::UploadTransport {
            detail: format!("body ended at {sent} of {total} bytes"),
        });
    }
    Ok(())
}

impl Filter for RestOutput {
    fn on_update<'a>(&'a mut self, tx: &'a mut ChainTx, _next: Next<'a>) -> LocalFuture<'a, ()> {
        Box::pin(async move {
            if tx.tx.cancelled {
                // Upstream's own view decides: after a local timeout it may still be working
                // on the message, and must stop before this attempt is retried.
                if let Some(u) = self.upstream.as_mut()
                    && u.state().data_response.is_none()
                {
                    u.cancel().await;
                }
                return;
            }
            if self.failed || tx.tx.mail_from.is_none() {
                return;
            }
            if let Some(r) = &self.route
                && tx.route == Route::default()
            {
                tx.route = r.clone();
            }
            if self.upstream.is_none() {
                self.start(tx).await;
                if self.upstream.is_none() {
                    return;
                }
            } else {
                self.add_rcpts(tx).await;
            }
            if tx.mail_failed() {
                return;
            }
            let patched = self.send_signals(tx).await;
            if !self.body_sent
                && tx.body_finalized()
                && self
                    .sent
                    .iter()
                    .any(|i| tx.rcpt_response(*i).is_some_and(|r| r.ok()))
            {
                self.send_body(tx).await;
            } else if tx.heartbeat
                && !patched
                && !self.body_sent
                && let Some(u) = self.upstream.as_mut()
                && let Err(e) = u.heartbeat().await
            {
                tracing::info!(url = u.url(), "rest_output heartbeat: {}", e.detail());
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::receive::{Receiver, ReceiverOptions};
    use koukan::config::ReceiveParsing;
    use koukan::filter::Chain;
    use koukan::{Mailbox, Sender};
    use serde_json::json;
    use std::time::Duration;

    const MULTIPART: &str = "From: a@x\r\nSubject: parts\r\nContent-Type: multipart/mixed; \
        boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nthe plain text part\r\n\
        --b\r\nContent-Type: application/octet-stream\r\n\r\nan attachment body\r\n--b--\r\n";

    /// receive_parsing against the receiver tool, with chunks small enough that every
    /// blob and the body go in several content-range PUTs; filter_output in the create
    /// and, once changed, in a PATCH.
    #[actix_rt::test]
    async fn receive_parsing_chunked_with_filter_output() {
        let rcv = Receiver::start(ReceiverOptions::new("127.0.0.1:0".parse().unwrap()))
            .await
            .unwrap();
        let cfg = RestOutputFilter {
            static_endpoint: Some(format!("{}/senders/router/transactions", rcv.base_url)),
            rcpt_timeout: Duration::from_secs(10),
            data_timeout: Duration::from_secs(10),
            verify: koukan::config::TlsVerify::System,
            chunk_size: Some(7),
        };
        let mut chain = Chain::new(vec![Box::new(RestOutput::new(cfg))]);
        let mut tx = ChainTx::default();
        tx.tx.mail_from = Some(Mailbox::new("a@x"));
        tx.tx.rcpt_to = vec![Mailbox::new("b@y")];
        tx.route.sender = Some(Sender::new("router", None));
        tx.route.options.receive_parsing = Some(ReceiveParsing { max_inline: 5 });
        tx.route.options.send_filter_output = Some(true);
        tx.signals.insert("f1".into(), json!({"status": 0}));
        chain.update(&mut tx).await;
        assert_eq!(tx.tx.mail_response.as_ref().unwrap().code, 250);
        assert_eq!(tx.rcpt_response(0).unwrap().code, 250);

        // The next run: the router filter no longer sets the route; a signal changed.
        tx.route = Route::default();
        tx.signals.insert("f2".into(), json!({"n": 1}));
        tx.body = Some(MessageBody::bytes(MULTIPART));
        chain.update(&mut tx).await;
        assert_eq!(tx.tx.data_response.as_ref().unwrap().code, 250, "{tx:?}");

        let got = rcv.messages();
        assert_eq!(got.len(), 1);
        let m = &got[0];
        assert_eq!(m.body.as_deref(), Some(MULTIPART.as_bytes()));
        assert_eq!(
            m.tx_json["filter_output"],
            json!({"f1": {"status": 0}, "f2": {"n": 1}})
        );
        assert_eq!(m.tx_json["sender"], json!({"name": "router"}));
        let parsed = m.message_json.as_ref().expect("parsed message posted");
        assert!(parsed["parts"].is_object());
        let blobs: Vec<Vec<u8>> = m.blobs.values().map(|b| b.data.clone()).collect();
        assert!(m.blobs.values().all(|b| b.finalized));
        assert!(
            blobs.contains(&b"the plain text part".to_vec()),
            "{blobs:?}"
        );
        assert!(blobs.contains(&b"an attachment body".to_vec()), "{blobs:?}");
        rcv.stop().await;
    }

    #[test]
    fn create_presents_the_route_sender() {
        let mut tx = ChainTx::default();
        tx.tx.mail_from = Some(Mailbox::new("a@x"));
        tx.tx.rcpt_to = vec![Mailbox::new("b@y")];
        tx.tx.remote_host = Some(HostPort::new("10.1.1.1", 4444));
        tx.tx.sender = Some(Sender::new("submission", None));
        tx.route.sender = Some(Sender::new("router", Some("outbound".into())));
        let c = RestOutput::create_tx(&tx, Some(&HostPort::new("127.0.0.1", 25)), &[0]);
        assert_eq!(
            c.remote_host,
            Some(HostPort::new("127.0.0.1", 25)),
            "never the client's address"
        );
        assert_eq!(c.sender, tx.route.sender);
        let none = RestOutput::create_tx(&tx, None, &[0]);
        assert_eq!(none.remote_host, None);
        assert_eq!(none.rcpt_to, tx.tx.rcpt_to);
    }
}

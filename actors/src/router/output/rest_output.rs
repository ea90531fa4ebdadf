//! `rest_output`: the terminal filter that hands a transaction to an HTTP destination
//! speaking the Koukan REST API (the SMTP gateway, a receiver application, another router).

use std::time::Instant;

use koukan::config::RestOutputFilter;
use koukan::filter::{ChainTx, Filter, LocalFuture, Next};
use koukan::transaction::Update;
use koukan::{HostPort, Transaction};

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
}

impl RestOutput {
    pub fn new(cfg: RestOutputFilter) -> Self {
        RestOutput {
            cfg,
            upstream: None,
            sent: Vec::new(),
            failed: false,
            body_sent: false,
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
        let mut last_err = None;
        for (i, host) in hosts.iter().enumerate() {
            let is_last = i + 1 == hosts.len();
            let deadline = Instant::now() + self.cfg.rcpt_timeout;
            let create = Self::create_tx(tx, host.as_ref(), &pending);
            let mut upstream =
                match RestTransaction::create(http.clone(), self.settings(), &url, &create, None)
                    .await
                {
                    Ok(u) => u,
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
                    continue;
                }
            };
            if mail.temp() && !is_last {
                // Abandoned attempts are cancelled, not left for the destination's GC.
                upstream.cancel().await;
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
            self.upstream = Some(upstream);
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

    async fn send_body(&mut self, tx: &mut ChainTx) {
        let (Some(upstream), Some(body)) = (self.upstream.as_mut(), tx.body.as_ref()) else {
            return;
        };
        self.body_sent = true;
        let total = body.len().unwrap_or(0);
        let mut reader = body.reader(self.cfg.chunk_size.unwrap_or(1 << 20));
        let mut sent = 0u64;
        let result: Result<(), ClientError> = async {
            if total == 0 {
                return upstream.put_chunk(bytes::Bytes::new(), true).await;
            }
            while let Some(chunk) =
                reader
                    .next()
                    .await
                    .map_err(|e| ClientError::UploadTransport {
                        detail: e.to_string(),
                    })?
            {
                sent += chunk.len() as u64;
                upstream.put_chunk(chunk, sent >= total).await?;
            }
            Ok(())
        }
        .await;
        let resp = match result {
            Ok(()) => {
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

impl Filter for RestOutput {
    fn on_update<'a>(&'a mut self, tx: &'a mut ChainTx, _next: Next<'a>) -> LocalFuture<'a, ()> {
        Box::pin(async move {
            if tx.tx.cancelled {
                if let Some(u) = self.upstream.as_mut()
                    && tx.tx.data_response.is_none()
                {
                    u.cancel().await;
                }
                return;
            }
            if self.failed || tx.tx.mail_from.is_none() {
                return;
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
            if !self.body_sent
                && tx.body_finalized()
                && self
                    .sent
                    .iter()
                    .any(|i| tx.rcpt_response(*i).is_some_and(|r| r.ok()))
            {
                self.send_body(tx).await;
            } else if tx.heartbeat
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
    use koukan::{Mailbox, Sender};

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

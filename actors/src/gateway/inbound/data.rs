//! DATA and BDAT: the body is streamed to the router in `chunk_size` PUTs while it
//! arrives (never held whole), then the data response is awaited and relayed.

use std::time::Instant;

use bytes::BytesMut;

use super::reply::Reply;
use super::session::{Line, Session, Stop};

/// Longest body line, line ending included (RFC 5321 §4.5.3.1.6, plus the one octet
/// of slack the original allows).
const MAX_DATA_LINE: usize = 1001;

/// A body in transit: what is buffered for the next PUT, and the first problem seen
/// (after which the rest of the message is read and dropped).
pub(super) struct Body {
    buf: BytesMut,
    total: u64,
    error: Option<Reply>,
    /// When buffered bytes were last sent: a slow client's data still moves on
    /// every `refresh_interval`.
    last_push: Instant,
}

impl Default for Body {
    fn default() -> Self {
        Body {
            buf: BytesMut::new(),
            total: 0,
            error: None,
            last_push: Instant::now(),
        }
    }
}

impl Session {
    /// Checks shared by DATA and the first BDAT.
    fn body_precondition(&self) -> Option<Reply> {
        if self.helo.is_none() {
            return Some(Reply::new(503, "5.5.1", "Error: send HELO first"));
        }
        if let Some(r) = &self.env.failed {
            return Some(r.clone());
        }
        if !self.env.mail_ok {
            return Some(Reply::new(503, "5.5.1", "Error: need MAIL command"));
        }
        if self.env.rcpts_ok == 0 {
            return Some(Reply::new(503, "5.5.1", "Error: need RCPT command"));
        }
        None
    }

    pub(super) async fn data(&mut self) -> Result<(), Stop> {
        if self.env.body.is_some() {
            self.reply(503, "5.5.1", "Error: DATA after BDAT");
            return Ok(());
        }
        if let Some(r) = self.body_precondition() {
            self.send(&r);
            return Ok(());
        }
        self.reply(354, "", "End data with <CR><LF>.<CR><LF>");
        let mut body = Body::default();
        // A terminating dot counts only at the start of a CRLF-ended line, so a bare-LF
        // sequence cannot end the message early (SMTP smuggling).
        let mut line_start = true;
        loop {
            let line = match self.read_line(MAX_DATA_LINE, false).await {
                Ok(Line::Ok(l)) => l,
                Ok(Line::TooLong) => {
                    if body.error.is_none() {
                        body.error = Some(Reply::new(
                            500,
                            "5.5.2",
                            "Line too long (see RFC5321 4.5.3.1.6)",
                        ));
                    }
                    line_start = true;
                    continue;
                }
                Err(stop) => {
                    // Disconnect mid-DATA: nothing was acknowledged; run() cancels.
                    return Err(stop);
                }
            };
            if line_start && &line[..] == b".\r\n" {
                break;
            }
            let text = if line_start && line.first() == Some(&b'.') {
                line.slice(1..)
            } else {
                line.clone()
            };
            line_start = line.ends_with(b"\r\n");
            self.body_append(&mut body, &text).await;
        }
        let r = self.body_finish(body).await;
        self.send(&r);
        Ok(())
    }

    pub(super) async fn bdat(&mut self, size: usize, last: bool) -> Result<(), Stop> {
        let refuse = if !self.svc.cfg.enable_bdat {
            Some(Reply::new(502, "5.5.1", "Error: BDAT not offered"))
        } else if self.env.body.is_none() {
            self.body_precondition()
        } else {
            None
        };
        if let Some(r) = refuse {
            // The chunk follows the command whatever the answer: skip it.
            self.discard(size).await?;
            self.send(&r);
            return Ok(());
        }
        let mut body = self.env.body.take().unwrap_or_default();
        let mut left = size;
        while left > 0 {
            if self.conn.rbuf.is_empty() {
                self.fill(false).await?;
            }
            let n = left.min(self.conn.rbuf.len());
            let piece = self.conn.rbuf.split_to(n).freeze();
            left -= n;
            self.body_append(&mut body, &piece).await;
        }
        if !last {
            if let Some(r) = body.error.take() {
                // RFC 3030: an error ends the transaction; later chunks get 503.
                self.reset_tx().await;
                self.send(&r);
            } else {
                self.env.body = Some(body);
                self.reply(250, "2.0.0", format!("{size} octets received"));
            }
            return Ok(());
        }
        let r = self.body_finish(body).await;
        self.send(&r);
        Ok(())
    }

    async fn discard(&mut self, mut left: usize) -> Result<(), Stop> {
        while left > 0 {
            if self.conn.rbuf.is_empty() {
                self.fill(false).await?;
            }
            let n = left.min(self.conn.rbuf.len());
            let _ = self.conn.rbuf.split_to(n);
            left -= n;
        }
        Ok(())
    }

    /// Adds body bytes; pushes full chunks to the router.
    async fn body_append(&mut self, body: &mut Body, data: &[u8]) {
        body.total += data.len() as u64;
        if body.error.is_some() {
            return;
        }
        if body.total > self.svc.cfg.max_message_size {
            body.error = Some(Reply::new(552, "5.3.4", "Error: Too much mail data"));
            body.buf = BytesMut::new();
            return;
        }
        body.buf.extend_from_slice(data);
        let chunk = self.svc.client.chunk_size;
        while body.buf.len() > chunk && body.error.is_none() {
            let piece = body.buf.split_to(chunk).freeze();
            self.body_push(body, piece, false).await;
        }
        let stale = self
            .svc
            .client
            .refresh_interval
            .is_some_and(|r| body.last_push.elapsed() >= r);
        if stale && !body.buf.is_empty() && body.error.is_none() {
            let piece = body.buf.split().freeze();
            self.body_push(body, piece, false).await;
        }
    }

    async fn body_push(&mut self, body: &mut Body, piece: bytes::Bytes, last: bool) {
        let Some(rest) = self.env.rest.as_mut() else {
            body.error = Some(
                self.env
                    .failed
                    .clone()
                    .unwrap_or_else(|| Reply::new(451, "4.3.0", "transaction aborted")),
            );
            return;
        };
        body.last_push = Instant::now();
        let mut result = rest.put_chunk(piece, last).await;
        if result.is_ok() && !last {
            result = rest.maybe_heartbeat().await;
        }
        match result {
            Err(e) => {
                let r = self.fail_tx(&e).await;
                body.error = Some(r);
            }
            Ok(()) => {
                // An early rejection (seen in a heartbeat answer) settles the message.
                if let Some(d) = rest
                    .state()
                    .data_response
                    .as_ref()
                    .filter(|d| !last && d.err())
                {
                    body.error = Some(Reply::from_response(d, "5.6.0"));
                }
            }
        }
    }

    /// Finalizes the body, waits for the data response and ends the transaction.
    async fn body_finish(&mut self, mut body: Body) -> Reply {
        if let Some(r) = body.error.take() {
            self.reset_tx().await;
            return r;
        }
        let rest_piece = body.buf.split().freeze();
        self.body_push(&mut body, rest_piece, true).await;
        if let Some(r) = body.error.take() {
            self.reset_tx().await;
            return r;
        }
        let deadline = Self::deadline(self.svc.cfg.data_timeout);
        let rest = self.env.rest.as_mut().expect("pushed above");
        let r = match rest.wait_data(deadline).await {
            Ok(d) => Reply::from_response(&d, "2.6.0"),
            Err(e) if e.is_timeout() => Reply::new(451, "4.4.2", "upstream timeout"),
            Err(e) => {
                tracing::info!(error = %e.detail(), "no data response");
                Reply::from_client_error(&e)
            }
        };
        // With a data response the cancel is a no-op; without one it must go.
        self.reset_tx().await;
        r
    }
}

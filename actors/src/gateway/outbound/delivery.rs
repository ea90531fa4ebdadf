//! `OutboundDelivery`: one actor per gateway transaction, running one SMTP/LMTP session to
//! the destination the router chose. The transaction feeds it envelope updates and body
//! chunks through channels (the body channel holds one chunk: flow control back to the
//! router's PUT) and gets every server reply back as a [`Report`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;
use koukan::config::{SmtpHostConfig, SmtpProtocol};
use koukan::{HostPort, Mailbox, Response};
use mail_send::SmtpClient;
use rustls::pki_types::ServerName;
use smtp_proto::{EXT_CHUNKING, EXT_PIPELINING, EXT_START_TLS, EhloResponse};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use super::pool::{IDLE_LIMIT, Key, Pool};
use super::smtp::{DotStuffer, combine_lmtp, mail_command, rcpt_command, to_response};
use super::stream::{SmtpStream, opportunistic_connector};

/// QUIT is a courtesy: never wait long for it.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);

/// STARTTLS policy towards the destination.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TlsPolicy {
    /// Use STARTTLS when offered; on refusal or handshake failure deliver in plaintext.
    #[default]
    Opportunistic,
    /// Never send STARTTLS.
    Disabled,
    /// Fail the attempt temporarily unless TLS is established.
    Required,
}

/// Envelope data that arrives after the session started (create, then PATCHes).
#[derive(Debug)]
pub enum Envelope {
    MailFrom(Mailbox),
    Rcpts(Vec<Mailbox>),
}

/// A piece of the message body; `last` ends it (the piece may then be empty).
#[derive(Debug)]
pub struct BodyChunk {
    pub data: Bytes,
    pub last: bool,
}

/// What the session tells its transaction.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub enum Report {
    /// Server replies (or responses that stand for them), one batch per SMTP step.
    Responses {
        mail: Option<Response>,
        rcpts: Vec<(usize, Response)>,
        data: Option<Response>,
    },
    /// The session is over. `error` fills every response still missing; `None` after
    /// success or cancellation.
    Ended { error: Option<Response> },
}

/// Asks the session to stop: QUIT politely, or drop the connection in the middle of DATA so
/// the server discards the partial message.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CancelDelivery;

pub struct DeliveryParams {
    pub host: Arc<SmtpHostConfig>,
    pub remote_host: Option<HostPort>,
    pub tls: TlsPolicy,
    pub report: Recipient<Report>,
    pub envelope: mpsc::UnboundedReceiver<Envelope>,
    pub body: mpsc::Receiver<BodyChunk>,
    /// Counts running sessions, so a shutdown can wait for their QUITs.
    pub live: Arc<AtomicUsize>,
}

pub struct OutboundDelivery {
    session: Option<Session>,
    cancel: watch::Sender<bool>,
}

impl OutboundDelivery {
    pub fn new(p: DeliveryParams) -> Self {
        let (cancel, cancel_rx) = watch::channel(false);
        p.live.fetch_add(1, Ordering::SeqCst);
        OutboundDelivery {
            session: Some(Session {
                timeout: p.host.timeout,
                host: p.host,
                remote_host: p.remote_host,
                tls: p.tls,
                report: p.report,
                envelope: p.envelope,
                body: p.body,
                cancel: cancel_rx,
                live: p.live,
                mail_from: None,
                mail_sent: false,
                rcpts: Vec::new(),
                rcpts_sent: 0,
                rcpts_ok: 0,
                committed: false,
            }),
            cancel,
        }
    }
}

impl Actor for OutboundDelivery {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Some(session) = self.session.take() {
            ctx.spawn(session.run().into_actor(self).map(|_, _, ctx| ctx.stop()));
        }
    }
}

impl Handler<CancelDelivery> for OutboundDelivery {
    type Result = ();

    fn handle(&mut self, _: CancelDelivery, _: &mut Self::Context) {
        self.cancel.send_replace(true);
    }
}

/// Why a session stopped early.
enum Stop {
    /// The router cancelled (or the transaction went away).
    Cancelled,
    /// Every missing response becomes this one.
    Fail(Response),
}

struct Conn {
    client: SmtpClient<SmtpStream>,
    ehlo: EhloResponse<String>,
    /// Inside DATA/BDAT: a QUIT would become message text.
    in_data: bool,
    /// The stream failed: do not try to QUIT.
    broken: bool,
    /// The last transaction ended with its data replies read: ready for the next MAIL.
    reusable: bool,
}

thread_local! {
    /// This arbiter's idle connections.
    static IDLE: std::cell::RefCell<Pool<Box<Conn>>> = std::cell::RefCell::new(Pool::default());
}

/// Parks a connection that is ready for another transaction, or ends it with QUIT.
async fn release(key: Key, c: Conn) {
    let c = match IDLE.with_borrow_mut(|p| p.put(key, Box::new(c))) {
        Ok(id) => {
            actix_rt::spawn(async move {
                actix_rt::time::sleep(IDLE_LIMIT).await;
                if let Some(c) = IDLE.with_borrow_mut(|p| p.expire(&key, id)) {
                    quit(*c).await;
                }
            });
            return;
        }
        Err(c) => *c,
    };
    quit(c).await;
}

/// Courtesy QUIT; its reply does not matter.
async fn quit(mut c: Conn) {
    let _ = tokio::time::timeout(QUIT_TIMEOUT, c.client.cmd(b"QUIT\r\n")).await;
    let _ = tokio::time::timeout(QUIT_TIMEOUT, c.client.stream.shutdown()).await;
}

struct Session {
    host: Arc<SmtpHostConfig>,
    remote_host: Option<HostPort>,
    tls: TlsPolicy,
    timeout: Duration,
    report: Recipient<Report>,
    envelope: mpsc::UnboundedReceiver<Envelope>,
    body: mpsc::Receiver<BodyChunk>,
    cancel: watch::Receiver<bool>,
    live: Arc<AtomicUsize>,
    mail_from: Option<Mailbox>,
    mail_sent: bool,
    rcpts: Vec<Mailbox>,
    rcpts_sent: usize,
    rcpts_ok: usize,
    /// Something was reported to the transaction, or a body chunk taken: the attempt
    /// can no longer start over on another connection.
    committed: bool,
}

enum Input {
    Envelope(Envelope),
    Body(BodyChunk),
}

fn io_failure(what: &str, e: impl std::fmt::Display) -> Stop {
    Stop::Fail(Response::new(450, format!("4.4.2 {what}: {e}")))
}

fn mail_error(e: mail_send::Error) -> String {
    match e {
        mail_send::Error::Timeout => "timeout".into(),
        mail_send::Error::UnparseableReply => "connection closed or unparseable reply".into(),
        other => other.to_string(),
    }
}

impl Session {
    async fn run(mut self) {
        let mut conn = None;
        let result = self.deliver(&mut conn).await;
        if let Some(c) = conn
            && !c.in_data
            && !c.broken
        {
            match (&result, self.pool_key()) {
                (Ok(()), Ok(key)) if c.reusable => release(key, c).await,
                _ => quit(c).await,
            }
        }
        let error = match result {
            Ok(()) | Err(Stop::Cancelled) => None,
            Err(Stop::Fail(r)) => Some(r),
        };
        self.report.do_send(Report::Ended { error });
        self.live.fetch_sub(1, Ordering::SeqCst);
    }

    fn send_report(
        &mut self,
        mail: Option<Response>,
        rcpts: Vec<(usize, Response)>,
        data: Option<Response>,
    ) {
        self.committed = true;
        self.report.do_send(Report::Responses { mail, rcpts, data });
    }

    fn pool_key(&self) -> Result<Key, Stop> {
        Ok(Key {
            addr: self.remote_addr()?,
            host: Arc::as_ptr(&self.host) as usize,
            tls: self.tls,
        })
    }

    async fn cancelled(&self) {
        let mut cancel = self.cancel.clone();
        // A dropped sender (actor gone) also means stop.
        let _ = cancel.wait_for(|c| *c).await;
    }

    fn remote_addr(&self) -> Result<SocketAddr, Stop> {
        let bad = |m: &str| {
            Stop::Fail(Response::new(
                400,
                format!("SmtpEndpoint: bad request: {m}"),
            ))
        };
        let h = self
            .remote_host
            .as_ref()
            .ok_or_else(|| bad("no remote_host"))?;
        let ip: IpAddr = h
            .host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| bad("remote_host.host is not a valid IP address"))?;
        Ok(SocketAddr::new(ip, h.port))
    }

    async fn deliver(&mut self, conn: &mut Option<Conn>) -> Result<(), Stop> {
        let addr = self.remote_addr()?;
        let key = self.pool_key()?;
        if let Some(c) = IDLE.with_borrow_mut(|p| p.take(&key)) {
            let mut c = *c;
            c.reusable = false;
            let r = self.transaction(&mut c).await;
            if r.is_ok() || !c.broken || self.committed {
                *conn = Some(c);
                return r;
            }
            // The server closed the idle connection before answering anything: nothing
            // was reported or consumed, so start over on a new one.
            tracing::debug!(%addr, "cached connection was closed; reconnecting");
            self.mail_sent = false;
            self.rcpts_sent = 0;
            self.rcpts_ok = 0;
        }
        let use_tls = self.tls != TlsPolicy::Disabled;
        *conn = Some(match self.connect(addr, use_tls).await {
            Ok(c) => c,
            // Opportunistic TLS whose handshake failed: the connection is unusable, so
            // start over in plaintext.
            Err(Retry::Plaintext(_half_open)) => match self.connect(addr, false).await {
                Ok(c) => c,
                Err(Retry::Stop(s, c)) => {
                    *conn = c;
                    return Err(s);
                }
                Err(Retry::Plaintext(_)) => unreachable!("no TLS attempted"),
            },
            Err(Retry::Stop(s, c)) => {
                *conn = c;
                return Err(s);
            }
        });
        let c = conn.as_mut().expect("connected");
        self.transaction(c).await
    }

    /// Connect, greeting, EHLO/LHLO, STARTTLS and EHLO again.
    async fn connect(&mut self, addr: SocketAddr, use_tls: bool) -> Result<Conn, Retry> {
        let tcp = tokio::select! {
            r = tokio::time::timeout(self.timeout, TcpStream::connect(addr)) => match r {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    return Err(Retry::Stop(
                        Stop::Fail(Response::new(400, format!("connect error {e}"))),
                        None,
                    ));
                }
                Err(_) => {
                    return Err(Retry::Stop(
                        Stop::Fail(Response::new(400, "connect error: timeout")),
                        None,
                    ));
                }
            },
            _ = self.cancelled() => return Err(Retry::Stop(Stop::Cancelled, None)),
        };
        let _ = tcp.set_nodelay(true);
        let mut c = Conn {
            client: SmtpClient {
                stream: SmtpStream::Plain(tcp),
                timeout: self.timeout,
            },
            ehlo: EhloResponse::default(),
            in_data: false,
            broken: false,
            reusable: false,
        };
        macro_rules! fail {
            ($stop:expr) => {
                return Err(Retry::Stop($stop, Some(c)))
            };
        }
        let greeting = match self.read_reply(&mut c, "greeting").await {
            Ok(r) => r,
            Err(s) => fail!(s),
        };
        if !(200..300).contains(&greeting.code) {
            fail!(self.mail_failed(to_response(&greeting)));
        }
        match self.hello(&mut c).await {
            Ok(()) => {}
            Err(s) => fail!(s),
        }
        let offered = c.ehlo.capabilities & EXT_START_TLS != 0;
        if use_tls && offered {
            let reply = match self.command(&mut c, "STARTTLS", b"STARTTLS\r\n").await {
                Ok(r) => r,
                Err(s) => fail!(s),
            };
            if reply.code == 220 {
                let SmtpStream::Plain(tcp) =
                    std::mem::replace(&mut c.client.stream, SmtpStream::Closed)
                else {
                    unreachable!("TLS is started once, on a plain stream")
                };
                let name = ServerName::IpAddress(addr.ip().into());
                let handshake = tokio::time::timeout(
                    self.timeout,
                    opportunistic_connector().connect(name, tcp),
                );
                let tls = tokio::select! {
                    r = handshake => r,
                    _ = self.cancelled() => fail!(Stop::Cancelled),
                };
                match tls {
                    Ok(Ok(s)) => c.client.stream = SmtpStream::Tls(Box::new(s)),
                    Ok(Err(e)) if self.tls == TlsPolicy::Required => {
                        c.broken = true;
                        fail!(self.mail_failed(Response::new(
                            450,
                            format!("4.7.0 TLS handshake failed: {e}")
                        )));
                    }
                    Err(_) if self.tls == TlsPolicy::Required => {
                        c.broken = true;
                        fail!(
                            self.mail_failed(Response::new(450, "4.7.0 TLS handshake timed out"))
                        );
                    }
                    Ok(Err(e)) => {
                        tracing::info!(%addr, "STARTTLS handshake failed ({e}); retrying in plaintext");
                        return Err(Retry::Plaintext(c));
                    }
                    Err(_) => {
                        tracing::info!(%addr, "STARTTLS handshake timed out; retrying in plaintext");
                        return Err(Retry::Plaintext(c));
                    }
                }
                if let Err(s) = self.hello(&mut c).await {
                    fail!(s);
                }
            } else if self.tls == TlsPolicy::Required {
                fail!(self.mail_failed(to_response(&reply)));
            } else {
                tracing::info!(%addr, code = reply.code, "STARTTLS refused; continuing in plaintext");
            }
        } else if self.tls == TlsPolicy::Required {
            fail!(self.mail_failed(Response::new(450, "4.7.0 STARTTLS not offered")));
        }
        Ok(c)
    }

    /// A failure before or at MAIL: it is the mail response; everything else fails on it.
    fn mail_failed(&mut self, r: Response) -> Stop {
        self.send_report(Some(r), Vec::new(), None);
        self.mail_sent = true;
        Stop::Fail(Response::new(503, "5.5.1 failed precondition: MAIL"))
    }

    async fn hello(&mut self, c: &mut Conn) -> Result<(), Stop> {
        let lmtp = self.host.protocol == SmtpProtocol::Lmtp;
        let name = self.host.ehlo_host.clone();
        let mut cancel = self.cancel.clone();
        let r = tokio::select! {
            r = async {
                if lmtp { c.client.lhlo(&name).await } else { c.client.ehlo(&name).await }
            } => r,
            _ = cancel.wait_for(|c| *c) => return Err(Stop::Cancelled),
        };
        match r {
            Ok(ehlo) => {
                c.ehlo = ehlo;
                Ok(())
            }
            Err(mail_send::Error::UnexpectedReply(reply)) => {
                Err(self.mail_failed(to_response(&reply)))
            }
            Err(e) => {
                c.broken = true;
                Err(io_failure("EHLO", mail_error(e)))
            }
        }
    }

    async fn read_reply(
        &mut self,
        c: &mut Conn,
        what: &str,
    ) -> Result<smtp_proto::Response<String>, Stop> {
        let client = &mut c.client;
        let mut cancel = self.cancel.clone();
        let r = tokio::select! {
            r = tokio::time::timeout(self.timeout, client.read()) => r,
            _ = cancel.wait_for(|c| *c) => return Err(Stop::Cancelled),
        };
        match r {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                c.broken = true;
                Err(io_failure(what, mail_error(e)))
            }
            Err(_) => {
                c.broken = true;
                Err(io_failure(what, "timeout"))
            }
        }
    }

    async fn command(
        &mut self,
        c: &mut Conn,
        what: &str,
        cmd: &[u8],
    ) -> Result<smtp_proto::Response<String>, Stop> {
        let mut cancel = self.cancel.clone();
        let r = tokio::select! {
            r = c.client.cmd(cmd) => r,
            _ = cancel.wait_for(|c| *c) => return Err(Stop::Cancelled),
        };
        r.map_err(|e| {
            c.broken = true;
            io_failure(what, mail_error(e))
        })
    }

    async fn next_input(&mut self) -> Result<Input, Stop> {
        let mut cancel = self.cancel.clone();
        // Envelope first: a PATCH always happens-before the PUT that follows it.
        tokio::select! {
            biased;
            _ = cancel.wait_for(|c| *c) => Err(Stop::Cancelled),
            e = self.envelope.recv() => e.map(Input::Envelope).ok_or(Stop::Cancelled),
            b = self.body.recv() => b.map(Input::Body).ok_or(Stop::Cancelled),
        }
    }

    fn take_envelope(&mut self, e: Envelope) {
        match e {
            Envelope::MailFrom(m) => {
                if self.mail_from.is_none() {
                    self.mail_from = Some(m);
                }
            }
            Envelope::Rcpts(r) => self.rcpts.extend(r),
        }
    }

    /// MAIL, RCPTs as they arrive, then the body.
    async fn transaction(&mut self, c: &mut Conn) -> Result<(), Stop> {
        let mut first_chunk = None;
        loop {
            // Whatever is already queued joins this round (one pipelined batch).
            while let Ok(e) = self.envelope.try_recv() {
                self.take_envelope(e);
            }
            if self.mail_from.is_some() && (!self.mail_sent || self.rcpts_sent < self.rcpts.len()) {
                self.send_envelope(c).await?;
            }
            if self.mail_sent
                && self.rcpts_sent > 0
                && self.rcpts_sent == self.rcpts.len()
                && self.rcpts_ok == 0
            {
                // Nothing can be delivered: hang up now rather than hold the connection.
                return Err(Stop::Fail(Response::new(
                    554,
                    "5.5.1 no valid recipients (SmtpEndpoint)",
                )));
            }
            if let Some(chunk) = first_chunk.take() {
                if self.rcpts_ok == 0 {
                    return Err(Stop::Fail(Response::new(
                        554,
                        "5.5.1 no valid recipients (SmtpEndpoint)",
                    )));
                }
                return self.send_body(c, chunk).await;
            }
            match self.next_input().await? {
                Input::Envelope(e) => self.take_envelope(e),
                Input::Body(chunk) => {
                    self.committed = true;
                    first_chunk = Some(chunk);
                }
            }
        }
    }

    /// Sends MAIL (once) and the recipients not sent yet; pipelined when offered.
    async fn send_envelope(&mut self, c: &mut Conn) -> Result<(), Stop> {
        let mut cmds: Vec<String> = Vec::new();
        let mut local: Vec<(usize, Response)> = Vec::new();
        let mut sent_rcpts: Vec<usize> = Vec::new();
        let send_mail = !self.mail_sent;
        if send_mail {
            let from = self.mail_from.clone().expect("checked by caller");
            match mail_command(&from, &c.ehlo) {
                Ok(cmd) => cmds.push(cmd),
                Err(r) => return Err(self.mail_failed(r)),
            }
            self.mail_sent = true;
        }
        for i in self.rcpts_sent..self.rcpts.len() {
            match rcpt_command(&self.rcpts[i], &c.ehlo) {
                Ok(cmd) => {
                    cmds.push(cmd);
                    sent_rcpts.push(i);
                }
                Err(r) => local.push((i, r)),
            }
        }
        self.rcpts_sent = self.rcpts.len();
        let pipelining = c.ehlo.capabilities & EXT_PIPELINING != 0;
        let replies = if pipelining && cmds.len() > 1 {
            // One write: the whole batch goes out in as few packets as possible.
            let batch = cmds.concat();
            let n = cmds.len();
            let client = &mut c.client;
            let exchange = async {
                client.stream.write_all(batch.as_bytes()).await?;
                client.stream.flush().await?;
                client.read_many(n).await
            };
            let mut cancel = self.cancel.clone();
            let r = tokio::select! {
                r = tokio::time::timeout(self.timeout, exchange) => r,
                _ = cancel.wait_for(|c| *c) => return Err(Stop::Cancelled),
            };
            match r {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    c.broken = true;
                    return Err(io_failure("MAIL/RCPT", mail_error(e)));
                }
                Err(_) => {
                    c.broken = true;
                    return Err(io_failure("MAIL/RCPT", "timeout"));
                }
            }
        } else {
            let mut out = Vec::with_capacity(cmds.len());
            for (n, cmd) in cmds.iter().enumerate() {
                let r = self.command(c, "MAIL/RCPT", cmd.as_bytes()).await?;
                let mail_refused = send_mail && n == 0 && !(200..300).contains(&r.code);
                out.push(r);
                if mail_refused {
                    break;
                }
            }
            out
        };
        let mut replies = replies.iter().map(to_response);
        let mail = if send_mail { replies.next() } else { None };
        if let Some(m) = &mail
            && !m.ok()
        {
            return Err(self.mail_failed(m.clone()));
        }
        let mut rcpts = local;
        for (i, r) in sent_rcpts.into_iter().zip(replies) {
            if r.ok() {
                self.rcpts_ok += 1;
            }
            rcpts.push((i, r));
        }
        self.send_report(mail, rcpts, None);
        Ok(())
    }

    /// The body: BDAT chunks when offered and enabled, else DATA with dot-stuffing.
    async fn send_body(&mut self, c: &mut Conn, first: BodyChunk) -> Result<(), Stop> {
        let bdat = self.host.enable_bdat && c.ehlo.capabilities & EXT_CHUNKING != 0;
        let piece = self.host.chunk_size.max(1);
        let mut chunk = first;
        let mut stuffer = DotStuffer::default();
        let mut buf: Vec<u8> = Vec::with_capacity(if bdat { 64 } else { piece + piece / 8 + 8 });
        if !bdat {
            let r = self.command(c, "DATA", b"DATA\r\n").await?;
            if r.code != 354 {
                // The server refused the body: that is its data response.
                self.send_report(None, Vec::new(), Some(to_response(&r)));
                return Ok(());
            }
        }
        c.in_data = true;
        loop {
            let data = chunk.data;
            let n_pieces = data.len().div_ceil(piece).max(1);
            for k in 0..n_pieces {
                let part =
                    data.slice((k * piece).min(data.len())..((k + 1) * piece).min(data.len()));
                let last = chunk.last && k + 1 == n_pieces;
                if bdat {
                    if part.is_empty() && !last {
                        continue;
                    }
                    buf.clear();
                    buf.extend_from_slice(
                        format!("BDAT {}{}\r\n", part.len(), if last { " LAST" } else { "" })
                            .as_bytes(),
                    );
                    let stream = &mut c.client.stream;
                    let write = async {
                        stream.write_all(&buf).await?;
                        stream.write_all(&part).await?;
                        stream.flush().await
                    };
                    let fut = write;
                    let mut cancel = self.cancel.clone();
                    let r = tokio::select! {
                        r = tokio::time::timeout(self.timeout, fut) => r,
                        _ = cancel.wait_for(|c| *c) => return Err(Stop::Cancelled),
                    };
                    match r {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            c.broken = true;
                            return Err(io_failure("BDAT", e));
                        }
                        Err(_) => {
                            c.broken = true;
                            return Err(io_failure("BDAT", "timeout"));
                        }
                    }
                    if last {
                        return self.data_replies(c).await;
                    }
                    let r = self.read_reply(c, "BDAT").await?;
                    if !(200..300).contains(&r.code) {
                        // The server refuses the rest; it is no longer inside the message.
                        c.in_data = false;
                        self.send_report(None, Vec::new(), Some(to_response(&r)));
                        return Ok(());
                    }
                } else {
                    buf.clear();
                    stuffer.stuff(&part, &mut buf);
                    if last {
                        buf.extend_from_slice(stuffer.terminator());
                    }
                    let stream = &mut c.client.stream;
                    let write = async {
                        stream.write_all(&buf).await?;
                        if last {
                            stream.flush().await?;
                        }
                        Ok::<(), std::io::Error>(())
                    };
                    let mut cancel = self.cancel.clone();
                    let r = tokio::select! {
                        r = tokio::time::timeout(self.timeout, write) => r,
                        _ = cancel.wait_for(|c| *c) => return Err(Stop::Cancelled),
                    };
                    match r {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            c.broken = true;
                            return Err(io_failure("DATA", e));
                        }
                        Err(_) => {
                            c.broken = true;
                            return Err(io_failure("DATA", "timeout"));
                        }
                    }
                    if last {
                        return self.data_replies(c).await;
                    }
                }
            }
            if !bdat {
                // Let the server see what we have while we wait for the router.
                let _ = c.client.stream.flush().await;
            }
            chunk = loop {
                match self.next_input().await? {
                    Input::Body(b) => break b,
                    // Recipients after the body has started cannot be sent any more.
                    Input::Envelope(Envelope::Rcpts(r)) => {
                        let start = self.rcpts.len();
                        self.rcpts.extend(r);
                        self.rcpts_sent = self.rcpts.len();
                        let refused = (start..self.rcpts.len())
                            .map(|i| (i, Response::new(503, "5.5.1 recipient after the body")))
                            .collect();
                        self.send_report(None, refused, None);
                    }
                    Input::Envelope(Envelope::MailFrom(_)) => {}
                }
            };
        }
    }

    /// The reply to the end of the body: one, or one per accepted recipient in LMTP.
    async fn data_replies(&mut self, c: &mut Conn) -> Result<(), Stop> {
        let n = if self.host.protocol == SmtpProtocol::Lmtp {
            self.rcpts_ok.max(1)
        } else {
            1
        };
        let replies = if n == 1 {
            vec![self.read_reply(c, "data response").await?]
        } else {
            let client = &mut c.client;
            let fut = client.read_many(n);
            let mut cancel = self.cancel.clone();
            let r = tokio::select! {
                r = tokio::time::timeout(self.timeout, fut) => r,
                _ = cancel.wait_for(|c| *c) => return Err(Stop::Cancelled),
            };
            match r {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    c.broken = true;
                    return Err(io_failure("data response", mail_error(e)));
                }
                Err(_) => {
                    c.broken = true;
                    return Err(io_failure("data response", "timeout"));
                }
            }
        };
        c.in_data = false;
        c.reusable = true;
        let replies: Vec<Response> = replies.iter().map(to_response).collect();
        self.send_report(None, Vec::new(), Some(combine_lmtp(&replies)));
        Ok(())
    }
}

enum Retry {
    /// STARTTLS handshake failed under the opportunistic policy.
    Plaintext(Conn),
    Stop(Stop, Option<Conn>),
}

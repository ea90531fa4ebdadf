//! One SMTP connection: the actor that owns it, the buffered connection, the command
//! loop and the transaction state shared by the command stages.

use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use actix::{Actor, ActorContext, ActorFutureExt, AsyncContext, Context, WrapFuture};
use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use koukan::HostPort;
use smtp_proto::{Error as ParseError, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::data::Body;
use super::reply::Reply;
use super::{Service, SessionGuard};
use crate::client::{ClientError, RestTransaction};

/// Longest command line read (AUTH initial responses may be long, RFC 4954 §4).
pub(super) const MAX_AUTH_LINE: usize = 12288;
/// Longest command line accepted: 512 octets (RFC 5321 §4.5.3.1.4) plus the SIZE and
/// SMTPUTF8 allowances of RFC 1870 and RFC 6531.
const MAX_COMMAND_LINE: usize = 512 + 26 + 10;
/// Unrecognized commands tolerated before the connection is closed.
const MAX_UNKNOWN_COMMANDS: u32 = 5;
/// Room made in the input buffer before each read.
const READ_SIZE: usize = 64 * 1024;
/// Time allowed to send the final reply when the session ends.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(5);

/// A byte stream the session can run on: plain TCP, or TLS over it.
pub(super) trait Io: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> Io for T {}

/// Stands in for the stream while it is being upgraded to TLS.
struct Detached;

impl AsyncRead for Detached {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Ready(Err(io::ErrorKind::NotConnected.into()))
    }
}

impl AsyncWrite for Detached {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
        _: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::ErrorKind::NotConnected.into()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The connection with its input buffer and pending replies.
pub(super) struct Conn {
    pub io: Box<dyn Io>,
    pub rbuf: BytesMut,
    pub wbuf: Vec<u8>,
    /// Discarding the rest of an overlong line.
    discarding: bool,
}

impl Conn {
    fn new(io: Box<dyn Io>) -> Conn {
        Conn {
            io,
            rbuf: BytesMut::with_capacity(READ_SIZE),
            wbuf: Vec::with_capacity(1024),
            discarding: false,
        }
    }

    pub fn detach(&mut self) -> Box<dyn Io> {
        std::mem::replace(&mut self.io, Box::new(Detached))
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.wbuf.is_empty() {
            self.io.write_all(&self.wbuf).await?;
            self.wbuf.clear();
            self.io.flush().await?;
        }
        Ok(())
    }

    /// The complete command lines already received (pipelined), without taking them;
    /// stops at the first overlong one.
    pub fn peek_lines(&self) -> impl Iterator<Item = &[u8]> {
        let mut rest: &[u8] = if self.discarding { &[] } else { &self.rbuf };
        std::iter::from_fn(move || {
            let pos = rest.iter().position(|&b| b == b'\n')?;
            let (line, after) = rest.split_at(pos + 1);
            rest = after;
            (line.len() <= MAX_COMMAND_LINE).then_some(line)
        })
    }

    /// Drops the next line (the first [`peek_lines`](Self::peek_lines) gave, now handled).
    pub fn skip_line(&mut self) {
        if let Some(pos) = self.rbuf.iter().position(|&b| b == b'\n') {
            let _ = self.rbuf.split_to(pos + 1);
        }
    }

    /// A complete line from the buffer, if there is one. `TooLong` once per overlong
    /// line, after its end was seen.
    fn take_line(&mut self, limit: usize) -> Option<Line> {
        match self.rbuf.iter().position(|&b| b == b'\n') {
            Some(pos) => {
                let line = self.rbuf.split_to(pos + 1).freeze();
                if std::mem::take(&mut self.discarding) || line.len() > limit {
                    Some(Line::TooLong)
                } else {
                    Some(Line::Ok(line))
                }
            }
            None => {
                if self.rbuf.len() > limit {
                    self.discarding = true;
                    self.rbuf.clear();
                }
                None
            }
        }
    }
}

pub(super) enum Line {
    /// Including its line ending.
    Ok(Bytes),
    TooLong,
}

/// Why a session ends.
#[derive(Debug)]
pub(super) enum Stop {
    /// The client closed the connection.
    Closed,
    Io(io::Error),
    /// No input for `command_timeout`.
    Timeout,
    Shutdown,
    /// QUIT, too many bad commands, or a failed TLS handshake: already answered.
    Done,
}

/// HELO/EHLO state.
pub(super) struct Helo {
    pub host: String,
    pub esmtp: bool,
}

/// The SMTP transaction in progress and its router transaction.
#[derive(Default)]
pub(super) struct Envelope {
    pub rest: Option<RestTransaction>,
    pub mail_ok: bool,
    /// Recipients sent to the router.
    pub rcpts: usize,
    pub rcpts_ok: usize,
    /// The router exchange broke: every later command of this transaction gets this.
    pub failed: Option<Reply>,
    /// BDAT chunks received so far.
    pub body: Option<Body>,
}

pub(super) struct Session {
    pub svc: Arc<Service>,
    pub conn: Conn,
    pub remote: Option<HostPort>,
    pub local: Option<HostPort>,
    pub tls: bool,
    pub helo: Option<Helo>,
    /// The authenticated user.
    pub auth: Option<String>,
    pub env: Envelope,
    unknown: u32,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

fn host_port(a: SocketAddr) -> HostPort {
    HostPort::new(a.ip().to_canonical().to_string(), a.port())
}

enum Wake {
    Read(io::Result<usize>),
    Idle,
    Heartbeat,
    Shutdown,
}

impl Session {
    async fn run(svc: Arc<Service>, stream: TcpStream, peer: SocketAddr) {
        let local = stream.local_addr().ok();
        let mut s = Session {
            shutdown: svc.shared.shutdown.clone(),
            conn: Conn::new(Box::new(stream)),
            remote: Some(host_port(peer)),
            local: local.map(host_port),
            tls: false,
            helo: None,
            auth: None,
            env: Envelope::default(),
            unknown: 0,
            svc,
        };
        let stop = match AssertUnwindSafe(s.serve()).catch_unwind().await {
            Ok(Ok(())) => Stop::Done,
            Ok(Err(stop)) => stop,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(peer = %peer, panic = %what, "SMTP session panicked");
                // Whatever was pending belongs to the broken command.
                s.conn.wbuf.clear();
                s.reply(421, "4.3.0", "internal error, closing connection");
                Stop::Done
            }
        };
        let host = s.svc.hostname.clone();
        match &stop {
            Stop::Timeout => s.reply(421, "4.4.2", format!("{host} timeout, closing connection")),
            Stop::Shutdown => s.reply(421, "4.3.2", format!("{host} shutting down")),
            Stop::Io(e) => tracing::debug!(peer = %peer, error = %e, "SMTP connection error"),
            Stop::Closed | Stop::Done => {}
        }
        // Nothing half-accepted stays behind: an open router transaction is cancelled.
        s.reset_tx().await;
        let _ = actix_rt::time::timeout(GOODBYE_TIMEOUT, async {
            let _ = s.conn.flush().await;
            let _ = s.conn.io.shutdown().await;
        })
        .await;
    }

    async fn serve(&mut self) -> Result<(), Stop> {
        if let Some(t) = self.svc.cfg.proxy_protocol_timeout {
            self.read_proxy_header(t).await?;
        }
        if self.svc.cfg.smtps {
            self.accept_tls().await?;
        }
        let host = self.svc.hostname.clone();
        self.reply(220, "", format!("{host} ESMTP koukan smtp gateway"));
        loop {
            let line = match self.read_line(MAX_AUTH_LINE, true).await? {
                Line::Ok(l) => l,
                Line::TooLong => {
                    self.reply(500, "5.5.2", "Command line too long");
                    continue;
                }
            };
            self.command(line).await?;
            if *self.shutdown.borrow() {
                return Err(Stop::Shutdown);
            }
        }
    }

    pub fn reply(&mut self, code: u16, esc: &str, text: impl Into<String>) {
        Reply::new(code, esc, text).write(&mut self.conn.wbuf);
    }

    pub fn send(&mut self, r: &Reply) {
        r.write(&mut self.conn.wbuf);
    }

    /// Waits for more input, flushing pending replies first. Sends heartbeats for an
    /// open router transaction meanwhile; `command` lets a shutdown interrupt the wait.
    pub async fn fill(&mut self, command: bool) -> Result<(), Stop> {
        self.conn.flush().await.map_err(Stop::Io)?;
        let idle_deadline = tokio::time::Instant::now() + self.svc.cfg.command_timeout;
        loop {
            let heartbeat = self
                .env
                .rest
                .as_ref()
                .and_then(RestTransaction::heartbeat_due)
                .map(tokio::time::Instant::from_std);
            // Without spare room BytesMut would grow by a few bytes per read.
            self.conn.rbuf.reserve(READ_SIZE);
            let wake = {
                let read = self.conn.io.read_buf(&mut self.conn.rbuf);
                let shutdown = self.shutdown.wait_for(|s| *s);
                tokio::select! {
                    r = read => Wake::Read(r),
                    _ = tokio::time::sleep_until(idle_deadline) => Wake::Idle,
                    _ = tokio::time::sleep_until(heartbeat.unwrap_or(idle_deadline)),
                        if heartbeat.is_some() => Wake::Heartbeat,
                    _ = shutdown, if command => Wake::Shutdown,
                }
            };
            match wake {
                Wake::Read(Ok(0)) => return Err(Stop::Closed),
                Wake::Read(Ok(_)) => return Ok(()),
                Wake::Read(Err(e)) => return Err(Stop::Io(e)),
                Wake::Idle => return Err(Stop::Timeout),
                Wake::Shutdown => return Err(Stop::Shutdown),
                Wake::Heartbeat => self.heartbeat().await,
            }
        }
    }

    /// The next line; `command` marks a wait between commands.
    pub async fn read_line(&mut self, limit: usize, command: bool) -> Result<Line, Stop> {
        loop {
            if let Some(l) = self.conn.take_line(limit) {
                return Ok(l);
            }
            self.fill(command).await?;
        }
    }

    /// Empty PATCH for the open transaction; a failure ends that transaction.
    pub async fn heartbeat(&mut self) {
        let Some(t) = self.env.rest.as_mut() else {
            return;
        };
        if let Err(e) = t.heartbeat().await {
            self.fail_tx(&e).await;
        }
    }

    /// The router exchange of this transaction broke: cancel it and answer 4xx to the
    /// rest of the transaction until RSET or a new MAIL.
    pub async fn fail_tx(&mut self, e: &ClientError) -> Reply {
        tracing::info!(error = %e.detail(), "router transaction failed");
        let r = Reply::from_client_error(e);
        if let Some(mut t) = self.env.rest.take() {
            t.cancel().await;
        }
        self.env.failed = Some(r.clone());
        r
    }

    /// Ends the SMTP transaction, cancelling its router transaction unless it already
    /// has a data response.
    pub async fn reset_tx(&mut self) {
        if let Some(mut t) = self.env.rest.take() {
            t.cancel().await;
        }
        self.env = Envelope::default();
    }

    /// A deadline `d` from now.
    pub fn deadline(d: Duration) -> Instant {
        Instant::now() + d
    }

    async fn command(&mut self, line: Bytes) -> Result<(), Stop> {
        let verb: String = line
            .iter()
            .take_while(|b| b.is_ascii_alphabetic())
            .map(|b| b.to_ascii_uppercase() as char)
            .collect();
        if verb != "AUTH" && line.len() > MAX_COMMAND_LINE {
            self.reply(500, "5.5.2", "Command line too long");
            return Ok(());
        }
        let parsed = Request::parse(&mut line.iter());
        match parsed {
            Ok(Request::Ehlo { host }) => self.ehlo(host.into_owned(), true).await,
            Ok(Request::Helo { host }) => self.ehlo(host.into_owned(), false).await,
            Ok(Request::Mail { from }) => self.mail(from, &line).await,
            Ok(Request::Rcpt { to }) => self.rcpt(to, &line).await,
            Ok(Request::Data) => return self.data().await,
            Ok(Request::Bdat {
                chunk_size,
                is_last,
            }) => return self.bdat(chunk_size, is_last).await,
            Ok(Request::Rset) => {
                self.reset_tx().await;
                self.reply(250, "2.0.0", "ok");
            }
            Ok(Request::Quit) => {
                self.reset_tx().await;
                self.reply(221, "2.0.0", "ok");
                return Err(Stop::Done);
            }
            Ok(Request::Noop { .. }) => self.reply(250, "2.0.0", "OK"),
            Ok(Request::Vrfy { .. }) => self.reply(
                252,
                "2.5.0",
                "Cannot VRFY user, but will accept message and attempt delivery",
            ),
            Ok(Request::Help { .. }) => self.help(),
            Ok(Request::StartTls) => return self.starttls().await,
            Ok(Request::Auth {
                mechanism,
                initial_response,
            }) => return self.auth(mechanism, initial_response.into_owned()).await,
            Ok(
                Request::Expn { .. }
                | Request::Etrn { .. }
                | Request::Atrn { .. }
                | Request::Burl { .. },
            ) => self.reply(502, "5.5.1", format!("{verb} not implemented")),
            Ok(Request::Lhlo { .. }) | Err(ParseError::UnknownCommand) => {
                return self.unknown(&verb);
            }
            Err(ParseError::SyntaxError { .. }) if verb == "AUTH" => {
                self.reply(504, "5.5.4", "Unrecognized authentication type")
            }
            Err(ParseError::SyntaxError { syntax }) => {
                self.reply(501, "5.5.4", format!("Syntax: {syntax}"))
            }
            Err(ParseError::InvalidSenderAddress) => {
                self.reply(553, "5.1.7", "Error: malformed address")
            }
            Err(ParseError::InvalidRecipientAddress) => {
                self.reply(553, "5.1.3", "Error: malformed address")
            }
            Err(ParseError::InvalidParameter { param: "BODY" }) => self.reply(
                501,
                "5.5.4",
                "Error: BODY can only be one of 7BIT, 8BITMIME",
            ),
            Err(ParseError::InvalidParameter { param }) => {
                self.reply(501, "5.5.4", format!("Error: invalid {param} parameter"))
            }
            Err(ParseError::UnsupportedParameter { .. }) => {
                let which = if verb == "RCPT" {
                    "RCPT TO"
                } else {
                    "MAIL FROM"
                };
                self.reply(
                    555,
                    "5.5.4",
                    format!("{which} parameters not recognized or not implemented"),
                )
            }
            Err(_) => self.reply(500, "5.5.2", "Error: bad syntax"),
        }
        Ok(())
    }

    fn unknown(&mut self, verb: &str) -> Result<(), Stop> {
        self.unknown += 1;
        if self.unknown >= MAX_UNKNOWN_COMMANDS {
            self.reply(502, "5.5.1", "Too many unrecognized commands, goodbye.");
            return Err(Stop::Done);
        }
        if verb.is_empty() {
            self.reply(500, "5.5.2", "Error: bad syntax");
        } else {
            self.reply(
                500,
                "5.5.2",
                format!("Error: command \"{verb}\" not recognized"),
            );
        }
        Ok(())
    }
}

/// The per-connection actor. Its only job is to own the session task, so that a
/// connection is an actor like everything else in the process; the task catches its
/// own panics and answers 421.
pub(super) struct SessionActor {
    start: Option<(Arc<Service>, std::net::TcpStream, SocketAddr, SessionGuard)>,
}

impl SessionActor {
    pub fn new(
        svc: Arc<Service>,
        stream: std::net::TcpStream,
        peer: SocketAddr,
        guard: SessionGuard,
    ) -> SessionActor {
        SessionActor {
            start: Some((svc, stream, peer, guard)),
        }
    }
}

impl Actor for SessionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let Some((svc, stream, peer, guard)) = self.start.take() else {
            return;
        };
        let session = async move {
            let _guard = guard;
            match TcpStream::from_std(stream) {
                Ok(s) => Session::run(svc, s, peer).await,
                Err(e) => tracing::warn!(error = %e, "cannot register SMTP connection"),
            }
        };
        ctx.spawn(session.into_actor(self).map(|_, _, ctx| ctx.stop()));
    }
}

//! `koukan sink`: an SMTP/LMTP server that accepts, counts and optionally saves or prints
//! every message (the fake SMTP sink of `tools.md` §2), fast enough to be the target of a
//! load test: one task per connection, replies batched per read (PIPELINING), CHUNKING, no
//! disk I/O unless `--dir`.
//!
//! Tests start it in-process with [`Sink::start`] and inspect [`Sink::messages`] and
//! [`Sink::sessions`].
//!
//! Scripted failures as in the original: recipients beginning with `rcpttemp` get 450,
//! `rcptperm` 550, `rcpttimeout` a one-hour stall; with a single accepted recipient
//! beginning with `datatemp`/`dataperm`/`datatimeout` the data response is 450/550/a stall.
//! `--fail-rcpt` and `--temp-fail` add glob patterns (`*` wildcard, case-insensitive).

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use smtp_proto::request::receiver::DataReceiver;
use smtp_proto::{RcptTo, Request};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio_rustls::TlsAcceptor;

/// Advertised SIZE limit.
const MAX_SIZE: usize = 33_554_432;
/// Longest command line accepted.
const MAX_LINE: usize = 4096;
/// Idle time before a silent client is dropped.
const IDLE: Duration = Duration::from_secs(300);
/// The scripted "timeout" cases stall this long.
const STALL: Duration = Duration::from_secs(3600);

#[derive(Debug, Error)]
pub enum SinkError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("--dir {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
}

/// STARTTLS behaviour.
#[derive(Clone, Default)]
pub enum StartTls {
    /// Not advertised.
    #[default]
    Off,
    /// Advertised and performed with this configuration.
    On(Arc<rustls::ServerConfig>),
    /// Advertised, then refused with 454.
    Refuse,
    /// Advertised, answered 220, then the connection is dropped (a failed handshake).
    Break,
}

impl std::fmt::Debug for StartTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StartTls::Off => "Off",
            StartTls::On(_) => "On",
            StartTls::Refuse => "Refuse",
            StartTls::Break => "Break",
        })
    }
}

#[derive(Clone, Debug)]
pub struct SinkOptions {
    pub listen: SocketAddr,
    pub lmtp: bool,
    /// Save each message (and its envelope) here, synced before the reply.
    pub dir: Option<PathBuf>,
    /// Print each envelope and message to stdout.
    pub print: bool,
    pub fail_rcpt: Vec<String>,
    pub temp_fail: Vec<String>,
    pub pipelining: bool,
    pub chunking: bool,
    pub starttls: StartTls,
    pub hostname: String,
    /// Keep messages and session logs in memory (tests).
    pub keep: bool,
}

impl SinkOptions {
    pub fn new(listen: SocketAddr) -> Self {
        SinkOptions {
            listen,
            lmtp: false,
            dir: None,
            print: false,
            fail_rcpt: Vec::new(),
            temp_fail: Vec::new(),
            pipelining: true,
            chunking: true,
            starttls: StartTls::Off,
            hostname: "localhost".into(),
            keep: true,
        }
    }
}

/// A server TLS configuration from PEM files.
pub fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, SinkError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| SinkError::Tls(format!("{}: {e}", cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| SinkError::Tls(format!("{}: {e}", key.display())))?;
    let cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| SinkError::Tls(e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// One accepted message.
#[derive(Clone, Debug)]
pub struct Received {
    pub ehlo: String,
    pub tls: bool,
    pub mail_from: String,
    /// MAIL parameters as sent (`SIZE=100`).
    pub mail_params: Vec<String>,
    /// Accepted recipients.
    pub rcpt_to: Vec<String>,
    pub rcpt_params: Vec<Vec<String>>,
    pub data: Vec<u8>,
    /// RCPT arrived in the same read as MAIL (the client pipelined).
    pub pipelined: bool,
    pub bdat: bool,
}

/// What one connection did.
#[derive(Clone, Debug, Default)]
pub struct SessionLog {
    pub peer: Option<SocketAddr>,
    pub ehlo: Option<String>,
    pub tls: bool,
    /// Command verbs in order (`EHLO`, `MAIL`, `RCPT`, `DATA`, `BDAT`, `QUIT`...).
    pub commands: Vec<String>,
    pub messages: usize,
    pub quit: bool,
    pub closed: bool,
}

struct Shared {
    opts: SinkOptions,
    count: AtomicU64,
    seq: AtomicU64,
    messages: Mutex<Vec<Received>>,
    sessions: Mutex<Vec<SessionLog>>,
    changed: watch::Sender<u64>,
    acceptor: Option<TlsAcceptor>,
}

/// A running sink.
pub struct Sink {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
}

impl Sink {
    /// Binds and starts accepting in the background (current tokio runtime).
    pub async fn start(opts: SinkOptions) -> Result<Sink, SinkError> {
        let listener =
            TcpListener::bind(opts.listen)
                .await
                .map_err(|source| SinkError::Listen {
                    addr: opts.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| SinkError::Listen {
            addr: opts.listen,
            source,
        })?;
        if let Some(d) = &opts.dir {
            std::fs::create_dir_all(d).map_err(|source| SinkError::Dir {
                path: d.clone(),
                source,
            })?;
        }
        let acceptor = match &opts.starttls {
            StartTls::On(cfg) => Some(TlsAcceptor::from(cfg.clone())),
            _ => None,
        };
        let shared = Arc::new(Shared {
            opts,
            count: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            messages: Mutex::default(),
            sessions: Mutex::default(),
            changed: watch::channel(0).0,
            acceptor,
        });
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(accept_loop(listener, shared.clone(), stop_rx));
        Ok(Sink { addr, shared, stop })
    }

    /// Messages accepted so far.
    pub fn count(&self) -> u64 {
        self.shared.count.load(Ordering::Relaxed)
    }

    pub fn messages(&self) -> Vec<Received> {
        self.shared.messages.lock().unwrap().clone()
    }

    pub fn sessions(&self) -> Vec<SessionLog> {
        self.shared.sessions.lock().unwrap().clone()
    }

    /// Waits until `pred` holds for the session logs, or the timeout passes.
    pub async fn wait_sessions(
        &self,
        timeout: Duration,
        pred: impl Fn(&[SessionLog]) -> bool,
    ) -> bool {
        let mut rx = self.shared.changed.subscribe();
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.sessions()) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, rx.changed()).await.is_err() {
                return pred(&self.sessions());
            }
        }
    }

    /// Waits until at least `n` messages were accepted.
    pub async fn wait_count(&self, n: u64, timeout: Duration) -> bool {
        let mut rx = self.shared.changed.subscribe();
        let deadline = Instant::now() + timeout;
        while self.count() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, rx.changed()).await.is_err() {
                return self.count() >= n;
            }
        }
        true
    }

    /// Stops accepting connections (open ones finish).
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs a sink until `shutdown` completes; `ready` gets the bound address.
pub async fn run(
    opts: SinkOptions,
    ready: Option<oneshot::Sender<SocketAddr>>,
    shutdown: impl Future<Output = ()>,
) -> Result<u64, SinkError> {
    let sink = Sink::start(opts).await?;
    if let Some(r) = ready {
        let _ = r.send(sink.addr);
    }
    shutdown.await;
    sink.stop();
    Ok(sink.count())
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            // Any change is the stop signal (as is a dropped sender).
            _ = stop.changed() => return,
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    tokio::spawn(Session::new(shared.clone(), peer).run(tcp));
                }
                Err(e) => {
                    tracing::warn!("sink accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// A client connection: plaintext until STARTTLS.
type Stream = crate::tls::ServerStream;

/// Case-insensitive glob with `*`.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.to_ascii_lowercase(), text.to_ascii_lowercase());
    let parts: Vec<&str> = p.split('*').collect();
    if parts.len() == 1 {
        return p == t;
    }
    let mut rest = t.as_str();
    let first = parts[0];
    if !rest.starts_with(first) {
        return false;
    }
    rest = &rest[first.len()..];
    let last = parts[parts.len() - 1];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

struct Envelope {
    mail_from: String,
    mail_params: Vec<String>,
    rcpts: Vec<String>,
    rcpt_params: Vec<Vec<String>>,
    pipelined: bool,
    data: Vec<u8>,
    /// Message length (the data itself is dropped unless kept, saved or printed).
    size: usize,
    bdat: bool,
}

/// Raw ESMTP parameters after the path, as sent.
fn params_of(line: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(line);
    let after = text.rsplit_once('>').map(|(_, a)| a).unwrap_or("");
    after.split_whitespace().map(str::to_string).collect()
}

struct Session {
    shared: Arc<Shared>,
    log_index: Option<usize>,
    ehlo: Option<String>,
    tls: bool,
    env: Option<Envelope>,
    /// Replies flushed so far, and the count when MAIL was read: a RCPT read with no
    /// flush since its MAIL was pipelined.
    flushes: u64,
    mail_flushes: Option<u64>,
    out: Vec<u8>,
}

impl Session {
    fn new(shared: Arc<Shared>, peer: SocketAddr) -> Self {
        let log_index = shared.opts.keep.then(|| {
            let mut s = shared.sessions.lock().unwrap();
            s.push(SessionLog {
                peer: Some(peer),
                ..Default::default()
            });
            s.len() - 1
        });
        Session {
            shared,
            log_index,
            ehlo: None,
            tls: false,
            env: None,
            flushes: 0,
            mail_flushes: None,
            out: Vec::with_capacity(512),
        }
    }

    fn log(&self, f: impl FnOnce(&mut SessionLog)) {
        if let Some(i) = self.log_index {
            f(&mut self.shared.sessions.lock().unwrap()[i]);
            self.shared.changed.send_modify(|n| *n += 1);
        }
    }

    /// Whether message bytes are needed after the reply.
    fn retain(&self) -> bool {
        let o = &self.shared.opts;
        o.keep || o.print || o.dir.is_some()
    }

    fn reply(&mut self, s: &str) {
        self.out.extend_from_slice(s.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    async fn run(mut self, tcp: TcpStream) {
        let mut stream = Stream::Plain(tcp);
        let greeting = format!("220 {} ESMTP koukan sink", self.shared.opts.hostname);
        self.reply(&greeting);
        let r = self.serve(&mut stream).await;
        if let Err(e) = r {
            tracing::debug!("sink session: {e}");
        }
        let _ = stream.shutdown().await;
        self.log(|l| l.closed = true);
    }

    async fn flush(&mut self, stream: &mut Stream) -> io::Result<()> {
        if !self.out.is_empty() {
            stream.write_all(&self.out).await?;
            stream.flush().await?;
            self.out.clear();
            self.flushes += 1;
        }
        Ok(())
    }

    /// Reads more input; `Ok(false)` at end of stream.
    async fn fill(&mut self, stream: &mut Stream, buf: &mut BytesMut) -> io::Result<bool> {
        self.flush(stream).await?;
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(64 * 1024);
        }
        match tokio::time::timeout(IDLE, stream.read_buf(buf)).await {
            Ok(Ok(0)) => Ok(false),
            Ok(Ok(_)) => Ok(true),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "idle")),
        }
    }

    async fn serve(&mut self, stream: &mut Stream) -> io::Result<()> {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        loop {
            let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
                if buf.len() > MAX_LINE {
                    self.reply("500 5.5.2 line too long");
                    self.flush(stream).await?;
                    return Ok(());
                }
                if !self.fill(stream, &mut buf).await? {
                    return Ok(());
                }
                continue;
            };
            let line = buf.split_to(nl + 1);
            let req = Request::parse(&mut line.iter());
            let verb = match &req {
                Ok(r) => r.name().to_string(),
                Err(_) => {
                    String::from_utf8_lossy(line[..].split(|b| *b == b' ').next().unwrap_or(b""))
                        .trim()
                        .to_ascii_uppercase()
                }
            };
            self.log(|l| l.commands.push(verb));
            match req {
                Ok(Request::Ehlo { host }) | Ok(Request::Helo { host })
                    if self.shared.opts.lmtp =>
                {
                    let _ = host;
                    self.reply("500 5.5.1 this is an LMTP server: use LHLO");
                }
                Ok(Request::Lhlo { .. }) if !self.shared.opts.lmtp => {
                    self.reply("500 5.5.1 this is an SMTP server");
                }
                Ok(Request::Ehlo { host }) | Ok(Request::Lhlo { host }) => {
                    self.ehlo(host.to_string())
                }
                Ok(Request::Helo { host }) => {
                    self.ehlo = Some(host.to_string());
                    self.env = None;
                    let r = format!("250 {}", self.shared.opts.hostname);
                    self.reply(&r);
                }
                Ok(Request::StartTls) => {
                    if self.tls {
                        self.reply("503 5.5.1 TLS already active");
                        continue;
                    }
                    match self.shared.opts.starttls.clone() {
                        StartTls::Off => self.reply("502 5.5.1 STARTTLS not offered"),
                        StartTls::Refuse => self.reply("454 4.7.0 TLS not available"),
                        StartTls::Break => {
                            self.reply("220 2.0.0 go ahead");
                            self.flush(stream).await?;
                            return Ok(());
                        }
                        StartTls::On(_) => {
                            self.reply("220 2.0.0 go ahead");
                            self.flush(stream).await?;
                            buf.clear();
                            let acceptor = self.shared.acceptor.clone().expect("TLS configured");
                            let Stream::Plain(tcp) = std::mem::replace(stream, Stream::Closed)
                            else {
                                unreachable!("checked: not TLS yet")
                            };
                            let tls = tokio::time::timeout(IDLE, acceptor.accept(tcp))
                                .await
                                .map_err(|_| {
                                    io::Error::new(io::ErrorKind::TimedOut, "TLS handshake")
                                })??;
                            *stream = Stream::Tls(Box::new(tls));
                            self.tls = true;
                            self.ehlo = None;
                            self.env = None;
                            self.log(|l| l.tls = true);
                        }
                    }
                }
                Ok(Request::Mail { from }) => {
                    if self.ehlo.is_none() {
                        self.reply("503 5.5.1 say EHLO first");
                    } else if self.env.is_some() {
                        self.reply("503 5.5.1 nested MAIL");
                    } else if from.size > MAX_SIZE {
                        self.reply("552 5.3.4 message too big");
                    } else {
                        self.env = Some(Envelope {
                            mail_from: from.address.to_string(),
                            mail_params: params_of(&line),
                            rcpts: Vec::new(),
                            rcpt_params: Vec::new(),
                            pipelined: false,
                            data: Vec::new(),
                            size: 0,
                            bdat: false,
                        });
                        self.mail_flushes = Some(self.flushes);
                        self.reply("250 2.1.0 ok");
                    }
                }
                Ok(Request::Rcpt { to }) => {
                    if self.env.is_none() {
                        self.reply("503 5.5.1 need MAIL first");
                        continue;
                    }
                    let reply = self.rcpt(&to, &line).await;
                    self.reply(reply);
                }
                Ok(Request::Data) => {
                    if self.env.as_ref().is_none_or(|e| e.rcpts.is_empty()) {
                        self.reply("554 5.5.1 no valid recipients");
                        continue;
                    }
                    self.reply("354 end data with <CR><LF>.<CR><LF>");
                    let mut rx = DataReceiver::new();
                    // The data starts a line: prime the receiver so a leading dot counts.
                    let mut scratch = Vec::new();
                    rx.ingest(&mut b"\r\n".iter(), &mut scratch);
                    let mut data = Vec::new();
                    let retain = self.retain();
                    let mut size = 0usize;
                    loop {
                        let mut it = buf.iter();
                        let done = rx.ingest(&mut it, &mut data);
                        let consumed = buf.len() - it.len();
                        buf.advance(consumed);
                        if done {
                            break;
                        }
                        if !retain {
                            // Count and drop: a huge message costs no memory.
                            size += data.len();
                            data.clear();
                        } else if data.len() > MAX_SIZE * 2 {
                            self.reply("552 5.3.4 message too big");
                            self.flush(stream).await?;
                            return Ok(());
                        }
                        if !self.fill(stream, &mut buf).await? {
                            return Ok(());
                        }
                    }
                    let env = self.env.as_mut().expect("checked");
                    env.size = size + data.len();
                    env.data = data;
                    self.finish_message().await;
                }
                Ok(Request::Bdat {
                    chunk_size,
                    is_last,
                }) => {
                    if self.env.as_ref().is_none_or(|e| e.rcpts.is_empty()) {
                        // The chunk still has to be skipped.
                        let mut left = chunk_size;
                        while left > 0 {
                            if buf.is_empty() && !self.fill(stream, &mut buf).await? {
                                return Ok(());
                            }
                            let n = left.min(buf.len());
                            buf.advance(n);
                            left -= n;
                        }
                        self.reply("554 5.5.1 no valid recipients");
                        continue;
                    }
                    let mut left = chunk_size;
                    while left > 0 {
                        if buf.is_empty() && !self.fill(stream, &mut buf).await? {
                            return Ok(());
                        }
                        let n = left.min(buf.len());
                        let retain = self.retain();
                        let env = self.env.as_mut().expect("checked");
                        if retain {
                            env.data.extend_from_slice(&buf[..n]);
                        }
                        env.size += n;
                        env.bdat = true;
                        buf.advance(n);
                        left -= n;
                    }
                    if is_last {
                        self.finish_message().await;
                    } else {
                        let r = format!("250 2.0.0 {chunk_size} octets received");
                        self.reply(&r);
                    }
                }
                Ok(Request::Rset) => {
                    self.env = None;
                    self.reply("250 2.0.0 reset");
                }
                Ok(Request::Noop { .. }) => self.reply("250 2.0.0 ok"),
                Ok(Request::Vrfy { .. }) => self.reply("252 2.1.5 cannot verify"),
                Ok(Request::Quit) => {
                    self.log(|l| l.quit = true);
                    self.reply("221 2.0.0 bye");
                    self.flush(stream).await?;
                    return Ok(());
                }
                Ok(_) => self.reply("502 5.5.1 not implemented"),
                Err(_) => self.reply("500 5.5.2 syntax error"),
            }
        }
    }

    fn ehlo(&mut self, host: String) {
        let o = &self.shared.opts;
        let mut lines = vec![o.hostname.clone()];
        if o.pipelining {
            lines.push("PIPELINING".into());
        }
        if o.chunking {
            lines.push("CHUNKING".into());
        }
        if !matches!(o.starttls, StartTls::Off) && !self.tls {
            lines.push("STARTTLS".into());
        }
        lines.push(format!("SIZE {MAX_SIZE}"));
        lines.push("8BITMIME".into());
        lines.push("SMTPUTF8".into());
        lines.push("ENHANCEDSTATUSCODES".into());
        let n = lines.len();
        for (i, l) in lines.iter().enumerate() {
            let sep = if i + 1 == n { ' ' } else { '-' };
            self.out
                .extend_from_slice(format!("250{sep}{l}\r\n").as_bytes());
        }
        self.log(|l| l.ehlo = Some(host.clone()));
        self.ehlo = Some(host);
        self.env = None;
    }

    async fn rcpt(&mut self, to: &RcptTo<std::borrow::Cow<'_, str>>, line: &[u8]) -> &'static str {
        let addr = to.address.to_string();
        let lower = addr.to_ascii_lowercase();
        let o = &self.shared.opts;
        let reply = if lower.starts_with("rcpttemp") || o.temp_fail.iter().any(|p| glob(p, &addr)) {
            "450 4.2.1 rcpt temp"
        } else if lower.starts_with("rcptperm") || o.fail_rcpt.iter().any(|p| glob(p, &addr)) {
            "550 5.1.1 rcpt perm"
        } else {
            if lower.starts_with("rcpttimeout") {
                tokio::time::sleep(STALL).await;
            }
            "250 2.1.5 ok"
        };
        if reply.starts_with('2') {
            let pipelined = self.mail_flushes == Some(self.flushes);
            let env = self.env.as_mut().expect("checked by caller");
            env.rcpts.push(addr);
            env.rcpt_params.push(params_of(line));
            // MAIL and this RCPT were read before any reply was flushed.
            env.pipelined |= pipelined;
        }
        reply
    }

    /// The data response(s) for a complete message, and its recording.
    async fn finish_message(&mut self) {
        let env = self.env.take().expect("message in progress");
        let one = |r: &str| -> Option<&'static str> {
            let l = r.to_ascii_lowercase();
            if l.starts_with("datatemp") {
                Some("450 4.3.0 data temp")
            } else if l.starts_with("dataperm") {
                Some("550 5.6.0 data perm")
            } else if l.starts_with("datatimeout") {
                Some("stall")
            } else {
                None
            }
        };
        let scripted: Vec<Option<&'static str>> = if self.shared.opts.lmtp {
            env.rcpts.iter().map(|r| one(r)).collect()
        } else if env.rcpts.len() == 1 {
            vec![one(&env.rcpts[0])]
        } else {
            vec![None]
        };
        if scripted.contains(&Some("stall")) {
            tokio::time::sleep(STALL).await;
        }
        let accepted = scripted.iter().any(|s| s.is_none() || *s == Some("stall"));
        if accepted {
            self.record(&env).await;
        }
        for s in scripted {
            match s {
                Some(r) if r != "stall" => self.reply(r),
                _ => self.reply("250 2.0.0 message accepted for delivery"),
            }
        }
        self.mail_flushes = None;
    }

    async fn record(&mut self, env: &Envelope) {
        let shared = self.shared.clone();
        let n = shared.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let o = &shared.opts;
        let received = Received {
            ehlo: self.ehlo.clone().unwrap_or_default(),
            tls: self.tls,
            mail_from: env.mail_from.clone(),
            mail_params: env.mail_params.clone(),
            rcpt_to: env.rcpts.clone(),
            rcpt_params: env.rcpt_params.clone(),
            data: Vec::new(),
            pipelined: env.pipelined,
            bdat: env.bdat,
        };
        let header = format!(
            "ehlo: {}\ntls: {}\nmail from: <{}> {}\nrcpt to: {}\nbytes: {}\n",
            received.ehlo,
            received.tls,
            received.mail_from,
            received.mail_params.join(" "),
            received
                .rcpt_to
                .iter()
                .map(|r| format!("<{r}>"))
                .collect::<Vec<_>>()
                .join(" "),
            env.size
        );
        if let Some(dir) = &o.dir {
            let msg = dir.join(format!("{n:08}.eml"));
            let meta = dir.join(format!("{n:08}.envelope"));
            let data = env.data.clone();
            let h = header.clone();
            let r = tokio::task::spawn_blocking(move || -> io::Result<()> {
                use std::io::Write;
                let mut f = std::fs::File::create(&msg)?;
                f.write_all(&data)?;
                f.sync_data()?;
                std::fs::write(&meta, h)?;
                Ok(())
            })
            .await;
            if !matches!(r, Ok(Ok(()))) {
                tracing::error!("sink: saving message {n} failed: {r:?}");
            }
        }
        if o.print {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "--- message {n}\n{header}");
            let _ = out.write_all(&env.data);
            let _ = writeln!(out, "\n--- end of message {n}");
        }
        if o.keep {
            shared.messages.lock().unwrap().push(Received {
                data: env.data.clone(),
                ..received
            });
        }
        self.log(|l| l.messages += 1);
        shared.count.fetch_add(1, Ordering::Relaxed);
        shared.changed.send_modify(|c| *c += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn globs() {
        assert!(glob("bad*", "BAD@example.com"));
        assert!(glob("*@nowhere.com", "bob@nowhere.com"));
        assert!(!glob("*@nowhere.com", "bob@example.com"));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(glob("exact@x", "exact@x"));
        assert!(!glob("exact@x", "exact@xy"));
    }
}

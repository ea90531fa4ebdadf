//! `koukan load`: a load generator for the relay, the sink or any SMTP server.
//!
//! Two modes:
//! - SMTP: each client keeps one connection (EHLO once) and sends many messages over it:
//!   MAIL, RCPT… and DATA pipelined in one write, then the body. Latency is measured from
//!   the MAIL write to the final DATA reply.
//! - REST: each client keeps one HTTP/1.1 keep-alive connection and POSTs
//!   `/senders/<sender>/transactions` with the body inline; with `--wait` it then long-polls
//!   the transaction (`if-none-match` + `request-timeout`) until the data response exists.
//!   Latency is measured from the POST to the 201 (or to the data response with `--wait`).
//!
//! The message is generated once; bodies up to [`PREBUILT_MAX`] are written from one
//! shared buffer, larger ones are streamed from a repeated pattern, so a 1 GB message costs
//! no memory. Counters are shared atomics; latencies are collected per client and merged at
//! the end into a JSON summary on stdout. A progress line goes to stderr every second.

use std::io::{self, IsTerminal, Write as _};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use serde::Serialize;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bodies up to this size are built once and written with one call.
const PREBUILT_MAX: usize = 4 << 20;
/// Streaming write granularity for larger bodies.
const STREAM_CHUNK: usize = 256 << 10;
/// Longest SMTP reply or HTTP header block accepted.
const MAX_HEAD: usize = 64 << 10;
/// Pause before reconnecting after a connection error.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Smtp,
    Rest,
}

#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub mode: Mode,
    pub target: SocketAddr,
    pub concurrency: usize,
    /// Stop after this many messages (over all clients)…
    pub count: Option<u64>,
    /// …or after this long.
    pub duration: Option<Duration>,
    /// Messages completed during this first period are not counted.
    pub warmup: Duration,
    /// Message size in bytes (headers included).
    pub size: usize,
    pub rcpts: usize,
    /// Messages per connection before reconnecting (0: unlimited).
    pub per_conn: u64,
    pub mail_from: String,
    /// Recipient template; `{n}` is replaced by the recipient index.
    pub rcpt_to: String,
    pub ehlo: String,
    /// REST: sender name in the path.
    pub sender: String,
    /// REST: optional sender tag.
    pub tag: Option<String>,
    /// REST: wait for the data response.
    pub wait: bool,
    /// Progress line every this long (zero: never).
    pub progress: Duration,
    /// SMTP: declare the size in MAIL FROM (`SIZE=`).
    pub size_param: bool,
}

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("io: {0}")]
    Io(#[from] io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("timed out")]
    Timeout,
}

/// How one message ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    Temp,
    Perm,
}

fn outcome_of(code: u16) -> Outcome {
    match code {
        200..=399 => Outcome::Ok,
        400..=499 => Outcome::Temp,
        _ => Outcome::Perm,
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub mode: &'static str,
    pub target: String,
    pub concurrency: usize,
    pub size: usize,
    pub rcpts: usize,
    pub sent: u64,
    pub ok: u64,
    pub temp: u64,
    pub perm: u64,
    pub errors: u64,
    pub elapsed_s: f64,
    pub msgs_per_s: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub first_error: Option<String>,
    /// The first temporary or permanent failure reply (SMTP text or HTTP status).
    pub first_failure: Option<String>,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    ok: AtomicU64,
    temp: AtomicU64,
    perm: AtomicU64,
    errors: AtomicU64,
    /// Messages claimed (for `--count`).
    claimed: AtomicU64,
}

struct Shared {
    opts: LoadOptions,
    counters: Counters,
    stop: AtomicBool,
    /// Whether the warm-up is over (results are recorded).
    measuring: AtomicBool,
    message: Message,
    /// REST: the whole POST request, headers and JSON, built once.
    rest_request: Bytes,
    first_error: std::sync::Mutex<Option<String>>,
    first_failure: std::sync::Mutex<Option<String>>,
}

impl Shared {
    /// Claims the next message, or `None` when the run is over.
    fn claim(&self) -> bool {
        if self.stop.load(Ordering::Relaxed) {
            return false;
        }
        match self.opts.count {
            Some(n) => self.counters.claimed.fetch_add(1, Ordering::Relaxed) < n,
            None => true,
        }
    }

    /// Remembers the first failure reply (for the summary).
    fn failure(&self, what: impl FnOnce() -> String) {
        let mut first = self.first_failure.lock().expect("first_failure lock");
        if first.is_none() {
            *first = Some(what());
        }
    }

    fn record(&self, started: Instant, outcome: Result<Outcome, &LoadError>, lat: &mut Vec<u32>) {
        if !self.measuring.load(Ordering::Relaxed) {
            return;
        }
        let c = &self.counters;
        c.sent.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Ok(Outcome::Ok) => {
                c.ok.fetch_add(1, Ordering::Relaxed);
                let us = started.elapsed().as_micros().min(u32::MAX as u128) as u32;
                lat.push(us);
            }
            Ok(Outcome::Temp) => {
                c.temp.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Outcome::Perm) => {
                c.perm.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                c.errors.fetch_add(1, Ordering::Relaxed);
                let mut first = self.first_error.lock().expect("first_error lock");
                if first.is_none() {
                    *first = Some(e.to_string());
                }
            }
        }
    }
}

/// The generated message: RFC 5322 text with CRLF line endings, no line starting with a dot,
/// and the SMTP terminator appended to the prebuilt form.
struct Message {
    size: usize,
    /// The whole message followed by `.\r\n`, when small enough to prebuild.
    with_dot: Option<Bytes>,
    /// Headers (streaming case).
    head: Bytes,
    /// One block of body lines, repeated (streaming case).
    pattern: Bytes,
}

const LINE: &[u8] = b"The quick brown fox jumps over the lazy dog; koukan load test body line.\r\n";

impl Message {
    fn new(size: usize, from: &str, to: &str) -> Message {
        let head = format!(
            "From: <{from}>\r\nTo: <{to}>\r\nSubject: koukan load test\r\n\
             Message-ID: <load@koukan.invalid>\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\n\
             MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
        );
        let mut pattern = BytesMut::with_capacity(STREAM_CHUNK);
        while pattern.len() + LINE.len() <= STREAM_CHUNK {
            pattern.extend_from_slice(LINE);
        }
        let pattern = pattern.freeze();
        let head = Bytes::from(head);
        let size = size.max(head.len());
        let with_dot = (size <= PREBUILT_MAX).then(|| {
            let mut m = BytesMut::with_capacity(size + 3);
            m.extend_from_slice(&head);
            Self::fill(&mut m, size);
            m.extend_from_slice(b".\r\n");
            m.freeze()
        });
        Message {
            size,
            with_dot,
            head,
            pattern,
        }
    }

    /// Appends body lines until `m` is `size` long (the last line shortened, CRLF-ended).
    fn fill(m: &mut BytesMut, size: usize) {
        while m.len() + LINE.len() <= size {
            m.extend_from_slice(LINE);
        }
        let rest = size.saturating_sub(m.len());
        if rest >= 2 {
            m.extend_from_slice(&LINE[..rest - 2]);
            m.extend_from_slice(b"\r\n");
        } else if !m.ends_with(b"\r\n") {
            m.extend_from_slice(b"\r\n");
        }
    }

    /// The message without the terminator, as text (REST inline bodies; prebuilt sizes only).
    fn text(&self) -> Option<&str> {
        let m = self.with_dot.as_ref()?;
        std::str::from_utf8(&m[..m.len() - 3]).ok()
    }

    /// Writes the message and the terminating dot.
    async fn write_smtp(&self, w: &mut TcpStream) -> io::Result<()> {
        if let Some(m) = &self.with_dot {
            return w.write_all(m).await;
        }
        w.write_all(&self.head).await?;
        let mut left = self.size - self.head.len();
        // Whole pattern blocks, then a partial one cut at a line boundary, then padding.
        while left >= self.pattern.len() + 2 {
            w.write_all(&self.pattern).await?;
            left -= self.pattern.len();
        }
        let mut tail = BytesMut::with_capacity(left + 3);
        Self::fill(&mut tail, left);
        tail.extend_from_slice(b".\r\n");
        w.write_all(&tail).await
    }
}

/// Runs the load and returns the summary.
pub async fn run(opts: LoadOptions) -> Result<Summary, LoadError> {
    let first_rcpt = opts.rcpt_to.replace("{n}", "1");
    let message = Message::new(opts.size, &opts.mail_from, &first_rcpt);
    let rest_request = match opts.mode {
        Mode::Rest => rest_request(&opts, &message)?,
        Mode::Smtp => Bytes::new(),
    };
    let shared = Arc::new(Shared {
        measuring: AtomicBool::new(opts.warmup.is_zero()),
        opts,
        counters: Counters::default(),
        stop: AtomicBool::new(false),
        message,
        rest_request,
        first_error: std::sync::Mutex::new(None),
        first_failure: std::sync::Mutex::new(None),
    });
    let opts = &shared.opts;
    let mut clients = Vec::with_capacity(opts.concurrency);
    for _ in 0..opts.concurrency.max(1) {
        let shared = shared.clone();
        clients.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            match shared.opts.mode {
                Mode::Smtp => smtp_client(&shared, &mut lat).await,
                Mode::Rest => rest_client(&shared, &mut lat).await,
            }
            lat
        }));
    }

    let mut start = Instant::now();
    if !opts.warmup.is_zero() {
        tokio::time::sleep(opts.warmup).await;
        shared.measuring.store(true, Ordering::Relaxed);
        start = Instant::now();
    }
    let progress = progress(&shared, start);
    let all_done = futures_util::future::join_all(clients);
    tokio::pin!(all_done);
    let deadline = async {
        match opts.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    let lats = tokio::select! {
        r = &mut all_done => r,
        _ = deadline => {
            shared.stop.store(true, Ordering::Relaxed);
            let elapsed = start.elapsed();
            // In-flight messages finish (and are not counted: `measuring` is off).
            shared.measuring.store(false, Ordering::Relaxed);
            let r = all_done.await;
            return Ok(summarize(&shared, elapsed, r));
        }
        _ = progress => unreachable!("progress never ends"),
    };
    let elapsed = start.elapsed();
    Ok(summarize(&shared, elapsed, lats))
}

fn summarize(
    shared: &Shared,
    elapsed: Duration,
    lats: Vec<Result<Vec<u32>, tokio::task::JoinError>>,
) -> Summary {
    let mut all: Vec<u32> = lats.into_iter().flatten().flatten().collect();
    all.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return 0.0;
        }
        let i = ((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1;
        all[i] as f64 / 1000.0
    };
    let c = &shared.counters;
    let o = &shared.opts;
    let ok = c.ok.load(Ordering::Relaxed);
    let secs = elapsed.as_secs_f64();
    Summary {
        mode: match o.mode {
            Mode::Smtp => "smtp",
            Mode::Rest => "rest",
        },
        target: o.target.to_string(),
        concurrency: o.concurrency,
        size: shared.message.size,
        rcpts: o.rcpts,
        sent: c.sent.load(Ordering::Relaxed),
        ok,
        temp: c.temp.load(Ordering::Relaxed),
        perm: c.perm.load(Ordering::Relaxed),
        errors: c.errors.load(Ordering::Relaxed),
        elapsed_s: round3(secs),
        msgs_per_s: round3(if secs > 0.0 { ok as f64 / secs } else { 0.0 }),
        p50_ms: round3(pct(0.50)),
        p90_ms: round3(pct(0.90)),
        p99_ms: round3(pct(0.99)),
        max_ms: round3(all.last().map_or(0.0, |&m| m as f64 / 1000.0)),
        first_error: shared.first_error.lock().expect("first_error lock").clone(),
        first_failure: shared
            .first_failure
            .lock()
            .expect("first_failure lock")
            .clone(),
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Prints a progress line every `opts.progress`; never returns.
async fn progress(shared: &Shared, start: Instant) {
    let every = shared.opts.progress;
    if every.is_zero() {
        return std::future::pending().await;
    }
    let tty = io::stderr().is_terminal();
    let mut last = (Instant::now(), 0u64);
    loop {
        tokio::time::sleep(every).await;
        let c = &shared.counters;
        let ok = c.ok.load(Ordering::Relaxed);
        let failed = c.temp.load(Ordering::Relaxed)
            + c.perm.load(Ordering::Relaxed)
            + c.errors.load(Ordering::Relaxed);
        let rate = (ok.saturating_sub(last.1)) as f64 / last.0.elapsed().as_secs_f64();
        last = (Instant::now(), ok);
        let line = format!(
            "{:6.1}s ok {ok} failed {failed} {rate:.0} msg/s",
            start.elapsed().as_secs_f64()
        );
        let mut e = io::stderr().lock();
        let _ = if tty {
            write!(e, "\r{line}   ")
        } else {
            writeln!(e, "{line}")
        };
        let _ = e.flush();
    }
}

// ---------------------------------------------------------------------------------------
// SMTP

/// Buffered reader of SMTP replies and HTTP responses over one stream.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    async fn connect(addr: SocketAddr) -> Result<Conn, LoadError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(16 << 10),
        })
    }

    async fn fill(&mut self) -> Result<(), LoadError> {
        if self.buf.len() > MAX_HEAD && self.buf.capacity() - self.buf.len() < 4096 {
            return Err(LoadError::Protocol("reply too long".into()));
        }
        self.buf.reserve(16 << 10);
        let n = self.stream.read_buf(&mut self.buf).await?;
        if n == 0 {
            return Err(LoadError::Protocol("connection closed".into()));
        }
        Ok(())
    }

    /// Reads one (possibly multi-line) SMTP reply; returns its code and last line.
    async fn reply(&mut self) -> Result<(u16, String), LoadError> {
        let mut pos = 0;
        loop {
            while let Some(nl) = self.buf[pos..].iter().position(|&b| b == b'\n') {
                let line = &self.buf[pos..pos + nl + 1];
                if line.len() < 4 {
                    return Err(LoadError::Protocol("short reply line".into()));
                }
                let code = std::str::from_utf8(&line[..3])
                    .ok()
                    .and_then(|s| s.parse::<u16>().ok())
                    .ok_or_else(|| LoadError::Protocol("bad reply code".into()))?;
                let last = line[3] != b'-';
                if last {
                    let text = String::from_utf8_lossy(line).trim_end().to_string();
                    self.buf.advance(pos + nl + 1);
                    return Ok((code, text));
                }
                pos += nl + 1;
            }
            self.fill().await?;
        }
    }
}

async fn smtp_client(shared: &Shared, lat: &mut Vec<u32>) {
    let opts = &shared.opts;
    let mut rcpts = String::new();
    for n in 1..=opts.rcpts.max(1) {
        rcpts.push_str(&format!(
            "RCPT TO:<{}>\r\n",
            opts.rcpt_to.replace("{n}", &n.to_string())
        ));
    }
    let size = if opts.size_param {
        format!(" SIZE={}", shared.message.size)
    } else {
        String::new()
    };
    let command = Bytes::from(format!(
        "MAIL FROM:<{}>{size}\r\n{rcpts}DATA\r\n",
        opts.mail_from
    ));
    'connections: while !shared.stop.load(Ordering::Relaxed) {
        let mut conn = match smtp_open(shared).await {
            Ok(c) => c,
            Err(e) => {
                if shared.claim() {
                    shared.record(Instant::now(), Err(&e), lat);
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                    continue;
                }
                return;
            }
        };
        let mut sent_here = 0u64;
        while opts.per_conn == 0 || sent_here < opts.per_conn {
            if !shared.claim() {
                let _ = conn.stream.write_all(b"QUIT\r\n").await;
                let _ = conn.reply().await;
                return;
            }
            sent_here += 1;
            let started = Instant::now();
            match smtp_message(shared, &mut conn, &command).await {
                Ok(o) => shared.record(started, Ok(o), lat),
                Err(e) => {
                    shared.record(started, Err(&e), lat);
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                    continue 'connections;
                }
            }
        }
        let _ = conn.stream.write_all(b"QUIT\r\n").await;
        let _ = conn.reply().await;
    }
}

async fn smtp_open(shared: &Shared) -> Result<Conn, LoadError> {
    let mut conn = Conn::connect(shared.opts.target).await?;
    let (code, text) = conn.reply().await?;
    if code != 220 {
        return Err(LoadError::Protocol(format!("greeting: {text}")));
    }
    conn.stream
        .write_all(format!("EHLO {}\r\n", shared.opts.ehlo).as_bytes())
        .await?;
    let (code, text) = conn.reply().await?;
    if code != 250 {
        return Err(LoadError::Protocol(format!("EHLO: {text}")));
    }
    Ok(conn)
}

/// One transaction on an open session: MAIL, RCPT… and DATA in one write, then the body.
async fn smtp_message(
    shared: &Shared,
    conn: &mut Conn,
    command: &[u8],
) -> Result<Outcome, LoadError> {
    conn.stream.write_all(command).await?;
    let mail = conn.reply().await?;
    let mut rcpts = Vec::with_capacity(shared.opts.rcpts);
    for _ in 0..shared.opts.rcpts.max(1) {
        rcpts.push(conn.reply().await?);
    }
    let (data, data_text) = conn.reply().await?;
    if data != 354 {
        // The transaction failed before the body: report the most telling reply.
        let (code, text) = if mail.0 >= 400 {
            mail
        } else {
            rcpts
                .into_iter()
                .find(|r| r.0 >= 400)
                .unwrap_or((data, data_text))
        };
        if data < 400 {
            return Err(LoadError::Protocol(format!("DATA answered {data}")));
        }
        shared.failure(|| text);
        // The transaction is still open (a valid MAIL, no usable recipient): reset it.
        conn.stream.write_all(b"RSET\r\n").await?;
        conn.reply().await?;
        return Ok(outcome_of(code));
    }
    shared.message.write_smtp(&mut conn.stream).await?;
    let (code, text) = conn.reply().await?;
    let outcome = outcome_of(code);
    if outcome != Outcome::Ok {
        shared.failure(|| text);
    }
    Ok(outcome)
}

// ---------------------------------------------------------------------------------------
// REST

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("string serializes")
}

fn rest_request(opts: &LoadOptions, message: &Message) -> Result<Bytes, LoadError> {
    let text = message.text().ok_or_else(|| {
        LoadError::Protocol(format!(
            "REST mode sends the body inline: at most {PREBUILT_MAX} bytes"
        ))
    })?;
    let rcpts: Vec<String> = (1..=opts.rcpts.max(1))
        .map(|n| {
            format!(
                "{{\"m\":{}}}",
                json_str(&opts.rcpt_to.replace("{n}", &n.to_string()))
            )
        })
        .collect();
    let sender = match &opts.tag {
        Some(t) => format!(",\"sender\":{{\"tag\":{}}}", json_str(t)),
        None => String::new(),
    };
    let json = format!(
        "{{\"mail_from\":{{\"m\":{}}},\"rcpt_to\":[{}]{sender},\"body\":{{\"inline\":{}}}}}",
        json_str(&opts.mail_from),
        rcpts.join(","),
        json_str(text),
    );
    let head = format!(
        "POST /senders/{}/transactions HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        opts.sender,
        opts.target,
        json.len()
    );
    let mut req = BytesMut::with_capacity(head.len() + json.len());
    req.extend_from_slice(head.as_bytes());
    req.extend_from_slice(json.as_bytes());
    Ok(req.freeze())
}

/// A parsed HTTP response.
struct HttpResponse {
    status: u16,
    etag: Option<String>,
    location: Option<String>,
    close: bool,
    body: Bytes,
}

impl Conn {
    async fn http_response(&mut self) -> Result<HttpResponse, LoadError> {
        let head_len = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            self.fill().await?;
        };
        let head = std::str::from_utf8(&self.buf[..head_len])
            .map_err(|_| LoadError::Protocol("non-UTF-8 response head".into()))?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| LoadError::Protocol(format!("bad status line {status_line:?}")))?;
        let (mut length, mut chunked, mut close) = (None, false, false);
        let (mut etag, mut location) = (None, None);
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            } else if name.eq_ignore_ascii_case("connection") {
                close = value.eq_ignore_ascii_case("close");
            } else if name.eq_ignore_ascii_case("etag") {
                etag = Some(value.to_string());
            } else if name.eq_ignore_ascii_case("location") {
                location = Some(value.to_string());
            }
        }
        self.buf.advance(head_len);
        let body = if chunked {
            self.chunked_body().await?
        } else {
            let n = length.unwrap_or(0);
            while self.buf.len() < n {
                self.fill().await?;
            }
            self.buf.split_to(n).freeze()
        };
        Ok(HttpResponse {
            status,
            etag,
            location,
            close,
            body,
        })
    }

    async fn chunked_body(&mut self) -> Result<Bytes, LoadError> {
        let mut body = BytesMut::new();
        loop {
            let line_end = loop {
                if let Some(i) = find(&self.buf, b"\r\n") {
                    break i;
                }
                self.fill().await?;
            };
            let size_str = std::str::from_utf8(&self.buf[..line_end]).unwrap_or("");
            let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| LoadError::Protocol("bad chunk size".into()))?;
            self.buf.advance(line_end + 2);
            while self.buf.len() < size + 2 {
                self.fill().await?;
            }
            body.extend_from_slice(&self.buf[..size]);
            self.buf.advance(size + 2);
            if size == 0 {
                return Ok(body.freeze());
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn rest_client(shared: &Shared, lat: &mut Vec<u32>) {
    let opts = &shared.opts;
    'connections: while !shared.stop.load(Ordering::Relaxed) {
        let mut conn = match Conn::connect(opts.target).await {
            Ok(c) => c,
            Err(e) => {
                if shared.claim() {
                    shared.record(Instant::now(), Err(&e), lat);
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                    continue;
                }
                return;
            }
        };
        let mut sent_here = 0u64;
        while opts.per_conn == 0 || sent_here < opts.per_conn {
            if !shared.claim() {
                return;
            }
            sent_here += 1;
            let started = Instant::now();
            match rest_message(shared, &mut conn).await {
                Ok((o, close)) => {
                    shared.record(started, Ok(o), lat);
                    if close {
                        continue 'connections;
                    }
                }
                Err(e) => {
                    shared.record(started, Err(&e), lat);
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                    continue 'connections;
                }
            }
        }
    }
}

/// One POST (and with `--wait`, the long polls); returns the outcome and whether the
/// server closes the connection.
async fn rest_message(shared: &Shared, conn: &mut Conn) -> Result<(Outcome, bool), LoadError> {
    conn.stream.write_all(&shared.rest_request).await?;
    let resp = conn.http_response().await?;
    if resp.status != 201 {
        shared.failure(|| {
            format!(
                "HTTP {}: {}",
                resp.status,
                String::from_utf8_lossy(&resp.body[..resp.body.len().min(200)])
            )
        });
        let o = if resp.status >= 500 {
            Outcome::Temp
        } else {
            Outcome::Perm
        };
        return Ok((o, resp.close));
    }
    if !shared.opts.wait || resp.close {
        return Ok((Outcome::Ok, resp.close));
    }
    let location = resp
        .location
        .ok_or_else(|| LoadError::Protocol("201 without location".into()))?;
    // Same host: keep the path only.
    let path = match location.split_once("://") {
        Some((_, rest)) => rest[rest.find('/').unwrap_or(rest.len())..].to_string(),
        None => location,
    };
    let mut etag = resp.etag;
    let mut body = resp.body;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if !body.is_empty() {
            let read = koukan::rest::ReadTx::parse(&body)
                .map_err(|e| LoadError::Protocol(format!("read view: {e}")))?;
            if let Some(r) = &read.data_response {
                if r.code >= 400 {
                    shared.failure(|| format!("data {} {}", r.code, r.message));
                }
                return Ok((outcome_of(r.code), false));
            }
            // Every recipient failed: no data response will come.
            let answered = read.rcpt_response.iter().flatten().count();
            if answered == read.rcpt_to
                && read.rcpt_to > 0
                && read.rcpt_response.iter().flatten().all(|r| r.code >= 300)
            {
                let code = read.rcpt_response.iter().flatten().map(|r| r.code).min();
                return Ok((outcome_of(code.unwrap_or(550)), false));
            }
        }
        if Instant::now() > deadline {
            return Err(LoadError::Timeout);
        }
        let mut req = format!("GET {path} HTTP/1.1\r\nhost: {}\r\n", shared.opts.target);
        if let Some(e) = &etag {
            req.push_str(&format!("if-none-match: {e}\r\nrequest-timeout: 30\r\n"));
        }
        req.push_str("\r\n");
        conn.stream.write_all(req.as_bytes()).await?;
        let resp = conn.http_response().await?;
        match resp.status {
            200 => {
                etag = resp.etag.or(etag);
                body = resp.body;
            }
            304 => body = Bytes::new(),
            s => {
                return Err(LoadError::Protocol(format!("GET {path}: HTTP {s}")));
            }
        }
        if resp.close {
            return Err(LoadError::Protocol("server closed during wait".into()));
        }
    }
}

/// Parses a size like `2048`, `2k`, `100K`, `1m`, `1G` (binary multiples).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_lowercase()) {
        Some('k') => (&s[..s.len() - 1], 1usize << 10),
        Some('m') => (&s[..s.len() - 1], 1 << 20),
        Some('g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.trim()
        .parse::<usize>()
        .map(|n| n * mult)
        .map_err(|_| format!("invalid size {s:?}"))
}

/// Parses a duration like `10`, `10s`, `500ms`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bad = || format!("invalid duration {s:?}");
    if let Some(ms) = s.strip_suffix("ms") {
        return ms
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| bad());
    }
    let (num, mult) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1.0),
        Some('m') => (&s[..s.len() - 1], 60.0),
        Some('h') => (&s[..s.len() - 1], 3600.0),
        _ => (s, 1.0),
    };
    num.parse::<f64>()
        .ok()
        .filter(|n| *n >= 0.0)
        .map(|n| Duration::from_secs_f64(n * mult))
        .ok_or_else(bad)
}

/// `koukan load` command line.
#[derive(clap::Args, Debug)]
pub struct LoadArgs {
    /// Protocol: smtp (MAIL/RCPT/DATA pipelined) or rest (POST with an inline body).
    #[arg(long, value_parser = ["smtp", "rest"], default_value = "smtp")]
    pub mode: String,
    /// Server address (SMTP listener or REST listener).
    #[arg(long, default_value = "127.0.0.1:1025")]
    pub target: SocketAddr,
    /// Concurrent clients, one connection each.
    #[arg(short, long, default_value_t = 10)]
    pub concurrency: usize,
    /// Send this many messages in all.
    #[arg(short = 'n', long, conflicts_with = "duration")]
    pub count: Option<u64>,
    /// Or send for this long (`10`, `10s`, `500ms`, `2m`).
    #[arg(short, long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Do not count what completes in this first period.
    #[arg(long, value_parser = parse_duration, default_value = "0")]
    pub warmup: Duration,
    /// Message size (`2k`, `100k`, `1g`).
    #[arg(short, long, value_parser = parse_size, default_value = "2k")]
    pub size: usize,
    /// Recipients per message.
    #[arg(short, long, default_value_t = 1)]
    pub rcpts: usize,
    /// Messages per connection before reconnecting (0: unlimited).
    #[arg(long, default_value_t = 0)]
    pub per_conn: u64,
    #[arg(long, default_value = "load@example.org")]
    pub from: String,
    /// Recipient address; `{n}` is the recipient's index (1-based).
    #[arg(long, default_value = "rcpt{n}@example.com")]
    pub to: String,
    #[arg(long, default_value = "load.localhost")]
    pub ehlo: String,
    /// REST: sender name (`/senders/<sender>/transactions`).
    #[arg(long, default_value = "submission")]
    pub sender: String,
    /// REST: sender tag.
    #[arg(long)]
    pub tag: Option<String>,
    /// REST: also wait (hanging GETs) for the final data response.
    #[arg(long)]
    pub wait: bool,
    /// Progress line interval (`0`: none).
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub progress: Duration,
    /// SMTP: do not declare the size in MAIL FROM (for servers whose SIZE limit is lower).
    #[arg(long)]
    pub no_size_param: bool,
    /// Runtime worker threads (default: one per CPU).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Runs `koukan load` and prints the JSON summary on stdout.
pub fn main(a: LoadArgs) -> anyhow::Result<()> {
    let opts = LoadOptions {
        mode: if a.mode == "rest" {
            Mode::Rest
        } else {
            Mode::Smtp
        },
        target: a.target,
        concurrency: a.concurrency.max(1),
        count: a.count,
        duration: a.duration,
        warmup: a.warmup,
        size: a.size,
        rcpts: a.rcpts.max(1),
        per_conn: a.per_conn,
        mail_from: a.from,
        rcpt_to: a.to,
        ehlo: a.ehlo,
        sender: a.sender,
        tag: a.tag,
        wait: a.wait,
        progress: a.progress,
        size_param: !a.no_size_param,
    };
    if opts.count.is_none() && opts.duration.is_none() {
        anyhow::bail!("give --count or --duration");
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(t) = a.threads {
        rt.worker_threads(t.max(1));
    }
    let rt = rt.enable_all().build()?;
    let summary = rt.block_on(run(opts))?;
    if !a.progress.is_zero() && io::stderr().is_terminal() {
        eprintln!();
    }
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("2k"), Ok(2048));
        assert_eq!(parse_size("100K"), Ok(102_400));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("77"), Ok(77));
        assert!(parse_size("x").is_err());
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    }

    #[test]
    fn message_has_the_requested_size() {
        for size in [10, 300, 2048, 102_400, PREBUILT_MAX] {
            let m = Message::new(size, "a@example.org", "b@example.com");
            let with_dot = m.with_dot.as_ref().expect("prebuilt");
            let text = &with_dot[..with_dot.len() - 3];
            assert_eq!(text.len(), m.size, "size {size}");
            assert!(text.ends_with(b"\r\n"));
            assert!(!text.windows(3).any(|w| w == b"\n.\r" || w == b"\n.."));
        }
    }

    #[tokio::test]
    async fn smtp_against_the_sink_and_rest_shape() {
        use super::super::sink::{Sink, SinkOptions, StartTls};
        let sink = Sink::start(SinkOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            lmtp: false,
            dir: None,
            print: false,
            fail_rcpt: vec![],
            temp_fail: vec![],
            pipelining: true,
            chunking: true,
            starttls: StartTls::Off,
            hostname: "localhost".into(),
            keep: false,
        })
        .await
        .unwrap();
        let opts = LoadOptions {
            mode: Mode::Smtp,
            target: sink.addr,
            concurrency: 3,
            count: Some(30),
            duration: None,
            warmup: Duration::ZERO,
            size: 2048,
            rcpts: 2,
            per_conn: 4,
            mail_from: "a@example.org".into(),
            rcpt_to: "rcpt{n}@example.com".into(),
            ehlo: "load".into(),
            sender: "submission".into(),
            tag: None,
            wait: false,
            progress: Duration::ZERO,
            size_param: true,
        };
        let s = run(opts.clone()).await.unwrap();
        assert_eq!((s.sent, s.ok, s.errors), (30, 30, 0), "{s:?}");
        assert_eq!(sink.count(), 30);
        assert!(s.p50_ms <= s.p99_ms && s.p99_ms <= s.max_ms);

        // A recipient the sink refuses permanently.
        let s = run(LoadOptions {
            rcpts: 1,
            rcpt_to: "rcptperm{n}@example.com".into(),
            count: Some(5),
            ..opts.clone()
        })
        .await
        .unwrap();
        assert_eq!((s.sent, s.perm, s.ok), (5, 5, 0), "{s:?}");

        // A body too big to prebuild is streamed.
        let s = run(LoadOptions {
            size: PREBUILT_MAX + 1000,
            count: Some(2),
            ..opts.clone()
        })
        .await
        .unwrap();
        assert_eq!((s.sent, s.ok), (2, 2), "{s:?}");

        // The REST request is well-formed JSON the router accepts.
        let m = Message::new(300, "a@example.org", "b@example.com");
        let req = rest_request(&opts, &m).unwrap();
        let body = &req[find(&req, b"\r\n\r\n").unwrap() + 4..];
        let create = koukan::rest::CreateRequest::parse(body).unwrap();
        assert_eq!(create.tx.rcpt_to.len(), 2);
        sink.stop();
    }
}

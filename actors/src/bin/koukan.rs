//! `koukan <tool>`: the command-line tools.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::process::ExitCode;

use koukan::config::TlsVerify;
use koukan_actors::tools::sink::{self, SinkOptions, StartTls};
use koukan_actors::tools::{receive, rest_send, secret, send};

// jemalloc: about a sixth less router CPU per relayed message than the system allocator in
// an A/B (BENCHMARKS.md, change 16); the relay allocates many small, short-lived buffers.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(version, about = "Koukan command-line tools")]
struct Cli {
    #[command(subcommand)]
    tool: Tool,
}

#[derive(Subcommand)]
enum Tool {
    /// SMTP/LMTP sink: accepts, counts, optionally saves or prints every message.
    Sink(SinkArgs),
    /// Load generator: SMTP or REST messages at a given concurrency; JSON summary.
    Load(koukan_actors::tools::load::LoadArgs),
    /// SMTP/LMTP client: sends one message and prints every reply.
    Send(SendArgs),
    /// Generates an SMTP AUTH secret and its hash for the gateway's auth_secrets file.
    Secret(SecretArgs),
    /// REST sender: submits a message-builder spec or a raw message, waits until done.
    RestSend(RestSendArgs),
    /// REST receiver: accepts deliveries from a router and writes them to a folder.
    Receive(ReceiveArgs),
}

#[derive(Args)]
struct SinkArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3025")]
    listen: SocketAddr,
    /// Speak LMTP (LHLO, one data reply per recipient).
    #[arg(long)]
    lmtp: bool,
    /// Save each message (synced to disk before the reply) in this folder.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print each envelope and message to stdout.
    #[arg(long)]
    print: bool,
    /// Refuse recipients matching this glob (`*` wildcard) with 550. Repeatable.
    #[arg(long = "fail-rcpt", value_name = "PATTERN")]
    fail_rcpt: Vec<String>,
    /// Refuse recipients matching this glob with 450. Repeatable.
    #[arg(long = "temp-fail", value_name = "PATTERN")]
    temp_fail: Vec<String>,
    /// Do not advertise PIPELINING.
    #[arg(long)]
    no_pipelining: bool,
    /// Do not advertise CHUNKING (BDAT).
    #[arg(long)]
    no_chunking: bool,
    /// Offer STARTTLS with this certificate (PEM; needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Name in the greeting and EHLO reply.
    #[arg(long, default_value = "localhost")]
    hostname: String,
    /// Print the message count and rate every this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    stats: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    koukan_actors::logging::init();
    let result = match cli.tool {
        Tool::Sink(a) => run_sink(a).map(|()| ExitCode::SUCCESS),
        Tool::Load(a) => koukan_actors::tools::load::main(a).map(|()| ExitCode::SUCCESS),
        Tool::Send(a) => run_send(a),
        Tool::Secret(a) => run_secret(a),
        Tool::RestSend(a) => run_rest_send(a),
        Tool::Receive(a) => run_receive(a).map(|()| ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|e| {
        eprintln!("koukan: {}", koukan_actors::logging::describe(e.as_ref()));
        ExitCode::from(2)
    })
}

fn run_sink(a: SinkArgs) -> anyhow::Result<()> {
    let starttls = match (&a.tls_cert, &a.tls_key) {
        (Some(c), Some(k)) => StartTls::On(sink::tls_config(c, k)?),
        _ => StartTls::Off,
    };
    let opts = SinkOptions {
        listen: a.listen,
        lmtp: a.lmtp,
        dir: a.dir,
        print: a.print,
        fail_rcpt: a.fail_rcpt,
        temp_fail: a.temp_fail,
        pipelining: !a.no_pipelining,
        chunking: !a.no_chunking,
        starttls,
        hostname: a.hostname,
        keep: false,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(async move {
        let sink = sink::Sink::start(opts).await?;
        eprintln!("sink listening on {}", sink.addr);
        let stats = async {
            if a.stats == 0 {
                return std::future::pending().await;
            }
            let mut last = (std::time::Instant::now(), 0u64);
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(a.stats)).await;
                let n = sink.count();
                let dt = last.0.elapsed().as_secs_f64();
                eprintln!("messages: {n} ({:.0}/s)", (n - last.1) as f64 / dt);
                last = (std::time::Instant::now(), n);
            }
        };
        tokio::select! {
            _ = koukan_actors::signals::shutdown() => {}
            _ = stats => {}
        }
        sink.stop();
        eprintln!("messages: {}", sink.count());
        Ok(())
    })
}

#[derive(Args)]
struct SendArgs {
    /// SMTP server, host:port.
    #[arg(long, default_value = "127.0.0.1:1025")]
    server: String,
    /// Envelope sender (also From: of a generated message); "" for <>.
    #[arg(long)]
    from: String,
    /// Recipients.
    #[arg(long, required = true, num_args = 1..)]
    to: Vec<String>,
    /// Name sent in EHLO/LHLO.
    #[arg(long, default_value = "localhost")]
    ehlo: String,
    /// Upgrade with STARTTLS (required by the gateway for AUTH).
    #[arg(long)]
    starttls: bool,
    /// Do not check the server certificate.
    #[arg(long)]
    insecure: bool,
    /// Trust this CA bundle (PEM) for STARTTLS.
    #[arg(long, value_name = "PEM")]
    ca_file: Option<PathBuf>,
    /// AUTH credentials, user:secret.
    #[arg(long, value_name = "USER:SECRET")]
    auth: Option<String>,
    /// Speak LMTP.
    #[arg(long)]
    lmtp: bool,
    /// Send this file verbatim ("-": stdin); default: a generated text message.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Subject of a generated message.
    #[arg(long, default_value = "hello")]
    subject: String,
    /// Text of a generated message.
    #[arg(long, default_value = "hello, world!")]
    body: String,
    /// Seconds to wait for each reply.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

#[derive(Args)]
struct SecretArgs {
    /// Use this secret instead of a random one.
    #[arg(long)]
    secret: Option<String>,
    /// With --file: the user name to store the hash under.
    #[arg(long, requires = "file")]
    user: Option<String>,
    /// Add or replace the user in this auth_secrets JSON file.
    #[arg(long, requires = "user")]
    file: Option<PathBuf>,
}

#[derive(Args)]
struct RestSendArgs {
    /// Create URL (sender in the path).
    #[arg(
        long,
        default_value = "http://127.0.0.1:8000/senders/submission/transactions"
    )]
    base_url: String,
    /// Envelope sender.
    #[arg(long)]
    mail_from: String,
    /// Message-builder spec (JSON); parts may name files with "filename".
    #[arg(long, conflicts_with = "rfc822", required_unless_present = "rfc822")]
    message_builder: Option<PathBuf>,
    /// Pre-formatted message uploaded as the raw body.
    #[arg(long)]
    rfc822: Option<PathBuf>,
    /// Sent as sender.tag.
    #[arg(long)]
    tag: Option<String>,
    /// Seconds to wait for each transaction to be done.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Recipients: one transaction each.
    #[arg(required = true)]
    rcpt: Vec<String>,
}

#[derive(Args)]
struct ReceiveArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8002")]
    listen: SocketAddr,
    /// Folder for the messages.
    #[arg(long, default_value = "/tmp/my_messages")]
    dir: PathBuf,
    /// Absolute base URL handed out in locations (default http://<listen>).
    #[arg(long)]
    base_url: Option<String>,
}

/// Exit status of `send`: 0 delivered to every recipient, 1 refused (some of it), 2 the
/// exchange failed.
fn run_send(a: SendArgs) -> anyhow::Result<ExitCode> {
    let message = match &a.file {
        Some(p) if p.as_os_str() == "-" => {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut v).context("stdin")?;
            v
        }
        Some(p) => std::fs::read(p).with_context(|| p.display().to_string())?,
        None => send::generate_message(&a.from, &a.to, &a.subject, &a.body),
    };
    let auth = match &a.auth {
        Some(s) => Some(
            s.split_once(':')
                .map(|(u, p)| (u.to_string(), p.to_string()))
                .context("--auth wants user:secret")?,
        ),
        None => None,
    };
    let verify = match (&a.ca_file, a.insecure) {
        (_, true) => TlsVerify::Disabled,
        (Some(p), false) => TlsVerify::CaFile(p.clone()),
        (None, false) => TlsVerify::System,
    };
    let opts = send::SendOptions {
        server: a.server,
        ehlo: a.ehlo,
        from: a.from,
        to: a.to,
        starttls: a.starttls,
        verify,
        auth,
        lmtp: a.lmtp,
        timeout: std::time::Duration::from_secs(a.timeout),
        message,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    match rt.block_on(send::send(&opts, |l| println!("{l}"))) {
        Ok(r) if r.delivered() => Ok(ExitCode::SUCCESS),
        Ok(_) => Ok(ExitCode::from(1)),
        Err(e) => {
            eprintln!("koukan send: {e}");
            Ok(ExitCode::from(2))
        }
    }
}

fn run_secret(a: SecretArgs) -> anyhow::Result<ExitCode> {
    let s = match &a.secret {
        Some(secret) => secret::Secret::from_secret(secret),
        None => secret::Secret::generate(),
    };
    println!("{}", s.line());
    if let (Some(user), Some(file)) = (&a.user, &a.file) {
        secret::store(file, user, &s.hash)?;
        eprintln!("stored the hash of {user} in {}", file.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Exit status of `rest-send`: 0 every message delivered, 1 some refused or failed, 2 some
/// not done in time or an exchange failed.
fn run_rest_send(a: RestSendArgs) -> anyhow::Result<ExitCode> {
    let message = match (&a.message_builder, &a.rfc822) {
        (Some(p), _) => rest_send::Message::builder_file(p)?,
        (None, Some(p)) => {
            rest_send::Message::Rfc822(std::fs::read(p).with_context(|| p.display().to_string())?)
        }
        (None, None) => anyhow::bail!("--message-builder or --rfc822 is required"),
    };
    let opts = rest_send::RestSendOptions {
        base_url: a.base_url,
        mail_from: a.mail_from,
        tag: a.tag,
        timeout: std::time::Duration::from_secs(a.timeout),
    };
    actix_rt::System::new().block_on(async move {
        let mut worst = 0u8;
        for rcpt in &a.rcpt {
            match rest_send::send_one(&opts, &message, rcpt, |l| eprintln!("{rcpt}: {l}")).await {
                Ok(r) => {
                    println!("{}", serde_json::to_string(&r.json).unwrap_or_default());
                    eprintln!("recipient {rcpt} result {:?}", r.outcome);
                    worst = worst.max(match r.outcome {
                        rest_send::Outcome::Success => 0,
                        rest_send::Outcome::Failure => 1,
                        rest_send::Outcome::Inflight => 2,
                    });
                }
                Err(e) => {
                    eprintln!("recipient {rcpt}: {e}");
                    worst = 2;
                }
            }
        }
        Ok(ExitCode::from(worst))
    })
}

fn run_receive(a: ReceiveArgs) -> anyhow::Result<()> {
    actix_rt::System::new().block_on(async move {
        let r = receive::Receiver::start(receive::ReceiverOptions {
            listen: a.listen,
            dir: Some(a.dir.clone()),
            base_url: a.base_url,
        })
        .await?;
        eprintln!(
            "receiver listening on {}, writing to {}",
            r.base_url,
            a.dir.display()
        );
        koukan_actors::signals::shutdown().await;
        r.stop().await;
        eprintln!("messages: {}", r.messages().len());
        Ok(())
    })
}

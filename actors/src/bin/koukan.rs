//! `koukan <tool>`: the command-line tools.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use koukan_actors::tools::sink::{self, SinkOptions, StartTls};

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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    koukan_actors::logging::init();
    match cli.tool {
        Tool::Sink(a) => run_sink(a),
    }
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

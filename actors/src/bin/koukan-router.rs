//! `koukan-router CONFIG.yaml`: the router service.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use koukan::config::{LoadOptions, RouterConfig};
use koukan_actors::router::{Router, Settings};

// jemalloc: about a sixth less router CPU per relayed message than the system allocator in
// an A/B (BENCHMARKS.md, change 16); the relay allocates many small, short-lived buffers.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The Koukan router: REST transactions, durable storage, output chains.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Path of the router YAML configuration.
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "koukan-router: {}",
                koukan_actors::logging::describe(e.as_ref())
            );
            ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    koukan_actors::logging::init();
    // Filters this build registers beyond the built-in names (e.g. `http_hook`).
    let filters = koukan_actors::router::output::builtin_filters();
    let is_registered = |name: &str| filters.contains(name);
    let cfg = RouterConfig::load_with(
        &args.config,
        &LoadOptions {
            extra_filters: Some(&is_registered),
            ..Default::default()
        },
    )
    .with_context(|| format!("loading {}", args.config.display()))?;
    for w in cfg.warnings() {
        tracing::warn!("config: {w}");
    }
    cfg.validate_files()
        .with_context(|| format!("checking files named in {}", args.config.display()))?;
    let settings = Settings::from_config(Arc::new(cfg))?;
    actix_rt::System::new().block_on(async move {
        let (router, server) = Router::start_with(settings, filters).await?;
        tracing::info!(addr = %router.addr, "router listening");
        // The server future must keep being polled while shutdown waits for it.
        let mut server = actix_rt::spawn(server);
        tokio::select! {
            res = &mut server => res.context("HTTP server task")?.context("HTTP server")?,
            _ = koukan_actors::signals::shutdown() => {
                tracing::info!("shutting down");
                router.shutdown().await;
                server.await.context("HTTP server task")?.context("HTTP server")?;
            }
        }
        tracing::info!("stopped");
        Ok(())
    })
}

//! `koukan-gateway CONFIG.yaml`: the SMTP gateway (SMTP listeners → router, router →
//! SMTP/LMTP delivery).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use koukan::config::GatewayConfig;
use koukan_actors::gateway::Gateway;

// jemalloc: about a sixth less router CPU per relayed message than the system allocator in
// an A/B (BENCHMARKS.md, change 16); the relay allocates many small, short-lived buffers.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The Koukan SMTP gateway.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Path of the gateway YAML configuration.
    config: PathBuf,
}

/// Exit status for configuration errors.
const CONFIG_ERROR: u8 = 2;

fn main() -> ExitCode {
    let args = Args::parse();
    koukan_actors::logging::init();
    let cfg = match load(&args.config) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("koukan-gateway: {}: {e}", args.config.display());
            return ExitCode::from(CONFIG_ERROR);
        }
    };
    match serve(Arc::new(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "koukan-gateway: {}",
                koukan_actors::logging::describe(e.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

fn load(path: &std::path::Path) -> Result<GatewayConfig, koukan::config::ConfigError> {
    let cfg = GatewayConfig::load(path)?;
    for w in cfg.warnings() {
        tracing::warn!("config: {w}");
    }
    cfg.validate_files()?;
    Ok(cfg)
}

fn serve(cfg: Arc<GatewayConfig>) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    actix_rt::System::new().block_on(async move {
        let (gateway, server) = Gateway::start(cfg).await.context("starting")?;
        tracing::info!(rest = %gateway.rest_addr, smtp = ?gateway.smtp_addrs, "gateway listening");
        // The server future must keep being polled while shutdown waits for it.
        let mut server = actix_rt::spawn(server);
        tokio::select! {
            res = &mut server => res.context("HTTP server task")?.context("HTTP server")?,
            _ = koukan_actors::signals::shutdown() => {
                tracing::info!("shutting down");
                gateway.shutdown().await;
                server.await.context("HTTP server task")?.context("HTTP server")?;
            }
        }
        tracing::info!("stopped");
        Ok(())
    })
}

//! `vipshare-controller --config controller.toml`

use clap::Parser;
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;
use vipshare_controller::config::ControllerConfig;

#[derive(Parser)]
#[command(
    name = "vipshare-controller",
    version,
    about = "vipshare controller (raft member)"
)]
struct Args {
    /// Path to controller.toml.
    #[arg(long)]
    config: std::path::PathBuf,
}

fn main() -> anyhow::Result<()> {
    // Before the runtime's threads exist, so that they inherit it: promises and
    // fences keep their timing on a busy host.
    let priority = vipshare_proto::priority::prioritise(None);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(priority))
}

async fn run(priority: vipshare_proto::priority::Priority) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,raft=warn")),
        )
        .init();
    exit_on_panic();
    if priority.is_degraded() {
        tracing::warn!(%priority, "controller runs with less than the intended priority");
    } else {
        tracing::info!(%priority, "controller priority");
    }
    let args = Args::parse();
    let cfg = ControllerConfig::load(&args.config)?;
    if let Some(addr) = cfg.metrics_listen {
        vipshare_controller::metrics::install(addr)
            .map_err(|e| anyhow::anyhow!("metrics listener on {addr}: {e}"))?;
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });
    vipshare_controller::run(cfg, stop_rx).await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Fail fast: after a panic in any task (the raft node, the ownership runtime, a
/// service) the process is in a state nobody tested, and tokio would keep serving
/// around the dead task. End it non-zero so the supervisor restarts a clean one.
/// Panics that storage.rs contains (redb's, turned into errors) never get here.
fn exit_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        tracing::error!(%info, "panic: exiting (code 101) for the supervisor to restart");
        std::process::exit(101);
    }));
}

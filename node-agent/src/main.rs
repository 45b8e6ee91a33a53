//! `vipshare-agent --config agent.toml`: the node agent.
//! `vipshare-agent watchdog --config agent.toml`: the FreeBSD lease watchdog
//! (started by the agent itself; reads `arm`/`disarm` lines on stdin).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vipshare_agent::agent::{self, Plane};
use vipshare_agent::config::{AgentConfig, Backend};
use vipshare_agent::dataplane::freebsd::watchdog::{run_watchdog, ProcessWatchdog};
use vipshare_agent::dataplane::freebsd::{self, FreeBsdConfig, FreeBsdDataPlane};
use vipshare_agent::dataplane::linux::LinuxDataPlane;

#[derive(Parser)]
#[command(name = "vipshare-agent", version, about = "vipshare node agent")]
struct Cli {
    #[arg(long, global = true, default_value = "/etc/vipshare/agent.toml")]
    config: PathBuf,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// FreeBSD lease watchdog: withdraws the owned ipfw set when the lease
    /// the agent armed runs out (internal; the agent starts it).
    Watchdog,
}

fn freebsd_config(cfg: &AgentConfig) -> FreeBsdConfig {
    let d = FreeBsdConfig::default();
    FreeBsdConfig {
        rule_base: cfg.freebsd.rule_base.unwrap_or(d.rule_base),
        carp_vhid: cfg.freebsd.carp_vhid.unwrap_or(d.carp_vhid),
        ..d
    }
}

fn watchdog(cfg: &AgentConfig) -> ExitCode {
    let argv = freebsd::plan::withdraw_argv(&freebsd_config(cfg));
    let stdin = std::io::BufReader::new(std::io::stdin());
    run_watchdog(
        stdin,
        || {
            let status = std::process::Command::new(&argv[0])
                .args(&argv[1..])
                .status();
            match status {
                Ok(s) if s.success() => {
                    eprintln!("watchdog: lease ran out; withdrew the owned rules")
                }
                other => eprintln!("watchdog: {} failed: {other:?}", argv.join(" ")),
            }
        },
        |line| eprintln!("watchdog: ignoring {line:?}"),
    );
    ExitCode::SUCCESS
}

fn plane(cfg: &AgentConfig, config_path: &std::path::Path) -> anyhow::Result<Plane> {
    Ok(match cfg.backend {
        Backend::Linux => Plane::Linux(LinuxDataPlane::os(cfg.linux_config())?),
        Backend::Freebsd => {
            let fcfg = freebsd_config(cfg);
            fcfg.validate()?;
            let exe = std::env::current_exe()?;
            let wd = ProcessWatchdog::spawn(&[
                exe.display().to_string(),
                "--config".into(),
                config_path.display().to_string(),
                "watchdog".into(),
            ])?;
            Plane::FreeBsd(FreeBsdDataPlane::new(fcfg, freebsd::OsExecutor::new(wd)))
        }
    })
}

fn main() -> ExitCode {
    // Fail fast: a panicked task (lease keeping, data plane) must not leave an agent
    // that looks alive; exit non-zero for the supervisor to restart it.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::exit(101);
    }));
    let cli = Cli::parse();
    let cfg = match AgentConfig::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vipshare-agent: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Cmd::Watchdog) = cli.cmd {
        return watchdog(&cfg);
    }
    // Before any thread exists: the runtime's threads and the nft/ip processes
    // inherit it, so the whole lease path keeps its timing on a busy host.
    // Nice -10, not real-time: a real-time agent starved the host's own servers
    // and clients in the scenario suite (healthy hosts stopped answering).
    let priority = vipshare_proto::priority::prioritise(None);
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    if priority.is_degraded() {
        tracing::warn!(%priority, "lease path runs with less than the intended priority");
    } else {
        tracing::info!(%priority, "lease path priority");
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vipshare-agent: tokio: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        if let Some(addr) = cfg.metrics_listen {
            vipshare_agent::metrics::install(addr)
                .map_err(|e| anyhow::anyhow!("metrics on {addr}: {e}"))?;
        }
        // Before the data plane touches the kernel: one agent per host.
        let _lock = agent::state_file::StateFile::new(&cfg.state_dir).lock()?;
        let plane = plane(&cfg, &cli.config)?;
        agent::run(cfg, plane).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vipshare-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

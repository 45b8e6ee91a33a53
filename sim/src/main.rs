//! `vipshare-sim`: run many seeds, or replay one with a trace.
//!
//! ```text
//! vipshare-sim --seeds 500 [--start 0]      # one line per failing seed, then "N passed, M failed"
//! vipshare-sim --seed 42 --trace            # replay one seed, printing every event
//! vipshare-sim --seeds 100 --bug skip-sync  # the injected durability bug must be caught
//! vipshare-sim --seeds 100 --bug skip-fence-wait  # two hosts accept one bucket
//! vipshare-sim --seeds 200 --bug agent-forgets-releases --bug controller-acks-stale-assignments
//! vipshare-sim --seeds 500 --no-agents      # the raft-only model
//! ```

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use clap::builder::TypedValueParser as _;
use clap::{Parser, ValueEnum};
use vipshare_sim::{run_seed, RunReport, SimConfig, Stats};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Bug {
    /// Replicas send messages without syncing the writes they depend on.
    SkipSync,
    /// The leader's planner fences a member after one lease on its own clock,
    /// without the controllers' agreement (`PlannerFaults::skip_fence_wait`).
    SkipFenceWait,
    /// A release does not raise the bucket's floor in the agent's state: a
    /// restarted agent installs buckets it had released, from a controller that
    /// has not applied the release yet (`AgentFaults::forget_releases`).
    AgentForgetsReleases,
    /// The agent never writes its state file (`AgentFaults::skip_persist`).
    AgentSkipsPersist,
    /// An agent whose epoch the leader or too many voters refuse for good keeps
    /// heartbeating instead of letting itself be fenced.
    AgentNeverYields,
    /// The leader records its own fence agreement before the others (the
    /// controller's behaviour before it was fixed to mark last).
    LeaderFencesFirst,
    /// Controllers ack heartbeats acting on an assignment older than the
    /// member's last release (`PromiseFaults::ack_stale_assignments`).
    ControllerAcksStaleAssignments,
}

#[derive(Debug, Parser)]
#[command(
    name = "vipshare-sim",
    about = "Deterministic simulator of vipshare's controllers"
)]
struct Args {
    /// Run this many seeds, from --start.
    #[arg(long, default_value_t = 100, conflicts_with = "seed")]
    seeds: u64,
    /// First seed of --seeds.
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Run (replay) this one seed.
    #[arg(long)]
    seed: Option<u64>,
    /// With --seed: print the event trace.
    #[arg(long, requires = "seed")]
    trace: bool,
    /// Turn on a deliberately injected bug (repeat for several: the agent's
    /// release bugs are caught only with controller-acks-stale-assignments,
    /// the controllers' second guard, off too).
    #[arg(long, value_enum)]
    bug: Vec<Bug>,
    /// The raft-only model: no agents, leases or ownership planner.
    #[arg(long)]
    no_agents: bool,
    /// Number of agents (default: 3 to 8, drawn from the seed).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=32))]
    agents: Option<u64>,
    /// Don't check crashed disks against what the node promised (terms, votes,
    /// acknowledged entries): report only violations clients could observe.
    #[arg(long)]
    no_promise_check: bool,
    /// Founding controllers.
    #[arg(long, default_value_t = 3, value_parser = clap::builder::PossibleValuesParser::new(["3", "5"]).map(|s| s.parse::<usize>().unwrap_or(3)))]
    nodes: usize,
    /// Virtual time with faults, in ms.
    #[arg(long, default_value_t = 60_000)]
    duration_ms: u64,
    /// Virtual time allowed to recover after the faults, in ms.
    #[arg(long, default_value_t = 10_000)]
    liveness_ms: u64,
    /// Mean time between two planned controller faults, in ms.
    #[arg(long, default_value_t = 700)]
    fault_gap_ms: u64,
    /// Mean time between two planned agent faults, in ms.
    #[arg(long, default_value_t = 1200)]
    agent_fault_gap_ms: u64,
    /// Worker threads for --seeds (default: all cores).
    #[arg(long)]
    jobs: Option<usize>,
    /// Also print a summary line for passing seeds.
    #[arg(long, short)]
    verbose: bool,
}

fn config(args: &Args, seed: u64) -> SimConfig {
    let mut cfg = SimConfig::new(seed);
    cfg.nodes = args.nodes;
    cfg.duration_ms = args.duration_ms;
    cfg.liveness_ms = args.liveness_ms;
    let bug = |b| args.bug.contains(&b);
    cfg.skip_sync = bug(Bug::SkipSync);
    cfg.skip_fence_wait = bug(Bug::SkipFenceWait);
    cfg.agent_faults.forget_releases = bug(Bug::AgentForgetsReleases);
    cfg.agent_faults.skip_persist = bug(Bug::AgentSkipsPersist);
    cfg.agent_faults.never_yield = bug(Bug::AgentNeverYields);
    cfg.fence_faults.leader_marks_first = bug(Bug::LeaderFencesFirst);
    cfg.promise_faults.ack_stale_assignments = bug(Bug::ControllerAcksStaleAssignments);
    cfg.agents = !args.no_agents;
    cfg.agent_count = args.agents.map(|n| n as usize);
    cfg.fault_gap_ms = args.fault_gap_ms.max(4);
    cfg.agent_fault_gap_ms = args.agent_fault_gap_ms.max(4);
    cfg.check_promises = !args.no_promise_check;
    cfg
}

/// The world models' counters (see `Stats`).
fn models(s: &Stats) -> String {
    format!(
        "{} late kernel installs (up to {}ms past the kernel delay), {} removed controllers kept running, {} agent starts with a partial seed list, {} agents restarted against a lagging controller",
        s.kernel_late_installs,
        s.kernel_max_stall_ms,
        s.controllers_lingered,
        s.agent_partial_seeds,
        s.lagging_restarts
    )
}

fn line(r: &RunReport) -> String {
    match &r.result {
        Ok(s) => {
            let agents = if s.agents == 0 {
                String::new()
            } else {
                format!(
                    "; {} agents, {} agent faults, {} kills, {} lease extensions, {} fence rounds, {} fences, {} yields, closest handovers {}/{}, {:.0}% unserved in faults, converged in {}, settled in {}; models: {}",
                    s.agents,
                    s.agent_faults,
                    s.agent_kills,
                    s.lease_extensions,
                    s.fence_rounds,
                    s.fences_proposed,
                    s.agent_yields,
                    s.closest_handover_after_expiry_ms
                        .map_or("-".into(), |t| format!("{t}ms")),
                    s.closest_handover_after_withdrawal_ms
                        .map_or("-".into(), |t| format!("{t}ms")),
                    100.0 * s.unserved_bucket_ms as f64 / s.bucket_ms.max(1) as f64,
                    s.convergence_ms.map_or("-".into(), |t| format!("{t}ms")),
                    if s.convergence_skipped {
                        "- (all live members damped)".to_string()
                    } else {
                        s.settled_ms.map_or("-".into(), |t| format!("{t}ms"))
                    },
                    models(s),
                )
            };
            format!(
            "seed {}: ok ({} events, {} leaders, {} applied, {}/{} proposals applied, {} crashes, {} partitions, {} snapshots sent, +{}/-{} controllers, end at {}ms{agents})",
            r.seed,
            s.events,
            s.leaders,
            s.last_applied,
            s.proposals_applied,
            s.proposals,
            s.crashes,
            s.partitions,
            s.snapshots_sent,
            s.controllers_added,
            s.controllers_removed,
            s.end_ms
        )
        }
        Err(f) => format!("FAIL [{:?}] {}", f.kind, f.message),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Panics are caught per seed and reported as failures; keep stderr quiet.
    std::panic::set_hook(Box::new(|_| {}));

    if let Some(seed) = args.seed {
        let mut cfg = config(&args, seed);
        cfg.print_trace = args.trace;
        cfg.hash_trace = true;
        let r = run_seed(cfg);
        println!("{}", line(&r));
        println!("trace hash {:016x}", r.trace_hash);
        return if r.result.is_ok() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }

    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let next = AtomicU64::new(args.start);
    let end = args.start + args.seeds;
    let reports = Mutex::new(Vec::new());
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= end {
                    break;
                }
                let r = run_seed(config(&args, seed));
                if let Ok(mut v) = reports.lock() {
                    v.push(r);
                }
            });
        }
    });
    let mut reports = reports.into_inner().unwrap_or_default();
    reports.sort_by_key(|r| r.seed);
    let mut failed = Vec::new();
    for r in &reports {
        if r.result.is_err() {
            failed.push(r.seed);
            println!("{}", line(r));
        } else if args.verbose {
            println!("{}", line(r));
        }
    }
    if !args.no_agents {
        let mut total = Stats::default();
        for s in reports.iter().filter_map(|r| r.result.as_ref().ok()) {
            total.kernel_late_installs += s.kernel_late_installs;
            total.kernel_max_stall_ms = total.kernel_max_stall_ms.max(s.kernel_max_stall_ms);
            total.controllers_lingered += s.controllers_lingered;
            total.agent_partial_seeds += s.agent_partial_seeds;
            total.lagging_restarts += s.lagging_restarts;
        }
        println!("passing seeds, models: {}", models(&total));
    }
    println!(
        "{} passed, {} failed",
        reports.len() - failed.len(),
        failed.len()
    );
    if !failed.is_empty() {
        let list: Vec<String> = failed.iter().map(u64::to_string).collect();
        println!("failing seeds: {}", list.join(" "));
    }
    eprintln!(
        "({} seeds in {:.1}s wall time)",
        reports.len(),
        started.elapsed().as_secs_f64()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

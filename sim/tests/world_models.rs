//! The world models of issue 10, item 4: each fires (its counter is above
//! zero) over a range of seeds, and no invariant fails meanwhile.

use vipshare_sim::{run_seed, SimConfig, Stats};

/// The CLI's full-length runs: shorter ones sometimes end before the
/// workload initialised the cluster, and then cannot converge (also without
/// these models, e.g. seeds 262 and 392 at 20 s).
fn config(seed: u64) -> SimConfig {
    SimConfig::new(seed)
}

/// Runs `seeds`, asserting each passes; the sum of `counter` over them. Few
/// seeds each (the test command runs these unoptimised; its simulator step
/// runs 500 seeds with every model and prints the counters).
fn fired(seeds: std::ops::Range<u64>, counter: impl Fn(&Stats) -> u64) -> u64 {
    let mut total = 0;
    for seed in seeds {
        match run_seed(config(seed)).result {
            Ok(s) => total += counter(&s),
            Err(f) => panic!("seed {seed} failed: {f:?}"),
        }
    }
    total
}

#[test]
fn kernel_writes_land_late_when_the_writer_stalls() {
    let n = fired(0..20, |s| s.kernel_late_installs);
    assert!(n > 0, "no install landed past the kernel delay");
}

#[test]
fn removed_controllers_keep_running_for_a_while() {
    let n = fired(100..120, |s| s.controllers_lingered);
    assert!(n > 0, "no removed controller kept running");
}

#[test]
fn agents_are_configured_with_some_controllers_only() {
    let n = fired(200..210, |s| s.agent_partial_seeds);
    assert!(n > 0, "every agent was configured with every controller");
}

#[test]
fn agents_restart_against_a_lagging_controller() {
    let n = fired(300..330, |s| s.lagging_restarts);
    assert!(n > 0, "no agent restarted right after a release");
}

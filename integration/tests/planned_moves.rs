//! Planned moves seen from the client: a drain and a host's return while one
//! source per probed bucket opens a TCP connection every 10 ms (the lab of
//! `vipshare_integration::netns`, real agents and kernels; needs root and the
//! binaries built).
//!
//! A planned move leaves its bucket unaccepted from the old owner's removal to
//! the new owner's install (the order that keeps two hosts from ever accepting
//! it together). A probe sent in that gap loses its SYN; real clients resend
//! it after 1 s, so a probe here counts as lost when it is not answered within
//! 700 ms. Buckets that do not move must lose nothing.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vipshare_integration::netns::{tcp_probe, Cluster};

const SOURCES: usize = 200;
const BUCKETS: u32 = 64;
/// Probed buckets: moving ones and staying ones alike.
const PROBED: usize = 24;
const PERIOD: Duration = Duration::from_millis(10);
/// Under the 1 s SYN retransmit: a probe slower than this lost its first SYN.
const PROBE_TIMEOUT: Duration = Duration::from_millis(700);
/// Lost probes allowed per move of a bucket: the gap of one commit
/// (Released -> Transfer -> assignment -> install), <= 20 ms, at 10 ms a probe.
const LOST_PER_MOVE: usize = 2;

fn members(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// (bucket, the source probing it).
type Probed = Vec<(u32, Ipv4Addr)>;

/// What one probe saw: its source, when it was sent, who answered or why not.
type Sample = (Ipv4Addr, Instant, Result<String, String>);

/// A probe from every source every [`PERIOD`], each on its own task, so a
/// lost SYN does not hold up the next probe.
struct Probes {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Sample>>>,
}

impl Probes {
    fn start(c: &Cluster, sources: Vec<Ipv4Addr>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let dst = c.vip_addr();
        let thread = c.net.client.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut tick = tokio::time::interval(PERIOD);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut tasks = tokio::task::JoinSet::new();
                while !s.load(Ordering::Relaxed) {
                    tick.tick().await;
                    for &src in &sources {
                        tasks.spawn(async move {
                            let at = Instant::now();
                            (src, at, tcp_probe(src, dst, PROBE_TIMEOUT).await)
                        });
                    }
                }
                let mut out = Vec::new();
                while let Some(r) = tasks.join_next().await {
                    out.push(r.expect("probe task"));
                }
                out
            })
        });
        Probes {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("probe thread")
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn ctl_ok(c: &Cluster, args: &[&str]) {
    let out = c.lab.ctl(args).expect("vipsharectl");
    assert!(
        out.status.success(),
        "vipsharectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// Issue 11's goal, not yet shown to hold on a busy machine in a debug build:
// at load average 7-8 it passed 4 of 4 runs (0-2 probes lost per move), with
// stress-ng oversubscribing the CPUs twice 2 of 3 (one run lost 5 per move, a
// 50 ms gap; the leader's commit fsync, ~8 ms on this disk, is a fixed cost);
// release builds oversubscribed passed 8 of 8. Run it by hand:
// `cargo test -p vipshare-integration --test planned_moves -- --ignored --nocapture`.
#[ignore = "planned-move gap goal (2 probes per move) not yet held under oversubscription"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_return_lose_probes_only_on_moved_buckets_and_only_for_the_gap() {
    let c = Cluster::start(3, SOURCES, BUCKETS).await.expect("lab");
    let all = members(&["h1", "h2", "h3"]);
    let before = c
        .wait_converged(&all, Duration::from_secs(30))
        .await
        .expect("initial convergence");
    // One source per bucket, h1's buckets (which the drain moves) first.
    let mut per_bucket: BTreeMap<u32, Ipv4Addr> = BTreeMap::new();
    for src in c.net.sources().expect("sources") {
        per_bucket.entry(c.bucket_of(src)).or_insert(src);
    }
    let (mut sources, others): (Probed, Probed) = per_bucket
        .into_iter()
        .partition(|(b, _)| before[*b as usize] == "h1");
    sources.truncate(PROBED / 2);
    sources.extend(others.into_iter().take(PROBED - sources.len()));
    let bucket_of: BTreeMap<Ipv4Addr, u32> = sources.iter().map(|&(b, s)| (s, b)).collect();

    let probes = Probes::start(&c, sources.iter().map(|&(_, s)| s).collect());
    let warm = Instant::now();

    ctl_ok(&c, &["drain", "h1"]);
    let drained = c
        .wait_converged(&members(&["h2", "h3"]), Duration::from_secs(30))
        .await
        .expect("drain converged");
    ctl_ok(&c, &["undrain", "h1"]);
    let back = c
        .wait_converged(&all, Duration::from_secs(30))
        .await
        .expect("return converged");
    // Probes sent up to now have had their answers by the time it finishes.
    let samples = probes.finish();

    let mut moves: BTreeMap<u32, usize> = BTreeMap::new();
    for &(b, _) in &sources {
        let i = b as usize;
        let n = usize::from(before[i] != drained[i]) + usize::from(drained[i] != back[i]);
        moves.insert(b, n);
    }
    let mut lost: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    let mut answered = 0usize;
    for (src, at, r) in &samples {
        match r {
            Ok(_) => answered += 1,
            Err(e) => lost.entry(bucket_of[src]).or_default().push(format!(
                "{src} at +{}ms: {e}",
                at.duration_since(warm).as_millis()
            )),
        }
    }
    let moved: Vec<u32> = moves
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(b, _)| *b)
        .collect();
    let mut per_move: Vec<usize> = moved
        .iter()
        .map(|b| lost.get(b).map_or(0, Vec::len).div_ceil(moves[b]))
        .collect();
    per_move.sort_unstable();
    eprintln!(
        "{} probes, {answered} answered; {} of {} probed buckets moved; lost per move of a moved bucket, sorted: {per_move:?}",
        samples.len(),
        moved.len(),
        sources.len()
    );
    assert!(
        !moved.is_empty(),
        "the drain moved none of the probed buckets"
    );
    assert!(
        moves.values().any(|&n| n == 0),
        "every probed bucket moved: nothing to compare with"
    );
    for (b, n) in &moves {
        let l = lost.get(b).map_or(&[][..], Vec::as_slice);
        if *n == 0 {
            assert!(
                l.is_empty(),
                "bucket {b} did not move but lost probes: {l:?}"
            );
        } else {
            assert!(
                l.len() <= LOST_PER_MOVE * n,
                "bucket {b} moved {n} time(s) and lost {} probes (at most {} allowed): {l:?}",
                l.len(),
                LOST_PER_MOVE * n
            );
        }
    }
}

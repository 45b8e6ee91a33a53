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

/// Waits for the map of `names` to be converged and balanced (equal weights:
/// shares differ by at most one bucket), so that no rebalancing is still under
/// way when the probes' losses are counted against the moves between maps.
async fn settled(c: &Cluster, names: &[&str]) -> Vec<String> {
    let names = members(names);
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let map = c.wait_converged(&names, left).await.expect("converged");
        let counts: Vec<usize> = names
            .iter()
            .map(|n| map.iter().filter(|o| *o == n).count())
            .collect();
        let (lo, hi) = (counts.iter().min(), counts.iter().max());
        if hi.zip(lo).is_some_and(|(h, l)| h - l <= 1) {
            return map;
        }
        assert!(Instant::now() < end, "never balanced: {counts:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
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

// Measured (the controller planning when a release applies, the hand-over
// throttled per grant): debug binaries with stress-ng oversubscribing the CPUs
// twice, 5 of 5 runs, at most 1 probe lost per move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_return_lose_probes_only_on_moved_buckets_and_only_for_the_gap() {
    let c = Cluster::start(3, SOURCES, BUCKETS).await.expect("lab");
    let before = settled(&c, &["h1", "h2", "h3"]).await;
    // One source per bucket, h1's buckets (which the drain moves) first.
    let mut per_bucket: BTreeMap<u32, Ipv4Addr> = BTreeMap::new();
    for src in c.net.sources().expect("sources") {
        per_bucket.entry(c.bucket_of(src)).or_insert(src);
    }
    let (mut sources, others): (Probed, Probed) = per_bucket
        .into_iter()
        .partition(|(b, _)| before[*b as usize] == "h1");
    sources.truncate(PROBED / 2);
    // The others from the top: h1 returning takes its share from the low
    // numbers, and some buckets must stay put to compare with.
    sources.extend(others.into_iter().rev().take(PROBED - sources.len()));
    let bucket_of: BTreeMap<Ipv4Addr, u32> = sources.iter().map(|&(b, s)| (s, b)).collect();

    let probes = Probes::start(&c, sources.iter().map(|&(_, s)| s).collect());
    let warm = Instant::now();

    ctl_ok(&c, &["drain", "h1"]);
    let drained = settled(&c, &["h2", "h3"]).await;
    ctl_ok(&c, &["undrain", "h1"]);
    let back = settled(&c, &["h1", "h2", "h3"]).await;
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

//! Data-plane benchmark in the network-namespace lab (root needed):
//!
//! 1. assignment change -> kernel: the leader commits `drain h1` (and then
//!    `undrain h1`); measured from the commit to h1's kernel set being empty
//!    (the release applied), to every bucket being in h2's or h3's kernel set
//!    (the whole planned move: release, Released, transfer, apply), and, inside
//!    the agents, from receiving an assignment to the kernel holding it; and,
//!    per moved bucket, from its removal in the old owner's kernel to its
//!    install in the new owner's. Kernel times are the kernels' acks of the
//!    writes (the agents log each change of the owned set right after the ack,
//!    on the machine's one clock); polling both kernels in process every 5 ms
//!    cross-checks the move gaps (an upper bound) and the absence of overlaps;
//! 2. TCP throughput to the VIP (multicast MAC flooded to 3 hosts, filtered)
//!    versus to a host's own address (unicast, untouched), same client, same
//!    receiving host; then again with the bridge flooding the VIP's frames to
//!    h1 alone (the filter's own cost, without the lab's extra receptions on
//!    shared CPUs); over IPv4 and over IPv6 (the lab cluster serves both
//!    VIPs, so every kernel write in 1. covers both families' sets).
//!
//! Build the binaries first, then run:
//!
//!     cargo build --release --workspace --bins
//!     cargo run --release -p vipshare-integration --example dataplane_bench
//!
//! (uses target/release binaries when they exist, else target/debug).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use time::format_description::well_known::Rfc3339;
use vipshare_agent::dataplane::linux::libnft::Nft;
use vipshare_integration::netns::{Cluster, Netns};
use vipshare_proto::v1::{self as pb, mutate_request::Op};

/// Between two polls of a kernel's owned set (the cross-check of the acks).
const POLL: Duration = Duration::from_millis(5);

/// The first moment at or after `from` when the hosts' sets, as `histories`
/// record them, satisfy `done`.
fn first_when(
    histories: &[SetHistory],
    from: Instant,
    done: impl Fn(&[BTreeSet<u32>]) -> bool,
) -> Option<Instant> {
    let mut times: Vec<Instant> = histories
        .iter()
        .flat_map(|h| h.iter().map(|e| e.0))
        .filter(|t| *t >= from)
        .collect();
    times.push(from);
    times.sort();
    times.into_iter().find(|&t| {
        let sets: Vec<BTreeSet<u32>> = histories
            .iter()
            .map(|h| {
                h.iter()
                    .rev()
                    .find(|e| e.0 <= t)
                    .map(|e| e.2.clone())
                    .unwrap_or_default()
            })
            .collect();
        done(&sets)
    })
}

/// Drain/undrain rounds (VIPSHARE_BENCH_ROUNDS overrides).
fn rounds() -> usize {
    std::env::var("VIPSHARE_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(30)
}
const BUCKETS: u32 = 64;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn summary(name: &str, v: &mut [f64]) {
    if v.is_empty() {
        println!("{name:<44} no samples");
        return;
    }
    println!(
        "{name:<44} p50 {:>8.1} ms   p99 {:>8.1} ms   (n = {}, max {:.1})",
        pct(v, 0.5),
        pct(v, 0.99),
        v.len(),
        pct(v, 1.0)
    );
}

/// Every change of one host's owned set, read by polling the kernel in
/// process (libnftables, every [`POLL`]) from a thread in its namespace:
/// (first poll that saw the set, last poll that still saw it, the set). A
/// change happened somewhere between two polls, and a busy machine can delay a
/// poll by many milliseconds, so both ends are kept.
type SetHistory = Vec<(Instant, Instant, BTreeSet<u32>)>;

fn record_sets(ns: &Netns, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<SetHistory> {
    ns.spawn(move || {
        let mut nft = Nft::new().expect("libnftables");
        let mut history: SetHistory = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let before = Instant::now();
            if let Ok(out) = nft.run("list set ip vipshare owned") {
                // `elements = { 0x00000003 timeout 500ms expires 312ms, .. }`
                let set: BTreeSet<u32> = out
                    .split(|c: char| c.is_whitespace() || c == ',' || c == '{')
                    .filter_map(|w| w.strip_prefix("0x"))
                    .filter_map(|h| u32::from_str_radix(h, 16).ok())
                    .collect();
                match history.last_mut() {
                    // The kernel answered somewhere between `before` and now:
                    // the set was certainly there at `before`'s end of the
                    // call only, so `before` bounds "still had it" from below.
                    Some((_, last, s)) if *s == set => *last = before,
                    _ => history.push((Instant::now(), before, set)),
                }
            }
            // Light enough not to starve the hosts it watches (2 CPUs for
            // everything): the acks in the agents' logs are the exact measure.
            std::thread::sleep(POLL);
        }
        history
    })
}

/// Per moved bucket: from the last poll that saw it in the old owner's kernel
/// to the first poll that saw it in the new owner's (ms, an upper bound of the
/// gap); an overlap (reported as negative) only when a poll saw it in the new
/// owner's kernel before a later poll still saw it in the old owner's, which
/// late polls cannot fake (before, the removal was dated by the first poll
/// without it: a poll thread held up on a busy machine reported overlaps).
fn move_gaps(histories: &[SetHistory]) -> Vec<f64> {
    // (when, bucket, host, added?): an add at the first poll that saw it, a
    // removal at the last poll that still saw it.
    let mut events = Vec::new();
    let mut holder: std::collections::BTreeMap<u32, usize> = Default::default();
    for (host, h) in histories.iter().enumerate() {
        if let Some((_, _, first)) = h.first() {
            holder.extend(first.iter().map(|&b| (b, host)));
        }
        for pair in h.windows(2) {
            let ((_, last_before, before), (first_after, _, after)) = (&pair[0], &pair[1]);
            events.extend(
                after
                    .difference(before)
                    .map(|&b| (*first_after, b, host, true)),
            );
            events.extend(
                before
                    .difference(after)
                    .map(|&b| (*last_before, b, host, false)),
            );
        }
    }
    events.sort_by_key(|e| e.0);
    let mut gaps = Vec::new();
    let mut removed: std::collections::BTreeMap<u32, (Instant, usize)> = Default::default();
    for (at, b, host, added) in events {
        if added {
            if let Some(&other) = holder.get(&b) {
                if other != host {
                    gaps.push(-0.001); // two kernels at once: reported as an overlap
                }
            } else if let Some((t, from)) = removed.remove(&b) {
                if from != host {
                    gaps.push(at.duration_since(t).as_secs_f64() * 1e3);
                }
            }
            holder.insert(b, host);
        } else {
            if holder.get(&b) == Some(&host) {
                holder.remove(&b);
            }
            removed.insert(b, (at, host));
        }
    }
    gaps
}

/// One host's owned set as its agent logged each change, right after the
/// kernel acknowledged the write (`kernel accepts new flows for these
/// buckets owned={..}`): the kernel applied it at most one write earlier.
fn logged_sets(log: &str) -> SetHistory {
    let (now, wall) = (Instant::now(), std::time::SystemTime::now());
    let mut history = SetHistory::new();
    for line in log.lines() {
        let Some(owned) = line
            .split_once("kernel accepts new flows for these buckets owned={")
            .and_then(|(_, rest)| rest.split_once('}'))
            .map(|(set, _)| set)
        else {
            continue;
        };
        let Some(at) = line
            .split_whitespace()
            .next()
            .and_then(|ts| time::OffsetDateTime::parse(ts, &Rfc3339).ok())
        else {
            continue;
        };
        let ago = std::time::SystemTime::from(at)
            .duration_since(wall)
            .map_or_else(|e| e.duration(), |_| Duration::ZERO);
        let at = now - ago;
        let set = owned
            .split(',')
            .filter_map(|b| b.trim().parse().ok())
            .collect();
        history.push((at, at, set));
    }
    // Exact, unlike polls: each set held until the next change was acked.
    for i in 1..history.len() {
        history[i - 1].1 = history[i].0;
    }
    history
}

async fn mutate(c: &Cluster, op: Op) -> anyhow::Result<Instant> {
    c.lab.mutate(op).await?;
    Ok(Instant::now())
}

/// Sink servers on port 9000: read everything, discard.
fn start_sinks(c: &Cluster, stop: Arc<AtomicBool>) {
    for ns in &c.net.hosts {
        let stop = stop.clone();
        ns.spawn(move || {
            // Dual-stack: IPv4 clients arrive as mapped addresses.
            let l = std::net::TcpListener::bind("[::]:9000").expect("sink bind");
            l.set_nonblocking(true).unwrap();
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        std::thread::spawn(move || {
                            let mut buf = vec![0u8; 1 << 16];
                            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
    }
}

/// Bytes per second sent from `src` to `dst` for `secs`.
fn throughput(client: &Netns, src: IpAddr, dst: SocketAddr, secs: u64) -> anyhow::Result<f64> {
    client.run(move || {
        let domain = socket2::Domain::for_address(dst);
        let sock = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
        sock.bind(&SocketAddr::new(src, 0).into())?;
        sock.connect_timeout(&dst.into(), Duration::from_secs(3))?;
        let mut s: std::net::TcpStream = sock.into();
        let chunk = vec![0x5au8; 1 << 16];
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < Duration::from_secs(secs) {
            s.write_all(&chunk)?;
            sent += chunk.len() as u64;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        Ok(sent as f64 / start.elapsed().as_secs_f64())
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    if std::env::var_os("VIPSHARE_PROFILE").is_none() {
        let release = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/release/vipshare-agent")
            .exists();
        std::env::set_var(
            "VIPSHARE_PROFILE",
            if release { "release" } else { "debug" },
        );
    }
    println!(
        "binaries: target/{}",
        std::env::var("VIPSHARE_PROFILE").unwrap()
    );
    let c = Cluster::start(3, 50, BUCKETS).await?;
    let all: Vec<String> = (0..3).map(|i| c.member(i)).collect();
    c.wait_converged(&all, Duration::from_secs(30)).await?;

    // 1. Assignment change -> kernel state.
    let rec_stop = Arc::new(AtomicBool::new(false));
    let recorders: Vec<_> = c
        .net
        .hosts
        .iter()
        .map(|ns| record_sets(ns, rec_stop.clone()))
        .collect();
    let (mut drains, mut undrains) = (Vec::new(), Vec::new());
    let rounds = rounds();
    let drained = |sets: &[BTreeSet<u32>]| {
        sets[0].is_empty()
            && sets[1].len() + sets[2].len() == BUCKETS as usize
            && sets[1].is_disjoint(&sets[2])
    };
    for _ in 0..rounds {
        let h1_before = c.bucket_map()?.iter().filter(|o| *o == "h1").count();
        if h1_before == 0 {
            bail!("h1 owned nothing before the drain");
        }
        let t0 = mutate(&c, Op::Drain(pb::Drain { name: "h1".into() })).await?;
        loop {
            let sets: Vec<BTreeSet<u32>> = c
                .net
                .hosts
                .iter()
                .map(|h| vipshare_integration::netns::owned_set(h).unwrap_or_default())
                .collect();
            if drained(&sets) {
                break;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("drain never completed");
            }
            std::thread::sleep(POLL);
        }
        drains.push(t0);
        let t1 = mutate(&c, Op::Undrain(pb::Undrain { name: "h1".into() })).await?;
        c.wait_converged(&all, Duration::from_secs(60)).await?;
        undrains.push(t1);
    }
    rec_stop.store(true, Ordering::Relaxed);
    let histories: Vec<SetHistory> = recorders
        .into_iter()
        .map(|r| r.join().expect("recorder"))
        .collect();
    // Each agent's log, read once: the acks' times and the applies' figures.
    let agent_logs: Vec<String> = c.agents.iter().map(|a| a.log_text()).collect();
    if let Some(dir) = std::env::var_os("VIPSHARE_BENCH_LOGS") {
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir)?;
        for (i, text) in agent_logs.iter().enumerate() {
            std::fs::write(dir.join(format!("agent-h{}.log", i + 1)), text)?;
        }
        for (id, p) in &c.lab.controllers {
            std::fs::write(dir.join(format!("controller-{id}.log")), p.log_text())?;
        }
    }
    let logged: Vec<SetHistory> = agent_logs.iter().map(|t| logged_sets(t)).collect();
    // From each mutation's commit to the acks of the kernel writes it led to.
    let since = |from: &Instant, done: &dyn Fn(&[BTreeSet<u32>]) -> bool| {
        first_when(&logged, *from, done).map(|t| t.duration_since(*from).as_secs_f64() * 1e3)
    };
    let balanced = |sets: &[BTreeSet<u32>]| {
        sets.iter().all(|h| h.len() >= BUCKETS as usize / 3)
            && sets.iter().map(BTreeSet::len).sum::<usize>() == BUCKETS as usize
    };
    let mut release: Vec<f64> = drains
        .iter()
        .filter_map(|t| since(t, &|s| s[0].is_empty()))
        .collect();
    let mut moved: Vec<f64> = drains.iter().filter_map(|t| since(t, &drained)).collect();
    let mut back: Vec<f64> = undrains
        .iter()
        .filter_map(|t| since(t, &balanced))
        .collect();
    let mut acked_gaps = move_gaps(&logged);
    let mut gaps = move_gaps(&histories);
    let overlaps = gaps.iter().filter(|g| **g < 0.0).count();
    let (mut inside, mut writes): (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
    // Applies onto a filter already built (renewals, moves), apart from the
    // rebuilds (an agent's start, a repair), which go through libnftables.
    let (mut changes, mut rebuilds): (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
    let field = |line: &str, key: &str| {
        line.split(key)
            .nth(1)
            .and_then(|r| r.split(|ch: char| !ch.is_ascii_digit()).next())
            .and_then(|n| n.parse::<f64>().ok())
    };
    // The slowest applies with the log lines before them: what they waited on.
    let mut slowest: Vec<(f64, String)> = Vec::new();
    for text in &agent_logs {
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.contains("assignment applied") {
                if let Some(us) = field(line, "took_us=") {
                    inside.push(us / 1e3);
                    let rebuilt = i > 0 && lines[i - 1].contains("kernel rebuilt");
                    if rebuilt { &mut rebuilds } else { &mut changes }.push(us / 1e3);
                    let context = lines[i.saturating_sub(3)..=i].join("\n    ");
                    slowest.push((us / 1e3, context));
                }
                if let Some(us) = field(line, "apply_us=") {
                    writes.push(us / 1e3);
                }
            }
        }
    }
    println!("\n== assignment change -> kernel ({rounds} drain/undrain rounds of h1, {BUCKETS} buckets, 3 hosts)");
    summary("commit of drain -> release in h1's kernel", &mut release);
    summary("commit of drain -> all buckets on h2/h3", &mut moved);
    summary("commit of undrain -> rebalanced", &mut back);
    summary("agent: assignment received -> kernel applied", &mut inside);
    summary("agent: of which the apply (kernel writes)", &mut writes);
    summary("agent: received -> applied, no rebuild", &mut changes);
    summary("agent: received -> applied, rebuilds", &mut rebuilds);
    slowest.sort_by(|a, b| b.0.total_cmp(&a.0));
    for (ms, context) in slowest.iter().take(2).filter(|(ms, _)| *ms > 5.0) {
        println!("  slow apply, {ms:.1} ms:\n    {context}");
    }
    let acked_overlaps = acked_gaps.iter().filter(|g| **g < 0.0).count();
    summary("planned move: removal -> install (acks)", &mut acked_gaps);
    summary("planned move: removal -> install (polled)", &mut gaps);
    println!(
        "{:<44} {overlaps} polled, {acked_overlaps} acked (buckets in two kernels at once; must be 0)",
        "overlaps seen"
    );

    // 2. Throughput through the filter vs a plain address.
    let stop = Arc::new(AtomicBool::new(false));
    start_sinks(&c, stop.clone());
    std::thread::sleep(Duration::from_millis(200));
    let map = c.bucket_map()?;
    let h1 = |a: IpAddr| map[c.bucket_of(a) as usize] == "h1";
    let src4 = c
        .net
        .sources()?
        .into_iter()
        .map(IpAddr::from)
        .find(|&s| h1(s));
    let src6 = c
        .net
        .sources6()?
        .into_iter()
        .map(IpAddr::from)
        .find(|&s| h1(s));
    let host6 = vipshare_integration::netns::v6_twin(c.net.host_ip(0));
    let families = [
        (
            "IPv4",
            src4,
            IpAddr::from(c.net.vip()),
            IpAddr::from(c.net.host_ip(0)),
        ),
        (
            "IPv6",
            src6,
            IpAddr::from(c.net.vip6()),
            IpAddr::from(host6),
        ),
    ];
    // The lab's bridge floods the multicast MAC to every port (h1-h3 and the
    // root link) and all of them share these 2 CPUs: the VIP pays for four
    // receptions where the plain address pays for one. On a real network the
    // switch copies the frames and every host has its own CPUs, so the
    // filter's own cost is measured with flooding kept to h1's port
    // (`mcast_flood off` on the others) as well.
    let flood = |on: &str| -> anyhow::Result<()> {
        for port in ["h2", "h3", "root"] {
            c.net
                .switch
                .exec("bridge", &["link", "set", "dev", port, "mcast_flood", on])?;
        }
        Ok(())
    };
    for (family, src, vip, plain) in families {
        let src = src.with_context(|| format!("an {family} source of h1"))?;
        let (vip, plain) = (SocketAddr::new(vip, 9000), SocketAddr::new(plain, 9000));
        println!(
            "\n== TCP throughput over {family}, client -> h1 (3 runs of 2 s each, alternating)"
        );
        for (label, flooded) in [
            ("VIP, flooded to 3 hosts + root, filtered", true),
            ("VIP, flooded to h1 only, filtered", false),
        ] {
            flood(if flooded { "on" } else { "off" })?;
            let mut ratios = Vec::new();
            let (mut v_all, mut p_all) = (Vec::new(), Vec::new());
            for _ in 0..3 {
                let v = throughput(&c.net.client, src, vip, 2)?;
                let p = throughput(&c.net.client, src, plain, 2)?;
                ratios.push(v / p);
                v_all.push(v / 1e6);
                p_all.push(p / 1e6);
            }
            println!(
                "{label:<44} median {:.0} MB/s; h1's own address (unicast, no rules) median {:.0} MB/s; ratio median {:.2} (runs: {})",
                pct(&mut v_all, 0.5),
                pct(&mut p_all, 0.5),
                pct(&mut ratios.clone(), 0.5),
                ratios
                    .iter()
                    .map(|r| format!("{r:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        flood("on")?;
    }
    stop.store(true, Ordering::Relaxed);
    Ok(())
}

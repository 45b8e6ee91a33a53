//! Scale: N synthetic agents against 3 controllers on this machine, each with its
//! own certificate and real mTLS connections to every controller, heartbeating
//! every `heartbeat_ms` and watching its assignment stream from every controller
//! (confirming releases as a real agent does), with no kernel behind them.
//! Reports per N: controller CPU (cores) and resident memory, heartbeat ack
//! p50/p99, commit p50/p99 (no-op proposals during the load), and failover (one
//! agent goes silent: time until the map has none of its buckets).
//!
//!     cargo build --release --workspace --bins
//!     VIPSHARE_PROFILE=release cargo run --release -p vipshare-integration \
//!         --example scale_bench -- 64 256 1024
//!
//! Agents heartbeat over one stream per controller, as the node agent does;
//! `--unary` makes them send one unary call per heartbeat instead (agents
//! before the stream), for comparison.
//!
//! The agents share this process (and the 2 CPUs) with the controllers, so the
//! figures are an upper bound of what a controller host would see.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use futures::StreamExt;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use vipshare_integration::Lab;
use vipshare_proto::pki::{self, Role};
use vipshare_proto::tls;
use vipshare_proto::v1::admin_api_client::AdminApiClient;
use vipshare_proto::v1::agent_api_client::AgentApiClient;
use vipshare_proto::v1::{self as pb, mutate_request::Op};
use vipshare_proto::PROTOCOL_VERSION;

const BUCKETS: u32 = 4096;
const HEARTBEAT: Duration = Duration::from_millis(100);
/// Load measured this long once every agent holds its buckets.
const WINDOW: Duration = Duration::from_secs(10);

/// What every synthetic agent records.
#[derive(Default)]
struct Shared {
    /// Heartbeat send-to-reply times of acked heartbeats, microseconds.
    acks: Mutex<Vec<u32>>,
    refused: AtomicU64,
    failed: AtomicU64,
    /// The latest reason a heartbeat was refused or failed (diagnostics).
    last_error: Mutex<String>,
    recording: AtomicBool,
}

struct Agent {
    name: String,
    silent: Arc<AtomicBool>,
}

/// One synthetic agent: heartbeats to every controller at the member epoch its
/// assignments carry; Released for every bucket an assignment asks it to release.
async fn agent(name: String, channels: Vec<Channel>, shared: Arc<Shared>, silent: Arc<AtomicBool>) {
    let epoch = Arc::new(AtomicU64::new(0));
    // The newest assignment's release list (applied index, buckets): confirmed
    // to every controller until an assignment no longer lists them.
    let release: Arc<Mutex<(u64, Vec<pb::BucketGrant>)>> = Arc::default();
    for ch in &channels {
        let (name, epoch, release) = (name.clone(), epoch.clone(), release.clone());
        let mut client = AgentApiClient::new(ch.clone());
        tokio::spawn(async move {
            loop {
                let req = pb::WatchRequest {
                    protocol_version: PROTOCOL_VERSION,
                    member: name.clone(),
                };
                if let Ok(stream) = client.watch_assignments(req).await {
                    let mut stream = stream.into_inner();
                    while let Ok(Some(a)) = stream.message().await {
                        epoch.fetch_max(a.member_epoch, Ordering::Relaxed);
                        if let Ok(mut r) = release.lock() {
                            if a.applied_index > r.0 {
                                *r = (a.applied_index, a.release);
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }
    // As the real agent: one long-lived heartbeat stream per controller
    // (`None`: unary calls, the agents before the stream).
    let streams: Option<Vec<mpsc::Sender<(pb::HeartbeatRequest, Instant)>>> =
        STREAMS.load(Ordering::Relaxed).then(|| {
            channels
                .iter()
                .map(|ch| {
                    let (tx, rx) = mpsc::channel(8);
                    tokio::spawn(heartbeat_stream(
                        AgentApiClient::new(ch.clone()),
                        rx,
                        shared.clone(),
                        epoch.clone(),
                    ));
                    tx
                })
                .collect()
        });
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut round = 0u64;
    loop {
        tick.tick().await;
        if silent.load(Ordering::Relaxed) {
            continue;
        }
        round += 1;
        let pending = release.lock().map(|r| r.1.clone()).unwrap_or_default();
        if !pending.is_empty() && round.is_multiple_of(5) {
            for ch in &channels {
                let req = pb::ReleasedRequest {
                    protocol_version: PROTOCOL_VERSION,
                    member: name.clone(),
                    buckets: pending.clone(),
                };
                let mut c = AgentApiClient::new(ch.clone());
                tokio::spawn(async move { c.released(req).await });
            }
        }
        let request = || pb::HeartbeatRequest {
            protocol_version: PROTOCOL_VERSION,
            assignment_index: None,
            problems: Vec::new(),
            member: name.clone(),
            member_epoch: epoch.load(Ordering::Relaxed),
            round,
        };
        if let Some(streams) = &streams {
            for s in streams {
                let req = request();
                // Full: that stream is stuck; the round is lost for it.
                if s.try_send((req, Instant::now())).is_err() {
                    shared.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            continue;
        }
        for ch in &channels {
            let req = request();
            let mut client = AgentApiClient::new(ch.clone());
            let (shared, epoch) = (shared.clone(), epoch.clone());
            tokio::spawn(async move {
                let sent = Instant::now();
                let reply =
                    tokio::time::timeout(Duration::from_secs(1), client.heartbeat(req)).await;
                if let Ok(Ok(r)) = &reply {
                    // As the real agent: a newer epoch in a reply is adopted.
                    epoch.fetch_max(r.get_ref().member_epoch, Ordering::Relaxed);
                }
                match reply {
                    Ok(Ok(r)) if r.get_ref().acked => {
                        if shared.recording.load(Ordering::Relaxed) {
                            let us = sent.elapsed().as_micros().min(u32::MAX as u128) as u32;
                            if let Ok(mut v) = shared.acks.lock() {
                                v.push(us);
                            }
                        }
                    }
                    Ok(Ok(r)) => {
                        shared.refused.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut e) = shared.last_error.lock() {
                            *e = format!("refused: {}", r.get_ref().reason);
                        }
                    }
                    Ok(Err(s)) => {
                        shared.failed.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut e) = shared.last_error.lock() {
                            *e = format!("failed: {}", s.message());
                        }
                    }
                    Err(_) => drop(shared.failed.fetch_add(1, Ordering::Relaxed)),
                }
            });
        }
    }
}

/// Whether agents heartbeat over streams (default) or unary calls (`--unary`).
static STREAMS: AtomicBool = AtomicBool::new(true);

/// Records one heartbeat reply (acked, refused) sent at `sent`.
fn record(shared: &Shared, epoch: &AtomicU64, r: &pb::HeartbeatReply, sent: Instant) {
    // As the real agent: a newer epoch in a reply is adopted.
    epoch.fetch_max(r.member_epoch, Ordering::Relaxed);
    if r.acked {
        if shared.recording.load(Ordering::Relaxed) {
            let us = sent.elapsed().as_micros().min(u32::MAX as u128) as u32;
            if let Ok(mut v) = shared.acks.lock() {
                v.push(us);
            }
        }
    } else {
        shared.refused.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut e) = shared.last_error.lock() {
            *e = format!("refused: {}", r.reason);
        }
    }
}

/// One agent's heartbeat stream to one controller, reopened with the next
/// round when it ends; replies come in order and are matched to send times.
async fn heartbeat_stream(
    mut client: AgentApiClient<Channel>,
    mut rounds: mpsc::Receiver<(pb::HeartbeatRequest, Instant)>,
    shared: Arc<Shared>,
    epoch: Arc<AtomicU64>,
) {
    while let Some((first, sent)) = rounds.recv().await {
        let (out, out_rx) = mpsc::channel(8);
        let _ = out.try_send(first.clone());
        let mut pending = std::collections::VecDeque::from([(first.round, sent)]);
        let reqs = tokio_stream::wrappers::ReceiverStream::new(out_rx);
        let mut replies = match client.heartbeats(reqs).await {
            Ok(r) => r.into_inner(),
            Err(s) => {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut e) = shared.last_error.lock() {
                    *e = format!("failed: {}", s.message());
                }
                continue;
            }
        };
        loop {
            tokio::select! {
                next = rounds.recv() => {
                    let Some((req, sent)) = next else { return };
                    // A request unanswered for 1 s: count it failed, reopen.
                    if pending.front().is_some_and(|(_, t)| t.elapsed() > Duration::from_secs(1)) {
                        shared.failed.fetch_add(pending.len() as u64, Ordering::Relaxed);
                        break;
                    }
                    pending.push_back((req.round, sent));
                    if out.try_send(req).is_err() {
                        break;
                    }
                }
                reply = replies.message() => match reply {
                    Ok(Some(r)) => {
                        while let Some((round, sent)) = pending.pop_front() {
                            if round == r.round {
                                record(&shared, &epoch, &r, sent);
                                break;
                            }
                        }
                    }
                    _ => {
                        shared.failed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                },
            }
        }
    }
}

/// Percentile `q` (0..=1) of sorted `v`.
fn pct<T: Copy>(v: &[T], q: f64) -> Option<T> {
    if v.is_empty() {
        return None;
    }
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    Some(v[i])
}

/// utime + stime of `pid` in clock ticks, and its resident set in KiB.
fn proc_usage(pid: u32) -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(") ").context("stat format")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after "state".
    let ticks = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Ok((ticks, rss))
}

async fn buckets(admin: &mut AdminApiClient<Channel>) -> anyhow::Result<Vec<pb::BucketInfo>> {
    Ok(admin
        .buckets(pb::ReadRequest {
            protocol_version: PROTOCOL_VERSION,
            local: true,
        })
        .await?
        .into_inner()
        .buckets)
}

/// Mutate on the leader, following leadership changes; "already" counts as done
/// (a retried proposal whose first attempt had applied).
async fn mutate(lab: &Lab, admin: &mut AdminApiClient<Channel>, op: Op) -> anyhow::Result<()> {
    let t = Instant::now();
    loop {
        let req = pb::MutateRequest {
            protocol_version: PROTOCOL_VERSION,
            op: Some(op.clone()),
        };
        match admin.mutate(req).await {
            Ok(_) => return Ok(()),
            Err(s) if s.message().contains("already") => return Ok(()),
            Err(s) if t.elapsed() < Duration::from_secs(30) => {
                eprintln!("retrying after: {}", s.message());
                let leader = lab.wait_leader(Duration::from_secs(30)).await?;
                *admin = lab.client(leader).await?;
            }
            Err(s) => anyhow::bail!("{}", s.message()),
        }
    }
}

async fn run(n: usize) -> anyhow::Result<String> {
    let mut lab = Lab::new("127.0.40", 3)?;
    lab.start_founders(3)?;
    let leader = lab.wait_leader(Duration::from_secs(30)).await?;
    let mut admin = lab.client(leader).await?;
    mutate(
        &lab,
        &mut admin,
        Op::InitCluster(pb::InitCluster {
            settings: Some(pb::ClusterSettings {
                vips: vec![pb::Vip {
                    address: "192.0.2.10".into(),
                    prefix_len: 0,
                    mac: String::new(),
                    mode: String::new(),
                }],
                bucket_count: BUCKETS,
                bucket_function: "jhash".into(),
                affinity: "address".into(),
                ..Default::default()
            }),
        }),
    )
    .await?;
    let shared = Arc::new(Shared::default());
    let mut agents = Vec::new();
    let t = Instant::now();
    // Members are added 32 at a time (raft commits concurrent proposals
    // together), each agent started once its member exists.
    let names: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
    for name in &names {
        pki::issue(&lab.certs, Role::Agent, name, &[], &[], 30)?;
    }
    {
        let adds = futures::stream::iter(names.iter().map(|name| {
            let (lab, mut admin) = (&lab, admin.clone());
            async move {
                let add = Op::AddMember(pb::AddMember {
                    name: name.clone(),
                    weight: 100,
                });
                mutate(lab, &mut admin, add)
                    .await
                    .with_context(|| format!("member add {name}"))?;
                anyhow::Ok(name.clone())
            }
        }))
        .buffer_unordered(32);
        futures::pin_mut!(adds);
        while let Some(name) = adds.next().await {
            let name = name?;
            let cfg = tls::client_config(&lab.files(Role::Agent, &name))?;
            // Each agent connects from an address of its own, as hosts would:
            // the controllers admit at most 16 pending handshakes per source.
            let i: usize = name[1..].parse()?;
            let local = std::net::Ipv4Addr::new(127, 250, (i / 250) as u8, (i % 250 + 1) as u8);
            let channels = (1..=3)
                .map(|id| {
                    let uri = format!("https://{}", lab.address(id));
                    tls::channel_from(&uri, cfg.clone(), Some(local.into()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let silent = Arc::new(AtomicBool::new(false));
            tokio::spawn(agent(
                name.clone(),
                channels,
                shared.clone(),
                silent.clone(),
            ));
            agents.push(Agent { name, silent });
        }
    }
    eprintln!(
        "[N={n}] {n} members added and started in {:.1?}",
        t.elapsed()
    );
    // Every bucket owned, by every member.
    let t = Instant::now();
    loop {
        let map = buckets(&mut admin).await?;
        let owners: std::collections::BTreeSet<&str> =
            map.iter().map(|b| b.owner.as_str()).collect();
        if map.iter().all(|b| !b.owner.is_empty()) && owners.len() == n {
            break;
        }
        if t.elapsed() > Duration::from_secs(120) {
            let ms = admin
                .members(pb::ReadRequest {
                    protocol_version: PROTOCOL_VERSION,
                    local: true,
                })
                .await?
                .into_inner();
            for m in ms.members.iter().take(8) {
                eprintln!("{m:?}");
            }
        }
        ensure!(
            t.elapsed() < Duration::from_secs(120),
            "not converged after 120 s: {} owners, {} unowned; heartbeats {} refused, {} failed, last {:?}",
            owners.len(),
            map.iter().filter(|b| b.owner.is_empty()).count(),
            shared.refused.load(Ordering::Relaxed),
            shared.failed.load(Ordering::Relaxed),
            shared.last_error.lock().map(|e| e.clone()).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("[N={n}] converged in {:.1?}", t.elapsed());

    // The measured window: heartbeats, CPU, memory, commits.
    let pids: BTreeMap<u64, u32> = lab
        .controllers
        .iter()
        .filter_map(|(id, c)| Some((*id, c.pid()?)))
        .collect();
    let before: BTreeMap<u64, (u64, u64)> = pids
        .iter()
        .map(|(id, pid)| Ok((*id, proc_usage(*pid)?)))
        .collect::<anyhow::Result<_>>()?;
    let (refused0, failed0) = (
        shared.refused.load(Ordering::Relaxed),
        shared.failed.load(Ordering::Relaxed),
    );
    shared.recording.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let mut commits = Vec::new();
    while started.elapsed() < WINDOW {
        let t = Instant::now();
        let noop = Op::Noop(pb::Noop {
            payload: vec![0; 64],
        });
        mutate(&lab, &mut admin, noop).await?;
        commits.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shared.recording.store(false, Ordering::Relaxed);
    let secs = started.elapsed().as_secs_f64();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut cpu = Vec::new();
    for (id, pid) in &pids {
        let (ticks, rss) = proc_usage(*pid)?;
        let cores = (ticks - before[id].0) as f64 / hz / secs;
        cpu.push(format!(
            "c{id} {cores:.2} cores {:.0} MiB",
            rss as f64 / 1024.0
        ));
    }
    let mut acks = std::mem::take(&mut *shared.acks.lock().map_err(|_| anyhow::anyhow!("lock"))?);
    acks.sort_unstable();
    commits.sort();
    let refused = shared.refused.load(Ordering::Relaxed) - refused0;
    let failed = shared.failed.load(Ordering::Relaxed) - failed0;

    // Failover: one agent goes silent; time until none of its buckets is its own.
    let victim = &agents[n / 2];
    let t = Instant::now();
    victim.silent.store(true, Ordering::Relaxed);
    let failover = loop {
        let map = buckets(&mut admin).await?;
        if map
            .iter()
            .all(|b| b.owner != victim.name && !b.owner.is_empty())
        {
            break t.elapsed();
        }
        ensure!(t.elapsed() < Duration::from_secs(30), "no failover in 30 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let ms = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    let us = |v: Option<u32>| v.map_or(f64::NAN, |v| v as f64 / 1e3);
    Ok(format!(
        "| {n} | {} | {:.1} / {:.1} ms ({} acks, {refused} refused, {failed} failed) | {:.1} / {:.1} ms (n={}) | {:.0} ms |",
        cpu.join("; "),
        us(pct(&acks, 0.5)),
        us(pct(&acks, 0.99)),
        acks.len(),
        ms(pct(&commits, 0.5)),
        ms(pct(&commits, 0.99)),
        commits.len(),
        failover.as_secs_f64() * 1e3,
    ))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    STREAMS.store(!args.iter().any(|a| a == "--unary"), Ordering::Relaxed);
    let ns: Vec<usize> = args
        .iter()
        .filter(|a| *a != "--unary")
        .map(|a| a.parse().with_context(|| format!("N {a:?}")))
        .collect::<anyhow::Result<_>>()?;
    let ns = if ns.is_empty() {
        vec![64, 256, 1024]
    } else {
        ns
    };
    // 3 connections per agent, plus the controllers' own.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    println!("| agents | controller CPU and RSS | heartbeat ack p50 / p99 | commit p50 / p99 | failover |");
    println!("|---|---|---|---|---|");
    for n in ns {
        // A runtime per N, so that the previous N's agents stop with it.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let row = rt.block_on(run(n))?;
        rt.shutdown_timeout(Duration::from_secs(1));
        println!("{row}");
    }
    Ok(())
}

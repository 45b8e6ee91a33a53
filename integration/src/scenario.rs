//! Scenario harness (issue 7): failure scenarios written against a
//! [`HostProvider`], checked from the client side.
//!
//! A scenario sees the cluster the way an operator and a client do: it crashes,
//! revives, partitions and restarts hosts and controllers through the provider,
//! reads the bucket map with `vipsharectl buckets --json`, and judges the data
//! plane only by what client connections get back (who answered, or a reset, or
//! nothing). [`NetnsProvider`] implements the provider with network namespaces
//! on this machine; a FreeBSD bhyve harness (`integration/bhyve/`) can implement
//! the same trait with VMs.
//!
//! # The netns implementation
//! ```text
//!  root namespace                         switch namespace vssK_sw
//!  controllers 10.K.0.1-3 (link vssK) --- br0
//!                                          |-- vssK_hN: eth0 10.K.1.N/16, VIP 10.K.0.100
//!                                          `-- vssK_c:  eth0 10.K.2.1 .. (one per source)
//! ```
//! `K` is claimed from 100..=159 by creating the root-side link `vssK`, which
//! fails when another lab (this process or another) holds it, so scenario labs
//! never share names or addresses with each other nor with the
//! [`crate::netns::NetLab`]s of `dataplane.rs` (which use 160..=249).
//!
//! A host crash takes the host's switch port down, SIGKILLs its agent and stops
//! its servers; a revival is a fresh boot: the host namespace is deleted and
//! made anew (no kernel state, no agent state directory), the port comes up,
//! servers and agent start.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use vipshare_core::policy;
use vipshare_proto::v1::{self as pb, mutate_request::Op};

use crate::netns::{
    owned_set, require_root, sh, write_agent_config, Accepted, AgentProc, Netns, RootLink, Servers,
    PORT,
};

// ------------------------------------------------------------------ client side

/// What one client connection got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The first line the server sent: the name of the host that accepted.
    Answered(String),
    /// Refused or reset (an RST).
    Reset(String),
    /// No answer within the probe's timeout. `connected`: the handshake had
    /// completed (a host's kernel accepted; its server never answered), else
    /// no SYN-ACK came (no host's kernel accepted the flow).
    Timeout { connected: bool },
    /// Any other error.
    Failed(String),
}

/// One new TCP connection to the VIP from `src`.
#[derive(Debug, Clone)]
pub struct Probe {
    pub src: Ipv4Addr,
    pub sent: Instant,
    pub done: Instant,
    pub outcome: Outcome,
}

impl Probe {
    pub fn answer(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Answered(h) => Some(h),
            _ => None,
        }
    }
}

/// The client machine: many source addresses, a route to the VIP.
pub trait ClientSide: Send + Sync + 'static {
    /// Every source address the client can send from.
    fn sources(&self) -> Vec<Ipv4Addr>;
    /// One new TCP connection from each of `sources`, all at once.
    fn connect_round(&self, sources: &[Ipv4Addr], timeout: Duration) -> Vec<Probe>;
    /// Until `stop`: every `every`, each source starts a new TCP connection
    /// (without waiting for its previous one), each given `timeout`; every
    /// finished probe is pushed to `sink`. Blocks until stopped.
    fn probe_loop(
        &self,
        sources: Vec<Ipv4Addr>,
        every: Duration,
        timeout: Duration,
        stop: Arc<AtomicBool>,
        sink: Arc<Mutex<Vec<Probe>>>,
    );
    /// One UDP datagram from each source; every reply within `wait`.
    fn udp_round(&self, sources: &[Ipv4Addr], wait: Duration) -> Vec<(Ipv4Addr, Vec<String>)>;
    /// A connection that stays open, sending a line every `every`.
    fn long_lived(&self, src: Ipv4Addr, every: Duration) -> LongLived;
    /// Runs `f` on the client's network (its addresses and routes).
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T
    where
        Self: Sized;
}

/// A TCP connection kept open; records every answer until closed or broken.
pub struct LongLived {
    pub src: Ipv4Addr,
    stop: Arc<AtomicBool>,
    answers: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl LongLived {
    /// Spawns the connection on a thread made by `spawn` (which places it on
    /// the client's network).
    pub fn start(
        src: Ipv4Addr,
        dst: SocketAddrV4,
        every: Duration,
        spawn: impl FnOnce(
            Box<dyn FnOnce() -> Result<(), String> + Send>,
        ) -> JoinHandle<Result<(), String>>,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let (s, a) = (stop.clone(), answers.clone());
        let thread = spawn(Box::new(move || long_lived_body(src, dst, every, &s, &a)));
        LongLived {
            src,
            stop,
            answers,
            thread: Some(thread),
        }
    }

    /// Answers so far.
    pub fn answers(&self) -> Vec<String> {
        self.answers.lock().unwrap().clone()
    }

    /// Whether the connection already ended (broke).
    pub fn ended(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Closes the connection: its answers, or how it broke.
    pub fn close(mut self) -> Result<Vec<String>, String> {
        self.stop.store(true, Ordering::Relaxed);
        let r = self.thread.take().expect("joined once").join();
        let answers = self.answers();
        match r {
            Ok(Ok(())) => Ok(answers),
            Ok(Err(e)) => Err(format!("{e} (answers: {answers:?})")),
            Err(_) => Err("connection thread panicked".into()),
        }
    }
}

impl Drop for LongLived {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn long_lived_body(
    src: Ipv4Addr,
    dst: SocketAddrV4,
    every: Duration,
    stop: &AtomicBool,
    answers: &Mutex<Vec<String>>,
) -> Result<(), String> {
    use std::io::{BufRead, BufReader, Write};
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(|e| e.to_string())?;
    sock.bind(&SocketAddrV4::new(src, 0).into())
        .map_err(|e| e.to_string())?;
    sock.connect_timeout(&dst.into(), Duration::from_secs(3))
        .map_err(|e| format!("connect: {e}"))?;
    let stream: std::net::TcpStream = sock.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    let mut w = stream.try_clone().map_err(|e| e.to_string())?;
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line)
        .map_err(|e| format!("first read: {e}"))?;
    answers.lock().unwrap().push(line.trim().to_string());
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(every);
        let n = answers.lock().unwrap().len();
        w.write_all(b"ping\n")
            .map_err(|e| format!("write after {n} answers: {e}"))?;
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return Err(format!("closed by the server after {n} answers")),
            Ok(_) => answers.lock().unwrap().push(line.trim().to_string()),
            Err(e) => return Err(format!("read after {n} answers: {e}")),
        }
    }
    Ok(())
}

/// One probe: connect from `src`, read the first line.
pub async fn probe(src: Ipv4Addr, dst: SocketAddrV4, timeout: Duration) -> Probe {
    use tokio::io::AsyncBufReadExt;
    let sent = Instant::now();
    let connected = std::sync::atomic::AtomicBool::new(false);
    let attempt = async {
        let s = tokio::net::TcpSocket::new_v4()?;
        s.bind(SocketAddrV4::new(src, 0).into())?;
        let stream = s.connect(dst.into()).await?;
        connected.store(true, Ordering::Relaxed);
        let mut r = tokio::io::BufReader::new(stream);
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed without an answer",
            ));
        }
        Ok(line.trim().to_string())
    };
    let outcome = match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(name)) => Outcome::Answered(name),
        Ok(Err(e)) => match e.kind() {
            std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset => {
                Outcome::Reset(e.to_string())
            }
            _ => Outcome::Failed(e.to_string()),
        },
        Err(_) => Outcome::Timeout {
            connected: connected.load(Ordering::Relaxed),
        },
    };
    Probe {
        src,
        sent,
        done: Instant::now(),
        outcome,
    }
}

/// The body of [`ClientSide::probe_loop`], for a thread already on the client's network.
pub fn run_probe_loop(
    dst: SocketAddrV4,
    sources: Vec<Ipv4Addr>,
    every: Duration,
    timeout: Duration,
    stop: Arc<AtomicBool>,
    sink: Arc<Mutex<Vec<Probe>>>,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut tasks = Vec::new();
        for (i, src) in sources.into_iter().enumerate() {
            let (stop, sink) = (stop.clone(), sink.clone());
            // Spread the sources over one period.
            let offset = Duration::from_nanos(every.as_nanos() as u64 * (i as u64 % 16) / 16);
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(offset).await;
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut inflight = tokio::task::JoinSet::new();
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let sink = sink.clone();
                    inflight.spawn(async move {
                        let p = probe(src, dst, timeout).await;
                        sink.lock().unwrap().push(p);
                    });
                    while inflight.try_join_next().is_some() {}
                }
                while inflight.join_next().await.is_some() {}
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}

/// [`ClientSide`] for a client network namespace.
pub struct NetnsClient {
    pub ns: Arc<Netns>,
    pub vip: SocketAddrV4,
    sources: Vec<Ipv4Addr>,
}

impl ClientSide for NetnsClient {
    fn sources(&self) -> Vec<Ipv4Addr> {
        self.sources.clone()
    }

    fn connect_round(&self, sources: &[Ipv4Addr], timeout: Duration) -> Vec<Probe> {
        let (srcs, dst) = (sources.to_vec(), self.vip);
        self.ns.run(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(futures::future::join_all(
                srcs.iter().map(|&s| probe(s, dst, timeout)),
            ))
        })
    }

    fn probe_loop(
        &self,
        sources: Vec<Ipv4Addr>,
        every: Duration,
        timeout: Duration,
        stop: Arc<AtomicBool>,
        sink: Arc<Mutex<Vec<Probe>>>,
    ) {
        let dst = self.vip;
        self.ns
            .run(move || run_probe_loop(dst, sources, every, timeout, stop, sink));
    }

    fn udp_round(&self, sources: &[Ipv4Addr], wait: Duration) -> Vec<(Ipv4Addr, Vec<String>)> {
        let (srcs, dst) = (sources.to_vec(), self.vip);
        self.ns
            .run(move || crate::netns::udp_round(&srcs, dst, wait))
            .unwrap_or_default()
    }

    fn long_lived(&self, src: Ipv4Addr, every: Duration) -> LongLived {
        LongLived::start(src, self.vip, every, |f| self.ns.spawn(f))
    }

    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.ns.run(f)
    }
}

/// Client load in the background: [`ClientSide::probe_loop`] on a thread.
pub struct LoadGen {
    stop: Arc<AtomicBool>,
    sink: Arc<Mutex<Vec<Probe>>>,
    thread: Option<JoinHandle<()>>,
}

impl LoadGen {
    pub fn start<C: ClientSide>(
        client: &Arc<C>,
        sources: Vec<Ipv4Addr>,
        every: Duration,
        timeout: Duration,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sink = Arc::new(Mutex::new(Vec::new()));
        let (c, s, k) = (client.clone(), stop.clone(), sink.clone());
        let thread = std::thread::spawn(move || c.probe_loop(sources, every, timeout, s, k));
        LoadGen {
            stop,
            sink,
            thread: Some(thread),
        }
    }

    /// Probes finished so far.
    pub fn count(&self) -> usize {
        self.sink.lock().unwrap().len()
    }

    /// A copy of the probes finished so far.
    pub fn snapshot(&self) -> Vec<Probe> {
        self.sink.lock().unwrap().clone()
    }

    /// Stops (waiting for the probes in flight) and returns every probe.
    pub fn finish(mut self) -> Vec<Probe> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut v = std::mem::take(&mut *self.sink.lock().unwrap());
        v.sort_by_key(|p| p.sent);
        v
    }
}

impl Drop for LoadGen {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// UDP rounds from every source in a loop: any source answered by two
/// different hosts in one round is a double (two hosts accepting one bucket).
pub struct DoubleWatch {
    stop: Arc<AtomicBool>,
    doubles: Arc<Mutex<Vec<String>>>,
    rounds: Arc<Mutex<usize>>,
    thread: Option<JoinHandle<()>>,
}

impl DoubleWatch {
    pub fn start<C: ClientSide>(client: &Arc<C>, sources: Vec<Ipv4Addr>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let doubles = Arc::new(Mutex::new(Vec::new()));
        let rounds = Arc::new(Mutex::new(0));
        let (c, s, d, r) = (
            client.clone(),
            stop.clone(),
            doubles.clone(),
            rounds.clone(),
        );
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            while !s.load(Ordering::Relaxed) {
                let at = t0.elapsed();
                for (src, names) in c.udp_round(&sources, Duration::from_millis(150)) {
                    let distinct: BTreeSet<&String> = names.iter().collect();
                    if distinct.len() > 1 {
                        d.lock()
                            .unwrap()
                            .push(format!("{src}: {names:?} in the round sent at +{at:?}"));
                    }
                }
                *r.lock().unwrap() += 1;
            }
        });
        DoubleWatch {
            stop,
            doubles,
            rounds,
            thread: Some(thread),
        }
    }

    /// Stops; (doubles, rounds).
    pub fn finish(mut self) -> (Vec<String>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (
            std::mem::take(&mut *self.doubles.lock().unwrap()),
            *self.rounds.lock().unwrap(),
        )
    }
}

impl Drop for DoubleWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ------------------------------------------------------------------ kernel events

/// Every bucket added to a host's owned set, as the kernel reports it
/// (`nft -j monitor` in the host's namespace), timestamped on arrival: no
/// sampling gap, so an element that stays a millisecond is seen too.
pub struct KernelWatch {
    child: Child,
    added: Arc<Mutex<Vec<(Instant, u32)>>>,
    thread: Option<JoinHandle<()>>,
}

impl KernelWatch {
    /// Follows `monitor` (an `nft -j monitor` command, line-buffered) and
    /// returns once it is subscribed: `probe` (which creates and deletes the
    /// table `probe_table` in the same namespace) has been reported.
    pub fn start(
        mut monitor: Command,
        probe_table: &str,
        probe: impl Fn() -> anyhow::Result<()>,
    ) -> anyhow::Result<Self> {
        let mut child = monitor
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("nft monitor")?;
        let stdout = child.stdout.take().expect("piped stdout");
        let added: Arc<Mutex<Vec<(Instant, u32)>>> = Arc::default();
        let subscribed = Arc::new(AtomicBool::new(false));
        let (a, sub, probe_name) = (added.clone(), subscribed.clone(), probe_table.to_string());
        let thread = std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let now = Instant::now();
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                let add = &v["add"];
                if add["table"]["name"].as_str() == Some(probe_name.as_str()) {
                    sub.store(true, Ordering::Relaxed);
                }
                let e = &add["element"];
                if e["table"].as_str() != Some("vipshare") || e["name"].as_str() != Some("owned") {
                    continue;
                }
                for item in e["elem"]["set"].as_array().into_iter().flatten() {
                    let val = item
                        .get("elem")
                        .and_then(|x| x.get("val"))
                        .or(Some(item))
                        .and_then(|x| x.as_u64());
                    if let Some(b) = val {
                        a.lock().unwrap().push((now, b as u32));
                    }
                }
            }
        });
        let mut w = KernelWatch {
            child,
            added,
            thread: Some(thread),
        };
        let ready = poll(Duration::from_secs(10), "nft monitor to subscribe", || {
            if subscribed.load(Ordering::Relaxed) {
                return Some(Ok(()));
            }
            probe().err().map(Err)
        });
        match ready {
            Ok(Ok(())) => Ok(w),
            Ok(Err(e)) | Err(e) => {
                w.stop();
                Err(e)
            }
        }
    }

    /// Stops; every (arrival, bucket) added.
    pub fn finish(mut self) -> Vec<(Instant, u32)> {
        self.stop();
        std::mem::take(&mut *self.added.lock().unwrap())
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for KernelWatch {
    fn drop(&mut self) {
        self.stop();
    }
}

// ------------------------------------------------------------------ busy hosts

/// A background CPU load: `stress-ng --cpu N` at normal priority, the way web
/// servers keep the hosts sharing a VIP busy. Stopped (SIGTERM, so that
/// stress-ng stops its workers) on drop; `--timeout` ends it should the test
/// process die first.
pub struct CpuHog {
    child: std::process::Child,
    pub workers: usize,
}

impl CpuHog {
    /// `factor` busy workers per CPU (2 oversubscribes the CPUs twice).
    pub fn oversubscribe(factor: usize) -> anyhow::Result<Self> {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let workers = factor * cpus;
        let child = Command::new("stress-ng")
            .args([
                "--cpu",
                &workers.to_string(),
                "--timeout",
                "1800s",
                "--quiet",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("stress-ng (scripts/install-deps.sh installs it)")?;
        let hog = CpuHog { child, workers };
        // Its workers run once it has forked them; wait for them.
        let pid = hog.child.id();
        poll(Duration::from_secs(10), "stress-ng workers", || {
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            (children.split_whitespace().count() >= workers).then_some(())
        })?;
        Ok(hog)
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        // SAFETY: signalling our own unreaped child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------ the bucket map

/// How to run `vipsharectl` as the admin, from any thread.
#[derive(Debug, Clone)]
pub struct Ctl {
    pub bin: PathBuf,
    pub controllers: Vec<String>,
    pub tls_dir: PathBuf,
}

impl Ctl {
    pub fn output(&self, args: &[&str]) -> anyhow::Result<Output> {
        Ok(Command::new(&self.bin)
            .arg("--controllers")
            .arg(self.controllers.join(","))
            .arg("--tls-dir")
            .arg(&self.tls_dir)
            .args(args)
            .stdin(Stdio::null())
            .output()?)
    }

    /// stdout of a successful run.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        ok_stdout(self.output(args)?, args)
    }
}

fn ok_stdout(out: Output, args: &[&str]) -> anyhow::Result<String> {
    if !out.status.success() {
        bail!(
            "vipsharectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `vipsharectl buckets --json` as owner per bucket ("" when unowned).
pub fn parse_bucket_map(json: &str) -> anyhow::Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(json)?;
    let rows = v["buckets"].as_array().context("no buckets array")?;
    let mut map = vec![String::new(); rows.len()];
    for b in rows {
        let i = b["bucket"].as_u64().context("bucket")? as usize;
        *map.get_mut(i).context("bucket out of range")? = b["owner"].as_str().unwrap_or("").into();
    }
    Ok(map)
}

/// Bucket maps over time, as they arrived.
#[derive(Debug, Clone, Default)]
pub struct MapHistory {
    /// When each read returned, and the map it returned.
    pub samples: Vec<(Instant, Vec<String>)>,
    /// When each read was started (same order): the map it returned was the
    /// state at some instant between this and the sample's time.
    pub started: Vec<Instant>,
}

impl MapHistory {
    /// Every owner bucket `b` may have had between `from` and `to`: in the
    /// samples from the last one read entirely before `from` to the first one
    /// read entirely after `to`.
    pub fn owners_between(&self, b: u32, from: Instant, to: Instant) -> BTreeSet<String> {
        let s = &self.samples;
        let first = s.iter().rposition(|(t, _)| *t <= from).unwrap_or(0);
        let last = self
            .started
            .iter()
            .position(|t| *t >= to)
            .unwrap_or(s.len().saturating_sub(1));
        s.get(first..=last.max(first))
            .unwrap_or_default()
            .iter()
            .filter_map(|(_, m)| m.get(b as usize).cloned())
            .collect()
    }

    /// Every change of the map, one line each: time since `since`, then one
    /// character per bucket (the owner's last character, '.' when unowned).
    pub fn changes(&self, since: Instant) -> Vec<String> {
        let mut out = Vec::new();
        let mut last: Option<&Vec<String>> = None;
        for (t, m) in &self.samples {
            if last != Some(m) {
                let line: String = m.iter().map(|o| o.chars().last().unwrap_or('.')).collect();
                out.push(format!(
                    "+{:>8.3?} {line}",
                    t.saturating_duration_since(since)
                ));
                last = Some(m);
            }
        }
        out
    }

    /// Buckets whose owner differs from `reference` in some sample.
    pub fn moved_from(&self, reference: &[String]) -> BTreeMap<u32, BTreeSet<String>> {
        let mut moved: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
        for (_, m) in &self.samples {
            for (b, (now, was)) in m.iter().zip(reference).enumerate() {
                if now != was {
                    moved.entry(b as u32).or_default().insert(now.clone());
                }
            }
        }
        moved
    }
}

/// Polls `vipsharectl buckets --json` in the background.
pub struct MapWatch {
    child: Child,
    history: Arc<Mutex<MapHistory>>,
    thread: Option<JoinHandle<()>>,
}

impl MapWatch {
    /// Follows `vipsharectl watch --json`: every map the watched controller
    /// applies, timestamped on arrival, with no sampling gap (a short tenure,
    /// such as a restarting agent's buckets held by another host for 200 ms,
    /// is seen; polling every 200 ms missed it).
    pub fn start(ctl: Ctl) -> Self {
        let history = Arc::new(Mutex::new(MapHistory::default()));
        let mut child = Command::new(&ctl.bin)
            .arg("--controllers")
            .arg(ctl.controllers.join(","))
            .arg("--tls-dir")
            .arg(&ctl.tls_dir)
            .args(["watch", "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("vipsharectl watch");
        let stdout = child.stdout.take().expect("piped stdout");
        let h = history.clone();
        let thread = std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                let Some(owners) = v["owners"].as_array() else {
                    continue;
                };
                let map = owners
                    .iter()
                    .map(|o| o.as_str().unwrap_or("").to_string())
                    .collect();
                let now = Instant::now();
                let mut h = h.lock().unwrap();
                h.samples.push((now, map));
                h.started.push(now);
            }
        });
        MapWatch {
            child,
            history,
            thread: Some(thread),
        }
    }

    pub fn snapshot(&self) -> MapHistory {
        self.history.lock().unwrap().clone()
    }

    pub fn finish(mut self) -> MapHistory {
        self.stop();
        self.snapshot()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MapWatch {
    fn drop(&mut self) {
        self.stop();
    }
}

// ------------------------------------------------------------------ judging probes

/// What the client saw, judged against the bucket map.
#[derive(Debug, Default)]
pub struct Report {
    pub probes: usize,
    /// Answers per host.
    pub answered: BTreeMap<String, usize>,
    /// Answered by a host that did not own the bucket around that time.
    pub wrong_host: Vec<String>,
    /// Refused or reset, not excused.
    pub resets: Vec<String>,
    /// Timed out or failed otherwise, not excused.
    pub failed: Vec<String>,
    /// Failures the scenario expects (a crashed host's connections).
    pub excused: Vec<String>,
    /// Failures not excused, per half second since the first probe, per owner
    /// of the bucket in the map then: where the time went, at a glance.
    pub failed_timeline: BTreeMap<u64, BTreeMap<String, usize>>,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.wrong_host.is_empty() && self.resets.is_empty() && self.failed.is_empty()
    }

    pub fn summary(&self) -> String {
        format!(
            "{} probes, answers {:?}, {} from a non-owner, {} resets, {} failed, {} excused",
            self.probes,
            self.answered,
            self.wrong_host.len(),
            self.resets.len(),
            self.failed.len(),
            self.excused.len()
        )
    }

    /// Panics with the details unless every probe was answered by its owner.
    pub fn assert_clean(&self, what: &str) {
        let head = |v: &[String]| v.iter().take(20).cloned().collect::<Vec<_>>();
        let timeline: Vec<String> = self
            .failed_timeline
            .iter()
            .map(|(slot, by)| format!("+{:.1}s {by:?}", *slot as f64 / 2.0))
            .collect();
        assert!(
            self.is_clean(),
            "{what}: {}\nnon-owner answers: {:#?}\nresets: {:#?}\nfailed: {:#?}\n\
             failures per half second, by owner: {:#?}",
            self.summary(),
            head(&self.wrong_host),
            head(&self.resets),
            head(&self.failed),
            timeline,
        );
    }
}

/// Judges `probes`: every answer must come from a host that owned the source's
/// bucket in the map between `slack` before the probe was sent and `slack`
/// after it finished (the kernel follows the map within milliseconds; the map
/// arrives from `vipsharectl watch`). Failures for which `excused(probe, bucket)` holds
/// are counted apart.
pub fn judge(
    probes: &[Probe],
    history: &MapHistory,
    bucket_of: impl Fn(Ipv4Addr) -> u32,
    slack: Duration,
    excused: impl Fn(&Probe, u32) -> bool,
) -> Report {
    let mut r = Report {
        probes: probes.len(),
        ..Default::default()
    };
    let t0 = probes.iter().map(|p| p.sent).min();
    for p in probes {
        let b = bucket_of(p.src);
        let at = t0.map(|t| p.sent - t).unwrap_or_default();
        let line = |what: &str| format!("{} (bucket {b}, sent at +{at:.3?}) {what}", p.src);
        match &p.outcome {
            Outcome::Answered(host) => {
                *r.answered.entry(host.clone()).or_insert(0) += 1;
                let from = p.sent.checked_sub(slack).unwrap_or(p.sent);
                let owners = history.owners_between(b, from, p.done + slack);
                if !owners.contains(host) {
                    r.wrong_host.push(line(&format!(
                        "answered by {host}, owners then {owners:?}, {:?} long",
                        p.done - p.sent
                    )));
                }
            }
            other if excused(p, b) => r.excused.push(line(&format!("{other:?}"))),
            _ => {
                let owners = history.owners_between(b, p.sent, p.sent);
                let owner = owners.into_iter().next().unwrap_or_else(|| "-".into());
                let slot = (at.as_millis() / 500) as u64;
                *r.failed_timeline
                    .entry(slot)
                    .or_default()
                    .entry(owner)
                    .or_insert(0) += 1;
            }
        }
        match &p.outcome {
            Outcome::Answered(_) => {}
            _ if excused(p, b) => {}
            Outcome::Reset(e) => r.resets.push(line(e)),
            Outcome::Timeout { connected } => r.failed.push(line(&format!(
                "timed out after {:?} ({})",
                p.done - p.sent,
                if *connected {
                    "connected, no answer from the server"
                } else {
                    "no SYN-ACK"
                }
            ))),
            Outcome::Failed(e) => r.failed.push(line(e)),
        }
    }
    r
}

// ------------------------------------------------------------------ the provider

/// The hosts, the controllers and the client of a cluster under test, and the
/// faults a scenario may inject. Hosts are named by member name ("h1"..).
pub trait HostProvider {
    type Client: ClientSide;

    /// Member names of every host, in order.
    fn hosts(&self) -> Vec<String>;
    /// The cluster's bucket count.
    fn bucket_count(&self) -> u32;
    /// The bucket of a client source address (the cluster's function and seed).
    fn bucket_of(&self, src: Ipv4Addr) -> u32;

    /// Crash: the host's link goes down, its agent and servers die.
    fn crash(&mut self, host: &str) -> anyhow::Result<()>;
    /// Boot a crashed host again: clean kernel, link up, servers and agent.
    fn revive(&mut self, host: &str) -> anyhow::Result<()>;
    /// SIGKILL the agent only.
    fn kill_agent(&mut self, host: &str) -> anyhow::Result<()>;
    /// Start the agent again (after a kill or stop).
    fn restart_agent(&mut self, host: &str) -> anyhow::Result<()>;
    /// SIGTERM the agent (a planned stop: it drains itself) and wait for exit 0.
    fn stop_agent(&mut self, host: &str) -> anyhow::Result<()>;
    /// Drop all traffic between `host` and controller `controller`, both ways,
    /// nothing else.
    fn partition_from(&mut self, host: &str, controller: u64) -> anyhow::Result<()>;
    /// Like `partition_from`, but `host`'s connection attempts to the
    /// controller fail at once (refused, as by a closed port) instead of
    /// timing out.
    fn refuse_from(&mut self, host: &str, controller: u64) -> anyhow::Result<()>;
    /// Undo `partition_from` or `refuse_from` of `host` and `controller` only.
    fn heal_from(&mut self, host: &str, controller: u64) -> anyhow::Result<()>;
    /// Undo every partition.
    fn heal(&mut self) -> anyhow::Result<()>;
    /// Make controller `id` lag: drop all traffic between it and the other
    /// controllers (raft, both ways), nothing else: agents and `vipsharectl`
    /// still reach it, and it keeps answering them from its applied state.
    fn lag_controller(&mut self, id: u64) -> anyhow::Result<()>;
    /// Undo [`HostProvider::lag_controller`] for `id`.
    fn heal_controller(&mut self, id: u64) -> anyhow::Result<()>;
    /// The buckets the host's kernel accepts new flows for now (None: no state).
    fn kernel_owned(&self, host: &str) -> Option<BTreeSet<u32>>;
    /// From now on, every bucket added to the host's kernel set.
    fn kernel_watch(&self, host: &str) -> anyhow::Result<KernelWatch>;
    /// The client machine.
    fn client(&self) -> Arc<Self::Client>;

    /// Controller ids.
    fn controllers(&self) -> Vec<u64>;
    /// host:port of a controller's API.
    fn controller_address(&self, id: u64) -> String;
    /// SIGKILL a controller.
    fn kill_controller(&mut self, id: u64) -> anyhow::Result<()>;
    /// SIGTERM a controller and wait for a clean exit.
    fn stop_controller(&mut self, id: u64) -> anyhow::Result<()>;
    /// Start a stopped or killed controller with its data.
    fn start_controller(&mut self, id: u64) -> anyhow::Result<()>;
    /// The controller's log so far.
    fn controller_log(&self, id: u64) -> String;
    /// `vipsharectl` as the cluster admin.
    fn ctl(&self) -> Ctl;
    /// The cluster's certificate directory (CA certificate, admin and agents).
    fn certs_dir(&self) -> PathBuf;
}

/// Polls `f` every 50 ms until it returns `Some`, or fails after `timeout`.
pub fn poll<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > end {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A member as `vipsharectl members --json` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberView {
    pub state: String,
    pub weight: u32,
    pub epoch: u64,
    pub buckets: u32,
    pub penalty: f64,
    pub returns_in_ms: u64,
    pub last_ack_ms_ago: u64,
    /// What its agent reports keeps it from serving.
    pub problems: Vec<String>,
}

pub fn members<P: HostProvider>(p: &P) -> anyhow::Result<BTreeMap<String, MemberView>> {
    members_via(&p.ctl())
}

/// `vipsharectl members --json` through `ctl` (e.g. one controller only: its
/// own `last_ack_ms_ago`).
pub fn members_via(ctl: &Ctl) -> anyhow::Result<BTreeMap<String, MemberView>> {
    let v: serde_json::Value = serde_json::from_str(&ctl.run(&["members", "--json"])?)?;
    let mut out = BTreeMap::new();
    for m in v["members"].as_array().context("members")? {
        out.insert(
            m["name"].as_str().context("name")?.to_string(),
            MemberView {
                state: m["state"].as_str().unwrap_or("").into(),
                weight: m["weight"].as_u64().unwrap_or(0) as u32,
                epoch: m["epoch"].as_u64().unwrap_or(0),
                buckets: m["buckets"].as_u64().unwrap_or(0) as u32,
                penalty: m["penalty"].as_f64().unwrap_or(0.0),
                returns_in_ms: m["returns_in_ms"].as_u64().unwrap_or(0),
                last_ack_ms_ago: m["last_ack_ms_ago"].as_u64().unwrap_or(u64::MAX),
                problems: m["problems"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p.as_str().map(String::from))
                    .collect(),
            },
        );
    }
    Ok(out)
}

pub fn bucket_map<P: HostProvider>(p: &P) -> anyhow::Result<Vec<String>> {
    parse_bucket_map(&p.ctl().run(&["buckets", "--json"])?)
}

/// `vipsharectl status --json`, whatever the cluster's health (exit codes 3-5
/// report it; the JSON is printed all the same).
pub fn status<P: HostProvider>(p: &P) -> anyhow::Result<serde_json::Value> {
    status_via(&p.ctl(), false)
}

/// `vipsharectl status --json` through `ctl`; `local`: the first controller's
/// own view (`--local`, no quorum read), e.g. of a controller cut off from the
/// others.
pub fn status_via(ctl: &Ctl, local: bool) -> anyhow::Result<serde_json::Value> {
    let args: &[&str] = if local {
        &["status", "--json", "--local"]
    } else {
        &["status", "--json"]
    };
    let out = ctl.output(args)?;
    if matches!(out.status.code(), Some(3..=5)) && !out.stdout.is_empty() {
        return Ok(serde_json::from_slice(&out.stdout)?);
    }
    Ok(serde_json::from_str(&ok_stdout(out, args)?)?)
}

/// The leader, once there is one.
pub fn wait_leader<P: HostProvider>(p: &P, timeout: Duration) -> anyhow::Result<u64> {
    poll(timeout, "a leader", || {
        let s = status(p).ok()?;
        s["leader_id"].as_u64().filter(|&l| l != 0)
    })
}

/// Waits until controller `id` answers, follows the same leader as the
/// cluster, and has applied everything committed when the wait started.
pub fn wait_rejoined<P: HostProvider>(p: &P, id: u64, timeout: Duration) -> anyhow::Result<()> {
    let mut target = None;
    poll(timeout, &format!("controller {id} to rejoin"), || {
        let s = status(p).ok()?;
        let leader = s["leader_id"].as_u64().filter(|&l| l != 0)?;
        let commit = *target.get_or_insert(s["commit_index"].as_u64()?);
        let me = s["controllers"]
            .as_array()?
            .iter()
            .find(|c| c["id"].as_u64() == Some(id))?
            .clone();
        (me["reachable"].as_bool() == Some(true)
            && me["leader_id"].as_u64() == Some(leader)
            && me["applied_index"].as_u64()? >= commit)
            .then_some(())
    })
}

/// Waits until exactly `owners` own every bucket, each within one bucket of
/// its weighted share (policy floor/ceil), and every host's kernel set holds
/// exactly its buckets (hosts not in `owners` hold none). Returns the map.
pub fn wait_converged<P: HostProvider>(
    p: &P,
    owners: &[&str],
    timeout: Duration,
) -> anyhow::Result<Vec<String>> {
    let mut last = String::new();
    poll(
        timeout,
        &format!("convergence on {owners:?}"),
        || match converged(p, owners) {
            Ok(map) => Some(map),
            Err(e) => {
                last = format!("{e:#}");
                None
            }
        },
    )
    .map_err(|e| anyhow!("{e}: {last}"))
}

fn converged<P: HostProvider>(p: &P, owners: &[&str]) -> anyhow::Result<Vec<String>> {
    let map = bucket_map(p)?;
    let ms = members(p)?;
    let roster: Vec<policy::Member> = ms
        .iter()
        .map(|(n, m)| policy::Member::new(n.clone(), m.weight.max(1), owners.contains(&n.as_str())))
        .collect();
    let bounds = policy::share_bounds(map.len(), &roster).map_err(|e| anyhow!("{e:?}"))?;
    if let Some((b, o)) = map
        .iter()
        .enumerate()
        .find(|(_, o)| !owners.contains(&o.as_str()))
    {
        bail!("bucket {b} owned by {o:?}");
    }
    for o in owners {
        let n = map.iter().filter(|x| x == o).count();
        let bd = bounds.get(*o).context("owner not a member")?;
        if n < bd.floor || n > bd.ceil {
            bail!("{o} owns {n}, share {}..={}", bd.floor, bd.ceil);
        }
    }
    for h in p.hosts() {
        let want: BTreeSet<u32> = (0..map.len() as u32)
            .filter(|&b| map[b as usize] == h)
            .collect();
        let have = p.kernel_owned(&h).unwrap_or_default();
        if have != want {
            bail!(
                "{h}'s kernel holds {} buckets, the map {}",
                have.len(),
                want.len()
            );
        }
    }
    Ok(map)
}

/// Client sources grouped by bucket.
pub fn sources_by_bucket<P: HostProvider>(p: &P) -> BTreeMap<u32, Vec<Ipv4Addr>> {
    let mut m: BTreeMap<u32, Vec<Ipv4Addr>> = BTreeMap::new();
    for s in p.client().sources() {
        m.entry(p.bucket_of(s)).or_default().push(s);
    }
    m
}

/// Up to `per_bucket` sources of every bucket (those whose owner in `map` is
/// in `owners`, or every bucket when `owners` is empty).
pub fn pick_sources<P: HostProvider>(
    p: &P,
    map: &[String],
    owners: &[&str],
    per_bucket: usize,
) -> Vec<Ipv4Addr> {
    sources_by_bucket(p)
        .into_iter()
        .filter(|(b, _)| owners.is_empty() || owners.contains(&map[*b as usize].as_str()))
        .flat_map(|(_, s)| s.into_iter().take(per_bucket))
        .collect()
}

/// One connection from every source; each must be answered by its bucket's
/// owner in `map`. Returns the wrong answers.
pub fn check_predicted<P: HostProvider>(p: &P, map: &[String]) -> Vec<String> {
    let sources = p.client().sources();
    p.client()
        .connect_round(&sources, Duration::from_secs(3))
        .into_iter()
        .filter_map(|pr| {
            let want = &map[p.bucket_of(pr.src) as usize];
            (pr.answer() != Some(want.as_str()))
                .then(|| format!("{}: {:?}, want {want}", pr.src, pr.outcome))
        })
        .collect()
}

// ------------------------------------------------------------------ the netns lab

/// Network of a scenario lab (see the module doc); everything removed on drop.
pub struct ScenarioNet {
    pub tag: String,
    pub k: u8,
    pub hosts: Vec<Netns>,
    pub client: Arc<Netns>,
    pub switch: Netns,
    /// Dropped last: the root-side link, i.e. the claim on `k`.
    _root: RootLink,
}

impl ScenarioNet {
    pub fn new(hosts: usize, sources: usize) -> anyhow::Result<Self> {
        require_root();
        assert!((1..=1000).contains(&sources) && hosts <= 250);
        let start = (std::process::id() as usize * 7) % 60;
        let mut claimed = None;
        for i in 0..60 {
            let k = 100 + ((start + i) % 60) as u8;
            let name = format!("vss{k}");
            if sh(
                "ip",
                &[
                    "link",
                    "add",
                    &name,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &format!("{name}p"),
                ],
            )
            .is_ok()
            {
                claimed = Some((k, RootLink { name }));
                break;
            }
        }
        let (k, root) = claimed.context("no free lab number in 100..=159")?;
        let tag = root.name.clone();
        let switch = Netns::switch(&format!("{tag}_sw"))?;
        let peer = format!("{tag}p");
        sh("ip", &["link", "set", &peer, "netns", &switch.name])?;
        switch.ip(&["link", "set", &peer, "master", "br0", "up"])?;
        for id in 1..=3 {
            sh(
                "ip",
                &[
                    "addr",
                    "add",
                    &format!("10.{k}.0.{id}/16"),
                    "dev",
                    &root.name,
                ],
            )?;
        }
        sh("ip", &["link", "set", &root.name, "up"])?;
        let client = Netns::create(&format!("{tag}_c"))?;
        let mut net = ScenarioNet {
            tag,
            k,
            hosts: Vec::new(),
            client: Arc::new(client),
            switch,
            _root: root,
        };
        for i in 0..hosts {
            let ns = Netns::create(&net.host_ns_name(i))?;
            net.plug(&ns, &format!("h{}", i + 1), &[net.host_ip(i)])?;
            net.hosts.push(ns);
        }
        let srcs: Vec<Ipv4Addr> = (0..sources)
            .map(|i| Ipv4Addr::new(10, k, 2 + (i / 250) as u8, (i % 250) as u8 + 1))
            .collect();
        net.plug(&net.client, "cl", &srcs)?;
        Ok(net)
    }

    fn host_ns_name(&self, i: usize) -> String {
        format!("{}_h{}", self.tag, i + 1)
    }

    /// A veth from `ns` (eth0 there) to the bridge (port `port`).
    fn plug(&self, ns: &Netns, port: &str, addrs: &[Ipv4Addr]) -> anyhow::Result<()> {
        self.switch.ip(&[
            "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ])?;
        self.switch
            .ip(&["link", "set", port, "master", "br0", "up"])?;
        let mut batch = String::new();
        for a in addrs {
            batch.push_str(&format!("addr add {a}/16 dev eth0\n"));
        }
        batch.push_str("link set eth0 up\n");
        ns.ip_batch(&batch)
    }

    pub fn controller_ip(&self, id: u64) -> Ipv4Addr {
        Ipv4Addr::new(10, self.k, 0, id as u8)
    }

    pub fn vip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.k, 0, 100)
    }

    pub fn host_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, self.k, 1, i as u8 + 1)
    }

    /// Host `i`'s switch port down (the host is cut off) or up.
    pub fn set_link(&self, i: usize, up: bool) -> anyhow::Result<()> {
        let port = format!("h{}", i + 1);
        self.switch
            .ip(&["link", "set", &port, if up { "up" } else { "down" }])?;
        Ok(())
    }

    /// Host `i` boots anew: its namespace (and all kernel state) is replaced by
    /// a fresh one plugged into the same switch port name; the port is up.
    pub fn reboot_host(&mut self, i: usize) -> anyhow::Result<()> {
        let name = self.host_ns_name(i);
        // The old namespace goes with its veth; its `Netns` must not delete the
        // new one of the same name when dropped.
        let _ = sh("ip", &["netns", "del", &name]);
        let _ = self.switch.ip(&["link", "del", &format!("h{}", i + 1)]);
        let fresh = Netns::create(&name)?;
        std::mem::forget(std::mem::replace(&mut self.hosts[i], fresh));
        self.plug(&self.hosts[i], &format!("h{}", i + 1), &[self.host_ip(i)])
    }

    /// The client's source addresses.
    pub fn sources(&self) -> anyhow::Result<Vec<Ipv4Addr>> {
        let out = self
            .client
            .ip(&["-4", "-o", "addr", "show", "dev", "eth0"])?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let i = w.iter().position(|x| *x == "inet")?;
                w.get(i + 1)?.split('/').next()?.parse().ok()
            })
            .collect())
    }

    pub fn client_side(&self, port: u16) -> anyhow::Result<NetnsClient> {
        Ok(NetnsClient {
            ns: self.client.clone(),
            vip: SocketAddrV4::new(self.vip(), port),
            sources: self.sources()?,
        })
    }
}

/// Cluster shape for [`NetnsProvider::start`]. The default, 4 hosts of equal
/// weight on 64 buckets, makes every share a whole number (16), so a host that
/// returns gets all its home buckets back (see `vipshare_core::policy`).
#[derive(Debug, Clone)]
pub struct LabOptions {
    pub hosts: usize,
    /// Member weights (default 100 each).
    pub weights: Vec<u32>,
    pub sources: usize,
    /// A power of two (the controllers refuse anything else).
    pub buckets: u32,
    /// `cluster init --heartbeat-ms`.
    pub heartbeat_ms: Option<u64>,
    /// `cluster init --lease-ms`.
    pub lease_ms: Option<u64>,
    /// delta and m of the lease arithmetic (`vipshare_core::lease`); like
    /// `damping`, only settable through the admin API, which is then used.
    pub kernel_delay_ms: Option<u64>,
    pub margin_ms: Option<u64>,
    /// Damping settings; `vipsharectl cluster init` cannot set them, so when
    /// given the cluster is initialised through the admin API directly.
    pub damping: Option<pb::Damping>,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            hosts: 4,
            weights: Vec::new(),
            sources: 200,
            buckets: 64,
            heartbeat_ms: None,
            lease_ms: None,
            kernel_delay_ms: None,
            margin_ms: None,
            damping: None,
        }
    }
}

const PARTITION_TABLE: &str = "scenario_partition";

/// One cgroup v2 directory per controller of a netns lab, so that nftables can
/// tell controller-to-controller traffic from the rest: the controllers, the
/// test and `vipsharectl` all run in the root namespace, and a connection from
/// there to a controller's address has that address as its source whoever
/// opens it, but `socket cgroupv2` matches the cgroup of the sending socket.
/// The directories go on drop (once the controllers are gone).
struct ControllerCgroups {
    dirs: BTreeMap<u64, PathBuf>,
    /// The same directories as nft names them: relative to /sys/fs/cgroup.
    nft_paths: BTreeMap<u64, String>,
    /// Their depth in the cgroup hierarchy (`socket cgroupv2 level`).
    level: usize,
}

impl ControllerCgroups {
    /// `<cgroup2 mount>/<tag>_c<id>` for every id. nft resolves its cgroup
    /// paths under /sys/fs/cgroup, so the cgroup2 mount must be there (the
    /// unified hierarchy at /sys/fs/cgroup, or /sys/fs/cgroup/unified on a
    /// hybrid system).
    fn create(tag: &str, ids: &[u64]) -> anyhow::Result<Self> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
        let (root, mount) = mountinfo
            .lines()
            .find_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                let f: Vec<&str> = left.split(' ').collect();
                (right.split(' ').next()? == "cgroup2"
                    && (f.get(4)? == &"/sys/fs/cgroup" || f.get(4)?.starts_with("/sys/fs/cgroup/")))
                .then(|| (f[3].to_string(), PathBuf::from(f[4])))
            })
            .context("no cgroup2 hierarchy mounted under /sys/fs/cgroup")?;
        let rel = mount
            .strip_prefix("/sys/fs/cgroup")
            .expect("under /sys/fs/cgroup")
            .to_path_buf();
        let level = root.split('/').filter(|c| !c.is_empty()).count() + 1;
        let mut c = ControllerCgroups {
            dirs: BTreeMap::new(),
            nft_paths: BTreeMap::new(),
            level,
        };
        for &id in ids {
            let name = format!("{tag}_c{id}");
            let dir = mount.join(&name);
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => bail!("creating cgroup {}: {e}", dir.display()),
            }
            c.dirs.insert(id, dir);
            c.nft_paths
                .insert(id, rel.join(&name).to_string_lossy().into_owned());
        }
        Ok(c)
    }

    /// nft's match on sockets of controller `id`'s processes.
    fn nft_match(&self, id: u64) -> Option<String> {
        let path = self.nft_paths.get(&id)?;
        Some(format!("socket cgroupv2 level {} \"{path}\"", self.level))
    }
}

impl Drop for ControllerCgroups {
    fn drop(&mut self) {
        for dir in self.dirs.values() {
            // Empty once the controllers have been reaped; give the kernel a moment.
            let _ = poll(Duration::from_secs(2), "an empty cgroup", || {
                (std::fs::remove_dir(dir).is_ok() || !dir.exists()).then_some(())
            });
        }
    }
}
/// A controller must exit this soon after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether process `pid` (our unreaped child) has exited.
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_none_or(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
        Err(_) => true,
    }
}

/// [`HostProvider`] on network namespaces: three real controllers in the root
/// namespace, a real agent and servers per host namespace, a client namespace.
pub struct NetnsProvider {
    // Drop order: agents, servers, controllers, namespaces, runtime.
    agents: Vec<AgentProc>,
    servers: Vec<Option<Servers>>,
    pub lab: crate::Lab,
    /// None where cgroup v2 is not available: no `lag_controller` then.
    cgroups: Option<ControllerCgroups>,
    pub net: ScenarioNet,
    client: Arc<NetnsClient>,
    pub accepted: Accepted,
    bucket_count: u32,
    seed: u32,
    /// Per host index, the controllers it is cut off from, and whether its
    /// connections to them are refused (`refuse_from`) or silently dropped.
    partitioned: BTreeMap<usize, BTreeMap<u64, bool>>,
    /// Controllers cut off from the others (`lag_controller`).
    lagging: BTreeSet<u64>,
    rt: tokio::runtime::Runtime,
}

impl NetnsProvider {
    /// Builds the lab, starts the controllers, initialises the cluster, adds
    /// the members and starts their servers and agents. Does not wait for the
    /// buckets to be assigned ([`wait_converged`]).
    pub fn start(o: LabOptions) -> anyhow::Result<Self> {
        // Multi-threaded, so that connections made by `block_on` calls keep being
        // driven (and are closed) after the call returns: a connection nobody
        // polls stays open, and a controller's graceful shutdown waits for it.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let net = ScenarioNet::new(o.hosts, o.sources)?;
        // Before the lab: dropped after its controllers.
        let cgroups = ControllerCgroups::create(&net.tag, &[1, 2, 3])
            .map_err(|e| eprintln!("no controller cgroups, so no lag_controller: {e:#}"))
            .ok();
        let mut lab = crate::Lab::new(&format!("10.{}.0", net.k), 3)?;
        if let Some(c) = &cgroups {
            lab.cgroups = c.dirs.clone();
        }
        lab.start_founders(3)?;
        rt.block_on(lab.wait_leader(Duration::from_secs(30)))?;
        let seed = 0x5343_454eu32;
        let vip = net.vip().to_string();
        if let Some(damping) = o.damping {
            let d = vipshare_core::lease::LeaseTiming::default();
            let settings = pb::ClusterSettings {
                vips: vec![pb::Vip {
                    address: vip.clone(),
                    prefix_len: 0,
                    mac: String::new(),
                    mode: String::new(),
                }],
                bucket_count: o.buckets,
                bucket_function: "jhash".into(),
                affinity: "address".into(),
                seed,
                lease: Some(pb::LeaseTiming {
                    heartbeat_ms: o.heartbeat_ms.unwrap_or(d.heartbeat_ms),
                    lease_ms: o.lease_ms.unwrap_or(d.lease_ms),
                    kernel_delay_ms: o.kernel_delay_ms.unwrap_or(d.kernel_delay_ms),
                    clock_rate_ppm: d.clock_rate_ppm,
                    margin_ms: o.margin_ms.unwrap_or(d.margin_ms),
                }),
                damping: Some(damping),
            };
            rt.block_on(lab.mutate(Op::InitCluster(pb::InitCluster {
                settings: Some(settings),
            })))?;
        } else {
            let (b, s) = (o.buckets.to_string(), seed.to_string());
            let mut args = vec![
                "cluster",
                "init",
                "--vip",
                &vip,
                "--buckets",
                &b,
                "--seed",
                &s,
            ];
            let (h, l) = (
                o.heartbeat_ms.map(|v| v.to_string()),
                o.lease_ms.map(|v| v.to_string()),
            );
            if let Some(h) = &h {
                args.extend(["--heartbeat-ms", h]);
            }
            if let Some(l) = &l {
                args.extend(["--lease-ms", l]);
            }
            ok_stdout(lab.ctl(&args)?, &args)?;
        }
        let controllers: Vec<(u64, String)> = (1..=3).map(|id| (id, lab.address(id))).collect();
        let accepted: Accepted = Arc::default();
        let client = Arc::new(net.client_side(PORT)?);
        let mut p = NetnsProvider {
            agents: Vec::new(),
            servers: Vec::new(),
            lab,
            cgroups,
            net,
            client,
            accepted,
            bucket_count: o.buckets,
            seed,
            partitioned: BTreeMap::new(),
            lagging: BTreeSet::new(),
            rt,
        };
        for i in 0..o.hosts {
            let member = format!("h{}", i + 1);
            if member != "h1" {
                // Lab::new issued h1 already.
                vipshare_proto::pki::issue(
                    &p.lab.certs,
                    vipshare_proto::pki::Role::Agent,
                    &member,
                    &[],
                    &[],
                    30,
                )?;
            }
            let w = o.weights.get(i).copied().unwrap_or(100).to_string();
            let args = ["member", "add", &member, "--weight", &w];
            ok_stdout(p.lab.ctl(&args)?, &args)?;
        }
        for i in 0..o.hosts {
            let member = format!("h{}", i + 1);
            p.servers.push(Some(p.start_servers(i)?));
            let dir = p.agent_dir(i);
            let config = write_agent_config(&dir, &member, &p.lab.certs, &controllers, "")?;
            p.agents.push(AgentProc::start(
                &p.net.hosts[i],
                &member,
                &config,
                &dir.join("agent.log"),
            )?);
        }
        Ok(p)
    }

    fn agent_dir(&self, i: usize) -> PathBuf {
        self.lab.root.path().join(format!("agent-h{}", i + 1))
    }

    fn start_servers(&self, i: usize) -> anyhow::Result<Servers> {
        Servers::start(
            &self.net.hosts[i],
            &format!("h{}", i + 1),
            self.net.vip(),
            PORT,
            self.accepted.clone(),
        )
    }

    fn index(&self, host: &str) -> anyhow::Result<usize> {
        host.strip_prefix('h')
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&n| n >= 1 && n <= self.agents.len())
            .map(|n| n - 1)
            .ok_or_else(|| anyhow!("no host {host:?}"))
    }

    /// Kills agent `host`, sets `interface` in its configuration file and
    /// starts it again: e.g. a NIC that exists but is down.
    pub fn restart_agent_on(&mut self, host: &str, interface: &str) -> anyhow::Result<()> {
        let i = self.index(host)?;
        let agent = &mut self.agents[i];
        agent.kill();
        let text = std::fs::read_to_string(&agent.config)?;
        let line = |l: &str| {
            if l.starts_with("interface = ") {
                format!("interface = \"{interface}\"")
            } else {
                l.to_string()
            }
        };
        let text: Vec<String> = text.lines().map(line).collect();
        std::fs::write(&agent.config, text.join("\n") + "\n")?;
        agent.restart()
    }

    /// Agent `host`'s log so far.
    pub fn agent_log(&self, host: &str) -> String {
        self.index(host)
            .map(|i| self.agents[i].log_text())
            .unwrap_or_default()
    }

    /// Makes host `i`'s partition table drop exactly the traffic to and from
    /// the controllers in `self.partitioned[i]` (none: no table), in one
    /// `nft -f` transaction in the host's namespace.
    fn sync_partition(&mut self, i: usize) -> anyhow::Result<()> {
        let cut = self.partitioned.get(&i).cloned().unwrap_or_default();
        if cut.is_empty() {
            self.partitioned.remove(&i);
        }
        let t = PARTITION_TABLE;
        let mut script = format!("table ip {t}\ndelete table ip {t}\n");
        if !cut.is_empty() {
            let ip = |c: &u64| self.net.controller_ip(*c).to_string();
            let all: Vec<String> = cut.keys().map(ip).collect();
            let refused: Vec<String> = cut
                .iter()
                .filter(|(_, r)| **r)
                .map(|(c, _)| ip(c))
                .collect();
            let mut out = String::new();
            if !refused.is_empty() {
                // A local reset: the agent's connects fail at once.
                out.push_str(&format!(
                    "ip daddr {{ {} }} meta l4proto tcp reject with tcp reset; ",
                    refused.join(", ")
                ));
            }
            let all = all.join(", ");
            script.push_str(&format!(
                "table ip {t} {{\n\
                 chain in {{ type filter hook input priority -300; ip saddr {{ {all} }} drop; }}\n\
                 chain out {{ type filter hook output priority -300; {out}ip daddr {{ {all} }} drop; }}\n}}\n"
            ));
        }
        let file = self
            .lab
            .root
            .path()
            .join(format!("partition-h{}.nft", i + 1));
        std::fs::write(&file, &script)?;
        self.net.hosts[i]
            .exec("nft", &["-f", &file.to_string_lossy()])
            .with_context(|| format!("nft script:\n{script}"))?;
        Ok(())
    }

    /// The root namespace's nftables table of `lag_controller`.
    fn lag_table(&self) -> String {
        format!("{}_lag", self.net.tag)
    }

    /// Makes the lag table say exactly `self.lagging`: in the root namespace's
    /// output hook, a packet to a controller's API port is dropped when it
    /// comes from a lagging controller's socket and goes to another
    /// controller, or from another controller's socket to a lagging one. Every
    /// connection between two controllers has its client in one of them and
    /// its server in the other, so neither way gets through; agents (host
    /// namespaces) and `vipsharectl` (not in a controller's cgroup) are not
    /// matched. One `nft -f` transaction.
    fn sync_lag_rules(&self) -> anyhow::Result<()> {
        let table = self.lag_table();
        let mut script = format!("table ip {table}\ndelete table ip {table}\n");
        if !self.lagging.is_empty() {
            let cg = self.cgroups.as_ref().context(
                "no controller cgroups (cgroup v2 under /sys/fs/cgroup): \
                 controller-to-controller traffic cannot be told apart",
            )?;
            let addr = |id: u64| -> anyhow::Result<SocketAddrV4> {
                self.lab
                    .address(id)
                    .parse()
                    .with_context(|| format!("controller {id}'s address"))
            };
            script.push_str(&format!(
                "table ip {table} {{\n chain out {{\n  type filter hook output priority -300; policy accept;\n"
            ));
            let ids = self.controllers();
            for &l in &self.lagging {
                let la = addr(l)?;
                for &o in ids.iter().filter(|&&o| o != l) {
                    let oa = addr(o)?;
                    for (from, to) in [(l, oa), (o, la)] {
                        let m = cg
                            .nft_match(from)
                            .with_context(|| format!("no cgroup for controller {from}"))?;
                        script.push_str(&format!(
                            "  {m} ip daddr {} tcp dport {} counter drop\n",
                            to.ip(),
                            to.port()
                        ));
                    }
                }
            }
            script.push_str(" }\n}\n");
        }
        let file = self.lab.root.path().join("lag.nft");
        std::fs::write(&file, &script)?;
        sh("nft", &["-f", &file.to_string_lossy()])
            .with_context(|| format!("nft script:\n{script}"))?;
        Ok(())
    }

    /// The lag table's rules with their counters (`nft list table`).
    pub fn lag_rules(&self) -> String {
        sh("nft", &["list", "table", "ip", &self.lag_table()]).unwrap_or_default()
    }

    /// Runs a future on the provider's runtime (for [`crate::Lab`]'s async API).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }
}

impl HostProvider for NetnsProvider {
    type Client = NetnsClient;

    fn hosts(&self) -> Vec<String> {
        (1..=self.agents.len()).map(|i| format!("h{i}")).collect()
    }

    fn bucket_count(&self) -> u32 {
        self.bucket_count
    }

    fn bucket_of(&self, src: Ipv4Addr) -> u32 {
        vipshare_core::bucket::bucket_of(
            vipshare_core::bucket::BucketFn::Jhash,
            vipshare_core::bucket::Affinity::Address,
            self.bucket_count,
            self.seed,
            std::net::IpAddr::V4(src),
            None,
        )
        .expect("valid bucket config")
    }

    fn crash(&mut self, host: &str) -> anyhow::Result<()> {
        let i = self.index(host)?;
        self.net.set_link(i, false)?;
        self.agents[i].kill();
        drop(self.servers[i].take());
        Ok(())
    }

    fn revive(&mut self, host: &str) -> anyhow::Result<()> {
        let i = self.index(host)?;
        assert!(!self.agents[i].is_running(), "{host} was not crashed");
        // The namespace goes, and its rules with it.
        self.partitioned.remove(&i);
        self.net.reboot_host(i)?;
        // A boot clears /run: no state of the previous agent.
        let _ = std::fs::remove_dir_all(self.agent_dir(i).join("state"));
        self.servers[i] = Some(self.start_servers(i)?);
        self.agents[i].restart()
    }

    fn kill_agent(&mut self, host: &str) -> anyhow::Result<()> {
        let i = self.index(host)?;
        self.agents[i].kill();
        Ok(())
    }

    fn restart_agent(&mut self, host: &str) -> anyhow::Result<()> {
        let i = self.index(host)?;
        self.agents[i].restart()
    }

    fn stop_agent(&mut self, host: &str) -> anyhow::Result<()> {
        let i = self.index(host)?;
        let status = self.agents[i].terminate(Duration::from_secs(30))?;
        if !status.success() {
            bail!("agent {host} exited with {status}");
        }
        Ok(())
    }

    fn partition_from(&mut self, host: &str, controller: u64) -> anyhow::Result<()> {
        let i = self.index(host)?;
        self.partitioned
            .entry(i)
            .or_default()
            .insert(controller, false);
        self.sync_partition(i)
    }

    fn refuse_from(&mut self, host: &str, controller: u64) -> anyhow::Result<()> {
        let i = self.index(host)?;
        self.partitioned
            .entry(i)
            .or_default()
            .insert(controller, true);
        self.sync_partition(i)
    }

    fn heal_from(&mut self, host: &str, controller: u64) -> anyhow::Result<()> {
        let i = self.index(host)?;
        if let Some(cut) = self.partitioned.get_mut(&i) {
            cut.remove(&controller);
        }
        self.sync_partition(i)
    }

    fn heal(&mut self) -> anyhow::Result<()> {
        let hosts: Vec<usize> = self.partitioned.keys().copied().collect();
        self.partitioned.clear();
        for i in hosts {
            self.sync_partition(i)?;
        }
        Ok(())
    }

    fn lag_controller(&mut self, id: u64) -> anyhow::Result<()> {
        ensure!(self.controllers().contains(&id), "no controller {id}");
        self.lagging.insert(id);
        self.sync_lag_rules()
    }

    fn heal_controller(&mut self, id: u64) -> anyhow::Result<()> {
        self.lagging.remove(&id);
        self.sync_lag_rules()
    }

    fn kernel_owned(&self, host: &str) -> Option<BTreeSet<u32>> {
        owned_set(&self.net.hosts[self.index(host).ok()?])
    }

    fn kernel_watch(&self, host: &str) -> anyhow::Result<KernelWatch> {
        let ns = &self.net.hosts[self.index(host)?];
        let mut monitor = Command::new("ip");
        monitor.args([
            "netns", "exec", &ns.name, "stdbuf", "-oL", "nft", "-j", "monitor",
        ]);
        const PROBE: &str = "scenario_kernel_watch_probe";
        KernelWatch::start(monitor, PROBE, || {
            ns.exec("nft", &["add", "table", "ip", PROBE])?;
            ns.exec("nft", &["delete", "table", "ip", PROBE])?;
            Ok(())
        })
    }

    fn client(&self) -> Arc<NetnsClient> {
        self.client.clone()
    }

    fn controllers(&self) -> Vec<u64> {
        self.lab.controllers.keys().copied().collect()
    }

    fn controller_address(&self, id: u64) -> String {
        self.lab.address(id)
    }

    fn kill_controller(&mut self, id: u64) -> anyhow::Result<()> {
        self.lab.kill(id)
    }

    fn stop_controller(&mut self, id: u64) -> anyhow::Result<()> {
        let pid = self
            .lab
            .controllers
            .get(&id)
            .and_then(|c| c.pid())
            .with_context(|| format!("controller {id} not running"))?;
        // SAFETY: signalling our own child by pid (not yet reaped, so not reused).
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
        if poll(STOP_TIMEOUT, "exit", || exited(pid).then_some(())).is_err() {
            let log = self.controller_log(id);
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            bail!(
                "controller {id} (pid {pid}) did not exit within {STOP_TIMEOUT:?} of SIGTERM; \
                 its log ends:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        // Reaps it (the second SIGTERM goes to a zombie).
        let status = self.lab.stop(id)?;
        if !status.success() {
            bail!("controller {id} exited with {status}");
        }
        Ok(())
    }

    fn start_controller(&mut self, id: u64) -> anyhow::Result<()> {
        self.lab.start(id)
    }

    fn controller_log(&self, id: u64) -> String {
        self.lab
            .controllers
            .get(&id)
            .map(|c| c.log_text())
            .unwrap_or_default()
    }

    fn ctl(&self) -> Ctl {
        Ctl {
            bin: crate::bin("vipsharectl"),
            controllers: (1..=3).map(|id| self.lab.address(id)).collect(),
            tls_dir: self.lab.certs.clone(),
        }
    }

    fn certs_dir(&self) -> PathBuf {
        self.lab.certs.clone()
    }
}

impl Drop for NetnsProvider {
    fn drop(&mut self) {
        let _ = self.heal();
        if !self.lagging.is_empty() {
            self.lagging.clear();
            let _ = self.sync_lag_rules();
        }
    }
}

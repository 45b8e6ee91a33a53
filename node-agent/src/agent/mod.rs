//! The agent's runtime: heartbeats to every controller, assignment streams from
//! every controller, the data plane, the state file, Released confirmations and
//! the drain on SIGTERM. Every decision is made by
//! [`vipshare_core::agent::Engine`] (the simulator runs the same engine); this
//! module feeds it events and carries out its commands in order.
//!
//! # Lease
//! Every `heartbeat_ms` the agent starts a round (noting its monotonic time)
//! and sends a heartbeat to every controller in parallel, each over one
//! long-lived `Heartbeats` stream (unary `Heartbeat` to controllers without it). When a majority of
//! the voters acked a round, the lease runs to send time + `lease_ms`, and the
//! owned buckets are written to the kernel with timeout = lease left minus
//! `kernel_delay_ms`. Without renewals the kernel drops them on its own.
//!
//! # State file
//! `<state_dir>/agent-state.json` (default `/var/lib/vipshare`) holds per
//! bucket the lowest grant epoch the agent may still install (raised past
//! every release), the voters and the lease timing learned from the
//! controllers. It is loaded before anything else, and written and fsync'd
//! before any `Released` that depends on it is sent.
//!
//! # Start
//! Kernel state left by an earlier agent (a restart) is adopted: the owned
//! elements keep accepting until their timeouts run out, and the agent touches
//! them only once it holds a lease and an assignment of its own, so a quick
//! restart is not a gap in service. After that the tables are rebuilt in one
//! transaction.
//!
//! # SIGTERM
//! `DrainSelf` on the leader, then wait (at most `drain_timeout_ms`) until the
//! assignment holds no bucket, then remove all kernel state and exit 0. A
//! second SIGTERM or SIGINT skips the wait.

pub mod state_file;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tracing::{debug, error, info, warn};
use vipshare_proto::tls;
use vipshare_proto::v1 as pb;
use vipshare_proto::v1::agent_api_client::AgentApiClient;
use vipshare_proto::PROTOCOL_VERSION;

use vipshare_core::agent::{self as engine, AgentState, Engine};

use self::state_file::{Found, StateFile};
use self::wire::Settings;
use crate::config::{uri, AgentConfig};
use crate::dataplane::freebsd::{self, FreeBsdDataPlane};
use crate::dataplane::linux::{self, LinuxDataPlane};
use crate::dataplane::{ApplyReport, DataPlane, DataPlaneError, Desired, VipConfig};
use crate::metrics;

/// How often the tables are rebuilt from scratch (repairs outside changes).
const FULL_RECONCILE: Duration = Duration::from_secs(30);
/// Growth of the suspended time that counts as a resume (clock reading noise).
const RESUME_SLACK_MS: u64 = 20;
/// An apply slower than this is repeated at once (its lease figure may be stale).
const STALE_APPLY: Duration = Duration::from_millis(100);

/// The kernel backend.
pub enum Plane {
    Linux(LinuxDataPlane<linux::OsExecutor>),
    FreeBsd(FreeBsdDataPlane<freebsd::OsExecutor<freebsd::watchdog::ProcessWatchdog>>),
}

impl Plane {
    fn inner(&mut self) -> &mut dyn DataPlane {
        match self {
            Plane::Linux(p) => p,
            Plane::FreeBsd(p) => p,
        }
    }

    pub fn apply(&mut self, d: &Desired) -> Result<ApplyReport, DataPlaneError> {
        self.inner().apply(d)
    }

    pub fn withdraw(&mut self) -> Result<(), DataPlaneError> {
        self.inner().withdraw()
    }

    /// Everything out (Linux); FreeBSD only withdraws.
    pub fn teardown(&mut self) -> Result<(), DataPlaneError> {
        match self {
            Plane::Linux(p) => p.teardown(),
            Plane::FreeBsd(p) => p.withdraw(),
        }
    }

    fn invalidate(&mut self) {
        if let Plane::Linux(p) = self {
            p.invalidate();
        }
    }

    /// The data plane's problems (Linux; `None` before the first apply).
    fn health(&mut self) -> Option<BTreeSet<crate::dataplane::Problem>> {
        match self {
            Plane::Linux(p) => p.health(),
            Plane::FreeBsd(_) => None,
        }
    }

    fn invalidate_filter(&mut self) {
        if let Plane::Linux(p) = self {
            p.invalidate_filter();
        }
    }

    /// How long owned elements left by an earlier run keep accepting.
    pub fn adopted_window(&self) -> Duration {
        match self {
            Plane::Linux(p) => p.adopted_window(),
            Plane::FreeBsd(_) => Duration::ZERO,
        }
    }

    /// Moves the VIPs this backend cannot serve to `unserved`, so that the
    /// others are served (FreeBSD has no IPv6 plans yet).
    fn keep_servable(&self, s: Settings) -> Settings {
        match self {
            Plane::Linux(_) => s,
            Plane::FreeBsd(_) => s
                .without_ipv6("IPv6 VIPs are not served on FreeBSD yet")
                .only_multicast_mode("FreeBSD"),
        }
    }

    fn linux_config(&self) -> Option<linux::LinuxConfig> {
        match self {
            Plane::Linux(p) => Some(p.config().clone()),
            Plane::FreeBsd(_) => None,
        }
    }
}

enum Event {
    Reply {
        round: u64,
        controller: u64,
        result: Result<pb::HeartbeatReply, String>,
    },
    Assignment {
        controller: u64,
        assignment: Box<pb::Assignment>,
    },
    Drained(Result<(), String>),
}

struct Conn {
    address: String,
    client: AgentApiClient<Channel>,
    watcher: JoinHandle<()>,
    /// Rounds for [`beat`], which sends them over the controller's stream.
    beats: mpsc::Sender<Beat>,
    beater: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.watcher.abort();
        self.beater.abort();
    }
}

/// One heartbeat for one controller, and how long its reply may take.
struct Beat {
    req: pb::HeartbeatRequest,
    timeout: Duration,
}

/// Whose state file this agent keeps: "<cluster ID>/<member>" (the CA's
/// cluster ID, or its name for a CA made before IDs).
fn state_owner(cfg: &AgentConfig) -> String {
    let cluster = vipshare_proto::pki::ca_cluster_id(&cfg.tls.ca)
        .ok()
        .flatten()
        .map(|id| id.as_str().to_string())
        .or_else(|| vipshare_proto::pki::ca_cluster(&cfg.tls.ca).ok())
        .unwrap_or_default();
    format!("{cluster}/{}", cfg.member)
}

/// Release confirmations gathered during one apply: (bucket, epoch) and the
/// controllers to tell.
type ReleaseBatch = (Vec<(u32, u64)>, Vec<u64>);

struct Runtime {
    cfg: AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    engine: Engine,
    state_file: StateFile,
    /// A state the engine asked to persist that is not on disk yet: until it
    /// is, no `Released` goes out.
    unpersisted: Option<AgentState>,
    /// Settings of the assignment the engine holds.
    settings: Option<Settings>,
    plane: Plane,
    /// [`clock_ms`] at start: engine time counts from here.
    start: u64,
    /// [`suspended_ms`] when last looked at.
    suspended: u64,
    tx: mpsc::Sender<Event>,
    conns: BTreeMap<u64, Conn>,
    leader: u64,
    /// Until then, kernel elements of an earlier agent are left alone unless we
    /// hold a lease.
    adopt_until: u64,
    /// The kernel set the engine wants, and when it stops accepting (agent ms).
    want: BTreeSet<u32>,
    want_until: u64,
    /// Withdrawals to report to the engine once an apply carried them out.
    withdrawing: Vec<(u32, u64)>,
    /// The kernel needs an apply.
    dirty: bool,
    /// While set, confirmations of releases are gathered here (buckets,
    /// controllers) and sent as one.
    release_batch: Option<ReleaseBatch>,
    /// What keeps the data plane from serving, as last assessed: every
    /// heartbeat says it, and the leader gives such a member nothing.
    problems: Vec<String>,
    /// What the last successful apply left accepting, and until when.
    applied_owned: BTreeSet<u32>,
    applied_until: u64,
    draining: Option<Drain>,
    /// Send a heartbeat round now rather than at the next tick (the epoch was
    /// just learned: a restarted agent renews its adopted lease sooner).
    heartbeat_now: bool,
    /// When the newest assignment not yet in the kernel arrived, and its index.
    assignment_pending: Option<(Instant, u64)>,
}

struct Drain {
    deadline: Instant,
    acked: bool,
    task: JoinHandle<()>,
}

fn read_clock(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own; the ids used are valid.
    let rc = unsafe { libc::clock_gettime(id, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Milliseconds on a clock that keeps counting while the host is suspended
/// (CLOCK_BOOTTIME on Linux): a lease runs out across a suspend.
fn clock_ms() -> u64 {
    #[cfg(target_os = "linux")]
    return read_clock(libc::CLOCK_BOOTTIME);
    #[cfg(not(target_os = "linux"))]
    return read_clock(libc::CLOCK_MONOTONIC);
}

/// How long the host has spent suspended since boot: the boot clock counts it,
/// the monotonic clock (and the kernel's timers) does not.
fn suspended_ms() -> u64 {
    clock_ms().saturating_sub(read_clock(libc::CLOCK_MONOTONIC))
}

fn now_ms(start: u64) -> u64 {
    clock_ms().saturating_sub(start)
}

impl Runtime {
    fn now(&self) -> u64 {
        now_ms(self.start)
    }

    fn client_for(&self, address: &str) -> anyhow::Result<AgentApiClient<Channel>> {
        let ch = tls::channel(&uri(address), self.tls.clone())?;
        Ok(AgentApiClient::new(ch))
    }

    /// Connect to (and watch) exactly these controllers.
    fn sync_conns(&mut self, list: &[(u64, String)]) {
        let want: BTreeMap<u64, &String> = list.iter().map(|(i, a)| (*i, a)).collect();
        self.conns
            .retain(|id, c| want.get(id).is_some_and(|a| **a == c.address));
        for (id, address) in want {
            if self.conns.contains_key(&id) {
                continue;
            }
            let client = match self.client_for(address) {
                Ok(c) => c,
                Err(e) => {
                    warn!(controller = id, %address, error = %e, "bad controller address");
                    continue;
                }
            };
            let watcher = tokio::spawn(watch(
                id,
                client.clone(),
                self.cfg.member.clone(),
                self.tx.clone(),
            ));
            // A few rounds of slack: a stream that stalls longer is reopened.
            let (beats, rounds) = mpsc::channel(4);
            let beater = tokio::spawn(beat(id, client.clone(), rounds, self.tx.clone()));
            info!(controller = id, %address, "controller added");
            self.conns.insert(
                id,
                Conn {
                    address: address.clone(),
                    client,
                    watcher,
                    beats,
                    beater,
                },
            );
        }
    }

    /// Feeds one event to the engine and carries out its commands in order;
    /// a resume from suspend goes first.
    fn step(&mut self, ev: engine::Event) {
        let suspended = suspended_ms();
        if suspended > self.suspended + RESUME_SLACK_MS {
            warn!(
                suspended_ms = suspended - self.suspended,
                "host resumed from suspend: withdrawing every bucket first"
            );
            self.suspended = suspended;
            self.step(engine::Event::Resumed);
        }
        self.suspended = suspended;
        let now = self.now();
        let (epoch, expiry) = (self.engine.epoch(), self.engine.lease_expiry());
        let cmds = self.engine.step(now, ev);
        if self.engine.lease_expiry() > expiry && self.engine.epoch() == epoch {
            metrics::renewed();
        }
        let new = self.engine.epoch();
        if new != epoch {
            metrics::epoch_changed();
            self.heartbeat_now = true;
            if epoch == 0 {
                info!(epoch = new, "member epoch learned");
            } else {
                warn!(
                    old = epoch,
                    new, "member epoch moved on (fenced): dropping every bucket"
                );
            }
        }
        for cmd in cmds {
            self.carry_out(now, cmd);
        }
    }

    fn carry_out(&mut self, now: u64, cmd: engine::Command) {
        use engine::Command as C;
        match cmd {
            C::Persist(state) => {
                self.unpersisted = Some(state);
                self.persist();
            }
            C::Heartbeat {
                round,
                epoch,
                assignment_index,
                to,
            } => self.heartbeat(round, epoch, assignment_index, &to),
            C::Install {
                buckets,
                timeout_ms,
                ..
            } => {
                if buckets.is_empty() && timeout_ms == 0 {
                    // Fenced: the earlier agent's elements are someone else's too.
                    self.adopt_until = 0;
                }
                self.want = buckets.iter().map(|g| g.0).collect();
                self.want_until = now + timeout_ms;
                self.dirty = true;
            }
            C::Withdraw { bucket, epoch } => {
                info!(bucket, epoch, "releasing");
                self.want.remove(&bucket);
                self.withdrawing.push((bucket, epoch));
                self.dirty = true;
            }
            C::Released { buckets, to } => {
                if self.unpersisted.is_some() {
                    // The floors it depends on are not on disk yet; the next
                    // round repeats it.
                    return;
                }
                match &mut self.release_batch {
                    Some((all, dest)) => {
                        all.extend(buckets);
                        *dest = to;
                    }
                    None => self.send_released(&buckets, &to),
                }
            }
            C::Watch { controllers } => {
                let list: Vec<(u64, String)> = controllers
                    .iter()
                    .map(|c| (c.id, c.address.clone()))
                    .collect();
                self.sync_conns(&list);
            }
        }
    }

    /// Writes the state the engine asked for; on failure it is retried by
    /// housekeeping and `Released` waits.
    fn persist(&mut self) {
        let Some(state) = &self.unpersisted else {
            return;
        };
        match tokio::task::block_in_place(|| self.state_file.store(state)) {
            Ok(()) => self.unpersisted = None,
            Err(e) => error!(error = %e, "writing the agent state failed; releases wait"),
        }
    }

    fn heartbeat(&mut self, round: u64, epoch: u64, assignment_index: u64, to: &[u64]) {
        let timeout = Duration::from_millis(self.engine.timing().lease_ms);
        for (&id, c) in self.conns.iter().filter(|(id, _)| to.contains(id)) {
            let req = pb::HeartbeatRequest {
                protocol_version: PROTOCOL_VERSION,
                member: self.cfg.member.clone(),
                member_epoch: epoch,
                round,
                assignment_index: Some(assignment_index),
                problems: self.problems.clone(),
            };
            // Full: the stream is stuck; this round to that controller is lost,
            // as a lost message would be (the beater reopens the stream).
            if c.beats.try_send(Beat { req, timeout }).is_err() {
                debug!(
                    controller = id,
                    round, "heartbeat stream busy; round not sent"
                );
            }
        }
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Reply {
                round,
                controller,
                result,
            } => match result {
                Err(e) => debug!(controller, round, error = %e, "heartbeat failed"),
                Ok(r) => {
                    if r.leader_id != 0 {
                        self.leader = r.leader_id;
                    }
                    if !r.acked {
                        debug!(controller, round, reason = %r.reason, "heartbeat not acked");
                    }
                    self.step(engine::Event::Reply(wire::reply(&r)));
                }
            },
            Event::Assignment {
                controller,
                assignment,
            } => match wire::validate(&self.cfg.member, &assignment) {
                Err(reason) => {
                    metrics::refused();
                    error!(controller, index = assignment.applied_index, %reason,
                        "assignment refused");
                }
                Ok((settings, a)) => {
                    let settings = settings.map(|s| self.plane.keep_servable(s));
                    let index = a.applied_index;
                    let held = |e: &Engine| e.assignment().map(|a| a.applied_index);
                    let before = held(&self.engine);
                    self.step(engine::Event::Assignment {
                        controller,
                        assignment: a,
                    });
                    let Some(a) = self
                        .engine
                        .assignment()
                        .filter(|_| held(&self.engine) == Some(index) && before != Some(index))
                    else {
                        return;
                    };
                    info!(
                        controller,
                        index,
                        epoch = a.member_epoch,
                        owned = a.owned.len(),
                        release = a.release.len(),
                        "assignment"
                    );
                    if let Some(s) = &settings {
                        let before = self.settings.as_ref().map(|s| &s.unserved);
                        if before != Some(&s.unserved) {
                            for reason in &s.unserved {
                                error!(%reason, "VIP not served; the others are");
                            }
                            metrics::vips_unserved(s.unserved.len());
                        }
                    }
                    // The kernel changes with the settings or with what the
                    // engine asked just now (`carry_out` marked it dirty); an
                    // assignment that changes neither (a hand-over of buckets
                    // this host released) costs no kernel write.
                    if settings != self.settings {
                        self.settings = settings;
                        self.dirty = true;
                    }
                    if self.dirty && self.assignment_pending.is_none() {
                        self.assignment_pending = Some((Instant::now(), index));
                    }
                }
            },
            Event::Drained(r) => {
                if let Some(d) = &mut self.draining {
                    match r {
                        Ok(()) => info!("drain requested; waiting for the buckets to move"),
                        Err(e) => warn!(error = %e, "drain request failed; waiting anyway"),
                    }
                    d.acked = true;
                }
            }
        }
    }

    /// Bring the kernel in line with the engine, if it needs it.
    fn reconcile(&mut self) {
        for _ in 0..2 {
            let t = Instant::now();
            self.reconcile_once();
            // The lease left was measured before the apply: if the apply took
            // long (the agent starved or was stopped in between), the kernel
            // may hold a stale timeout. Write it again right away.
            if self.dirty || t.elapsed() < STALE_APPLY || self.applied_owned.is_empty() {
                return;
            }
            warn!(took = ?t.elapsed(), "slow apply; writing the lease again");
            self.dirty = true;
        }
    }

    /// The kernel state wanted at `now`; `None` before the cluster has settings.
    /// The one place a [`Desired`] is built.
    fn desired(&self) -> Option<Desired> {
        let s = self.settings.as_ref()?;
        // The instant first, the agent clock after it: the deadline can only
        // come out earlier than the lease, never later.
        let at = Instant::now();
        let left = self.want_until.saturating_sub(self.now());
        Some(Desired {
            vips: s
                .vips
                .iter()
                .map(|&(addr, prefix_len, mac, mode)| VipConfig {
                    addr,
                    prefix_len,
                    mac,
                    mode,
                    interface: self.cfg.interface.clone(),
                })
                .collect(),
            bucket_count: s.bucket_count,
            bucket_fn: s.bucket_fn,
            affinity: s.affinity,
            seed: s.seed,
            owned: if left > 0 {
                self.want.clone()
            } else {
                BTreeSet::new()
            },
            lease_until: at + Duration::from_millis(left),
        })
    }

    fn reconcile_once(&mut self) {
        if !self.dirty {
            return;
        }
        let now = self.now();
        if now < self.adopt_until && !self.engine.lease_valid(now) {
            // An earlier agent's elements still accept; don't cut them short.
            return;
        }
        let Some(desired) = self.desired() else {
            self.dirty = false;
            return;
        };
        let t = Instant::now();
        let r = tokio::task::block_in_place(|| self.plane.apply(&desired));
        metrics::reconcile(t.elapsed(), r.is_ok());
        match r {
            Ok(report) => {
                self.dirty = false;
                self.adopt_until = 0;
                if report.changed {
                    info!(
                        owned = desired.owned.len(),
                        steps = report.steps,
                        "kernel rebuilt"
                    );
                }
                if desired.owned != self.applied_owned {
                    info!(owned = ?desired.owned, "kernel accepts new flows for these buckets");
                }
                self.applied_owned = desired.owned;
                // On the agent clock; read after the instant, so never early.
                let left = desired
                    .lease_until
                    .saturating_duration_since(Instant::now());
                self.applied_until = self.now() + left.as_millis() as u64;
                if let Some((at, index)) = self.assignment_pending.take() {
                    let took = at.elapsed();
                    metrics::assignment_applied(took);
                    // took = waiting for the loop + the kernel write (apply).
                    info!(
                        index,
                        took_us = took.as_micros() as u64,
                        apply_us = t.elapsed().as_micros() as u64,
                        "assignment applied"
                    );
                }
                // One confirmation for every bucket this apply withdrew: one
                // RPC per controller, one Transfer at the leader.
                self.release_batch = Some((Vec::new(), Vec::new()));
                for (bucket, epoch) in std::mem::take(&mut self.withdrawing) {
                    self.step(engine::Event::Withdrawn { bucket, epoch });
                }
                if let Some((buckets, to)) = self.release_batch.take() {
                    if !buckets.is_empty() {
                        self.send_released(&buckets, &to);
                    }
                }
            }
            Err(e) => {
                // Stay dirty: the next event or tick retries with a full rebuild.
                error!(error = %e, "data plane apply failed");
            }
        }
    }

    /// Tell these controllers the released buckets are out of the kernel.
    fn send_released(&self, buckets: &[(u32, u64)], to: &[u64]) {
        info!(buckets = ?buckets.iter().map(|g| g.0).collect::<Vec<_>>(), "released");
        let grants: Vec<pb::BucketGrant> = buckets
            .iter()
            .map(|&(bucket, epoch)| pb::BucketGrant { bucket, epoch })
            .collect();
        for (_, c) in self.conns.iter().filter(|(id, _)| to.contains(id)) {
            let mut client = c.client.clone();
            let req = pb::ReleasedRequest {
                protocol_version: PROTOCOL_VERSION,
                member: self.cfg.member.clone(),
                buckets: grants.clone(),
            };
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(2), client.released(req)).await;
            });
        }
    }

    fn start_drain(&mut self) {
        if self.draining.is_some() {
            return;
        }
        info!("SIGTERM: draining");
        let mut order: Vec<(u64, String)> = self
            .conns
            .iter()
            .map(|(id, c)| (*id, c.address.clone()))
            .collect();
        order.sort_by_key(|(id, _)| *id != self.leader);
        let deadline = Instant::now() + Duration::from_millis(self.cfg.drain_timeout_ms);
        let task = tokio::spawn(drain_self(
            order,
            self.tls.clone(),
            self.cfg.member.clone(),
            deadline,
            self.tx.clone(),
        ));
        self.draining = Some(Drain {
            deadline,
            acked: false,
            task,
        });
    }

    fn housekeeping(&mut self) {
        let now = self.now();
        let accepting = if now < self.applied_until {
            self.applied_owned.len()
        } else {
            0
        };
        metrics::lease(
            accepting,
            Duration::from_millis(
                self.engine
                    .lease_expiry()
                    .map_or(0, |e| e.saturating_sub(now)),
            ),
        );
        if self.adopt_until != 0 && now >= self.adopt_until {
            self.dirty = true;
        }
        self.persist();
    }

    /// Whether a drain is over (or gave up).
    fn drain_finished(&self) -> bool {
        let Some(d) = &self.draining else {
            return false;
        };
        if Instant::now() >= d.deadline {
            warn!("drain timed out; leaving anyway");
            return true;
        }
        d.acked && self.engine.holds_nothing() && !self.dirty
    }
}

/// Heartbeats to one controller over one long-lived `Heartbeats` stream; each
/// reply goes to the engine as an [`Event::Reply`] exactly as a unary reply
/// did (the engine matches it to its round's send time, so a late reply earns
/// a shorter lease, never a longer one). A stream with a request unanswered
/// for longer than its timeout is reopened with the next round; a controller
/// that does not know the stream (UNIMPLEMENTED) gets unary `Heartbeat` calls.
async fn beat(
    id: u64,
    mut client: AgentApiClient<Channel>,
    mut rounds: mpsc::Receiver<Beat>,
    tx: mpsc::Sender<Event>,
) {
    let mut unary = false;
    let mut carry: Option<Beat> = None;
    loop {
        let first = match carry.take() {
            Some(b) => b,
            None => match rounds.recv().await {
                Some(b) => b,
                None => return,
            },
        };
        if unary {
            unary_heartbeat(id, client.clone(), first, tx.clone());
            continue;
        }
        let timeout = first.timeout;
        let (out, out_rx) = mpsc::channel(8);
        let _ = out.try_send(first.req);
        let requests = tokio_stream::wrappers::ReceiverStream::new(out_rx);
        let mut replies = match tokio::time::timeout(timeout, client.heartbeats(requests)).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => {
                info!(
                    controller = id,
                    "controller has no heartbeat stream; unary heartbeats"
                );
                unary = true;
                continue;
            }
            Ok(Err(s)) => {
                debug!(controller = id, error = %s.message(), "heartbeat stream refused");
                continue;
            }
            Err(_) => {
                debug!(controller = id, "heartbeat stream timed out opening");
                continue;
            }
        };
        // Replies come in order, so the front is the oldest unanswered
        // request's send time: a stream whose replies trickle in, each later
        // than the last, is reopened too (not only one that stops).
        let mut unanswered = VecDeque::from([Instant::now()]);
        loop {
            tokio::select! {
                next = rounds.recv() => {
                    let Some(b) = next else { return };
                    if unanswered.front().is_some_and(|t| t.elapsed() > b.timeout) {
                        debug!(controller = id, "heartbeat stream stalled; reopening");
                        carry = Some(b);
                        break;
                    }
                    if out.try_send(b.req).is_err() {
                        break;
                    }
                    unanswered.push_back(Instant::now());
                }
                reply = replies.message() => match reply {
                    Ok(Some(r)) => {
                        unanswered.pop_front();
                        let ev = Event::Reply { round: r.round, controller: id, result: Ok(r) };
                        if tx.send(ev).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(s) => {
                        if s.code() == tonic::Code::Unimplemented {
                            unary = true;
                        }
                        debug!(controller = id, error = %s.message(), "heartbeat stream ended");
                        break;
                    }
                },
            }
        }
    }
}

/// One unary `Heartbeat` (controllers without the stream), its reply or
/// failure fed to the engine.
fn unary_heartbeat(
    id: u64,
    mut client: AgentApiClient<Channel>,
    beat: Beat,
    tx: mpsc::Sender<Event>,
) {
    let round = beat.req.round;
    tokio::spawn(async move {
        let result = match tokio::time::timeout(beat.timeout, client.heartbeat(beat.req)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(s.message().to_string()),
            Err(_) => Err("timed out".into()),
        };
        let _ = tx
            .send(Event::Reply {
                round,
                controller: id,
                result,
            })
            .await;
    });
}

/// Streams one controller's assignments into the event channel, reconnecting
/// with backoff.
async fn watch(
    id: u64,
    mut client: AgentApiClient<Channel>,
    member: String,
    tx: mpsc::Sender<Event>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let req = pb::WatchRequest {
            protocol_version: PROTOCOL_VERSION,
            member: member.clone(),
        };
        match client.watch_assignments(req).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(assignment)) => {
                            backoff = Duration::from_millis(100);
                            if tx
                                .send(Event::Assignment {
                                    controller: id,
                                    assignment: Box::new(assignment),
                                })
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(s) => {
                            debug!(controller = id, error = %s.message(), "assignment stream ended");
                            break;
                        }
                    }
                }
            }
            Err(s) => debug!(controller = id, error = %s.message(), "watch refused"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// DrainSelf on the leader: tries the likely leader first, follows
/// `vipshare-leader` redirects, retries until the deadline.
async fn drain_self(
    order: Vec<(u64, String)>,
    tls_cfg: Arc<rustls::ClientConfig>,
    member: String,
    deadline: Instant,
    tx: mpsc::Sender<Event>,
) {
    let mut last = String::from("no controller");
    while Instant::now() < deadline {
        let mut targets: Vec<String> = order.iter().map(|(_, a)| a.clone()).collect();
        let mut i = 0;
        while i < targets.len() && i < 8 {
            let address = targets[i].clone();
            i += 1;
            let Ok(ch) = tls::channel(&uri(&address), tls_cfg.clone()) else {
                continue;
            };
            let mut client = AgentApiClient::new(ch);
            let req = pb::DrainSelfRequest {
                protocol_version: PROTOCOL_VERSION,
                member: member.clone(),
            };
            match tokio::time::timeout(Duration::from_secs(2), client.drain_self(req)).await {
                Ok(Ok(_)) => {
                    let _ = tx.send(Event::Drained(Ok(()))).await;
                    return;
                }
                Ok(Err(s)) => {
                    if let Some(leader) = s
                        .metadata()
                        .get("vipshare-leader")
                        .and_then(|v| v.to_str().ok())
                    {
                        if !targets[i..].iter().any(|t| t == leader) {
                            targets.insert(i, leader.to_string());
                        }
                    } else if !matches!(
                        s.code(),
                        tonic::Code::Unavailable
                            | tonic::Code::DeadlineExceeded
                            | tonic::Code::Unknown
                            | tonic::Code::Internal
                    ) {
                        // A definite answer (unknown member, ...): nothing to drain.
                        let _ = tx
                            .send(Event::Drained(Err(format!("{address}: {}", s.message()))))
                            .await;
                        return;
                    }
                    last = format!("{address}: {}", s.message());
                }
                Err(_) => last = format!("{address}: timed out"),
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let _ = tx.send(Event::Drained(Err(last))).await;
}

/// Reads the kernel's packet counters every second into metrics (Linux).
async fn counters_loop(cfg: linux::LinuxConfig) {
    let mut packets = metrics::PacketCounters::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let c = cfg.clone();
        match tokio::task::spawn_blocking(move || linux::read_counters(&c)).await {
            Ok(Ok(now)) => packets.record(&now),
            Ok(Err(e)) => debug!(error = %e, "reading counters"),
            Err(_) => return,
        }
    }
}

/// Runs the agent until SIGTERM/SIGINT has drained it.
pub async fn run(cfg: AgentConfig, plane: Plane) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let files = tls::TlsFiles {
        ca: cfg.tls.ca.clone(),
        cert: cfg.tls.cert.clone(),
        key: cfg.tls.key.clone(),
    };
    let tls_cfg = tls::client_config(&files).context("TLS")?;
    // The certificate alerts read vipshare_cert_expiry_seconds from agents too.
    let expiry_files = files.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            if let Err(e) = tls::record_expiry_of(&expiry_files) {
                warn!(error = %e, "certificate expiry not readable");
            }
        }
    });
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let (tx, mut rx) = mpsc::channel(1024);
    // Loaded before anything reaches the kernel.
    let state_file = StateFile::new(&cfg.state_dir);
    let owner = state_owner(&cfg);
    let (state, found) = state_file.load_for(&owner).context("agent state")?;
    let path = state_file.path().display();
    match found {
        Found::Own => info!(%path, floors = state.floors.len(), voters = ?state.voters,
            "agent state loaded"),
        Found::Nothing => info!(%path, "no agent state yet (fresh host)"),
        Found::Foreign(other) => warn!(%path, found = ?other, expected = %owner,
            "agent state of another cluster or member: starting fresh"),
    }
    let seeds: Vec<engine::Controller> = cfg
        .controllers
        .iter()
        .map(|c| engine::Controller {
            id: c.id,
            address: c.address.clone(),
            voter: true,
        })
        .collect();
    let start = clock_ms();
    let adopted = plane.adopted_window();
    if !adopted.is_zero() {
        info!(window = ?adopted, "adopting kernel state of an earlier agent");
    }
    let counters = plane.linux_config().map(|c| tokio::spawn(counters_loop(c)));
    let (foreign_tx, mut foreign) = mpsc::channel(16);
    if let Some(c) = plane.linux_config() {
        linux::watch::spawn(c.table, move |e| foreign_tx.blocking_send(e).is_ok());
    }
    let mut rt = Runtime {
        engine: Engine::new(seeds, state),
        state_file,
        unpersisted: None,
        settings: None,
        tls: tls_cfg,
        plane,
        start,
        suspended: suspended_ms(),
        tx,
        conns: BTreeMap::new(),
        leader: 0,
        adopt_until: adopted.as_millis() as u64,
        want: BTreeSet::new(),
        want_until: 0,
        withdrawing: Vec::new(),
        dirty: true,
        problems: Vec::new(),
        release_batch: None,
        applied_owned: BTreeSet::new(),
        applied_until: 0,
        draining: None,
        heartbeat_now: false,
        assignment_pending: None,
        cfg,
    };
    // The configured controllers and those the cluster listed last (the state file).
    let initial: Vec<(u64, String)> = rt
        .engine
        .controllers()
        .iter()
        .map(|c| (c.id, c.address.clone()))
        .collect();
    rt.sync_conns(&initial);
    info!(member = %rt.cfg.member, controllers = initial.len(), "agent started");

    let mut hb_ms = rt.engine.timing().heartbeat_ms;
    let mut hb = tokio::time::interval(Duration::from_millis(hb_ms));
    hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut house = tokio::time::interval(Duration::from_millis(100));
    let mut full = tokio::time::interval(FULL_RECONCILE);
    full.tick().await;
    let mut forced = false;
    let mut health_tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_health = None;
    loop {
        tokio::select! {
            _ = hb.tick() => rt.step(engine::Event::Tick),
            Some(ev) = rx.recv() => {
                rt.on_event(ev);
                // Take whatever else is queued before touching the kernel.
                while let Ok(ev) = rx.try_recv() {
                    rt.on_event(ev);
                }
            }
            _ = house.tick() => rt.housekeeping(),
            _ = health_tick.tick() => {
                let health = tokio::task::block_in_place(|| rt.plane.health());
                if let Some(problems) = &health {
                    metrics::dataplane_health(problems);
                    rt.problems = problems.iter().map(|p| p.name().to_string()).collect();
                    if health != last_health {
                        let names: Vec<&str> = problems.iter().map(|p| p.name()).collect();
                        if names.is_empty() {
                            info!("data plane healthy");
                        } else {
                            warn!(problems = ?names, "data plane cannot serve");
                        }
                    }
                }
                last_health = health;
            }
            Some(edit) = foreign.recv() => {
                warn!(thread = ?edit.pid, process = %edit.process,
                    "another process changed the agent's nftables tables; restoring the filter");
                metrics::foreign_edit();
                rt.plane.invalidate_filter();
                rt.dirty = true;
            }
            _ = full.tick() => {
                rt.plane.invalidate();
                rt.dirty = true;
            }
            _ = sigterm.recv() => {
                if rt.draining.is_some() { forced = true } else { rt.start_drain() }
            }
            _ = sigint.recv() => {
                if rt.draining.is_some() { forced = true } else { rt.start_drain() }
            }
        }
        if std::mem::take(&mut rt.heartbeat_now) {
            rt.step(engine::Event::Tick);
            hb.reset();
        }
        rt.reconcile();
        if rt.engine.timing().heartbeat_ms != hb_ms {
            hb_ms = rt.engine.timing().heartbeat_ms;
            hb = tokio::time::interval(Duration::from_millis(hb_ms));
            hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        if forced || rt.drain_finished() {
            break;
        }
    }
    if let Some(d) = rt.draining.take() {
        d.task.abort();
    }
    if let Some(c) = counters {
        c.abort();
    }
    info!("removing kernel state");
    tokio::task::block_in_place(|| rt.plane.teardown()).context("teardown")?;
    info!("agent stopped");
    Ok(())
}

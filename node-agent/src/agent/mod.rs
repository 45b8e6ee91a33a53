//! The agent's runtime: heartbeats to every controller, assignment streams from
//! every controller, the data plane, Released confirmations and the drain on
//! SIGTERM. Decisions are made by [`core::Core`]; this module does the I/O.
//!
//! # Lease
//! Every `heartbeat_ms` the agent starts a round (noting its monotonic time)
//! and sends `Heartbeat` to every controller in parallel. When a majority of
//! the voters acked a round, the lease runs to send time + `lease_ms`, and the
//! owned buckets are written to the kernel with timeout = lease left minus
//! `kernel_delay_ms`. Without renewals the kernel drops them on its own.
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

pub mod core;

use std::collections::{BTreeMap, BTreeSet};
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

use self::core::{AssignmentOutcome, Core, ReplyOutcome};
use crate::config::{uri, AgentConfig};
use crate::dataplane::freebsd::{self, FreeBsdDataPlane};
use crate::dataplane::linux::{self, LinuxDataPlane};
use crate::dataplane::{ApplyReport, DataPlane, DataPlaneError, Desired};
use crate::metrics;

/// How often the tables are rebuilt from scratch (repairs outside changes).
const FULL_RECONCILE: Duration = Duration::from_secs(30);
/// An apply slower than this is repeated at once (its lease figure may be stale).
const STALE_APPLY: Duration = Duration::from_millis(100);
/// How often Released is repeated while the assignment still lists buckets.
const RELEASED_RETRY: Duration = Duration::from_millis(500);

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
        epoch: u64,
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
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

struct Runtime {
    cfg: AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    core: Core,
    plane: Plane,
    start: Instant,
    tx: mpsc::Sender<Event>,
    conns: BTreeMap<u64, Conn>,
    leader: u64,
    /// Until then, kernel elements of an earlier agent are left alone unless we
    /// hold a lease.
    adopt_until: u64,
    /// The kernel needs an apply.
    dirty: bool,
    /// What the last successful apply left accepting, and until when.
    applied_owned: BTreeSet<u32>,
    applied_until: u64,
    released_sent: Option<(Vec<pb::BucketGrant>, Instant)>,
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

fn now_ms(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64
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
            info!(controller = id, %address, "controller added");
            self.conns.insert(
                id,
                Conn {
                    address: address.clone(),
                    client,
                    watcher,
                },
            );
        }
    }

    fn heartbeat(&mut self) {
        let now = self.now();
        let (round, epoch) = self.core.start_round(now);
        let timeout = Duration::from_millis(self.core.timing().lease_ms);
        for (&id, c) in &self.conns {
            let mut client = c.client.clone();
            let tx = self.tx.clone();
            let req = pb::HeartbeatRequest {
                protocol_version: PROTOCOL_VERSION,
                member: self.cfg.member.clone(),
                member_epoch: epoch,
                round,
            };
            tokio::spawn(async move {
                let result = match tokio::time::timeout(timeout, client.heartbeat(req)).await {
                    Ok(Ok(r)) => Ok(r.into_inner()),
                    Ok(Err(s)) => Err(s.message().to_string()),
                    Err(_) => Err("timed out".into()),
                };
                let _ = tx
                    .send(Event::Reply {
                        round,
                        epoch,
                        controller: id,
                        result,
                    })
                    .await;
            });
        }
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Reply {
                round,
                epoch,
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
                    match self.core.on_reply(round, epoch, &r) {
                        ReplyOutcome::Nothing => {}
                        ReplyOutcome::Renewed { .. } => {
                            metrics::renewed();
                            self.dirty = true;
                        }
                        ReplyOutcome::NewEpoch { old, new } => {
                            metrics::epoch_changed();
                            if old == 0 {
                                info!(epoch = new, "member epoch learned");
                                self.heartbeat_now = true;
                            } else {
                                warn!(old, new, controller, reason = %r.reason,
                                    "member epoch moved on (fenced): dropping every bucket");
                                self.withdraw_now();
                            }
                            self.dirty = true;
                        }
                    }
                }
            },
            Event::Assignment {
                controller,
                assignment,
            } => match self.core.on_assignment(&assignment) {
                Err(reason) => {
                    metrics::refused();
                    error!(controller, index = assignment.applied_index, %reason,
                        "assignment refused");
                }
                Ok(AssignmentOutcome::Stale) => {}
                Ok(AssignmentOutcome::Adopted { epoch_changed }) => {
                    let a = self.core.current().expect("just adopted");
                    if self.assignment_pending.is_none() {
                        self.assignment_pending = Some((Instant::now(), a.applied_index));
                    }
                    info!(
                        controller,
                        index = a.applied_index,
                        epoch = a.member_epoch,
                        owned = a.owned.len(),
                        release = a.release.len(),
                        "assignment"
                    );
                    if epoch_changed {
                        metrics::epoch_changed();
                        self.heartbeat_now = true;
                        if self.applied_until != 0 || !self.applied_owned.is_empty() {
                            warn!(
                                epoch = a.member_epoch,
                                controller, "member epoch moved on (fenced): dropping every bucket"
                            );
                            self.withdraw_now();
                        }
                    }
                    if let Some(list) = self.core.controllers().map(|c| {
                        c.iter()
                            .map(|c| (c.id, c.address.clone()))
                            .collect::<Vec<_>>()
                    }) {
                        self.sync_conns(&list);
                    }
                    self.dirty = true;
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

    /// Stop accepting new flows at once (fenced: the buckets are someone
    /// else's already).
    fn withdraw_now(&mut self) {
        let t = Instant::now();
        let r = tokio::task::block_in_place(|| self.plane.withdraw());
        metrics::reconcile(t.elapsed(), r.is_ok());
        if let Err(e) = r {
            error!(error = %e, "withdraw failed");
        }
        self.applied_owned.clear();
        self.applied_until = 0;
    }

    /// Bring the kernel in line with the core, if it needs it.
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

    fn reconcile_once(&mut self) {
        if !self.dirty {
            return;
        }
        let now = self.now();
        if now < self.adopt_until && !self.core.lease_valid(now) {
            // An earlier agent's elements still accept; don't cut them short.
            return;
        }
        let Some(desired) = self.core.desired(now, self.start, &self.cfg.interface) else {
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
                self.applied_until = desired
                    .lease_until
                    .saturating_duration_since(self.start)
                    .as_millis() as u64;
                if let Some((at, index)) = self.assignment_pending.take() {
                    let took = at.elapsed();
                    metrics::assignment_applied(took);
                    info!(
                        index,
                        took_us = took.as_micros() as u64,
                        "assignment applied"
                    );
                }
                self.send_released(false);
            }
            Err(e) => {
                // Stay dirty: the next event or tick retries with a full rebuild.
                error!(error = %e, "data plane apply failed");
            }
        }
    }

    /// Tell every controller the released buckets are out of the kernel.
    fn send_released(&mut self, retry: bool) {
        let release = self.core.release();
        if release.is_empty() {
            self.released_sent = None;
            return;
        }
        let due = match &self.released_sent {
            None => true,
            Some((sent, at)) => *sent != release || (retry && at.elapsed() >= RELEASED_RETRY),
        };
        if !due {
            return;
        }
        info!(buckets = ?release.iter().map(|g| g.bucket).collect::<Vec<_>>(), "released");
        for c in self.conns.values() {
            let mut client = c.client.clone();
            let req = pb::ReleasedRequest {
                protocol_version: PROTOCOL_VERSION,
                member: self.cfg.member.clone(),
                buckets: release.clone(),
            };
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(2), client.released(req)).await;
            });
        }
        self.released_sent = Some((release, Instant::now()));
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
                self.core
                    .lease_expiry()
                    .map_or(0, |e| e.saturating_sub(now)),
            ),
        );
        if self.adopt_until != 0 && now >= self.adopt_until {
            self.dirty = true;
        }
        // Repeat Released only while the kernel holds the current assignment.
        if self.assignment_pending.is_none() && !self.dirty {
            self.send_released(true);
        }
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
        d.acked && self.core.holds_nothing() && !self.dirty
    }
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
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let (tx, mut rx) = mpsc::channel(1024);
    let configured: BTreeSet<u64> = cfg.controllers.iter().map(|c| c.id).collect();
    let start = Instant::now();
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
        core: Core::new(&cfg.member, configured),
        tls: tls_cfg,
        plane,
        start,
        tx,
        conns: BTreeMap::new(),
        leader: 0,
        adopt_until: adopted.as_millis() as u64,
        dirty: true,
        applied_owned: BTreeSet::new(),
        applied_until: 0,
        released_sent: None,
        draining: None,
        heartbeat_now: false,
        assignment_pending: None,
        cfg,
    };
    let initial: Vec<(u64, String)> = rt
        .cfg
        .controllers
        .iter()
        .map(|c| (c.id, c.address.clone()))
        .collect();
    rt.sync_conns(&initial);
    info!(member = %rt.cfg.member, controllers = initial.len(), "agent started");

    let mut hb_ms = rt.core.timing().heartbeat_ms;
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
            _ = hb.tick() => rt.heartbeat(),
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
            rt.heartbeat();
            hb.reset();
        }
        rt.reconcile();
        if rt.core.timing().heartbeat_ms != hb_ms {
            hb_ms = rt.core.timing().heartbeat_ms;
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

//! The world: controllers, the virtual clock, the event queue and the event loop.
//!
//! Time is virtual (milliseconds). Everything that happens is an [`Event`] in one
//! priority queue ordered by `(time, sequence number)`, so ties are broken by the
//! order events were scheduled, never by anything outside the seed. Handling an
//! event is one *step*: it touches one or a few nodes, runs their Ready rounds,
//! routes what they send, and then every invariant is checked.
//!
//! Events: deliver a message, tick a node, a client operation, a fault (from the
//! [`FaultPlan`]) and the ends of faults (restart, heal, resume), and in the final
//! phase, liveness probes. Node agents, leases and the ownership planner live in
//! `world/leases.rs` (events `Event::Lease`); after raft is live again the run
//! goes on to check that bucket ownership converges and then stays quiet.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap};

use raft::eraftpb::{Message, MessageType, Snapshot};
use raft::{StateRole, Storage};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vipshare_core::agent::AgentFaults;
use vipshare_core::command::{Command, ProposalId};
use vipshare_core::fence::FenceFaults;
use vipshare_core::lease::PromiseFaults;
use vipshare_core::replica::{
    is_snapshot, AppliedEntry, ControllerChange, Faults, Outcome, ReadyOutput, Replica,
    ReplicaConfig,
};
use vipshare_core::state::ClusterState;
use vipshare_core::storage::{bootstrap_snapshot, RaftStorage};

use crate::disk::SimDisk;
use crate::faults::{Direction, Fault, FaultPlan, Target};
use crate::invariants::{self, Checker, Fnv, Violation};
use crate::network::{cut, NetProfile, Network, Route};
use crate::workload::Workload;

mod kernel;
mod leases;
use leases::{CtlLease, EndPhase, LeaseEvent, LeaseWorld};

/// Everything a run depends on besides the seed's randomness.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    /// Founding controllers.
    pub nodes: usize,
    /// Virtual time with faults and client load, in ms.
    pub duration_ms: u64,
    /// After the faults are healed: the cluster must be fully caught up and commit
    /// a fresh proposal within this much virtual time.
    pub liveness_ms: u64,
    pub tick_ms: u64,
    /// Mean time between two planned faults.
    pub fault_gap_ms: u64,
    /// The deliberately injected bug: replicas send before syncing.
    pub skip_sync: bool,
    /// Check a crashed node's disk against what it promised others (terms, votes,
    /// acknowledged entries). Turning it off leaves only the violations a client
    /// could observe, to see how a durability bug surfaces.
    pub check_promises: bool,
    /// Node agents with leases, kernels and the ownership planner (off: the
    /// raft-only model).
    pub agents: bool,
    /// Number of agents (default: 3 to 8, drawn from the seed).
    pub agent_count: Option<usize>,
    /// Mean time between two planned agent faults.
    pub agent_fault_gap_ms: u64,
    /// The deliberately injected planner bug: fence without waiting for the
    /// controllers' promises (`PlannerFaults::skip_fence_wait`).
    pub skip_fence_wait: bool,
    /// Deliberate bugs in the agents' shipping decision code
    /// (`vipshare_core::agent::AgentFaults`): skip the persist, forget
    /// releases, never yield.
    pub agent_faults: AgentFaults,
    /// Deliberate bugs in the fence round (`vipshare_core::fence::FenceFaults`):
    /// the leader marking itself first.
    pub fence_faults: FenceFaults,
    /// Controllers' deliberate bugs (`vipshare_core::lease::PromiseFaults`).
    pub promise_faults: PromiseFaults,
    /// Length of the fault-free window after convergence in which no bucket may move.
    pub quiet_ms: u64,
    /// Print the event trace to stdout.
    pub print_trace: bool,
    /// Hash the event trace (see [`RunReport::trace_hash`]).
    pub hash_trace: bool,
}

impl SimConfig {
    pub fn new(seed: u64) -> Self {
        SimConfig {
            seed,
            nodes: 3,
            duration_ms: 60_000,
            liveness_ms: 10_000,
            tick_ms: 100,
            fault_gap_ms: 700,
            skip_sync: false,
            check_promises: true,
            agents: true,
            agent_count: None,
            agent_fault_gap_ms: 1200,
            skip_fence_wait: false,
            agent_faults: AgentFaults::default(),
            fence_faults: FenceFaults::default(),
            promise_faults: PromiseFaults::default(),
            quiet_ms: 3000,
            print_trace: false,
            hash_trace: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// An invariant in `invariants.rs` was broken.
    Safety,
    /// The cluster did not recover after every fault was healed.
    Liveness,
    /// Raft or the replica panicked (raft panics on some corruptions, e.g. a
    /// follower that lost entries it acknowledged).
    Panic,
    /// The simulator itself could not go on (e.g. a replica failed to start).
    Internal,
    /// Buckets moved (or an owner stopped accepting) in a fault-free window
    /// after convergence.
    Quiet,
}

#[derive(Debug, Clone)]
pub struct Failure {
    pub kind: FailureKind,
    pub time_ms: u64,
    pub message: String,
}

/// Counters for one run.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub events: u64,
    pub messages_sent: u64,
    pub messages_delivered: u64,
    pub messages_dropped: u64,
    pub snapshots_sent: u64,
    pub crashes: u64,
    pub lost_writes: u64,
    pub restarts: u64,
    pub partitions: u64,
    pub pauses: u64,
    pub proposals: u64,
    pub proposals_refused: u64,
    pub reads: u64,
    pub reads_served: u64,
    pub proposals_applied: u64,
    pub proposals_dropped: u64,
    /// Accepted by a leader but never applied (lost with a leader's log tail).
    pub proposals_unresolved: u64,
    pub controllers_added: u64,
    pub controllers_removed: u64,
    pub compactions: u64,
    pub leaders: usize,
    pub last_applied: u64,
    pub end_ms: u64,
    pub agents: usize,
    pub agent_faults: u64,
    pub agent_kills: u64,
    pub agent_pauses: u64,
    pub agent_restarts: u64,
    /// Agents that went silent because a majority refused their epoch for good.
    pub agent_yields: u64,
    pub lease_messages: u64,
    pub lease_extensions: u64,
    pub kernel_installs: u64,
    pub fence_rounds: u64,
    pub fences_proposed: u64,
    pub ownership_proposals: u64,
    /// Virtual time from raft being live again to every bucket being owned by a
    /// live agent and accepted by its kernel.
    pub convergence_ms: Option<u64>,
    /// ... and to nothing being left for the planner to do.
    pub settled_ms: Option<u64>,
    /// Every live member was damped past the bound: convergence not checked.
    pub convergence_skipped: bool,
    /// Smallest gap between one host's kernel element for a bucket timing out
    /// and another host's kernel starting to accept that bucket (the slack of
    /// failover by fencing).
    pub closest_handover_after_expiry_ms: Option<u64>,
    /// ... after the previous holder withdrew it (planned moves).
    pub closest_handover_after_withdrawal_ms: Option<u64>,
    /// During the faults (after the cluster was initialised): bucket-ms in
    /// which no kernel accepted the bucket, out of `bucket_ms`.
    pub unserved_bucket_ms: u64,
    pub bucket_ms: u64,
    /// World models (issue 10, item 4), each counting how often it fired:
    /// installs whose writer stalled between rendering the timeout and the
    /// kernel inserting it, landing later than `kernel_delay_ms` with their
    /// deadline stretched by the stall (`world/kernel.rs`) ...
    pub kernel_late_installs: u64,
    /// ... and the longest time past the kernel delay one landed.
    pub kernel_max_stall_ms: u64,
    /// Controllers removed from the voters that kept running for a while.
    pub controllers_lingered: u64,
    /// Agent starts configured with only some of the controllers.
    pub agent_partial_seeds: u64,
    /// Agents restarted right after a release while a controller lagged.
    pub lagging_restarts: u64,
}

/// The result of one seed.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub seed: u64,
    pub result: Result<Stats, Failure>,
    /// FNV-1a over every trace line (when [`SimConfig::hash_trace`] is set).
    pub trace_hash: u64,
}

/// Something that happens at one virtual time.
#[derive(Debug)]
enum Event {
    Deliver {
        msg: Box<Message>,
        from_incarnation: u64,
    },
    Tick {
        node: u64,
        incarnation: u64,
    },
    Client,
    Fault(Fault),
    Restart {
        node: u64,
        incarnation: u64,
    },
    Resume {
        node: u64,
    },
    Heal {
        partition: u64,
    },
    NetworkCalm {
        epoch: u64,
    },
    SnapshotStatus {
        leader: u64,
        incarnation: u64,
        peer: u64,
        delivered: bool,
    },
    EndFaults,
    Probe,
    Lease(LeaseEvent),
    /// A controller removed from the voters, kept running, stops now.
    StopRemoved {
        node: u64,
    },
}

struct Queued {
    time: u64,
    seq: u64,
    event: Event,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.time, self.seq) == (o.time, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> Ordering {
        (self.time, self.seq).cmp(&(o.time, o.seq))
    }
}

enum Slot {
    Up(Box<Replica<SimDisk>>),
    Down(SimDisk),
    /// Removed from the cluster and stopped for good.
    Gone,
}

struct Node {
    slot: Slot,
    /// Bumped on every start; stale ticks and restarts carry an older one.
    incarnation: u64,
    tick_ms: u64,
    paused_until: u64,
    /// Delay before restarting after a (planned) fsync failure crash.
    restart_after_fsync: u64,
    last_snapshot: u64,
    last_applied: Option<u64>,
}

impl Node {
    fn replica(&self) -> Option<&Replica<SimDisk>> {
        match &self.slot {
            Slot::Up(r) => Some(r),
            _ => None,
        }
    }

    fn replica_mut(&mut self) -> Option<&mut Replica<SimDisk>> {
        match &mut self.slot {
            Slot::Up(r) => Some(r),
            _ => None,
        }
    }

    fn is_up(&self) -> bool {
        matches!(self.slot, Slot::Up(_))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Faults,
    Liveness {
        deadline: u64,
    },
    /// Agents mode, after raft is live: ownership converges, then stays quiet.
    End(EndPhase),
    Done,
}

struct Trace {
    print: bool,
    hash: Option<Fnv>,
}

/// The simulated cluster.
pub struct World {
    cfg: SimConfig,
    rng: ChaCha8Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Queued>>,
    nodes: BTreeMap<u64, Node>,
    net: Network,
    net_epoch: u64,
    checker: Checker,
    workload: Workload,
    logger: slog::Logger,
    replica_cfg: ReplicaConfig,
    faults: Faults,
    next_id: u64,
    next_proposal: u64,
    /// Proposals accepted by a leader and not yet applied anywhere: the command's name.
    pending: BTreeMap<ProposalId, String>,
    initialised: bool,
    phase: Phase,
    probe: Option<(ProposalId, u64)>,
    /// Nodes to stop once the current step is done (removed from the cluster;
    /// see `World::removed` for the ones that keep running a while).
    to_stop: Vec<u64>,
    started: bool,
    trace: Trace,
    stats: Stats,
    hosts: Vec<crate::agents::Host>,
    ctl: BTreeMap<u64, CtlLease>,
    lease: LeaseWorld,
    /// The world models' own stream of the seed (kernel stalls, lingering
    /// controllers, agent configs), so that drawing them leaves the main
    /// stream's draws as they were.
    models: ChaCha8Rng,
}

fn address(id: u64) -> String {
    format!("10.0.0.{id}:7070")
}

fn safety(now: u64, seed: u64, v: Violation) -> Failure {
    Failure {
        kind: FailureKind::Safety,
        time_ms: now,
        message: format!("seed {seed}, t={now}ms: {v}"),
    }
}

/// Whether a raft log (or its snapshot) holds the entry `(index, term)`.
fn storage_holds(s: &RaftStorage<SimDisk>, index: u64, term: u64) -> bool {
    index <= s.latest_snapshot().get_metadata().index || s.term(index).ok() == Some(term)
}

/// Hash of the state a snapshot carries, comparable with [`invariants::state_hash`]
/// of a live replica at the snapshot's index.
fn snapshot_state_hash(snap: &Snapshot) -> u64 {
    let meta = snap.get_metadata();
    let mut state = if snap.data.is_empty() {
        ClusterState::default()
    } else {
        ClusterState::decode(&snap.data).unwrap_or_default()
    };
    state.applied = meta.index;
    invariants::state_hash(&state.encode(), meta.get_conf_state())
}

fn describe(m: &Message) -> String {
    let mut s = format!(
        "{:?} n{}->n{} term={}",
        m.get_msg_type(),
        m.from,
        m.to,
        m.term
    );
    match m.get_msg_type() {
        MessageType::MsgAppend => {
            s += &format!(" prev=({},{}) commit={}", m.index, m.log_term, m.commit);
            if let (Some(a), Some(b)) = (m.entries.first(), m.entries.last()) {
                s += &format!(" entries={}..={}", a.index, b.index);
            }
        }
        MessageType::MsgAppendResponse => {
            s += &format!(" index={} reject={}", m.index, m.reject);
            if m.reject {
                s += &format!(" hint={}", m.reject_hint);
            }
        }
        MessageType::MsgRequestVote | MessageType::MsgRequestPreVote => {
            s += &format!(" last=({},{})", m.index, m.log_term);
        }
        MessageType::MsgRequestVoteResponse | MessageType::MsgRequestPreVoteResponse => {
            s += &format!(" granted={}", !m.reject);
        }
        MessageType::MsgHeartbeat => s += &format!(" commit={}", m.commit),
        MessageType::MsgSnapshot => {
            let meta = m.get_snapshot().get_metadata();
            s += &format!(" snapshot=({},{})", meta.index, meta.term);
        }
        _ => {}
    }
    s
}

fn describe_outcome(o: &Outcome) -> String {
    invariants::outcome_key(o)
}

/// The command's variant name (its Debug form up to the fields).
fn command_name(c: &Command) -> String {
    let full = format!("{c:?}");
    full.split([' ', '{', '('])
        .next()
        .unwrap_or_default()
        .to_string()
}

impl World {
    pub fn new(cfg: SimConfig) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut plan_rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        plan_rng.set_stream(1);
        let mut models = ChaCha8Rng::seed_from_u64(cfg.seed);
        models.set_stream(3);

        let mut replica_cfg = ReplicaConfig::new(0);
        replica_cfg.election_tick = 10;
        replica_cfg.heartbeat_tick = 2;
        replica_cfg.snapshot_interval = rng.gen_range(20..=50);
        replica_cfg.max_size_per_msg = [256, 1024, 16 * 1024, 1024 * 1024][rng.gen_range(0..4)];
        replica_cfg.max_inflight_msgs = [2, 8, 256][rng.gen_range(0..3)];

        let ids: Vec<u64> = (1..=cfg.nodes as u64).collect();
        let founders: Vec<(u64, String)> = ids.iter().map(|&i| (i, address(i))).collect();
        let snap = bootstrap_snapshot(&ids, ClusterState::bootstrap(&founders).encode());
        let checker = Checker::new(1, 1, &ids, snapshot_state_hash(&snap));

        let trace = Trace {
            print: cfg.print_trace,
            hash: cfg.hash_trace.then(Fnv::default),
        };
        let faults = Faults {
            skip_sync: cfg.skip_sync,
        };
        let mut w = World {
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes: BTreeMap::new(),
            net: Network::default(),
            net_epoch: 0,
            checker,
            workload: Workload::default(),
            logger: slog::Logger::root(slog::Discard, slog::o!()),
            replica_cfg,
            faults,
            next_id: cfg.nodes as u64 + 1,
            next_proposal: 1,
            pending: BTreeMap::new(),
            initialised: false,
            phase: Phase::Faults,
            probe: None,
            to_stop: Vec::new(),
            started: false,
            trace,
            stats: Stats::default(),
            hosts: Vec::new(),
            ctl: BTreeMap::new(),
            lease: LeaseWorld::default(),
            models,
            cfg,
        };
        let rc = w.replica_cfg.clone();
        let (seed, nodes, skip) = (w.cfg.seed, w.cfg.nodes, w.cfg.skip_sync);
        w.trace(None, || {
            format!(
                "seed {seed} nodes={nodes} snapshot_interval={} max_size_per_msg={} max_inflight={} skip_sync={skip}",
                rc.snapshot_interval, rc.max_size_per_msg, rc.max_inflight_msgs,
            )
        });
        for &id in &ids {
            w.nodes.insert(
                id,
                Node {
                    slot: Slot::Down(SimDisk::bootstrapped(&snap)),
                    incarnation: 0,
                    tick_ms: w.cfg.tick_ms,
                    paused_until: 0,
                    restart_after_fsync: 0,
                    last_snapshot: 0,
                    last_applied: None,
                },
            );
        }
        let plan = FaultPlan::generate(&mut plan_rng, w.cfg.duration_ms, w.cfg.fault_gap_ms);
        for (t, f) in plan.faults {
            w.trace(None, || format!("plan: at {t}ms {f:?}"));
            w.schedule(t, Event::Fault(f));
        }
        if w.cfg.agents {
            w.init_agents(w.cfg.seed);
            w.stats.agents = w.hosts.len();
        }
        let end = w.cfg.duration_ms;
        w.schedule(end, Event::EndFaults);
        w.schedule(w.cfg.tick_ms, Event::Client);
        w
    }

    /// The invariant checker, e.g. for feeding it fabricated observations in tests.
    pub fn checker_mut(&mut self) -> &mut Checker {
        &mut self.checker
    }

    pub fn now(&self) -> u64 {
        self.now
    }

    /// The current leader with the highest term, if any node is up and leads.
    pub fn leader(&self) -> Option<(u64, u64)> {
        self.nodes
            .iter()
            .filter_map(|(&id, n)| n.replica().map(|r| (id, r.role())))
            .filter(|(_, r)| r.role == StateRole::Leader)
            .map(|(id, r)| (id, r.term))
            .max_by_key(|&(id, term)| (term, Reverse(id)))
    }

    pub fn trace_hash(&self) -> u64 {
        self.trace.hash.map_or(0, |h| h.0)
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    fn tracing(&self) -> bool {
        self.trace.print || self.trace.hash.is_some()
    }

    fn trace(&mut self, node: Option<u64>, text: impl FnOnce() -> String) {
        if !self.tracing() {
            return;
        }
        let who = node.map_or_else(|| "--".to_string(), |n| format!("n{n}"));
        self.trace_line(&who, text);
    }

    fn trace_line(&mut self, who: &str, text: impl FnOnce() -> String) {
        if !self.tracing() {
            return;
        }
        let line = format!("{:>7}ms {:<4} {}", self.now, who, text());
        if let Some(h) = &mut self.trace.hash {
            h.write(line.as_bytes());
            h.write(b"\n");
        }
        if self.trace.print {
            println!("{line}");
        }
    }

    fn schedule(&mut self, time: u64, event: Event) {
        self.seq += 1;
        self.queue.push(Reverse(Queued {
            time,
            seq: self.seq,
            event,
        }));
    }

    /// Runs to the end: `Ok` once the cluster proved live after the faults.
    pub fn run(&mut self) -> Result<Stats, Failure> {
        self.run_until(u64::MAX)?;
        Ok(self.stats.clone())
    }

    /// Runs events up to virtual time `until` (or the end of the run).
    pub fn run_until(&mut self, until: u64) -> Result<(), Failure> {
        if !self.started {
            self.started = true;
            let ids: Vec<u64> = self.nodes.keys().copied().collect();
            for id in ids {
                self.start_node(id)?;
                self.check_committed_held()?;
            }
        }
        while self.phase != Phase::Done {
            match self.queue.peek() {
                Some(Reverse(q)) if q.time <= until => {}
                Some(_) => return Ok(()),
                None => return Err(self.internal("event queue ran dry".into())),
            }
            let Some(Reverse(q)) = self.queue.pop() else {
                break;
            };
            self.now = q.time;
            self.stats.events += 1;
            self.step(q.event)?;
            self.check_committed_held()?;
            self.check_leases()?;
        }
        self.stats.end_ms = self.now;
        self.stats.leaders = self.checker.leaders_elected();
        self.stats.last_applied = self.checker.committed_tip().0;
        self.stats.proposals_unresolved = self.pending.len() as u64;
        Ok(())
    }

    fn internal(&self, message: String) -> Failure {
        Failure {
            kind: FailureKind::Internal,
            time_ms: self.now,
            message: format!("seed {}, t={}ms: {message}", self.cfg.seed, self.now),
        }
    }

    fn step(&mut self, ev: Event) -> Result<(), Failure> {
        match ev {
            Event::Deliver {
                msg,
                from_incarnation,
            } => self.deliver(*msg, from_incarnation),
            Event::Tick { node, incarnation } => self.tick(node, incarnation),
            Event::Client => self.client(),
            Event::Fault(f) => {
                if self.phase == Phase::Faults {
                    self.inject(f)?;
                }
                Ok(())
            }
            Event::Restart { node, incarnation } => {
                let due = self.nodes.get(&node).is_some_and(|n| {
                    n.incarnation == incarnation && matches!(n.slot, Slot::Down(_))
                });
                if due {
                    self.start_node(node)?;
                }
                Ok(())
            }
            Event::Resume { node } => {
                if self
                    .nodes
                    .get(&node)
                    .is_some_and(|n| n.paused_until == self.now)
                {
                    self.trace(Some(node), || "resumes".into());
                }
                Ok(())
            }
            Event::Heal { partition } => {
                self.net.heal(partition);
                self.trace(None, || format!("partition {partition} healed"));
                Ok(())
            }
            Event::NetworkCalm { epoch } => {
                if epoch == self.net_epoch {
                    self.net.set_profile(NetProfile::calm());
                    self.trace(None, || "network calm again".into());
                }
                Ok(())
            }
            Event::SnapshotStatus {
                leader,
                incarnation,
                peer,
                delivered,
            } => {
                let Some(n) = self.nodes.get_mut(&leader) else {
                    return Ok(());
                };
                if n.incarnation != incarnation {
                    return Ok(());
                }
                let Some(r) = n.replica_mut() else {
                    return Ok(());
                };
                r.report_snapshot(peer, delivered);
                self.trace(Some(leader), || {
                    format!("snapshot to n{peer} reported delivered={delivered}")
                });
                self.process(leader)
            }
            Event::EndFaults => self.end_faults(),
            Event::Probe => self.probe(),
            Event::Lease(ev) => self.lease_step(ev),
            Event::StopRemoved { node } => {
                self.stop_node(node);
                Ok(())
            }
        }
    }

    // ---- nodes -------------------------------------------------------------

    fn node_config(&self, id: u64) -> ReplicaConfig {
        let mut c = self.replica_cfg.clone();
        c.id = id;
        c
    }

    /// Starts (or restarts) a node from what its disk holds.
    fn start_node(&mut self, id: u64) -> Result<(), Failure> {
        let mut cfg = self.node_config(id);
        cfg.election_seed = self.rng.gen();
        let period = self.cfg.tick_ms * self.rng.gen_range(97..=103) / 100;
        let phase = self.rng.gen_range(1..=period);
        let Some(node) = self.nodes.get_mut(&id) else {
            return Ok(());
        };
        if !matches!(node.slot, Slot::Down(_)) {
            return Ok(());
        }
        let Slot::Down(disk) = std::mem::replace(&mut node.slot, Slot::Gone) else {
            return Ok(());
        };
        let recovered = disk.recover();
        let storage = RaftStorage::new(disk, recovered);
        let mut replica = match Replica::new(cfg, storage, &self.logger) {
            Ok(r) => r,
            Err(e) => return Err(self.internal(format!("n{id} failed to start: {e}"))),
        };
        replica.set_faults(self.faults);
        node.slot = Slot::Up(Box::new(replica));
        node.incarnation += 1;
        node.tick_ms = period;
        node.paused_until = 0;
        node.last_snapshot = 0;
        node.last_applied = None;
        let incarnation = node.incarnation;
        if incarnation > 1 {
            self.stats.restarts += 1;
        }
        self.trace(Some(id), || {
            format!("starts (incarnation {incarnation}, tick every {period}ms from +{phase}ms)")
        });
        self.schedule(
            self.now + phase,
            Event::Tick {
                node: id,
                incarnation,
            },
        );
        self.lease_node_started(id);
        self.process(id)
    }

    /// Power loss on `id`: its replica is dropped and unsynced writes are (partly) lost.
    fn crash_node(&mut self, id: u64, why: &str) -> Result<(), Failure> {
        let Some(node) = self.nodes.get_mut(&id) else {
            return Ok(());
        };
        if !node.is_up() {
            return Ok(());
        }
        let Slot::Up(mut replica) = std::mem::replace(&mut node.slot, Slot::Gone) else {
            return Ok(());
        };
        let mut disk = std::mem::take(replica.storage_mut().durable_mut());
        drop(replica);
        let pending = disk.pending_writes();
        let keep = self.rng.gen_range(0..=pending);
        disk.crash(keep);
        self.stats.crashes += 1;
        self.stats.lost_writes += (pending - keep) as u64;
        let hs = disk.durable().hard_state.clone();
        let last = disk.durable().last_index();
        node.slot = Slot::Down(disk);
        node.paused_until = 0;
        self.lease_node_down(id);
        self.trace(Some(id), || {
            format!(
                "CRASH ({why}); {keep} of {pending} unsynced writes survive; disk has term={} vote={} commit={}",
                hs.term, hs.vote, hs.commit
            )
        });
        if !self.cfg.check_promises {
            return Ok(());
        }
        let (seed, now) = (self.cfg.seed, self.now);
        self.checker
            .check_recovered(id, &hs, last)
            .map_err(|v| safety(now, seed, v))
    }

    fn stop_node(&mut self, id: u64) {
        if let Some(n) = self.nodes.get_mut(&id) {
            if !matches!(n.slot, Slot::Gone) {
                n.slot = Slot::Gone;
                if let Some(c) = self.ctl.get_mut(&id) {
                    c.stop();
                }
                self.stats.controllers_removed += 1;
                self.trace(Some(id), || "removed from the cluster: stopped".into());
                self.restart_stranded_agents();
            }
        }
    }

    fn is_paused(&self, id: u64) -> bool {
        self.nodes
            .get(&id)
            .is_some_and(|n| n.paused_until > self.now)
    }

    /// Runs Ready rounds on `id` until it has nothing more to do, routes what it
    /// sends, and checks the invariants that concern it.
    fn process(&mut self, id: u64) -> Result<(), Failure> {
        for round in 0.. {
            if round == 64 {
                return Err(self.internal(format!(
                    "n{id} still has work after {round} Ready rounds in one step"
                )));
            }
            let Some(r) = self.nodes.get_mut(&id).and_then(Node::replica_mut) else {
                break;
            };
            let out = match r.handle_ready() {
                Ok(out) => out,
                Err(e) => {
                    let delay = self.nodes.get(&id).map_or(0, |n| n.restart_after_fsync);
                    self.crash_node(id, &format!("ready round failed: {e}"))?;
                    let incarnation = self.nodes.get(&id).map_or(0, |n| n.incarnation);
                    self.schedule(
                        self.now + delay.max(1),
                        Event::Restart {
                            node: id,
                            incarnation,
                        },
                    );
                    break;
                }
            };
            let idle = out.messages.is_empty()
                && out.applied.is_empty()
                && out.role_changed.is_none()
                && !out.snapshot_installed
                && out.compacted_to.is_none()
                && out.reads.is_empty();
            self.absorb(id, out)?;
            if idle {
                break;
            }
        }
        self.check_node(id)?;
        self.lease_after_process(id)?;
        for id in std::mem::take(&mut self.to_stop) {
            self.stop_node(id);
        }
        Ok(())
    }

    fn absorb(&mut self, id: u64, out: ReadyOutput) -> Result<(), Failure> {
        if let Some(role) = out.role_changed {
            self.trace(Some(id), || {
                format!(
                    "becomes {:?} term={} leader={}",
                    role.role, role.term, role.leader
                )
            });
        }
        if out.snapshot_installed {
            self.trace(Some(id), || "installed a snapshot from the leader".into());
        }
        for a in &out.applied {
            self.on_applied(id, a)?;
        }
        if !out.reads.is_empty() {
            let applied = self
                .nodes
                .get(&id)
                .and_then(Node::replica)
                .map_or(0, |r| r.applied_index());
            for ctx in &out.reads {
                self.stats.reads_served += 1;
                self.trace(Some(id), || {
                    format!(
                        "serves read {:?} at applied {applied}",
                        String::from_utf8_lossy(ctx)
                    )
                });
                let (seed, now) = (self.cfg.seed, self.now);
                self.checker
                    .observe_read_served(id, ctx, applied)
                    .map_err(|v| safety(now, seed, v))?;
            }
        }
        if let Some(i) = out.compacted_to {
            self.stats.compactions += 1;
            self.trace(Some(id), || {
                format!("compacted the log into a snapshot at {i}")
            });
        }
        self.send(id, out.messages);
        Ok(())
    }

    fn on_applied(&mut self, id: u64, a: &AppliedEntry) -> Result<(), Failure> {
        let voters_before = self.checker.voters().to_vec();
        let (seed, now) = (self.cfg.seed, self.now);
        self.checker
            .observe_applied(id, a)
            .map_err(|v| safety(now, seed, v))?;
        self.trace(Some(id), || {
            format!(
                "applies {} (term {}) proposal={} {}",
                a.index,
                a.term,
                a.proposal
                    .map_or("-".into(), |p| format!("n{}#{}", p.node, p.seq)),
                describe_outcome(&a.outcome)
            )
        });
        if a.proposal.and_then(|p| self.pending.remove(&p)).is_some() {
            match a.outcome {
                Outcome::Dropped => self.stats.proposals_dropped += 1,
                _ => self.stats.proposals_applied += 1,
            }
        }
        let voters = self.checker.voters().to_vec();
        if voters != voters_before {
            for old in voters_before {
                if !voters.contains(&old) {
                    self.removed(old);
                }
            }
        }
        Ok(())
    }

    /// `id` left the voters (its removal committed). As a real controller
    /// does until its operator (or its own shutdown on learning of the
    /// removal) stops it, it keeps running for a while drawn from the seed:
    /// raft, heartbeat answers to the agents that still list it, assignment
    /// streams from its applied state. Half of the time it stops at once.
    /// (A leader that applied its own removal steps down in `Replica`; before
    /// it did, raft-rs panicked on its next commit: seed 481.)
    fn removed(&mut self, id: u64) {
        let linger = if self.models.gen_bool(0.5) {
            0
        } else {
            self.models.gen_range(1..=3000)
        };
        if linger == 0 {
            self.to_stop.push(id);
            return;
        }
        self.stats.controllers_lingered += 1;
        self.trace(Some(id), || {
            format!("removed from the voters; keeps running for {linger}ms")
        });
        self.schedule(self.now + linger, Event::StopRemoved { node: id });
    }

    /// Hands messages to the network.
    fn send(&mut self, from: u64, msgs: Vec<Message>) {
        if msgs.is_empty() {
            return;
        }
        let from_incarnation = self.nodes.get(&from).map_or(0, |n| n.incarnation);
        let mut unreachable = Vec::new();
        for m in msgs {
            self.checker.observe_sent(from, &m);
            self.stats.messages_sent += 1;
            let to = m.to;
            let snapshot = is_snapshot(&m);
            if snapshot {
                self.stats.snapshots_sent += 1;
            }
            let alive = self
                .nodes
                .get(&to)
                .is_some_and(|n| matches!(n.slot, Slot::Up(_)));
            let route = if alive {
                self.net.route(&mut self.rng, from, to)
            } else {
                Route::Blocked
            };
            match route {
                Route::Blocked => {
                    self.stats.messages_dropped += 1;
                    let why = if alive { "partitioned" } else { "peer down" };
                    self.trace(Some(from), || {
                        format!("send {} BLOCKED ({why})", describe(&m))
                    });
                    unreachable.push((to, snapshot));
                }
                Route::Lost => {
                    self.stats.messages_dropped += 1;
                    self.trace(Some(from), || format!("send {} LOST", describe(&m)));
                    if snapshot {
                        // The transport notices the stream broke, a little later.
                        self.schedule(
                            self.now + 200,
                            Event::SnapshotStatus {
                                leader: from,
                                incarnation: from_incarnation,
                                peer: to,
                                delivered: false,
                            },
                        );
                    }
                }
                Route::Deliver(delays) => {
                    self.trace(Some(from), || {
                        format!("send {} in {:?}ms", describe(&m), delays)
                    });
                    let last = delays.len() - 1;
                    let mut m = Some(m);
                    for (i, d) in delays.into_iter().enumerate() {
                        let msg = if i == last {
                            m.take().unwrap_or_default()
                        } else {
                            m.clone().unwrap_or_default()
                        };
                        self.schedule(
                            self.now + d,
                            Event::Deliver {
                                msg: Box::new(msg),
                                from_incarnation,
                            },
                        );
                    }
                }
            }
        }
        if let Some(r) = self.nodes.get_mut(&from).and_then(Node::replica_mut) {
            for (to, snapshot) in unreachable {
                r.report_unreachable(to);
                if snapshot {
                    r.report_snapshot(to, false);
                }
            }
        }
    }

    fn deliver(&mut self, msg: Message, from_incarnation: u64) -> Result<(), Failure> {
        let (from, to) = (msg.from, msg.to);
        let snapshot = is_snapshot(&msg);
        let up = self.nodes.get(&to).is_some_and(Node::is_up);
        if up && self.is_paused(to) {
            // Waits in the socket buffer until the process runs again.
            let at = self.nodes.get(&to).map_or(self.now, |n| n.paused_until);
            let at = at + self.rng.gen_range(0..5);
            self.schedule(
                at,
                Event::Deliver {
                    msg: Box::new(msg),
                    from_incarnation,
                },
            );
            return Ok(());
        }
        let blocked = self.net.is_blocked(from, to);
        if !up || blocked {
            self.stats.messages_dropped += 1;
            self.trace(Some(to), || {
                format!(
                    "drop {} ({})",
                    describe(&msg),
                    if up {
                        "partitioned in flight"
                    } else {
                        "node down"
                    }
                )
            });
            let sender = self
                .nodes
                .get_mut(&from)
                .filter(|n| n.incarnation == from_incarnation)
                .and_then(Node::replica_mut);
            if let Some(r) = sender {
                r.report_unreachable(to);
                if snapshot {
                    r.report_snapshot(to, false);
                }
                return self.process(from);
            }
            return Ok(());
        }
        self.stats.messages_delivered += 1;
        self.trace(Some(to), || format!("recv {}", describe(&msg)));
        let Some(r) = self.nodes.get_mut(&to).and_then(Node::replica_mut) else {
            return Ok(());
        };
        if let Err(e) = r.step(msg) {
            self.trace(Some(to), || format!("step refused: {e}"));
        }
        if snapshot {
            self.schedule(
                self.now + 1,
                Event::SnapshotStatus {
                    leader: from,
                    incarnation: from_incarnation,
                    peer: to,
                    delivered: true,
                },
            );
        }
        self.process(to)
    }

    fn tick(&mut self, id: u64, incarnation: u64) -> Result<(), Failure> {
        let Some(n) = self.nodes.get_mut(&id) else {
            return Ok(());
        };
        if n.incarnation != incarnation || !n.is_up() {
            return Ok(());
        }
        let next = self.now + n.tick_ms;
        let paused = n.paused_until > self.now;
        if !paused {
            if let Some(r) = n.replica_mut() {
                r.tick();
            }
        }
        self.schedule(
            next,
            Event::Tick {
                node: id,
                incarnation,
            },
        );
        if paused {
            return Ok(());
        }
        self.process(id)
    }

    // ---- clients -----------------------------------------------------------

    /// A node a client would reach as leader: a random running node, or the leader
    /// it names.
    fn client_target(&mut self) -> Option<u64> {
        let running: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.is_up() && n.paused_until <= self.now)
            .map(|(&id, _)| id)
            .collect();
        let &first = running.choose(&mut self.rng)?;
        let role = self.nodes.get(&first)?.replica()?.role();
        if role.role == StateRole::Leader {
            return Some(first);
        }
        let hinted = role.leader;
        let ok = running.contains(&hinted)
            && self
                .nodes
                .get(&hinted)
                .and_then(Node::replica)
                .is_some_and(|r| r.is_leader());
        ok.then_some(hinted)
    }

    fn client(&mut self) -> Result<(), Failure> {
        if self.phase != Phase::Faults {
            return Ok(());
        }
        let next = self.now + self.rng.gen_range(5..=60);
        self.schedule(next, Event::Client);
        if self.rng.gen_ratio(1, 5) {
            return self.client_read();
        }
        let Some(target) = self.client_target() else {
            return Ok(());
        };
        let cmd = self.workload.next_command(&mut self.rng, self.initialised);
        self.propose(target, cmd)
    }

    /// A linearizable read at a random running node (followers forward it).
    fn client_read(&mut self) -> Result<(), Failure> {
        let running: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.is_up() && n.paused_until <= self.now)
            .map(|(&id, _)| id)
            .collect();
        let Some(&target) = running.choose(&mut self.rng) else {
            return Ok(());
        };
        self.stats.reads += 1;
        let ctx = format!("read-{}", self.stats.reads).into_bytes();
        self.checker.observe_read_started(ctx.clone());
        self.trace(Some(target), || {
            format!("client reads {:?}", String::from_utf8_lossy(&ctx))
        });
        if let Some(r) = self.nodes.get_mut(&target).and_then(Node::replica_mut) {
            r.read_index(ctx);
        }
        self.process(target)
    }

    fn propose(&mut self, target: u64, cmd: Command) -> Result<(), Failure> {
        let id = ProposalId {
            node: target,
            seq: self.next_proposal,
        };
        self.next_proposal += 1;
        let Some(r) = self.nodes.get_mut(&target).and_then(Node::replica_mut) else {
            return Ok(());
        };
        let name = command_name(&cmd);
        let stamp = vipshare_core::command::Stamp {
            at_ms: self.now,
            by: "client".into(),
        };
        match r.propose(id, &stamp, &cmd) {
            Ok(()) => {
                self.stats.proposals += 1;
                self.pending.insert(id, name.clone());
                self.trace(Some(target), || {
                    format!("client proposes n{target}#{} {name}", id.seq)
                });
                self.process(target)
            }
            Err(e) => {
                self.stats.proposals_refused += 1;
                self.trace(Some(target), || {
                    format!("client proposal {name} refused: {e}")
                });
                Ok(())
            }
        }
    }

    // ---- faults ------------------------------------------------------------

    fn quorum_ok_without(&self, id: u64) -> bool {
        let voters = self.checker.voters();
        if !voters.contains(&id) {
            return true;
        }
        let available = voters
            .iter()
            .filter(|&&v| v != id)
            .filter(|&&v| {
                self.nodes
                    .get(&v)
                    .is_some_and(|n| n.is_up() && n.paused_until <= self.now)
            })
            .count();
        available > voters.len() / 2
    }

    fn resolve(&mut self, target: Target) -> Option<u64> {
        let up: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.is_up() && n.paused_until <= self.now)
            .map(|(&id, _)| id)
            .collect();
        let leader = self.leader().map(|(id, _)| id);
        match (target, leader) {
            (Target::Leader, Some(l)) => Some(l),
            (Target::Follower, Some(l)) => {
                let rest: Vec<u64> = up.into_iter().filter(|&i| i != l).collect();
                rest.choose(&mut self.rng).copied()
            }
            _ => up.choose(&mut self.rng).copied(),
        }
    }

    fn all_ids(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(_, n)| !matches!(n.slot, Slot::Gone))
            .map(|(&id, _)| id)
            .collect()
    }

    fn partition(&mut self, links: Vec<(u64, u64)>, duration: u64, what: String) {
        let id = self.net.partition(links);
        self.stats.partitions += 1;
        self.trace(None, || {
            format!("FAULT partition {id}: {what} for {duration}ms")
        });
        self.schedule(self.now + duration, Event::Heal { partition: id });
    }

    fn inject(&mut self, f: Fault) -> Result<(), Failure> {
        match f {
            Fault::Crash {
                target,
                down_ms,
                allow_quorum_loss,
            } => {
                let Some(id) = self.resolve(target) else {
                    return Ok(());
                };
                if !allow_quorum_loss && !self.quorum_ok_without(id) {
                    self.trace(Some(id), || "crash skipped: would lose quorum".into());
                    return Ok(());
                }
                self.crash_node(id, &format!("planned, down for {down_ms}ms"))?;
                let incarnation = self.nodes.get(&id).map_or(0, |n| n.incarnation);
                self.schedule(
                    self.now + down_ms,
                    Event::Restart {
                        node: id,
                        incarnation,
                    },
                );
            }
            Fault::FsyncFailure { target, down_ms } => {
                let Some(id) = self.resolve(target) else {
                    return Ok(());
                };
                if !self.quorum_ok_without(id) {
                    return Ok(());
                }
                if let Some(n) = self.nodes.get_mut(&id) {
                    n.restart_after_fsync = down_ms;
                    if let Some(r) = n.replica_mut() {
                        r.storage_mut().durable_mut().fail_next_sync();
                    }
                }
                self.trace(Some(id), || "FAULT next fsync will fail".into());
            }
            Fault::Pause { target, pause_ms } => {
                let Some(id) = self.resolve(target) else {
                    return Ok(());
                };
                if !self.quorum_ok_without(id) {
                    return Ok(());
                }
                let until = self.now + pause_ms;
                if let Some(n) = self.nodes.get_mut(&id) {
                    n.paused_until = until;
                }
                self.stats.pauses += 1;
                self.trace(Some(id), || format!("FAULT paused for {pause_ms}ms"));
                self.schedule(until, Event::Resume { node: id });
            }
            Fault::Isolate {
                target,
                duration_ms,
            } => {
                let Some(id) = self.resolve(target) else {
                    return Ok(());
                };
                let mut others = self.all_ids();
                others.extend(self.agent_ids());
                self.partition(
                    cut(&[id], &others, false),
                    duration_ms,
                    format!("n{id} isolated"),
                );
            }
            Fault::OneWay {
                target,
                direction,
                duration_ms,
            } => {
                let Some(id) = self.resolve(target) else {
                    return Ok(());
                };
                let mut others = self.all_ids();
                others.extend(self.agent_ids());
                let (links, what) = match direction {
                    Direction::Deaf => (cut(&others, &[id], true), format!("n{id} hears nobody")),
                    Direction::Mute => (cut(&[id], &others, true), format!("nobody hears n{id}")),
                };
                self.partition(links, duration_ms, what);
            }
            Fault::Split { duration_ms } => {
                let mut ids = self.all_ids();
                if ids.len() < 2 {
                    return Ok(());
                }
                ids.shuffle(&mut self.rng);
                let k = self.rng.gen_range(1..ids.len());
                let (a, b) = ids.split_at(k);
                let what = format!("{a:?} | {b:?}");
                let (mut a, mut b) = (a.to_vec(), b.to_vec());
                // Each agent ends up on one side.
                for h in self.agent_ids() {
                    if self.rng.gen_bool(0.5) {
                        a.push(h);
                    } else {
                        b.push(h);
                    }
                }
                self.partition(cut(&a, &b, false), duration_ms, what);
            }
            Fault::OneWayPair { duration_ms } => {
                let mut ids = self.all_ids();
                if ids.len() < 2 {
                    return Ok(());
                }
                ids.shuffle(&mut self.rng);
                let (a, b) = (ids[0], ids[1]);
                self.partition(
                    vec![(b, a)],
                    duration_ms,
                    format!("n{a} reaches n{b} but not back"),
                );
            }
            Fault::Network {
                profile,
                duration_ms,
            } => {
                self.net_epoch += 1;
                self.trace(None, || {
                    format!("FAULT network turns {profile} for {duration_ms}ms")
                });
                self.net.set_profile(profile);
                let epoch = self.net_epoch;
                self.schedule(self.now + duration_ms, Event::NetworkCalm { epoch });
            }
            Fault::AddController => self.add_controller()?,
            Fault::RemoveController { target } => self.remove_controller(target)?,
        }
        Ok(())
    }

    fn leader_for_change(&self) -> Option<u64> {
        self.leader()
            .map(|(id, _)| id)
            .filter(|&id| !self.is_paused(id))
    }

    fn add_controller(&mut self) -> Result<(), Failure> {
        if self.checker.voters().len() >= self.cfg.nodes + 2 {
            return Ok(());
        }
        let Some(leader) = self.leader_for_change() else {
            return Ok(());
        };
        let new = self.next_id;
        let pid = ProposalId {
            node: leader,
            seq: self.next_proposal,
        };
        self.next_proposal += 1;
        let Some(r) = self.nodes.get_mut(&leader).and_then(Node::replica_mut) else {
            return Ok(());
        };
        let change = ControllerChange::Add {
            id: new,
            address: address(new),
        };
        match r.propose_controller_change(pid, change) {
            Ok(()) => {
                self.next_id += 1;
                self.stats.controllers_added += 1;
                self.trace(Some(leader), || {
                    format!("FAULT proposes adding controller n{new}")
                });
                self.nodes.insert(
                    new,
                    Node {
                        slot: Slot::Down(SimDisk::default()),
                        incarnation: 0,
                        tick_ms: self.cfg.tick_ms,
                        paused_until: 0,
                        restart_after_fsync: 0,
                        last_snapshot: 0,
                        last_applied: None,
                    },
                );
                self.process(leader)?;
                self.start_node(new)
            }
            Err(e) => {
                self.trace(Some(leader), || format!("adding a controller refused: {e}"));
                Ok(())
            }
        }
    }

    fn remove_controller(&mut self, target: Target) -> Result<(), Failure> {
        let voters = self.checker.voters().to_vec();
        if voters.len() <= 3 {
            return Ok(());
        }
        let Some(leader) = self.leader_for_change() else {
            return Ok(());
        };
        let victim = match target {
            Target::Leader => leader,
            Target::Follower => {
                let rest: Vec<u64> = voters.iter().copied().filter(|&v| v != leader).collect();
                let Some(&v) = rest.choose(&mut self.rng) else {
                    return Ok(());
                };
                v
            }
            Target::Any => {
                let Some(&v) = voters.choose(&mut self.rng) else {
                    return Ok(());
                };
                v
            }
        };
        let pid = ProposalId {
            node: leader,
            seq: self.next_proposal,
        };
        self.next_proposal += 1;
        let Some(r) = self.nodes.get_mut(&leader).and_then(Node::replica_mut) else {
            return Ok(());
        };
        match r.propose_controller_change(pid, ControllerChange::Remove { id: victim }) {
            Ok(()) => {
                self.trace(Some(leader), || {
                    format!("FAULT proposes removing controller n{victim}")
                });
                self.process(leader)
            }
            Err(e) => {
                self.trace(Some(leader), || {
                    format!("removing controller n{victim} refused: {e}")
                });
                Ok(())
            }
        }
    }

    // ---- end of run: liveness ------------------------------------------------

    fn end_faults(&mut self) -> Result<(), Failure> {
        self.trace(None, || {
            "END OF FAULTS: healing the network, resuming and restarting every node".into()
        });
        self.phase = Phase::Liveness {
            deadline: self.now + self.cfg.liveness_ms,
        };
        self.net.heal_all();
        self.net.set_profile(NetProfile::calm());
        self.net_epoch += 1;
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            if let Some(n) = self.nodes.get_mut(&id) {
                n.paused_until = 0;
                if let Some(r) = n.replica_mut() {
                    r.storage_mut().durable_mut().disarm();
                }
            }
            if self
                .nodes
                .get(&id)
                .is_some_and(|n| matches!(n.slot, Slot::Down(_)))
            {
                self.start_node(id)?;
            }
        }
        self.agents_heal();
        self.schedule(self.now + 100, Event::Probe);
        Ok(())
    }

    fn probe(&mut self) -> Result<(), Failure> {
        let deadline = match self.phase {
            Phase::Liveness { deadline } => deadline,
            Phase::End(p) => return self.end_probe(p),
            _ => return Ok(()),
        };
        let voters = self.checker.voters().to_vec();
        let leader = self
            .leader()
            .map(|(id, _)| id)
            .filter(|id| voters.contains(id));
        let probe_applied = self
            .probe
            .is_some_and(|(pid, _)| self.checker.applied_at(pid).is_some());
        if !probe_applied {
            let stale = self.probe.is_none_or(|(_, at)| self.now >= at + 2000);
            if let (true, Some(l)) = (stale, leader) {
                let pid = ProposalId {
                    node: l,
                    seq: self.next_proposal,
                };
                let payload = format!("liveness probe {}", pid.seq).into_bytes();
                self.propose(l, Command::Noop { payload })?;
                self.probe = Some((pid, self.now));
            }
        }
        let probe_applied = self
            .probe
            .is_some_and(|(pid, _)| self.checker.applied_at(pid).is_some());
        let status: Vec<Option<(u64, u64, u64)>> = voters
            .iter()
            .map(|v| {
                self.nodes
                    .get(v)
                    .and_then(Node::replica)
                    .map(|r| (r.applied_index(), r.commit_index(), r.last_index()))
            })
            .collect();
        let caught_up = status.iter().all(|s| {
            matches!((s, status.first()), (Some((a, c, l)), Some(Some((a0, _, _))))
                if a == a0 && a == c && a == l)
        });
        if probe_applied && caught_up {
            self.trace(None, || {
                format!(
                    "LIVE: voters {voters:?} all applied {} including the probe",
                    status[0].map_or(0, |s| s.0)
                )
            });
            if self.agents_after_live() {
                self.schedule(self.now + 50, Event::Probe);
            } else {
                self.phase = Phase::Done;
            }
            return Ok(());
        }
        if self.now >= deadline {
            let detail: Vec<String> = voters
                .iter()
                .map(|v| match self.nodes.get(v).map(|n| &n.slot) {
                    Some(Slot::Up(r)) => {
                        let role = r.role();
                        format!(
                            "n{v}: {:?} term={} leader={} applied={} commit={} last={}",
                            role.role,
                            role.term,
                            role.leader,
                            r.applied_index(),
                            r.commit_index(),
                            r.last_index()
                        )
                    }
                    Some(Slot::Down(_)) => format!("n{v}: down"),
                    _ => format!("n{v}: gone"),
                })
                .collect();
            return Err(Failure {
                kind: FailureKind::Liveness,
                time_ms: self.now,
                message: format!(
                    "seed {}, t={}ms: no progress after heal ({}ms after the faults ended): {}",
                    self.cfg.seed,
                    self.now,
                    self.cfg.liveness_ms,
                    detail.join("; ")
                ),
            });
        }
        self.schedule(self.now + 50, Event::Probe);
        Ok(())
    }

    // ---- invariants --------------------------------------------------------

    /// The per-node invariants, after `id` took a step.
    fn check_node(&mut self, id: u64) -> Result<(), Failure> {
        let (seed, now) = (self.cfg.seed, self.now);
        let Some(node) = self.nodes.get_mut(&id) else {
            return Ok(());
        };
        let incarnation = node.incarnation;
        let Slot::Up(r) = &mut node.slot else {
            return Ok(());
        };
        let err = |v| safety(now, seed, v);

        let role = r.role();
        let storage = r.storage();
        self.checker
            .observe_role(id, role, |i, t| storage_holds(storage, i, t))
            .map_err(err)?;

        if let Some(lo) = r.storage_mut().durable_mut().take_dirty_from() {
            let s = r.storage();
            let first = s.first_index().unwrap_or(1);
            let last = s.last_index().unwrap_or(0);
            let lo = lo.max(first);
            if lo <= last {
                let prev = s.term(lo - 1).ok();
                let entries = r.entries(lo, last + 1);
                self.checker.observe_log(id, prev, &entries).map_err(err)?;
            }
        }

        let snap = r.storage().latest_snapshot();
        let snap_index = snap.get_metadata().index;
        if snap_index != node.last_snapshot {
            node.last_snapshot = snap_index;
            let h = snapshot_state_hash(snap);
            self.checker
                .observe_snapshot(id, snap_index, h)
                .map_err(err)?;
        }

        let applied = r.applied_index();
        if node.last_applied != Some(applied) {
            node.last_applied = Some(applied);
            let h = invariants::state_hash(&r.state().encode(), r.conf_state());
            self.checker
                .observe_state(id, incarnation, applied, h)
                .map_err(err)?;
            if !self.initialised && r.state().initialized() {
                self.initialised = true;
            }
        }
        Ok(())
    }

    /// The newest committed entry must be held by enough voters (on disk for the
    /// ones that are down) that every quorum contains one.
    fn check_committed_held(&self) -> Result<(), Failure> {
        let (index, term) = self.checker.committed_tip();
        let mut holders = Vec::new();
        let mut missing = Vec::new();
        for &v in self.checker.voters() {
            let holds = match self.nodes.get(&v).map(|n| &n.slot) {
                Some(Slot::Up(r)) => storage_holds(r.storage(), index, term),
                Some(Slot::Down(d)) => {
                    let img = d.durable();
                    index <= img.snapshot_index() || img.term(index) == Some(term)
                }
                _ => false,
            };
            if holds {
                holders.push(v);
            } else {
                missing.push(v);
            }
        }
        self.checker
            .check_committed_held(&holders, &missing)
            .map_err(|v| safety(self.now, self.cfg.seed, v))
    }
}

/// Runs one seed to the end, catching panics (raft panics on some corruptions).
pub fn run_seed(cfg: SimConfig) -> RunReport {
    let seed = cfg.seed;
    let mut world = World::new(cfg);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| world.run()));
    let result = match result {
        Ok(r) => r,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(Failure {
                kind: FailureKind::Panic,
                time_ms: world.now,
                message: format!("seed {seed}, t={}ms: panic: {what}", world.now),
            })
        }
    };
    RunReport {
        seed,
        result,
        trace_hash: world.trace_hash(),
    }
}

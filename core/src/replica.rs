//! One controller's raft replica, sans-IO: a raft `RawNode`, the state machine it
//! feeds, and the Ready loop between them.
//!
//! The runtime (the controller's node task, or the simulator) does all I/O:
//! it calls [`Replica::tick`], [`Replica::step`] and the `propose_*` methods, then
//! [`Replica::handle_ready`], and sends the messages that returns. The Ready loop
//! keeps raft's rules:
//!
//! 1. a snapshot from the leader, new entries and the hard state are written and
//!    synced to the [`Durable`] backend *before* any message that depends on
//!    them leaves (so a vote or an acknowledged entry is never forgotten by a
//!    crash); a leader's appends, which raft-rs lets out at once, may leave
//!    before ([`Replica::handle_ready_sending`]: the controller does so, the
//!    simulator sends everything after);
//! 2. committed entries are applied in log order, exactly once per incarnation;
//! 3. once enough entries are applied, the state is snapshotted and the log compacted.

use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType,
    Message, MessageType, Snapshot,
};
use raft::{Config, RawNode, ReadOnlyOption, SnapshotStatus, StateRole, Storage};
use raft_proto::ConfChangeI;
use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;

use crate::command::{stamp_of, Command, ControllerAddress, ProposalId, Stamp};
use crate::state::{ApplyError, ClusterState};
use crate::storage::{Durable, DurableError, RaftStorage};

/// Raft timing and log-size settings of one replica.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    pub id: u64,
    /// Ticks without a leader before a pre-vote starts: the election timeout is
    /// drawn from `[election_tick, 2 * election_tick)` each time the election
    /// timer restarts, by an RNG seeded with `election_seed` (not raft-rs's
    /// thread RNG), so a simulator seed decides every draw.
    pub election_tick: usize,
    /// Seeds the election-timeout draws. Replicas must not share it: two
    /// followers that lost the same leader with equal timeouts split the vote,
    /// and split it again on every retry, for as long as their tick phases
    /// stay within a message delay of each other (seen: 15 s without a leader).
    pub election_seed: u64,
    pub heartbeat_tick: usize,
    /// Snapshot and compact once this many entries were applied since the last snapshot.
    pub snapshot_interval: u64,
    pub max_size_per_msg: u64,
    pub max_inflight_msgs: usize,
}

impl ReplicaConfig {
    pub fn new(id: u64) -> Self {
        ReplicaConfig {
            id,
            election_tick: 10,
            election_seed: id,
            heartbeat_tick: 2,
            snapshot_interval: 1000,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
        }
    }

    fn raft_config(&self, applied: u64) -> Config {
        Config {
            id: self.id,
            election_tick: self.election_tick,
            heartbeat_tick: self.heartbeat_tick,
            min_election_tick: self.election_tick,
            max_election_tick: 2 * self.election_tick,
            applied,
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: self.max_size_per_msg,
            max_inflight_msgs: self.max_inflight_msgs,
            read_only_option: ReadOnlyOption::Safe,
            ..Default::default()
        }
    }
}

/// Deliberate bugs, for showing that the simulator catches them: settable only
/// with core's `faults` feature, which only the simulator enables.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Send messages without syncing the writes they depend on.
    pub skip_sync: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("storage: {0}")]
    Storage(#[from] DurableError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("snapshot at index {index} has an undecodable state: {reason}")]
    BadSnapshot { index: u64, reason: String },
}

/// Why a proposal was not accepted into the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error("not the leader (leader is {leader:?})")]
    NotLeader { leader: Option<u64> },
    #[error("a configuration change is already in progress")]
    ConfChangeInProgress,
    #[error("invalid configuration change: {0}")]
    InvalidConfChange(String),
}

/// What happened to one committed entry.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Raft's own empty entry (a new leader's first entry).
    Empty,
    Applied(Result<(), ApplyError>),
    /// A configuration change took effect; the new voters and learners.
    ConfChanged(Result<ConfState, String>),
    /// Raft replaced the proposal by an empty entry (e.g. a second concurrent
    /// configuration change).
    Dropped,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AppliedEntry {
    pub index: u64,
    pub term: u64,
    pub proposal: Option<ProposalId>,
    pub outcome: Outcome,
}

/// Role, term and leader as last reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoleState {
    pub role: StateRole,
    pub term: u64,
    /// 0 when unknown.
    pub leader: u64,
}

/// Everything one Ready round produced, for the runtime to act on.
#[derive(Debug, Default)]
pub struct ReadyOutput {
    /// Safe to send now: everything they depend on is durable.
    pub messages: Vec<Message>,
    pub applied: Vec<AppliedEntry>,
    /// Contexts of ReadIndex requests whose index is now applied.
    pub reads: Vec<Vec<u8>>,
    /// Set when role, term or leader changed during this round.
    pub role_changed: Option<RoleState>,
    /// A snapshot replaced the state machine.
    pub snapshot_installed: bool,
    /// This round compacted the log into a snapshot at this index.
    pub compacted_to: Option<u64>,
}

pub struct Replica<D: Durable> {
    raw: RawNode<RaftStorage<D>>,
    state: ClusterState,
    conf_state: ConfState,
    cfg: ReplicaConfig,
    pending_reads: Vec<(u64, Vec<u8>)>,
    last_role: RoleState,
    election_rng: ChaCha8Rng,
    faults: Faults,
}

impl<D: Durable> Replica<D> {
    /// Starts from whatever `storage` holds: the newest snapshot plus the log after it.
    /// Committed entries after the snapshot are re-applied by the Ready loop.
    pub fn new(
        cfg: ReplicaConfig,
        storage: RaftStorage<D>,
        logger: &slog::Logger,
    ) -> Result<Self, ReplicaError> {
        let snap = storage.latest_snapshot().clone();
        let meta = snap.get_metadata();
        let state = decode_state(&snap)?;
        let conf_state = meta.get_conf_state().clone();
        let raw = RawNode::new(&cfg.raft_config(meta.index), storage, logger)?;
        let last_role = role_of(&raw);
        let election_rng = ChaCha8Rng::seed_from_u64(cfg.election_seed);
        let mut replica = Replica {
            raw,
            state,
            conf_state,
            cfg,
            pending_reads: Vec::new(),
            last_role,
            election_rng,
            faults: Faults::default(),
        };
        replica.draw_election_timeout();
        Ok(replica)
    }

    /// Draws a new election timeout whenever the election timer restarted (a
    /// leader was heard, or raft reset itself on a role or term change, where
    /// it drew from its own thread RNG). Drawing only at elapsed 0 keeps the
    /// timeout uniform: redrawing a running timer would favour short ones.
    fn draw_election_timeout(&mut self) {
        let raft = &mut self.raw.raft;
        if raft.state == StateRole::Leader || raft.election_elapsed != 0 {
            return;
        }
        let e = self.cfg.election_tick;
        raft.set_randomized_election_timeout(self.election_rng.gen_range(e..2 * e));
    }

    #[cfg(feature = "faults")]
    pub fn set_faults(&mut self, faults: Faults) {
        self.faults = faults;
    }

    pub fn id(&self) -> u64 {
        self.cfg.id
    }

    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    pub fn role(&self) -> RoleState {
        role_of(&self.raw)
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    pub fn commit_index(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }

    pub fn applied_index(&self) -> u64 {
        self.state.applied
    }

    pub fn last_index(&self) -> u64 {
        self.raw.raft.raft_log.last_index()
    }

    /// Voters and learners as of the last applied configuration change.
    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    pub fn storage(&self) -> &RaftStorage<D> {
        self.raw.store()
    }

    pub fn storage_mut(&mut self) -> &mut RaftStorage<D> {
        self.raw.mut_store()
    }

    /// Log entries in `[low, high)` that are still in the log (for invariant checks).
    pub fn entries(&self, low: u64, high: u64) -> Vec<Entry> {
        let s = self.raw.store();
        s.entries(low, high, None, raft::GetEntriesContext::empty(false))
            .unwrap_or_default()
    }

    pub fn tick(&mut self) {
        self.raw.tick();
        self.draw_election_timeout();
    }

    pub fn campaign(&mut self) -> Result<(), ReplicaError> {
        self.raw.campaign()?;
        self.draw_election_timeout();
        Ok(())
    }

    /// Feed a message from a peer. Messages from unknown peers or of local types are
    /// dropped: a misbehaving peer must not stop this replica.
    pub fn step(&mut self, m: Message) -> Result<(), raft::Error> {
        if raft::raw_node::is_local_msg(m.get_msg_type()) {
            return Err(raft::Error::StepLocalMsg);
        }
        let stepped = self.raw.step(m);
        self.draw_election_timeout();
        stepped
    }

    pub fn report_unreachable(&mut self, peer: u64) {
        self.raw.report_unreachable(peer);
    }

    pub fn report_snapshot(&mut self, peer: u64, delivered: bool) {
        let status = if delivered {
            SnapshotStatus::Finish
        } else {
            SnapshotStatus::Failure
        };
        self.raw.report_snapshot(peer, status);
    }

    fn not_leader(&self) -> ProposeError {
        let leader = self.raw.raft.leader_id;
        ProposeError::NotLeader {
            leader: (leader != 0).then_some(leader),
        }
    }

    /// Propose `cmd`; `stamp` (who, when) goes into the history with it.
    pub fn propose(
        &mut self,
        id: ProposalId,
        stamp: &Stamp,
        cmd: &Command,
    ) -> Result<(), ProposeError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        self.raw
            .propose(id.context(stamp), cmd.encode())
            .map_err(|_| self.not_leader())
    }

    /// Add a controller as a voter (its address is recorded in the state) or remove one.
    pub fn propose_controller_change(
        &mut self,
        id: ProposalId,
        change: ControllerChange,
    ) -> Result<(), ProposeError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        if self.raw.raft.has_pending_conf() || !self.conf_state.voters_outgoing.is_empty() {
            return Err(ProposeError::ConfChangeInProgress);
        }
        let mut cc = ConfChangeV2::default();
        let mut single = ConfChangeSingle::default();
        match &change {
            ControllerChange::Add { id, address } => {
                single.set_change_type(ConfChangeType::AddNode);
                single.node_id = *id;
                let ctx = ControllerAddress {
                    id: *id,
                    address: address.clone(),
                };
                cc.set_context(serde_json::to_vec(&ctx).unwrap_or_default().into());
            }
            ControllerChange::Remove { id } if *id == self.cfg.id => {
                // raft-rs keeps a leader that removed itself leading; hand the
                // leadership over first and let the caller retry at the new leader.
                if let Some(&next) = self.conf_state.voters.iter().find(|&&v| v != *id) {
                    self.raw.transfer_leader(next);
                }
                return Err(ProposeError::NotLeader { leader: None });
            }
            ControllerChange::Remove { id } => {
                single.set_change_type(ConfChangeType::RemoveNode);
                single.node_id = *id;
                if !self.conf_state.voters.contains(id) && !self.conf_state.learners.contains(id) {
                    return Err(ProposeError::InvalidConfChange(format!(
                        "controller {id} is not a member"
                    )));
                }
                if self.conf_state.voters == [*id] {
                    return Err(ProposeError::InvalidConfChange(
                        "cannot remove the last voter".into(),
                    ));
                }
            }
        }
        cc.mut_changes().push(single);
        self.raw
            .propose_conf_change(id.to_bytes(), cc)
            .map_err(|e| match e {
                raft::Error::ProposalDropped => self.not_leader(),
                other => ProposeError::InvalidConfChange(other.to_string()),
            })
    }

    /// Start a linearizable read; `ctx` comes back in [`ReadyOutput::reads`] once the
    /// state reflects every write committed before the request.
    pub fn read_index(&mut self, ctx: Vec<u8>) {
        self.raw.read_index(ctx);
    }

    /// Runs one Ready round. See the module docs for the order of operations.
    pub fn handle_ready(&mut self) -> Result<ReadyOutput, ReplicaError> {
        self.handle_ready_sending(None)
    }

    /// [`Replica::handle_ready`], handing the messages raft allows out before
    /// this round's writes are durable (a leader's appends: raft-rs's
    /// `Ready::messages`, Raft thesis 10.2.1) to `early` before the fsync, so
    /// that the followers' fsyncs overlap the leader's instead of following
    /// it. Messages that depend on the writes (votes, append responses) still
    /// come out in [`ReadyOutput::messages`], after them.
    pub fn handle_ready_sending(
        &mut self,
        early: Option<&mut dyn FnMut(Vec<Message>)>,
    ) -> Result<ReadyOutput, ReplicaError> {
        let mut out = ReadyOutput::default();
        if self.raw.has_ready() {
            self.ready_round(&mut out, early)?;
        }
        let now = role_of(&self.raw);
        if now != self.last_role {
            self.last_role = now;
            out.role_changed = Some(now);
            if now.role != StateRole::Leader && now.role != StateRole::Follower {
                // Reads waiting on an old leader's ReadIndex are answered by nobody.
                self.pending_reads.clear();
            }
        }
        Ok(out)
    }

    fn ready_round(
        &mut self,
        out: &mut ReadyOutput,
        early: Option<&mut dyn FnMut(Vec<Message>)>,
    ) -> Result<(), ReplicaError> {
        let mut rd = self.raw.ready();
        let mut messages = rd.take_messages();
        if let Some(send) = early {
            if !messages.is_empty() {
                send(std::mem::take(&mut messages));
            }
        }

        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            self.state = decode_state(&snap)?;
            self.conf_state = snap.get_metadata().get_conf_state().clone();
            self.raw.mut_store().install_snapshot(&snap)?;
            out.snapshot_installed = true;
        }
        if let Some(hs) = rd.hs() {
            // A new term goes to disk before the entries that arrive under it:
            // those may truncate entries this replica acknowledged in the old
            // term, and a crash that kept the truncation but not the term would
            // leave it in the old term without what it acknowledged there (sim
            // seed 30004921, `--agents 32 --nodes 5`). Its commit index is
            // capped by what the log holds until the entries are written.
            let store = self.raw.store();
            if !rd.entries().is_empty() && hs.term > store.hard_state().term {
                let mut early = hs.clone();
                early.commit = early.commit.min(store.last_index().unwrap_or(0));
                self.raw.mut_store().set_hard_state(&early)?;
            }
        }
        self.raw.mut_store().append(rd.entries())?;
        if let Some(hs) = rd.hs() {
            let stored = self.raw.store().hard_state();
            if rd.entries().is_empty() && hs.term == stored.term && hs.vote == stored.vote {
                // Only the commit index moved (the leader hearing its
                // followers' acks): like a LightReady's, it is re-learned if
                // lost, so it waits for the next write instead of costing an
                // fsync between the commit and the apply of every entry.
                self.raw.mut_store().set_commit(hs.commit);
            } else {
                self.raw.mut_store().set_hard_state(hs)?;
            }
        }
        if !(cfg!(feature = "faults") && self.faults.skip_sync) {
            self.raw.mut_store().sync()?;
        }
        messages.extend(rd.take_persisted_messages());
        self.pending_reads.extend(
            rd.take_read_states()
                .into_iter()
                .map(|rs| (rs.index, rs.request_ctx)),
        );
        let committed = rd.take_committed_entries();
        self.apply(committed, out)?;

        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit);
        }
        messages.extend(light.take_messages());
        let committed = light.take_committed_entries();
        self.apply(committed, out)?;
        self.raw.advance_apply();

        self.maybe_compact(out)?;
        let applied = self.state.applied;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending_reads)
            .into_iter()
            .partition(|(index, _)| *index <= applied);
        self.pending_reads = waiting;
        out.reads.extend(ready.into_iter().map(|(_, ctx)| ctx));
        out.messages = messages;
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>, out: &mut ReadyOutput) -> Result<(), ReplicaError> {
        for e in entries {
            if e.index <= self.state.applied {
                continue;
            }
            let proposal = ProposalId::from_bytes(&e.context);
            let outcome = match e.get_entry_type() {
                EntryType::EntryNormal if e.data.is_empty() => match proposal {
                    Some(_) => Outcome::Dropped,
                    None => Outcome::Empty,
                },
                EntryType::EntryNormal => Outcome::Applied(
                    Command::decode(&e.data)
                        .map_err(|err| ApplyError::Undecodable(err.to_string()))
                        .and_then(|cmd| {
                            self.state
                                .apply_stamped(e.index, &stamp_of(&e.context), cmd)
                        }),
                ),
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&e.data).map(ConfChangeI::into_v2);
                    Outcome::ConfChanged(self.apply_conf_change(cc))
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::parse_from_bytes(&e.data);
                    Outcome::ConfChanged(self.apply_conf_change(cc))
                }
            };
            self.state.applied = e.index;
            out.applied.push(AppliedEntry {
                index: e.index,
                term: e.term,
                proposal,
                outcome,
            });
        }
        Ok(())
    }

    fn apply_conf_change(
        &mut self,
        cc: Result<ConfChangeV2, protobuf::ProtobufError>,
    ) -> Result<ConfState, String> {
        let cc = cc.map_err(|e| format!("undecodable configuration change: {e}"))?;
        let cs = self.raw.apply_conf_change(&cc).map_err(|e| e.to_string())?;
        let addr: Option<ControllerAddress> = serde_json::from_slice(cc.get_context()).ok();
        for ch in cc.get_changes() {
            match ch.get_change_type() {
                ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                    if let Some(a) = addr.as_ref().filter(|a| a.id == ch.node_id) {
                        self.state.controllers.insert(a.id, a.address.clone());
                    }
                }
                ConfChangeType::RemoveNode => {
                    self.state.controllers.remove(&ch.node_id);
                }
            }
        }
        self.conf_state = cs.clone();
        // raft-rs keeps a leader that applied its own removal leading, and its
        // next commit check panics (its own progress is gone). Proposing one's
        // own removal is refused above; this removal was proposed under an
        // earlier leader and committed under this one: step down, and the
        // remaining voters elect a leader among them.
        if self.is_leader() && !cs.voters.contains(&self.cfg.id) {
            let term = self.raw.raft.term;
            self.raw.raft.become_follower(term, raft::INVALID_ID);
        }
        Ok(cs)
    }

    fn maybe_compact(&mut self, out: &mut ReadyOutput) -> Result<(), ReplicaError> {
        let applied = self.state.applied;
        let snap_meta = self.raw.store().latest_snapshot().get_metadata();
        let snap_index = snap_meta.index;
        // Raft refuses a snapshot whose configuration does not include the receiver,
        // so a controller added after the newest snapshot could not catch up until
        // the next one: snapshot as soon as the configuration changed.
        let conf_changed = !same_members(snap_meta.get_conf_state(), &self.conf_state);
        if applied <= snap_index
            || (applied < snap_index + self.cfg.snapshot_interval && !conf_changed)
        {
            return Ok(());
        }
        let term = self.raw.store().term(applied)?;
        let mut snap = Snapshot {
            data: self.state.encode().into(),
            ..Default::default()
        };
        let meta = snap.mut_metadata();
        meta.index = applied;
        meta.term = term;
        *meta.mut_conf_state() = self.conf_state.clone();
        let store = self.raw.mut_store();
        store.compact(&snap)?;
        store.sync()?;
        out.compacted_to = Some(applied);
        Ok(())
    }
}

/// A change of the controller set, proposed as a raft `ConfChangeV2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControllerChange {
    Add { id: u64, address: String },
    Remove { id: u64 },
}

fn role_of<D: Durable>(raw: &RawNode<RaftStorage<D>>) -> RoleState {
    RoleState {
        role: raw.raft.state,
        term: raw.raft.term,
        leader: raw.raft.leader_id,
    }
}

/// Same voters and learners, whatever their order (raft keeps them in hash sets).
fn same_members(a: &ConfState, b: &ConfState) -> bool {
    let sorted = |v: &[u64]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v
    };
    sorted(&a.voters) == sorted(&b.voters)
        && sorted(&a.learners) == sorted(&b.learners)
        && sorted(&a.voters_outgoing) == sorted(&b.voters_outgoing)
        && sorted(&a.learners_next) == sorted(&b.learners_next)
}

fn decode_state(snap: &Snapshot) -> Result<ClusterState, ReplicaError> {
    let index = snap.get_metadata().index;
    if snap.data.is_empty() {
        return Ok(ClusterState {
            applied: index,
            ..Default::default()
        });
    }
    let mut state = ClusterState::decode(&snap.data).map_err(|e| ReplicaError::BadSnapshot {
        index,
        reason: e.to_string(),
    })?;
    state.applied = index;
    Ok(state)
}

/// True for messages that carry a snapshot, which the runtime must report on.
pub fn is_snapshot(m: &Message) -> bool {
    m.get_msg_type() == MessageType::MsgSnapshot
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{bootstrap_snapshot, NullDurable, Recovered};

    fn replica(id: u64, election_seed: u64) -> Replica<NullDurable> {
        let founders: Vec<(u64, String)> = (1..=3).map(|i| (i, format!("c{i}:7001"))).collect();
        let snapshot = bootstrap_snapshot(&[1, 2, 3], ClusterState::bootstrap(&founders).encode());
        let recovered = Recovered {
            snapshot,
            ..Default::default()
        };
        let mut cfg = ReplicaConfig::new(id);
        cfg.election_seed = election_seed;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        Replica::new(cfg, RaftStorage::new(NullDurable, recovered), &logger).expect("replica")
    }

    /// Ticks the running replicas in lockstep (equal tick phases, the worst
    /// case) and delivers every message at once; returns the tick at which one
    /// of them leads, if any does within `ticks`.
    fn ticks_to_leader(rs: &mut [Replica<NullDurable>], ticks: usize) -> Option<usize> {
        for t in 0..ticks {
            rs.iter_mut().for_each(|r| r.tick());
            settle(rs);
            if rs.iter().any(|r| r.is_leader()) {
                return Some(t);
            }
        }
        None
    }

    #[test]
    fn followers_of_a_dead_leader_elect_one_of_them_despite_equal_tick_phases() {
        for seed in 0..20u64 {
            let mut rs: Vec<_> = (1..=3).map(|i| replica(i, seed * 3 + i)).collect();
            ticks_to_leader(&mut rs, 100).expect("a first leader");
            let leader = rs.iter().position(|r| r.is_leader()).expect("leader");
            rs.remove(leader);
            // Each round's timeouts are drawn from [10, 20) ticks: a round
            // splits only if both draw the same, so 10 rounds all split with
            // probability 1e-10.
            let t = ticks_to_leader(&mut rs, 200);
            assert!(t.is_some(), "seed {seed}: no new leader in 200 ticks");
        }
    }

    #[test]
    fn equal_election_seeds_split_the_vote_for_good() {
        // Why `election_seed` must differ (and what a fixed timeout did): the
        // same draws make replicas with equal tick phases campaign on the same
        // tick every round, each voting for itself.
        let mut rs: Vec<_> = (1..=3).map(|i| replica(i, 7)).collect();
        assert_eq!(ticks_to_leader(&mut rs, 200), None);
    }

    /// Delivers every message among `rs` until none is left.
    fn settle(rs: &mut [Replica<NullDurable>]) {
        loop {
            let mut sent = Vec::new();
            for r in rs.iter_mut() {
                sent.extend(r.handle_ready().expect("ready").messages);
            }
            if sent.is_empty() {
                return;
            }
            for m in sent {
                if let Some(to) = rs.iter_mut().find(|r| r.id() == m.to) {
                    let _ = to.step(m);
                }
            }
        }
    }

    #[test]
    fn a_leader_that_applies_its_own_removal_steps_down() {
        let mut rs: Vec<_> = (1..=3).map(|i| replica(i, i)).collect();
        ticks_to_leader(&mut rs, 100).expect("a first leader");
        let l = rs.iter().position(|r| r.is_leader()).expect("leader");
        let old = rs.remove(l);
        let (b, c) = (rs[0].id(), rs[1].id());
        let mut old = old;
        // The leader proposes removing b; b and c log it, their answers are lost
        // and the leader dies: the entry is not committed yet.
        let id = ProposalId {
            node: old.id(),
            seq: 1,
        };
        old.propose_controller_change(id, ControllerChange::Remove { id: b })
            .expect("proposed");
        for m in old.handle_ready().expect("ready").messages {
            if let Some(to) = rs.iter_mut().find(|r| r.id() == m.to) {
                let _ = to.step(m);
            }
        }
        for r in rs.iter_mut() {
            r.handle_ready().expect("ready");
        }
        // The dying leader handed over to b (as a leader transfer does), so b
        // is elected and commits its own removal with its first entry.
        let mut handover = Message::default();
        handover.set_msg_type(MessageType::MsgTimeoutNow);
        handover.from = old.id();
        handover.to = b;
        handover.term = old.role().term;
        rs[0].step(handover).expect("handover");
        settle(&mut rs);
        assert!(
            !rs[0].conf_state().voters.contains(&b),
            "b applied its removal"
        );
        assert!(!rs[0].is_leader(), "b stepped down");
        // raft-rs panicked here on the next append response before.
        for _ in 0..30 {
            rs.iter_mut().for_each(|r| r.tick());
            settle(&mut rs);
        }
        assert!(rs.iter().all(|r| !r.is_leader() || r.id() == c));
    }
}

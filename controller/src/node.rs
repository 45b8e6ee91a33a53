//! The node task: the one owner of the raft [`Replica`]. Everything else talks to it
//! through a [`NodeHandle`] (a mailbox plus a `watch` of the latest [`NodeView`]).
//!
//! Each loop turn: take one input (a tick, a peer message, a proposal, a read),
//! run the Ready round (which persists and syncs before returning messages), hand
//! the messages to the transport, then resolve waiting proposals and reads.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raft::eraftpb::Message;
use raft::StateRole;
use tokio::sync::{mpsc, oneshot, watch};
use vipshare_core::command::{Command, ProposalId};
use vipshare_core::replica::{
    ControllerChange, Outcome, ProposeError, ReadyOutput, Replica, ReplicaError, RoleState,
};
use vipshare_core::state::ClusterState;
use vipshare_core::storage::Durable;

use crate::transport::Transport;

/// How long a caller waits for a proposal to apply or a read to be served.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A consistent picture of this controller, published after every change.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub id: u64,
    pub role: RoleState,
    pub commit: u64,
    pub applied: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub state: Arc<ClusterState>,
}

impl NodeView {
    pub fn leader_address(&self) -> Option<&str> {
        self.state
            .controllers
            .get(&self.role.leader)
            .map(String::as_str)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("not the leader; leader is {}", leader.map_or("unknown".to_string(), |l| l.to_string()))]
    NotLeader { leader: Option<u64> },
    #[error("refused: {0}")]
    Rejected(String),
    #[error("leadership was lost before the request applied; its outcome is unknown, retry")]
    LeadershipLost,
    #[error("timed out after {}s", REQUEST_TIMEOUT.as_secs())]
    Timeout,
    #[error("controller is shutting down")]
    Stopped,
}

impl From<ProposeError> for NodeError {
    fn from(e: ProposeError) -> Self {
        match e {
            ProposeError::NotLeader { leader } => NodeError::NotLeader { leader },
            other => NodeError::Rejected(other.to_string()),
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, NodeError>>;

pub enum NodeMsg {
    Raft(Box<Message>),
    Propose {
        cmd: Command,
        /// Who asked, for the history.
        by: String,
        reply: Reply<u64>,
    },
    ChangeControllers {
        change: ControllerChange,
        reply: Reply<u64>,
    },
    Read {
        reply: Reply<Arc<NodeView>>,
    },
    Unreachable(u64),
    SnapshotStatus {
        peer: u64,
        delivered: bool,
    },
}

#[derive(Clone)]
pub struct NodeHandle {
    tx: mpsc::Sender<NodeMsg>,
    view: watch::Receiver<Arc<NodeView>>,
}

impl NodeHandle {
    pub fn view(&self) -> Arc<NodeView> {
        self.view.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<NodeView>> {
        self.view.clone()
    }

    /// Queue a peer's raft message; false when the mailbox is full (raft retransmits).
    pub fn deliver(&self, m: Message) -> bool {
        self.tx.try_send(NodeMsg::Raft(Box::new(m))).is_ok()
    }

    pub(crate) fn mailbox(&self) -> mpsc::Sender<NodeMsg> {
        self.tx.clone()
    }

    async fn request<T>(&self, make: impl FnOnce(Reply<T>) -> NodeMsg) -> Result<T, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| NodeError::Stopped)?;
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Err(_) => Err(NodeError::Timeout),
            Ok(Err(_)) => Err(NodeError::Stopped),
            Ok(Ok(r)) => r,
        }
    }

    /// Propose a command of the leader's own; returns the index it applied at.
    pub async fn propose(&self, cmd: Command) -> Result<u64, NodeError> {
        self.propose_by(cmd, "leader").await
    }

    /// Propose a command asked for by `by` (an admin's or an agent's identity).
    pub async fn propose_by(&self, cmd: Command, by: &str) -> Result<u64, NodeError> {
        let by = by.to_string();
        self.request(|reply| NodeMsg::Propose { cmd, by, reply })
            .await
    }

    pub async fn change_controllers(&self, change: ControllerChange) -> Result<u64, NodeError> {
        self.request(|reply| NodeMsg::ChangeControllers { change, reply })
            .await
    }

    /// A linearizable read (ReadIndex): the view reflects every write committed
    /// before the call.
    pub async fn read(&self) -> Result<Arc<NodeView>, NodeError> {
        self.request(|reply| NodeMsg::Read { reply }).await
    }
}

/// Runs the node until `shutdown` fires. A storage error is fatal: continuing could
/// acknowledge what is not durable.
pub struct Node<D: Durable> {
    replica: Replica<D>,
    rx: mpsc::Receiver<NodeMsg>,
    view: watch::Sender<Arc<NodeView>>,
    transport: Transport,
    seq: u64,
    proposals: HashMap<ProposalId, (Reply<u64>, Instant)>,
    /// ReadIndex requests waiting, with the tick count when (re)issued: raft-rs
    /// drops a ReadIndex on a leader that has not committed in its term yet, so
    /// unanswered reads are issued again.
    reads: HashMap<Vec<u8>, (Reply<Arc<NodeView>>, u64)>,
    ticks: u64,
    tick: Duration,
    /// Peer addresses from the config, used until the replicated state names any
    /// (a joining controller knows nobody until its first snapshot).
    seed_peers: BTreeMap<u64, String>,
}

impl<D: Durable> Node<D> {
    pub fn new(
        replica: Replica<D>,
        transport_for: impl FnOnce(&NodeHandle) -> Transport,
        tick: Duration,
        seed_peers: BTreeMap<u64, String>,
    ) -> (Self, NodeHandle) {
        let (tx, rx) = mpsc::channel(4096);
        let (view_tx, view_rx) = watch::channel(Arc::new(make_view(&replica)));
        let handle = NodeHandle { tx, view: view_rx };
        let transport = transport_for(&handle);
        let node = Node {
            replica,
            rx,
            view: view_tx,
            transport,
            seq: 0,
            proposals: HashMap::new(),
            reads: HashMap::new(),
            ticks: 0,
            tick,
            seed_peers,
        };
        (node, handle)
    }

    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), ReplicaError> {
        let known = &self.replica.state().controllers;
        let peers = if known.is_empty() {
            &self.seed_peers
        } else {
            known
        };
        self.transport.update_peers(peers);
        let mut ticker = tokio::time::interval(self.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    self.replica.tick();
                    self.ticks += 1;
                    self.reissue_reads();
                }
                msg = self.rx.recv() => match msg {
                    Some(m) => {
                        self.handle(m);
                        // Drain what else is waiting so one Ready round (one fsync) covers it.
                        for _ in 0..256 {
                            match self.rx.try_recv() {
                                Ok(m) => self.handle(m),
                                Err(_) => break,
                            }
                        }
                    }
                    None => return Ok(()),
                },
                _ = shutdown.changed() => {
                    self.fail_all(NodeError::Stopped);
                    return Ok(());
                }
            }
            // A leader's appends leave before its own fsync (Raft thesis 10.2.1).
            let transport = &mut self.transport;
            let mut send = |m: Vec<Message>| transport.send(m);
            let out = self.replica.handle_ready_sending(Some(&mut send))?;
            self.after_ready(out);
        }
    }

    fn next_id(&mut self) -> ProposalId {
        self.seq += 1;
        ProposalId {
            node: self.replica.id(),
            seq: self.seq,
        }
    }

    fn handle(&mut self, msg: NodeMsg) {
        match msg {
            NodeMsg::Raft(m) => {
                let from = m.from;
                if let Err(e) = self.replica.step(*m) {
                    tracing::debug!(from, error = %e, "raft message not stepped");
                }
            }
            NodeMsg::Propose { cmd, by, reply } => {
                let id = self.next_id();
                let at_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or_default();
                let stamp = vipshare_core::command::Stamp { at_ms, by };
                match self.replica.propose(id, &stamp, &cmd) {
                    Ok(()) => {
                        self.proposals.insert(id, (reply, Instant::now()));
                    }
                    Err(e) => fail(reply, e.into()),
                }
            }
            NodeMsg::ChangeControllers { change, reply } => {
                let id = self.next_id();
                match self.replica.propose_controller_change(id, change) {
                    Ok(()) => {
                        self.proposals.insert(id, (reply, Instant::now()));
                    }
                    Err(e) => fail(reply, e.into()),
                }
            }
            NodeMsg::Read { reply } => {
                let role = self.replica.role();
                if role.leader == 0 {
                    fail(reply, NodeError::NotLeader { leader: None });
                    return;
                }
                self.seq += 1;
                let ctx = self.seq.to_be_bytes().to_vec();
                self.replica.read_index(ctx.clone());
                self.reads.insert(ctx, (reply, self.ticks));
            }
            NodeMsg::Unreachable(peer) => self.replica.report_unreachable(peer),
            NodeMsg::SnapshotStatus { peer, delivered } => {
                self.replica.report_snapshot(peer, delivered)
            }
        }
    }

    fn after_ready(&mut self, out: ReadyOutput) {
        if !out.messages.is_empty() {
            self.transport.send(out.messages);
        }
        let controllers_before = self.view.borrow().state.controllers.clone();
        let changed =
            !out.applied.is_empty() || out.role_changed.is_some() || out.snapshot_installed;
        if changed {
            let view = Arc::new(make_view(&self.replica));
            crate::metrics::record_view(&view);
            if view.state.controllers != controllers_before && !view.state.controllers.is_empty() {
                self.transport.update_peers(&view.state.controllers);
            }
            self.view.send_replace(view);
        }
        for a in out.applied {
            let Some(id) = a.proposal.filter(|p| p.node == self.replica.id()) else {
                continue;
            };
            let Some((reply, started)) = self.proposals.remove(&id) else {
                continue;
            };
            let result = match a.outcome {
                Outcome::Applied(Ok(())) | Outcome::ConfChanged(Ok(_)) | Outcome::Empty => {
                    Ok(a.index)
                }
                Outcome::Applied(Err(e)) => Err(NodeError::Rejected(e.to_string())),
                Outcome::ConfChanged(Err(e)) => Err(NodeError::Rejected(e)),
                Outcome::Dropped => Err(NodeError::Rejected(
                    "dropped by raft (another configuration change is in progress)".into(),
                )),
            };
            crate::metrics::record_proposal(result.is_ok(), started.elapsed());
            let _ = reply.send(result);
        }
        if !out.reads.is_empty() {
            let view = self.view.borrow().clone();
            for ctx in out.reads {
                if let Some((reply, _)) = self.reads.remove(&ctx) {
                    let _ = reply.send(Ok(view.clone()));
                }
            }
        }
        if let Some(role) = out.role_changed {
            tracing::info!(id = self.replica.id(), role = ?role.role, term = role.term, leader = role.leader, "raft role changed");
            if role.role != StateRole::Leader {
                // Proposals of an old term may still commit, or may not: say so.
                let lost: Vec<_> = self.proposals.drain().collect();
                for (_, (reply, _)) in lost {
                    crate::metrics::record_proposal(false, Duration::ZERO);
                    let _ = reply.send(Err(NodeError::LeadershipLost));
                }
                if role.leader == 0 {
                    for (_, (reply, _)) in self.reads.drain() {
                        let _ = reply.send(Err(NodeError::LeadershipLost));
                    }
                }
            }
        }
    }

    fn fail_all(&mut self, e: NodeError) {
        for (_, (reply, _)) in self.proposals.drain() {
            let _ = reply.send(Err(e.clone()));
        }
        for (_, (reply, _)) in self.reads.drain() {
            let _ = reply.send(Err(e.clone()));
        }
    }

    fn reissue_reads(&mut self) {
        let now = self.ticks;
        let mut again = Vec::new();
        for (ctx, (_, at)) in self.reads.iter_mut() {
            if now >= *at + 2 {
                *at = now;
                again.push(ctx.clone());
            }
        }
        for ctx in again {
            self.replica.read_index(ctx);
        }
    }
}

fn fail<T>(reply: Reply<T>, e: NodeError) {
    let _ = reply.send(Err(e));
}

fn make_view<D: Durable>(r: &Replica<D>) -> NodeView {
    let cs = r.conf_state();
    NodeView {
        id: r.id(),
        role: r.role(),
        commit: r.commit_index(),
        applied: r.applied_index(),
        voters: cs.voters.clone(),
        learners: cs.learners.clone(),
        state: Arc::new(r.state().clone()),
    }
}

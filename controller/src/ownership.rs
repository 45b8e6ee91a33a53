//! Runs the ownership loop (`vipshare_core::ownership::tick`, the same as the
//! simulator's) every half heartbeat interval, and sooner when something is
//! due: a promise running out (`Planner::next_wake`), a release confirmed, a
//! fence round ending, an entry applied. While this controller is the leader
//! that plans, runs fence rounds ([`vipshare_core::fence::FenceRound`])
//! against every voter, and proposes the resulting commands; an agreed fence
//! is proposed together with the plan for the state after it
//! (`ownership::after_fence`), in one log batch. Nothing here decides; it only carries out what the planner and the
//! fence round chose.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use raft::StateRole;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;
use vipshare_core::command::Command;
use vipshare_core::fence::{FenceCommand, FenceRound};
use vipshare_core::ownership::{self, Action, Planner, PlannerConfig, Tick};
use vipshare_proto::v1::raft_transport_client::RaftTransportClient;
use vipshare_proto::v1::FenceRequest;
use vipshare_proto::PROTOCOL_VERSION;

use crate::leases::Leases;
use crate::node::NodeHandle;

/// A member's confirmation that it withdrew a bucket, from the agent API.
#[derive(Debug, Clone)]
pub struct Released {
    pub member: String,
    pub bucket: u32,
    pub epoch: u64,
}

pub struct Ownership {
    pub me: u64,
    pub cluster: String,
    pub node: NodeHandle,
    pub leases: Arc<Leases>,
    pub tls: vipshare_proto::tls::ClientTls,
    pub released: mpsc::Receiver<Released>,
}

/// Per peer: its address, the TLS generation the channel was made with, the client.
type Peers = BTreeMap<u64, (String, u64, RaftTransportClient<Channel>)>;

/// How a fence round ended, sent back to the loop (which owns the planner).
enum Fenced {
    /// A majority marked: propose this `FenceMember`.
    Agreed(Command),
    /// Not agreed; enough voters could agree in `retry_in_ms`.
    Retry {
        member: String,
        epoch: u64,
        retry_in_ms: u64,
    },
}

impl Ownership {
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut planner: Option<Planner> = None;
        let mut peers: Peers = BTreeMap::new();
        let (fenced_tx, mut fenced_rx) = mpsc::unbounded_channel::<Fenced>();
        // When the planner next has something due (this controller's clock).
        let mut wake: Option<u64> = None;
        let mut views = self.node.subscribe();
        loop {
            let timing = self
                .node
                .view()
                .state
                .settings
                .as_ref()
                .map(|s| s.lease)
                .unwrap_or_default();
            let mut pause = Duration::from_millis((timing.heartbeat_ms / 2).max(10));
            if let Some(at) = wake {
                // A promise ends before the next tick: plan right then.
                let now = self.leases.now_ms();
                pause = pause.min(Duration::from_millis(at.saturating_sub(now)));
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                // Something applied (a drain, a hand-over, a new term): plan
                // now, not at the next tick, so a planned move's next step
                // waits for one commit only.
                Ok(()) = views.changed() => {}
                Some(f) = fenced_rx.recv() => {
                    let view = self.node.view();
                    let leader = view.role.role == StateRole::Leader;
                    let (Some(p), true) = (planner.as_mut(), leader) else { continue };
                    match f {
                        Fenced::Agreed(cmd) => {
                            let now = self.leases.now_ms();
                            let then = self.leases.with_mut(|pr| {
                                ownership::after_fence(pr, p, now, &view.state, &cmd)
                            });
                            let mut batch = vec![cmd];
                            for action in then {
                                match action {
                                    Action::Propose(c) => batch.push(c),
                                    Action::Fence { member, epoch, at_ms } => {
                                        self.refresh_peers(&mut peers, &view.state.controllers);
                                        let voters = view.voters.clone();
                                        self.fence_round(&peers, voters, member, epoch, at_ms, &fenced_tx);
                                    }
                                }
                            }
                            self.propose_all(batch);
                        }
                        Fenced::Retry { member, epoch, retry_in_ms } => {
                            p.fence_not_agreed(&member, epoch, self.leases.now_ms(), retry_in_ms);
                        }
                    }
                    wake = self.leases.with_mut(|pr| p.next_wake(self.leases.now_ms(), &view.state, pr));
                    continue;
                }
                Some(r) = self.released.recv() => {
                    // And every confirmation queued behind it: one plan, one
                    // Transfer for all of them.
                    let mut next = Some(r);
                    while let Some(r) = next {
                        if let Some(p) = planner.as_mut() {
                            tracing::debug!(
                                member = %r.member,
                                bucket = r.bucket,
                                epoch = r.epoch,
                                "release confirmed"
                            );
                            p.released(&r.member, r.bucket, r.epoch);
                        }
                        next = self.released.try_recv().ok();
                    }
                }
                _ = shutdown.changed() => return,
            }
            let view = self.node.view();
            let leader = view.role.role == StateRole::Leader;
            let tick = Tick {
                now: self.leases.now_ms(),
                state: &view.state,
                applied: view.applied,
                commit: view.commit,
                leader,
            };
            let new_planner = || Planner::new(PlannerConfig::default());
            let (actions, next) = self.leases.with_mut(|p| {
                let actions = ownership::tick(p, &mut planner, new_planner, tick);
                let next = planner
                    .as_ref()
                    .and_then(|pl| pl.next_wake(tick.now, &view.state, p));
                (actions, next)
            });
            wake = next;
            if !leader {
                continue;
            }
            self.refresh_peers(&mut peers, &view.state.controllers);
            let mut batch = Vec::new();
            for action in actions {
                match action {
                    Action::Propose(cmd) => batch.push(cmd),
                    Action::Fence {
                        member,
                        epoch,
                        at_ms,
                    } => {
                        let voters = view.voters.clone();
                        self.fence_round(&peers, voters, member, epoch, at_ms, &fenced_tx);
                    }
                }
            }
            self.propose_all(batch);
        }
    }

    fn refresh_peers(&self, peers: &mut Peers, controllers: &BTreeMap<u64, String>) {
        // A TLS reload retires the channels made with the old certificate.
        let generation = self.tls.generation();
        peers.retain(|id, (addr, g, _)| controllers.get(id) == Some(addr) && *g == generation);
        for (&id, addr) in controllers {
            if id == self.me || peers.contains_key(&id) {
                continue;
            }
            match vipshare_proto::tls::channel(&format!("https://{addr}"), &self.tls) {
                Ok(ch) => {
                    peers.insert(id, (addr.clone(), generation, RaftTransportClient::new(ch)));
                }
                Err(e) => tracing::warn!(peer = id, %addr, error = %e, "no channel for fencing"),
            }
        }
    }

    /// Proposes `cmds` in this order, queued together so that one raft
    /// round (one fsync) carries them: a fence and the grants planned for the
    /// state after it are applied in that order.
    fn propose_all(&self, cmds: Vec<Command>) {
        if cmds.is_empty() {
            return;
        }
        let node = self.node.clone();
        let leases = self.leases.clone();
        tokio::spawn(async move {
            // join_all polls in order: each proposal is queued before the next.
            let proposals = cmds.into_iter().map(|cmd| {
                let node = node.clone();
                let leases = leases.clone();
                async move {
                    let kind = command_kind(&cmd);
                    let started = std::time::Instant::now();
                    let moved = moved_buckets(&cmd);
                    let fenced = match &cmd {
                        Command::FenceMember { name, epoch, .. } => {
                            Some((name.clone(), *epoch, leases.since_ack(name)))
                        }
                        _ => None,
                    };
                    match (node.propose(cmd).await, fenced) {
                        (Ok(_), Some((member, epoch, silent_for))) => {
                            tracing::warn!(%member, epoch, silent_ms = silent_for, "member fenced: lease ended, buckets freed");
                            crate::metrics::fenced(silent_for);
                        }
                        (Ok(index), None) => {
                            let took_us = started.elapsed().as_micros() as u64;
                            tracing::debug!(kind, moved, index, took_us, "ownership step applied");
                            crate::metrics::ownership_step(kind, moved)
                        }
                        (Err(e), Some((member, ..))) => {
                            tracing::info!(%member, error = %e, "fence proposal failed")
                        }
                        (Err(e), None) => {
                            tracing::debug!(kind, error = %e, "ownership proposal failed")
                        }
                    }
                }
            });
            futures::future::join_all(proposals).await;
        });
    }

    /// Runs a [`FenceRound`] (two phases, this controller marking last) over
    /// the network: carries out its commands and feeds it the answers.
    fn fence_round(
        &self,
        peers: &Peers,
        voters: Vec<u64>,
        member: String,
        epoch: u64,
        at_ms: u64,
        done: &mpsc::UnboundedSender<Fenced>,
    ) {
        let me = self.me;
        let leases = self.leases.clone();
        let done = done.clone();
        let cluster = self.cluster.clone();
        let clients: BTreeMap<u64, _> = voters
            .iter()
            .filter(|&&v| v != me)
            .filter_map(|v| peers.get(v).map(|(_, _, c)| (*v, c.clone())))
            .collect();
        tokio::spawn(async move {
            let self_could = leases.could_fence(&member).is_none();
            let (mut round, first) =
                FenceRound::start(me, &voters, &member, epoch, at_ms, self_could);
            let mut todo: VecDeque<FenceCommand> = first.into();
            while let Some(cmd) = todo.pop_front() {
                match cmd {
                    FenceCommand::Ask { to, commit } => {
                        let asks = to.into_iter().map(|id| {
                            let client = clients.get(&id).cloned();
                            let req = FenceRequest {
                                protocol_version: PROTOCOL_VERSION,
                                cluster: cluster.clone(),
                                from: me,
                                member: member.clone(),
                                epoch,
                                commit,
                            };
                            async move {
                                let Some(mut c) = client else {
                                    return (id, false, None);
                                };
                                match tokio::time::timeout(Duration::from_secs(1), c.fence(req))
                                    .await
                                {
                                    Ok(Ok(reply)) => {
                                        let r = reply.into_inner();
                                        (id, r.agreed, Some(r.retry_after_ms))
                                    }
                                    other => {
                                        tracing::debug!(peer = id, ?other, "fence request failed");
                                        (id, false, None)
                                    }
                                }
                            }
                        });
                        for (id, agreed, wait) in futures::future::join_all(asks).await {
                            todo.extend(round.answer_waiting(id, commit, agreed, wait));
                        }
                    }
                    FenceCommand::MarkSelf => {
                        let l = leases.clone();
                        let (m, e) = (member.clone(), epoch);
                        // The mark is fsync'd: off the async workers.
                        let ok = match tokio::task::spawn_blocking(move || l.fence(&m, e)).await {
                            Ok(Ok(None)) => true,
                            Ok(Ok(Some(_))) => false,
                            Ok(Err(e)) => {
                                tracing::error!(error = %e, "cannot persist fence mark");
                                false
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "fence mark task failed");
                                false
                            }
                        };
                        todo.extend(round.marked_self(ok));
                    }
                    FenceCommand::GiveUp {
                        yes,
                        need,
                        retry_in_ms,
                    } => {
                        crate::metrics::fencing_round(false);
                        tracing::info!(%member, epoch, yes, need, ?retry_in_ms, "fence not agreed (member still acked)");
                        if let Some(retry_in_ms) = retry_in_ms {
                            let _ = done.send(Fenced::Retry {
                                member: member.clone(),
                                epoch,
                                retry_in_ms,
                            });
                        }
                    }
                    FenceCommand::Propose(cmd) => {
                        crate::metrics::fencing_round(true);
                        // The loop proposes it with the plan for after it.
                        let _ = done.send(Fenced::Agreed(cmd));
                    }
                }
            }
        });
    }
}

fn command_kind(cmd: &Command) -> &'static str {
    match cmd {
        Command::SetOwners { .. } => "assign",
        Command::Transfer { .. } => "transfer",
        Command::Release { .. } => "release",
        Command::Readmit { .. } => "readmit",
        Command::Evict { .. } => "evict",
        Command::FenceMember { .. } => "fence",
        _ => "other",
    }
}

fn moved_buckets(cmd: &Command) -> usize {
    match cmd {
        Command::SetOwners { changes } => changes.len(),
        Command::Transfer { buckets, .. } => buckets.len(),
        _ => 0,
    }
}

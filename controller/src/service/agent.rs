//! Agent API. An agent may speak only for the member named in its certificate.
//!
//! Heartbeats are answered by every controller from its own applied state; the
//! assignment stream sends the member's owned buckets whenever they change.
//! (Quorum leases and fencing build on these two calls; see controller/docs/leases.md.)

use std::sync::Arc;

use tokio::sync::watch;
use tonic::{Request, Response, Status};
use vipshare_core::agent::assignment::Changed;
use vipshare_core::agent::Assignment;
use vipshare_core::heartbeat::Heartbeat;
use vipshare_core::lease::Refusal;
use vipshare_proto::pki::Role;
use vipshare_proto::v1::agent_api_server::AgentApi;
use vipshare_proto::v1::{self as pb};
use vipshare_proto::{check_version, PROTOCOL_VERSION};

use super::admin::settings_to_pb;
use super::{authorize, refuse};
use crate::node::{NodeHandle, NodeView};

const SERVICE: &str = "agent";

pub struct AgentService {
    pub node: NodeHandle,
    pub leases: std::sync::Arc<crate::leases::Leases>,
    pub released: tokio::sync::mpsc::Sender<crate::ownership::Released>,
    pub fanout: Arc<Fanout>,
}

#[allow(clippy::result_large_err)]
fn own_member<T>(req: &Request<T>, member: &str, node: &NodeHandle) -> Result<(), Status> {
    let who = authorize(req, SERVICE, &[Role::Agent], node)?;
    if who.name != member {
        return Err(refuse(
            SERVICE,
            "impersonation",
            format!(
                "certificate {} may not act for member {member:?}",
                who.to_uri()
            ),
        ));
    }
    Ok(())
}

/// The member's assignment ([`Assignment::of`]) on the wire.
fn assignment(v: &NodeView, member: &str) -> pb::Assignment {
    let a = Assignment::of(&v.state, v.applied, &v.voters, member);
    let grants = |m: &std::collections::BTreeMap<u32, u64>| {
        m.iter()
            .map(|(&bucket, &epoch)| pb::BucketGrant { bucket, epoch })
            .collect()
    };
    pb::Assignment {
        protocol_version: PROTOCOL_VERSION,
        member: member.to_string(),
        member_epoch: a.member_epoch,
        applied_index: a.applied_index,
        settings: v.state.settings.as_ref().map(settings_to_pb),
        owned: grants(&a.owned),
        release: grants(&a.release),
        controllers: a
            .controllers
            .into_iter()
            .map(|c| pb::ControllerInfo {
                id: c.id,
                address: c.address,
                role: if c.voter { "voter" } else { "learner" }.into(),
            })
            .collect(),
    }
}

/// A heartbeat from the wire as core's answer takes it.
fn heartbeat_of(hb: &pb::HeartbeatRequest) -> Heartbeat {
    Heartbeat {
        member: hb.member.clone(),
        epoch: hb.member_epoch,
        assignment_index: hb.assignment_index,
        problems: hb.problems.clone(),
    }
}

type AssignmentStream = super::TaskStream<pb::Assignment>;

/// Wakes only the assignment streams whose member's assignment changed
/// ([`Assignment::changed_members`]): one diff per applied view instead of
/// every stream recomputing its assignment from the whole map on every entry.
/// A change of the deny-list or the voters wakes every stream, since each
/// checks its certificate and this controller's vote.
#[derive(Default)]
pub struct Fanout {
    /// Per member, a counter bumped when its streams must look again.
    members: std::sync::Mutex<std::collections::HashMap<String, watch::Sender<u64>>>,
}

impl Fanout {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, watch::Sender<u64>>> {
        // Every update is one counter bump or map entry: a poisoned lock is consistent.
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A wake-up for `member`'s streams; take it before reading the view, so
    /// no change applied after that read is missed.
    fn subscribe(&self, member: &str) -> watch::Receiver<u64> {
        let mut members = self.lock();
        match members.get(member) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(0);
                members.insert(member.to_string(), tx);
                rx
            }
        }
    }

    fn wake(&self, changed: &Changed) {
        let mut members = self.lock();
        // Members whose streams all ended are forgotten on the way.
        members.retain(|m, tx| {
            if changed.concerns(m) {
                tx.send_modify(|n| *n += 1);
            }
            tx.receiver_count() > 0
        });
    }

    /// Follows the applied views until the node stops; then every stream ends.
    pub async fn run(self: std::sync::Arc<Self>, mut views: watch::Receiver<Arc<NodeView>>) {
        let mut prev = views.borrow_and_update().clone();
        while views.changed().await.is_ok() {
            let view = views.borrow_and_update().clone();
            let changed = if prev.state.revoked != view.state.revoked || prev.id != view.id {
                Changed::All
            } else {
                Assignment::changed_members(&prev.state, &prev.voters, &view.state, &view.voters)
            };
            self.wake(&changed);
            prev = view;
        }
        self.lock().clear();
    }
}

/// Sends `member`'s assignment whenever it changed (the [`Fanout`] says when to
/// look). Ends the stream when the certificate (`serial`) is revoked, or when
/// this controller is not in its own applied voter set: it acks no heartbeats
/// then, so its assignments must not steer the agent either; the agent follows
/// the voters it reconnects to instead.
fn assignment_stream(
    fanout: &Fanout,
    views: watch::Receiver<Arc<NodeView>>,
    member: String,
    serial: String,
) -> AssignmentStream {
    let mut wake = fanout.subscribe(&member);
    super::task_stream(4, move |tx| async move {
        let mut last: Option<pb::Assignment> = None;
        loop {
            wake.borrow_and_update();
            let view = views.borrow().clone();
            // A stream outlives its authorisation if the certificate is revoked
            // meanwhile: end it then.
            if view.state.revoked.contains(&serial) {
                crate::metrics::rpc_rejected(SERVICE, "revoked");
                tracing::warn!(%member, %serial, reason = "revoked", "ending assignment stream: certificate revoked");
                let _ = tx
                    .send(Err(Status::unauthenticated(format!(
                        "certificate serial {serial} was revoked"
                    ))))
                    .await;
                return;
            }
            if !view.voters.contains(&view.id) {
                tracing::info!(%member, controller = view.id, "ending assignment stream: not a voter");
                let _ = tx
                    .send(Err(Status::unavailable(format!(
                        "controller {} is not a voter of its applied configuration; watch the voters",
                        view.id
                    ))))
                    .await;
                return;
            }
            let a = assignment(&view, &member);
            // Not kept while waiting: a stream woken rarely would otherwise pin
            // an old copy of the whole state, one per stream.
            drop(view);
            let changed = last.as_ref().is_none_or(|l| {
                l.owned != a.owned
                    || l.release != a.release
                    || l.settings != a.settings
                    || l.member_epoch != a.member_epoch
                    || l.controllers != a.controllers
            });
            if changed {
                if tx.send(Ok(a.clone())).await.is_err() {
                    return;
                }
                last = Some(a);
            }
            if wake.changed().await.is_err() {
                return;
            }
        }
    })
}

/// The answer to one heartbeat (unary or streamed), from the applied view and
/// this controller's promises at the moment it is answered.
#[allow(clippy::result_large_err)]
fn answer(
    node: &NodeHandle,
    leases: &crate::leases::Leases,
    hb: &pb::HeartbeatRequest,
) -> Result<pb::HeartbeatReply, Status> {
    check_version(hb.protocol_version)?;
    let v = node.view();
    let voter = v.voters.contains(&v.id);
    let answer = leases.heartbeat(&v.state, voter, &heartbeat_of(hb));
    crate::metrics::heartbeat(answer.verdict.is_ok());
    let stale_assignment = matches!(answer.verdict, Err(Refusal::StaleAssignment { .. }));
    let (acked, reason) = match answer.verdict {
        Ok(()) => (true, String::new()),
        Err(r) => (false, r.to_string()),
    };
    Ok(pb::HeartbeatReply {
        protocol_version: PROTOCOL_VERSION,
        controller_id: v.id,
        round: hb.round,
        acked,
        reason,
        leader_id: v.role.leader,
        member_epoch: answer.member_epoch,
        lease_ms: answer.lease_ms,
        stale_assignment,
    })
}

type HeartbeatStream = super::TaskStream<pb::HeartbeatReply>;

#[tonic::async_trait]
impl AgentApi for AgentService {
    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        own_member(&req, &req.get_ref().member, &self.node)?;
        answer(&self.node, &self.leases, req.get_ref()).map(Response::new)
    }

    type HeartbeatsStream = HeartbeatStream;

    /// Every request is checked as a unary call would be: the member must be
    /// the certificate's and the certificate not revoked (checked per request,
    /// so a revocation ends a stream opened before it).
    async fn heartbeats(
        &self,
        req: Request<tonic::Streaming<pb::HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatsStream>, Status> {
        let who = authorize(&req, SERVICE, &[Role::Agent], &self.node)?;
        let serial = vipshare_proto::tls::peer(&req)
            .map(|p| p.serial.clone())
            .unwrap_or_default();
        let mut incoming = req.into_inner();
        let (node, leases) = (self.node.clone(), self.leases.clone());
        Ok(Response::new(super::task_stream(8, move |tx| async move {
            while let Ok(Some(hb)) = incoming.message().await {
                let reply = if hb.member != who.name {
                    Err(refuse(
                        SERVICE,
                        "impersonation",
                        format!(
                            "certificate {} may not act for member {:?}",
                            who.to_uri(),
                            hb.member
                        ),
                    ))
                } else if node.view().state.revoked.contains(&serial) {
                    crate::metrics::rpc_rejected(SERVICE, "revoked");
                    Err(Status::unauthenticated(format!(
                        "certificate serial {serial} was revoked"
                    )))
                } else {
                    answer(&node, &leases, &hb)
                };
                let end = reply.is_err();
                if tx.send(reply).await.is_err() || end {
                    return;
                }
            }
        })))
    }

    type WatchAssignmentsStream = AssignmentStream;

    async fn watch_assignments(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchAssignmentsStream>, Status> {
        own_member(&req, &req.get_ref().member, &self.node)?;
        let serial = vipshare_proto::tls::peer(&req)
            .map(|p| p.serial.clone())
            .unwrap_or_default();
        let w = req.into_inner();
        check_version(w.protocol_version)?;
        let stream = assignment_stream(&self.fanout, self.node.subscribe(), w.member, serial);
        Ok(Response::new(stream))
    }

    async fn released(
        &self,
        req: Request<pb::ReleasedRequest>,
    ) -> Result<Response<pb::ReleasedReply>, Status> {
        own_member(&req, &req.get_ref().member, &self.node)?;
        let r = req.into_inner();
        check_version(r.protocol_version)?;
        for g in r.buckets {
            // Only the leader acts on these; a full queue drops (the agent repeats).
            let _ = self.released.try_send(crate::ownership::Released {
                member: r.member.clone(),
                bucket: g.bucket,
                epoch: g.epoch,
            });
        }
        Ok(Response::new(pb::ReleasedReply {
            protocol_version: PROTOCOL_VERSION,
        }))
    }

    async fn drain_self(
        &self,
        req: Request<pb::DrainSelfRequest>,
    ) -> Result<Response<pb::DrainSelfReply>, Status> {
        own_member(&req, &req.get_ref().member, &self.node)?;
        let r = req.into_inner();
        check_version(r.protocol_version)?;
        // Not an operator's drain: the member's return undrains it, without penalty.
        let by = format!("agent {}", r.member);
        let drain = vipshare_core::command::Command::StopSelf { name: r.member };
        if let Err(e) = self.node.propose_by(drain, &by).await {
            let v = self.node.view();
            return Err(super::node_status(e, v.leader_address()));
        }
        Ok(Response::new(pb::DrainSelfReply {
            protocol_version: PROTOCOL_VERSION,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;
    use vipshare_core::replica::RoleState;

    fn view(voters: Vec<u64>) -> Arc<NodeView> {
        Arc::new(NodeView {
            id: 1,
            role: RoleState {
                role: raft::StateRole::Follower,
                term: 1,
                leader: 2,
            },
            commit: 0,
            applied: 0,
            voters,
            learners: vec![],
            state: Arc::new(Default::default()),
        })
    }

    #[tokio::test]
    async fn the_stream_ends_when_this_controller_stops_being_a_voter() {
        let (tx, rx) = tokio::sync::watch::channel(view(vec![1, 2, 3]));
        let fanout = Arc::new(Fanout::default());
        tokio::spawn(fanout.clone().run(rx.clone()));
        let mut s = assignment_stream(&fanout, rx, "h1".into(), "1f".into());
        assert!(s.next().await.expect("first assignment").is_ok());
        tx.send(view(vec![2, 3, 4])).unwrap();
        let next = tokio::time::timeout(std::time::Duration::from_secs(5), s.next());
        let e = next
            .await
            .expect("the stream ends, not waits for the next change")
            .expect("an error")
            .expect_err("not a voter");
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(e.message().contains("controller 1 is not a voter"), "{e:?}");
        assert!(s.next().await.is_none(), "the stream ended");
        // A learner (or removed controller) refuses from the start.
        let (_tx, rx) = tokio::sync::watch::channel(view(vec![2, 3]));
        let mut s = assignment_stream(&fanout, rx, "h1".into(), "1f".into());
        let e = s.next().await.expect("an error").expect_err("not a voter");
        assert_eq!(e.code(), tonic::Code::Unavailable);
    }
}

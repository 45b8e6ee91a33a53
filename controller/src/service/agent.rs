//! Agent API. An agent may speak only for the member named in its certificate.
//!
//! Heartbeats are answered by every controller from its own applied state; the
//! assignment stream sends the member's owned buckets whenever they change.
//! (Quorum leases and fencing build on these two calls; see controller/docs/leases.md.)

use tonic::{Request, Response, Status};
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

#[tonic::async_trait]
impl AgentApi for AgentService {
    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        own_member(&req, &req.get_ref().member, &self.node)?;
        let hb = req.into_inner();
        check_version(hb.protocol_version)?;
        let v = self.node.view();
        let voter = v.voters.contains(&v.id);
        let answer = self.leases.heartbeat(&v.state, voter, &heartbeat_of(&hb));
        crate::metrics::heartbeat(answer.verdict.is_ok());
        let stale_assignment = matches!(answer.verdict, Err(Refusal::StaleAssignment { .. }));
        let (acked, reason) = match answer.verdict {
            Ok(()) => (true, String::new()),
            Err(r) => (false, r.to_string()),
        };
        Ok(Response::new(pb::HeartbeatReply {
            protocol_version: PROTOCOL_VERSION,
            controller_id: v.id,
            round: hb.round,
            acked,
            reason,
            leader_id: v.role.leader,
            member_epoch: answer.member_epoch,
            lease_ms: answer.lease_ms,
            stale_assignment,
        }))
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
        let mut views = self.node.subscribe();
        let member = w.member;
        let stream = super::task_stream(4, move |tx| async move {
            let mut last: Option<pb::Assignment> = None;
            loop {
                let view = views.borrow_and_update().clone();
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
                let a = assignment(&view, &member);
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
                if views.changed().await.is_err() {
                    return;
                }
            }
        });
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

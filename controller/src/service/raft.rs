//! Raft transport, receiving side. Only a controller certificate whose id equals the
//! batch's `from` may deliver, and every message inside must claim that same sender.

use protobuf::Message as _;
use raft::eraftpb::Message;
use tonic::{Request, Response, Status};
use vipshare_proto::pki::Role;
use vipshare_proto::v1::raft_transport_server::RaftTransport;
use vipshare_proto::v1::{FenceReply, FenceRequest, RaftAck, RaftBatch};
use vipshare_proto::{check_version, PROTOCOL_VERSION};

use super::{authorize, refuse};
use crate::node::NodeHandle;

const SERVICE: &str = "raft";

pub struct RaftService {
    pub id: u64,
    pub cluster: String,
    pub node: NodeHandle,
    pub leases: std::sync::Arc<crate::leases::Leases>,
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn send(&self, req: Request<RaftBatch>) -> Result<Response<RaftAck>, Status> {
        let identity = authorize(&req, SERVICE, &[Role::Controller], &self.node)?;
        let batch = req.into_inner();
        check_version(batch.protocol_version)?;
        if identity.controller_id() != Some(batch.from) {
            return Err(refuse(
                SERVICE,
                "id_mismatch",
                format!(
                    "certificate {} may not send raft messages as controller {}",
                    identity.to_uri(),
                    batch.from
                ),
            ));
        }
        if batch.cluster != self.cluster || batch.to != self.id {
            return Err(refuse(
                SERVICE,
                "misaddressed",
                format!(
                    "batch for cluster {:?} controller {} reached cluster {:?} controller {}",
                    batch.cluster, batch.to, self.cluster, self.id
                ),
            ));
        }
        let mut accepted = 0;
        for (i, bytes) in batch.messages.iter().enumerate() {
            let m = Message::parse_from_bytes(bytes).map_err(|e| {
                refuse(
                    SERVICE,
                    "malformed",
                    format!(
                        "message {i} from controller {} does not decode: {e}",
                        batch.from
                    ),
                )
            })?;
            if m.from != batch.from || m.to != self.id {
                return Err(refuse(
                    SERVICE,
                    "id_mismatch",
                    format!(
                        "message {i} claims {} -> {} inside a batch from {}",
                        m.from, m.to, batch.from
                    ),
                ));
            }
            if self.node.deliver(m) {
                accepted += 1;
            }
        }
        Ok(Response::new(RaftAck {
            protocol_version: PROTOCOL_VERSION,
            accepted,
        }))
    }

    async fn fence(&self, req: Request<FenceRequest>) -> Result<Response<FenceReply>, Status> {
        let identity = authorize(&req, SERVICE, &[Role::Controller], &self.node)?;
        let f = req.into_inner();
        check_version(f.protocol_version)?;
        if identity.controller_id() != Some(f.from) || f.cluster != self.cluster {
            return Err(refuse(
                SERVICE,
                "id_mismatch",
                format!(
                    "{} may not ask to fence as controller {}",
                    identity.to_uri(),
                    f.from
                ),
            ));
        }
        let outcome = if f.commit {
            // fsyncs the mark: off the async workers.
            let leases = self.leases.clone();
            let (member, epoch) = (f.member.clone(), f.epoch);
            tokio::task::spawn_blocking(move || leases.fence(&member, epoch))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::internal(e.to_string()))?
        } else {
            self.leases.could_fence(&f.member)
        };
        Ok(Response::new(FenceReply {
            protocol_version: PROTOCOL_VERSION,
            controller_id: self.id,
            agreed: outcome.is_none(),
            retry_after_ms: outcome.unwrap_or(0),
        }))
    }
}

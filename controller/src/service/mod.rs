//! gRPC services, each authorising every call from the peer's certificate identity.
//!
//! - [`raft`]: controller-to-controller raft messages.
//! - [`admin`]: status, members, buckets and mutations for `vipsharectl`.
//! - [`agent`]: heartbeats and assignment streams for node agents.

pub mod admin;
pub mod agent;
pub mod raft;

use tonic::{Request, Status};
use vipshare_proto::pki::{Identity, Role};

use crate::node::{NodeError, NodeHandle};

/// The caller's identity if its certificate is not revoked (in the deny-list this
/// controller has applied) and its role is one of `allowed`; otherwise the call is
/// refused, logged with the peer address and reason, and counted.
///
/// The revocation check runs on every call, so it also cuts off connections that
/// were established before the serial was revoked (new ones are refused at the
/// TLS handshake already).
#[allow(clippy::result_large_err)]
pub(crate) fn authorize<T>(
    req: &Request<T>,
    service: &'static str,
    allowed: &[Role],
    node: &NodeHandle,
) -> Result<Identity, Status> {
    let Some(peer) = vipshare_proto::tls::peer(req) else {
        crate::metrics::rpc_rejected(service, "no_identity");
        tracing::warn!(service, "refused call without a verified peer identity");
        return Err(Status::unauthenticated("no verified client certificate"));
    };
    if node.view().state.revoked.contains(&peer.serial) {
        crate::metrics::rpc_rejected(service, "revoked");
        tracing::warn!(service, peer = %peer.addr, identity = %peer.identity.to_uri(), serial = %peer.serial, reason = "revoked", "refused: certificate revoked");
        return Err(Status::unauthenticated(format!(
            "certificate {} (serial {}) is revoked",
            peer.identity.to_uri(),
            peer.serial
        )));
    }
    if !allowed.contains(&peer.identity.role) {
        crate::metrics::rpc_rejected(service, "wrong_role");
        tracing::warn!(service, peer = %peer.addr, identity = %peer.identity.to_uri(), "refused: role not allowed");
        return Err(Status::permission_denied(format!(
            "role {} may not call the {service} API",
            peer.identity.role
        )));
    }
    Ok(peer.identity.clone())
}

/// Refusal of a well-authenticated but malformed or unauthorised request: logged
/// and counted like the others.
pub(crate) fn refuse(service: &'static str, reason: &'static str, msg: String) -> Status {
    crate::metrics::rpc_rejected(service, reason);
    tracing::warn!(service, reason, "{msg}");
    Status::permission_denied(msg)
}

pub(crate) fn node_status(e: NodeError, leader_address: Option<&str>) -> Status {
    match &e {
        NodeError::NotLeader { .. } => {
            let mut s = Status::unavailable(e.to_string());
            if let Some(addr) = leader_address.and_then(|a| a.parse().ok()) {
                s.metadata_mut().insert("vipshare-leader", addr);
            }
            s
        }
        NodeError::Rejected(_) => Status::failed_precondition(e.to_string()),
        NodeError::LeadershipLost | NodeError::Stopped => Status::unavailable(e.to_string()),
        NodeError::Timeout => Status::deadline_exceeded(e.to_string()),
    }
}

/// Tower layer that logs calls refused before reaching a handler (oversized or
/// undecodable messages, unknown methods, version mismatches): tonic answers those
/// on its own, and an operator should still see them.
#[derive(Debug, Clone, Copy, Default)]
pub struct RefusalLog;

impl<S> tower::Layer<S> for RefusalLog {
    type Service = RefusalLogService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RefusalLogService(inner)
    }
}

#[derive(Debug, Clone)]
pub struct RefusalLogService<S>(S);

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, RB> tower::Service<http::Request<B>> for RefusalLogService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // Kept cheap (no formatting) for the calls that are not refused.
        let uri = req.uri().clone();
        let peer = req
            .extensions()
            .get::<std::sync::Arc<vipshare_proto::tls::PeerInfo>>()
            .cloned();
        let fut = self.0.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            let code = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map(tonic::Code::from);
            if let Some(
                code @ (tonic::Code::ResourceExhausted
                | tonic::Code::OutOfRange
                | tonic::Code::InvalidArgument
                | tonic::Code::Unimplemented
                | tonic::Code::Internal
                | tonic::Code::FailedPrecondition),
            ) = code
            {
                let message = resp
                    .headers()
                    .get("grpc-message")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let peer = peer.map_or("?".into(), |p| {
                    format!("{} {}", p.addr, p.identity.to_uri())
                });
                tracing::warn!(path = uri.path(), %peer, ?code, message, "call refused");
                crate::metrics::rpc_rejected("grpc", "refused");
            }
            Ok(resp)
        })
    }
}

/// A server stream of `T` (or an error status).
pub type TaskStream<T> =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

/// A stream fed by a task through a channel of `capacity`; the task stops when
/// the client goes.
pub fn task_stream<T, F, Fut>(capacity: usize, f: F) -> TaskStream<T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(capacity);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

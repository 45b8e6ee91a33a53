//! Prometheus metrics. Names are listed here, in one place, so dashboards and
//! alert rules have a single reference.
//!
//! The TLS layer (`vipshare_proto::tls`) adds its own:
//! `vipshare_tls_handshake_failures_total{reason}` (reason `revoked` among them),
//! `vipshare_cert_expiry_days{file}` (own certificate and CA bundle, updated at
//! load, reload and every poll) and `vipshare_tls_reloads_total{result}`.
//! Calls refused for a revoked certificate count in
//! `vipshare_rpc_rejected_total{reason="revoked"}`.

use std::net::SocketAddr;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use raft::StateRole;

use crate::node::NodeView;

/// Serve `/metrics` on `addr`.
pub fn install(addr: SocketAddr) -> Result<(), metrics_exporter_prometheus::BuildError> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(&[
            0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
        ])?
        .install()
}

pub fn record_view(v: &NodeView) {
    gauge!("vipshare_raft_term").set(v.role.term as f64);
    gauge!("vipshare_raft_leader_id").set(v.role.leader as f64);
    gauge!("vipshare_raft_commit_index").set(v.commit as f64);
    gauge!("vipshare_raft_applied_index").set(v.applied as f64);
    gauge!("vipshare_raft_voters").set(v.voters.len() as f64);
    for (role, name) in [
        (StateRole::Leader, "leader"),
        (StateRole::Follower, "follower"),
        (StateRole::Candidate, "candidate"),
        (StateRole::PreCandidate, "pre_candidate"),
    ] {
        let on = if v.role.role == role { 1.0 } else { 0.0 };
        gauge!("vipshare_raft_role", "role" => name).set(on);
    }
    let s = &v.state;
    gauge!("vipshare_members").set(s.members.len() as f64);
    gauge!("vipshare_buckets_unowned").set(s.unowned() as f64);
    gauge!("vipshare_members_suppressed")
        .set(s.members.values().filter(|m| m.suppressed).count() as f64);
    gauge!("vipshare_members_down").set(s.members.values().filter(|m| m.down).count() as f64);
    for name in s.members.keys() {
        gauge!("vipshare_buckets_owned", "member" => name.clone())
            .set(s.owned_by(name).count() as f64);
    }
}

pub fn record_proposal(ok: bool, latency: Duration) {
    let result = if ok { "ok" } else { "failed" };
    counter!("vipshare_proposals_total", "result" => result).increment(1);
    if ok {
        histogram!("vipshare_proposal_commit_seconds").record(latency.as_secs_f64());
    }
}

pub fn raft_messages_sent(peer: u64, n: u64) {
    counter!("vipshare_raft_messages_sent_total", "peer" => peer.to_string()).increment(n);
}

pub fn raft_messages_dropped(peer: u64, n: u64) {
    counter!("vipshare_raft_messages_dropped_total", "peer" => peer.to_string()).increment(n);
}

pub fn rpc_rejected(service: &'static str, reason: &'static str) {
    counter!("vipshare_rpc_rejected_total", "service" => service, "reason" => reason).increment(1);
}

pub fn ownership_step(kind: &'static str, moved: usize) {
    counter!("vipshare_ownership_commands_total", "kind" => kind).increment(1);
    if moved > 0 {
        counter!("vipshare_bucket_moves_total", "reason" => kind).increment(moved as u64);
    }
}

pub fn fencing_round(agreed: bool) {
    let result = if agreed { "agreed" } else { "refused" };
    counter!("vipshare_fencing_rounds_total", "result" => result).increment(1);
}

/// A member was fenced `silent_ms` after this leader last acked it.
pub fn fenced(silent_ms: u64) {
    counter!("vipshare_lease_expiries_total").increment(1);
    histogram!("vipshare_fence_after_last_heartbeat_seconds").record(silent_ms as f64 / 1e3);
}

pub fn heartbeat(acked: bool) {
    if acked {
        counter!("vipshare_lease_grants_total").increment(1);
    } else {
        counter!("vipshare_heartbeats_refused_total").increment(1);
    }
}

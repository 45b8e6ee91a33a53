//! Prometheus metrics. Names are listed here, in one place, so dashboards and
//! alert rules have a single reference.
//!
//! The TLS layer (`vipshare_proto::tls`) adds its own:
//! `vipshare_tls_handshake_failures_total{reason}` (reason `revoked` among them),
//! `vipshare_cert_expiry_seconds{file}` (own certificate and CA bundle, updated at
//! load, reload and every poll) and `vipshare_tls_reloads_total{result}`.
//! Calls refused for a revoked certificate count in
//! `vipshare_rpc_rejected_total{reason="revoked"}`.

use std::net::SocketAddr;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use raft::StateRole;

use crate::node::NodeView;

/// Serve `/metrics` on `addr`, every metric described. Needs a tokio runtime.
pub fn install(addr: SocketAddr) -> Result<(), metrics_exporter_prometheus::BuildError> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(&[
            0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
        ])?
        .install()?;
    describe();
    vipshare_proto::telemetry::describe_common("controller");
    vipshare_proto::telemetry::spawn_process_metrics();
    Ok(())
}

/// HELP text and unit of every controller metric (promtool check metrics).
fn describe() {
    use metrics::{describe_counter as c, describe_gauge as g, describe_histogram as h, Unit};
    g!(
        "vipshare_raft_term",
        "Current raft term as this controller sees it."
    );
    g!(
        "vipshare_raft_leader_id",
        "Raft id of the leader this controller follows (0: none known)."
    );
    g!(
        "vipshare_raft_commit_index",
        "Highest raft log index known committed."
    );
    g!(
        "vipshare_raft_applied_index",
        "Highest raft log index applied to the state machine."
    );
    g!(
        "vipshare_raft_voters",
        Unit::Count,
        "Voting controllers in the raft configuration."
    );
    g!(
        "vipshare_raft_role",
        "1 for this controller's current raft role, 0 for the others."
    );
    g!(
        "vipshare_members",
        Unit::Count,
        "Members (hosts) in the cluster."
    );
    g!(
        "vipshare_buckets_unowned",
        Unit::Count,
        "Buckets without an owner: their new flows are dropped."
    );
    g!(
        "vipshare_members_suppressed",
        Unit::Count,
        "Members suppressed by flap damping (given no buckets)."
    );
    g!(
        "vipshare_members_down",
        Unit::Count,
        "Members fenced after missing their lease."
    );
    g!(
        "vipshare_members_stopped",
        Unit::Count,
        "Members whose agent stopped on purpose (drained; back in service on restart)."
    );
    g!(
        "vipshare_buckets_owned",
        Unit::Count,
        "Buckets owned, by member."
    );
    c!(
        "vipshare_proposals_total",
        Unit::Count,
        "Raft proposals by this controller, by result (ok, failed)."
    );
    h!(
        "vipshare_proposal_commit_seconds",
        Unit::Seconds,
        "Time from proposing to applying a committed entry."
    );
    c!(
        "vipshare_raft_messages_sent_total",
        Unit::Count,
        "Raft messages sent, by peer."
    );
    c!(
        "vipshare_raft_messages_dropped_total",
        Unit::Count,
        "Raft messages dropped (peer queue full or unreachable), by peer."
    );
    c!(
        "vipshare_rpc_rejected_total",
        Unit::Count,
        "RPCs refused, by service and reason (role, revoked, version, ...)."
    );
    c!(
        "vipshare_ownership_commands_total",
        Unit::Count,
        "Ownership commands the leader proposed, by kind."
    );
    c!(
        "vipshare_bucket_moves_total",
        Unit::Count,
        "Buckets that changed owner, by reason."
    );
    c!(
        "vipshare_fencing_rounds_total",
        Unit::Count,
        "Rounds asking every controller to fence a silent member, by result."
    );
    c!(
        "vipshare_lease_expiries_total",
        Unit::Count,
        "Members fenced after their lease ran out."
    );
    h!(
        "vipshare_fence_after_last_heartbeat_seconds",
        Unit::Seconds,
        "Time from a member's last acknowledged heartbeat to its fencing."
    );
    c!(
        "vipshare_lease_grants_total",
        Unit::Count,
        "Agent heartbeats acknowledged (lease promises given)."
    );
    c!(
        "vipshare_heartbeats_refused_total",
        Unit::Count,
        "Agent heartbeats refused (unknown member, fenced epoch, ...)."
    );
    h!(
        "vipshare_storage_sync_seconds",
        Unit::Seconds,
        "Time of one durable write (two fsyncs) of the raft log."
    );
    c!(
        "vipshare_storage_written_bytes_total",
        Unit::Bytes,
        "Bytes written to the raft log."
    );
    c!(
        "vipshare_storage_sync_failures_total",
        Unit::Count,
        "Failed raft log syncs (the controller stops after one)."
    );
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
    // A member stopped on purpose (agent SIGTERM) is not down.
    gauge!("vipshare_members_down")
        .set(s.members.values().filter(|m| m.down && !m.stopped).count() as f64);
    gauge!("vipshare_members_stopped").set(s.members.values().filter(|m| m.stopped).count() as f64);
    // One pass over the map, not one per member: this runs on the raft thread
    // for every applied batch.
    let counts = s.owned_counts();
    for name in s.members.keys() {
        let n = counts.get(name.as_str()).copied().unwrap_or(0);
        gauge!("vipshare_buckets_owned", "member" => name.clone()).set(n as f64);
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

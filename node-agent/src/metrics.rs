//! Prometheus metrics of the agent, named in one place.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use metrics::{counter, gauge, histogram};

pub const BUCKETS_OWNED: &str = "vipshare_agent_buckets_owned";
const VIPS_UNSERVED: &str = "vipshare_agent_vips_unserved";
pub const LEASE_REMAINING: &str = "vipshare_agent_lease_remaining_seconds";
pub const RECONCILE_SECONDS: &str = "vipshare_agent_reconcile_seconds";
pub const NFT_ERRORS: &str = "vipshare_agent_nft_errors_total";
pub const PACKETS: &str = "vipshare_agent_packets_total";
pub const ASSIGNMENTS_REFUSED: &str = "vipshare_agent_assignments_refused_total";
pub const LEASE_RENEWALS: &str = "vipshare_agent_lease_renewals_total";
pub const ASSIGNMENT_APPLY_SECONDS: &str = "vipshare_agent_assignment_apply_seconds";
pub const EPOCH_CHANGES: &str = "vipshare_agent_member_epoch_changes_total";
pub const LATE_KERNEL_WRITES: &str = "vipshare_agent_late_kernel_writes_total";
pub const FOREIGN_EDITS: &str = "vipshare_agent_foreign_nft_edits_total";
pub const DATAPLANE_HEALTHY: &str = "vipshare_agent_dataplane_healthy";
pub const DATAPLANE_PROBLEM: &str = "vipshare_agent_dataplane_problem";

/// Serve `/metrics` on `addr`, every metric described (needs a tokio runtime).
pub fn install(addr: SocketAddr) -> Result<(), metrics_exporter_prometheus::BuildError> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(&[
            0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0,
        ])?
        .install()?;
    describe();
    vipshare_proto::telemetry::describe_common("agent");
    vipshare_proto::telemetry::spawn_process_metrics();
    Ok(())
}

/// HELP text and unit of every agent metric (promtool check metrics).
fn describe() {
    use metrics::{describe_counter as c, describe_gauge as g, describe_histogram as h, Unit};
    g!(
        BUCKETS_OWNED,
        Unit::Count,
        "Buckets this host accepts new flows for (in the kernel's owned set)."
    );
    g!(
        LEASE_REMAINING,
        Unit::Seconds,
        "Time left on the lease granted by a majority of controllers."
    );
    h!(
        RECONCILE_SECONDS,
        Unit::Seconds,
        "Time of one reconciliation of the kernel state (nftables or ipfw)."
    );
    c!(
        NFT_ERRORS,
        Unit::Count,
        "Failed kernel updates (nft or ipfw commands)."
    );
    c!(
        PACKETS,
        Unit::Count,
        "Packets to a VIP seen by the data plane, by vip and verdict."
    );
    c!(
        ASSIGNMENTS_REFUSED,
        Unit::Count,
        "Assignments refused (stale epoch or from a non-leader)."
    );
    c!(
        LEASE_RENEWALS,
        Unit::Count,
        "Leases renewed (a majority acknowledged a heartbeat round)."
    );
    h!(
        ASSIGNMENT_APPLY_SECONDS,
        Unit::Seconds,
        "Time from receiving an assignment to the kernel holding it."
    );
    c!(
        EPOCH_CHANGES,
        Unit::Count,
        "Member epoch changes seen (each one a fencing: every bucket dropped)."
    );
    c!(
        LATE_KERNEL_WRITES,
        Unit::Count,
        "Lease writes whose kernel round trip exceeded the kernel-delay budget (rewritten or undone)."
    );
    c!(
        FOREIGN_EDITS,
        Unit::Count,
        "Edits of the agent's nftables table by another process, repaired."
    );
    g!(
        DATAPLANE_HEALTHY,
        "1 when the data plane can serve (interface up, VIP present, filter present, last apply ok), else 0."
    );
    g!(
        VIPS_UNSERVED,
        Unit::Count,
        "VIPs in the cluster settings this agent cannot serve (logged with the reason); the others are served."
    );
    g!(
        DATAPLANE_PROBLEM,
        "1 for each data-plane problem present, by problem."
    );
}

pub fn lease(owned: usize, remaining: Duration) {
    gauge!(BUCKETS_OWNED).set(owned as f64);
    gauge!(LEASE_REMAINING).set(remaining.as_secs_f64());
}

pub fn reconcile(took: Duration, ok: bool) {
    histogram!(RECONCILE_SECONDS).record(took.as_secs_f64());
    if !ok {
        counter!(NFT_ERRORS).increment(1);
    }
}

/// From receiving an assignment to the kernel holding it.
pub fn assignment_applied(took: Duration) {
    histogram!(ASSIGNMENT_APPLY_SECONDS).record(took.as_secs_f64());
}

pub fn refused() {
    counter!(ASSIGNMENTS_REFUSED).increment(1);
}

pub fn renewed() {
    counter!(LEASE_RENEWALS).increment(1);
}

/// A lease write acknowledged by the kernel later than the kernel-delay budget
/// (its elements were deleted at once).
pub fn late_kernel_write() {
    counter!(LATE_KERNEL_WRITES).increment(1);
}

/// Another process changed the agent's nftables tables (the filter was
/// restored).
pub fn foreign_edit() {
    counter!(FOREIGN_EDITS).increment(1);
}

/// The data plane's health: 1/0 overall, and 1 per problem found.
pub fn dataplane_health(problems: &std::collections::BTreeSet<crate::dataplane::Problem>) {
    gauge!(DATAPLANE_HEALTHY).set(if problems.is_empty() { 1.0 } else { 0.0 });
    for p in crate::dataplane::Problem::ALL {
        let found = if problems.contains(&p) { 1.0 } else { 0.0 };
        gauge!(DATAPLANE_PROBLEM, "problem" => p.name()).set(found);
    }
}

pub fn vips_unserved(n: usize) {
    gauge!(VIPS_UNSERVED).set(n as f64);
}

pub fn epoch_changed() {
    counter!(EPOCH_CHANGES).increment(1);
}

/// Turns the kernel's packet counters (which restart from zero when the table
/// is rebuilt) into monotonic Prometheus counters.
#[derive(Debug, Default)]
pub struct PacketCounters {
    last: BTreeMap<(IpAddr, &'static str), u64>,
}

impl PacketCounters {
    /// The increments since the previous reading.
    pub fn deltas(
        &mut self,
        now: &BTreeMap<(IpAddr, &'static str), u64>,
    ) -> Vec<((IpAddr, &'static str), u64)> {
        let mut out = Vec::new();
        for (k, &v) in now {
            let prev = self.last.get(k).copied().unwrap_or(0);
            // A smaller value means the table was rebuilt: count from zero.
            let d = if v >= prev { v - prev } else { v };
            if d > 0 {
                out.push((*k, d));
            }
        }
        self.last = now.clone();
        out
    }

    pub fn record(&mut self, now: &BTreeMap<(IpAddr, &'static str), u64>) {
        for ((vip, verdict), d) in self.deltas(now) {
            counter!(PACKETS, "vip" => vip.to_string(), "verdict" => verdict).increment(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_resets_are_counted_from_zero() {
        let a = IpAddr::from([10, 0, 0, 1]);
        let mut p = PacketCounters::default();
        let m = |v: u64| BTreeMap::from([((a, "accepted"), v)]);
        assert_eq!(p.deltas(&m(5)), vec![((a, "accepted"), 5)]);
        assert_eq!(p.deltas(&m(8)), vec![((a, "accepted"), 3)]);
        assert_eq!(p.deltas(&m(2)), vec![((a, "accepted"), 2)]);
        assert_eq!(p.deltas(&m(2)), vec![]);
    }
}

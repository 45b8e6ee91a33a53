//! Metrics every vipshare daemon exports besides its own: build information,
//! `process_*`, and the TLS layer's. Each is described (HELP and unit) so that
//! `/metrics` passes `promtool check metrics`.

use std::time::Duration;

use metrics::{describe_counter, describe_gauge, gauge, Unit};

use crate::tls::{
    CERT_EXPIRY_METRIC, CONNECTIONS_METRIC, HANDSHAKE_FAILURES_METRIC, PENDING_HANDSHAKES_METRIC,
    RELOADS_METRIC,
};

pub const BUILD_INFO: &str = "vipshare_build_info";

/// How often `process_*` is refreshed (Prometheus scrapes every 15 s by default).
const PROCESS_INTERVAL: Duration = Duration::from_secs(5);

/// Describe the shared metrics and set `vipshare_build_info{component,version}`.
/// Call once the Prometheus recorder is installed.
pub fn describe_common(component: &'static str) {
    describe_counter!(
        HANDSHAKE_FAILURES_METRIC,
        Unit::Count,
        "TLS handshakes refused, by reason (revoked, expired, unknown_ca, ...)."
    );
    describe_gauge!(
        PENDING_HANDSHAKES_METRIC,
        Unit::Count,
        "TLS handshakes in flight (accepted connections not yet authenticated)."
    );
    describe_gauge!(
        CERT_EXPIRY_METRIC,
        "Seconds until a certificate in use expires (own certificate and CA bundle), by file."
    );
    describe_gauge!(
        CONNECTIONS_METRIC,
        Unit::Count,
        "Authenticated TLS connections open, by the peer's role (controller, agent, admin, reader)."
    );
    describe_counter!(
        RELOADS_METRIC,
        Unit::Count,
        "Certificate reloads from disk, by result (ok, failed)."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the labels name the component and its version."
    );
    gauge!(BUILD_INFO, "component" => component, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// Refresh `process_*` (CPU seconds, resident and virtual memory, open and maximum
/// file descriptors, start time, threads) every few seconds. Needs a tokio runtime.
pub fn spawn_process_metrics() {
    let collector = metrics_process::Collector::default();
    collector.describe();
    tokio::spawn(async move {
        loop {
            collector.collect();
            tokio::time::sleep(PROCESS_INTERVAL).await;
        }
    });
}

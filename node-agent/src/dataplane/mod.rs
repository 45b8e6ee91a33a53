//! The kernel data plane: what every backend (FreeBSD ipfw today, Linux
//! nftables later) is asked to make true, and the trait it implements.
//!
//! # Contract
//! [`DataPlane::apply`] makes the kernel accept NEW flows to the VIPs exactly for
//! the source addresses whose bucket is in [`Desired::owned`], and only until the
//! lease runs out: [`Desired::lease_until`] is an absolute deadline on the
//! monotonic clock, and the backend must arrange that the kernel stops
//! accepting new flows no later than that, even if the agent process freezes
//! or dies right after `apply` returns. Being absolute, a stall between
//! computing the desired state and writing it cannot stretch the deadline: the
//! backend reads the clock immediately before the write. How well a backend can
//! keep that promise is reported in [`ApplyReport::lease_enforcement`].
//!
//! Established flows are never cut: a host keeps the flows it accepted when it
//! loses their bucket, and never picks up another host's established flow.
//!
//! `apply` is called on every lease renewal (every heartbeat), so a backend must
//! make the unchanged case cheap (renew the deadline, touch nothing else).
//!
//! [`DataPlane::withdraw`] stops accepting new flows now (planned release,
//! shutdown); the VIP itself stays configured so established flows survive.
//!
//! # Planner and executor
//! Backends turn a [`Desired`] into a plan (a list of steps) with pure code and
//! hand the plan to one executor, the only code that touches the OS. Golden
//! tests pin the plans.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant};

pub use vipshare_core::bucket::{Affinity, BucketFn};
pub use vipshare_core::net::{Mac, SwitchMode};

pub mod freebsd;
pub mod linux;

/// One shared address as this host must configure it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VipConfig {
    /// The shared address, IPv4 or IPv6.
    pub addr: IpAddr,
    /// Prefix length of the alias (normally 32 or 128: the host's own address
    /// covers the subnet).
    pub prefix_len: u8,
    /// The cluster's multicast MAC that ARP (IPv4) or neighbour discovery
    /// (IPv6) publishes for `addr`.
    pub mac: Mac,
    /// Interface carrying the VIP (e.g. `vtnet0`, `eth0`).
    pub interface: String,
    /// How the switches deliver the VIP's frames to every host.
    pub mode: SwitchMode,
}

/// Everything the data plane must make true. Built by the agent from the
/// controllers' assignment and its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// The VIPs of the cluster (all share one bucket map).
    pub vips: Vec<VipConfig>,
    /// Number of buckets B (a power of two).
    pub bucket_count: u32,
    /// How a source address maps to a bucket.
    pub bucket_fn: BucketFn,
    /// Which part of the source address is the key (see
    /// [`vipshare_core::bucket::Affinity`]).
    pub affinity: Affinity,
    /// jhash seed (ignored by lowbits).
    pub seed: u32,
    /// Buckets this host owns (each `< bucket_count`).
    pub owned: BTreeSet<u32>,
    /// When the lease ends, on the monotonic clock (already net of the kernel
    /// delay the lease protocol allows for). At or before the moment of the
    /// write means "no lease": accept no new flows.
    pub lease_until: Instant,
}

impl Desired {
    /// Time left on the lease at `now` (zero once it has run out).
    pub fn lease_left(&self, now: Instant) -> Duration {
        self.lease_until.saturating_duration_since(now)
    }

    /// Checks what every backend relies on: a valid bucket configuration, owned
    /// buckets in range, sane VIP entries without duplicates.
    pub fn validate(&self) -> Result<(), DataPlaneError> {
        vipshare_core::bucket::validate(self.bucket_fn, self.affinity, self.bucket_count)
            .map_err(|e| DataPlaneError::InvalidDesired(e.to_string()))?;
        if let Some(&b) = self.owned.iter().next_back() {
            if b >= self.bucket_count {
                return Err(DataPlaneError::InvalidDesired(format!(
                    "owned bucket {b} is not below the bucket count {}",
                    self.bucket_count
                )));
            }
        }
        let mut seen = BTreeSet::new();
        for vip in &self.vips {
            let max = vip.max_prefix_len();
            if vip.prefix_len == 0 || vip.prefix_len > max {
                return Err(DataPlaneError::InvalidDesired(format!(
                    "VIP {}: prefix length {} is not in 1..={max}",
                    vip.addr, vip.prefix_len
                )));
            }
            if vip.interface.is_empty()
                || !vip
                    .interface
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || c == b'-')
            {
                return Err(DataPlaneError::InvalidDesired(format!(
                    "VIP {}: bad interface name {:?}",
                    vip.addr, vip.interface
                )));
            }
            vip.mode
                .check_mac(vip.addr, vip.mac)
                .map_err(|e| DataPlaneError::InvalidDesired(format!("VIP {}: {e}", vip.addr)))?;
            // One receive device per shared unicast MAC, on one interface.
            if let Some(other) = self.vips.iter().find(|o| {
                vip.mode == SwitchMode::Unicast && o.mac == vip.mac && o.interface != vip.interface
            }) {
                return Err(DataPlaneError::InvalidDesired(format!(
                    "VIP {}: unicast MAC {} is also used by VIP {} on another interface ({})",
                    vip.addr, vip.mac, other.addr, other.interface
                )));
            }
            if !seen.insert(vip.addr) {
                return Err(DataPlaneError::InvalidDesired(format!(
                    "VIP {} is listed twice",
                    vip.addr
                )));
            }
        }
        Ok(())
    }
}

/// How the backend makes the kernel stop accepting new flows at the end of the
/// lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseEnforcement {
    /// The kernel itself expires the ownership (nftables set elements with a
    /// timeout): holds even if the agent freezes or dies.
    KernelTimeout,
    /// A separate watchdog process withdraws the rules (FreeBSD ipfw has no rule
    /// timeouts): holds if the agent freezes or dies, but not if the watchdog
    /// itself is frozen (whole-host stall, swap storm).
    Watchdog,
}

/// What an `apply` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// The backend's [`DataPlane::name`].
    pub backend: &'static str,
    /// Whether anything besides the lease deadline changed in the kernel.
    pub changed: bool,
    /// Number of plan steps executed.
    pub steps: usize,
    /// Kernel filter rules now matching owned buckets (masks for ipfw, set
    /// elements for nftables).
    pub owned_rules: usize,
    /// When (from the start of `apply`) the kernel stops accepting new flows
    /// unless renewed; `None` when nothing is accepted.
    pub stop_after: Option<Duration>,
    /// How that deadline is enforced.
    pub lease_enforcement: LeaseEnforcement,
}

/// Something that keeps this host's data plane from serving the buckets it
/// is given (issue 11 item 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Problem {
    /// A VIP's interface does not exist.
    InterfaceMissing,
    /// A VIP's interface exists but is down (not `IFF_UP` and `IFF_RUNNING`).
    InterfaceDown,
    /// A VIP is not an address of its interface.
    VipMissing,
    /// The filter (tables, chains, sets) is not in the kernel.
    FilterMissing,
    /// The last apply failed.
    LastApplyFailed,
}

impl Problem {
    pub const ALL: [Problem; 5] = [
        Problem::InterfaceMissing,
        Problem::InterfaceDown,
        Problem::VipMissing,
        Problem::FilterMissing,
        Problem::LastApplyFailed,
    ];

    /// Metric label and report text.
    pub fn name(self) -> &'static str {
        match self {
            Problem::InterfaceMissing => "interface_missing",
            Problem::InterfaceDown => "interface_down",
            Problem::VipMissing => "vip_missing",
            Problem::FilterMissing => "filter_missing",
            Problem::LastApplyFailed => "last_apply_failed",
        }
    }
}

/// One interface as the OS reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interface {
    /// Administratively up and with carrier.
    pub up: bool,
    /// Its addresses, both families.
    pub addrs: BTreeSet<IpAddr>,
}

/// The data plane's health: the problems found (none = healthy). Pure, so the
/// backends and the tests share one judgement. `holder` names the interface
/// that must hold a VIP's address (a backend may keep it elsewhere than on
/// the interface that carries its traffic).
pub fn assess(
    vips: &[VipConfig],
    holder: impl Fn(&VipConfig) -> String,
    interfaces: &std::collections::BTreeMap<String, Interface>,
    filter_present: bool,
    last_apply_ok: bool,
) -> BTreeSet<Problem> {
    let mut p = BTreeSet::new();
    for vip in vips {
        match interfaces.get(&vip.interface) {
            None => {
                p.insert(Problem::InterfaceMissing);
                p.insert(Problem::VipMissing);
            }
            Some(i) => {
                if !i.up {
                    p.insert(Problem::InterfaceDown);
                }
                let held = interfaces
                    .get(&holder(vip))
                    .is_some_and(|h| h.addrs.contains(&vip.addr));
                if !held {
                    p.insert(Problem::VipMissing);
                }
            }
        }
    }
    if !filter_present {
        p.insert(Problem::FilterMissing);
    }
    if !last_apply_ok {
        p.insert(Problem::LastApplyFailed);
    }
    p
}

/// Data plane failures.
#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    /// The desired state is malformed.
    #[error("invalid desired state: {0}")]
    InvalidDesired(String),
    /// The desired state is valid but this backend (as configured) cannot do it.
    #[error("not supported by this data plane: {0}")]
    Unsupported(String),
    /// A command failed; the kernel state is unknown until the next full apply.
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    /// A lease write, and the rewrite that followed it, each reached the
    /// kernel later than the kernel-delay budget after their timeouts were
    /// computed; the elements were deleted, since the kernel would have kept
    /// them past the lease by that delay.
    #[error("kernel write took {lag:?}, over the {budget:?} budget; owned elements deleted")]
    LateWrite { lag: Duration, budget: Duration },
    /// An OS call failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// A kernel data plane. Implementations keep what they installed so that
/// `apply` only changes what differs.
pub trait DataPlane {
    /// Makes the kernel match `desired` (see the module docs for the contract).
    fn apply(&mut self, desired: &Desired) -> Result<ApplyReport, DataPlaneError>;
    /// Stops accepting new flows now; established flows and the VIPs stay.
    fn withdraw(&mut self) -> Result<(), DataPlaneError>;
    /// Short backend name for logs and metrics, e.g. `"freebsd-ipfw"`.
    fn name(&self) -> &'static str;
}

/// `01:00:5e:0a:0b:0c` form.
/// An executor for any backend's steps that only records them (tests, dry
/// runs); each backend implements its `Executor` for it.
#[derive(Debug)]
pub struct RecordingExecutor<S> {
    pub steps: Vec<S>,
    /// Fail the step with this index (0-based over all steps ever executed).
    pub fail_at: Option<usize>,
}

impl<S> Default for RecordingExecutor<S> {
    fn default() -> Self {
        RecordingExecutor {
            steps: Vec::new(),
            fail_at: None,
        }
    }
}

impl<S: Clone + fmt::Display> RecordingExecutor<S> {
    pub fn record(&mut self, step: &S) -> Result<(), DataPlaneError> {
        let index = self.steps.len();
        self.steps.push(step.clone());
        if self.fail_at == Some(index) {
            return Err(DataPlaneError::Command {
                command: step.to_string(),
                detail: "injected failure".into(),
            });
        }
        Ok(())
    }
}

impl VipConfig {
    /// 32 for IPv4, 128 for IPv6.
    pub fn max_prefix_len(&self) -> u8 {
        match self.addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        }
    }
}

impl fmt::Display for VipConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} on {} mac {}",
            self.addr, self.prefix_len, self.interface, self.mac
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired() -> Desired {
        Desired {
            vips: vec![VipConfig {
                addr: "192.0.2.10".parse().unwrap(),
                prefix_len: 32,
                mac: Mac([0x01, 0x00, 0x5e, 0x0a, 0x0b, 0x0c]),
                interface: "vtnet0".into(),
                mode: SwitchMode::Multicast,
            }],
            bucket_count: 256,
            bucket_fn: BucketFn::Lowbits,
            affinity: Affinity::Address,
            seed: 0,
            owned: (0..8).collect(),
            lease_until: Instant::now() + Duration::from_millis(500),
        }
    }

    #[test]
    fn validate_accepts_good_and_rejects_bad() {
        assert!(desired().validate().is_ok());
        let mut d = desired();
        d.owned.insert(256);
        assert!(d.validate().is_err());
        let mut d = desired();
        d.bucket_count = 100;
        assert!(d.validate().is_err());
        let mut d = desired();
        d.vips[0].mac = Mac([0x02, 0, 0, 0, 0, 1]);
        assert!(d.validate().is_err());
        let mut d = desired();
        d.vips[0].interface = "em0; rm -rf /".into();
        assert!(d.validate().is_err());
        let mut d = desired();
        d.vips.push(d.vips[0].clone());
        assert!(d.validate().is_err());
        let mut d = desired();
        d.vips[0].prefix_len = 33;
        let e = d.validate().unwrap_err().to_string();
        assert!(e.contains("192.0.2.10") && e.contains("1..=32"), "{e}");
        d.vips[0].addr = "2001:db8::10".parse().unwrap();
        assert!(d.validate().is_ok(), "33 is a fine IPv6 prefix");
        d.vips[0].prefix_len = 129;
        let e = d.validate().unwrap_err().to_string();
        assert!(e.contains("2001:db8::10") && e.contains("1..=128"), "{e}");
    }

    #[test]
    fn health_names_each_problem() {
        let vips = desired().vips;
        let up = Interface {
            up: true,
            addrs: [vips[0].addr].into(),
        };
        let ifs = |i: Interface| std::collections::BTreeMap::from([("vtnet0".to_string(), i)]);
        assert!(assess(&vips, |v| v.interface.clone(), &ifs(up.clone()), true, true).is_empty());
        assert_eq!(
            assess(
                &vips,
                |v| v.interface.clone(),
                &Default::default(),
                true,
                true
            ),
            [Problem::InterfaceMissing, Problem::VipMissing].into()
        );
        let down = Interface {
            up: false,
            ..up.clone()
        };
        assert_eq!(
            assess(&vips, |v| v.interface.clone(), &ifs(down), true, true),
            [Problem::InterfaceDown].into()
        );
        assert_eq!(
            assess(
                &vips,
                |v| v.interface.clone(),
                &ifs(Interface::default()),
                false,
                false
            ),
            [
                Problem::InterfaceDown,
                Problem::VipMissing,
                Problem::FilterMissing,
                Problem::LastApplyFailed
            ]
            .into()
        );
    }
}

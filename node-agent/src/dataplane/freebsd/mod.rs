//! FreeBSD data plane: the VIP as a CARP-INIT alias, a published multicast
//! ARP entry (IPv6: the VIP on lo0 and a proxy neighbour entry), IGMP (MLD)
//! membership, and either ipfw's srcjhash option with kernel-enforced leases
//! (a kernel with kernel-patches/0003) or ipfw mask rules over low-bits
//! buckets with a watchdog process for the lease. One cluster may hold IPv4
//! and IPv6 VIPs.
//!
//! # Per IPv4 VIP
//! On a kernel with kernel-patches/0001 ([`SharedAddress::Flag`], probed by
//! `sysctl net.inet.ip.shared_addr`): the VIP is added with the shared-address
//! flag ([`shared_addr`]), which gives what the CARP-INIT recipe below gives
//! without touching CARP. Otherwise:
//! - `ifconfig IF vhid N advskew 254` and `ifconfig IF inet VIP/32 alias vhid N`
//!   with `net.inet.carp.allow=0`: CARP stays in INIT, so the address is local
//!   (in the address hash: IP delivers to it) but exempt from ARP conflict
//!   defence and gratuitous ARP, and no permanent ARP entry with the card's MAC
//!   is installed (see kernel-patches/README.md for why this recipe replaces a
//!   new address flag).
//! - `arp -S VIP MCAST_MAC pub`: ARP requests for the VIP are answered with the
//!   cluster's multicast MAC.
//! - membership of the 239/8 group that maps to the MAC (a socket held by the
//!   executor), so the NIC's filter and IGMP-snooping switches pass the frames.
//! - a kernel with kernel-patches/0002 and `net.inet.tcp.accept_l2mcast=2`, or
//!   TCP drops every SYN that arrived in a multicast frame.
//!
//! # Per IPv6 VIP
//! As on Linux, and on either kernel (0001's flag is IPv4-only; no CARP):
//! - `ifconfig lo0 inet6 VIP/128 alias`: local (ip6_input accepts packets to
//!   any address in the address hash, whatever interface they arrive on),
//!   no DAD (`in6if_do_dad()` skips loopback), so never marked duplicated when
//!   the other hosts answer for it, and never defended.
//! - a proxy neighbour entry for the VIP with the cluster's 33:33 MAC in the
//!   lltable of IF ([`proxy_nd`]: netlink `RTM_NEWNEIGH` with `NTF_PROXY`,
//!   what `ndp -s VIP MAC proxy` sends; ndp(8) itself would pick lo0 from the
//!   route). `nd6_ns_input()` finds no address of IF for the target and
//!   answers from this `LLE_PUB` entry (`nd6_proxy_fill_sdl()`), with its
//!   link-layer address and no override flag; no multicast check on that path.
//!   The VIP cannot sit on IF itself: every address there gets an
//!   `LLE_IFADDR` entry (`nd6_add_ifa_lle()`, CARP addresses included), which
//!   `RTM_NEWNEIGH` refuses to replace (EPERM).
//! - MLD membership on IF (sockets held by the executor) of the `ff05::` group
//!   that maps to the MAC ([`Mac::mld_group`](crate::dataplane::Mac::mld_group))
//!   and of the VIP's solicited-node group, which the kernel joins on lo0 only.
//! - the base set lets ICMPv6 neighbour solicitations to the VIP through on
//!   every host (unicast reachability probes), as the Linux rules do.
//!
//! Needs: a link-local address on IF (the answer's source), netlink (FreeBSD
//! 13.2 or later). TCP over IPv6 needs kernel-patches/0002 as IPv4 does:
//! `tcp_l2mcast_syn_ok6()` accepts a SYN in a link-layer multicast frame for an
//! address held on a loopback interface with `net.inet.tcp.accept_l2mcast` 1
//! or 2 (2 also for addresses of the receiving interface), so both settings
//! the agent uses cover the VIP on lo0; without the patch tcp_input() drops
//! every IPv6 SYN to the VIP and only UDP and ICMPv6 work (the patch is
//! checked in user space only, see kernel-patches/README.md). None of this
//! ran on FreeBSD: it is read from the sys/netinet6,
//! sys/netlink, usr.sbin/ndp and sbin/ipfw texts of freebsd/freebsd-src.
//!
//! # Buckets
//! [`IpfwBuckets`] picks how, by default by probing the kernel on the first
//! apply (`sysctl net.inet.ip.fw.srcjhash_enable` exists):
//! - srcjhash: [`BucketFn::Jhash`](crate::dataplane::BucketFn), the same
//!   bucket as nftables' `jhash` on Linux hosts, so Linux and FreeBSD hosts
//!   can share a VIP; the lease is a per-bucket deadline the kernel checks
//!   ([`LeaseEnforcement::KernelTimeout`]), no watchdog.
//! - masks: [`BucketFn::Lowbits`](crate::dataplane::BucketFn) (ipfw matches
//!   `addr:mask`, [`masks`]) and the watchdog below.
//!
//! Both apply to IPv6 sources: 0003's match hashes the 16-byte source (the
//! /64 for network24) like `jhash ip6 saddr`, and the masks become IPv6
//! `addr/mask` pairs over the low 32 bits (network24: the /64's low 32 bits),
//! which sbin/ipfw/ipv6.c accepts non-contiguous. ipfw address lists hold one
//! family, so every rule naming VIPs exists per family ([`plan::Family`]). As
//! core's bucket module says, jhash over IPv6 keys agrees with Linux only on
//! little-endian hosts.
//!
//! The rule layout is described in [`plan`].
//!
//! # Lease enforcement on the masks path (the limit, next to Linux)
//! Linux writes the owned buckets as nftables set elements with a `timeout`, so
//! the kernel itself stops accepting new flows when the lease ends, even if the
//! agent is frozen or killed. ipfw rules have no timeout. Here a separate
//! watchdog process ([`watchdog`]) is armed on every apply and runs
//! `ipfw set disable <owned set>` (one atomic operation) at the deadline unless
//! re-armed. That covers a frozen or dead agent; it does not cover a stall of
//! the whole host (the watchdog freezes too) or a killed watchdog, and the
//! watchdog's own scheduling latency counts against `stop_margin`.
//! [`DataPlane::apply`] reports this as [`LeaseEnforcement::Watchdog`].

pub mod exec;
pub mod masks;
pub mod plan;
pub mod proxy_nd;
pub mod shared_addr;
pub mod watchdog;

use std::time::{Duration, Instant};

use crate::dataplane::{ApplyReport, DataPlane, DataPlaneError, Desired, LeaseEnforcement};
pub use exec::{Executor, OsExecutor};
pub use plan::{plan_apply, plan_withdraw, Family, Installed, Plan, Step};

/// How the FreeBSD backend matches owned buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpfwBuckets {
    /// Probe on the first apply: srcjhash when the kernel has it, else masks.
    Auto,
    /// ipfw `addr:mask` rules over low-bits buckets, watchdog for the lease.
    Masks,
    /// ipfw's srcjhash option and kernel lease maps (kernel-patches/0003).
    Srcjhash,
}

/// How the FreeBSD backend configures a VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedAddress {
    /// Probe on the first apply: the flag when the kernel has it, else CARP-INIT.
    Auto,
    /// A CARP vhid kept in INIT (`net.inet.carp.allow=0`) and `alias vhid`.
    CarpInit,
    /// The shared-address flag of kernel-patches/0001 (`net.inet.ip.shared_addr`).
    Flag,
}

/// Settings of the FreeBSD backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreeBsdConfig {
    /// First ipfw rule number vipshare uses; it uses `rule_base..rule_base+1000`
    /// and skips to `rule_base + 1000`, where the administrator's rules go on.
    pub rule_base: u32,
    /// ipfw set holding the owned-bucket rules (enabled).
    pub owned_set: u8,
    /// Disabled ipfw set where new owned rules are built before the swap.
    pub owned_staging_set: u8,
    /// ipfw set holding the established-skip and deny rules (enabled).
    pub base_set: u8,
    /// Disabled ipfw set where new base rules are built before the swap.
    pub base_staging_set: u8,
    /// CARP vhid the VIP aliases are attached to (kept in INIT).
    pub carp_vhid: u8,
    /// How owned buckets are matched ([`IpfwBuckets::Auto`]: probe the kernel).
    pub buckets: IpfwBuckets,
    /// How VIPs are configured ([`SharedAddress::Auto`]: probe the kernel).
    pub address: SharedAddress,
    /// srcjhash lease map (0..=15) this agent writes.
    pub srcjhash_map: u8,
    /// How much earlier than the lease end the watchdog withdraws (the `delta`
    /// of leases.md: watchdog wake-up latency plus the ipfw call).
    pub stop_margin: Duration,
    /// Paths of the tools (absolute on a real host).
    pub ipfw: String,
    pub ifconfig: String,
    pub arp: String,
    /// Interface holding IPv6 VIPs (the loopback).
    pub loopback: String,
    pub sysctl: String,
}

impl Default for FreeBsdConfig {
    fn default() -> Self {
        FreeBsdConfig {
            rule_base: 10000,
            owned_set: 3,
            owned_staging_set: 4,
            base_set: 5,
            base_staging_set: 6,
            carp_vhid: 200,
            buckets: IpfwBuckets::Auto,
            address: SharedAddress::Auto,
            srcjhash_map: 0,
            stop_margin: Duration::from_millis(50),
            ipfw: "/sbin/ipfw".into(),
            ifconfig: "/sbin/ifconfig".into(),
            arp: "/usr/sbin/arp".into(),
            loopback: "lo0".into(),
            sysctl: "/sbin/sysctl".into(),
        }
    }
}

impl FreeBsdConfig {
    /// Checks rule numbers and sets.
    pub fn validate(&self) -> Result<(), DataPlaneError> {
        let bad = |m: String| Err(DataPlaneError::InvalidDesired(m));
        if self.rule_base == 0 || self.rule_base + plan::END_OFFSET > 65534 {
            return bad(format!(
                "rule_base {} leaves no room below ipfw's default rule 65535",
                self.rule_base
            ));
        }
        let sets = [
            self.owned_set,
            self.owned_staging_set,
            self.base_set,
            self.base_staging_set,
        ];
        for (i, s) in sets.iter().enumerate() {
            if *s > 30 {
                return bad(format!("ipfw set {s} is not in 0..=30"));
            }
            if sets[..i].contains(s) {
                return bad(format!("ipfw set {s} is used twice"));
            }
        }
        if self.srcjhash_map > 15 {
            return bad(format!(
                "srcjhash_map {} is not in 0..=15",
                self.srcjhash_map
            ));
        }
        if self.carp_vhid == 0 {
            return bad("carp_vhid must be in 1..=255".into());
        }
        Ok(())
    }
}

/// The FreeBSD backend: plans with [`plan`] and runs plans with one
/// [`Executor`].
pub struct FreeBsdDataPlane<E: Executor> {
    cfg: FreeBsdConfig,
    exec: E,
    installed: Option<Installed>,
}

impl<E: Executor> FreeBsdDataPlane<E> {
    pub fn new(cfg: FreeBsdConfig, exec: E) -> Self {
        FreeBsdDataPlane {
            cfg,
            exec,
            installed: None,
        }
    }

    pub fn config(&self) -> &FreeBsdConfig {
        &self.cfg
    }

    /// What the backend believes is installed (`None` until the first
    /// successful apply and after a failure).
    pub fn installed(&self) -> Option<&Installed> {
        self.installed.as_ref()
    }

    pub fn executor(&self) -> &E {
        &self.exec
    }

    /// Resolves the `Auto` settings from the kernel's sysctls, once.
    fn probe_kernel(&mut self) {
        let sysctl = self.cfg.sysctl.clone();
        if self.cfg.buckets == IpfwBuckets::Auto {
            let found = self.exec.probe_sysctl(&sysctl, plan::ENABLE_SYSCTL);
            self.cfg.buckets = if found.is_some() {
                IpfwBuckets::Srcjhash
            } else {
                IpfwBuckets::Masks
            };
        }
        if self.cfg.address == SharedAddress::Auto {
            let found = self.exec.probe_sysctl(&sysctl, plan::SHARED_ADDR_SYSCTL);
            self.cfg.address = if found.is_some() {
                SharedAddress::Flag
            } else {
                SharedAddress::CarpInit
            };
        }
    }

    fn run(&mut self, plan: &Plan, started: Instant) -> Result<(), DataPlaneError> {
        for step in &plan.steps {
            if let Err(e) = self.exec.execute(step, started) {
                // Unknown kernel state: the next apply rebuilds everything.
                self.installed = None;
                return Err(e);
            }
        }
        Ok(())
    }
}

impl<E: Executor> DataPlane for FreeBsdDataPlane<E> {
    fn apply(&mut self, desired: &Desired) -> Result<ApplyReport, DataPlaneError> {
        let started = Instant::now();
        self.probe_kernel();
        let plan = plan_apply(&self.cfg, self.installed.as_ref(), desired, started)?;
        self.run(&plan, started)?;
        let report = ApplyReport {
            backend: self.name(),
            changed: plan.changed,
            steps: plan.steps.len(),
            owned_rules: plan.next.owned_matches.len(),
            stop_after: plan.stop_after,
            lease_enforcement: if self.cfg.buckets == IpfwBuckets::Srcjhash {
                LeaseEnforcement::KernelTimeout
            } else {
                LeaseEnforcement::Watchdog
            },
        };
        self.installed = Some(plan.next);
        Ok(report)
    }

    fn withdraw(&mut self) -> Result<(), DataPlaneError> {
        let plan = plan_withdraw(&self.cfg, self.installed.as_ref());
        let known = self.installed.is_some();
        self.run(&plan, Instant::now())?;
        self.installed = known.then_some(plan.next);
        Ok(())
    }

    fn name(&self) -> &'static str {
        "freebsd-ipfw"
    }
}

//! Pure plan generation for the FreeBSD backend: from what is installed and
//! what is desired to the list of steps the executor runs.
//!
//! # Kernel layout (rule numbers relative to `rule_base`, R)
//! ```text
//! set base    R+0    skipto R+1000 tcp from any to VIPS in established
//!             R+10   the same for the IPv6 VIPS6
//!             R+11   skipto R+1000 ipv6-icmp from any to VIPS6 in icmp6types 135
//! set owned   R+100+i skipto R+1000 ip from V_i:M_i to VIPS in   (masks: one per mask)
//!                    ... ip from V_i/M_i to VIPS6 in            (and per IPv6 mask)
//!             R+100  skipto R+1000 ip from any to VIPS in srcjhash MAP buckets B
//!                    seed S affinity A                           (srcjhash kernels;
//!                                                                 again for VIPS6)
//! set base    R+900  deny ip from any to VIPS in
//!             R+910  deny ip from any to VIPS6 in
//!             R+1000 and up: the administrator's own rules
//! ```
//! Rules for a family without VIPs are left out (ipfw address lists hold
//! one family; see [`Family`]).
//! With the srcjhash option (kernel-patches/0003) the owned rules depend only
//! on the VIPs and the bucket function; which buckets are owned, and until
//! when, is one write of the lease map ([`Step::SetLease`]) per apply: the
//! kernel stops matching at the deadline by itself. `address_port` needs a
//! transport header, so it gets one rule for `tcp` and one for `udp`.
//! Established TCP (ACK or RST set) always goes on to the host's stack, which
//! answers it only when it holds the connection (segments of other hosts'
//! connections arrive in link-layer multicast frames, for which FreeBSD never
//! sends a RST). Every other packet to a VIP (a SYN, UDP, ICMP) is accepted
//! only from owned buckets and denied otherwise. vipshare's rules never
//! `allow`: they skip to R+1000, so the administrator's policy still applies.
//!
//! Each of the two sets is replaced atomically: the new rules are built in a
//! disabled staging set and exchanged with `ipfw set swap`. Withdrawing (and
//! the lease watchdog) is one atomic `ipfw set disable <owned>`, which leaves
//! the base set's deny in force.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use super::masks::{compress, Cube};
use super::{FreeBsdConfig, IpfwBuckets, SharedAddress};
use crate::dataplane::{Affinity, BucketFn, DataPlaneError, Desired, Mac, SwitchMode, VipConfig};

/// Offset of the owned-bucket rules from `rule_base`.
pub const OWNED_OFFSET: u32 = 100;
/// Offset of the final deny rule from `rule_base`.
pub const DENY_OFFSET: u32 = 900;
/// Offset of the skipto target (first rule after vipshare's block).
pub const END_OFFSET: u32 = 1000;
/// Most owned-mask rules that fit between `OWNED_OFFSET` and `DENY_OFFSET`.
pub const MAX_OWNED_RULES: usize = (DENY_OFFSET - OWNED_OFFSET) as usize;

/// One thing for the executor to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Run a command; unless `may_fail`, a non-zero exit fails the plan.
    Run { argv: Vec<String>, may_fail: bool },
    /// Join `group` on `interface` (keeps a socket open): IGMP on the
    /// interface holding the IPv4 `via`, MLD on `interface` by index (`via`
    /// is then the IPv6 VIP and only names the membership).
    JoinGroup {
        group: IpAddr,
        via: IpAddr,
        interface: String,
    },
    /// Leave `group` (closes that socket).
    LeaveGroup {
        group: IpAddr,
        via: IpAddr,
        interface: String,
    },
    /// Tell the watchdog to withdraw the owned rules `stop_after` from the
    /// start of this apply unless re-armed first.
    ArmWatchdog { stop_after: Duration },
    /// Nothing to withdraw any more.
    DisarmWatchdog,
    /// Add `addr/prefix_len` to `interface` with the shared-address flag
    /// (kernel-patches/0001; [`super::shared_addr`]).
    AddSharedAddress {
        interface: String,
        addr: Ipv4Addr,
        prefix_len: u8,
    },
    /// Add (`mac` given) or delete the proxy neighbour entry of the IPv6
    /// `addr` on `interface` ([`super::proxy_nd`]): neighbour solicitations
    /// arriving there are answered with `mac`. A failed delete is ignored.
    ProxyNd {
        interface: String,
        addr: Ipv6Addr,
        mac: Option<Mac>,
    },
    /// Write srcjhash lease map `map`: `buckets` owned until `stop_after` from
    /// the start of this apply (an absolute kernel-uptime deadline, so a late
    /// write does not extend it), every other bucket not owned.
    SetLease {
        sysctl: String,
        map: u8,
        stop_after: Duration,
        buckets: BTreeSet<u32>,
    },
}

/// `0-3,8,10-11`, or `-` for none: the bucket list of a lease map write.
pub fn bucket_ranges(buckets: &BTreeSet<u32>) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut it = buckets.iter().copied().peekable();
    while let Some(first) = it.next() {
        let mut last = first;
        while it.peek() == Some(&(last + 1)) {
            last += 1;
            it.next();
        }
        parts.push(if first == last {
            first.to_string()
        } else {
            format!("{first}-{last}")
        });
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(",")
    }
}

/// The sysctl assignment of a lease map write with an absolute deadline.
pub fn lease_assignment(map: u8, deadline_ns: u64, buckets: &BTreeSet<u32>) -> String {
    format!(
        "{LEASE_SYSCTL}={map} {deadline_ns} {}",
        bucket_ranges(buckets)
    )
}

/// The shared-address switch (kernel-patches/0001); its presence is how the
/// agent detects the flag.
pub const SHARED_ADDR_SYSCTL: &str = "net.inet.ip.shared_addr";
/// The kernel's lease map sysctl (kernel-patches/0003).
pub const LEASE_SYSCTL: &str = "net.inet.ip.fw.srcjhash_lease";
/// The kernel's srcjhash switch; its presence is how the agent detects the patch.
pub const ENABLE_SYSCTL: &str = "net.inet.ip.fw.srcjhash_enable";

impl Step {
    fn run<S: Into<String>>(argv: impl IntoIterator<Item = S>) -> Step {
        Step::Run {
            argv: argv.into_iter().map(Into::into).collect(),
            may_fail: false,
        }
    }

    fn run_may_fail<S: Into<String>>(argv: impl IntoIterator<Item = S>) -> Step {
        Step::Run {
            argv: argv.into_iter().map(Into::into).collect(),
            may_fail: true,
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Run { argv, may_fail } => {
                write!(
                    f,
                    "{} {}",
                    if *may_fail { "run?" } else { "run " },
                    argv.join(" ")
                )
            }
            Step::JoinGroup {
                group,
                via,
                interface,
            } => match group {
                IpAddr::V4(_) => write!(f, "igmp join {group} via {via} on {interface}"),
                IpAddr::V6(_) => write!(f, "mld join {group} on {interface}"),
            },
            Step::LeaveGroup {
                group,
                via,
                interface,
            } => match group {
                IpAddr::V4(_) => write!(f, "igmp leave {group} via {via} on {interface}"),
                IpAddr::V6(_) => write!(f, "mld leave {group} on {interface}"),
            },
            Step::ArmWatchdog { stop_after } => {
                write!(f, "watchdog arm {}ms", stop_after.as_millis())
            }
            Step::DisarmWatchdog => f.write_str("watchdog disarm"),
            Step::AddSharedAddress {
                interface,
                addr,
                prefix_len,
            } => write!(
                f,
                "ioctl SIOCAIFADDR {interface} inet {addr}/{prefix_len} shared"
            ),
            Step::ProxyNd {
                interface,
                addr,
                mac: Some(mac),
            } => write!(
                f,
                "netlink RTM_NEWNEIGH {interface} {addr} lladdr {mac} proxy"
            ),
            Step::ProxyNd {
                interface,
                addr,
                mac: None,
            } => write!(f, "netlink? RTM_DELNEIGH {interface} {addr}"),
            Step::SetLease {
                sysctl,
                map,
                stop_after,
                buckets,
            } => {
                let deadline = if stop_after.is_zero() {
                    "0".to_string()
                } else {
                    format!("<uptime at start + {}ms, in ns>", stop_after.as_millis())
                };
                write!(
                    f,
                    "run  {sysctl} {LEASE_SYSCTL}=\"{map} {deadline} {}\"",
                    bucket_ranges(buckets)
                )
            }
        }
    }
}

/// What the planner believes is in the kernel after a successful plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installed {
    /// VIPs configured (sorted by address).
    pub vips: Vec<VipConfig>,
    /// The owned rules' source matches: `ip from <match> to VIPS in`, e.g.
    /// `10.0.0.3:0.0.0.255` (masks) or `any ... srcjhash ...` (srcjhash).
    pub owned_matches: Vec<OwnedMatch>,
    /// Buckets in the srcjhash lease map (empty on the masks path).
    pub leased: BTreeSet<u32>,
    /// Whether the owned set is enabled (false after a withdraw).
    pub owned_enabled: bool,
}

/// A plan and the state it leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub next: Installed,
    /// Whether anything but the watchdog deadline changes.
    pub changed: bool,
    /// When the kernel stops accepting new flows (from the start of apply);
    /// `None` when nothing is accepted.
    pub stop_after: Option<Duration>,
}

impl Plan {
    /// One step per line, for logs and golden files.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for s in &self.steps {
            out.push_str(&s.to_string());
            out.push('\n');
        }
        out
    }
}

/// What differs between IPv4 and IPv6 VIPs, in one place. An ipfw address
/// list holds one family only (ipfw(8) parses the list by its first
/// address), so every rule naming VIPs exists once per family present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(addr: IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// Offset of this family's base rules from `rule_base` (and from
    /// `DENY_OFFSET`), so both families' rules keep distinct numbers.
    pub fn base_offset(self) -> u32 {
        match self {
            Family::V4 => 0,
            Family::V6 => 10,
        }
    }

    /// Base-set rules (protocol, options) that skip the bucket check. IPv6:
    /// neighbour solicitations sent to the VIP itself (unicast, for
    /// reachability) go to the stack on every host, which answers from the
    /// proxy entry; else only the owner of the client's bucket would.
    pub fn always_accept(self) -> &'static [(&'static str, &'static [&'static str])] {
        match self {
            Family::V4 => &[],
            Family::V6 => &[("ipv6-icmp", &["icmp6types", "135"])],
        }
    }

    /// Where core's low-bits key sits in the address: the number of bits
    /// below it (`BucketFn::Lowbits`: IPv4 `addr` or `addr >> 8`, IPv6 the low
    /// 32 bits or `addr >> 64`).
    pub fn lowbits_shift(self, affinity: Affinity) -> Result<u32, DataPlaneError> {
        match (self, affinity) {
            (_, Affinity::Address) => Ok(0),
            (Family::V4, Affinity::Network24) => Ok(8),
            (Family::V6, Affinity::Network24) => Ok(64),
            (_, Affinity::AddressPort) => Err(DataPlaneError::Unsupported(
                "address_port affinity cannot be expressed with ipfw masks".into(),
            )),
        }
    }

    /// ipfw's source match for `(value, mask)` over the whole address:
    /// `a.b.c.d:m.m.m.m`, or `x::y/m::m` (an IPv6 mask written as an address
    /// may be non-contiguous: sbin/ipfw/ipv6.c stores it as an addr/mask pair).
    pub fn src_match(self, (value, mask): (u128, u128)) -> String {
        if mask == 0 {
            return "any".to_string();
        }
        match self {
            Family::V4 => format!(
                "{}:{}",
                Ipv4Addr::from(value as u32),
                Ipv4Addr::from(mask as u32)
            ),
            Family::V6 => format!("{}/{}", Ipv6Addr::from(value), Ipv6Addr::from(mask)),
        }
    }

    /// The multicast group whose Ethernet mapping is `mac`: joining it opens
    /// the NIC's filter (and snooping switches) to the VIP's frames.
    pub fn mac_group(self, mac: Mac) -> Option<IpAddr> {
        match self {
            Family::V4 => mac.igmp_group().map(IpAddr::V4),
            Family::V6 => mac.mld_group().map(IpAddr::V6),
        }
    }

    /// Every group `vip`'s host must receive on its interface: the MAC's, and
    /// for IPv6 the VIP's solicited-node group, which the kernel joins on lo0
    /// only (where the VIP is held), while solicitations arrive on the
    /// interface.
    pub fn groups(self, vip: &VipConfig) -> Vec<IpAddr> {
        let mut groups: Vec<IpAddr> = self.mac_group(vip.mac).into_iter().collect();
        if let IpAddr::V6(addr) = vip.addr {
            let low = u128::from(addr) & 0xff_ffff;
            groups.push(IpAddr::V6(Ipv6Addr::from(
                0xff02_0000_0000_0000_0000_0001_ff00_0000_u128 | low,
            )));
        }
        groups
    }

    /// The MACs [`Family::mac_group`] accepts, for error messages.
    fn mac_range(self) -> &'static str {
        match self {
            Family::V4 => "01:00:5e:00:00:00-01:00:5e:7f:ff:ff",
            Family::V6 => "33:33:00:00:00:00-33:33:ff:ff:ff:ff",
        }
    }
}

/// The families of `vips`, in [`Family::ALL`] order.
fn families(vips: &[VipConfig]) -> Vec<Family> {
    Family::ALL
        .into_iter()
        .filter(|f| vips.iter().any(|v| Family::of(v.addr) == *f))
        .collect()
}

/// One owned rule's match: protocol, source, and the options after `in`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedMatch {
    /// Which family's VIPs the rule names.
    pub family: Family,
    pub proto: &'static str,
    pub src: String,
    pub options: Vec<String>,
    /// Skip to the deny rule instead of past vipshare's block.
    pub to_deny: bool,
}

/// The srcjhash rule options for `desired`'s bucket function (kernel-patches/0003,
/// whose match hashes the 16-byte IPv6 source like `jhash ip6 saddr`).
fn srcjhash_matches(cfg: &FreeBsdConfig, desired: &Desired, family: Family) -> Vec<OwnedMatch> {
    let rule = |proto, affinity: Affinity| OwnedMatch {
        family,
        proto,
        src: "any".into(),
        options: vec![
            "srcjhash".to_string(),
            cfg.srcjhash_map.to_string(),
            "buckets".into(),
            desired.bucket_count.to_string(),
            "seed".into(),
            format!("{:#010x}", desired.seed),
            "affinity".into(),
            affinity.to_string(),
        ],
        to_deny: false,
    };
    match desired.affinity {
        // As the Linux rules: TCP and UDP by address and port, anything else
        // (ICMP) by address alone; unowned TCP/UDP must not reach that rule.
        Affinity::AddressPort => vec![
            rule("tcp", Affinity::AddressPort),
            rule("udp", Affinity::AddressPort),
            OwnedMatch {
                family,
                proto: "{ tcp or udp }",
                src: "any".into(),
                options: Vec::new(),
                to_deny: true,
            },
            rule("ip", Affinity::Address),
        ],
        Affinity::Address | Affinity::Network24 => vec![rule("ip", desired.affinity)],
    }
}

/// The owned rules' matches for each family of `desired`'s VIPs: on a
/// srcjhash kernel one rule computing the bucket (the lease map says which
/// are owned); otherwise address/mask matches that accept exactly the owned
/// low-bits buckets. Without VIPs, only checks that the rules could be made.
pub fn owned_matches(
    cfg: &FreeBsdConfig,
    desired: &Desired,
) -> Result<Vec<OwnedMatch>, DataPlaneError> {
    let present = families(&desired.vips);
    let checked = if present.is_empty() {
        vec![Family::V4]
    } else {
        present.clone()
    };
    let mut out = Vec::new();
    for family in checked {
        if cfg.buckets == IpfwBuckets::Srcjhash {
            if desired.bucket_fn != BucketFn::Jhash {
                return Err(DataPlaneError::Unsupported(
                    "this kernel has ipfw's srcjhash option, which computes jhash buckets; \
                     configure the jhash bucket function (or set the FreeBSD backend to masks)"
                        .into(),
                ));
            }
            out.extend(srcjhash_matches(cfg, desired, family));
        } else {
            out.extend(masks(desired, family)?.into_iter().map(|vm| OwnedMatch {
                family,
                proto: "ip",
                src: family.src_match(vm),
                options: Vec::new(),
                to_deny: false,
            }));
        }
    }
    if out.len() > MAX_OWNED_RULES {
        return Err(DataPlaneError::Unsupported(format!(
            "the owned buckets need {} ipfw rules over both address families, more than \
             the {MAX_OWNED_RULES} vipshare reserves; assign buckets in aligned blocks",
            out.len()
        )));
    }
    Ok(if present.is_empty() { Vec::new() } else { out })
}

/// The `(value, mask)` source matches over the whole `family` address (IPv4
/// in the low 32 bits) that accept exactly the owned low-bits buckets.
pub fn masks(desired: &Desired, family: Family) -> Result<Vec<(u128, u128)>, DataPlaneError> {
    if desired.bucket_fn == BucketFn::Jhash {
        return Err(DataPlaneError::Unsupported(
            "stock ipfw cannot compute jhash buckets: use the lowbits bucket function, or a \
             kernel with kernel-patches/0003 (ipfw srcjhash)"
                .into(),
        ));
    }
    let shift = family.lowbits_shift(desired.affinity)?;
    let cubes: Vec<Cube> = compress(&desired.owned, desired.bucket_count);
    if cubes.len() > MAX_OWNED_RULES {
        return Err(DataPlaneError::Unsupported(format!(
            "the owned buckets need {} ipfw mask rules, more than the {MAX_OWNED_RULES} \
             vipshare reserves; assign buckets in aligned blocks",
            cubes.len()
        )));
    }
    Ok(cubes
        .into_iter()
        .map(|c| (u128::from(c.value) << shift, u128::from(c.mask) << shift))
        .collect())
}

fn ipfw(cfg: &FreeBsdConfig, args: &[String]) -> Vec<String> {
    let mut v = vec![cfg.ipfw.clone(), "-q".to_string()];
    v.extend(args.iter().cloned());
    v
}

/// The comma-separated addresses of `family`'s VIPs.
fn vip_list(vips: &[VipConfig], family: Family) -> String {
    let parts: Vec<String> = vips
        .iter()
        .filter(|v| Family::of(v.addr) == family)
        .map(|v| v.addr.to_string())
        .collect();
    parts.join(",")
}

/// `ipfw -q add N set S <action...> <matched...>`.
fn add_rule(
    cfg: &FreeBsdConfig,
    number: u32,
    set: &str,
    action: &[&str],
    matched: &[String],
) -> Step {
    let mut args: Vec<String> = vec!["add".into(), number.to_string(), "set".into(), set.into()];
    args.extend(action.iter().map(|a| a.to_string()));
    args.extend(matched.iter().cloned());
    Step::run(ipfw(cfg, &args))
}

/// `<proto> from <src> to <to> in <options...>`.
fn inbound(proto: &str, src: &str, to: &str, options: &[&str]) -> Vec<String> {
    let mut words: Vec<String> = [proto, "from", src, "to", to, "in"]
        .map(String::from)
        .to_vec();
    words.extend(options.iter().map(|o| o.to_string()));
    words
}

/// Steps that replace the base set with rules for `vips`.
fn base_swap(cfg: &FreeBsdConfig, vips: &[VipConfig]) -> Vec<Step> {
    let r = cfg.rule_base;
    let stage = cfg.base_staging_set.to_string();
    let end = (r + END_OFFSET).to_string();
    let skip: &[&str] = &["skipto", &end];
    let mut steps = vec![Step::run_may_fail(ipfw(
        cfg,
        &["delete".into(), "set".into(), stage.clone()],
    ))];
    for family in families(vips) {
        let to = vip_list(vips, family);
        let first = r + family.base_offset();
        let established = inbound("tcp", "any", &to, &["established"]);
        steps.push(add_rule(cfg, first, &stage, skip, &established));
        for (i, (proto, options)) in family.always_accept().iter().enumerate() {
            let n = first + 1 + i as u32;
            let matched = inbound(proto, "any", &to, options);
            steps.push(add_rule(cfg, n, &stage, skip, &matched));
        }
    }
    for family in families(vips) {
        let to = vip_list(vips, family);
        let n = r + DENY_OFFSET + family.base_offset();
        steps.push(add_rule(
            cfg,
            n,
            &stage,
            &["deny"],
            &inbound("ip", "any", &to, &[]),
        ));
    }
    steps.push(Step::run(ipfw(
        cfg,
        &[
            "set".into(),
            "swap".into(),
            stage.clone(),
            cfg.base_set.to_string(),
        ],
    )));
    steps.push(Step::run_may_fail(ipfw(
        cfg,
        &["delete".into(), "set".into(), stage],
    )));
    steps
}

/// Steps that replace the owned set with `matches` for `vips` and enable it.
fn owned_swap(cfg: &FreeBsdConfig, vips: &[VipConfig], matches: &[OwnedMatch]) -> Vec<Step> {
    let r = cfg.rule_base;
    let stage = cfg.owned_staging_set.to_string();
    let mut steps = vec![Step::run_may_fail(ipfw(
        cfg,
        &["delete".into(), "set".into(), stage.clone()],
    ))];
    let end = (r + END_OFFSET).to_string();
    let deny = (r + DENY_OFFSET).to_string();
    for (i, m) in matches.iter().enumerate() {
        let to = vip_list(vips, m.family);
        if to.is_empty() {
            continue;
        }
        let target = if m.to_deny { &deny } else { &end };
        let n = r + OWNED_OFFSET + i as u32;
        let options: Vec<&str> = m.options.iter().map(String::as_str).collect();
        let matched = inbound(m.proto, &m.src, &to, &options);
        steps.push(add_rule(cfg, n, &stage, &["skipto", target], &matched));
    }
    steps.push(Step::run(ipfw(
        cfg,
        &[
            "set".into(),
            "swap".into(),
            stage.clone(),
            cfg.owned_set.to_string(),
        ],
    )));
    steps.push(Step::run(ipfw(
        cfg,
        &["set".into(), "enable".into(), cfg.owned_set.to_string()],
    )));
    steps.push(Step::run_may_fail(ipfw(
        cfg,
        &["delete".into(), "set".into(), stage],
    )));
    steps
}

/// Steps that configure `vip`: the address kept out of conflict defence, its
/// link-layer answer published with the cluster MAC, and the groups it needs
/// joined.
fn add_vip(cfg: &FreeBsdConfig, vip: &VipConfig) -> Vec<Step> {
    let family = Family::of(vip.addr);
    let addr = vip.addr.to_string();
    let mac = vip.mac.to_string();
    let mut steps = match vip.addr {
        IpAddr::V4(v4) if cfg.address == SharedAddress::Flag => vec![
            Step::AddSharedAddress {
                interface: vip.interface.clone(),
                addr: v4,
                prefix_len: vip.prefix_len,
            },
            Step::run([cfg.arp.as_str(), "-S", &addr, &mac, "pub"]),
        ],
        IpAddr::V4(_) => {
            let mut steps = carp_init_vip(cfg, vip);
            steps.push(Step::run([cfg.arp.as_str(), "-S", &addr, &mac, "pub"]));
            steps
        }
        // As Linux: the VIP on the loopback interface as a /128, which is
        // local (ip6_input accepts it from any interface), gets no DAD
        // (in6if_do_dad() skips loopback) and no entry in IF's lltable (an
        // address on IF gets an LLE_IFADDR entry, which RTM_NEWNEIGH refuses
        // to replace with the proxy entry).
        IpAddr::V6(v6) => vec![
            Step::run([
                cfg.ifconfig.as_str(),
                &cfg.loopback,
                "inet6",
                &format!("{addr}/128"),
                "alias",
            ]),
            Step::ProxyNd {
                interface: vip.interface.clone(),
                addr: v6,
                mac: Some(vip.mac),
            },
        ],
    };
    for group in family.groups(vip) {
        steps.push(Step::JoinGroup {
            group,
            via: vip.addr,
            interface: vip.interface.clone(),
        });
    }
    steps
}

fn carp_init_vip(cfg: &FreeBsdConfig, vip: &VipConfig) -> Vec<Step> {
    let vhid = cfg.carp_vhid.to_string();
    vec![
        // Creates the vhid if needed; CARP stays in INIT (net.inet.carp.allow=0),
        // which keeps the address out of conflict defence and gratuitous ARP.
        Step::run([
            cfg.ifconfig.as_str(),
            &vip.interface,
            "vhid",
            &vhid,
            "advskew",
            "254",
        ]),
        Step::run([
            cfg.ifconfig.as_str(),
            &vip.interface,
            "inet",
            &format!("{}/{}", vip.addr, vip.prefix_len),
            "alias",
            "vhid",
            &vhid,
        ]),
    ]
}

fn remove_vip(cfg: &FreeBsdConfig, vip: &VipConfig) -> Vec<Step> {
    let family = Family::of(vip.addr);
    let addr = vip.addr.to_string();
    let mut steps: Vec<Step> = family
        .groups(vip)
        .into_iter()
        .map(|group| Step::LeaveGroup {
            group,
            via: vip.addr,
            interface: vip.interface.clone(),
        })
        .collect();
    match vip.addr {
        IpAddr::V4(_) => {
            steps.push(Step::run_may_fail([cfg.arp.as_str(), "-d", &addr]));
            steps.push(Step::run([
                cfg.ifconfig.as_str(),
                &vip.interface,
                "inet",
                &addr,
                "-alias",
            ]));
        }
        IpAddr::V6(v6) => {
            steps.push(Step::ProxyNd {
                interface: vip.interface.clone(),
                addr: v6,
                mac: None,
            });
            steps.push(Step::run([
                cfg.ifconfig.as_str(),
                &cfg.loopback,
                "inet6",
                &addr,
                "-alias",
            ]));
        }
    }
    steps
}

/// Steps run once per agent start (or after a failed apply): kernel settings
/// vipshare relies on, staging sets disabled and empty.
fn initialize(cfg: &FreeBsdConfig) -> Vec<Step> {
    let mut steps = vec![
        if cfg.address == SharedAddress::Flag {
            Step::run([cfg.sysctl.as_str(), &format!("{SHARED_ADDR_SYSCTL}=1")])
        } else {
            Step::run([cfg.sysctl.as_str(), "net.inet.carp.allow=0"])
        },
        // 1: SYNs in multicast frames to shared (flag) IPv4 addresses and IPv6
        // addresses on lo0 (the IPv6 VIPs); the CARP-INIT recipe needs a
        // kernel with 0002 too and uses 2 (any local address).
        Step::run([
            cfg.sysctl.as_str(),
            if cfg.address == SharedAddress::Flag {
                "net.inet.tcp.accept_l2mcast=1"
            } else {
                "net.inet.tcp.accept_l2mcast=2"
            },
        ]),
    ];
    if cfg.buckets == IpfwBuckets::Srcjhash {
        steps.push(Step::run([
            cfg.sysctl.as_str(),
            &format!("{ENABLE_SYSCTL}=1"),
        ]));
    }
    for set in [cfg.owned_staging_set, cfg.base_staging_set] {
        steps.push(Step::run(ipfw(
            cfg,
            &["set".into(), "disable".into(), set.to_string()],
        )));
    }
    steps
}

/// Plans an apply. `installed` is `None` on start-up and after a failure: the
/// plan then rebuilds everything (each step is idempotent).
pub fn plan_apply(
    cfg: &FreeBsdConfig,
    installed: Option<&Installed>,
    desired: &Desired,
    now: Instant,
) -> Result<Plan, DataPlaneError> {
    desired.validate()?;
    cfg.validate()?;
    for vip in &desired.vips {
        // No router advertiser or receive-only device here yet (the agent
        // reports such VIPs unserved and never hands them over).
        if vip.mode != SwitchMode::Multicast {
            return Err(DataPlaneError::Unsupported(format!(
                "VIP {}: switch mode {} is not planned for FreeBSD yet",
                vip.addr, vip.mode
            )));
        }
        let family = Family::of(vip.addr);
        if family.mac_group(vip.mac).is_none() {
            return Err(DataPlaneError::Unsupported(format!(
                "VIP {}: MAC {} has no {} multicast group mapping to it, so FreeBSD \
                 cannot be told to receive it; use a MAC in {}",
                vip.addr,
                vip.mac,
                if family == Family::V4 { "IPv4" } else { "IPv6" },
                family.mac_range()
            )));
        }
    }
    let mut vips = desired.vips.clone();
    vips.sort();
    let stop_after = desired.lease_left(now).saturating_sub(cfg.stop_margin);
    let accepting = !stop_after.is_zero() && !vips.is_empty() && !desired.owned.is_empty();
    // The srcjhash rules stay while VIPs exist: the lease map decides.
    let kernel_lease = cfg.buckets == IpfwBuckets::Srcjhash;
    let matches = if accepting || (kernel_lease && !vips.is_empty()) {
        owned_matches(cfg, desired)?
    } else {
        // Still reject what cannot be expressed, so a config error shows at once.
        owned_matches(cfg, desired)?;
        Vec::new()
    };

    let fresh = installed.is_none();
    let empty = Installed::default();
    let old = installed.unwrap_or(&empty);
    let leased: BTreeSet<u32> = if accepting && kernel_lease {
        desired.owned.clone()
    } else {
        BTreeSet::new()
    };
    let mut steps = Vec::new();
    if fresh {
        steps.extend(initialize(cfg));
    }
    if accepting && !kernel_lease {
        // First, so the deadline covers everything the plan installs.
        steps.push(Step::ArmWatchdog { stop_after });
    }
    if kernel_lease && (accepting || fresh || !old.leased.is_empty()) {
        // Before the rules: a new rule finds the map already written. Every
        // apply renews (a fresh deadline); losing the lease clears the map.
        steps.push(Step::SetLease {
            sysctl: cfg.sysctl.clone(),
            map: cfg.srcjhash_map,
            stop_after: if accepting {
                stop_after
            } else {
                Duration::ZERO
            },
            buckets: leased.clone(),
        });
    }

    let old_addrs: BTreeSet<IpAddr> = old.vips.iter().map(|v| v.addr).collect();
    let new_addrs: BTreeSet<IpAddr> = vips.iter().map(|v| v.addr).collect();
    let added: Vec<&VipConfig> = vips
        .iter()
        .filter(|v| !old_addrs.contains(&v.addr))
        .collect();
    let removed: Vec<&VipConfig> = old
        .vips
        .iter()
        .filter(|v| !new_addrs.contains(&v.addr))
        .collect();
    // Same address, other interface/MAC/prefix: reconfigured in place.
    let modified: Vec<(&VipConfig, &VipConfig)> = old
        .vips
        .iter()
        .filter_map(|o| {
            vips.iter()
                .find(|n| n.addr == o.addr && *n != o)
                .map(|n| (o, n))
        })
        .collect();
    let mut union: Vec<VipConfig> = vips.clone();
    union.extend(removed.iter().map(|v| (*v).clone()));
    union.sort();

    // Deny for new VIPs before they exist, so no window accepts everything.
    if fresh || !added.is_empty() {
        steps.extend(base_swap(cfg, &union));
    }
    for (o, n) in &modified {
        steps.extend(remove_vip(cfg, o));
        steps.extend(add_vip(cfg, n));
    }
    for vip in &added {
        steps.extend(add_vip(cfg, vip));
    }
    let swap_owned = fresh || old.vips != vips || old.owned_matches != matches;
    if swap_owned {
        steps.extend(owned_swap(cfg, &vips, &matches));
    }
    for vip in &removed {
        steps.extend(remove_vip(cfg, vip));
    }
    if !removed.is_empty() {
        steps.extend(base_swap(cfg, &vips));
    }
    let changed = old.leased != leased
        || steps.iter().any(|s| {
            !matches!(
                s,
                Step::ArmWatchdog { .. } | Step::DisarmWatchdog | Step::SetLease { .. }
            )
        });
    if accepting && !swap_owned && !kernel_lease {
        // Renewal: the watchdog may have disabled the owned set when an earlier
        // lease ran out; this lease is fresh, so switch it back on (a no-op
        // otherwise). Comes after the arm, so the new deadline covers it.
        steps.push(Step::run(ipfw(
            cfg,
            &["set".into(), "enable".into(), cfg.owned_set.to_string()],
        )));
    }
    let had_ownership = old.owned_enabled && !old.owned_matches.is_empty();
    if !accepting && !kernel_lease && (fresh || had_ownership) {
        steps.push(Step::DisarmWatchdog);
    }
    Ok(Plan {
        steps,
        next: Installed {
            vips,
            owned_matches: matches,
            leased,
            owned_enabled: swap_owned || old.owned_enabled || accepting,
        },
        changed,
        stop_after: accepting.then_some(stop_after),
    })
}

/// The command that withdraws all ownership at once: disabling the owned set
/// (one atomic sockopt). Also what the watchdog runs when the lease expires.
pub fn withdraw_argv(cfg: &FreeBsdConfig) -> Vec<String> {
    ipfw(
        cfg,
        &["set".into(), "disable".into(), cfg.owned_set.to_string()],
    )
}

/// Plans a withdraw: stop accepting new flows now, keep VIPs and the deny.
pub fn plan_withdraw(cfg: &FreeBsdConfig, installed: Option<&Installed>) -> Plan {
    if cfg.buckets == IpfwBuckets::Srcjhash {
        // Emptying the lease map withdraws at once; the rules stay.
        let steps = vec![Step::SetLease {
            sysctl: cfg.sysctl.clone(),
            map: cfg.srcjhash_map,
            stop_after: Duration::ZERO,
            buckets: BTreeSet::new(),
        }];
        let next = installed.map_or_else(Installed::default, |i| Installed {
            leased: BTreeSet::new(),
            ..i.clone()
        });
        return Plan {
            steps,
            next,
            changed: true,
            stop_after: None,
        };
    }
    let mut steps = vec![
        Step::Run {
            argv: withdraw_argv(cfg),
            may_fail: false,
        },
        Step::run_may_fail(ipfw(
            cfg,
            &["delete".into(), "set".into(), cfg.owned_set.to_string()],
        )),
        Step::DisarmWatchdog,
    ];
    if installed.is_none() {
        // Nothing known to be installed; still make sure nothing is accepted.
        steps.truncate(1);
        steps.push(Step::DisarmWatchdog);
    }
    let vips = installed.map(|i| i.vips.clone()).unwrap_or_default();
    Plan {
        steps,
        next: Installed {
            vips,
            owned_matches: Vec::new(),
            leased: BTreeSet::new(),
            owned_enabled: false,
        },
        changed: true,
        stop_after: None,
    }
}

//! Pure plan generation for the Linux backend: from what is installed and what
//! is desired to the list of steps the executor runs.
//!
//! # Kernel layout (table `vipshare` in the `ip`, `ip6`, `arp` and `netdev` families)
//! ```text
//! table ip vipshare
//!   counter vip_A_B_C_D_{accepted,not_owned,invalid,reset}   per VIP
//!   set owned { type mark; flags timeout }   (lowbits: type ipv4_addr)
//!   set dead { type mark; flags timeout }    owned buckets whose old owner is dead
//!   chain prerouting (raw)   ip daddr {VIPs} meta pkttype multicast meta pkttype set host
//!   chain input (filter)     ip daddr VIP jump vip_A_B_C_D     per VIP
//!   chain vip_A_B_C_D        meta l4proto != udp ct state established,related accept
//!                            <key>                         (jhash: meta mark set jhash ..)
//!                            ct state invalid <key> @dead reject with tcp reset
//!                            ct state invalid drop
//!                            tcp flags & (fin|syn|rst|ack) != syn drop
//!                            jump lease
//!                            <key> @owned accept
//!                            drop
//!   chain lease              meta time >= DEADLINE drop    (wall clock, ns; see deadline.rs)
//! table ip6 vipshare         the same for the IPv6 VIPs (`ip6 daddr`, `jhash ip6 saddr`,
//!                            its own owned and dead sets), plus in each VIP chain, after
//!                            the established accept: icmpv6 type nd-neighbor-solicit accept
//!                            (only the families with a VIP have a filter table)
//! table arp vipshare         output: arp saddr ip VIP arp saddr ether set MAC
//! table netdev vipshare      egress on each VIP interface: the same rewrite, for ARP
//!                            sent from user space
//! ```
//! The owned set's elements carry the lease as their `timeout`: the kernel stops
//! accepting new flows when the lease runs out even if the agent is frozen or dead.
//! A renewal is one transaction `flush set` + `add element`; any other change
//! rebuilds the contents of all three tables in one transaction that keeps the
//! tables and their base chains (see [`super`] for why a replaced base chain is
//! unsafe), so packets see the old or the new ruleset, never a mix. Counters
//! that stay keep counting across rebuilds.
//!
//! UDP has no connection to keep: every datagram, established or not, is
//! accepted only from an owned bucket, so a moved flow is delivered by the new
//! owner alone (the old owner's conntrack entry no longer lets it through).
//!
//! # Order of steps
//! VIP addresses leave before the rules that filter them, and arrive after: a VIP
//! without its filter would accept every new flow. `arp_announce` is set before a
//! VIP is added; `nf_conntrack_tcp_loose` after the first rebuild (the `ct`
//! expressions load conntrack, which creates the sysctl).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use vipshare_core::bucket::{nft_hash_expr, IpFamily};

use super::LinuxConfig;
use crate::dataplane::{Affinity, BucketFn, DataPlaneError, Desired, Mac, SwitchMode, VipConfig};

/// The verdicts counted per VIP, in the order of the counter names.
pub const VERDICTS: [&str; 4] = ["accepted", "not_owned", "invalid", "reset"];

/// One step for the executor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// One nftables transaction (`nft -f -`).
    Nft(NftBatch),
    /// Write a sysctl (path below /proc/sys, dotted), remembering the value it
    /// replaces so [`Step::RestoreSysctls`] can put it back.
    Sysctl {
        key: String,
        value: String,
    },
    /// Put back every sysctl value this agent replaced.
    RestoreSysctls,
    /// Add the VIP as an address: an IPv4 VIP on its interface (after the
    /// host's own address), an IPv6 VIP as a /128 on loopback without DAD
    /// (see [`super`] for why).
    AddAddress(VipConfig),
    DelAddress(VipConfig),
    /// `ip maddr add MAC dev IF`: receive frames to the MAC on filtering NICs.
    AddMaddr {
        interface: String,
        mac: Mac,
    },
    DelMaddr {
        interface: String,
        mac: Mac,
    },
    /// Membership of the group that maps to the MAC (a socket held by the
    /// executor), for switches snooping by MAC: IGMP of the 239/8 group for
    /// IPv4, MLD of the `ff05::` group for IPv6 (see [`Mac::mld_group`]).
    JoinGroup {
        interface: String,
        group: IpAddr,
    },
    LeaveGroup {
        interface: String,
        group: IpAddr,
    },
    /// Send RFC 4286 Multicast Router Advertisements on `interface` to the
    /// all-snoopers group `to` (224.0.0.106: IGMP type 0x30; ff02::6a: ICMPv6
    /// type 151 behind a router-alert hop-by-hop option), three at start and
    /// then every [`MRD_INTERVAL`] (the executor's sender thread): a switch
    /// snooping by IP destination then makes the port a multicast router
    /// port and forwards there the VIP's frames, whose unicast IP
    /// destination matches no group ([`SwitchMode::Igmp`]).
    AdvertiseRouter {
        interface: String,
        to: IpAddr,
    },
    StopAdvertising {
        interface: String,
        to: IpAddr,
    },
    /// The receive-only device of [`SwitchMode::Unicast`]: a macvlan on
    /// `interface` carrying the shared unicast `mac`, so the NIC passes frames
    /// to that MAC up as `PACKET_HOST` (as frames for another host they are
    /// dropped before netfilter). It must never send a frame (a switch would
    /// learn the MAC and stop flooding it): no address but an IPv4 VIP, `arp off`,
    /// `multicast off`, IPv6 on (ipv6_rcv drops packets of a device without
    /// it) but with no address generated (no link-local, so no DAD, router
    /// solicitation or MLD), and an nftables egress chain dropping whatever
    /// would leave anyway. An IPv4 VIP sits on the device as a /32 (see
    /// [`address_holder`] for why), with loose reverse-path filtering:
    /// replies leave by `interface`, not by the device. An IPv6 VIP stays on
    /// `lo`. The bucket filter matches the destination address whatever the
    /// input device, so it applies unchanged; ARP for an IPv4 VIP is still
    /// answered on `interface` (any local address, `arp_ignore` 0) and
    /// rewritten to the shared MAC like the multicast one.
    AddRecvDevice {
        interface: String,
        device: String,
        mac: Mac,
    },
    DelRecvDevice {
        device: String,
    },
    /// Answer neighbour solicitations for the IPv6 `addr` on `interface` with
    /// `mac` (the executor's responder, which joins the solicited-node group
    /// and sends an unsolicited advertisement when it starts answering).
    AnswerNd {
        interface: String,
        addr: Ipv6Addr,
        mac: Mac,
    },
    StopNd {
        interface: String,
        addr: Ipv6Addr,
    },
}

/// An nftables transaction. `fixed` is rendered as is; `elements`, when set,
/// adds the owned (and reset) buckets with the time left on the lease at the
/// moment the batch is rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftBatch {
    pub fixed: String,
    pub elements: Option<Elements>,
}

/// Set elements written with a timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Elements {
    pub table: String,
    /// The filter families written, each with its key (one set pair per family).
    pub keys: Vec<(Family, KeyKind)>,
    pub owned: Vec<u32>,
    pub reset: Vec<u32>,
    /// Lease left at the start of the apply (the executor's `started`).
    pub until: Duration,
}

/// How a bucket number is written as a set element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// `type mark`: the bucket number itself (jhash).
    Mark,
    /// `type ipv4_addr`: the bucket's bits in place, `shift` bits up (lowbits).
    Ipv4 { shift: u32 },
    /// `type ipv6_addr`, likewise.
    Ipv6 { shift: u32 },
}

impl KeyKind {
    fn element(self, bucket: u32) -> String {
        match self {
            KeyKind::Mark => bucket.to_string(),
            KeyKind::Ipv4 { shift } => Ipv4Addr::from(bucket << shift).to_string(),
            KeyKind::Ipv6 { shift } => Ipv6Addr::from(u128::from(bucket) << shift).to_string(),
        }
    }
}

impl NftBatch {
    /// The script as it would be sent `elapsed` after the start of the apply:
    /// element timeouts are the lease left then, rounded down to milliseconds.
    /// Elements whose lease has run out are not written at all.
    pub fn render(&self, elapsed: Duration) -> String {
        let mut s = self.fixed.clone();
        if let Some(e) = &self.elements {
            let left = e.until.saturating_sub(elapsed).as_millis();
            if left > 0 {
                for (family, key) in &e.keys {
                    for (set, buckets) in [("owned", &e.owned), ("dead", &e.reset)] {
                        if buckets.is_empty() {
                            continue;
                        }
                        let items: Vec<String> = buckets
                            .iter()
                            .map(|&b| format!("{} timeout {left}ms", key.element(b)))
                            .collect();
                        let _ = writeln!(
                            s,
                            "add element {} {} {set} {{ {} }}",
                            family.nft,
                            e.table,
                            items.join(", ")
                        );
                    }
                }
            }
        }
        s
    }

    /// Whether the batch writes any element when rendered `elapsed` after start.
    pub fn writes_elements(&self, elapsed: Duration) -> bool {
        self.elements
            .as_ref()
            .is_some_and(|e| !e.owned.is_empty() && e.until.saturating_sub(elapsed).as_millis() > 0)
    }
}

/// Everything of the kernel state except the owned elements and their timeouts:
/// when this is unchanged, an apply only rewrites the elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    pub vips: Vec<VipConfig>,
    pub bucket_count: u32,
    pub bucket_fn: BucketFn,
    pub affinity: Affinity,
    pub seed: u32,
}

impl Base {
    /// The filter families with VIPs, IPv4 first; IPv4 alone when there is
    /// no VIP (the layout before IPv6).
    pub fn families(&self) -> Vec<Family> {
        let f: Vec<Family> = Family::ALL
            .into_iter()
            .filter(|f| self.vips.iter().any(|v| Family::of(v.addr) == *f))
            .collect();
        if f.is_empty() {
            vec![Family::V4]
        } else {
            f
        }
    }

    fn of(desired: &Desired) -> Self {
        let mut vips = desired.vips.clone();
        vips.sort();
        Base {
            vips,
            bucket_count: desired.bucket_count,
            bucket_fn: desired.bucket_fn,
            affinity: desired.affinity,
            seed: desired.seed,
        }
    }

    fn interfaces(&self) -> BTreeSet<&str> {
        self.vips.iter().map(|v| v.interface.as_str()).collect()
    }
}

/// What the backend believes the kernel holds after a successful plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub base: Base,
    /// Buckets last written to the owned set (their timeouts may have run out).
    pub owned: BTreeSet<u32>,
    pub reset: BTreeSet<u32>,
}

/// A plan: the steps, and what is installed once they all succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// What is installed after the plan (`None` after a teardown).
    pub next: Option<Installed>,
    /// Whether anything besides the owned elements changes.
    pub changed: bool,
    /// When (from the start of the apply) the kernel stops accepting new flows.
    pub stop_after: Option<Duration>,
}

impl Plan {
    /// One line per step (multi-line nft batches indented), as the golden
    /// files show them; element timeouts rendered as at the start of the apply.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for step in &self.steps {
            let _ = writeln!(s, "{step}");
        }
        s
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Nft(b) => {
                write!(f, "nft -f - <<")?;
                for line in b.render(Duration::ZERO).lines() {
                    write!(f, "\n    {line}")?;
                }
                if let Some(e) = &b.elements {
                    for (family, _) in &e.keys {
                        write!(
                            f,
                            "\nnetlink: flush chain {} {} {chain}; add rule meta time >= start+{}ms drop",
                            family.nft,
                            e.table,
                            e.until.as_millis(),
                            chain = super::deadline::CHAIN,
                        )?;
                    }
                }
                Ok(())
            }
            Step::Sysctl { key, value } => write!(f, "sysctl {key}={value}"),
            Step::RestoreSysctls => write!(f, "sysctl restore"),
            Step::AddAddress(v) => {
                let (dev, prefix, flags) = address_holder(v);
                let opt = if flags.is_empty() { "" } else { " " };
                let fam = Family::of(v.addr).ip_flag;
                write!(
                    f,
                    "ip {fam} addr add {}/{prefix} dev {dev}{opt}{flags}",
                    v.addr
                )
            }
            Step::DelAddress(v) => {
                let (dev, prefix, _) = address_holder(v);
                let fam = Family::of(v.addr).ip_flag;
                write!(f, "ip {fam} addr del {}/{prefix} dev {dev}", v.addr)
            }
            Step::AddMaddr { interface, mac } => {
                write!(f, "ip maddr add {mac} dev {interface}")
            }
            Step::DelMaddr { interface, mac } => {
                write!(f, "ip maddr del {mac} dev {interface}")
            }
            Step::JoinGroup { interface, group } => {
                write!(f, "{} join {group} on {interface}", group_protocol(*group))
            }
            Step::LeaveGroup { interface, group } => {
                write!(f, "{} leave {group} on {interface}", group_protocol(*group))
            }
            Step::AdvertiseRouter { interface, to } => write!(
                f,
                "mrd advertise to {to} on {interface} every {}s",
                MRD_INTERVAL.as_secs()
            ),
            Step::StopAdvertising { interface, to } => {
                write!(f, "mrd stop {to} on {interface}")
            }
            Step::AddRecvDevice {
                interface,
                device,
                mac,
            } => {
                for (i, line) in recv_device_commands(interface, device, mac)
                    .iter()
                    .enumerate()
                {
                    let sep = if i == 0 { "" } else { "\n    " };
                    write!(f, "{sep}{line}")?;
                }
                Ok(())
            }
            Step::DelRecvDevice { device } => write!(f, "ip link del {device}"),
            Step::AnswerNd {
                interface,
                addr,
                mac,
            } => write!(f, "nd answer {addr} with {mac} on {interface}"),
            Step::StopNd { interface, addr } => write!(f, "nd stop {addr} on {interface}"),
        }
    }
}

/// Where the executor puts a VIP's address: (device, prefix length, `ip`
/// flags). IPv6 VIPs go on loopback as /128 (the prefix would add a route via
/// `lo`), so that the kernel neither answers neighbour solicitations for them
/// on the interface nor solicits from them; see [`super`].
///
/// An IPv4 VIP in [`SwitchMode::Unicast`] goes on its receive-only device, as
/// a /32 (a prefix would route replies out of the device): its packets arrive
/// there, and the reverse-path check of a device without any address fails
/// whenever `rp_filter` is on, loose or strict (`__fib_validate_source`: no
/// address, `last_resort`, drop). With the VIP on it the loose check the
/// device is given passes (the client is reachable, through the interface).
/// Replies still leave by the interface, which has the route to the client.
pub fn address_holder(v: &VipConfig) -> (String, u8, &'static str) {
    match (v.addr, v.mode) {
        (IpAddr::V4(_), SwitchMode::Unicast) => (recv_device(v.mac), 32, ""),
        (IpAddr::V4(_), _) => (v.interface.clone(), v.prefix_len, ""),
        (IpAddr::V6(_), _) => (LOOPBACK.to_string(), 128, "nodad"),
    }
}

/// The loopback interface, which holds the IPv6 VIPs.
pub const LOOPBACK: &str = "lo";

/// Period of Multicast Router Advertisements (RFC 4286's default
/// MaxAdvertisementInterval). A Linux bridge keeps a port a router port for
/// its `multicast_querier_interval` (255 s by default) after the last one.
pub const MRD_INTERVAL: Duration = Duration::from_secs(20);

/// The RFC 4286 all-snoopers groups.
pub const ALL_SNOOPERS_V4: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 106);
pub const ALL_SNOOPERS_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x6a);

fn group_protocol(group: IpAddr) -> &'static str {
    if group.is_ipv4() {
        "igmp"
    } else {
        "mld"
    }
}

/// Name of the receive-only device of a shared unicast MAC: `vsu` and the
/// MAC's twelve hex digits (15 characters, the longest name Linux takes), so
/// one MAC always names the same device, across agent restarts too.
pub fn recv_device(mac: Mac) -> String {
    let hex: String = mac.0.iter().map(|b| format!("{b:02x}")).collect();
    format!("vsu{hex}")
}

/// What [`Step::AddRecvDevice`] runs, in order (the executor runs exactly
/// these; the sysctl lines are written under /proc/sys). `mode private`:
/// frames reach it only from outside, never from a sibling macvlan.
pub fn recv_device_commands(interface: &str, device: &str, mac: &Mac) -> Vec<String> {
    vec![
        format!("ip link add {device} link {interface} address {mac} type macvlan mode private"),
        format!("ip link set {device} addrgenmode none arp off multicast off"),
        format!("sysctl net.ipv4.conf.{device}.rp_filter=2"),
        format!("sysctl net.ipv6.conf.{device}.accept_ra=0"),
        format!("sysctl net.ipv6.conf.{device}.autoconf=0"),
        format!("sysctl net.ipv6.conf.{device}.dad_transmits=0"),
        format!("ip link set {device} up"),
    ]
}

/// Name of a VIP's chain and the prefix of its counters: `vip_192_0_2_10`,
/// `vip6_2001_db8_0_0_0_0_0_10` (the eight groups in hex).
pub fn vip_ident(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => {
            let o = a.octets();
            format!("vip_{}_{}_{}_{}", o[0], o[1], o[2], o[3])
        }
        IpAddr::V6(a) => {
            let groups: Vec<String> = a.segments().iter().map(|g| format!("{g:x}")).collect();
            format!("vip6_{}", groups.join("_"))
        }
    }
}

/// The VIP and verdict of a counter named by [`counter_name`].
pub fn parse_counter_name(name: &str) -> Option<(IpAddr, &'static str)> {
    let verdict = VERDICTS.iter().find(|v| name.ends_with(&format!("_{v}")))?;
    let ident = &name[..name.len() - verdict.len() - 1];
    if let Some(rest) = ident.strip_prefix("vip6_") {
        let groups: Vec<u16> = rest
            .split('_')
            .map(|p| u16::from_str_radix(p, 16).ok())
            .collect::<Option<_>>()?;
        let groups: [u16; 8] = groups.try_into().ok()?;
        return Some((IpAddr::V6(Ipv6Addr::from(groups)), verdict));
    }
    let octets: Vec<u8> = ident
        .strip_prefix("vip_")?
        .split('_')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let octets: [u8; 4] = octets.try_into().ok()?;
    Some((IpAddr::V4(Ipv4Addr::from(octets)), verdict))
}

pub fn counter_name(addr: IpAddr, verdict: &str) -> String {
    format!("{}_{verdict}", vip_ident(addr))
}

/// The sysctls every apply makes true: (key, value).
pub fn sysctls(base: &Base) -> Vec<(String, String)> {
    let mut v = vec![(
        "net.ipv4.conf.all.arp_announce".to_string(),
        "2".to_string(),
    )];
    for ifname in base.interfaces() {
        v.push((format!("net.ipv4.conf.{ifname}.arp_announce"), "2".into()));
    }
    for family in base.families() {
        let tree = family.sysctl_tree;
        if tree == "ipv6" {
            // IPv6 on loopback is off in some network namespaces and images.
            v.push(("net.ipv6.conf.lo.disable_ipv6".into(), "0".into()));
        }
        v.push((
            format!("net.{tree}.conf.all.drop_unicast_in_l2_multicast"),
            "0".into(),
        ));
        for ifname in base.interfaces() {
            v.push((
                format!("net.{tree}.conf.{ifname}.drop_unicast_in_l2_multicast"),
                "0".into(),
            ));
        }
    }
    v
}

/// Set after the rules exist (conntrack is loaded by them).
pub const TCP_LOOSE: (&str, &str) = ("net.netfilter.nf_conntrack_tcp_loose", "0");

/// How a packet's bucket is computed and matched.
struct Key {
    /// Statements computing the key before it is matched (jhash: sets the mark).
    compute: Vec<String>,
    /// The expression matched against a set: `meta mark` or `ip saddr & MASK`.
    lookup: String,
    set_type: &'static str,
    kind: KeyKind,
}

fn key(base: &Base, family: Family) -> Result<Key, DataPlaneError> {
    let count = base.bucket_count;
    match base.bucket_fn {
        BucketFn::Jhash => {
            let expr = nft_hash_expr(base.affinity, family.core, count, base.seed)
                .map_err(|e| DataPlaneError::InvalidDesired(e.to_string()))?;
            let compute = if base.affinity == Affinity::AddressPort {
                // `th sport` reads the first bytes of any transport header (ICMP's
                // type and code); only TCP and UDP have ports. Other protocols
                // hash the address alone, so exactly one host still answers.
                let addr_only = nft_hash_expr(Affinity::Address, family.core, count, base.seed)
                    .map_err(|e| DataPlaneError::InvalidDesired(e.to_string()))?;
                vec![
                    format!("meta l4proto {{ tcp, udp }} meta mark set {expr}"),
                    format!("meta l4proto != {{ tcp, udp }} meta mark set {addr_only}"),
                ]
            } else {
                vec![format!("meta mark set {expr}")]
            };
            Ok(Key {
                compute,
                lookup: "meta mark".into(),
                set_type: "mark",
                kind: KeyKind::Mark,
            })
        }
        BucketFn::Lowbits => {
            // Network24 is the /24 for IPv4, the /64 for IPv6 (core's bucket_of).
            let shift = match (base.affinity, family.core) {
                (Affinity::Address, _) => 0,
                (Affinity::Network24, IpFamily::V4) => 8,
                (Affinity::Network24, IpFamily::V6) => 64,
                (Affinity::AddressPort, _) => {
                    return Err(DataPlaneError::InvalidDesired(
                        "affinity address_port needs the jhash bucket function".into(),
                    ))
                }
            };
            let (mask, set_type, kind) = match family.core {
                IpFamily::V4 => (
                    Ipv4Addr::from((count - 1) << shift).to_string(),
                    "ipv4_addr",
                    KeyKind::Ipv4 { shift },
                ),
                IpFamily::V6 => (
                    Ipv6Addr::from(u128::from(count - 1) << shift).to_string(),
                    "ipv6_addr",
                    KeyKind::Ipv6 { shift },
                ),
            };
            Ok(Key {
                compute: vec![],
                lookup: format!("{} saddr & {mask}", family.selector),
                set_type,
                kind,
            })
        }
    }
}

fn arp_rewrite(vip: &VipConfig) -> String {
    format!(
        "arp htype 1 arp ptype ip arp hlen 6 arp plen 4 arp saddr ip {} arp saddr ether set {}",
        vip.addr, vip.mac
    )
}

/// The objects of the agent's tables, by (family, name): what the kernel holds
/// now (listed by the executor before a rebuild) or what a rebuild creates.
/// Anonymous sets are not listed: they live and die with their rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Present {
    /// Base and regular chains.
    pub chains: BTreeSet<(String, String)>,
    pub sets: BTreeSet<(String, String)>,
    pub counters: BTreeSet<(String, String)>,
}

impl Present {
    /// The objects of the agent's `table` in an `nft -j list ruleset` listing.
    pub fn from_listing(json: &str, table: &str) -> Result<Present, String> {
        let v: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
        let items = v
            .get("nftables")
            .and_then(|n| n.as_array())
            .ok_or("no \"nftables\" array")?;
        let mut p = Present::default();
        for item in items {
            for (kind, into) in [
                ("chain", &mut p.chains),
                ("set", &mut p.sets),
                ("counter", &mut p.counters),
            ] {
                let Some(o) = item.get(kind) else { continue };
                let field = |f: &str| o.get(f).and_then(|x| x.as_str());
                let (Some(family), Some(t), Some(name)) =
                    (field("family"), field("table"), field("name"))
                else {
                    continue;
                };
                if t == table && FAMILIES.contains(&family) && !name.starts_with("__") {
                    into.insert((family.to_string(), name.to_string()));
                }
            }
        }
        Ok(p)
    }
}

/// Every family the agent's tables can be in: the filter families of
/// [`Family`], then ARP and netdev.
const FAMILIES: [&str; 4] = [Family::V4.nft, Family::V6.nft, "arp", "netdev"];

/// What differs between IPv4 and IPv6 in the bucket filter: the one place per
/// address family. Each family with a VIP gets its own filter table (`ip` or
/// `ip6`) of the same shape, with its own owned and dead sets; a renewal
/// writes the elements of every family in one transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    /// nftables family of the filter table.
    pub nft: &'static str,
    /// Header selector of the addresses (`ip saddr`, `ip6 daddr`).
    pub selector: &'static str,
    /// Key of core's hash expression.
    pub core: IpFamily,
    /// `net.<tree>.conf` sysctls.
    pub sysctl_tree: &'static str,
    /// `ip -4` / `ip -6`, and the word before an address in `ip -o addr`.
    pub ip_flag: &'static str,
    pub ip_addr_word: &'static str,
    /// Rules in each VIP chain after the established-flow accept, before the
    /// bucket check: IPv6 accepts neighbour solicitations (untracked by
    /// conntrack, they would otherwise be answered only by the owner of the
    /// client's bucket, and not at all while it has none).
    pub always_accept: &'static [&'static str],
}

impl Family {
    pub const V4: Family = Family {
        nft: "ip",
        selector: "ip",
        core: IpFamily::V4,
        sysctl_tree: "ipv4",
        ip_flag: "-4",
        ip_addr_word: "inet",
        always_accept: &[],
    };
    pub const V6: Family = Family {
        nft: "ip6",
        selector: "ip6",
        core: IpFamily::V6,
        sysctl_tree: "ipv6",
        ip_flag: "-6",
        ip_addr_word: "inet6",
        always_accept: &["icmpv6 type nd-neighbor-solicit accept"],
    };
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(addr: IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// A base chain: name and hook specification.
struct BaseChain {
    family: &'static str,
    name: String,
    spec: String,
}

/// Everything a rebuild defines, before rendering.
struct Tables {
    base_chains: Vec<BaseChain>,
    /// Regular chains (family, name).
    chains: Vec<(&'static str, String)>,
    /// (family, name, definition)
    sets: Vec<(&'static str, &'static str, String)>,
    counters: Vec<(&'static str, String)>,
    /// (family, chain, rule)
    rules: Vec<(&'static str, String, String)>,
}

impl Tables {
    fn of(base: &Base, arp_egress: bool) -> Result<Tables, DataPlaneError> {
        let mut t = Tables {
            base_chains: Vec::new(),
            chains: Vec::new(),
            sets: Vec::new(),
            counters: Vec::new(),
            rules: Vec::new(),
        };
        for family in base.families() {
            t.add_filter(base, family)?;
        }
        t.base_chains.push(BaseChain {
            family: "arp",
            name: "output".into(),
            spec: "type filter hook output priority filter; policy accept;".into(),
        });
        let v4 = |v: &&VipConfig| v.addr.is_ipv4();
        for vip in base.vips.iter().filter(v4) {
            t.rules.push(("arp", "output".into(), arp_rewrite(vip)));
        }
        if arp_egress {
            for ifname in base.interfaces() {
                let name = format!("egress_{ifname}");
                t.base_chains.push(BaseChain {
                    family: "netdev",
                    name: name.clone(),
                    spec: format!(
                        "type filter hook egress device \"{ifname}\" priority filter; policy accept;"
                    ),
                });
                for vip in base
                    .vips
                    .iter()
                    .filter(v4)
                    .filter(|v| v.interface == ifname)
                {
                    t.rules.push(("netdev", name.clone(), arp_rewrite(vip)));
                }
            }
            // Whatever would leave a receive-only device is dropped: a frame
            // sourced from the shared unicast MAC would teach the switches
            // where it is, and they would stop flooding it to the others.
            for (_, device, _) in recv_devices(base) {
                t.base_chains.push(BaseChain {
                    family: "netdev",
                    name: format!("egress_{device}"),
                    spec: format!(
                        "type filter hook egress device \"{device}\" priority filter; policy drop;"
                    ),
                });
            }
        }
        Ok(t)
    }

    /// The bucket filter of one address family: its table's base chains,
    /// sets, per-VIP chains and counters.
    fn add_filter(&mut self, base: &Base, family: Family) -> Result<(), DataPlaneError> {
        let k = key(base, family)?;
        let (ip, sel) = (family.nft, family.selector);
        let vips: Vec<&VipConfig> = base
            .vips
            .iter()
            .filter(|v| Family::of(v.addr) == family)
            .collect();
        self.base_chains.extend([
            BaseChain {
                family: ip,
                name: "prerouting".into(),
                spec: "type filter hook prerouting priority raw; policy accept;".into(),
            },
            BaseChain {
                family: ip,
                name: "input".into(),
                spec: "type filter hook input priority filter; policy accept;".into(),
            },
        ]);
        for set in ["owned", "dead"] {
            let def = format!("{{ type {}; flags timeout; }}", k.set_type);
            self.sets.push((ip, set, def));
        }
        let addrs: Vec<String> = vips.iter().map(|v| v.addr.to_string()).collect();
        if !addrs.is_empty() {
            self.rules.push((
                ip,
                "prerouting".into(),
                format!(
                    "{sel} daddr {{ {} }} meta pkttype multicast meta pkttype set host",
                    addrs.join(", ")
                ),
            ));
        }
        // One rule per VIP, not a `vmap`: a set lookup reads the generation
        // when it runs, and a rebuild deactivates the elements of the old
        // rule's anonymous map in the new one, so an old-generation rule
        // racing the commit would find no jump and fall through to accept.
        for v in &vips {
            self.rules.push((
                ip,
                "input".into(),
                format!("{sel} daddr {} jump {}", v.addr, vip_ident(v.addr)),
            ));
        }
        for vip in &vips {
            let chain = vip_ident(vip.addr);
            let c = |v: &str| counter_name(vip.addr, v);
            for v in VERDICTS {
                self.counters.push((ip, c(v)));
            }
            // UDP follows the bucket's owner, established or not: after a move
            // the old owner's conntrack entry would otherwise deliver a flow's
            // datagrams next to the new owner, which sees them as new.
            let mut rules =
                vec!["meta l4proto != udp ct state established,related accept".to_string()];
            rules.extend(family.always_accept.iter().map(|r| r.to_string()));
            rules.extend(k.compute.iter().cloned());
            rules.push(format!(
                "ct state invalid meta l4proto tcp {} @dead counter name \"{}\" reject with tcp reset",
                k.lookup,
                c("reset")
            ));
            rules.push(format!(
                "ct state invalid counter name \"{}\" drop",
                c("invalid")
            ));
            rules.push(format!(
                "tcp flags & (fin | syn | rst | ack) != syn counter name \"{}\" drop",
                c("invalid")
            ));
            rules.push(format!("jump {}", super::deadline::CHAIN));
            rules.push(format!(
                "{} @owned counter name \"{}\" accept",
                k.lookup,
                c("accepted")
            ));
            rules.push(format!("counter name \"{}\" drop", c("not_owned")));
            self.rules
                .extend(rules.into_iter().map(|r| (ip, chain.clone(), r)));
            self.chains.push((ip, chain));
        }
        if !vips.is_empty() {
            let lease = super::deadline::CHAIN;
            self.chains.push((ip, lease.into()));
            self.rules
                .push((ip, lease.into(), super::deadline::CLOSED_RULE.into()));
        }
        Ok(())
    }

    fn objects(&self) -> Present {
        let own = |f: &str, n: &str| (f.to_string(), n.to_string());
        Present {
            chains: self
                .base_chains
                .iter()
                .map(|c| own(c.family, &c.name))
                .chain(self.chains.iter().map(|(f, n)| own(f, n)))
                .collect(),
            sets: self.sets.iter().map(|(f, n, _)| own(f, n)).collect(),
            counters: self.counters.iter().map(|(f, n)| own(f, n)).collect(),
        }
    }
}

/// What a rebuild with `base` leaves in the kernel (the golden tests' and the
/// recording executor's stand-in for a listing).
pub fn objects_of(installed: &Installed, arp_egress: bool) -> Result<Present, DataPlaneError> {
    Ok(Tables::of(&installed.base, arp_egress)?.objects())
}

/// One transaction that turns whatever the agent's tables hold (`present`)
/// into the full definition for `base`, in place: the tables and their base
/// chains are kept (see the module docs of [`super`] for why), every chain that
/// exists is flushed, chains and counters no longer wanted are deleted, the sets
/// are always deleted and created anew, then the rules are added.
fn rebuild(
    table: &str,
    base: &Base,
    arp_egress: bool,
    present: &Present,
) -> Result<String, DataPlaneError> {
    let t = Tables::of(base, arp_egress)?;
    let wanted = t.objects();
    let mut s = String::new();
    // A filter family that goes (its last VIP removed) keeps an empty table.
    let families = base.families().into_iter().map(|f| f.nft);
    for family in families.chain(["arp", "netdev"]) {
        let _ = writeln!(s, "add table {family} {table}");
    }
    for c in &t.base_chains {
        let _ = writeln!(
            s,
            "add chain {} {table} {} {{ {} }}",
            c.family, c.name, c.spec
        );
    }
    // No old rule may keep a reference to a chain, set or counter that goes.
    for (family, name) in &present.chains {
        let _ = writeln!(s, "flush chain {family} {table} {name}");
    }
    for (family, name) in present.chains.difference(&wanted.chains) {
        let _ = writeln!(s, "delete chain {family} {table} {name}");
    }
    // New sets even when the type is unchanged: rules of the old generation then
    // look up only the old elements, never new elements under an old key.
    for (family, name) in &present.sets {
        let _ = writeln!(s, "delete set {family} {table} {name}");
    }
    for (family, name) in present.counters.difference(&wanted.counters) {
        let _ = writeln!(s, "delete counter {family} {table} {name}");
    }
    for (family, name) in &t.counters {
        let _ = writeln!(s, "add counter {family} {table} {name}");
    }
    for (family, name, def) in &t.sets {
        let _ = writeln!(s, "add set {family} {table} {name} {def}");
    }
    for (family, name) in &t.chains {
        let _ = writeln!(s, "add chain {family} {table} {name}");
    }
    for (family, chain, rule) in &t.rules {
        let _ = writeln!(s, "add rule {family} {table} {chain} {rule}");
    }
    Ok(s)
}

/// Per filter family, how its sets key a bucket.
fn keys(base: &Base) -> Result<Vec<(Family, KeyKind)>, DataPlaneError> {
    base.families()
        .into_iter()
        .map(|f| Ok((f, key(base, f)?.kind)))
        .collect()
}

fn elements(
    table: &str,
    base: &Base,
    owned: &BTreeSet<u32>,
    reset: &BTreeSet<u32>,
    until: Duration,
) -> Result<Option<Elements>, DataPlaneError> {
    if owned.is_empty() || until.is_zero() {
        return Ok(None);
    }
    Ok(Some(Elements {
        table: table.to_string(),
        keys: keys(base)?,
        owned: owned.iter().copied().collect(),
        reset: reset.intersection(owned).copied().collect(),
        until,
    }))
}

/// Adding (or removing) the VIP addresses, and for IPv6 VIPs the neighbour
/// discovery answers: started after the address is there, stopped before it
/// goes.
fn addr_steps(base: &Base, add: bool) -> Vec<Step> {
    let mut steps = Vec::new();
    for v in &base.vips {
        let nd = |add: bool| match v.addr {
            IpAddr::V6(addr) if add => Some(Step::AnswerNd {
                interface: v.interface.clone(),
                addr,
                mac: v.mac,
            }),
            IpAddr::V6(addr) => Some(Step::StopNd {
                interface: v.interface.clone(),
                addr,
            }),
            IpAddr::V4(_) => None,
        };
        if add {
            steps.push(Step::AddAddress(v.clone()));
            steps.extend(nd(true));
        } else {
            steps.extend(nd(false));
            steps.push(Step::DelAddress(v.clone()));
        }
    }
    steps
}

/// (interface, multicast MAC) pairs the VIPs need to receive, deduplicated.
fn macs(base: &Base) -> BTreeSet<(String, Mac)> {
    base.vips
        .iter()
        .filter(|v| v.mac.is_multicast())
        .map(|v| (v.interface.clone(), v.mac))
        .collect()
}

/// The group mapped from each VIP's MAC: every `igmp` VIP's, and with
/// `igmp_join` also every `multicast` IPv4 VIP's (what the agent did before
/// switch modes).
fn groups(base: &Base, igmp_join: bool) -> BTreeSet<(String, IpAddr)> {
    base.vips
        .iter()
        .filter_map(|v| {
            let group = match (v.mode, v.addr) {
                (SwitchMode::Igmp, IpAddr::V4(_)) => v.mac.igmp_group().map(IpAddr::V4),
                (SwitchMode::Igmp, IpAddr::V6(_)) => v.mac.mld_group().map(IpAddr::V6),
                (SwitchMode::Multicast, IpAddr::V4(_)) if igmp_join => {
                    v.mac.igmp_group().map(IpAddr::V4)
                }
                _ => None,
            };
            group.map(|g| (v.interface.clone(), g))
        })
        .collect()
}

/// (interface, all-snoopers group) pairs to advertise a multicast router on:
/// one per interface and family with an `igmp` VIP.
fn adverts(base: &Base) -> BTreeSet<(String, IpAddr)> {
    base.vips
        .iter()
        .filter(|v| v.mode == SwitchMode::Igmp)
        .map(|v| {
            let to = match v.addr {
                IpAddr::V4(_) => IpAddr::V4(ALL_SNOOPERS_V4),
                IpAddr::V6(_) => IpAddr::V6(ALL_SNOOPERS_V6),
            };
            (v.interface.clone(), to)
        })
        .collect()
}

/// (interface, device, MAC) of the receive-only devices the `unicast` VIPs
/// need, one per shared MAC.
fn recv_devices(base: &Base) -> BTreeSet<(String, String, Mac)> {
    base.vips
        .iter()
        .filter(|v| v.mode == SwitchMode::Unicast)
        .map(|v| (v.interface.clone(), recv_device(v.mac), v.mac))
        .collect()
}

/// The VIPs of `a` whose address or answer `b` does not keep. A change of
/// switch mode alone keeps the address (removing it would cut the VIP's
/// established flows for nothing); a changed MAC re-answers.
fn vip_minus(a: &Base, b: Option<&Base>) -> Base {
    let same = |v: &VipConfig, o: &VipConfig| {
        (v.addr, v.prefix_len, &v.interface, v.mac) == (o.addr, o.prefix_len, &o.interface, o.mac)
    };
    Base {
        vips: a
            .vips
            .iter()
            .filter(|v| !b.is_some_and(|b| b.vips.iter().any(|o| same(v, o))))
            .cloned()
            .collect(),
        ..a.clone()
    }
}

/// Empties the owned and dead sets of `families` (the first half of a
/// renewal or withdraw).
pub fn flush_sets(table: &str, families: &[Family]) -> String {
    let mut s = String::new();
    for f in families {
        let _ = write!(
            s,
            "flush set {0} {table} owned\nflush set {0} {table} dead\n",
            f.nft
        );
    }
    s
}

impl Elements {
    /// Empties the sets these elements go into.
    pub fn flush(&self) -> String {
        let families: Vec<Family> = self.keys.iter().map(|(f, _)| *f).collect();
        flush_sets(&self.table, &families)
    }
}

/// Whether applying `desired` over `installed` rebuilds the tables (and so
/// needs a listing of what the kernel holds) rather than only rewriting the
/// owned elements.
pub fn needs_rebuild(installed: Option<&Installed>, desired: &Desired) -> bool {
    installed.map(|i| &i.base) != Some(&Base::of(desired))
}

/// Plans an apply. `reset` are owned buckets whose previous owner is known to be
/// dead: mid-stream TCP packets of their unknown flows get a RST instead of
/// silence, so clients reconnect at once. `present` is what the kernel holds in
/// the agent's tables (used only when the plan rebuilds, see [`needs_rebuild`]).
/// `now` is when the apply started: element timeouts are planned relative to it
/// and rendered from the clock again immediately before the write.
pub fn plan_apply(
    cfg: &LinuxConfig,
    installed: Option<&Installed>,
    desired: &Desired,
    reset: &BTreeSet<u32>,
    present: &Present,
    now: Instant,
) -> Result<Plan, DataPlaneError> {
    desired.validate()?;
    let base = Base::of(desired);
    // Fails early on combinations the rules cannot express.
    for f in base.families() {
        key(&base, f)?;
    }
    let table = &cfg.table;
    let until = desired.lease_left(now);
    let owned = if until.is_zero() {
        BTreeSet::new()
    } else {
        desired.owned.clone()
    };
    let reset: BTreeSet<u32> = reset.intersection(&owned).copied().collect();
    let elems = elements(table, &base, &owned, &reset, until)?;
    let stop_after = elems.as_ref().map(|e| e.until);
    let next = Installed {
        base: base.clone(),
        owned: owned.clone(),
        reset: reset.clone(),
    };
    let old = installed.map(|i| &i.base);
    if old == Some(&base) {
        // Renewal (or a change of owned buckets only): one small transaction,
        // also when nothing is owned any more (a drain's last release): the
        // sets emptied and the deadline now, over netlink like any renewal.
        let elements = match elems {
            Some(e) => e,
            None => Elements {
                table: table.to_string(),
                keys: keys(&base)?,
                owned: Vec::new(),
                reset: Vec::new(),
                until: Duration::ZERO,
            },
        };
        return Ok(Plan {
            steps: vec![Step::Nft(NftBatch {
                fixed: flush_sets(table, &base.families()),
                elements: Some(elements),
            })],
            next: Some(next),
            changed: false,
            stop_after,
        });
    }
    let mut steps = Vec::new();
    // Whatever goes away first: VIPs before their filter.
    if let Some(old) = old {
        steps.extend(addr_steps(&vip_minus(old, Some(&base)), false));
        let keep_groups = groups(&base, cfg.igmp_join);
        for (interface, group) in groups(old, cfg.igmp_join).difference(&keep_groups) {
            steps.push(Step::LeaveGroup {
                interface: interface.clone(),
                group: *group,
            });
        }
        let keep_adverts = adverts(&base);
        for (interface, to) in adverts(old).difference(&keep_adverts) {
            steps.push(Step::StopAdvertising {
                interface: interface.clone(),
                to: *to,
            });
        }
        if cfg.static_maddr {
            let keep = macs(&base);
            for (interface, mac) in macs(old).difference(&keep) {
                steps.push(Step::DelMaddr {
                    interface: interface.clone(),
                    mac: *mac,
                });
            }
        }
    }
    for (key, value) in sysctls(&base) {
        steps.push(Step::Sysctl { key, value });
    }
    // Receive devices before the rebuild, whose egress chains name them; the
    // ones no longer wanted after it, which deleted their chains. A device
    // only adds a way in for packets the filter judges by address.
    let devices = recv_devices(&base);
    for (interface, device, mac) in &devices {
        steps.push(Step::AddRecvDevice {
            interface: interface.clone(),
            device: device.clone(),
            mac: *mac,
        });
    }
    steps.push(Step::Nft(NftBatch {
        fixed: rebuild(table, &base, cfg.arp_egress, present)?,
        elements: elems,
    }));
    if let Some(old) = old {
        for (_, device, _) in recv_devices(old).difference(&devices) {
            if !devices.iter().any(|(_, d, _)| d == device) {
                steps.push(Step::DelRecvDevice {
                    device: device.clone(),
                });
            }
        }
    }
    steps.push(Step::Sysctl {
        key: TCP_LOOSE.0.into(),
        value: TCP_LOOSE.1.into(),
    });
    // Every VIP is (re)asserted on a rebuild: the executor skips what is there,
    // which also repairs an address someone deleted.
    steps.extend(addr_steps(&base, true));
    if cfg.static_maddr {
        for (interface, mac) in macs(&base) {
            steps.push(Step::AddMaddr { interface, mac });
        }
    }
    for (interface, group) in groups(&base, cfg.igmp_join) {
        steps.push(Step::JoinGroup { interface, group });
    }
    for (interface, to) in adverts(&base) {
        steps.push(Step::AdvertiseRouter { interface, to });
    }
    Ok(Plan {
        steps,
        next: Some(next),
        changed: true,
        stop_after,
    })
}

/// Plans restoring the filter alone after a foreign nftables edit (a `flush
/// ruleset`, a deleted table, an edited set): the rebuild transaction of
/// [`plan_apply`] over what the kernel holds, without the address, sysctl and
/// multicast steps that such an edit cannot have changed (the periodic full
/// reconcile still re-asserts those).
pub fn plan_filter_repair(
    cfg: &LinuxConfig,
    desired: &Desired,
    reset: &BTreeSet<u32>,
    present: &Present,
    now: Instant,
) -> Result<Plan, DataPlaneError> {
    let mut plan = plan_apply(cfg, None, desired, reset, present, now)?;
    plan.steps.retain(|s| matches!(s, Step::Nft(_)));
    Ok(plan)
}

/// Plans a withdraw: no new flows from now on; VIPs, rules and established flows
/// stay. With nothing installed (an agent withdrawing before its first apply,
/// over tables an earlier run left), the sets flushed are those `present`
/// lists, of every family: flushing a set that does not exist would fail the
/// whole transaction, and an IPv6 set left out would keep accepting.
pub fn plan_withdraw(cfg: &LinuxConfig, installed: Option<&Installed>, present: &Present) -> Plan {
    let table = &cfg.table;
    let families = match installed {
        Some(i) => i.base.families(),
        None => Family::ALL
            .into_iter()
            .filter(|f| {
                ["owned", "dead"]
                    .iter()
                    .all(|s| present.sets.contains(&(f.nft.to_string(), s.to_string())))
            })
            .collect(),
    };
    if families.is_empty() {
        return Plan {
            steps: vec![],
            next: None,
            changed: false,
            stop_after: None,
        };
    }
    Plan {
        steps: vec![Step::Nft(NftBatch {
            fixed: flush_sets(table, &families),
            elements: None,
        })],
        next: installed.map(|i| Installed {
            owned: BTreeSet::new(),
            reset: BTreeSet::new(),
            ..i.clone()
        }),
        changed: false,
        stop_after: None,
    }
}

/// Plans removing everything: VIP addresses first (so nothing is ever accepted
/// unfiltered), then the tables, then the sysctls go back. `known` are VIPs the
/// executor remembers from an earlier run when nothing is installed now.
pub fn plan_teardown(
    cfg: &LinuxConfig,
    installed: Option<&Installed>,
    known: &[VipConfig],
) -> Plan {
    let table = &cfg.table;
    let mut vips: BTreeSet<VipConfig> = known.iter().cloned().collect();
    if let Some(i) = installed {
        vips.extend(i.base.vips.iter().cloned());
    }
    let base = Base {
        vips: vips.into_iter().collect(),
        bucket_count: 2,
        bucket_fn: BucketFn::Jhash,
        affinity: Affinity::Address,
        seed: 0,
    };
    let mut steps = addr_steps(&base, false);
    for (interface, group) in groups(&base, true) {
        steps.push(Step::LeaveGroup { interface, group });
    }
    for (interface, to) in adverts(&base) {
        steps.push(Step::StopAdvertising { interface, to });
    }
    if cfg.static_maddr {
        for (interface, mac) in macs(&base) {
            steps.push(Step::DelMaddr { interface, mac });
        }
    }
    let mut fixed = String::new();
    for family in FAMILIES {
        let _ = writeln!(fixed, "add table {family} {table}");
        let _ = writeln!(fixed, "delete table {family} {table}");
    }
    steps.push(Step::Nft(NftBatch {
        fixed,
        elements: None,
    }));
    for (_, device, _) in recv_devices(&base) {
        steps.push(Step::DelRecvDevice { device });
    }
    steps.push(Step::RestoreSysctls);
    Plan {
        steps,
        next: None,
        changed: true,
        stop_after: None,
    }
}

/// Remaining lifetime of each element of the owned set, from `nft list set`
/// text output (`0x00000003 timeout 500ms expires 312ms` or
/// `0.0.0.3 timeout 1s expires 1s2ms`).
pub fn parse_expires(listing: &str) -> Vec<Duration> {
    let mut out = Vec::new();
    let mut words = listing.split(|c: char| c.is_whitespace() || c == ',' || c == '}');
    while let Some(w) = words.next() {
        if w == "expires" {
            if let Some(d) = words.next().and_then(parse_nft_duration) {
                out.push(d);
            }
        }
    }
    out
}

/// `1h2m3s450ms`-style nft durations.
pub fn parse_nft_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut num = String::new();
    let mut chars = s.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().ok()?;
        num.clear();
        let unit = match c {
            'd' => Duration::from_secs(86_400),
            'h' => Duration::from_secs(3_600),
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                Duration::from_millis(1)
            }
            'm' => Duration::from_secs(60),
            's' => Duration::from_secs(1),
            _ => return None,
        };
        total += unit * u32::try_from(n).ok()?;
        any = true;
    }
    (any && num.is_empty()).then_some(total)
}

/// Packet counts per (VIP, verdict) of `table` from `nft -j list counters`.
pub fn parse_counters(
    json: &str,
    table: &str,
) -> Result<BTreeMap<(IpAddr, &'static str), u64>, String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let items = v
        .get("nftables")
        .and_then(|n| n.as_array())
        .ok_or("no \"nftables\" array")?;
    let mut out = BTreeMap::new();
    for item in items {
        let Some(c) = item.get("counter") else {
            continue;
        };
        let (Some(name), Some(packets)) = (
            c.get("name").and_then(|n| n.as_str()),
            c.get("packets").and_then(|p| p.as_u64()),
        ) else {
            continue;
        };
        if c.get("table").and_then(|t| t.as_str()) != Some(table) {
            continue;
        }
        if let Some(k) = parse_counter_name(name) {
            out.insert(k, packets);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            parse_nft_duration("450ms"),
            Some(Duration::from_millis(450))
        );
        assert_eq!(
            parse_nft_duration("1s492ms"),
            Some(Duration::from_millis(1492))
        );
        assert_eq!(parse_nft_duration("2m1s"), Some(Duration::from_secs(121)));
        assert_eq!(parse_nft_duration("12"), None);
        assert_eq!(parse_nft_duration("x"), None);
        let listing = "elements = { 0x00000001 timeout 1s500ms expires 1s492ms, 0x00000002 timeout 248ms expires 240ms }";
        assert_eq!(
            parse_expires(listing),
            vec![Duration::from_millis(1492), Duration::from_millis(240)]
        );
    }

    #[test]
    fn counter_names_round_trip() {
        let a = IpAddr::from([10, 0, 0, 100]);
        let a6: IpAddr = "2001:db8::a:100".parse().unwrap();
        for v in VERDICTS {
            assert_eq!(parse_counter_name(&counter_name(a, v)), Some((a, v)));
            assert_eq!(parse_counter_name(&counter_name(a6, v)), Some((a6, v)));
        }
        assert_eq!(
            counter_name(a6, "accepted"),
            "vip6_2001_db8_0_0_0_0_a_100_accepted"
        );
        assert_eq!(parse_counter_name("vip_1_2_3_x_accepted"), None);
        assert_eq!(parse_counter_name("other"), None);
        let json = r#"{"nftables": [{"metainfo": {}}, {"counter": {"family": "ip", "name": "vip_10_0_0_100_not_owned", "table": "vipshare", "handle": 4, "packets": 7, "bytes": 0}}]}"#;
        let c = parse_counters(json, "vipshare").unwrap();
        assert_eq!(c.get(&(a, "not_owned")), Some(&7));
        assert!(parse_counters(json, "other").unwrap().is_empty());
    }

    #[test]
    fn element_keys() {
        assert_eq!(KeyKind::Mark.element(7), "7");
        assert_eq!(KeyKind::Ipv4 { shift: 0 }.element(7), "0.0.0.7");
        assert_eq!(KeyKind::Ipv4 { shift: 8 }.element(258), "0.1.2.0");
        assert_eq!(KeyKind::Ipv6 { shift: 0 }.element(7), "::7");
        assert_eq!(KeyKind::Ipv6 { shift: 64 }.element(258), "0:0:0:102::");
    }

    #[test]
    fn render_drops_elements_once_the_lease_ran_out() {
        let b = NftBatch {
            fixed: "flush set ip t owned\n".into(),
            elements: Some(Elements {
                table: "t".into(),
                keys: vec![(Family::V4, KeyKind::Mark)],
                owned: vec![1, 2],
                reset: vec![2],
                until: Duration::from_millis(300),
            }),
        };
        assert_eq!(
            b.render(Duration::from_micros(100_900)),
            "flush set ip t owned\nadd element ip t owned { 1 timeout 199ms, 2 timeout 199ms }\nadd element ip t dead { 2 timeout 199ms }\n"
        );
        assert!(b.writes_elements(Duration::from_millis(299)));
        assert_eq!(
            b.render(Duration::from_millis(300)),
            "flush set ip t owned\n"
        );
        assert!(!b.writes_elements(Duration::from_millis(300)));
    }
}

//! Linux data plane: the VIP as a secondary address, ARP answered with the
//! cluster's multicast MAC, and an nftables filter that accepts new flows only
//! for owned buckets, with the lease enforced by the kernel (set elements with
//! a `timeout`).
//!
//! # Per VIP
//! - `ip addr add VIP/P dev IF` after the host's own address (the executor
//!   refuses an interface without one);
//! - `table arp vipshare` output chain: ARP replies *and* requests with the VIP
//!   as sender carry the multicast MAC; a `table netdev vipshare` egress chain on
//!   the interface does the same for ARP sent from user space (arping,
//!   gratuitous ARP);
//! - prerouting at raw priority: unicast IP inside a multicast frame becomes
//!   `pkttype host` (TCP drops it otherwise);
//! - `ip maddr add MAC dev IF` (static, survives the agent) for NICs that
//!   filter, and membership of the 239/8 group that maps to the MAC (a socket
//!   the agent holds) for IGMP-snooping switches;
//! - sysctls `arp_announce=2` (all and IF), `drop_unicast_in_l2_multicast=0`
//!   (all and IF) and `nf_conntrack_tcp_loose=0`, restored on teardown.
//!
//! # IPv6 VIPs
//! The filter is the IPv4 one in an `ip6` table (one [`plan::Family`]
//! descriptor per address family says what differs). What differs is how the
//! address is held and how neighbour discovery answers:
//! - the VIP is a /128 on `lo`, added `nodad` (every host holds it: duplicate
//!   address detection would fail it). Packets to it arriving on the
//!   interface are local all the same (Linux accepts any local address on any
//!   interface);
//! - neighbour solicitations for it are answered from user space by [`nd`]: a
//!   raw ICMPv6 socket that joins the VIP's solicited-node group on the
//!   interface and answers with the cluster MAC as target link-layer address,
//!   the override flag and hop limit 255 (the kernel computes the checksum),
//!   and announces the VIP with an unsolicited advertisement when it starts.
//!   Every host answers, with the same MAC, so one dead agent stops nobody's
//!   resolution. An answer to a unicast solicitor waits for the kernel to
//!   resolve it (a solicitation from the interface's link-local address, so
//!   not before that address has passed duplicate address detection);
//! - `meta pkttype set host` in the ip6 prerouting chain and
//!   `net.ipv6.conf.{all,IF}.drop_unicast_in_l2_multicast=0`, as for IPv4;
//!   neighbour solicitations to the VIP itself (unreachability probes, which
//!   conntrack does not track) are accepted before the bucket check.
//!
//! Why not the kernel's own advertisement, rewritten like ARP (measured on
//! this kernel, 6.18, with nft 1.0.6):
//! - nft writes a raw transport-header payload (`@th,208,48 set <MAC>` on the
//!   target link-layer option) without a checksum fix (`csum_type 0` in
//!   `nft --debug=netlink`), and there is no named `icmpv6` field for the
//!   option; the client dropped the advertisement (its neighbour entry stayed
//!   `INCOMPLETE`), where the same advertisement sent from user space was
//!   accepted with the multicast MAC (`ip -6 neigh`: `lladdr 33:33:..`).
//! - With the VIP on the interface the kernel also solicits *from* it: to
//!   resolve a client for a reply whose source is the VIP it sends a
//!   solicitation with source VIP and the host's own MAC as source link-layer
//!   address, and the client overwrites its entry for the VIP with that MAC
//!   (RFC 4861 7.2.3): the IPv6 form of what `arp_announce=2` prevents for
//!   IPv4, with no sysctl to prevent it. On `lo` the VIP is not an address of
//!   the interface, so the kernel neither answers for it there nor solicits
//!   from it (it uses the interface's own address).
//!
//! # Switch modes (per VIP, [`crate::dataplane::SwitchMode`])
//! What above is the default, `multicast`. The two others change how frames
//! reach every host, not the bucket filter (it matches the destination
//! address, whatever the input device):
//! - `igmp`: the host also joins the group mapped from the MAC (IGMP 239/8,
//!   or MLD `ff05::`+low 32 bits, whatever `igmp_join` says) and [`mrd`]
//!   sends RFC 4286 Multicast Router Advertisements on the interface. A
//!   Linux bridge snooping with an active querier forwards a multicast frame
//!   with a unicast IP destination only to multicast router ports, which the
//!   advertisement makes of the hosts' ports; the join alone does nothing
//!   there (deploy/NETWORK.md has the measurements).
//! - `unicast`: ARP/ND answer a shared, locally administered unicast MAC. A
//!   frame to it arriving on the interface is `PACKET_OTHERHOST` and dropped
//!   in `ip_rcv` before netfilter (nft cannot set `pkttype host` for it), so
//!   a macvlan carrying the MAC receives it ([`plan::Step::AddRecvDevice`]).
//!   The macvlan must never send (a switch would learn the MAC and stop
//!   flooding it): `arp off`, `multicast off`, no IPv6 link-local, and an
//!   egress chain with policy drop. IPv6 stays enabled on it (`ipv6_rcv`
//!   drops packets of a device with IPv6 disabled); the IPv4 VIP moves onto
//!   it as a /32, because the reverse-path check of a device without any
//!   address fails with `rp_filter` 1 or 2 ([`plan::address_holder`]).
//!
//! # Buckets and the lease
//! Rules and layout are in [`plan`]. The owned buckets are elements of one
//! set, each with `timeout` = the lease left (already net of the kernel
//! delay, which the agent subtracts), rewritten on every renewal in one
//! transaction. A frozen or killed agent stops renewing and the kernel stops
//! accepting its buckets' new flows when the timeouts run out:
//! [`LeaseEnforcement::KernelTimeout`]. Established flows are accepted before
//! the bucket check and so survive every change, except UDP: its datagrams
//! follow the bucket's owner (a UDP flow moves with its bucket; with the old
//! owner's conntrack entry letting it through, both hosts delivered it).
//!
//! nftables is driven in process, no `nft` process on the lease path: a
//! renewal (the owned elements and the deadline below) is one nf_tables
//! netlink transaction the agent encodes itself ([`lease_write`] over
//! [`nfnl`]: one send, one read of the acks); rebuilds, which define tables,
//! chains and sets, go through libnftables ([`libnft`], one batch per step,
//! each call dumping the kernel's tables first). The timeouts
//! are rendered from the deadline immediately before the batch is sent; if
//! the kernel's ack comes later than the kernel-delay budget (the agent was
//! stopped or starved in between), the elements are written again at once from
//! a fresh clock reading, and deleted (the apply failing with
//! [`DataPlaneError::LateWrite`]) if that write is late too (see
//! [`exec::nft_timed_batch`]).
//!
//! That alone leaves a window: an agent stopped (SIGSTOP, a frozen cgroup)
//! after reading the clock but before libnftables has sent the batch writes
//! stale timeouts when it runs again, and the host could accept until the
//! rewrite. So the kernel also checks the lease's end itself: every bucket
//! check jumps to chain `lease`, whose one rule `meta time >= DEADLINE drop`
//! compares the packet's wall-clock time in nanoseconds (kernel >= 5.4) with
//! the deadline, written as an absolute time with each element write
//! ([`deadline`], in the same transaction: nft's text input takes that value
//! in whole seconds only). A late write of either extends
//! nothing; a wall-clock step back during a lease does, but only up to the
//! element timeouts, which still apply.
//!
//! Another process editing the agent's tables (`nft flush ruleset`, a
//! reloaded nftables.service) is seen through netlink notifications
//! ([`watch`]); the agent then calls [`LinuxDataPlane::invalidate_filter`] and
//! the next apply restores the filter in one transaction.
//!
//! # Rebuilds: one transaction, base chains kept (issue 16)
//! A packet's verdict in the bucket filter must come from one ruleset, old or
//! new. nf_tables swaps rules atomically per *base chain* evaluation: each
//! hook invocation reads the generation once. Two base chains on the same hook
//! are two reads. A rebuild that replaced the table (`add table` + `delete
//! table` + the full definition, as before) registered a second `input` base
//! chain; at equal priority the kernel runs the newer hook first. A packet
//! evaluated by the new chain just before the commit (its rules not yet
//! active: empty, policy accept) and by the old chain just after it (its rules
//! deleted: empty, policy accept) was accepted whatever its bucket. That is the
//! double answer seen in issue 16: a few microseconds per rebuild, only under a
//! SYN flood and a rebuild racing on another CPU.
//!
//! A second window of the same kind, found by the test after the first was
//! closed: a set lookup reads the generation when it runs, not when its chain
//! started, and a transaction that deletes a rule deactivates the elements of
//! the rule's anonymous *map* in the next generation. The old `input` rule
//! `ip daddr vmap { VIP : jump .. }`, evaluated with the old rules just as the
//! commit landed, found no element, jumped nowhere and fell through to the
//! chain's accept policy. `input` now has one plain `ip daddr VIP jump` rule
//! per VIP; the only lookup on the accept path is the named `owned` set, and a
//! rebuild deletes it whole and creates a new one: an old-generation rule looks
//! up the old set's elements, and if those were inactive it would drop (a miss
//! is "not owned"), never accept.
//!
//! So a rebuild ([`plan::plan_apply`] when anything besides the owned elements
//! changes) is one transaction that keeps the tables and their base chains and
//! replaces what is inside them: it flushes every chain, deletes the sets (and
//! chains and counters no longer wanted) and adds the new sets, chains, rules
//! and elements. The executor lists the tables' objects first
//! ([`Executor::present`]). Every packet then sees, within one evaluation of
//! `input`, either the old rules with the old sets or the new rules with the
//! new sets (sets are always recreated, so an old-generation rule never looks
//! up a new element under an old key).
//!
//! The kernel states of each path, in order (each line is what a packet can
//! see; none accepts a new flow the final state would not, except where noted):
//! - first start: (no table: the VIP is not configured yet) -> sysctls ->
//!   filter with elements (one transaction) -> `tcp_loose=0` -> VIP address
//!   added, maddr, IGMP. Between the filter and `tcp_loose=0` there is no VIP.
//! - periodic reconcile, repair after a failed step, restart with adopted
//!   elements (all `invalidate`d or nothing installed): old filter -> new
//!   filter in one transaction (base chains kept) -> VIP re-asserted. A failed
//!   step leaves the old or the new filter, never a mix.
//! - change of VIPs: VIPs that go are removed first (old filter still there),
//!   then the rebuild above, then the new VIPs are added.
//! - renewal or owned-bucket change: one transaction `flush set` + `add
//!   element`; the filter does one lookup per packet.
//! - withdraw: one transaction flushing the sets.
//! - teardown: VIP addresses removed first; only then are the tables deleted
//!   (a packet for a VIP that is no longer local never reaches `input`).
//!
//! The `ip6` table follows the same rules (its own base chains, one jump
//! rule per VIP, its own named sets recreated on a rebuild, all in the same
//! transaction as the `ip` table); a packet is IPv4 or IPv6, so it meets the
//! input chain of one family only, and a renewal writes both families'
//! elements in one transaction.
//!
//! Not covered: a base chain whose hook or priority was changed by hand (or by
//! a future version) makes `add chain` fail; the rebuild then fails and is
//! retried, leaving the old filter in place.
//!
//! # Resetting flows of a dead owner
//! [`LinuxDataPlane::set_reset_buckets`] marks owned buckets whose previous
//! owner is known to be dead: mid-stream TCP packets of flows this host does
//! not know then get a RST, so the dead host's clients reconnect at once
//! instead of timing out. The agent does not call it yet: an assignment does
//! not say whether a bucket came from a fenced member or a planned release
//! (where the old owner still serves its connections and a RST would cut them).
//!
//! Known limit: the jhash form writes the bucket into the packet mark
//! (`meta mark set jhash ..`) for new flows to a VIP, overwriting any mark set
//! earlier in prerouting (nft 1.0.6 cannot list a `typeof jhash` set, which
//! would avoid it).

pub mod deadline;
pub mod exec;
pub mod lease_write;
pub mod libnft;
pub mod mrd;
pub mod nd;
pub mod nfnl;
pub mod plan;
mod sys;
pub mod watch;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::dataplane::{
    assess, ApplyReport, DataPlane, DataPlaneError, Desired, LeaseEnforcement, Problem, SwitchMode,
    VipConfig,
};
pub use exec::{Executor, OsExecutor, RecordingExecutor};
pub use plan::{
    needs_rebuild, objects_of, plan_apply, plan_filter_repair, plan_teardown, plan_withdraw,
    Installed, Plan, Present, Step,
};

/// Settings of the Linux backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxConfig {
    /// Name of the agent's table in the `ip`, `arp` and `netdev` families.
    pub table: String,
    /// Paths of the tools.
    pub nft: String,
    pub ip: String,
    /// Where sysctls live (`/proc/sys`).
    pub sysctl_root: PathBuf,
    /// Where the executor remembers replaced sysctl values and added VIPs
    /// across restarts; `None` keeps them in memory only.
    pub state_dir: Option<PathBuf>,
    /// `ip maddr add MAC dev IF` for NICs that filter multicast.
    pub static_maddr: bool,
    /// Join the 239/8 group of the MAC of `multicast` IPv4 VIPs (IGMP
    /// snooping switches); `igmp` VIPs join theirs regardless.
    pub igmp_join: bool,
    /// Rewrite ARP sent from user space too (netdev egress chain).
    pub arp_egress: bool,
}

impl Default for LinuxConfig {
    fn default() -> Self {
        LinuxConfig {
            table: "vipshare".into(),
            nft: "nft".into(),
            ip: "ip".into(),
            sysctl_root: "/proc/sys".into(),
            state_dir: Some("/run/vipshare-agent".into()),
            static_maddr: true,
            igmp_join: true,
            arp_egress: true,
        }
    }
}

impl LinuxConfig {
    pub fn validate(&self) -> Result<(), DataPlaneError> {
        let ok = !self.table.is_empty()
            && self.table.len() <= 32
            && self
                .table
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'_')
            && self.table.as_bytes()[0].is_ascii_alphabetic();
        if !ok {
            return Err(DataPlaneError::InvalidDesired(format!(
                "nftables table name {:?} must be a letter followed by letters, digits or _",
                self.table
            )));
        }
        Ok(())
    }
}

/// The Linux backend: plans with [`plan`] and runs plans with one [`Executor`].
pub struct LinuxDataPlane<E: Executor> {
    // Boxed: keeps the agent's backend enum small.
    cfg: Box<LinuxConfig>,
    exec: E,
    installed: Option<Installed>,
    reset: BTreeSet<u32>,
    /// Someone else changed the agent's tables (see [`watch`]).
    filter_lost: bool,
    /// VIPs of the last apply and whether it succeeded (`None` before one).
    last_apply: Option<(Vec<VipConfig>, bool)>,
}

impl<E: Executor> LinuxDataPlane<E> {
    pub fn new(cfg: LinuxConfig, exec: E) -> Result<Self, DataPlaneError> {
        cfg.validate()?;
        Ok(LinuxDataPlane {
            cfg: Box::new(cfg),
            exec,
            installed: None,
            reset: BTreeSet::new(),
            filter_lost: false,
            last_apply: None,
        })
    }

    pub fn config(&self) -> &LinuxConfig {
        &self.cfg
    }

    pub fn installed(&self) -> Option<&Installed> {
        self.installed.as_ref()
    }

    pub fn executor(&self) -> &E {
        &self.exec
    }

    /// Owned buckets whose previous owner is known to be dead: from the next
    /// apply on, mid-stream TCP packets of flows this host does not know get a
    /// RST (so clients of the dead host reconnect at once) instead of silence.
    /// Never set this for a bucket whose previous owner may be alive: it would
    /// reset that owner's established connections.
    pub fn set_reset_buckets(&mut self, buckets: BTreeSet<u32>) {
        self.reset = buckets;
    }

    /// Forget what is installed: the next apply rebuilds everything (periodic
    /// reconcile, repairing state someone else changed).
    pub fn invalidate(&mut self) {
        self.installed = None;
    }

    /// Another process edited the agent's tables ([`watch::Watcher`]): the
    /// next apply rewrites the whole filter in one transaction, without the
    /// slower address and sysctl steps.
    pub fn invalidate_filter(&mut self) {
        self.filter_lost = true;
    }

    /// What keeps the data plane from serving (empty = healthy), for the
    /// agent's reports; `None` before the first apply. Reads the interfaces
    /// and lists the tables (in process, well under a millisecond).
    pub fn health(&mut self) -> Option<BTreeSet<Problem>> {
        let (vips, ok) = self.last_apply.clone()?;
        let interfaces = self.exec.interfaces().unwrap_or_default();
        let filter_present = match &self.installed {
            Some(i) if !self.filter_lost => {
                let wanted = objects_of(i, self.cfg.arp_egress).unwrap_or_default();
                match self.exec.present(&self.cfg.table) {
                    Ok(p) => {
                        wanted.chains.is_subset(&p.chains)
                            && wanted.sets.is_subset(&p.sets)
                            && wanted.counters.is_subset(&p.counters)
                    }
                    Err(_) => false,
                }
            }
            _ => false,
        };
        let mut problems = assess(
            &vips,
            |v| plan::address_holder(v).0,
            &interfaces,
            filter_present,
            ok,
        );
        // A `unicast` VIP arrives only through its receive device (an IPv6
        // one's address is on `lo`, so the check above does not see it).
        for v in vips.iter().filter(|v| v.mode == SwitchMode::Unicast) {
            match interfaces.get(&plan::recv_device(v.mac)) {
                None => {
                    problems.insert(Problem::InterfaceMissing);
                }
                Some(i) if !i.up => {
                    problems.insert(Problem::InterfaceDown);
                }
                Some(_) => {}
            }
        }
        Some(problems)
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

    /// Removes everything the backend installed: the VIP addresses (which ends
    /// this host's established flows to them), the tables, the multicast
    /// memberships; puts the sysctls back. For an agent leaving for good,
    /// after its buckets moved away.
    pub fn teardown(&mut self) -> Result<(), DataPlaneError> {
        let known = self.exec.remembered_vips();
        let plan = plan_teardown(&self.cfg, self.installed.as_ref(), &known);
        self.run(&plan, Instant::now())?;
        self.installed = None;
        Ok(())
    }
}

impl LinuxDataPlane<OsExecutor> {
    /// The real thing.
    pub fn os(cfg: LinuxConfig) -> Result<Self, DataPlaneError> {
        let exec = OsExecutor::new(&cfg)?;
        Self::new(cfg, exec)
    }

    /// How long the owned elements left by an earlier agent keep accepting
    /// (zero when there are none). A restarted agent leaves them alone until it
    /// holds a lease again, so a quick restart costs no service.
    pub fn adopted_window(&self) -> Duration {
        exec::owned_expiries(&self.cfg.nft, &self.cfg.table)
            .into_iter()
            .max()
            .unwrap_or_default()
    }
}

impl<E: Executor> DataPlane for LinuxDataPlane<E> {
    fn apply(&mut self, desired: &Desired) -> Result<ApplyReport, DataPlaneError> {
        let started = Instant::now();
        self.last_apply = Some((desired.vips.clone(), false));
        let rebuild = needs_rebuild(self.installed.as_ref(), desired);
        let present = if rebuild || self.filter_lost {
            desired.validate()?;
            self.exec.present(&self.cfg.table)?
        } else {
            Present::default()
        };
        let plan = if self.filter_lost && !rebuild {
            plan_filter_repair(&self.cfg, desired, &self.reset, &present, started)?
        } else {
            plan_apply(
                &self.cfg,
                self.installed.as_ref(),
                desired,
                &self.reset,
                &present,
                started,
            )?
        };
        self.run(&plan, started)?;
        self.filter_lost = false;
        self.last_apply = Some((desired.vips.clone(), true));
        let next = plan.next.clone();
        let owned_rules = next.as_ref().map_or(0, |n| n.owned.len());
        self.installed = next;
        Ok(ApplyReport {
            backend: self.name(),
            changed: plan.changed,
            steps: plan.steps.len(),
            owned_rules,
            stop_after: plan.stop_after,
            lease_enforcement: LeaseEnforcement::KernelTimeout,
        })
    }

    fn withdraw(&mut self) -> Result<(), DataPlaneError> {
        let present = match &self.installed {
            Some(_) => Present::default(),
            None => self.exec.present(&self.cfg.table)?,
        };
        let plan = plan_withdraw(&self.cfg, self.installed.as_ref(), &present);
        self.run(&plan, Instant::now())?;
        self.installed = plan.next;
        Ok(())
    }

    fn name(&self) -> &'static str {
        "linux-nftables"
    }
}

/// Packet counts per (VIP, verdict) of the agent's tables, read from the kernel.
pub fn read_counters(
    cfg: &LinuxConfig,
) -> Result<std::collections::BTreeMap<(std::net::IpAddr, &'static str), u64>, DataPlaneError> {
    let out = exec::run(&cfg.nft, &["-j", "list", "counters"], None)?;
    plan::parse_counters(&out.stdout, &cfg.table).map_err(|detail| DataPlaneError::Command {
        command: format!("{} -j list counters", cfg.nft),
        detail,
    })
}

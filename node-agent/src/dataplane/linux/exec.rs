//! The executor: the only code of the Linux backend that touches the OS. It
//! sends nftables transactions in process (renewals over netlink,
//! [`super::lease_write`]; the rest through [`super::libnft`], one batch per
//! step), runs `ip`, writes /proc/sys, and holds one UDP socket per joined
//! multicast group.
//!
//! Sysctl values it replaces, and the VIPs it added, are remembered in a small
//! JSON state file (`<state_dir>/linux-<table>.json`) so that an agent restarted
//! after a crash still restores the host's original values and removes its
//! addresses on the final teardown.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vipshare_core::agent::{after_ack, AfterAck};

use super::deadline::wall_clock_ns;
use super::lease_write::LeaseWriter;
use super::libnft::Nft;
use super::mrd::MrdSender;
use super::nd::NdResponder;
use super::plan::{address_holder, recv_device_commands, Family, NftBatch, Present, Step};
use super::LinuxConfig;
use crate::dataplane::{DataPlaneError, Interface, Mac, SwitchMode, VipConfig};

/// Runs plan steps. `started` is when the apply began: element timeouts are
/// rendered relative to it.
pub trait Executor {
    fn execute(&mut self, step: &Step, started: Instant) -> Result<(), DataPlaneError>;
    /// VIPs added by an earlier run of the agent (from its state file).
    fn remembered_vips(&self) -> Vec<VipConfig> {
        Vec::new()
    }
    /// The objects the kernel holds in the agent's tables now, read before a
    /// rebuild so that it can replace them in place.
    fn present(&mut self, table: &str) -> Result<Present, DataPlaneError>;
    /// The host's interfaces (name, up, IPv4 addresses), for health reports.
    fn interfaces(&mut self) -> Result<BTreeMap<String, Interface>, DataPlaneError> {
        Ok(BTreeMap::new())
    }
}

/// What survives an agent restart.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct State {
    /// Original values of the sysctls the agent changed.
    sysctls: BTreeMap<String, String>,
    /// VIP addresses the agent added: (interface, address, prefix length, MAC).
    vips: BTreeSet<(String, IpAddr, u8, String)>,
}

/// The real executor.
pub struct OsExecutor {
    nft: Nft,
    lease: LeaseWriter,
    budget: Duration,
    ip: String,
    sysctl_root: PathBuf,
    state_file: Option<PathBuf>,
    state: State,
    groups: HashMap<(String, IpAddr), UdpSocket>,
    /// Started with the first IPv6 VIP.
    nd: Option<NdResponder>,
    /// Started with the first `igmp` VIP.
    mrd: Option<MrdSender>,
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DataPlaneError {
    let context = context.into();
    move |source| DataPlaneError::Io { context, source }
}

impl OsExecutor {
    pub fn new(cfg: &LinuxConfig) -> Result<Self, DataPlaneError> {
        let state_file = cfg
            .state_dir
            .as_ref()
            .map(|d| d.join(format!("linux-{}.json", cfg.table)));
        let state = match &state_file {
            Some(f) if f.exists() => {
                let text = std::fs::read_to_string(f)
                    .map_err(io_err(format!("reading {}", f.display())))?;
                serde_json::from_str(&text)
                    .map_err(|e| DataPlaneError::InvalidDesired(format!("{}: {e}", f.display())))?
            }
            _ => State::default(),
        };
        Ok(OsExecutor {
            nft: Nft::new()?,
            lease: LeaseWriter::open()?,
            budget: default_kernel_delay_budget(),
            ip: cfg.ip.clone(),
            sysctl_root: cfg.sysctl_root.clone(),
            state_file,
            state,
            groups: HashMap::new(),
            nd: None,
            mrd: None,
        })
    }

    /// Sets the longest lease-write round trip let stand (default
    /// [`default_kernel_delay_budget`]); at most the cluster's
    /// `kernel_delay_ms`.
    pub fn with_kernel_delay_budget(mut self, budget: Duration) -> Self {
        self.budget = budget;
        self
    }

    fn save(&self) -> Result<(), DataPlaneError> {
        let Some(f) = &self.state_file else {
            return Ok(());
        };
        if self.state == State::default() {
            return match std::fs::remove_file(f) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(io_err(format!("removing {}", f.display()))(e))
                }
                _ => Ok(()),
            };
        }
        if let Some(dir) = f.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        }
        let tmp = f.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(&self.state).expect("state serialises");
        std::fs::write(&tmp, text).map_err(io_err(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, f).map_err(io_err(format!("renaming {}", tmp.display())))
    }

    fn sysctl_path(&self, key: &str) -> PathBuf {
        self.sysctl_root.join(key.replace('.', "/"))
    }

    fn read_sysctl(&self, key: &str) -> Result<String, DataPlaneError> {
        let p = self.sysctl_path(key);
        std::fs::read_to_string(&p)
            .map(|s| s.trim().to_string())
            .map_err(io_err(format!("reading sysctl {key}")))
    }

    fn write_sysctl(&self, key: &str, value: &str) -> Result<(), DataPlaneError> {
        std::fs::write(self.sysctl_path(key), value).map_err(io_err(format!("setting {key}")))
    }

    fn set_sysctl(&mut self, key: &str, value: &str) -> Result<(), DataPlaneError> {
        let current = self.read_sysctl(key)?;
        if current == value {
            return Ok(());
        }
        if !self.state.sysctls.contains_key(key) {
            self.state.sysctls.insert(key.to_string(), current);
            self.save()?;
        }
        self.write_sysctl(key, value)
    }

    fn restore_sysctls(&mut self) -> Result<(), DataPlaneError> {
        let mut first_err = None;
        for (key, value) in std::mem::take(&mut self.state.sysctls) {
            // An interface that is gone took its sysctls with it.
            if !self.sysctl_path(&key).exists() {
                continue;
            }
            if let Err(e) = self.write_sysctl(&key, &value) {
                first_err.get_or_insert(e);
            }
        }
        self.save()?;
        first_err.map_or(Ok(()), Err)
    }

    fn ip_output(&self, args: &[&str]) -> Result<String, DataPlaneError> {
        run(&self.ip, args, None).map(|o| o.stdout)
    }

    /// The interface's addresses of `family` with prefix lengths, in kernel
    /// order.
    fn addresses(
        &self,
        interface: &str,
        family: Family,
    ) -> Result<Vec<(IpAddr, u8)>, DataPlaneError> {
        let out = self.ip_output(&[family.ip_flag, "-o", "addr", "show", "dev", interface])?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                w.find(|&x| x == family.ip_addr_word)?;
                let (a, p) = w.next()?.split_once('/')?;
                Some((a.parse().ok()?, p.parse().ok()?))
            })
            .collect())
    }

    fn add_address(&mut self, vip: &VipConfig) -> Result<(), DataPlaneError> {
        let addr = vip.addr;
        let family = Family::of(addr);
        let (holder, prefix_len, flags) = address_holder(vip);
        let interface = holder.as_str();
        let have = self.addresses(interface, family)?;
        self.state.vips.insert((
            vip.interface.clone(),
            addr,
            vip.prefix_len,
            vip.mac.to_string(),
        ));
        self.save()?;
        if have.contains(&(addr, prefix_len)) {
            return Ok(());
        }
        // An IPv6 VIP lives on loopback, where source selection never
        // prefers it over the outgoing interface's own address.
        let own = if interface == vip.interface {
            have.clone()
        } else {
            self.addresses(&vip.interface, family)?
        };
        if family == Family::V4 && !own.iter().any(|(a, _)| *a != addr) {
            return Err(DataPlaneError::Command {
                command: format!("ip addr add {addr}/{prefix_len} dev {interface}"),
                detail: format!(
                    "{} has no IPv4 address of its own; the VIP must come after it \
                     (secondary), or the host would use the VIP as its source address",
                    vip.interface
                ),
            });
        }
        let cidr = format!("{addr}/{prefix_len}");
        let mut args = vec![family.ip_flag, "addr", "add", &cidr, "dev", interface];
        args.extend(flags.split_whitespace());
        run(&self.ip, &args, None)?;
        Ok(())
    }

    fn del_address(&mut self, vip: &VipConfig) -> Result<(), DataPlaneError> {
        let family = Family::of(vip.addr);
        let (holder, prefix_len, _) = address_holder(vip);
        let interface = holder.as_str();
        // Missing interface or address: nothing to remove.
        let present = self
            .addresses(interface, family)
            .map(|a| a.contains(&(vip.addr, prefix_len)))
            .unwrap_or(false);
        if present {
            let cidr = format!("{}/{prefix_len}", vip.addr);
            run(
                &self.ip,
                &[family.ip_flag, "addr", "del", &cidr, "dev", interface],
                None,
            )?;
        }
        self.state.vips.retain(|(i, a, p, _)| {
            !(*i == vip.interface && *a == vip.addr && *p == vip.prefix_len)
        });
        self.save()
    }

    fn has_static_maddr(&self, interface: &str, mac: &str) -> Result<bool, DataPlaneError> {
        let out = self.ip_output(&["maddr", "show", "dev", interface])?;
        Ok(out.lines().any(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.first() == Some(&"link") && w.get(1) == Some(&mac) && w.contains(&"static")
        }))
    }

    /// Joins `group` on `interface` (IGMP or MLD by the group's family)
    /// through a socket held until the group is left.
    fn join(&mut self, interface: &str, group: IpAddr) -> Result<(), DataPlaneError> {
        let key = (interface.to_string(), group);
        if self.groups.contains_key(&key) {
            return Ok(());
        }
        let index = super::nd::if_index(interface)?;
        let what = format!("joining {group} on {interface}");
        let sock = match group {
            IpAddr::V4(g) => {
                let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
                    .map_err(io_err("binding a socket for IGMP membership"))?;
                let mreq = libc::ip_mreqn {
                    imr_multiaddr: libc::in_addr {
                        s_addr: u32::from(g).to_be(),
                    },
                    imr_address: libc::in_addr { s_addr: 0 },
                    imr_ifindex: index as i32,
                };
                super::sys::setsockopt(
                    &sock,
                    libc::IPPROTO_IP,
                    libc::IP_ADD_MEMBERSHIP,
                    &mreq,
                    &what,
                )?;
                sock
            }
            IpAddr::V6(g) => {
                let sock = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))
                    .map_err(io_err("binding a socket for MLD membership"))?;
                let mreq = libc::ipv6_mreq {
                    ipv6mr_multiaddr: libc::in6_addr {
                        s6_addr: g.octets(),
                    },
                    ipv6mr_interface: index,
                };
                super::sys::setsockopt(
                    &sock,
                    libc::IPPROTO_IPV6,
                    libc::IPV6_ADD_MEMBERSHIP,
                    &mreq,
                    &what,
                )?;
                sock
            }
        };
        self.groups.insert(key, sock);
        Ok(())
    }

    /// `ip -o link show dev DEVICE` split into (lower interface, flags,
    /// MAC); `None` when there is no such device. Through `ip`, not /sys:
    /// /sys shows the network namespace it was mounted in, not the caller's.
    fn link(&self, device: &str) -> Option<(String, Vec<String>, String)> {
        let out = self
            .ip_output(&["-o", "link", "show", "dev", device])
            .ok()?;
        // "7: vsu..@eth0: <BROADCAST,NOARP,UP,LOWER_UP> mtu .. link/ether 02:.. brd .."
        let mut w = out.split_whitespace();
        let name = w.nth(1)?.trim_end_matches(':');
        let lower = name.split_once('@').map_or("", |(_, l)| l).to_string();
        let flags = w
            .next()?
            .trim_matches(|c| c == '<' || c == '>')
            .split(',')
            .map(str::to_string)
            .collect();
        let mac = w
            .skip_while(|x| *x != "link/ether")
            .nth(1)
            .unwrap_or("")
            .to_string();
        Some((lower, flags, mac))
    }

    /// Creates (or re-asserts) the receive-only device of a shared unicast
    /// MAC by running [`recv_device_commands`]; a device of that name with
    /// another MAC or lower interface is replaced. Every rebuild re-asserts
    /// it, so a device already as wanted costs one `ip` process to look at
    /// it and the sysctl writes: a rebuild holds up the lease renewals.
    fn add_recv_device(
        &mut self,
        interface: &str,
        device: &str,
        mac: &Mac,
    ) -> Result<(), DataPlaneError> {
        let mut commands = recv_device_commands(interface, device, mac);
        if let Some((lower, flags, have)) = self.link(device) {
            if lower == interface && have == mac.to_string() {
                commands.remove(0);
                let has = |f: &str| flags.iter().any(|x| x == f);
                if has("UP") && has("NOARP") && !has("MULTICAST") {
                    commands.retain(|c| c.starts_with("sysctl "));
                }
            } else {
                run(&self.ip, &["link", "del", device], None)?;
            }
        }
        for c in &commands {
            let words: Vec<&str> = c.split_whitespace().collect();
            match words.split_first() {
                Some((&"ip", args)) => {
                    run(&self.ip, args, None)?;
                }
                Some((&"sysctl", [kv])) => {
                    let (key, value) = kv.split_once('=').ok_or_else(|| {
                        DataPlaneError::InvalidDesired(format!("bad sysctl line {c:?}"))
                    })?;
                    // Not remembered: the values go with the device.
                    self.write_sysctl(key, value)?;
                }
                _ => {
                    return Err(DataPlaneError::InvalidDesired(format!(
                        "unknown receive device command {c:?}"
                    )))
                }
            }
        }
        Ok(())
    }
}

/// What a command printed.
pub struct Output {
    pub stdout: String,
}

/// Runs `program args`, feeding `stdin` if given; fails with the command line
/// and its stderr unless it exits 0.
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<Output, DataPlaneError> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = cmd.spawn().map_err(io_err(format!("running {program}")))?;
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        pipe.write_all(text.as_bytes())
            .map_err(io_err(format!("writing to {program}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(io_err(format!("waiting for {program}")))?;
    if !out.status.success() {
        let mut command = format!("{program} {}", args.join(" "));
        if let Some(input) = stdin {
            command.push_str(&format!(" <<EOF\n{input}EOF"));
        }
        return Err(DataPlaneError::Command {
            command,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(Output {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    })
}

/// Default longest round trip, from reading the clock for the element
/// timeouts to the kernel's ack, that is let stand: the lease protocol's
/// default `kernel_delay_ms` ("worst time from the agent deciding to the
/// kernel enforcing it"), which the lease already allows for.
pub fn default_kernel_delay_budget() -> Duration {
    Duration::from_millis(vipshare_core::lease::LeaseTiming::default().kernel_delay_ms)
}

/// Sends a batch whose element timeouts are relative to `started`: the clock
/// is read immediately before the send and the timeouts rendered from it. The
/// kernel counts a timeout from its insert, somewhere between that reading and
/// the ack, so an element can outlive the lease by at most the round trip.
/// What a round trip past `budget` calls for is decided in core
/// ([`vipshare_core::agent::late_write`], also run by the simulator): write the
/// elements again at once from a fresh reading, and if that is late as well,
/// delete the owned elements and fail with [`DataPlaneError::LateWrite`].
/// Every batch with elements also writes the lease's absolute deadline.
pub fn nft_timed_batch(
    nft: &mut Nft,
    lease: &mut LeaseWriter,
    batch: &NftBatch,
    started: Instant,
    budget: Duration,
) -> Result<(), DataPlaneError> {
    // Nothing to accept: a late write extends nothing.
    let Some(elements) = batch.elements.as_ref().filter(|e| !e.owned.is_empty()) else {
        timed_send(nft, lease, batch, started)?;
        return Ok(());
    };
    let again = NftBatch {
        fixed: elements.flush(),
        elements: batch.elements.clone(),
    };
    let mut sending = batch;
    let mut rewrite = false;
    loop {
        let lag = timed_send(nft, lease, sending, started)?;
        match after_ack(lag, budget, rewrite) {
            AfterAck::Done => return Ok(()),
            AfterAck::WriteAgain => {
                crate::metrics::late_kernel_write();
                tracing::warn!(
                    ?lag,
                    ?budget,
                    "lease write acknowledged late; writing it again"
                );
                sending = &again;
                rewrite = true;
            }
            AfterAck::DeleteOwned => {
                crate::metrics::late_kernel_write();
                tracing::warn!(
                    ?lag,
                    ?budget,
                    "lease write late again; owned elements deleted"
                );
                lease.flush(elements)?;
                return Err(DataPlaneError::LateWrite { lag, budget });
            }
        }
    }
}

/// Renders `batch` from the clock read now and sends it; returns the time
/// from that reading to the kernel's ack. A renewal (the elements and nothing
/// else) is one netlink transaction with the deadline; anything more goes
/// through libnftables, then the deadline follows.
fn timed_send(
    nft: &mut Nft,
    lease: &mut LeaseWriter,
    batch: &NftBatch,
    started: Instant,
) -> Result<Duration, DataPlaneError> {
    let read_at = Instant::now();
    let elapsed = read_at.saturating_duration_since(started);
    match &batch.elements {
        Some(e) if batch.fixed == e.flush() => {
            let left = e.until.saturating_sub(elapsed);
            let left = Duration::from_millis(u64::try_from(left.as_millis()).unwrap_or(u64::MAX));
            lease.write(e, left, wall_clock_ns(started + e.until))?;
        }
        Some(e) => {
            nft.run(&batch.render(elapsed))?;
            let families: Vec<&str> = e.keys.iter().map(|(f, _)| f.nft).collect();
            lease.deadline(&families, &e.table, wall_clock_ns(started + e.until))?;
        }
        None => {
            nft.run(&batch.render(elapsed))?;
        }
    }
    Ok(read_at.elapsed())
}

impl Executor for OsExecutor {
    fn execute(&mut self, step: &Step, started: Instant) -> Result<(), DataPlaneError> {
        match step {
            Step::Nft(batch) => {
                nft_timed_batch(&mut self.nft, &mut self.lease, batch, started, self.budget)
            }
            Step::Sysctl { key, value } => self.set_sysctl(key, value),
            Step::RestoreSysctls => self.restore_sysctls(),
            Step::AddAddress(v) => self.add_address(v),
            Step::DelAddress(v) => self.del_address(v),
            Step::AddMaddr { interface, mac } => {
                let m = mac.to_string();
                if !self.has_static_maddr(interface, &m)? {
                    run(&self.ip, &["maddr", "add", &m, "dev", interface], None)?;
                }
                Ok(())
            }
            Step::DelMaddr { interface, mac } => {
                let m = mac.to_string();
                if self.has_static_maddr(interface, &m).unwrap_or(false) {
                    run(&self.ip, &["maddr", "del", &m, "dev", interface], None)?;
                }
                Ok(())
            }
            Step::JoinGroup { interface, group } => self.join(interface, *group),
            Step::AdvertiseRouter { interface, to } => {
                let mrd = match &mut self.mrd {
                    Some(m) => m,
                    None => self.mrd.insert(MrdSender::start()?),
                };
                mrd.advertise(interface, *to)
            }
            Step::StopAdvertising { interface, to } => {
                if let Some(m) = &self.mrd {
                    m.stop(interface, *to);
                }
                Ok(())
            }
            Step::AddRecvDevice {
                interface,
                device,
                mac,
            } => self.add_recv_device(interface, device, mac),
            Step::DelRecvDevice { device } => {
                if self.link(device).is_some() {
                    run(&self.ip, &["link", "del", device], None)?;
                }
                Ok(())
            }
            Step::LeaveGroup { interface, group } => {
                // Closing the socket leaves the group.
                self.groups.remove(&(interface.clone(), *group));
                Ok(())
            }
            Step::AnswerNd {
                interface,
                addr,
                mac,
            } => {
                let nd = match &mut self.nd {
                    Some(nd) => nd,
                    None => self.nd.insert(NdResponder::start()?),
                };
                nd.answer(interface, *addr, *mac)
            }
            Step::StopNd { interface, addr } => match &mut self.nd {
                Some(nd) => nd.stop(interface, *addr),
                None => Ok(()),
            },
        }
    }

    fn present(&mut self, table: &str) -> Result<Present, DataPlaneError> {
        let out = self.nft.run_json("list ruleset")?;
        Present::from_listing(&out, table).map_err(|detail| DataPlaneError::Command {
            command: "nft -j list ruleset".into(),
            detail,
        })
    }

    fn interfaces(&mut self) -> Result<BTreeMap<String, Interface>, DataPlaneError> {
        let mut out: BTreeMap<String, Interface> = BTreeMap::new();
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        // SAFETY: getifaddrs fills `head` with a list freed below.
        if unsafe { libc::getifaddrs(&mut head) } != 0 {
            return Err(io_err("listing interfaces")(std::io::Error::last_os_error()));
        }
        let mut cur = head;
        while !cur.is_null() {
            // SAFETY: a node of the list getifaddrs returned, not yet freed.
            let ifa = unsafe { &*cur };
            // SAFETY: ifa_name is a NUL-terminated string of the node.
            let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
                .to_string_lossy()
                .into_owned();
            let up_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_uint;
            let entry = out.entry(name).or_default();
            entry.up |= ifa.ifa_flags & up_flags == up_flags;
            let family = if ifa.ifa_addr.is_null() {
                0
            } else {
                // SAFETY: a non-NULL sockaddr of the node.
                i32::from(unsafe { (*ifa.ifa_addr).sa_family })
            };
            if family == libc::AF_INET {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                entry
                    .addrs
                    .insert(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into());
            } else if family == libc::AF_INET6 {
                // SAFETY: an AF_INET6 address is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                entry
                    .addrs
                    .insert(std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr).into());
            }
            cur = ifa.ifa_next;
        }
        // SAFETY: the list from getifaddrs, freed once.
        unsafe { libc::freeifaddrs(head) };
        Ok(out)
    }

    fn remembered_vips(&self) -> Vec<VipConfig> {
        self.state
            .vips
            .iter()
            .map(|(interface, addr, prefix_len, mac)| {
                let mac = mac.parse().unwrap_or(Mac([1, 0, 0, 0, 0, 0]));
                VipConfig {
                    addr: *addr,
                    prefix_len: *prefix_len,
                    mac,
                    interface: interface.clone(),
                    // For the teardown: a unicast MAC had its receive device
                    // (igmp's joins and adverts die with the process).
                    mode: if mac.is_multicast() {
                        SwitchMode::Multicast
                    } else {
                        SwitchMode::Unicast
                    },
                }
            })
            .collect()
    }
}

/// Records the steps instead of running them (tests, dry runs).
pub type RecordingExecutor = crate::dataplane::RecordingExecutor<Step>;

impl Executor for RecordingExecutor {
    fn execute(&mut self, step: &Step, _started: Instant) -> Result<(), DataPlaneError> {
        self.record(step)
    }

    /// An empty kernel: every rebuild is planned as a first start.
    fn present(&mut self, _table: &str) -> Result<Present, DataPlaneError> {
        Ok(Present::default())
    }
}

/// Reads the remaining lifetimes of the owned sets' elements, every filter
/// family (empty when no table exists).
pub fn owned_expiries(nft: &str, table: &str) -> Vec<std::time::Duration> {
    Family::ALL
        .iter()
        .flat_map(|f| {
            run(nft, &["list", "set", f.nft, table, "owned"], None)
                .map(|o| super::plan::parse_expires(&o.stdout))
                .unwrap_or_default()
        })
        .collect()
}

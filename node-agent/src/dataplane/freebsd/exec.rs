//! The executor: the only code of the FreeBSD backend that touches the OS.

use std::collections::HashMap;
use std::ffi::CString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket};
use std::process::Command;
use std::time::Instant;

use super::plan::Step;
use super::watchdog::WatchdogLink;
use crate::dataplane::DataPlaneError;

/// Runs plan steps. `started` is when the apply began: deadlines in steps are
/// relative to it.
pub trait Executor {
    fn execute(&mut self, step: &Step, started: Instant) -> Result<(), DataPlaneError>;

    /// The value of sysctl `name`, `None` when the kernel has no such node.
    fn probe_sysctl(&mut self, sysctl: &str, name: &str) -> Option<String>;
}

/// Nanoseconds of kernel uptime now: FreeBSD's `CLOCK_UPTIME` is the clock of
/// `getsbinuptime()`, which the srcjhash lease deadlines are compared with.
fn uptime_ns() -> Result<u64, DataPlaneError> {
    #[cfg(target_os = "freebsd")]
    let clock = libc::CLOCK_UPTIME;
    #[cfg(not(target_os = "freebsd"))]
    let clock = libc::CLOCK_MONOTONIC;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return Err(DataPlaneError::Io {
            context: "reading the uptime clock".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// The index of `interface` (MLD joins name the interface by index).
fn interface_index(interface: &str) -> Result<u32, DataPlaneError> {
    let name = CString::new(interface).map_err(|_| {
        DataPlaneError::InvalidDesired(format!("interface name {interface:?} contains NUL"))
    })?;
    // SAFETY: name is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(DataPlaneError::Io {
            context: format!("looking up interface {interface}"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(index)
}

/// Runs commands with `std::process::Command`, holds one UDP socket per joined
/// multicast group (membership lasts while the socket is open: if the agent
/// dies, the host leaves the group, and switches stop sending it the VIP's
/// frames), and forwards watchdog steps to a [`WatchdogLink`].
pub struct OsExecutor<W: WatchdogLink> {
    groups: HashMap<(IpAddr, IpAddr, String), UdpSocket>,
    watchdog: W,
}

impl<W: WatchdogLink> OsExecutor<W> {
    pub fn new(watchdog: W) -> Self {
        OsExecutor {
            groups: HashMap::new(),
            watchdog,
        }
    }
}

fn run_command(argv: &[String], may_fail: bool) -> Result<(), DataPlaneError> {
    let (program, args) = argv.split_first().ok_or_else(|| DataPlaneError::Command {
        command: String::new(),
        detail: "empty command".into(),
    })?;
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| DataPlaneError::Io {
            context: format!("running {program}"),
            source,
        })?;
    if output.status.success() || may_fail {
        Ok(())
    } else {
        Err(DataPlaneError::Command {
            command: argv.join(" "),
            detail: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        })
    }
}

impl<W: WatchdogLink> Executor for OsExecutor<W> {
    fn execute(&mut self, step: &Step, started: Instant) -> Result<(), DataPlaneError> {
        match step {
            Step::Run { argv, may_fail } => run_command(argv, *may_fail),
            Step::JoinGroup {
                group,
                via,
                interface,
            } => {
                let key = (*group, *via, interface.clone());
                if self.groups.contains_key(&key) {
                    return Ok(());
                }
                let io = |context: String| move |source| DataPlaneError::Io { context, source };
                let context = format!("joining {group} on {interface}");
                let sock = match (group, via) {
                    (IpAddr::V4(g), IpAddr::V4(v)) => {
                        let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
                            .map_err(io("binding a socket for IGMP membership".into()))?;
                        sock.join_multicast_v4(g, v).map_err(io(context))?;
                        sock
                    }
                    (IpAddr::V6(g), _) => {
                        let index = interface_index(interface)?;
                        let sock = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))
                            .map_err(io("binding a socket for MLD membership".into()))?;
                        sock.join_multicast_v6(g, index).map_err(io(context))?;
                        sock
                    }
                    (IpAddr::V4(_), IpAddr::V6(_)) => {
                        return Err(DataPlaneError::InvalidDesired(format!(
                            "IPv4 group {group} joined via the IPv6 address {via}"
                        )))
                    }
                };
                self.groups.insert(key, sock);
                Ok(())
            }
            Step::LeaveGroup {
                group,
                via,
                interface,
            } => {
                // Closing the socket leaves the group.
                self.groups.remove(&(*group, *via, interface.clone()));
                Ok(())
            }
            Step::ArmWatchdog { stop_after } => self
                .watchdog
                .arm(stop_after.saturating_sub(started.elapsed())),
            Step::DisarmWatchdog => self.watchdog.disarm(),
            Step::AddSharedAddress {
                interface,
                addr,
                prefix_len,
            } => super::shared_addr::add_shared_address(interface, *addr, *prefix_len),
            Step::ProxyNd {
                interface,
                addr,
                mac,
            } => {
                let done = interface_index(interface).and_then(|index| {
                    super::proxy_nd::set_proxy_entry(interface, index, *addr, *mac)
                });
                // Deleting what is not there (any more) is fine.
                if mac.is_none() {
                    return Ok(());
                }
                done
            }
            Step::SetLease {
                sysctl,
                map,
                stop_after,
                buckets,
            } => {
                // Absolute, from the apply's start: running this step late
                // does not move the deadline.
                let deadline_ns = if stop_after.is_zero() {
                    0
                } else {
                    let at_start = uptime_ns()?.saturating_sub(started.elapsed().as_nanos() as u64);
                    at_start + stop_after.as_nanos() as u64
                };
                run_command(
                    &[
                        sysctl.clone(),
                        super::plan::lease_assignment(*map, deadline_ns, buckets),
                    ],
                    false,
                )
            }
        }
    }

    fn probe_sysctl(&mut self, sysctl: &str, name: &str) -> Option<String> {
        let out = Command::new(sysctl).args(["-n", name]).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

/// Records the steps instead of running them (tests, dry runs).
pub type RecordingExecutor = crate::dataplane::RecordingExecutor<Step>;

impl Executor for RecordingExecutor {
    fn execute(&mut self, step: &Step, _started: Instant) -> Result<(), DataPlaneError> {
        self.record(step)
    }

    /// A stock kernel: no sysctl beyond what the steps set.
    fn probe_sysctl(&mut self, _sysctl: &str, _name: &str) -> Option<String> {
        None
    }
}

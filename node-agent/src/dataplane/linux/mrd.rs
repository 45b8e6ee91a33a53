//! RFC 4286 Multicast Router Advertisements for [`SwitchMode::Igmp`]: one
//! thread sends them on every (interface, all-snoopers group) it is given.
//!
//! Why: a switch snooping IGMP/MLD by IP destination (a Linux bridge, see
//! deploy/NETWORK.md) forwards a multicast frame whose IP destination is
//! unicast (the VIP's traffic) only to its multicast router ports once a
//! querier is active; joining a group does not help there. A port on which a
//! Multicast Router Advertisement arrives becomes a router port (for 255 s on
//! a Linux bridge by default), so advertising from every host puts every
//! host's port on the VIP's path. IPv4: IGMP type 0x30 to 224.0.0.106 with
//! the router alert option; IPv6: ICMPv6 type 151 to ff02::6a behind a
//! hop-by-hop router alert (the Linux bridge looks at MLD only behind one).
//!
//! [`SwitchMode::Igmp`]: crate::dataplane::SwitchMode::Igmp

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::plan::MRD_INTERVAL;
use super::sys::setsockopt;
use crate::dataplane::DataPlaneError;

/// Advertisements sent at a faster pace when a target is added (RFC 4286
/// MAX_INITIAL_ADVERTISEMENTS and MAX_INITIAL_ADVERT_INTERVAL): a switch that
/// lost the first one still learns the port within seconds.
const INITIAL: u8 = 3;
const INITIAL_INTERVAL: Duration = Duration::from_secs(2);
/// What the advertisement announces (RFC 4286 3.1: the sender's IGMP/MLD
/// query interval and robustness; the defaults of RFC 3376/3810).
const QUERY_INTERVAL_S: u16 = 125;
const ROBUSTNESS: u16 = 2;

const IGMP_MRDISC_ADV: u8 = 0x30;
const ICMPV6_MRDISC_ADV: u8 = 151;

/// The 8-byte advertisement; `igmp_checksum` fills the checksum (IPv4; the
/// kernel computes ICMPv6 checksums itself).
pub fn advertisement(icmp_type: u8, igmp_checksum: bool) -> [u8; 8] {
    let interval = MRD_INTERVAL.as_secs().min(255) as u8;
    let q = QUERY_INTERVAL_S.to_be_bytes();
    let r = ROBUSTNESS.to_be_bytes();
    let mut p = [icmp_type, interval, 0, 0, q[0], q[1], r[0], r[1]];
    if igmp_checksum {
        let sum = checksum(&p).to_be_bytes();
        p[2] = sum[0];
        p[3] = sum[1];
    }
    p
}

/// The Internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

struct Target {
    index: u32,
    initial_left: u8,
    next: Instant,
}

#[derive(Default)]
struct State {
    targets: BTreeMap<(String, IpAddr), Target>,
    v4: Option<Arc<OwnedFd>>,
    v6: Option<Arc<OwnedFd>>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

/// The sender thread and the interfaces it advertises on.
pub struct MrdSender {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The thread only reads and reschedules: a panic leaves nothing half-written.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn open_v4() -> Result<OwnedFd, DataPlaneError> {
    let sock = super::sys::socket(
        libc::AF_INET,
        libc::SOCK_RAW,
        libc::IPPROTO_IGMP,
        "raw IGMP socket for multicast router advertisements",
    )?;
    // Router alert (RFC 2113), as IGMP messages carry.
    let ra: [u8; 4] = [0x94, 0x04, 0, 0];
    setsockopt(&sock, libc::IPPROTO_IP, libc::IP_OPTIONS, &ra, "IP_OPTIONS")?;
    let ttl: libc::c_int = 1;
    let off: libc::c_int = 0;
    setsockopt(
        &sock,
        libc::IPPROTO_IP,
        libc::IP_MULTICAST_TTL,
        &ttl,
        "IP_MULTICAST_TTL",
    )?;
    setsockopt(
        &sock,
        libc::IPPROTO_IP,
        libc::IP_MULTICAST_LOOP,
        &off,
        "IP_MULTICAST_LOOP",
    )?;
    Ok(sock)
}

fn open_v6() -> Result<OwnedFd, DataPlaneError> {
    let sock = super::sys::socket(
        libc::AF_INET6,
        libc::SOCK_RAW,
        libc::IPPROTO_ICMPV6,
        "raw ICMPv6 socket for multicast router advertisements",
    )?;
    // Hop-by-hop header with a router alert for MLD (RFC 2711, value 0) and
    // a two-byte PadN: the bridge parses MLD only behind it.
    let hbh: [u8; 8] = [0, 0, 5, 2, 0, 0, 1, 0];
    setsockopt(
        &sock,
        libc::IPPROTO_IPV6,
        libc::IPV6_HOPOPTS,
        &hbh,
        "IPV6_HOPOPTS",
    )?;
    let hops: libc::c_int = 1;
    let off: libc::c_int = 0;
    setsockopt(
        &sock,
        libc::IPPROTO_IPV6,
        libc::IPV6_MULTICAST_HOPS,
        &hops,
        "IPV6_MULTICAST_HOPS",
    )?;
    setsockopt(
        &sock,
        libc::IPPROTO_IPV6,
        libc::IPV6_MULTICAST_LOOP,
        &off,
        "IPV6_MULTICAST_LOOP",
    )?;
    Ok(sock)
}

/// Sends one advertisement to `to` out of interface `index`.
fn send(sock: &OwnedFd, to: IpAddr, index: u32) -> std::io::Result<()> {
    let fd = sock.as_raw_fd();
    let rc = match to {
        IpAddr::V4(group) => {
            let mreq = libc::ip_mreqn {
                imr_multiaddr: libc::in_addr {
                    s_addr: u32::from(group).to_be(),
                },
                imr_address: libc::in_addr { s_addr: 0 },
                imr_ifindex: index as i32,
            };
            setsockopt(
                sock,
                libc::IPPROTO_IP,
                libc::IP_MULTICAST_IF,
                &mreq,
                "IP_MULTICAST_IF",
            )
            .map_err(std::io::Error::other)?;
            let p = advertisement(IGMP_MRDISC_ADV, true);
            // SAFETY: zeroed plain-old-data, filled in below.
            let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            sa.sin_family = libc::AF_INET as libc::sa_family_t;
            sa.sin_addr.s_addr = u32::from(group).to_be();
            // SAFETY: live buffers of the sizes passed.
            unsafe {
                libc::sendto(
                    fd,
                    p.as_ptr().cast(),
                    p.len(),
                    0,
                    (&sa as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            }
        }
        IpAddr::V6(group) => {
            let idx = index as libc::c_int;
            setsockopt(
                sock,
                libc::IPPROTO_IPV6,
                libc::IPV6_MULTICAST_IF,
                &idx,
                "IPV6_MULTICAST_IF",
            )
            .map_err(std::io::Error::other)?;
            let p = advertisement(ICMPV6_MRDISC_ADV, false);
            // SAFETY: zeroed plain-old-data, filled in below.
            let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sa.sin6_addr.s6_addr = group.octets();
            sa.sin6_scope_id = index;
            // SAFETY: live buffers of the sizes passed.
            unsafe {
                libc::sendto(
                    fd,
                    p.as_ptr().cast(),
                    p.len(),
                    0,
                    (&sa as *const libc::sockaddr_in6).cast(),
                    std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            }
        }
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn serve(shared: &Shared) {
    let mut st = shared.lock();
    loop {
        if st.stop {
            return;
        }
        let now = Instant::now();
        let (v4, v6) = (st.v4.clone(), st.v6.clone());
        for ((interface, to), t) in st.targets.iter_mut() {
            if t.next > now {
                continue;
            }
            let sock = if to.is_ipv4() { &v4 } else { &v6 };
            if let Some(sock) = sock {
                // A failed send (an IPv6 interface whose link-local address
                // is still tentative, a link down) is tried again next time.
                if let Err(e) = send(sock, *to, t.index) {
                    tracing::debug!(%interface, %to, error = %e, "multicast router advertisement not sent");
                }
            }
            if t.initial_left > 0 {
                t.initial_left -= 1;
                t.next = now + INITIAL_INTERVAL;
            } else {
                t.next = now + MRD_INTERVAL;
            }
        }
        let wait = st
            .targets
            .values()
            .map(|t| t.next.saturating_duration_since(now))
            .min()
            .unwrap_or(MRD_INTERVAL);
        st = shared
            .wake
            .wait_timeout(st, wait)
            .map(|(g, _)| g)
            .unwrap_or_else(|e| e.into_inner().0);
    }
}

impl MrdSender {
    pub fn start() -> Result<Self, DataPlaneError> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("mrd-advertiser".into())
            .spawn(move || serve(&s))
            .map_err(|source| DataPlaneError::Io {
                context: "starting the multicast router advertisement thread".into(),
                source,
            })?;
        Ok(MrdSender {
            shared,
            thread: Some(thread),
        })
    }

    /// Advertises on `interface` to `to` from now on (the first at once); a
    /// target already advertised keeps its schedule.
    pub fn advertise(&self, interface: &str, to: IpAddr) -> Result<(), DataPlaneError> {
        let index = super::nd::if_index(interface)?;
        let mut st = self.shared.lock();
        match to {
            IpAddr::V4(_) if st.v4.is_none() => st.v4 = Some(Arc::new(open_v4()?)),
            IpAddr::V6(_) if st.v6.is_none() => st.v6 = Some(Arc::new(open_v6()?)),
            _ => {}
        }
        let key = (interface.to_string(), to);
        match st.targets.get_mut(&key) {
            // The interface may have been recreated with another index.
            Some(t) => t.index = index,
            None => {
                st.targets.insert(
                    key,
                    Target {
                        index,
                        initial_left: INITIAL,
                        next: Instant::now(),
                    },
                );
                self.shared.wake.notify_one();
            }
        }
        Ok(())
    }

    pub fn stop(&self, interface: &str, to: IpAddr) {
        self.shared
            .lock()
            .targets
            .remove(&(interface.to_string(), to));
    }
}

impl Drop for MrdSender {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertisements() {
        // Type, interval 20 s, checksum, query interval 125 s, robustness 2.
        let v4 = advertisement(IGMP_MRDISC_ADV, true);
        assert_eq!(v4[0], 0x30);
        assert_eq!(v4[1], 20);
        assert_eq!(&v4[4..], &[0, 125, 0, 2]);
        assert_eq!(checksum(&v4), 0, "a correct checksum sums to zero");
        let v6 = advertisement(ICMPV6_MRDISC_ADV, false);
        assert_eq!(v6, [151, 20, 0, 0, 0, 125, 0, 2]);
    }
}

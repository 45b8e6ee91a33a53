//! The neighbour-discovery responder for IPv6 VIPs: answers neighbour
//! solicitations for a VIP with the cluster's multicast MAC as the target
//! link-layer address, from user space (see [`super`] for why not the kernel).
//!
//! One raw ICMPv6 socket, filtered to solicitations, and one thread reading
//! it. For each VIP it answers, the socket is a member of the VIP's
//! solicited-node group on the VIP's interface (so the NIC and MLD-snooping
//! switches deliver the solicitations), and an unsolicited advertisement is
//! sent when it starts answering. Advertisements go out with hop limit 255
//! and the override flag; the kernel computes the ICMPv6 checksum (raw ICMPv6
//! sockets always do).

use std::collections::BTreeMap;
use std::net::Ipv6Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::sys::setsockopt;
use crate::dataplane::{DataPlaneError, Mac};

const ND_NEIGHBOR_SOLICIT: u8 = 135;
const ND_NEIGHBOR_ADVERT: u8 = 136;
/// `ICMP6_FILTER` (netinet/icmp6.h), option of `IPPROTO_ICMPV6`.
const ICMP6_FILTER: libc::c_int = 1;
const NA_SOLICITED: u8 = 0x40;
const NA_OVERRIDE: u8 = 0x20;
/// Option 2, target link-layer address, 1 unit of 8 bytes.
const OPT_TLLA: [u8; 2] = [2, 1];

/// (interface index, VIP) -> cluster MAC.
type Answers = BTreeMap<(u32, Ipv6Addr), Mac>;

struct Shared {
    sock: OwnedFd,
    answers: Mutex<Answers>,
    stop: AtomicBool,
}

/// Answers solicitations for the VIPs given to [`NdResponder::answer`].
pub struct NdResponder {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

fn os_err(context: String) -> DataPlaneError {
    DataPlaneError::Io {
        context,
        source: std::io::Error::last_os_error(),
    }
}

/// The interface index of `interface`.
pub fn if_index(interface: &str) -> Result<u32, DataPlaneError> {
    let name = std::ffi::CString::new(interface)
        .map_err(|_| DataPlaneError::InvalidDesired(format!("bad interface name {interface:?}")))?;
    // SAFETY: a NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(os_err(format!("interface {interface}")));
    }
    Ok(index)
}

/// The solicited-node multicast group of `addr` (RFC 4291 2.7.1).
pub fn solicited_node(addr: Ipv6Addr) -> Ipv6Addr {
    let o = addr.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

/// The advertisement for `target` with `mac` (checksum left to the kernel).
pub fn advertisement(target: Ipv6Addr, mac: Mac, solicited: bool) -> [u8; 32] {
    let mut p = [0u8; 32];
    p[0] = ND_NEIGHBOR_ADVERT;
    p[4] = NA_OVERRIDE | if solicited { NA_SOLICITED } else { 0 };
    p[8..24].copy_from_slice(&target.octets());
    p[24..26].copy_from_slice(&OPT_TLLA);
    p[26..32].copy_from_slice(&mac.0);
    p
}

/// The target of a neighbour solicitation (RFC 4861 7.1.1 checks that the
/// kernel does not already make: hop limit 255, code 0, length).
pub fn solicitation_target(packet: &[u8], hop_limit: Option<i32>) -> Option<Ipv6Addr> {
    if packet.len() < 24 || packet[0] != ND_NEIGHBOR_SOLICIT || packet[1] != 0 {
        return None;
    }
    if hop_limit != Some(255) {
        return None;
    }
    let target: [u8; 16] = packet[8..24].try_into().ok()?;
    let target = Ipv6Addr::from(target);
    (!target.is_multicast()).then_some(target)
}

fn in6(a: Ipv6Addr) -> libc::in6_addr {
    libc::in6_addr {
        s6_addr: a.octets(),
    }
}

impl NdResponder {
    /// Opens the socket and starts the thread (in the caller's network
    /// namespace).
    pub fn start() -> Result<Self, DataPlaneError> {
        let sock = super::sys::socket(
            libc::AF_INET6,
            libc::SOCK_RAW,
            libc::IPPROTO_ICMPV6,
            "raw ICMPv6 socket for neighbour discovery",
        )?;
        // Pass solicitations only: a set bit blocks its type.
        let mut filter = [u32::MAX; 8];
        let t = usize::from(ND_NEIGHBOR_SOLICIT);
        filter[t >> 5] &= !(1 << (t & 31));
        setsockopt(
            &sock,
            libc::IPPROTO_ICMPV6,
            ICMP6_FILTER,
            &filter,
            "ICMP6_FILTER",
        )?;
        let on: libc::c_int = 1;
        let hops: libc::c_int = 255;
        let off: libc::c_int = 0;
        for (name, value, what) in [
            (libc::IPV6_RECVPKTINFO, &on, "IPV6_RECVPKTINFO"),
            (libc::IPV6_RECVHOPLIMIT, &on, "IPV6_RECVHOPLIMIT"),
            (libc::IPV6_UNICAST_HOPS, &hops, "IPV6_UNICAST_HOPS"),
            (libc::IPV6_MULTICAST_HOPS, &hops, "IPV6_MULTICAST_HOPS"),
            (libc::IPV6_MULTICAST_LOOP, &off, "IPV6_MULTICAST_LOOP"),
        ] {
            setsockopt(&sock, libc::IPPROTO_IPV6, name, value, what)?;
        }
        // Wakes the thread to notice `stop`.
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        setsockopt(
            &sock,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &timeout,
            "SO_RCVTIMEO",
        )?;
        let shared = Arc::new(Shared {
            sock,
            answers: Mutex::new(BTreeMap::new()),
            stop: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("nd-responder".into())
            .spawn(move || serve(&s))
            .map_err(|source| DataPlaneError::Io {
                context: "starting the neighbour discovery thread".into(),
                source,
            })?;
        Ok(NdResponder {
            shared,
            thread: Some(thread),
        })
    }

    fn answers(&self) -> std::sync::MutexGuard<'_, Answers> {
        // A panic in the thread cannot leave the map half-written.
        self.shared
            .answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Starts answering for `addr` on `interface` with `mac`: joins the
    /// solicited-node group and announces the address (unsolicited
    /// advertisement to all nodes). Idempotent; a changed MAC is announced.
    pub fn answer(
        &mut self,
        interface: &str,
        addr: Ipv6Addr,
        mac: Mac,
    ) -> Result<(), DataPlaneError> {
        let index = if_index(interface)?;
        if self.answers().get(&(index, addr)) == Some(&mac) {
            return Ok(());
        }
        if !self.in_group(index, solicited_node(addr)) {
            self.membership(libc::IPV6_ADD_MEMBERSHIP, index, addr, interface)?;
        }
        self.answers().insert((index, addr), mac);
        let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
        send(
            &self.shared.sock,
            &advertisement(addr, mac, false),
            addr,
            all_nodes,
            index,
        )
        .map_err(|source| DataPlaneError::Io {
            context: format!("announcing {addr} on {interface}"),
            source,
        })
    }

    fn in_group(&self, index: u32, group: Ipv6Addr) -> bool {
        self.answers()
            .keys()
            .any(|&(i, a)| i == index && solicited_node(a) == group)
    }

    /// Stops answering for `addr` on `interface` (and leaves its group when
    /// no other VIP there shares it).
    pub fn stop(&mut self, interface: &str, addr: Ipv6Addr) -> Result<(), DataPlaneError> {
        // An interface that is gone took its memberships with it.
        let Ok(index) = if_index(interface) else {
            self.answers().retain(|(_, a), _| *a != addr);
            return Ok(());
        };
        if self.answers().remove(&(index, addr)).is_none() {
            return Ok(());
        }
        if !self.in_group(index, solicited_node(addr)) {
            self.membership(libc::IPV6_DROP_MEMBERSHIP, index, addr, interface)?;
        }
        Ok(())
    }

    /// Joins (`IPV6_ADD_MEMBERSHIP`) or leaves the solicited-node group of
    /// `addr` on the interface.
    fn membership(
        &self,
        op: libc::c_int,
        index: u32,
        addr: Ipv6Addr,
        interface: &str,
    ) -> Result<(), DataPlaneError> {
        let group = solicited_node(addr);
        let mreq = libc::ipv6_mreq {
            ipv6mr_multiaddr: in6(group),
            ipv6mr_interface: index,
        };
        let verb = if op == libc::IPV6_ADD_MEMBERSHIP {
            "joining"
        } else {
            "leaving"
        };
        setsockopt(
            &self.shared.sock,
            libc::IPPROTO_IPV6,
            op,
            &mreq,
            &format!("{verb} {group} on {interface}"),
        )
    }
}

impl Drop for NdResponder {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `payload` from `src` to `dst` out of interface `index`.
fn send(
    sock: &OwnedFd,
    payload: &[u8],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    index: u32,
) -> std::io::Result<()> {
    // SAFETY: zeroed plain-old-data structures, filled in below.
    let mut to: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    to.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    to.sin6_addr = in6(dst);
    to.sin6_scope_id = index;
    let info = libc::in6_pktinfo {
        ipi6_addr: in6(src),
        ipi6_ifindex: index,
    };
    let mut cbuf = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut to as *mut libc::sockaddr_in6).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::in6_pktinfo>() as u32) };
    msg.msg_controllen = space as usize;
    // SAFETY: the control buffer (64 bytes) holds one in6_pktinfo message;
    // CMSG_FIRSTHDR/CMSG_DATA point into it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::IPPROTO_IPV6;
        (*c).cmsg_type = libc::IPV6_PKTINFO;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::in6_pktinfo>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::in6_pktinfo>(), info);
    }
    // SAFETY: msg points at live buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// One received solicitation: payload, source, arrival interface, hop limit.
fn receive(sock: &OwnedFd, buf: &mut [u8]) -> std::io::Result<(usize, Ipv6Addr, u32, Option<i32>)> {
    // SAFETY: zeroed plain-old-data structures the kernel fills in.
    let mut from: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let mut cbuf = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut from as *mut libc::sockaddr_in6).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf);
    // SAFETY: msg points at live buffers for the duration of the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let (mut index, mut hops) = (0, None);
    // SAFETY: walking the control messages the kernel wrote into cbuf.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::IPPROTO_IPV6 {
                if (*c).cmsg_type == libc::IPV6_PKTINFO {
                    let info: libc::in6_pktinfo =
                        std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    index = info.ipi6_ifindex;
                } else if (*c).cmsg_type == libc::IPV6_HOPLIMIT {
                    hops = Some(std::ptr::read_unaligned(
                        libc::CMSG_DATA(c).cast::<libc::c_int>(),
                    ));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((
        n as usize,
        Ipv6Addr::from(from.sin6_addr.s6_addr),
        index,
        hops,
    ))
}

fn serve(s: &Shared) {
    let mut buf = [0u8; 1500];
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    while !s.stop.load(Ordering::Relaxed) {
        let (n, from, index, hops) = match receive(&s.sock, &mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                tracing::warn!(error = %e, "neighbour discovery socket");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        let Some(target) = solicitation_target(&buf[..n], hops) else {
            continue;
        };
        let mac = {
            let answers = s.answers.lock().unwrap_or_else(|e| e.into_inner());
            answers.get(&(index, target)).copied()
        };
        let Some(mac) = mac else { continue };
        // A solicitation from the unspecified address (duplicate address
        // detection) is answered to all nodes, unsolicited (RFC 4861 7.2.4).
        let (dst, solicited) = if from.is_unspecified() {
            (all_nodes, false)
        } else {
            (from, true)
        };
        if let Err(e) = send(
            &s.sock,
            &advertisement(target, mac, solicited),
            target,
            dst,
            index,
        ) {
            tracing::warn!(error = %e, %target, %dst, "neighbour advertisement not sent");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets() {
        let vip: Ipv6Addr = "2001:db8::1:a0b".parse().unwrap();
        assert_eq!(
            solicited_node(vip),
            "ff02::1:ff01:a0b".parse::<Ipv6Addr>().unwrap()
        );
        let mac = Mac([0x33, 0x33, 0, 1, 0x0a, 0x0b]);
        let na = advertisement(vip, mac, true);
        assert_eq!(na[0], 136);
        assert_eq!(na[4], 0x60, "solicited and override");
        assert_eq!(&na[8..24], &vip.octets());
        assert_eq!(&na[24..], &[2, 1, 0x33, 0x33, 0, 1, 0x0a, 0x0b]);
        assert_eq!(advertisement(vip, mac, false)[4], 0x20);
        let mut ns = [0u8; 32];
        ns[0] = 135;
        ns[8..24].copy_from_slice(&vip.octets());
        assert_eq!(solicitation_target(&ns, Some(255)), Some(vip));
        assert_eq!(solicitation_target(&ns, Some(64)), None, "off-link");
        assert_eq!(solicitation_target(&ns, None), None);
        assert_eq!(solicitation_target(&ns[..20], Some(255)), None);
        ns[1] = 1;
        assert_eq!(solicitation_target(&ns, Some(255)), None, "code 1");
    }
}

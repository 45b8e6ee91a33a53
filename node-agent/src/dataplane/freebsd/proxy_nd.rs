//! The IPv6 VIP's proxy neighbour entry: what `ndp -s VIP MAC proxy` adds
//! (an `LLE_PUB` entry, answered by `nd6_ns_input()` through
//! `nd6_proxy_fill_sdl()`), written over FreeBSD's netlink (`RTM_NEWNEIGH`,
//! sys/netlink/route/neigh.c) because ndp(8) picks the interface from the
//! route to the address, which for a VIP held on lo0 is lo0; the entry must
//! be in the lltable of the interface the solicitations arrive on.

use std::net::Ipv6Addr;

use crate::dataplane::{DataPlaneError, Mac};

/// FreeBSD's `AF_NETLINK` (sys/sys/socket.h, 13.2 and later). Unchecked: the
/// socket.h text read here predates netlink, and the libc crate lacks it.
pub const AF_NETLINK: i32 = 38;
const NETLINK_ROUTE: i32 = 0;
const AF_INET6: u8 = 28;
pub const RTM_NEWNEIGH: u16 = 28;
pub const RTM_DELNEIGH: u16 = 29;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x01;
const NLM_F_ACK: u16 = 0x04;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
/// sys/netlink/route/neigh.h: `NTF_PROXY` makes the entry `LLE_PUB`,
/// `NTF_STICKY` `LLE_STATIC` (what ndp(8) sends).
const NTF_PROXY: u8 = 0x08;
const NTF_STICKY: u8 = 0x40;
const NUD_PERMANENT: u16 = 0x80;

fn attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len() + (4 - len % 4) % 4, 0);
}

/// An `RTM_NEWNEIGH` (proxy, permanent, create or replace) or, without
/// `mac`, an `RTM_DELNEIGH` for `addr` on interface `ifindex`.
pub fn neigh_request(ifindex: u32, addr: Ipv6Addr, mac: Option<Mac>, seq: u32) -> Vec<u8> {
    let (kind, flags) = match mac {
        Some(_) => (RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE),
        None => (RTM_DELNEIGH, 0),
    };
    let mut m = vec![0u8; 16];
    // struct ndmsg: family, pad1, pad2, ifindex, state, flags, type.
    m.push(AF_INET6);
    m.extend_from_slice(&[0, 0, 0]);
    m.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    if mac.is_some() {
        m.extend_from_slice(&NUD_PERMANENT.to_ne_bytes());
        m.push(NTF_PROXY | NTF_STICKY);
    } else {
        m.extend_from_slice(&[0, 0, 0]);
    }
    m.push(0);
    attr(&mut m, NDA_DST, &addr.octets());
    if let Some(mac) = mac {
        attr(&mut m, NDA_LLADDR, &mac.0);
    }
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m[4..6].copy_from_slice(&kind.to_ne_bytes());
    m[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | flags).to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    m
}

/// The errno of the kernel's acknowledgement (`NLMSG_ERROR`, 0 = success),
/// `None` if `reply` is not one.
pub fn ack_errno(reply: &[u8]) -> Option<i32> {
    let kind = u16::from_ne_bytes(reply.get(4..6)?.try_into().ok()?);
    if kind != NLMSG_ERROR {
        return None;
    }
    let error = i32::from_ne_bytes(reply.get(16..20)?.try_into().ok()?);
    Some(-error)
}

/// Adds (`mac` given) or deletes the proxy entry of `addr` on `interface`.
pub fn set_proxy_entry(
    interface: &str,
    ifindex: u32,
    addr: Ipv6Addr,
    mac: Option<Mac>,
) -> Result<(), DataPlaneError> {
    let request = neigh_request(ifindex, addr, mac, 1);
    let verb = if mac.is_some() { "adding" } else { "deleting" };
    exchange(&request).map_err(|source| DataPlaneError::Io {
        context: format!("{verb} the proxy neighbour entry of {addr} on {interface} (netlink)"),
        source,
    })
}

#[cfg(target_os = "freebsd")]
fn exchange(request: &[u8]) -> std::io::Result<()> {
    // SAFETY: a netlink socket, closed on every path; the buffers outlive
    // the calls and their lengths are passed.
    unsafe {
        let fd = libc::socket(AF_NETLINK, libc::SOCK_RAW, NETLINK_ROUTE);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let result = (|| {
            let sent = libc::send(fd, request.as_ptr().cast(), request.len(), 0);
            if sent < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut reply = [0u8; 1024];
            let got = libc::recv(fd, reply.as_mut_ptr().cast(), reply.len(), 0);
            if got < 0 {
                return Err(std::io::Error::last_os_error());
            }
            match ack_errno(&reply[..got as usize]) {
                Some(0) => Ok(()),
                Some(errno) => Err(std::io::Error::from_raw_os_error(errno)),
                None => Err(std::io::Error::other("no netlink acknowledgement")),
            }
        })();
        libc::close(fd);
        result
    }
}

#[cfg(not(target_os = "freebsd"))]
fn exchange(_request: &[u8]) -> std::io::Result<()> {
    let _ = (AF_NETLINK, NETLINK_ROUTE);
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "proxy neighbour entries are written on FreeBSD only",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_neighbour_request_is_what_ndp_sends() {
        let addr: Ipv6Addr = "2001:db8::10".parse().unwrap();
        let mac = Mac([0x33, 0x33, 0, 0, 0, 0x10]);
        let m = neigh_request(3, addr, Some(mac), 7);
        // nlmsghdr 16 + ndmsg 12 + NDA_DST 20 + NDA_LLADDR 12 (6 + 4, padded).
        assert_eq!(m.len(), 60);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 60);
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), 28);
        assert_eq!(
            u16::from_ne_bytes(m[6..8].try_into().unwrap()),
            0x01 | 0x04 | 0x100 | 0x400
        );
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 7);
        assert_eq!(m[16], 28, "AF_INET6 of FreeBSD");
        assert_eq!(i32::from_ne_bytes(m[20..24].try_into().unwrap()), 3);
        assert_eq!(u16::from_ne_bytes(m[24..26].try_into().unwrap()), 0x80);
        assert_eq!(m[26], 0x48, "NTF_PROXY | NTF_STICKY");
        assert_eq!(u16::from_ne_bytes(m[28..30].try_into().unwrap()), 20);
        assert_eq!(u16::from_ne_bytes(m[30..32].try_into().unwrap()), 1);
        assert_eq!(&m[32..48], &addr.octets());
        assert_eq!(u16::from_ne_bytes(m[48..50].try_into().unwrap()), 10);
        assert_eq!(u16::from_ne_bytes(m[50..52].try_into().unwrap()), 2);
        assert_eq!(&m[52..58], &mac.0);
        assert_eq!(&m[58..60], &[0, 0]);
    }

    #[test]
    fn delete_request_and_acks() {
        let addr: Ipv6Addr = "2001:db8::10".parse().unwrap();
        let m = neigh_request(3, addr, None, 1);
        assert_eq!(m.len(), 48);
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), 29);
        assert_eq!(u16::from_ne_bytes(m[6..8].try_into().unwrap()), 0x05);
        let mut ack = vec![0u8; 36];
        ack[4..6].copy_from_slice(&2u16.to_ne_bytes());
        ack[16..20].copy_from_slice(&(-1i32).to_ne_bytes());
        assert_eq!(ack_errno(&ack), Some(1), "EPERM: an LLE_IFADDR entry");
        ack[16..20].copy_from_slice(&0i32.to_ne_bytes());
        assert_eq!(ack_errno(&ack), Some(0));
        assert_eq!(ack_errno(&ack[..10]), None);
        ack[4..6].copy_from_slice(&28u16.to_ne_bytes());
        assert_eq!(ack_errno(&ack), None);
    }
}

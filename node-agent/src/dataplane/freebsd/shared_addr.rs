//! Adding an IPv4 address with the shared-address flag of kernel-patches/0001:
//! `SIOCAIFADDR` with `IN_AIFADDR_SHARED` or'ed into `ifra_vhid` (the patch
//! keeps `struct in_aliasreq` and the ioctl number unchanged, so no patched
//! ifconfig is needed).

use std::net::Ipv4Addr;

use crate::dataplane::DataPlaneError;

/// `IN_AIFADDR_SHARED` (netinet/in_shared.h of kernel-patches/0001).
pub const IN_AIFADDR_SHARED: i32 = 0x4000_0000;
const IFNAMSIZ: usize = 16;
const AF_INET: u8 = 2;

/// FreeBSD's `struct sockaddr_in` (with `sin_len`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockaddrIn {
    pub sin_len: u8,
    pub sin_family: u8,
    pub sin_port: u16,
    /// Network order.
    pub sin_addr: [u8; 4],
    pub sin_zero: [u8; 8],
}

impl SockaddrIn {
    fn new(addr: Ipv4Addr) -> Self {
        SockaddrIn {
            sin_len: std::mem::size_of::<SockaddrIn>() as u8,
            sin_family: AF_INET,
            sin_port: 0,
            sin_addr: addr.octets(),
            sin_zero: [0; 8],
        }
    }
}

/// FreeBSD's `struct in_aliasreq` (netinet/in_var.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InAliasreq {
    pub ifra_name: [u8; IFNAMSIZ],
    pub ifra_addr: SockaddrIn,
    pub ifra_broadaddr: SockaddrIn,
    pub ifra_mask: SockaddrIn,
    pub ifra_vhid: i32,
}

/// `_IOW('i', 43, struct in_aliasreq)`.
pub const SIOCAIFADDR: u64 = 0x8000_0000
    | ((std::mem::size_of::<InAliasreq>() as u64 & 0x1fff) << 16)
    | ((b'i' as u64) << 8)
    | 43;

/// The request that adds `addr/prefix_len` to `interface` as a shared address.
pub fn shared_alias_request(
    interface: &str,
    addr: Ipv4Addr,
    prefix_len: u8,
) -> Result<InAliasreq, DataPlaneError> {
    let name = interface.as_bytes();
    if name.is_empty() || name.len() >= IFNAMSIZ || name.contains(&0) {
        return Err(DataPlaneError::InvalidDesired(format!(
            "interface name {interface:?} is not 1 to {} bytes without NUL",
            IFNAMSIZ - 1
        )));
    }
    if prefix_len == 0 || prefix_len > 32 {
        return Err(DataPlaneError::InvalidDesired(format!(
            "VIP {addr}: prefix length {prefix_len} is not in 1..=32"
        )));
    }
    let mut ifra_name = [0u8; IFNAMSIZ];
    ifra_name[..name.len()].copy_from_slice(name);
    let mask = Ipv4Addr::from(u32::MAX << (32 - u32::from(prefix_len)));
    Ok(InAliasreq {
        ifra_name,
        ifra_addr: SockaddrIn::new(addr),
        // Zero length: the kernel derives the broadcast address.
        ifra_broadaddr: SockaddrIn {
            sin_len: 0,
            sin_family: 0,
            ..SockaddrIn::new(Ipv4Addr::UNSPECIFIED)
        },
        ifra_mask: SockaddrIn::new(mask),
        ifra_vhid: IN_AIFADDR_SHARED,
    })
}

/// Adds the shared address (FreeBSD with kernel-patches/0001 only).
pub fn add_shared_address(
    interface: &str,
    addr: Ipv4Addr,
    prefix_len: u8,
) -> Result<(), DataPlaneError> {
    let req = shared_alias_request(interface, addr, prefix_len)?;
    ioctl_aifaddr(&req).map_err(|source| DataPlaneError::Io {
        context: format!(
            "adding shared address {addr}/{prefix_len} on {interface} (SIOCAIFADDR; \
             EOPNOTSUPP means net.inet.ip.shared_addr is 0)"
        ),
        source,
    })
}

#[cfg(target_os = "freebsd")]
fn ioctl_aifaddr(req: &InAliasreq) -> std::io::Result<()> {
    // SAFETY: a datagram socket, closed on every path; req outlives the call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let rc = libc::ioctl(fd, SIOCAIFADDR as libc::c_ulong, req as *const InAliasreq);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc < 0 {
            return Err(err);
        }
    }
    Ok(())
}

#[cfg(not(target_os = "freebsd"))]
fn ioctl_aifaddr(_req: &InAliasreq) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "shared addresses exist only on FreeBSD with kernel-patches/0001",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout_matches_freebsd() {
        assert_eq!(std::mem::size_of::<SockaddrIn>(), 16);
        assert_eq!(std::mem::size_of::<InAliasreq>(), 68);
        // _IOW('i', 43, struct in_aliasreq) as FreeBSD's sys/sockio.h has it.
        assert_eq!(SIOCAIFADDR, 0x8044_692b);
        let r = shared_alias_request("vtnet0", Ipv4Addr::new(192, 0, 2, 10), 24).unwrap();
        assert_eq!(&r.ifra_name[..7], b"vtnet0\0");
        assert_eq!(r.ifra_addr.sin_addr, [192, 0, 2, 10]);
        assert_eq!(r.ifra_mask.sin_addr, [255, 255, 255, 0]);
        assert_eq!(r.ifra_broadaddr.sin_len, 0);
        assert_eq!(r.ifra_vhid, IN_AIFADDR_SHARED);
    }

    #[test]
    fn bad_requests_name_what_is_wrong() {
        let a = Ipv4Addr::new(192, 0, 2, 10);
        let e = shared_alias_request("an-interface-name", a, 32).unwrap_err();
        assert!(e.to_string().contains("an-interface-name"), "{e}");
        let e = shared_alias_request("vtnet0", a, 33).unwrap_err();
        assert!(e.to_string().contains("prefix length 33"), "{e}");
    }
}

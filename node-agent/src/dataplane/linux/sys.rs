//! The few socket calls the Linux data plane makes itself (netlink for the
//! lease deadline and ruleset notifications, raw ICMPv6 for neighbour
//! discovery, IGMP memberships), each failing with what it was for.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::dataplane::DataPlaneError;

fn last_os_error(what: &str) -> DataPlaneError {
    DataPlaneError::Io {
        context: what.to_string(),
        source: std::io::Error::last_os_error(),
    }
}

/// `socket(2)` with close-on-exec; `what` names it in the error.
pub fn socket(
    domain: libc::c_int,
    kind: libc::c_int,
    protocol: libc::c_int,
    what: &str,
) -> Result<OwnedFd, DataPlaneError> {
    // SAFETY: plain socket call; the descriptor is owned right after.
    let raw = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) };
    if raw < 0 {
        return Err(last_os_error(what));
    }
    // SAFETY: a freshly opened descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// `setsockopt(2)` of a `T`; `what` names it in the error.
pub fn setsockopt<T>(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
    what: &str,
) -> Result<(), DataPlaneError> {
    // SAFETY: `value` is a live T of the size passed, on an open descriptor.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(last_os_error(what));
    }
    Ok(())
}

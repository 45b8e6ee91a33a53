//! Foreign edits of the agent's tables, seen through nf_tables' netlink
//! notifications (group `NFNLGRP_NFTABLES`): a `flush ruleset`, a deleted
//! table, an edited set or rule by another process. The kernel announces every
//! object a transaction changed, then a `NEWGEN` message naming the process
//! that committed it; a transaction that touched the agent's table and was
//! committed by another process is a foreign edit. The agent answers with a
//! full rebuild (safe at any time, see [`super`]).

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;

use crate::dataplane::DataPlaneError;

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNLGRP_NFTABLES: libc::c_int = 7;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWGEN: u16 = 15;
const NFTA_GEN_PROC_PID: u16 = 2;
const NFTA_GEN_PROC_NAME: u16 = 3;
/// Every object message (table, chain, rule, set, element, object) names its
/// table in attribute 1.
const NFTA_X_TABLE: u16 = 1;

/// A transaction by another process that changed the agent's tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignEdit {
    /// The committing thread (`None` when notifications were lost, which is
    /// treated as an edit).
    pub pid: Option<u32>,
    pub process: String,
    /// When the notification was read.
    pub seen: Instant,
}

/// A subscription to nf_tables notifications in the caller's network
/// namespace.
pub struct Watcher {
    fd: OwnedFd,
    table: String,
    touched: bool,
    buf: Vec<u8>,
}

fn os_err(what: &str) -> DataPlaneError {
    DataPlaneError::Io {
        context: what.to_string(),
        source: std::io::Error::last_os_error(),
    }
}

impl Watcher {
    pub fn open(table: &str) -> Result<Self, DataPlaneError> {
        let fd = super::sys::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW,
            NETLINK_NETFILTER,
            "netlink socket for nftables notifications",
        )?;
        // SAFETY: a zeroed sockaddr_nl with the family set is valid.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: binding to a valid sockaddr_nl of its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(os_err("binding the netlink socket"));
        }
        let group = NFNLGRP_NFTABLES;
        let size: libc::c_int = 4 << 20;
        // SAFETY: valid ints of their size on an open socket.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_NETLINK,
                libc::NETLINK_ADD_MEMBERSHIP,
                (&group as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(os_err("joining the nftables notification group"));
        }
        // A large buffer: a `flush ruleset` of a big ruleset is many messages.
        // SAFETY: as above; failure only leaves the default size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        Ok(Watcher {
            fd,
            table: table.to_string(),
            touched: false,
            buf: vec![0; 1 << 16],
        })
    }

    /// Blocks until a foreign edit of the agent's tables was committed.
    pub fn wait(&mut self) -> Result<ForeignEdit, DataPlaneError> {
        loop {
            // SAFETY: reading into a valid buffer of its size.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // Notifications were dropped: whatever they said is unknown.
                    Some(libc::ENOBUFS) => {
                        self.touched = false;
                        return Ok(ForeignEdit {
                            pid: None,
                            process: "(notifications lost)".into(),
                            seen: Instant::now(),
                        });
                    }
                    _ => {
                        return Err(DataPlaneError::Io {
                            context: "reading nftables notifications".into(),
                            source: e,
                        })
                    }
                }
            }
            let seen = Instant::now();
            let data = self.buf[..n as usize].to_vec();
            if let Some(edit) = self.scan(&data, seen) {
                return Ok(edit);
            }
        }
    }

    /// Goes through one datagram of netlink messages.
    fn scan(&mut self, mut data: &[u8], seen: Instant) -> Option<ForeignEdit> {
        let mut found = None;
        while data.len() >= 16 {
            let len = u32::from_ne_bytes(data[0..4].try_into().ok()?) as usize;
            if len < 16 || len > data.len() {
                break;
            }
            let kind = u16::from_ne_bytes(data[4..6].try_into().ok()?);
            // 16 bytes of nlmsghdr, 4 of nfgenmsg, then attributes.
            let attrs = data.get(20..len).unwrap_or(&[]);
            if kind >> 8 == NFNL_SUBSYS_NFTABLES {
                let msg = kind & 0xff;
                if msg == NFT_MSG_NEWGEN {
                    let pid = attr(attrs, NFTA_GEN_PROC_PID)
                        .and_then(|v| v.get(0..4)?.try_into().ok())
                        .map(u32::from_be_bytes);
                    let process = attr(attrs, NFTA_GEN_PROC_NAME)
                        .map(|v| {
                            String::from_utf8_lossy(v.split(|&b| b == 0).next().unwrap_or(&[]))
                                .into_owned()
                        })
                        .unwrap_or_default();
                    if std::mem::take(&mut self.touched) && !pid.is_some_and(own_thread) {
                        found.get_or_insert(ForeignEdit { pid, process, seen });
                    }
                } else if attr(attrs, NFTA_X_TABLE)
                    .is_some_and(|v| v.split(|&b| b == 0).next() == Some(self.table.as_bytes()))
                {
                    self.touched = true;
                }
            }
            data = data.get((len + 3) & !3..).unwrap_or(&[]);
        }
        found
    }
}

/// Whether `pid` (the kernel reports the committing *thread*) is a thread of
/// this process. Assumes the agent runs in the initial pid namespace, as the
/// kernel reports ids from there.
fn own_thread(pid: u32) -> bool {
    pid == std::process::id() || std::path::Path::new(&format!("/proc/self/task/{pid}")).exists()
}

/// Runs a [`Watcher`] of `table` on a thread of its own (in the caller's
/// network namespace), calling `report` for every foreign edit until it
/// returns false. Failing to watch is logged, not fatal: the periodic full
/// reconcile still repairs, only later.
pub fn spawn(table: String, mut report: impl FnMut(ForeignEdit) -> bool + Send + 'static) {
    let mut w = match Watcher::open(&table) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch nftables for foreign edits");
            return;
        }
    };
    std::thread::spawn(move || loop {
        match w.wait() {
            Ok(edit) => {
                if !report(edit) {
                    return;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "watching nftables for foreign edits stopped");
                return;
            }
        }
    });
}

/// The payload of the first attribute of `kind` (flags bits masked off).
fn attr(mut attrs: &[u8], kind: u16) -> Option<&[u8]> {
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let t = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if t == kind {
            return Some(&attrs[4..len]);
        }
        let next = (len + 3) & !3;
        attrs = attrs.get(next..).unwrap_or(&[]);
    }
    None
}

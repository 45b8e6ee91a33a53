//! nf_tables transactions over a raw netlink socket: the few messages the
//! lease path sends on every renewal ([`super::lease_write`]), without
//! libnftables' text parsing and cache dumps (about ten netlink round trips
//! per call, each a chance to be descheduled on a busy host).
//!
//! Encoding follows linux/netlink.h and linux/netfilter/nf_tables.h: a batch
//! is BATCH_BEGIN, messages each asking for an ack, BATCH_END; the kernel
//! applies all of it or none.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use super::sys;
use crate::dataplane::DataPlaneError;

const NETLINK_NETFILTER: i32 = 12;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 2;
pub const NLA_F_NESTED: u16 = 0x8000;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFNL_SUBSYS_NFTABLES: u16 = 10;

/// nf_tables message types (enum nf_tables_msg_types).
pub const NFT_MSG_NEWRULE: u16 = 6;
pub const NFT_MSG_DELRULE: u16 = 8;
pub const NFT_MSG_NEWSETELEM: u16 = 12;
pub const NFT_MSG_DELSETELEM: u16 = 14;

/// The nftables family names the agent uses, as netlink numbers.
pub fn nfproto(family: &str) -> Result<u8, DataPlaneError> {
    match family {
        "inet" => Ok(1),
        "ip" => Ok(2),
        "ip6" => Ok(10),
        other => Err(DataPlaneError::Unsupported(format!(
            "nftables family {other:?} over netlink"
        ))),
    }
}

/// One transaction being built; sequence numbers from `first`.
pub struct Batch {
    buf: Vec<u8>,
    first: u32,
    seq: u32,
    asks: usize,
}

impl Batch {
    pub fn new(first: u32) -> Self {
        let mut b = Batch {
            buf: Vec::new(),
            first,
            seq: first,
            asks: 0,
        };
        let subsys = NFNL_SUBSYS_NFTABLES.to_be_bytes();
        message(
            &mut b.buf,
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            first,
            0,
            subsys,
            &[],
        );
        b
    }

    /// Appends an nf_tables message of `kind` that asks for an ack.
    pub fn push(&mut self, kind: u16, flags: u16, family: u8, attrs: &[u8]) {
        self.seq = self.seq.wrapping_add(1);
        self.asks += 1;
        message(
            &mut self.buf,
            (NFNL_SUBSYS_NFTABLES << 8) | kind,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            self.seq,
            family,
            [0, 0],
            attrs,
        );
    }

    /// The whole batch, and how many of its messages ask for an ack.
    pub fn finish(mut self) -> (Vec<u8>, usize) {
        let subsys = NFNL_SUBSYS_NFTABLES.to_be_bytes();
        message(
            &mut self.buf,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            self.seq.wrapping_add(1),
            0,
            subsys,
            &[],
        );
        (self.buf, self.asks)
    }
}

/// A netlink socket for nf_tables transactions.
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    pub fn open(what: &str) -> Result<Self, DataPlaneError> {
        let fd = sys::socket(libc::AF_NETLINK, libc::SOCK_RAW, NETLINK_NETFILTER, what)?;
        let tv = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        sys::setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv, what)?;
        Ok(Socket { fd, seq: 0 })
    }

    /// A batch numbered after the last one sent.
    pub fn batch(&self) -> Batch {
        Batch::new(self.seq.wrapping_add(1))
    }

    /// Sends `batch` and waits for every ack; `what` names it in errors.
    pub fn commit(&mut self, batch: Batch, what: &str) -> Result<(), DataPlaneError> {
        let first = batch.first;
        let (msg, asks) = batch.finish();
        self.seq = first.wrapping_add(asks as u32 + 1);
        // SAFETY: send(2) of an initialised buffer on our socket.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 || sent as usize != msg.len() {
            return Err(os_error(what, "netlink send"));
        }
        let mut acked = 0;
        let mut buf = vec![0u8; 8192];
        while acked < asks {
            // SAFETY: recv(2) into a buffer we own, of its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(os_error(what, "netlink ack"));
            }
            for (seq, errno) in acks(&buf[..n as usize]) {
                let k = seq.wrapping_sub(first);
                if k == 0 || k > asks as u32 {
                    continue;
                }
                if errno != 0 {
                    return Err(DataPlaneError::Unsupported(format!(
                        "{what}: {}",
                        io::Error::from_raw_os_error(-errno)
                    )));
                }
                acked += 1;
            }
        }
        Ok(())
    }
}

fn os_error(what: &str, step: &str) -> DataPlaneError {
    DataPlaneError::Unsupported(format!("{what}: {step}: {}", io::Error::last_os_error()))
}

/// (sequence number, error) of every NLMSG_ERROR (an ack when 0) in `buf`.
fn acks(mut buf: &[u8]) -> Vec<(u32, i32)> {
    let mut out = Vec::new();
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        let seq = u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]);
        if len < 16 || len > buf.len() {
            break;
        }
        if kind == NLMSG_ERROR && len >= 20 {
            let errno = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
            out.push((seq, errno));
        }
        buf = &buf[align(len).min(buf.len())..];
    }
    out
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

pub fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// Appends one attribute, padded to 4 bytes.
pub fn attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(align(out.len()), 0);
}

/// Appends one netlink message with an nfgenmsg header.
fn message(
    out: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: [u8; 2],
    attrs: &[u8],
) {
    let len = 16 + 4 + attrs.len();
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(&[family, 0, res_id[0], res_id[1]]);
    out.extend_from_slice(attrs);
    out.resize(align(out.len()), 0);
}

/// Kinds of the messages in a finished batch, in order (for tests).
#[cfg(test)]
pub fn kinds(mut m: &[u8]) -> Vec<u16> {
    let mut kinds = Vec::new();
    while m.len() >= 16 {
        let len = u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) as usize;
        kinds.push(u16::from_ne_bytes([m[4], m[5]]));
        m = &m[align(len)..];
    }
    kinds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_family_is_refused_by_name() {
        let e = nfproto("bridge").expect_err("bridge");
        assert!(e.to_string().contains("bridge"), "{e}");
    }

    #[test]
    fn a_batch_is_framed_and_counts_its_acks() {
        let mut b = Batch::new(7);
        b.push(NFT_MSG_DELSETELEM, 0, 2, &[]);
        b.push(NFT_MSG_NEWSETELEM, NLM_F_CREATE, 2, &[1, 2, 3]);
        let (m, asks) = b.finish();
        assert_eq!(asks, 2);
        assert_eq!(kinds(&m), vec![16, 0x0a0e, 0x0a0c, 17]);
    }
}

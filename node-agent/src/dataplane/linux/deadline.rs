//! The lease deadline the kernel checks against an absolute clock.
//!
//! Element timeouts are relative: the kernel counts them from the insert, so a
//! write that lands late (the agent stopped between reading its clock and
//! sending) stretches them. Every bucket check therefore also passes through
//! the chain `lease`, whose one rule is `meta time >= DEADLINE drop`: `meta
//! time` is the packet's wall-clock time in nanoseconds (kernel >= 5.4), and
//! DEADLINE is written after each element write as an absolute time, so a
//! late write of it extends nothing. nft's text and JSON input take that value
//! in whole seconds only, too coarse for a 500 ms lease, so this module writes
//! the rule itself, as one nf_tables netlink transaction: flush the chain, add
//! the rule. What it cannot survive is the wall clock stepping back during a
//! lease; the element timeouts still bound the lease then.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::sys;
use crate::dataplane::DataPlaneError;

/// The chain holding the deadline rule.
pub const CHAIN: &str = "lease";
/// The rule a rebuild writes in [`CHAIN`] before the first deadline: drop every
/// new flow (the deadline write follows at once).
pub const CLOSED_RULE: &str = "meta time >= 0 drop";

// linux/netlink.h, linux/netfilter/nfnetlink.h, linux/netfilter/nf_tables.h
const NETLINK_NETFILTER: i32 = 12;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_META_TIME_NS: u32 = 30;
const NFT_BYTEORDER_HTON: u32 = 1;
const NFT_CMP_GTE: u32 = 5;
const NF_DROP: u32 = 0;

/// The nftables family names the agent uses, as netlink numbers.
fn nfproto(family: &str) -> Result<u8, DataPlaneError> {
    match family {
        "inet" => Ok(1),
        "ip" => Ok(2),
        "ip6" => Ok(10),
        other => Err(DataPlaneError::Unsupported(format!(
            "lease deadline in nftables family {other:?}"
        ))),
    }
}

/// The deadline as the kernel's `meta time` sees it: the wall clock now plus
/// what is left until `until` on the monotonic clock. The wall clock is read
/// first, so a stall between the two readings moves the deadline earlier.
pub fn wall_clock_ns(until: Instant) -> u64 {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let left = until.saturating_duration_since(Instant::now());
    u64::try_from((wall + left).as_nanos()).unwrap_or(u64::MAX)
}

/// A netlink socket for writing the deadline rule.
pub struct DeadlineWriter {
    fd: OwnedFd,
    seq: u32,
}

impl DeadlineWriter {
    pub fn open() -> Result<Self, DataPlaneError> {
        let what = "netlink socket for the lease deadline";
        let fd = sys::socket(libc::AF_NETLINK, libc::SOCK_RAW, NETLINK_NETFILTER, what)?;
        let tv = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        sys::setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv, what)?;
        Ok(DeadlineWriter { fd, seq: 0 })
    }

    /// Replaces the rule of [`CHAIN`] in `table` of each of `families` by
    /// `meta time >= deadline_ns drop`, in one transaction.
    pub fn write(
        &mut self,
        families: &[&str],
        table: &str,
        deadline_ns: u64,
    ) -> Result<(), DataPlaneError> {
        let families = families
            .iter()
            .map(|f| nfproto(f))
            .collect::<Result<Vec<u8>, _>>()?;
        let first = self.seq.wrapping_add(1);
        let (msg, asks) = transaction(&families, table, deadline_ns, first);
        self.seq = self.seq.wrapping_add(asks as u32 + 2);
        // SAFETY: send(2) of an initialised buffer on our socket.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 || sent as usize != msg.len() {
            return Err(os_error("netlink send"));
        }
        // Every flush and add asks for an ack.
        let mut acked = 0;
        let mut buf = vec![0u8; 8192];
        while acked < asks {
            // SAFETY: recv(2) into a buffer we own, of its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(os_error("netlink ack"));
            }
            for (seq, errno) in acks(&buf[..n as usize]) {
                if seq.wrapping_sub(first) == 0 || seq.wrapping_sub(first) > asks as u32 {
                    continue;
                }
                if errno != 0 {
                    return Err(DataPlaneError::Unsupported(format!(
                        "writing the lease deadline rule in table {table}: {}",
                        io::Error::from_raw_os_error(-errno)
                    )));
                }
                acked += 1;
            }
        }
        Ok(())
    }
}

fn os_error(what: &str) -> DataPlaneError {
    DataPlaneError::Unsupported(format!("{what}: {}", io::Error::last_os_error()))
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

/// begin, then per family flush `lease` and add `meta time >= deadline drop`,
/// end; sequence numbers from `first`. Returns the batch and how many of its
/// messages ask for an ack.
fn transaction(families: &[u8], table: &str, deadline_ns: u64, first: u32) -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    let subsys = NFNL_SUBSYS_NFTABLES.to_be_bytes();
    message(
        &mut out,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        first,
        0,
        subsys,
        &[],
    );
    let mut names = Vec::new();
    attr(&mut names, NFTA_RULE_TABLE, &cstr(table));
    attr(&mut names, NFTA_RULE_CHAIN, &cstr(CHAIN));
    let mut rule = names.clone();
    attr(
        &mut rule,
        NFTA_RULE_EXPRESSIONS | NLA_F_NESTED,
        &expressions(deadline_ns),
    );
    let mut seq = first;
    for &family in families {
        seq = seq.wrapping_add(1);
        message(
            &mut out,
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELRULE,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            family,
            [0, 0],
            &names,
        );
        seq = seq.wrapping_add(1);
        message(
            &mut out,
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND,
            seq,
            family,
            [0, 0],
            &rule,
        );
    }
    message(
        &mut out,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        seq.wrapping_add(1),
        0,
        subsys,
        &[],
    );
    (out, 2 * families.len())
}

/// `meta load time => reg 1; byteorder reg 1 = hton(reg 1, 8, 8); cmp gte
/// reg 1 DEADLINE; immediate reg 0 drop`, as `nft --debug=netlink` shows the
/// rule nft itself makes of `meta time >= "..." drop`.
fn expressions(deadline_ns: u64) -> Vec<u8> {
    let u32s = |pairs: &[(u16, u32)]| {
        let mut v = Vec::new();
        for &(t, x) in pairs {
            attr(&mut v, t, &x.to_be_bytes());
        }
        v
    };
    let meta = u32s(&[(1, NFT_REG_1), (2, NFT_META_TIME_NS)]);
    let byteorder = u32s(&[
        (1, NFT_REG_1),
        (2, NFT_REG_1),
        (3, NFT_BYTEORDER_HTON),
        (4, 8),
        (5, 8),
    ]);
    let mut cmp = u32s(&[(1, NFT_REG_1), (2, NFT_CMP_GTE)]);
    let mut value = Vec::new();
    attr(&mut value, 1, &deadline_ns.to_be_bytes());
    attr(&mut cmp, 3 | NLA_F_NESTED, &value);
    let code = u32s(&[(1, NF_DROP)]);
    let mut verdict = Vec::new();
    attr(&mut verdict, 2 | NLA_F_NESTED, &code);
    let mut immediate = u32s(&[(1, NFT_REG_VERDICT)]);
    attr(&mut immediate, 2 | NLA_F_NESTED, &verdict);
    let mut list = Vec::new();
    for (name, data) in [
        ("meta", meta),
        ("byteorder", byteorder),
        ("cmp", cmp),
        ("immediate", immediate),
    ] {
        let mut elem = Vec::new();
        attr(&mut elem, NFTA_EXPR_NAME, &cstr(name));
        attr(&mut elem, NFTA_EXPR_DATA | NLA_F_NESTED, &data);
        attr(&mut list, NFTA_LIST_ELEM | NLA_F_NESTED, &elem);
    }
    list
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// Appends one attribute, padded to 4 bytes.
fn attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_aligned_and_sized() {
        let (m, asks) = transaction(&[2, 10], "vipshare", 1_796_000_000_123_456_789, 7);
        assert_eq!(asks, 4);
        let mut rest = &m[..];
        let mut kinds = Vec::new();
        while !rest.is_empty() {
            let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            assert_eq!(len % 4, 0, "message length {len} is not aligned");
            kinds.push(u16::from_ne_bytes([rest[4], rest[5]]));
            rest = &rest[len..];
        }
        assert_eq!(kinds, vec![16, 0x0a08, 0x0a06, 0x0a08, 0x0a06, 17]);
        // The deadline travels big-endian, as the rule compares it after hton.
        let be = 1_796_000_000_123_456_789u64.to_be_bytes();
        assert!(m.windows(8).any(|w| w == be));
    }

    #[test]
    fn unknown_family_is_refused_by_name() {
        let e = nfproto("bridge").expect_err("bridge");
        assert!(e.to_string().contains("bridge"), "{e}");
    }

    #[test]
    fn deadline_is_now_plus_what_is_left() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_nanos() as u64;
        let d = wall_clock_ns(Instant::now() + Duration::from_millis(500));
        assert!(
            d >= now + 400_000_000 && d <= now + 600_000_000,
            "{d} vs {now}"
        );
        let past = wall_clock_ns(Instant::now());
        assert!(past >= now && past < now + 100_000_000);
    }
}

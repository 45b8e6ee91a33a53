//! The lease deadline the kernel checks against an absolute clock.
//!
//! Element timeouts are relative: the kernel counts them from the insert, so a
//! write that lands late (the agent stopped between reading its clock and
//! sending) stretches them. Every bucket check therefore also passes through
//! the chain `lease`, whose one rule is `meta time >= DEADLINE drop`: `meta
//! time` is the packet's wall-clock time in nanoseconds (kernel >= 5.4), and
//! DEADLINE is written after each element write as an absolute time, so a
//! late write of it extends nothing. nft's text and JSON input take that value
//! in whole seconds only, too coarse for a 500 ms lease, so this module encodes
//! the rule itself, for netlink ([`super::lease_write`] sends it: flush the
//! chain, add the rule, in the transaction that writes the elements). What it cannot survive is the wall clock stepping back during a
//! lease; the element timeouts still bound the lease then.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::nfnl::{self, attr, cstr, Batch, NLA_F_NESTED};

/// The chain holding the deadline rule.
pub const CHAIN: &str = "lease";
/// The rule a rebuild writes in [`CHAIN`] before the first deadline: drop every
/// new flow (the deadline write follows at once).
pub const CLOSED_RULE: &str = "meta time >= 0 drop";

// linux/netfilter/nf_tables.h
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

/// Appends to `batch`: flush [`CHAIN`] of `table` in `family`, then add
/// `meta time >= deadline_ns drop` to it.
pub fn push_rule(batch: &mut Batch, family: u8, table: &str, deadline_ns: u64) {
    let mut names = Vec::new();
    attr(&mut names, NFTA_RULE_TABLE, &cstr(table));
    attr(&mut names, NFTA_RULE_CHAIN, &cstr(CHAIN));
    let mut rule = names.clone();
    attr(
        &mut rule,
        NFTA_RULE_EXPRESSIONS | NLA_F_NESTED,
        &expressions(deadline_ns),
    );
    batch.push(nfnl::NFT_MSG_DELRULE, 0, family, &names);
    batch.push(
        nfnl::NFT_MSG_NEWRULE,
        nfnl::NLM_F_CREATE | nfnl::NLM_F_APPEND,
        family,
        &rule,
    );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_is_a_flush_and_an_add_with_the_deadline_big_endian() {
        let mut b = Batch::new(7);
        push_rule(&mut b, 2, "vipshare", 1_796_000_000_123_456_789);
        push_rule(&mut b, 10, "vipshare", 1_796_000_000_123_456_789);
        let (m, asks) = b.finish();
        assert_eq!(asks, 4);
        assert_eq!(
            nfnl::kinds(&m),
            vec![16, 0x0a08, 0x0a06, 0x0a08, 0x0a06, 17]
        );
        // The deadline travels big-endian, as the rule compares it after hton.
        let be = 1_796_000_000_123_456_789u64.to_be_bytes();
        assert!(m.windows(8).any(|w| w == be));
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

//! The lease write: the owned (and reset) buckets as set elements with the
//! time left on the lease, and the lease's absolute end as the rule of chain
//! `lease` ([`super::deadline`]), in one nf_tables transaction per renewal.
//!
//! This is the agent's hottest kernel write (every heartbeat round, every
//! assignment), so it goes straight to netlink ([`super::nfnl`]): one send,
//! one read of the acks. Rebuilds, which define tables, chains and sets,
//! still go through libnftables and write the deadline with [`LeaseWriter::deadline`].

use std::time::Duration;

use super::nfnl::{self, attr, cstr, Batch, NLA_F_NESTED};
use super::plan::{Elements, KeyKind};
use crate::dataplane::DataPlaneError;

// linux/netfilter/nf_tables.h
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_DATA_VALUE: u16 = 1;

/// The sets a lease write empties and fills, per family.
const SETS: [&str; 2] = ["owned", "dead"];

/// A bucket as the set's key, in the byte order nft stores that type in.
fn key_bytes(kind: KeyKind, bucket: u32) -> Vec<u8> {
    match kind {
        // `type mark` is a host-endian integer.
        KeyKind::Mark => bucket.to_ne_bytes().to_vec(),
        KeyKind::Ipv4 { shift } => (bucket << shift).to_be_bytes().to_vec(),
        KeyKind::Ipv6 { shift } => (u128::from(bucket) << shift).to_be_bytes().to_vec(),
    }
}

fn set_names(table: &str, set: &str) -> Vec<u8> {
    let mut a = Vec::new();
    attr(&mut a, NFTA_SET_ELEM_LIST_TABLE, &cstr(table));
    attr(&mut a, NFTA_SET_ELEM_LIST_SET, &cstr(set));
    a
}

/// Appends, per family of `e`: empty `owned` and `dead`, then (when
/// `timeout` is at least 1 ms) add their buckets with that timeout.
fn push_elements(batch: &mut Batch, e: &Elements, timeout: Duration) -> Result<(), DataPlaneError> {
    let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    for (family, kind) in &e.keys {
        let nfproto = nfnl::nfproto(family.nft)?;
        for (set, buckets) in SETS.into_iter().zip([&e.owned, &e.reset]) {
            let names = set_names(&e.table, set);
            // No element list: the kernel flushes the set.
            batch.push(nfnl::NFT_MSG_DELSETELEM, 0, nfproto, &names);
            if ms == 0 || buckets.is_empty() {
                continue;
            }
            let mut list = Vec::new();
            for &b in buckets.iter() {
                let mut value = Vec::new();
                attr(&mut value, NFTA_DATA_VALUE, &key_bytes(*kind, b));
                let mut elem = Vec::new();
                attr(&mut elem, NFTA_SET_ELEM_KEY | NLA_F_NESTED, &value);
                attr(&mut elem, NFTA_SET_ELEM_TIMEOUT, &ms.to_be_bytes());
                attr(&mut list, NFTA_LIST_ELEM | NLA_F_NESTED, &elem);
            }
            let mut msg = names;
            attr(&mut msg, NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, &list);
            batch.push(nfnl::NFT_MSG_NEWSETELEM, nfnl::NLM_F_CREATE, nfproto, &msg);
        }
    }
    Ok(())
}

/// Writes leases over its own netlink socket.
pub struct LeaseWriter {
    sock: nfnl::Socket,
}

impl LeaseWriter {
    pub fn open() -> Result<Self, DataPlaneError> {
        Ok(LeaseWriter {
            sock: nfnl::Socket::open("netlink socket for the lease")?,
        })
    }

    /// One transaction: the elements of `e` with `timeout` (none when it is
    /// under 1 ms), and the deadline rule at `deadline_ns`.
    pub fn write(
        &mut self,
        e: &Elements,
        timeout: Duration,
        deadline_ns: u64,
    ) -> Result<(), DataPlaneError> {
        let mut batch = self.sock.batch();
        push_elements(&mut batch, e, timeout)?;
        for (family, _) in &e.keys {
            let nfproto = nfnl::nfproto(family.nft)?;
            super::deadline::push_rule(&mut batch, nfproto, &e.table, deadline_ns);
        }
        let what = format!("writing the lease in table {}", e.table);
        self.sock.commit(batch, &what)
    }

    /// Empties the sets of `e` (a write that came back too late).
    pub fn flush(&mut self, e: &Elements) -> Result<(), DataPlaneError> {
        let mut batch = self.sock.batch();
        push_elements(&mut batch, e, Duration::ZERO)?;
        let what = format!("deleting the owned elements of table {}", e.table);
        self.sock.commit(batch, &what)
    }

    /// Replaces only the deadline rule of `table` in each of `families` (after
    /// a rebuild wrote the elements).
    pub fn deadline(
        &mut self,
        families: &[&str],
        table: &str,
        deadline_ns: u64,
    ) -> Result<(), DataPlaneError> {
        let mut batch = self.sock.batch();
        for f in families {
            super::deadline::push_rule(&mut batch, nfnl::nfproto(f)?, table, deadline_ns);
        }
        let what = format!("writing the lease deadline rule in table {table}");
        self.sock.commit(batch, &what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::linux::plan::Family;

    #[test]
    fn keys_are_in_the_byte_order_of_their_type() {
        assert_eq!(key_bytes(KeyKind::Mark, 7), 7u32.to_ne_bytes().to_vec());
        assert_eq!(key_bytes(KeyKind::Ipv4 { shift: 8 }, 2), vec![0, 0, 2, 0]);
        let v6 = key_bytes(KeyKind::Ipv6 { shift: 64 }, 258);
        assert_eq!(v6.len(), 16);
        assert_eq!(&v6[6..8], &[1, 2]);
    }

    #[test]
    fn a_renewal_flushes_and_fills_both_sets_of_each_family_then_the_rule() {
        let e = Elements {
            table: "vipshare".into(),
            keys: vec![(Family::V4, KeyKind::Mark), (Family::V6, KeyKind::Mark)],
            owned: vec![1, 2],
            reset: vec![],
            until: Duration::from_millis(500),
        };
        let mut b = Batch::new(1);
        push_elements(&mut b, &e, Duration::from_millis(300)).expect("families");
        let (m, _) = b.finish();
        // Per family: flush owned, add owned, flush dead (no reset buckets).
        assert_eq!(
            nfnl::kinds(&m),
            vec![16, 0x0a0e, 0x0a0c, 0x0a0e, 0x0a0e, 0x0a0c, 0x0a0e, 17]
        );
        assert!(m.windows(8).any(|w| w == 300u64.to_be_bytes()));
        let mut b = Batch::new(1);
        push_elements(&mut b, &e, Duration::from_micros(900)).expect("families");
        let (m, _) = b.finish();
        assert_eq!(
            nfnl::kinds(&m),
            vec![16, 0x0a0e, 0x0a0e, 0x0a0e, 0x0a0e, 17]
        );
    }
}

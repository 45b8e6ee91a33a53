//! The source addresses whose buckets core/tests/bucket.rs compares with the
//! Linux kernel's; other crates' tests include this file (`#[path]`) to reuse
//! exactly those kernel-checked vectors.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const V4_SOURCES: usize = 600;
pub const V6_SOURCES: usize = 300;

/// SplitMix64, for source addresses and ports.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Distinct source addresses (inside the namespace's "local" ranges 10/8 and
/// fd00::/16), each with a source port.
pub fn sources() -> Vec<(IpAddr, u16)> {
    let mut rng = Rng(0x7669_7073_6861_7265);
    let mut v4 = BTreeSet::from([
        Ipv4Addr::new(10, 0, 0, 1),
        Ipv4Addr::new(10, 255, 255, 254),
        Ipv4Addr::new(10, 1, 2, 3),
        Ipv4Addr::new(10, 1, 2, 200), // same /24 as the one before
    ]);
    while v4.len() < V4_SOURCES {
        v4.insert(Ipv4Addr::from(
            0x0a00_0000 | (rng.next() as u32 & 0x00ff_ffff),
        ));
    }
    let mut v6 = BTreeSet::from(["fd00::1".parse::<Ipv6Addr>().unwrap()]);
    while v6.len() < V6_SOURCES {
        let x = u128::from(rng.next()) << 64 | u128::from(rng.next());
        v6.insert(Ipv6Addr::from(0xfd00u128 << 112 | (x >> 16)));
    }
    let mut port = || 1024 + (rng.next() % (65536 - 1024)) as u16;
    v4.into_iter()
        .map(IpAddr::V4)
        .chain(v6.into_iter().map(IpAddr::V6))
        .map(|a| (a, port()))
        .collect()
}

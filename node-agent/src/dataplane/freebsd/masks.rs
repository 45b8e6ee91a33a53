//! Compressing a set of owned low-bits buckets into ipfw `addr:mask` matches.
//!
//! With `bucket = key & (B - 1)` (B = 2^k), a bucket set is a boolean function
//! of k bits, and one ipfw match `src-ip V:M` is a cube: the buckets `b` with
//! `b & M == V`. [`compress`] covers the owned set exactly with few cubes:
//! a recursive split on one bit (the cubes common to both halves keep that bit
//! free; each half's rest is covered using the common part as don't-care),
//! tried with the high bit first and with the low bit first, followed by a
//! merge pass; the smaller result wins. It is exact by construction (every cube
//! lies inside the owned set, every owned bucket is in some cube) and finds one
//! cube for aligned blocks and for strided sets (`every 4th bucket`).
//! It is not always minimal (that is NP-hard in general).

use std::collections::BTreeSet;

/// One match `bucket & mask == value` over the low k bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cube {
    /// The required values of the cared-for bits (`value & !mask == 0`).
    pub value: u32,
    /// Which bits are compared (0 = don't care).
    pub mask: u32,
}

impl Cube {
    /// Whether `bucket` matches.
    pub fn contains(&self, bucket: u32) -> bool {
        bucket & self.mask == self.value
    }
}

/// Covers `owned` (a subset of `0..bucket_count`, `bucket_count` a power of two
/// up to 2^16) exactly with few cubes. An empty set gives no cube; the full set
/// gives the single cube `value 0, mask 0`.
///
/// # Panics
/// When `bucket_count` is not a power of two in `1..=65536` or a bucket is out
/// of range (callers validate first).
pub fn compress(owned: &BTreeSet<u32>, bucket_count: u32) -> Vec<Cube> {
    assert!(
        bucket_count.is_power_of_two() && bucket_count <= 1 << 16,
        "bucket count {bucket_count} must be a power of two up to 65536"
    );
    let n = bucket_count as usize;
    let bits = bucket_count.trailing_zeros();
    let mut target = vec![false; n];
    for &b in owned {
        assert!(b < bucket_count, "bucket {b} out of range");
        target[b as usize] = true;
    }
    let none = vec![false; n];
    let orders: [Vec<u32>; 2] = [(0..bits).rev().collect(), (0..bits).collect()];
    let mut best: Option<Vec<Cube>> = None;
    for order in orders {
        // Re-index so that the first bit of `order` is the top index bit:
        // `cover` always splits an array in halves.
        let permuted: Vec<bool> = (0..n)
            .map(|p| {
                let bucket = order.iter().enumerate().fold(0u32, |acc, (j, &bit)| {
                    acc | ((((p >> (bits as usize - 1 - j)) & 1) as u32) << bit)
                });
                target[bucket as usize]
            })
            .collect();
        let mut cubes = Vec::new();
        cover(&permuted, &none, &order, 0, 0, &mut cubes);
        let cubes = merge(cubes);
        if best.as_ref().is_none_or(|b| cubes.len() < b.len()) {
            best = Some(cubes);
        }
    }
    let mut best = best.unwrap_or_default();
    best.sort();
    best
}

/// Covers the `true` entries of `t` with cubes inside `t ∪ d`. `t` and `d` are
/// indexed by the bits in `order` (the first entry of `order` is the highest
/// index bit); `fixed_value`/`fixed_mask` are the bits already decided by the
/// callers (in bucket space).
fn cover(
    t: &[bool],
    d: &[bool],
    order: &[u32],
    fixed_value: u32,
    fixed_mask: u32,
    out: &mut Vec<Cube>,
) {
    if !t.iter().any(|&x| x) {
        return;
    }
    if t.iter().zip(d).all(|(&a, &b)| a || b) {
        out.push(Cube {
            value: fixed_value,
            mask: fixed_mask,
        });
        return;
    }
    // Not full, so there is at least one bit left to split on.
    let bit = order[0];
    let half = t.len() / 2;
    let (t0, t1) = t.split_at(half);
    let (d0, d1) = d.split_at(half);
    // Entries usable in both halves; the targets among them can be covered by
    // cubes that leave `bit` free.
    let both: Vec<bool> = (0..half)
        .map(|i| (t0[i] || d0[i]) && (t1[i] || d1[i]))
        .collect();
    let common_t: Vec<bool> = (0..half).map(|i| both[i] && (t0[i] || t1[i])).collect();
    let common_d: Vec<bool> = (0..half).map(|i| both[i] && !common_t[i]).collect();
    cover(
        &common_t,
        &common_d,
        &order[1..],
        fixed_value,
        fixed_mask,
        out,
    );
    for (side, (ts, ds)) in [(t0, d0), (t1, d1)].into_iter().enumerate() {
        let rest_t: Vec<bool> = (0..half).map(|i| ts[i] && !common_t[i]).collect();
        let rest_d: Vec<bool> = (0..half).map(|i| (ts[i] || ds[i]) && !rest_t[i]).collect();
        cover(
            &rest_t,
            &rest_d,
            &order[1..],
            fixed_value | ((side as u32) << bit),
            fixed_mask | (1 << bit),
            out,
        );
    }
}

/// Merges cubes that differ in exactly one cared-for bit and drops cubes
/// contained in another, until nothing changes.
fn merge(cubes: Vec<Cube>) -> Vec<Cube> {
    let mut set: BTreeSet<Cube> = cubes.into_iter().collect();
    loop {
        let list: Vec<Cube> = set.iter().copied().collect();
        let mut changed = false;
        'outer: for (i, a) in list.iter().enumerate() {
            for b in &list[i + 1..] {
                if a.mask == b.mask {
                    let diff = a.value ^ b.value;
                    if diff.count_ones() == 1 {
                        set.remove(a);
                        set.remove(b);
                        set.insert(Cube {
                            value: a.value & !diff,
                            mask: a.mask & !diff,
                        });
                        changed = true;
                        break 'outer;
                    }
                }
                // a inside b: b cares about a subset of a's bits and agrees on them.
                if a != b && b.mask & a.mask == b.mask && a.value & b.mask == b.value {
                    set.remove(a);
                    changed = true;
                    break 'outer;
                }
                if a != b && a.mask & b.mask == a.mask && b.value & a.mask == a.value {
                    set.remove(b);
                    changed = true;
                    break 'outer;
                }
            }
        }
        if !changed {
            return set.into_iter().collect();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check_exact(owned: &BTreeSet<u32>, b: u32, cubes: &[Cube]) {
        for x in 0..b {
            let hit = cubes.iter().any(|c| c.contains(x));
            assert_eq!(hit, owned.contains(&x), "bucket {x}: cubes {cubes:?}");
        }
        for c in cubes {
            assert_eq!(c.value & !c.mask, 0, "value outside mask in {c:?}");
            assert_eq!(c.mask & !(b - 1), 0, "mask beyond the bucket bits in {c:?}");
        }
    }

    fn set(it: impl IntoIterator<Item = u32>) -> BTreeSet<u32> {
        it.into_iter().collect()
    }

    #[test]
    fn empty_and_full() {
        assert!(compress(&BTreeSet::new(), 256).is_empty());
        assert_eq!(
            compress(&set(0..256), 256),
            vec![Cube { value: 0, mask: 0 }]
        );
    }

    #[test]
    fn aligned_block_is_one_rule() {
        let owned = set(64..128);
        let cubes = compress(&owned, 256);
        check_exact(&owned, 256, &cubes);
        assert_eq!(
            cubes,
            vec![Cube {
                value: 64,
                mask: 0xc0
            }]
        );
    }

    #[test]
    fn every_fourth_is_one_rule() {
        let owned = set((0..256).step_by(4));
        let cubes = compress(&owned, 256);
        check_exact(&owned, 256, &cubes);
        assert_eq!(cubes, vec![Cube { value: 0, mask: 3 }]);
        let owned = set((0..256).filter(|b| b % 4 == 3));
        assert_eq!(compress(&owned, 256), vec![Cube { value: 3, mask: 3 }]);
    }

    #[test]
    fn typical_counts() {
        // A third of 256 buckets as one contiguous run: 85 buckets, 0..85.
        let owned = set(0..85);
        let cubes = compress(&owned, 256);
        check_exact(&owned, 256, &cubes);
        // 64 + 16 + 4 + 1 = 85: the binary expansion, 4 rules.
        assert_eq!(cubes.len(), 4);
        // Round-robin over 3 hosts (b % 3 == 0) is the worst case: no two
        // multiples of 3 differ by a power of two, so no two buckets share a
        // cube and one rule per bucket is optimal. Assignment policies for
        // lowbits should hand out aligned blocks instead.
        let owned = set((0..256).filter(|b| b % 3 == 0));
        let cubes = compress(&owned, 256);
        check_exact(&owned, 256, &cubes);
        assert_eq!(cubes.len(), owned.len());
        // Round-robin over 4 hosts is one rule per host.
        let owned = set((0..256).filter(|b| b % 4 == 1));
        assert_eq!(compress(&owned, 256).len(), 1);
        // Two aligned blocks plus a strided set in another quarter.
        let owned: BTreeSet<u32> = (0..32)
            .chain(128..160)
            .chain((192..256).step_by(8))
            .collect();
        let cubes = compress(&owned, 256);
        check_exact(&owned, 256, &cubes);
        assert_eq!(cubes.len(), 2, "{cubes:?}");
        // A single bucket is one exact-match rule.
        let cubes = compress(&set([77]), 256);
        assert_eq!(
            cubes,
            vec![Cube {
                value: 77,
                mask: 0xff
            }]
        );
    }

    #[test]
    fn large_bucket_counts() {
        let owned = set(1024..2048);
        let cubes = compress(&owned, 4096);
        check_exact(&owned, 4096, &cubes);
        assert_eq!(
            cubes,
            vec![Cube {
                value: 1024,
                mask: 0xc00
            }]
        );
        let owned = set((0..4096).step_by(16));
        assert_eq!(
            compress(&owned, 4096),
            vec![Cube {
                value: 0,
                mask: 0xf
            }]
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn exact_for_random_sets(bits in 1u32..=9, seed in any::<u64>(), density in 0u32..=100) {
            let b = 1u32 << bits;
            let mut x = seed | 1;
            let mut owned = BTreeSet::new();
            for bucket in 0..b {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                if (x % 100) < u64::from(density) {
                    owned.insert(bucket);
                }
            }
            let cubes = compress(&owned, b);
            check_exact(&owned, b, &cubes);
            prop_assert!(cubes.len() <= owned.len().max(1));
        }

        #[test]
        fn exact_for_unions_of_blocks(bits in 4u32..=12, blocks in proptest::collection::vec((0u32..4096, 0u32..6), 1..6)) {
            let b = 1u32 << bits;
            let mut owned = BTreeSet::new();
            for (start, size_log) in blocks {
                let size = 1u32 << size_log.min(bits);
                let start = (start % b) & !(size - 1);
                owned.extend(start..start + size);
            }
            let cubes = compress(&owned, b);
            check_exact(&owned, b, &cubes);
        }
    }
}

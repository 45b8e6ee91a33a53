//! The simulated network: decides, for every message handed to it, whether it is
//! blocked by a partition, lost, delivered once or several times, and when.
//!
//! - **Delay and reordering**: each copy gets its own latency drawn from the
//!   current [`NetProfile`]; with `spike` probability the latency is a long tail
//!   value instead, so later messages overtake earlier ones.
//! - **Loss and duplication**: per message, with the profile's probabilities.
//! - **Partitions**: a multiset of blocked directed links `(from, to)`. A symmetric
//!   partition blocks both directions, an asymmetric one only one. Partitions
//!   overlap freely; each is healed by id.
//!
//! The network holds no messages itself: the world's event queue does. A link is
//! checked when a message is sent (the transport sees the connection fail, so the
//! sender gets `report_unreachable`) and again on delivery (a partition that
//! started while the message was in flight swallows it silently).

use std::collections::BTreeMap;

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Latency, loss and duplication of the whole network at one time.
#[derive(Debug, Clone, PartialEq)]
pub struct NetProfile {
    pub name: &'static str,
    pub min_delay_ms: u64,
    pub max_delay_ms: u64,
    /// Probability that a message takes a long-tail delay (reordering).
    pub spike: f64,
    pub spike_max_ms: u64,
    pub loss: f64,
    pub duplicate: f64,
}

impl NetProfile {
    /// A healthy LAN.
    pub fn calm() -> Self {
        NetProfile {
            name: "calm",
            min_delay_ms: 1,
            max_delay_ms: 5,
            spike: 0.0,
            spike_max_ms: 0,
            loss: 0.0,
            duplicate: 0.0,
        }
    }

    /// A random profile, from mildly flaky to hostile.
    pub fn random(rng: &mut ChaCha8Rng) -> Self {
        match rng.gen_range(0..4) {
            0 => NetProfile {
                name: "flaky",
                min_delay_ms: 1,
                max_delay_ms: 10,
                spike: 0.02,
                spike_max_ms: 200,
                loss: rng.gen_range(0.01..0.05),
                duplicate: rng.gen_range(0.0..0.03),
            },
            1 => NetProfile {
                name: "lossy",
                min_delay_ms: 1,
                max_delay_ms: 20,
                spike: 0.05,
                spike_max_ms: 300,
                loss: rng.gen_range(0.1..0.3),
                duplicate: rng.gen_range(0.0..0.05),
            },
            2 => NetProfile {
                name: "reordering",
                min_delay_ms: 1,
                max_delay_ms: 50,
                spike: 0.2,
                spike_max_ms: 600,
                loss: rng.gen_range(0.0..0.02),
                duplicate: rng.gen_range(0.05..0.2),
            },
            _ => NetProfile {
                name: "slow",
                min_delay_ms: 20,
                max_delay_ms: 150,
                spike: 0.05,
                spike_max_ms: 1500,
                loss: rng.gen_range(0.0..0.05),
                duplicate: rng.gen_range(0.0..0.05),
            },
        }
    }

    fn delay(&self, rng: &mut ChaCha8Rng) -> u64 {
        if self.spike > 0.0 && rng.gen_bool(self.spike) {
            rng.gen_range(self.max_delay_ms..=self.spike_max_ms.max(self.max_delay_ms))
        } else {
            rng.gen_range(self.min_delay_ms..=self.max_delay_ms)
        }
    }
}

impl std::fmt::Display for NetProfile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (delay {}-{}ms, {:.0}% spikes to {}ms, {:.1}% loss, {:.1}% duplicates)",
            self.name,
            self.min_delay_ms,
            self.max_delay_ms,
            self.spike * 100.0,
            self.spike_max_ms,
            self.loss * 100.0,
            self.duplicate * 100.0
        )
    }
}

/// What the network does with one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// The link is partitioned: the sender's transport notices.
    Blocked,
    /// Silently lost.
    Lost,
    /// Delivered after each of these delays (more than one: duplicated).
    Deliver(Vec<u64>),
}

/// Partitions and the current profile.
#[derive(Debug, Clone)]
pub struct Network {
    profile: NetProfile,
    /// Blocked directed links, reference-counted so partitions can overlap.
    blocked: BTreeMap<(u64, u64), u32>,
    /// Each active partition's links, by partition id.
    partitions: BTreeMap<u64, Vec<(u64, u64)>>,
    next_partition: u64,
}

impl Default for Network {
    fn default() -> Self {
        Network {
            profile: NetProfile::calm(),
            blocked: BTreeMap::new(),
            partitions: BTreeMap::new(),
            next_partition: 1,
        }
    }
}

impl Network {
    pub fn profile(&self) -> &NetProfile {
        &self.profile
    }

    pub fn set_profile(&mut self, p: NetProfile) {
        self.profile = p;
    }

    pub fn is_blocked(&self, from: u64, to: u64) -> bool {
        self.blocked.contains_key(&(from, to))
    }

    /// Blocks the given directed links; returns the partition's id for [`Network::heal`].
    pub fn partition(&mut self, links: Vec<(u64, u64)>) -> u64 {
        for l in &links {
            *self.blocked.entry(*l).or_default() += 1;
        }
        let id = self.next_partition;
        self.next_partition += 1;
        self.partitions.insert(id, links);
        id
    }

    pub fn heal(&mut self, id: u64) {
        for l in self.partitions.remove(&id).unwrap_or_default() {
            if let Some(n) = self.blocked.get_mut(&l) {
                *n -= 1;
                if *n == 0 {
                    self.blocked.remove(&l);
                }
            }
        }
    }

    pub fn heal_all(&mut self) {
        self.partitions.clear();
        self.blocked.clear();
    }

    pub fn active_partitions(&self) -> usize {
        self.partitions.len()
    }

    pub fn route(&self, rng: &mut ChaCha8Rng, from: u64, to: u64) -> Route {
        if self.is_blocked(from, to) {
            return Route::Blocked;
        }
        let p = &self.profile;
        if p.loss > 0.0 && rng.gen_bool(p.loss) {
            return Route::Lost;
        }
        let mut delays = vec![p.delay(rng)];
        while p.duplicate > 0.0 && delays.len() < 3 && rng.gen_bool(p.duplicate) {
            delays.push(p.delay(rng));
        }
        Route::Deliver(delays)
    }
}

/// Directed links cutting `a` off from `b` (and `b` from `a` unless `one_way`).
pub fn cut(a: &[u64], b: &[u64], one_way: bool) -> Vec<(u64, u64)> {
    let mut links = Vec::new();
    for &x in a {
        for &y in b {
            if x != y {
                links.push((x, y));
                if !one_way {
                    links.push((y, x));
                }
            }
        }
    }
    links
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn overlapping_partitions_heal_independently() {
        let mut n = Network::default();
        let a = n.partition(cut(&[1], &[2, 3], false));
        let b = n.partition(cut(&[1], &[2], true));
        assert!(n.is_blocked(1, 2) && n.is_blocked(2, 1) && n.is_blocked(3, 1));
        n.heal(a);
        assert!(n.is_blocked(1, 2) && !n.is_blocked(2, 1) && !n.is_blocked(1, 3));
        n.heal(b);
        assert!(!n.is_blocked(1, 2));
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert!(matches!(n.route(&mut rng, 1, 2), Route::Deliver(_)));
    }
}

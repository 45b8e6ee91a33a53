//! Flap damping, after BGP route-flap damping (RFC 2439): every lease loss adds a
//! penalty that decays with a half-life; a member whose penalty is above
//! `suppress` gets no buckets until it decays below `reuse` *and* the member has
//! been stable for `min_stable_ms`. Removal is never damped: an expired lease always
//! loses its buckets. Integer arithmetic only, so every replica computes the same.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Damping {
    pub penalty_per_loss: u32,
    pub half_life_ms: u64,
    pub suppress: u32,
    pub reuse: u32,
    pub min_stable_ms: u64,
    pub cap: u32,
}

impl Default for Damping {
    fn default() -> Self {
        Damping {
            penalty_per_loss: 1000,
            half_life_ms: 60_000,
            suppress: 2500,
            reuse: 750,
            min_stable_ms: 5_000,
            cap: 8000,
        }
    }
}

impl Damping {
    pub fn validate(&self) -> Result<(), String> {
        if self.half_life_ms == 0 {
            return Err("damping.half_life_ms must be greater than 0".into());
        }
        if self.reuse >= self.suppress {
            return Err(format!(
                "damping.reuse ({}) must be below damping.suppress ({})",
                self.reuse, self.suppress
            ));
        }
        if self.cap < self.suppress {
            return Err(format!(
                "damping.cap ({}) must be at least damping.suppress ({})",
                self.cap, self.suppress
            ));
        }
        Ok(())
    }

    /// `value` decayed over `elapsed_ms`: halved per whole half-life, and linearly
    /// interpolated within one (never above the exact exponential by more than 6%).
    pub fn decay(&self, value: u32, elapsed_ms: u64) -> u32 {
        let halvings = elapsed_ms / self.half_life_ms;
        if halvings >= 32 {
            return 0;
        }
        let v = u64::from(value) >> halvings;
        let frac = elapsed_ms % self.half_life_ms;
        // v * (1 - frac / (2 * half_life)): straight line from v to v/2.
        let v = v - v * frac / (2 * self.half_life_ms);
        v as u32
    }

    /// Penalty after one more lease loss at `now_ms`.
    pub fn add_loss(&self, p: Penalty, now_ms: u64) -> Penalty {
        let current = self.decay(p.value, now_ms.saturating_sub(p.at_ms));
        Penalty {
            value: (current + self.penalty_per_loss).min(self.cap),
            at_ms: now_ms,
        }
    }

    pub fn current(&self, p: Penalty, now_ms: u64) -> u32 {
        self.decay(p.value, now_ms.saturating_sub(p.at_ms))
    }

    /// Milliseconds until the penalty decays to `reuse` (0 if already there).
    pub fn time_to_reuse(&self, p: Penalty, now_ms: u64) -> u64 {
        let mut lo = 0u64;
        let mut hi = 32 * self.half_life_ms;
        if self.current(p, now_ms) <= self.reuse {
            return 0;
        }
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.current(p, now_ms + mid) <= self.reuse {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        lo
    }
}

/// A member's penalty as of `at_ms` (the leader's [`ClusterClock`] time, stamped
/// into the command that changed it, so applying it reads no clock).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Penalty {
    pub value: u32,
    pub at_ms: u64,
}

/// The time base of penalty stamps and their decay ("cluster time"), kept by
/// every controller: the newest stamp in its applied state, advanced by its
/// monotonic clock since it applied it. No wall clock is read, so a leader whose
/// clock is ahead cannot re-admit flappers early, nor one behind stop their
/// decay. It never goes back (stamps are only ever taken in when newer) and never
/// jumps ahead of the stamps by more than the time elapsed. A restarted controller
/// counts from the newest stamp at its start: the time it was down is not
/// counted, which keeps a flapper out longer, never shorter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClusterClock {
    /// (cluster time, local monotonic time) at the last observation.
    anchor: Option<(u64, u64)>,
}

impl ClusterClock {
    /// Cluster time at local monotonic `now` (0 before any observation).
    pub fn at(&self, now: u64) -> u64 {
        self.anchor
            .map_or(0, |(cluster, local)| cluster + now.saturating_sub(local))
    }

    /// Take in the newest penalty stamp of the applied state at local `now`.
    pub fn observe(&mut self, now: u64, newest_stamp: u64) {
        self.anchor = Some((self.at(now).max(newest_stamp), now));
    }
}

/// The newest penalty stamp in `state`.
pub fn newest_stamp(state: &crate::state::ClusterState) -> u64 {
    state
        .members
        .values()
        .map(|m| m.penalty.at_ms)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decays_by_half_per_half_life_and_monotonically() {
        let d = Damping::default();
        assert_eq!(d.decay(1000, 0), 1000);
        assert_eq!(d.decay(1000, 60_000), 500);
        assert_eq!(d.decay(1000, 120_000), 250);
        assert_eq!(d.decay(1000, 30_000), 750);
        let mut last = u32::MAX;
        for t in (0..600_000).step_by(777) {
            let v = d.decay(4000, t);
            assert!(v <= last);
            last = v;
        }
        assert_eq!(d.decay(u32::MAX, 60_000 * 40), 0);
    }

    #[test]
    fn repeated_losses_suppress_then_decay_to_reuse() {
        let d = Damping::default();
        let mut p = Penalty::default();
        for i in 0..3 {
            p = d.add_loss(p, i * 1000);
        }
        assert!(
            d.current(p, 2000) > d.suppress,
            "three quick losses suppress"
        );
        let wait = d.time_to_reuse(p, 2000);
        assert!(wait > 60_000 && wait < 180_000, "{wait}");
        assert!(d.current(p, 2000 + wait) <= d.reuse);
        assert!(d.current(p, 2000 + wait - 1) > d.reuse);
        // The cap bounds how long a member can be kept out.
        for i in 0..100 {
            p = d.add_loss(p, 3000 + i);
        }
        assert_eq!(p.value, d.cap);
    }

    #[test]
    fn a_single_loss_does_not_suppress() {
        let d = Damping::default();
        let p = d.add_loss(Penalty::default(), 0);
        assert!(d.current(p, 0) < d.suppress);
        assert!(Damping {
            reuse: 10,
            suppress: 5,
            ..d
        }
        .validate()
        .is_err());
    }

    #[test]
    fn cluster_time_follows_the_newest_stamp_and_never_goes_back() {
        let mut c = ClusterClock::default();
        c.observe(5_000, 100);
        assert_eq!(c.at(5_000), 100);
        assert_eq!(c.at(6_000), 1_100, "advances with the local clock");
        c.observe(6_000, 50);
        assert_eq!(c.at(6_000), 1_100, "an older stamp does not set it back");
        c.observe(7_000, 9_000);
        assert_eq!(c.at(7_500), 9_500, "a newer stamp moves it up");
        assert_eq!(c.at(6_000), 9_000, "nor does an earlier reading");
    }
}

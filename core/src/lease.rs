//! Quorum leases: the arithmetic that keeps two hosts from accepting new flows for
//! the same bucket. Proof sketch in `controller/docs/leases.md`.
//!
//! An agent heartbeats every controller each `heartbeat_ms`, noting its own
//! monotonic send time `t_s`. Once a majority of controllers acked that round, its
//! lease runs to `t_s + lease_ms` *on the agent's clock*, and the agent writes its
//! buckets into the kernel with that deadline ([`AgentLease`]).
//!
//! A controller that acked at its local time `t_r` promises not to help fence that
//! member before `t_r + L_c` ([`Promises`]). The leader moves a silent member's
//! buckets only after a majority agreed to fence it; some controller is in both
//! majorities, so by then the member's last lease has ended in real time.
//!
//! All times are milliseconds of the caller's monotonic clock; nothing here reads one.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::damping::{self, ClusterClock};
use crate::state::ClusterState;

/// Floor of `kernel_delay_ms`: a kernel timer tick (10 ms at HZ=100) plus the
/// normal latency of an nft transaction.
pub const MIN_KERNEL_DELAY_MS: u64 = 20;
/// Floor of `margin_ms`: one kernel timer tick.
pub const MIN_MARGIN_MS: u64 = 10;

/// Lease timing, a replicated cluster setting so agents and controllers agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LeaseTiming {
    /// H: an agent heartbeats every controller this often.
    pub heartbeat_ms: u64,
    /// L: a lease lasts this long on the agent's clock from the round's send time.
    pub lease_ms: u64,
    /// delta: worst time from the agent deciding to the kernel enforcing it.
    pub kernel_delay_ms: u64,
    /// rho: bound on clock-rate error between any two hosts, parts per million.
    pub clock_rate_ppm: u64,
    /// m: extra safety margin.
    pub margin_ms: u64,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        LeaseTiming {
            heartbeat_ms: 100,
            lease_ms: 500,
            kernel_delay_ms: 50,
            clock_rate_ppm: 10_000,
            margin_ms: 50,
        }
    }
}

impl LeaseTiming {
    pub fn validate(&self) -> Result<(), String> {
        if self.heartbeat_ms == 0 {
            return Err("heartbeat_ms must be greater than 0".into());
        }
        if self.lease_ms < 2 * self.heartbeat_ms {
            return Err(format!(
                "lease_ms ({}) must be at least twice heartbeat_ms ({}) so one lost heartbeat does not drop the lease",
                self.lease_ms, self.heartbeat_ms
            ));
        }
        if self.kernel_delay_ms < MIN_KERNEL_DELAY_MS {
            return Err(format!(
                "kernel_delay_ms ({}) must be at least {MIN_KERNEL_DELAY_MS}: a kernel timer tick (10 ms at HZ=100) plus a normal nft apply",
                self.kernel_delay_ms
            ));
        }
        if self.margin_ms < MIN_MARGIN_MS {
            return Err(format!(
                "margin_ms ({}) must be at least {MIN_MARGIN_MS}: the promise must outlast a kernel timer tick of rounding",
                self.margin_ms
            ));
        }
        if self.kernel_delay_ms >= self.lease_ms {
            return Err(format!(
                "kernel_delay_ms ({}) must be shorter than lease_ms ({})",
                self.kernel_delay_ms, self.lease_ms
            ));
        }
        if self.clock_rate_ppm >= 100_000 {
            return Err(format!(
                "clock_rate_ppm {} is 10% or more; clocks that bad cannot hold leases",
                self.clock_rate_ppm
            ));
        }
        if self.lease_ms > 600_000 {
            return Err("lease_ms above 10 minutes makes failover meaningless".into());
        }
        Ok(())
    }

    /// L_c >= (1 + rho) * (L / (1 - rho) + delta) + m, rounded up: how long after its
    /// last ack a controller refuses to help fence a member.
    pub fn controller_promise_ms(&self) -> u64 {
        let rho = self.clock_rate_ppm as f64 / 1e6;
        let worst_lease = self.lease_ms as f64 / (1.0 - rho) + self.kernel_delay_ms as f64;
        ((1.0 + rho) * worst_lease).ceil() as u64 + self.margin_ms
    }

    /// Kernel timeout to install now for a lease that runs to `expiry` (agent
    /// clock): the deadline minus `delta`, so that installing it late still ends the
    /// lease in time. `None` when nothing is left.
    pub fn kernel_timeout_ms(&self, now: u64, expiry: u64) -> Option<u64> {
        expiry
            .checked_sub(now)
            .and_then(|left| left.checked_sub(self.kernel_delay_ms))
            .filter(|&t| t > 0)
    }
}

/// Majority of `n` voters.
pub fn majority(n: usize) -> usize {
    n / 2 + 1
}

/// A controller's side of the lease protocol: when it acked whom, and whom it
/// agreed to fence. Not replicated: each controller's promises are its own.
#[derive(Debug, Clone)]
pub struct Promises {
    timing: LeaseTiming,
    /// Start time of this controller: it treats everyone as acked then, because a
    /// restarted controller does not remember what it promised before.
    started: u64,
    last_ack: BTreeMap<String, u64>,
    /// Per member, the end of the longest promise given: each ack promises
    /// `L_c` of the timing in force then, and a shorter timing set later must
    /// not shorten it (the agent counts the lease the ack carried).
    promised: BTreeMap<String, u64>,
    /// What everyone was promised at start, lengthened by any longer timing
    /// set since: a restarted controller cannot know what it acked before.
    start_promise: u64,
    /// Start of each member's current run of acks with no gap of a lease or more:
    /// how long it has been steadily up, as this controller saw it.
    acked_since: BTreeMap<String, u64>,
    /// Highest epoch per member this controller agreed to fence. Must survive
    /// restarts (the controller persists it), or a restarted controller could ack
    /// a fenced epoch again.
    fenced: BTreeMap<String, u64>,
    /// The commit index first seen after start: until it is applied, the state
    /// may be an old snapshot that lacks members added later in the log.
    replay_to: Option<u64>,
    /// The time base of damping, per controller process like the acks.
    clock: ClusterClock,
    /// Per member, since when (this controller's clock) its agent has reported
    /// problems, and the last ones it reported; absent while it serves.
    unhealthy: BTreeMap<String, (u64, Vec<String>)>,
    /// Per member, when its agent last stopped reporting problems.
    recovered: BTreeMap<String, u64>,
    faults: PromiseFaults,
}

/// Deliberate bugs for the simulator to catch: settable only with the
/// `faults` feature, which only the simulator enables.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PromiseFaults {
    /// Ack heartbeats that act on an assignment older than the member's last
    /// release (drops the second guard of `heartbeat::answer`).
    pub ack_stale_assignments: bool,
}

/// Why a heartbeat was not acked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    UnknownMember,
    StaleEpoch {
        current: u64,
    },
    Fenced {
        epoch: u64,
    },
    Evicted {
        epoch: u64,
    },
    /// This controller is not in its own applied voter set.
    NotAVoter,
    /// The heartbeat acts on an assignment older than the member's last
    /// release: a lease now could install a released bucket. Not for good: the
    /// next assignment the agent takes clears it.
    StaleAssignment {
        released_at: u64,
    },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::UnknownMember => write!(f, "unknown member"),
            Refusal::StaleEpoch { current } => write!(f, "member epoch is now {current}"),
            Refusal::Fenced { epoch } => write!(f, "epoch {epoch} is fenced"),
            Refusal::Evicted { epoch } => write!(f, "evicted at epoch {epoch}"),
            Refusal::NotAVoter => write!(f, "this controller is not a voter"),
            Refusal::StaleAssignment { released_at } => write!(
                f,
                "the agent's assignment is older than its release at index {released_at}"
            ),
        }
    }
}

impl Promises {
    pub fn new(timing: LeaseTiming, now: u64, fenced: BTreeMap<String, u64>) -> Self {
        Promises {
            timing,
            started: now,
            last_ack: BTreeMap::new(),
            promised: BTreeMap::new(),
            start_promise: now + timing.controller_promise_ms(),
            unhealthy: BTreeMap::new(),
            recovered: BTreeMap::new(),
            faults: PromiseFaults::default(),
            acked_since: BTreeMap::new(),
            fenced,
            replay_to: None,
            clock: ClusterClock::default(),
        }
    }

    /// New acks promise the new timing's `L_c`; promises already given keep
    /// their length (see `promised`), so a shorter timing never lets this
    /// controller fence a member on the strength of an ack that promised more.
    pub fn set_timing(&mut self, timing: LeaseTiming) {
        self.start_promise = self
            .start_promise
            .max(self.started + timing.controller_promise_ms());
        self.timing = timing;
    }

    pub fn timing(&self) -> LeaseTiming {
        self.timing
    }

    #[cfg(feature = "faults")]
    pub fn set_faults(&mut self, faults: PromiseFaults) {
        self.faults = faults;
    }

    pub(crate) fn faults(&self) -> PromiseFaults {
        self.faults
    }

    /// Decide on a heartbeat from `member` claiming `epoch`, given the member's
    /// current epoch in this controller's applied state (None if unknown).
    pub fn heartbeat(
        &mut self,
        now: u64,
        member: &str,
        epoch: u64,
        current: Option<u64>,
    ) -> Result<(), Refusal> {
        let current = current.ok_or(Refusal::UnknownMember)?;
        if let Some(&f) = self.fenced.get(member) {
            if epoch <= f {
                return Err(Refusal::Fenced { epoch });
            }
        }
        if epoch != current {
            return Err(Refusal::StaleEpoch { current });
        }
        let lease = self.timing.lease_ms;
        let prev = self.last_ack.get(member).copied();
        if prev.is_none_or(|p| now >= p + lease) || !self.acked_since.contains_key(member) {
            set(&mut self.acked_since, member, now);
        }
        upsert_max(&mut self.last_ack, member, now);
        self.promise(member, now);
        Ok(())
    }

    /// Record what `member`'s agent says keeps it from serving (empty: it serves).
    pub fn report_health(&mut self, now: u64, member: &str, problems: &[String]) {
        if problems.is_empty() {
            if self.unhealthy.remove(member).is_some() {
                self.recovered.insert(member.to_string(), now);
            }
        } else {
            let e = self
                .unhealthy
                .entry(member.to_string())
                .or_insert((now, Vec::new()));
            e.1 = problems.to_vec();
        }
    }

    /// How long ago `member`'s agent stopped reporting problems (`None`: it
    /// never reported any, or reports some now).
    pub fn recovered_for(&self, now: u64, member: &str) -> Option<u64> {
        if self.unhealthy.contains_key(member) {
            return None;
        }
        self.recovered.get(member).map(|&t| now.saturating_sub(t))
    }

    /// What keeps `member` from serving, as its agent last reported (empty:
    /// nothing), and for how long it has been reporting problems.
    pub fn health(&self, now: u64, member: &str) -> (&[String], u64) {
        self.unhealthy
            .get(member)
            .map_or((&[][..], 0), |(since, p)| {
                (p.as_slice(), now.saturating_sub(*since))
            })
    }

    /// How long `member` has been acked without a gap of a lease, or None if it is
    /// not acked now.
    pub fn steady_for(&self, now: u64, member: &str) -> Option<u64> {
        let last = *self.last_ack.get(member)?;
        if now >= last + self.timing.lease_ms {
            return None;
        }
        Some(now.saturating_sub(*self.acked_since.get(member)?))
    }

    /// Promise as if acked now to members this controller has not seen before: a
    /// member added while the controller runs must not look silent since its start.
    pub fn observe<'a>(&mut self, now: u64, members: impl IntoIterator<Item = &'a str>) {
        for m in members {
            if !self.last_ack.contains_key(m) {
                self.last_ack.insert(m.to_string(), now);
                self.promise(m, now);
            }
        }
    }

    fn promise(&mut self, member: &str, now: u64) {
        let until = now + self.timing.controller_promise_ms();
        upsert_max(&mut self.promised, member, until);
    }

    /// Until when this controller promised not to help fence `member`.
    pub fn promised_until(&self, member: &str) -> u64 {
        self.promised
            .get(member)
            .copied()
            .unwrap_or(0)
            .max(self.start_promise)
    }

    /// Take in the applied state's newest penalty stamp at `now`.
    pub fn observe_stamps(&mut self, now: u64, state: &ClusterState) {
        self.clock.observe(now, damping::newest_stamp(state));
    }

    /// Cluster time at `now` ([`ClusterClock`]): stamps and decays penalties.
    pub fn cluster_ms(&self, now: u64) -> u64 {
        self.clock.at(now)
    }

    /// When this controller last acked `member` (its start time if never since).
    pub fn last_ack(&self, member: &str) -> u64 {
        self.last_ack
            .get(member)
            .copied()
            .unwrap_or(0)
            .max(self.started)
    }

    /// Whether the leader may count this controller towards fencing `member` now.
    pub fn may_fence(&self, now: u64, member: &str) -> bool {
        now >= self.promised_until(member)
    }

    /// Agree to fence `member` at `epoch` if the promise has run out. On `true` the
    /// caller must persist [`Promises::fenced`] before answering.
    pub fn fence(&mut self, now: u64, member: &str, epoch: u64) -> bool {
        if !self.may_fence(now, member) {
            return false;
        }
        let f = self.fenced.entry(member.to_string()).or_insert(epoch);
        *f = (*f).max(epoch);
        true
    }

    pub fn fenced(&self) -> &BTreeMap<String, u64> {
        &self.fenced
    }

    /// Forget members removed from the replicated state (retired, not added
    /// back), once the state at `applied` includes everything committed when
    /// this controller started (`commit` is the commit index now; the first one
    /// seen is kept). Before that a member absent from the state may be one
    /// added later in the log, and forgetting its fence mark would let this
    /// controller ack an epoch it agreed to fence. A retired member added back
    /// continues above its last epoch, so its old mark is not needed.
    pub fn forget_retired(&mut self, state: &ClusterState, applied: u64, commit: u64) {
        if applied < *self.replay_to.get_or_insert(commit) {
            return;
        }
        self.retain(|m| state.members.contains_key(m) || !state.retired.contains_key(m));
    }

    /// Forget members for which `keep` is false.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.last_ack.retain(|m, _| keep(m));
        self.promised.retain(|m, _| keep(m));
        self.unhealthy.retain(|m, _| keep(m));
        self.recovered.retain(|m, _| keep(m));
        self.acked_since.retain(|m, _| keep(m));
        self.fenced.retain(|m, _| keep(m));
    }
}

/// An agent's side: heartbeat rounds in flight and the lease they earned.
#[derive(Debug, Clone)]
pub struct AgentLease {
    timing: LeaseTiming,
    voters: BTreeSet<u64>,
    next_round: u64,
    rounds: BTreeMap<u64, Round>,
    expiry: Option<u64>,
}

#[derive(Debug, Clone)]
struct Round {
    sent: u64,
    acks: BTreeSet<u64>,
    /// The shortest lease the acks so far carried.
    lease_ms: u64,
}

impl AgentLease {
    pub fn new(timing: LeaseTiming, voters: BTreeSet<u64>) -> Self {
        AgentLease {
            timing,
            voters,
            next_round: 1,
            rounds: BTreeMap::new(),
            expiry: None,
        }
    }

    pub fn timing(&self) -> LeaseTiming {
        self.timing
    }

    /// A shorter lease clips the one already earned: it was earned at send time
    /// `expiry - lease_ms`, and the controllers now promise only the new length.
    pub fn set_timing(&mut self, timing: LeaseTiming) {
        if let (Some(e), Some(sent)) = (self.expiry, self.earned_at()) {
            self.expiry = Some(e.min(sent + timing.lease_ms));
        }
        self.timing = timing;
    }

    /// When the round that earned the lease was sent: its expiry less the
    /// lease (an ack's shorter promise only makes this earlier).
    pub fn earned_at(&self) -> Option<u64> {
        self.expiry.map(|e| e.saturating_sub(self.timing.lease_ms))
    }

    /// The controllers whose acks count (the current raft voters).
    pub fn set_voters(&mut self, voters: BTreeSet<u64>) {
        if voters != self.voters {
            // Acks gathered under another voter set prove nothing now.
            self.rounds.clear();
            self.voters = voters;
        }
    }

    /// Start a round: call just before sending it to every controller.
    pub fn start_round(&mut self, now: u64) -> u64 {
        let r = self.next_round;
        self.next_round += 1;
        self.rounds.insert(
            r,
            Round {
                sent: now,
                acks: BTreeSet::new(),
                lease_ms: u64::MAX,
            },
        );
        // Rounds older than a lease can no longer extend it.
        let horizon = now.saturating_sub(self.timing.lease_ms);
        self.rounds.retain(|_, rd| rd.sent >= horizon);
        r
    }

    /// Record an ack of `round` from `controller`, which promised a lease of
    /// `lease_ms` (0: not said, an older controller). Returns the new expiry
    /// when this ack completed a majority that extends the lease. The lease is
    /// the shortest any ack of the majority promised: the controller that will
    /// also be in a fence majority may be any of them.
    pub fn ack(&mut self, round: u64, controller: u64, lease_ms: u64) -> Option<u64> {
        if !self.voters.contains(&controller) {
            return None;
        }
        let need = majority(self.voters.len());
        let rd = self.rounds.get_mut(&round)?;
        if !rd.acks.insert(controller) {
            return None;
        }
        if lease_ms > 0 {
            rd.lease_ms = rd.lease_ms.min(lease_ms);
        }
        if rd.acks.len() != need {
            return None;
        }
        let expiry = rd.sent + self.timing.lease_ms.min(rd.lease_ms);
        if self.expiry.is_some_and(|e| e >= expiry) {
            return None;
        }
        self.expiry = Some(expiry);
        Some(expiry)
    }

    /// Drop the lease at once (the agent was fenced or is shutting down).
    pub fn revoke(&mut self) {
        self.expiry = None;
        self.rounds.clear();
    }

    pub fn expiry(&self) -> Option<u64> {
        self.expiry
    }

    pub fn valid(&self, now: u64) -> bool {
        self.expiry.is_some_and(|e| now < e)
    }

    /// Kernel timeout for the owned buckets if installed now.
    pub fn kernel_timeout_ms(&self, now: u64) -> Option<u64> {
        self.timing.kernel_timeout_ms(now, self.expiry?)
    }
}

// Heartbeat path helpers: a member's key is allocated only the first time, not
// on every heartbeat (members x controllers x 10 per second).
fn upsert_max(map: &mut BTreeMap<String, u64>, member: &str, v: u64) {
    match map.get_mut(member) {
        Some(t) => *t = (*t).max(v),
        None => drop(map.insert(member.to_string(), v)),
    }
}

fn set(map: &mut BTreeMap<String, u64>, member: &str, v: u64) {
    match map.get_mut(member) {
        Some(t) => *t = v,
        None => drop(map.insert(member.to_string(), v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_promise_covers_the_worst_lease() {
        let t = LeaseTiming::default();
        assert!(t.validate().is_ok());
        let lc = t.controller_promise_ms();
        // (1.01) * (500 / 0.99 + 50) + 50 = 610.6..
        assert_eq!(lc, 611);
        // The promise in real time, on a fast controller clock, still outlasts the
        // lease in real time on a slow agent clock plus the kernel delay.
        let rho = t.clock_rate_ppm as f64 / 1e6;
        assert!(
            lc as f64 / (1.0 + rho) > t.lease_ms as f64 / (1.0 - rho) + t.kernel_delay_ms as f64
        );
    }

    #[test]
    fn impossible_timings_are_refused() {
        let bad = |f: fn(&mut LeaseTiming)| {
            let mut t = LeaseTiming::default();
            f(&mut t);
            t.validate().is_err()
        };
        assert!(bad(|t| t.lease_ms = 150));
        assert!(bad(|t| t.kernel_delay_ms = 600));
        assert!(bad(|t| t.kernel_delay_ms = MIN_KERNEL_DELAY_MS - 1));
        assert!(bad(|t| t.margin_ms = 0));
        assert!(bad(|t| t.clock_rate_ppm = 200_000));
        assert!(bad(|t| t.heartbeat_ms = 0));
    }

    #[test]
    fn lease_needs_a_majority_of_voters_and_counts_from_send_time() {
        let mut a = AgentLease::new(LeaseTiming::default(), [1, 2, 3].into());
        let r = a.start_round(1000);
        assert_eq!(a.ack(r, 1, 500), None);
        assert_eq!(a.ack(r, 1, 500), None, "duplicate ack counts once");
        assert_eq!(a.ack(r, 9, 500), None, "non-voter");
        assert_eq!(a.ack(r, 2, 500), Some(1500));
        assert_eq!(a.ack(r, 3, 500), None, "majority already reached");
        assert!(a.valid(1499) && !a.valid(1500));
        assert_eq!(a.kernel_timeout_ms(1100), Some(350));
        assert_eq!(a.kernel_timeout_ms(1460), None);
        // An older round completing late never shortens or re-extends the lease.
        let old = a.start_round(1100);
        let newer = a.start_round(1200);
        assert_eq!(a.ack(newer, 1, 500), None);
        assert_eq!(a.ack(newer, 3, 500), Some(1700));
        assert_eq!(a.ack(old, 1, 500), None);
        assert_eq!(a.ack(old, 2, 500), None);
        assert_eq!(a.expiry(), Some(1700));
    }

    #[test]
    fn a_shorter_lease_clips_the_earned_expiry() {
        let mut a = AgentLease::new(LeaseTiming::default(), [1].into());
        let r = a.start_round(1000);
        assert_eq!(a.ack(r, 1, 500), Some(1500));
        a.set_timing(LeaseTiming {
            lease_ms: 300,
            ..LeaseTiming::default()
        });
        assert_eq!(a.expiry(), Some(1300));
        a.set_timing(LeaseTiming::default());
        assert_eq!(
            a.expiry(),
            Some(1300),
            "a longer lease is not granted retroactively"
        );
    }

    #[test]
    fn changing_voters_discards_gathered_acks() {
        let mut a = AgentLease::new(LeaseTiming::default(), [1, 2, 3].into());
        let r = a.start_round(0);
        a.ack(r, 1, 500);
        a.set_voters([1, 2, 3, 4].into());
        assert_eq!(a.ack(r, 2, 500), None, "round was discarded");
    }

    #[test]
    fn controller_fences_only_after_its_promise_and_then_refuses_that_epoch() {
        let t = LeaseTiming::default();
        let lc = t.controller_promise_ms();
        let mut p = Promises::new(t, 0, BTreeMap::new());
        assert!(
            !p.fence(lc - 1, "x", 1),
            "a fresh controller promised everyone"
        );
        assert!(p.heartbeat(100, "x", 1, Some(1)).is_ok());
        assert!(!p.fence(100 + lc - 1, "x", 1));
        assert!(p.fence(100 + lc, "x", 1));
        assert_eq!(
            p.heartbeat(100 + lc + 1, "x", 1, Some(1)),
            Err(Refusal::Fenced { epoch: 1 })
        );
        // The re-admitted member at a newer epoch is acked again.
        assert!(p.heartbeat(100 + lc + 2, "x", 2, Some(2)).is_ok());
        assert_eq!(p.heartbeat(0, "y", 1, None), Err(Refusal::UnknownMember));
        assert_eq!(
            p.heartbeat(0, "x", 3, Some(2)),
            Err(Refusal::StaleEpoch { current: 2 })
        );
    }

    #[test]
    fn steadiness_restarts_after_a_gap_of_a_lease() {
        let t = LeaseTiming::default();
        let mut p = Promises::new(t, 0, BTreeMap::new());
        assert_eq!(p.steady_for(0, "x"), None);
        for now in (1000..=3000).step_by(100) {
            p.heartbeat(now, "x", 1, Some(1)).unwrap();
        }
        assert_eq!(p.steady_for(3050, "x"), Some(2050));
        assert_eq!(
            p.steady_for(3000 + t.lease_ms, "x"),
            None,
            "silent for a lease"
        );
        p.heartbeat(4000, "x", 1, Some(1)).unwrap();
        assert_eq!(
            p.steady_for(4100, "x"),
            Some(100),
            "a new run after the gap"
        );
    }

    #[test]
    fn a_member_first_seen_later_gets_a_full_promise() {
        let t = LeaseTiming::default();
        let lc = t.controller_promise_ms();
        let mut p = Promises::new(t, 0, BTreeMap::new());
        p.observe(10_000, ["new"]);
        assert!(!p.may_fence(10_000 + lc - 1, "new"));
        assert!(p.may_fence(10_000 + lc, "new"));
        // Observing again does not push an older ack forward.
        p.observe(20_000, ["new"]);
        assert!(p.may_fence(10_000 + lc, "new"));
    }

    #[test]
    fn fence_marks_survive_a_restart_when_persisted() {
        let t = LeaseTiming::default();
        let mut p = Promises::new(t, 0, BTreeMap::new());
        assert!(p.fence(t.controller_promise_ms(), "x", 4));
        let restarted = Promises::new(t, 5000, p.fenced().clone());
        let mut r = restarted;
        assert_eq!(
            r.heartbeat(5001, "x", 4, Some(4)),
            Err(Refusal::Fenced { epoch: 4 })
        );
        assert!(!r.may_fence(5001, "y"), "restart renews every promise");
    }

    #[test]
    fn the_lease_is_the_shortest_the_majority_promised() {
        let mut a = AgentLease::new(LeaseTiming::default(), [1, 2, 3].into());
        let r = a.start_round(1000);
        assert_eq!(a.ack(r, 1, 500), None);
        assert_eq!(a.ack(r, 2, 300), Some(1300), "controller 2 promised 300");
        let r = a.start_round(1100);
        assert_eq!(a.ack(r, 3, 0), None);
        assert_eq!(a.ack(r, 1, 0), Some(1600), "0: the agent's own timing");
        let r = a.start_round(1200);
        assert_eq!(a.ack(r, 3, 900), None);
        assert_eq!(
            a.ack(r, 1, 800),
            Some(1700),
            "never longer than the agent's own timing"
        );
    }

    #[test]
    fn a_shorter_timing_keeps_the_promises_already_given() {
        let long = LeaseTiming::default();
        let short = LeaseTiming {
            heartbeat_ms: 50,
            lease_ms: 200,
            ..long
        };
        let (lc_long, lc_short) = (long.controller_promise_ms(), short.controller_promise_ms());
        assert!(lc_short < lc_long);
        let mut p = Promises::new(long, 0, BTreeMap::new());
        p.heartbeat(1000, "x", 1, Some(1)).unwrap();
        p.set_timing(short);
        assert!(
            !p.may_fence(1000 + lc_short, "x"),
            "the ack at 1000 promised {lc_long} ms"
        );
        assert!(p.may_fence(1000 + lc_long, "x"));
        // Acks after the change promise the new length.
        p.heartbeat(5000, "x", 1, Some(1)).unwrap();
        assert!(p.may_fence(5000 + lc_short, "x"));
        // A longer timing lengthens what a restart promised everyone.
        let mut q = Promises::new(short, 0, BTreeMap::new());
        q.set_timing(long);
        assert!(!q.may_fence(lc_long - 1, "y"));
        q.set_timing(short);
        assert!(
            !q.may_fence(lc_long - 1, "y"),
            "and a shorter one does not undo it"
        );
    }

    #[test]
    fn fence_marks_are_forgotten_only_for_retired_members_after_replay() {
        use crate::command::Command;
        let t = LeaseTiming::default();
        let marks = BTreeMap::from([("late".to_string(), 3), ("gone".to_string(), 2)]);
        // Restarted on a snapshot (applied 10) without "late", which the log
        // adds again later (committed up to 20); "gone" was removed for good.
        let mut snapshot = crate::ownership::tests::cluster(&["late", "gone"]);
        for m in ["late", "gone"] {
            snapshot
                .apply(Command::RemoveMember { name: m.into() })
                .unwrap();
        }
        let mut p = Promises::new(t, 0, marks);
        p.forget_retired(&snapshot, 10, 20);
        assert_eq!(p.fenced().len(), 2, "nothing forgotten before replay");
        // The commit index moves on meanwhile; replay is done at the first one.
        let mut replayed = snapshot.clone();
        replayed
            .apply(Command::AddMember {
                name: "late".into(),
                weight: 1,
            })
            .unwrap();
        p.forget_retired(&replayed, 19, 25);
        assert_eq!(p.fenced().len(), 2);
        p.forget_retired(&replayed, 20, 25);
        assert_eq!(p.fenced().get("late"), Some(&3), "a member's mark is kept");
        assert_eq!(p.fenced().get("gone"), None, "a retired member's is not");
        // A member this state never heard of (added later still) keeps it too.
        let mut q = Promises::new(t, 0, BTreeMap::from([("new".to_string(), 1)]));
        q.forget_retired(&snapshot, 20, 20);
        assert_eq!(q.fenced().get("new"), Some(&1));
    }
}

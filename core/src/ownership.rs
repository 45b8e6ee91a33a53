//! The leader's ownership planner: from the replicated state, this controller's
//! lease promises and the clock, decide what to do next. It only *decides*
//! ([`Action`]s); the runtime (controller or simulator) sends the fence requests
//! and proposes the commands.
//!
//! The path from "heartbeat missed" to "bucket served elsewhere":
//! 1. the member's last ack on this leader is older than `L_c` -> [`Action::Fence`];
//! 2. a majority of controllers agree (each checks its own promise) -> the runtime
//!    proposes `FenceMember` (member down, epoch bumped, buckets freed);
//! 3. the next plan gives the free buckets to live members -> `SetOwners`.
//!
//! Planned moves (drain, join, weights) never free a bucket a live owner may still
//! accept: `Release` asks the owner to withdraw it, the owner confirms
//! ([`Planner::released`]), then `Transfer` hands it over.

use std::collections::{BTreeMap, BTreeSet};

use crate::command::{Command, OwnerChange};
use crate::lease::Promises;
use crate::policy::{self, Member as PolicyMember};
use crate::state::ClusterState;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Ask every controller to fence `member` at `epoch`; on a majority of
    /// agreements propose `Command::FenceMember`.
    Fence {
        member: String,
        epoch: u64,
        /// The `FenceMember` stamp (cluster time).
        at_ms: u64,
    },
    Propose(Command),
}

#[derive(Debug, Clone)]
pub struct PlannerConfig {
    /// Don't repeat the same proposal or fence round within this long.
    pub retry_ms: u64,
    /// Planned moves in flight at once (rate limit for rebalancing).
    pub max_releases_in_flight: usize,
    /// A live owner that hasn't confirmed a release by then is evicted.
    pub release_timeout_ms: u64,
    /// When more than half of the members go silent at once, fence at most one
    /// member per this interval: suspect the network or the controllers first.
    pub mass_failure_interval_ms: u64,
    /// A member whose agent reports that its data plane cannot serve gets no
    /// bucket at once, and its buckets move away once it has reported so for
    /// this long (a failed apply that the next one repairs moves nothing).
    pub unhealthy_grace_ms: u64,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        PlannerConfig {
            retry_ms: 300,
            max_releases_in_flight: 64,
            release_timeout_ms: 5_000,
            mass_failure_interval_ms: 5_000,
            unhealthy_grace_ms: 2_000,
        }
    }
}

/// Deliberate bugs, for showing that the simulator catches them: settable only
/// with core's `faults` feature, which only the simulator enables.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlannerFaults {
    /// Fence on the leader's own view after one lease, without the majority
    /// agreement and without waiting out the controllers' promises.
    pub skip_fence_wait: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Planner {
    cfg: PlannerConfig,
    faults: PlannerFaults,
    recent: BTreeMap<String, u64>,
    released: BTreeMap<u32, (String, u64)>,
    release_seen: BTreeMap<u32, u64>,
    last_mass_fence: Option<u64>,
    /// Members in the state at the previous plan.
    seen: BTreeSet<String>,
    planned: bool,
    /// Members added to the state since this planner's first plan, and when, until
    /// their agent's first acknowledged heartbeat: neither fenced (they hold nothing,
    /// and a fence would cost them a flap penalty) nor given buckets (their agent may
    /// not run yet: the buckets would be black-holed).
    joined: BTreeMap<String, u64>,
    /// Members stopped on purpose that this leader fenced, and when.
    stop_fenced: BTreeMap<String, u64>,
}

impl Planner {
    pub fn new(cfg: PlannerConfig) -> Self {
        Planner {
            cfg,
            ..Default::default()
        }
    }

    #[cfg(feature = "faults")]
    pub fn set_faults(&mut self, faults: PlannerFaults) {
        self.faults = faults;
    }

    /// The `skip_fence_wait` bug; always off without the `faults` feature.
    fn skip_fence_wait(&self) -> bool {
        cfg!(feature = "faults") && self.faults.skip_fence_wait
    }

    /// Forget everything local (on losing leadership).
    pub fn reset(&mut self) {
        *self = Planner {
            cfg: self.cfg.clone(),
            faults: self.faults,
            ..Default::default()
        };
    }

    /// Added while this planner leads and not yet heard from: its agent may
    /// never have run, so it is neither fenced nor given buckets.
    pub fn awaits_first_heartbeat(&self, member: &str) -> bool {
        self.joined.contains_key(member)
    }

    /// `member` confirmed that `bucket` (at `epoch`) is out of its kernel.
    pub fn released(&mut self, member: &str, bucket: u32, epoch: u64) {
        self.released.insert(bucket, (member.to_string(), epoch));
    }

    /// A fence round of `member` at `epoch` gave up; the refusals said enough
    /// voters could agree in `retry_in_ms` ([`crate::fence::FenceCommand::GiveUp`]):
    /// the fence is due again then instead of a whole `retry_ms` later (their
    /// promises often end a few milliseconds after this leader's, whose acks
    /// went out a little earlier).
    pub fn fence_not_agreed(&mut self, member: &str, epoch: u64, now: u64, retry_in_ms: u64) {
        let key = fence_key(member, epoch);
        // `due` waits `retry_ms` from the recorded time.
        let at = (now + retry_in_ms.max(1)).saturating_sub(self.cfg.retry_ms);
        if let Some(t) = self.recent.get_mut(&key) {
            *t = (*t).min(at);
        }
    }

    /// When the next fence may become due (this controller's clock): the
    /// earliest end of a promise to a member still up, or of a fence retry
    /// wait, later than `now`. The runtime plans again then rather than on its
    /// next tick, so failover does not wait up to a tick period more.
    pub fn next_wake(&self, now: u64, state: &ClusterState, promises: &Promises) -> Option<u64> {
        let timing = state.settings.as_ref()?.lease;
        let wait = if self.skip_fence_wait() {
            timing.lease_ms
        } else {
            timing.controller_promise_ms()
        };
        state
            .members
            .iter()
            .filter(|(n, m)| !m.down && !self.joined.contains_key(*n))
            .map(|(n, m)| {
                let expiry = promises.last_ack(n) + wait;
                let retry = self
                    .recent
                    .get(&fence_key(n, m.epoch))
                    .map_or(0, |t| t + self.cfg.retry_ms);
                expiry.max(retry)
            })
            .filter(|&t| t > now)
            .min()
    }

    /// Whether the same step was taken less than `retry_ms` ago; records it if not.
    fn due(&mut self, key: String, now: u64) -> bool {
        match self.recent.get(&key) {
            Some(&t) if now < t + self.cfg.retry_ms => false,
            _ => {
                self.recent.insert(key, now);
                true
            }
        }
    }

    /// Which members may take buckets now: assignable in the replicated state,
    /// heard from (by this leader) within one lease, not reporting that their
    /// data plane cannot serve, nor having stopped reporting it less than the
    /// grace ago (a host whose health flaps does not pull buckets back and
    /// forth).
    pub fn eligible(
        &self,
        state: &ClusterState,
        promises: &Promises,
        now: u64,
    ) -> Vec<PolicyMember> {
        let lease = promises.timing().lease_ms;
        let grace = self.cfg.unhealthy_grace_ms;
        state
            .members
            .iter()
            .map(|(name, m)| {
                let live = now < promises.last_ack(name) + lease;
                let serves = promises.health(now, name).0.is_empty()
                    && promises.recovered_for(now, name).is_none_or(|t| t >= grace);
                let ok = m.assignable() && !m.evicted && live && serves;
                PolicyMember::new(name.clone(), m.weight, ok)
            })
            .collect()
    }

    /// `now` is this controller's monotonic clock (same as `promises`);
    /// `cluster_ms` ([`crate::damping::ClusterClock`]) stamps and decays
    /// damping penalties.
    pub fn plan(
        &mut self,
        now: u64,
        cluster_ms: u64,
        state: &ClusterState,
        promises: &Promises,
    ) -> Vec<Action> {
        let Some(settings) = &state.settings else {
            return Vec::new();
        };
        let timing = settings.lease;
        let damping = settings.damping;
        self.recent.retain(|_, t| now < *t + 10 * self.cfg.retry_ms);
        let mut actions = Vec::new();

        // 1. Fence members whose promise ran out on this leader.
        let wait = if self.skip_fence_wait() {
            timing.lease_ms
        } else {
            timing.controller_promise_ms()
        };
        let first = !self.planned;
        self.planned = true;
        for name in state.members.keys() {
            if !self.seen.contains(name) {
                self.seen.insert(name.clone());
                if !first {
                    self.joined.insert(name.clone(), now);
                }
            }
        }
        self.seen.retain(|n| state.members.contains_key(n));
        self.joined
            .retain(|n, _| state.members.contains_key(n) && promises.steady_for(now, n).is_none());
        let up: Vec<&String> = state
            .members
            .iter()
            .filter(|(_, m)| !m.down)
            .map(|(n, _)| n)
            .collect();
        let silent: Vec<&String> = up
            .iter()
            .copied()
            .filter(|n| now >= promises.last_ack(n) + wait && !self.joined.contains_key(*n))
            .collect();
        let mass = up.len() > 1 && silent.len() * 2 > up.len();
        let mut budget = if mass {
            match self.last_mass_fence {
                Some(t) if now < t + self.cfg.mass_failure_interval_ms => 0,
                _ => 1,
            }
        } else {
            usize::MAX
        };
        for name in silent {
            if budget == 0 {
                break;
            }
            let epoch = state.members[name].epoch;
            if !self.due(fence_key(name, epoch), now) {
                continue;
            }
            budget -= 1;
            if mass {
                self.last_mass_fence = Some(now);
            }
            actions.push(if self.skip_fence_wait() {
                Action::Propose(Command::FenceMember {
                    name: name.clone(),
                    epoch,
                    at_ms: cluster_ms,
                    marked_by: vec![],
                })
            } else {
                Action::Fence {
                    member: name.clone(),
                    epoch,
                    at_ms: cluster_ms,
                }
            });
        }

        // 1b. A member stopped on purpose (SIGTERM) whose buckets have all moved
        // away is fenced at once: it holds nothing, so nothing waits on its lease,
        // and the fence is what lets its restarted agent come back (step 2).
        for (name, m) in state.members.iter().filter(|(_, m)| m.stopped && !m.down) {
            if state.owned_by(name).next().is_none()
                && self.due(format!("stopped:{name}:{}", m.epoch), now)
            {
                self.stop_fenced.insert(name.clone(), now);
                actions.push(Action::Propose(Command::FenceMember {
                    name: name.clone(),
                    epoch: m.epoch,
                    at_ms: cluster_ms,
                    marked_by: vec![],
                }));
            }
        }

        // 2. Re-admit fenced members that heartbeat steadily and are not damped.
        // Steadiness is each controller's own record, so a leader change does not
        // restart the clock. Back from a planned stop, no damping wait: acked two
        // leases after this leader fenced it means acked after the fence, so by a
        // restarted agent (the stopping one exits as soon as it is drained).
        self.stop_fenced
            .retain(|n, _| state.members.get(n).is_some_and(|m| m.stopped));
        for (name, m) in state.members.iter().filter(|(_, m)| m.down) {
            let Some(steady) = promises.steady_for(now, name) else {
                continue;
            };
            let damped = m.suppressed && damping.current(m.penalty, cluster_ms) > damping.reuse;
            let back = m.stopped
                && self
                    .stop_fenced
                    .get(name)
                    .is_some_and(|&t| now >= t + 2 * timing.lease_ms);
            if (back || steady >= damping.min_stable_ms)
                && !damped
                && self.due(format!("readmit:{name}:{}", m.epoch), now)
            {
                actions.push(Action::Propose(Command::Readmit {
                    name: name.clone(),
                    epoch: m.epoch,
                }));
            }
        }

        // 3.-5. Move buckets towards the policy's target.
        let mut members = self.eligible(state, promises, now);
        for m in &mut members {
            if self.joined.contains_key(&m.name) {
                m.eligible = false;
            }
        }
        let Ok(target) = policy::assign(&state.buckets, &members) else {
            return actions;
        };
        let live: BTreeMap<&str, bool> = members
            .iter()
            .map(|m| {
                (
                    m.name.as_str(),
                    now < promises.last_ack(&m.name) + timing.lease_ms,
                )
            })
            .collect();

        // 3. Hand over confirmed releases.
        // (from, to) -> [(bucket, epoch)]
        type Handovers = BTreeMap<(String, Option<String>), Vec<(u32, u64)>>;
        let mut transfers = Handovers::new();
        let released = std::mem::take(&mut self.released);
        for (bucket, (from, epoch)) in released {
            let Some(b) = state.buckets.get(bucket as usize) else {
                continue;
            };
            if b.owner.as_deref() != Some(from.as_str()) || !b.releasing || b.epoch != epoch {
                continue;
            }
            let to = target.owners[bucket as usize].clone();
            transfers
                .entry((from, to))
                .or_default()
                .push((bucket, epoch));
        }
        for ((from, to), buckets) in transfers {
            // Per grant: a bucket released again at its next epoch (a host
            // drained, back and drained again) is not held up by this one.
            let (b0, e0) = buckets[0];
            let key = format!("transfer:{from}:{b0}@{e0}");
            if self.due(key, now) {
                actions.push(Action::Propose(Command::Transfer { from, to, buckets }));
            } else {
                for (b, e) in buckets {
                    self.released.insert(b, (from.clone(), e));
                }
            }
        }

        // 4. Give out free buckets at once: failover must be quick.
        let mut changes = Vec::new();
        for (i, (b, t)) in state.buckets.iter().zip(&target.owners).enumerate() {
            if b.owner.is_none() && t.is_some() && self.due(format!("assign:{i}@{}", b.epoch), now)
            {
                changes.push(OwnerChange {
                    bucket: i as u32,
                    owner: t.clone(),
                });
            }
        }
        if !changes.is_empty() {
            actions.push(Action::Propose(Command::SetOwners { changes }));
        }

        // 5. Planned moves away from live owners, a bounded number at a time.
        let in_flight = state.buckets.iter().filter(|b| b.releasing).count();
        let mut room = self.cfg.max_releases_in_flight.saturating_sub(in_flight);
        let mut releases: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for (i, (b, t)) in state.buckets.iter().zip(&target.owners).enumerate() {
            let Some(owner) = &b.owner else { continue };
            if room == 0 {
                break;
            }
            let owner_live = live.get(owner.as_str()).copied().unwrap_or(false);
            if b.releasing || t.as_ref() == Some(owner) || !owner_live {
                continue;
            }
            let (problems, unhealthy_for) = promises.health(now, owner);
            if !problems.is_empty() && unhealthy_for < self.cfg.unhealthy_grace_ms {
                continue;
            }
            if self.due(format!("release:{i}:{}", b.epoch), now) {
                releases.entry(owner.clone()).or_default().push(i as u32);
                room -= 1;
            }
        }
        for (name, buckets) in releases {
            actions.push(Action::Propose(Command::Release { name, buckets }));
        }

        // 6. Evict a live owner that never confirms its releases; sooner one
        // whose data plane reports problems (it likely cannot withdraw).
        self.release_seen
            .retain(|i, _| state.buckets.get(*i as usize).is_some_and(|b| b.releasing));
        for (i, b) in state.buckets.iter().enumerate() {
            if !b.releasing {
                continue;
            }
            let seen = *self.release_seen.entry(i as u32).or_insert(now);
            let Some(owner) = &b.owner else { continue };
            let Some(m) = state.members.get(owner) else {
                continue;
            };
            let timeout = if promises.health(now, owner).0.is_empty() {
                self.cfg.release_timeout_ms
            } else {
                self.cfg
                    .release_timeout_ms
                    .min(self.cfg.unhealthy_grace_ms / 2)
            };
            if now >= seen + timeout
                && !m.evicted
                && self.due(format!("evict:{owner}:{}", m.epoch), now)
            {
                actions.push(Action::Propose(Command::Evict {
                    name: owner.clone(),
                    epoch: m.epoch,
                }));
            }
        }
        actions
    }
}

fn fence_key(member: &str, epoch: u64) -> String {
    format!("fence:{member}:{epoch}")
}

/// The leader's plan once a fence round agreed, on the state as it will be
/// after `fence` (`Command::FenceMember`) applies: the runtime proposes
/// `fence` and then these actions back to back, so the freed buckets' new
/// owners commit in the same log batch as the fence instead of one planner
/// tick and one more commit later. Still safe: log order applies the grants
/// after the fence, and the state machine refuses a grant of a bucket that is
/// still owned (if the fence is refused, so are they).
pub fn after_fence(
    promises: &Promises,
    planner: &mut Planner,
    now: u64,
    state: &ClusterState,
    fence: &Command,
) -> Vec<Action> {
    let mut next = state.clone();
    if next.apply(fence.clone()).is_err() {
        return Vec::new();
    }
    planner.plan(now, promises.cluster_ms(now), &next, promises)
}

/// What a controller's ownership loop reads at each tick.
#[derive(Debug, Clone, Copy)]
pub struct Tick<'a> {
    /// This controller's monotonic clock (the one its promises use).
    pub now: u64,
    /// The applied state, its index, and the commit index now.
    pub state: &'a ClusterState,
    pub applied: u64,
    pub commit: u64,
    /// Whether this controller is the raft leader.
    pub leader: bool,
}

/// One tick of the ownership loop (every H/2 on every controller), the same for
/// the controller and the simulator: the promises take the applied lease timing,
/// start a promise for members not seen before, forget retired ones and advance
/// the cluster time; then the leader plans. `planner` is `None` while not leading: it is made with
/// `new_planner` on becoming leader and dropped on losing leadership (its memory
/// is of one term of leadership only).
pub fn tick(
    promises: &mut Promises,
    planner: &mut Option<Planner>,
    new_planner: impl FnOnce() -> Planner,
    t: Tick<'_>,
) -> Vec<Action> {
    let timing = t
        .state
        .settings
        .as_ref()
        .map(|s| s.lease)
        .unwrap_or_default();
    if promises.timing() != timing {
        promises.set_timing(timing);
    }
    promises.observe(t.now, t.state.members.keys().map(String::as_str));
    promises.forget_retired(t.state, t.applied, t.commit);
    promises.observe_stamps(t.now, t.state);
    if !t.leader {
        *planner = None;
        return Vec::new();
    }
    let cluster_ms = promises.cluster_ms(t.now);
    planner
        .get_or_insert_with(new_planner)
        .plan(t.now, cluster_ms, t.state, promises)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::bucket::{Affinity, BucketFn};
    use crate::lease::LeaseTiming;
    use crate::state::Settings;

    /// An initialised 16-bucket cluster with these members (weight 1), for
    /// the tests of this crate.
    pub(crate) fn cluster(members: &[&str]) -> ClusterState {
        let mut s = ClusterState::default();
        s.apply(Command::InitCluster {
            settings: Settings {
                vips: vec![],
                bucket_count: 16,
                bucket_fn: BucketFn::Jhash,
                affinity: Affinity::Address,
                seed: 1,
                lease: LeaseTiming::default(),
                damping: Default::default(),
            },
        })
        .unwrap();
        for m in members {
            s.apply(Command::AddMember {
                name: m.to_string(),
                weight: 1,
            })
            .unwrap();
        }
        s
    }

    /// Run the planner and apply what it proposes (fence rounds always agreed).
    fn step(p: &mut Planner, s: &mut ClusterState, pr: &Promises, now: u64) -> Vec<Action> {
        let actions = p.plan(now, now, s, pr);
        for a in &actions {
            let cmd = match a.clone() {
                Action::Fence {
                    member,
                    epoch,
                    at_ms,
                } => Command::FenceMember {
                    name: member,
                    epoch,
                    at_ms,
                    marked_by: vec![],
                },
                Action::Propose(c) => c,
            };
            let _ = s.apply(cmd);
        }
        actions
    }

    fn heartbeat_all(pr: &mut Promises, s: &ClusterState, now: u64, skip: &[&str]) {
        for (n, m) in &s.members {
            if !skip.contains(&n.as_str()) {
                let _ = pr.heartbeat(now, n, m.epoch, Some(m.epoch));
            }
        }
    }

    #[test]
    fn assigns_everything_then_stays_quiet() {
        let mut s = cluster(&["a", "b", "c"]);
        let mut pr = Promises::new(LeaseTiming::default(), 0, BTreeMap::new());
        let mut p = Planner::new(PlannerConfig::default());
        heartbeat_all(&mut pr, &s, 0, &[]);
        step(&mut p, &mut s, &pr, 0);
        assert_eq!(s.unowned(), 0);
        for t in (100..5000).step_by(100) {
            heartbeat_all(&mut pr, &s, t, &[]);
            assert!(step(&mut p, &mut s, &pr, t).is_empty(), "quiet at {t}");
        }
    }

    #[test]
    fn silent_member_is_fenced_only_after_the_promise_then_its_buckets_move() {
        let mut s = cluster(&["a", "b", "c"]);
        let t = LeaseTiming::default();
        let mut pr = Promises::new(t, 0, BTreeMap::new());
        let mut p = Planner::new(PlannerConfig::default());
        heartbeat_all(&mut pr, &s, 0, &[]);
        step(&mut p, &mut s, &pr, 0);
        let had: Vec<u32> = s.owned_by("c").collect();
        let mut fenced_at = None;
        for now in (100..3000).step_by(50) {
            heartbeat_all(&mut pr, &s, now, &["c"]);
            let acts = step(&mut p, &mut s, &pr, now);
            if acts
                .iter()
                .any(|a| matches!(a, Action::Fence { member, .. } if member == "c"))
            {
                fenced_at.get_or_insert(now);
            }
        }
        let at = fenced_at.expect("c fenced");
        assert!(
            at >= t.controller_promise_ms(),
            "fenced at {at}, before L_c"
        );
        assert!(s.members["c"].down);
        assert_eq!(s.unowned(), 0);
        for b in had {
            assert_ne!(s.buckets[b as usize].owner.as_deref(), Some("c"));
        }
    }

    #[test]
    fn the_plan_after_an_agreed_fence_grants_the_freed_buckets_in_the_same_batch() {
        let mut s = cluster(&["a", "b", "c"]);
        let t = LeaseTiming::default();
        let mut pr = Promises::new(t, 0, BTreeMap::new());
        let mut p = Planner::new(PlannerConfig::default());
        heartbeat_all(&mut pr, &s, 0, &[]);
        step(&mut p, &mut s, &pr, 0);
        let had: Vec<u32> = s.owned_by("c").collect();
        let lc = t.controller_promise_ms();
        // The wake-up is c's promise end, not the next tick.
        heartbeat_all(&mut pr, &s, 40, &["c"]);
        assert_eq!(p.next_wake(40, &s, &pr), Some(lc));
        heartbeat_all(&mut pr, &s, lc, &["c"]);
        let acts = p.plan(lc, lc, &s, &pr);
        let Some(Action::Fence { epoch, at_ms, .. }) = acts.first().cloned() else {
            panic!("no fence at the promise's end: {acts:?}");
        };
        let fence = Command::FenceMember {
            name: "c".into(),
            epoch,
            at_ms,
            marked_by: vec![],
        };
        let next = after_fence(&pr, &mut p, lc, &s, &fence);
        let Some(Action::Propose(Command::SetOwners { changes })) = next.first() else {
            panic!("no grants after the fence: {next:?}");
        };
        let granted: Vec<u32> = changes.iter().map(|c| c.bucket).collect();
        assert_eq!(granted, had);
        // Refused before the fence applies; applied in log order after it.
        let grants = Command::SetOwners {
            changes: changes.clone(),
        };
        assert!(s.clone().apply(grants.clone()).is_err());
        s.apply(fence).unwrap();
        s.apply(grants).unwrap();
        assert_eq!(s.unowned(), 0);
        assert_eq!(s.owned_by("c").count(), 0);
    }

    /// Apply what the planner proposes, confirm every release at once (the
    /// owner's agent), and plan again: one planned move, start to end.
    fn move_now(p: &mut Planner, s: &mut ClusterState, pr: &mut Promises, now: u64) -> usize {
        heartbeat_all(pr, s, now, &[]);
        step(p, s, pr, now);
        let releasing: Vec<(String, u32, u64)> = s
            .buckets
            .iter()
            .enumerate()
            .filter(|(_, b)| b.releasing)
            .filter_map(|(i, b)| Some((b.owner.clone()?, i as u32, b.epoch)))
            .collect();
        for (m, b, e) in &releasing {
            p.released(m, *b, *e);
        }
        let acts = step(p, s, pr, now);
        let transfers = acts
            .iter()
            .filter(|a| matches!(a, Action::Propose(Command::Transfer { .. })))
            .count();
        assert!(
            s.buckets.iter().all(|b| !b.releasing),
            "at {now}: releases not handed over: {acts:?}"
        );
        transfers
    }

    #[test]
    fn a_bucket_released_again_soon_is_handed_over_at_once() {
        let mut s = cluster(&["a", "b", "c"]);
        let mut pr = Promises::new(LeaseTiming::default(), 0, BTreeMap::new());
        let mut p = Planner::new(PlannerConfig::default());
        heartbeat_all(&mut pr, &s, 0, &[]);
        step(&mut p, &mut s, &pr, 0);
        // Drain and back, twice, 10 ms apart: each hand-over goes out as
        // soon as its release is confirmed (the retry throttle is per grant).
        for (i, cmd) in [
            Command::Drain { name: "c".into() },
            Command::Undrain { name: "c".into() },
            Command::Drain { name: "c".into() },
            Command::Undrain { name: "c".into() },
            Command::Drain { name: "c".into() },
        ]
        .into_iter()
        .enumerate()
        {
            s.apply(cmd).unwrap();
            assert!(move_now(&mut p, &mut s, &mut pr, 1000 + 10 * i as u64) > 0);
        }
        assert_eq!(s.owned_by("c").count(), 0);
        assert_eq!(s.unowned(), 0);
    }

    #[test]
    fn a_fence_refused_for_a_few_milliseconds_is_retried_then() {
        let mut s = cluster(&["a", "b"]);
        let t = LeaseTiming::default();
        let lc = t.controller_promise_ms();
        let mut pr = Promises::new(t, 0, BTreeMap::new());
        let mut p = Planner::new(PlannerConfig::default());
        heartbeat_all(&mut pr, &s, 0, &[]);
        step(&mut p, &mut s, &pr, 0);
        heartbeat_all(&mut pr, &s, 10, &["b"]);
        let fences = |acts: Vec<Action>| {
            acts.iter()
                .filter(|a| matches!(a, Action::Fence { .. }))
                .count()
        };
        assert_eq!(fences(p.plan(lc, lc, &s, &pr)), 1);
        let epoch = s.members["b"].epoch;
        p.fence_not_agreed("b", epoch, lc + 2, 5);
        assert_eq!(p.next_wake(lc + 2, &s, &pr), Some(lc + 7));
        assert_eq!(fences(p.plan(lc + 6, lc + 6, &s, &pr)), 0);
        assert_eq!(fences(p.plan(lc + 7, lc + 7, &s, &pr)), 1);
    }

    #[test]
    fn drain_releases_first_and_transfers_on_confirmation() {
        let mut s = cluster(&["a", "b"]);
        let mut pr = Promises::new(LeaseTiming::default(), 0, BTreeMap::new());
        let mut p = Planner::new(PlannerConfig::default());
        heartbeat_all(&mut pr, &s, 0, &[]);
        step(&mut p, &mut s, &pr, 0);
        s.apply(Command::Drain { name: "a".into() }).unwrap();
        step(&mut p, &mut s, &pr, 100);
        let releasing: Vec<u32> = (0..16)
            .filter(|&i| s.buckets[i as usize].releasing)
            .collect();
        assert_eq!(releasing.len(), 8, "all of a's buckets asked back");
        assert!(releasing
            .iter()
            .all(|&i| s.buckets[i as usize].owner.as_deref() == Some("a")));
        for &i in &releasing {
            p.released("a", i, s.buckets[i as usize].epoch);
        }
        heartbeat_all(&mut pr, &s, 200, &[]);
        step(&mut p, &mut s, &pr, 200);
        assert_eq!(s.owned_by("b").count(), 16);
        assert!(s.buckets.iter().all(|b| !b.releasing));
    }

    #[test]
    fn a_member_that_cannot_serve_gets_nothing_and_loses_its_buckets_after_a_grace() {
        let mut s = cluster(&["a", "b"]);
        let mut pr = Promises::new(LeaseTiming::default(), 0, BTreeMap::new());
        let mut p = Planner::new(PlannerConfig::default());
        let broken = vec!["interface nosuch0 missing".to_string()];
        heartbeat_all(&mut pr, &s, 0, &[]);
        pr.report_health(0, "b", &broken);
        step(&mut p, &mut s, &pr, 0);
        assert_eq!(s.owned_by("a").count(), 16, "nothing granted to b");
        // b is repaired: it takes half once it has served for the grace.
        let grace = PlannerConfig::default().unhealthy_grace_ms;
        let releasing = |s: &ClusterState| s.buckets.iter().filter(|b| b.releasing).count();
        pr.report_health(100, "b", &[]);
        heartbeat_all(&mut pr, &s, 100, &[]);
        step(&mut p, &mut s, &pr, 100);
        assert_eq!(
            releasing(&s),
            0,
            "b is given nothing right after its repair"
        );
        let now = 100 + grace;
        heartbeat_all(&mut pr, &s, now, &[]);
        step(&mut p, &mut s, &pr, now);
        assert_eq!(releasing(&s), 8, "a hands half to b");
        for i in 0..16u32 {
            if s.buckets[i as usize].releasing {
                p.released("a", i, s.buckets[i as usize].epoch);
            }
        }
        let t = now + 100;
        heartbeat_all(&mut pr, &s, t, &[]);
        step(&mut p, &mut s, &pr, t);
        assert_eq!(s.owned_by("b").count(), 8);
        let t = t + 100;
        pr.report_health(t, "b", &broken);
        for now in (t..t + grace).step_by(100) {
            heartbeat_all(&mut pr, &s, now, &[]);
            pr.report_health(now, "b", &broken);
            step(&mut p, &mut s, &pr, now);
            assert_eq!(releasing(&s), 0, "released at {now}, within the grace");
        }
        heartbeat_all(&mut pr, &s, t + grace, &[]);
        step(&mut p, &mut s, &pr, t + grace);
        assert_eq!(releasing(&s), 8, "after the grace b's buckets move away");
        assert_eq!(pr.health(t + grace, "b"), (&broken[..], grace));
    }

    #[test]
    fn a_member_added_later_is_not_fenced_before_it_could_heartbeat() {
        let mut s = cluster(&["a"]);
        let t = LeaseTiming::default();
        let lc = t.controller_promise_ms();
        let mut pr = Promises::new(t, 0, BTreeMap::new());
        let mut p = Planner::new(PlannerConfig::default());
        heartbeat_all(&mut pr, &s, 5000, &[]);
        step(&mut p, &mut s, &pr, 5000);
        s.apply(Command::AddMember {
            name: "b".into(),
            weight: 1,
        })
        .unwrap();
        // b's last ack is the controller's start (0), long past; its agent has
        // not had a chance to heartbeat yet.
        let fenced = |acts: &[Action]| {
            acts.iter()
                .any(|a| matches!(a, Action::Fence { member, .. } if member == "b"))
        };
        for now in (5050..5000 + lc).step_by(50) {
            heartbeat_all(&mut pr, &s, now, &["b"]);
            assert!(
                !fenced(&step(&mut p, &mut s, &pr, now)),
                "b fenced at {now}"
            );
        }
        // Still silent long after it joined (its agent not started yet): never
        // fenced, so no flap penalty, and given nothing to black-hole.
        for now in (5000 + lc..5000 + 5 * lc).step_by(50) {
            heartbeat_all(&mut pr, &s, now, &["b"]);
            assert!(
                !fenced(&step(&mut p, &mut s, &pr, now)),
                "b fenced at {now}"
            );
            assert_eq!(s.owned_by("b").count(), 0, "b granted buckets at {now}");
        }
        assert_eq!(s.members["b"].penalty, Default::default());
        // Its agent starts: after the first acknowledged heartbeat it gets its share.
        let mut now = 5000 + 5 * lc;
        for _ in 0..40 {
            now += 50;
            heartbeat_all(&mut pr, &s, now, &[]);
            for a in step(&mut p, &mut s, &pr, now) {
                if let Action::Propose(Command::Release { buckets, .. }) = a {
                    for b in buckets {
                        p.released("a", b, s.buckets[b as usize].epoch);
                    }
                }
            }
        }
        assert!(s.owned_by("b").count() > 0, "b never got buckets");
        // From then on silence is fenced as for everyone.
        let fenced_later = (now..now + 3 * lc).step_by(50).any(|t| {
            heartbeat_all(&mut pr, &s, t, &["b"]);
            fenced(&step(&mut p, &mut s, &pr, t))
        });
        assert!(fenced_later);
    }

    #[test]
    fn a_planned_stop_returns_home_without_penalty() {
        let mut s = cluster(&["a", "b"]);
        let t = LeaseTiming::default();
        let mut pr = Promises::new(t, 0, BTreeMap::new());
        let mut p = Planner::new(PlannerConfig::default());
        heartbeat_all(&mut pr, &s, 0, &[]);
        step(&mut p, &mut s, &pr, 0);
        let home: Vec<u32> = s.owned_by("b").collect();
        assert!(!home.is_empty());
        // SIGTERM: b's agent asks to be drained, confirms its releases, then exits.
        s.apply(Command::StopSelf { name: "b".into() }).unwrap();
        let mut now = 0;
        while s.owned_by("b").next().is_some() {
            now += 50;
            assert!(now < 10_000, "b never drained");
            heartbeat_all(&mut pr, &s, now, &[]);
            for a in step(&mut p, &mut s, &pr, now) {
                if let Action::Propose(Command::Release { buckets, .. }) = a {
                    for b in buckets {
                        p.released("b", b, s.buckets[b as usize].epoch);
                    }
                }
            }
        }
        // Drained, it is fenced at once (it holds nothing), without a penalty.
        for _ in 0..10 {
            now += 50;
            heartbeat_all(&mut pr, &s, now, &["b"]);
            step(&mut p, &mut s, &pr, now);
        }
        assert!(
            s.members["b"].down && s.members["b"].stopped,
            "{:?}",
            s.members["b"]
        );
        assert_eq!(s.members["b"].penalty, Default::default());
        // The restarted agent heartbeats: one lease later b is back, undrained, and
        // its home buckets return.
        for _ in 0..100 {
            now += 50;
            heartbeat_all(&mut pr, &s, now, &[]);
            for a in step(&mut p, &mut s, &pr, now) {
                if let Action::Propose(Command::Release { name, buckets }) = a {
                    for b in buckets {
                        p.released(&name, b, s.buckets[b as usize].epoch);
                    }
                }
            }
        }
        let m = &s.members["b"];
        assert!(!m.down && !m.stopped && m.state == crate::state::MemberState::Active);
        let back: Vec<u32> = s.owned_by("b").collect();
        assert_eq!(back, home, "not home");
        assert_eq!(m.penalty, Default::default());
    }

    #[test]
    fn mass_silence_fences_slowly() {
        let mut s = cluster(&["a", "b", "c", "d"]);
        let mut pr = Promises::new(LeaseTiming::default(), 0, BTreeMap::new());
        let mut p = Planner::new(PlannerConfig::default());
        heartbeat_all(&mut pr, &s, 0, &[]);
        step(&mut p, &mut s, &pr, 0);
        let mut fences = 0;
        for now in (100..4000).step_by(50) {
            heartbeat_all(&mut pr, &s, now, &["a", "b", "c"]);
            fences += step(&mut p, &mut s, &pr, now)
                .iter()
                .filter(|a| matches!(a, Action::Fence { .. }))
                .count();
        }
        assert_eq!(
            fences, 1,
            "one fence per interval when most members go silent"
        );
    }

    #[test]
    fn a_tick_keeps_the_promises_on_every_controller_and_plans_on_the_leader() {
        let mut s = cluster(&["a"]);
        let t = LeaseTiming::default();
        let lc = t.controller_promise_ms();
        let mut pr = Promises::new(LeaseTiming::default(), 0, BTreeMap::new());
        let mut planner = None;
        fn tick_at(now: u64, s: &ClusterState, leader: bool) -> Tick<'_> {
            Tick {
                now,
                state: s,
                applied: 1,
                commit: 1,
                leader,
            }
        }
        let new = || Planner::new(PlannerConfig::default());
        assert!(tick(&mut pr, &mut planner, new, tick_at(10_000, &s, false)).is_empty());
        assert!(planner.is_none(), "a follower has no planner");
        // A member seen first at 10 s gets a full promise from then.
        assert!(!pr.may_fence(10_000 + lc - 1, "a"));
        s.apply(Command::RemoveMember { name: "a".into() }).unwrap();
        s.apply(Command::AddMember {
            name: "b".into(),
            weight: 1,
        })
        .unwrap();
        let acts = tick(&mut pr, &mut planner, new, tick_at(10_050, &s, true));
        assert!(planner.is_some(), "the leader plans");
        assert!(
            matches!(&acts[..], [Action::Propose(Command::SetOwners { .. })]),
            "b, observed now, counts as live: {acts:?}"
        );
        assert_eq!(pr.last_ack("a"), 0, "a is retired: forgotten");
        tick(&mut pr, &mut planner, new, tick_at(10_100, &s, false));
        assert!(planner.is_none(), "dropped on losing leadership");
    }

    #[test]
    fn damping_decays_on_cluster_time_whatever_the_stamping_leaders_wall_clock() {
        // Three losses stamped by a leader whose wall clock was right, an hour
        // behind, or an hour ahead (stamps of older versions were wall-clock).
        // Before, a leader reading its own wall clock re-admitted at once after
        // a stamp an hour behind, and waited an extra hour after one ahead. Now
        // the new leader decays from the newest stamp on its monotonic clock:
        // 3000 -> 750 is two half-lives, whatever the stamps' base.
        let t = LeaseTiming::default();
        let half_life = crate::damping::Damping::default().half_life_ms;
        for stamp in [
            1_800_000_000_000,
            1_800_000_000_000 - 3_600_000,
            1_800_000_000_000 + 3_600_000,
        ] {
            let mut s = cluster(&["a", "b"]);
            for _ in 0..3 {
                let epoch = s.members["a"].epoch;
                s.apply(Command::FenceMember {
                    name: "a".into(),
                    epoch,
                    at_ms: stamp,
                    marked_by: vec![],
                })
                .unwrap();
            }
            assert!(s.members["a"].suppressed);
            // The new leader's monotonic clock has nothing to do with the stamps.
            let start = 7_000_000;
            let mut pr = Promises::new(t, start, BTreeMap::new());
            let mut planner = None;
            let mut back_after = None;
            for now in (start..start + 3 * half_life).step_by(100) {
                heartbeat_all(&mut pr, &s, now, &[]);
                let tick = Tick {
                    now,
                    state: &s,
                    applied: 1,
                    commit: 1,
                    leader: true,
                };
                let new = || Planner::new(PlannerConfig::default());
                let acts = super::tick(&mut pr, &mut planner, new, tick);
                if acts.iter().any(
                    |a| matches!(a, Action::Propose(Command::Readmit { name, .. }) if name == "a"),
                ) {
                    back_after = Some(now - start);
                    break;
                }
            }
            assert_eq!(back_after, Some(2 * half_life), "stamps at {stamp}");
        }
    }
}

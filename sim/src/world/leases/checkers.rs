//! The lease invariants and the end-of-run liveness checks: exclusivity and
//! epochs after every step; convergence within `converge_bound`; settled only
//! when the leader's own planner would move nothing; then a quiet window.

use super::*;

impl World {
    /// How long after raft is live again (T_live: leader elected, every voter
    /// caught up, a fresh proposal committed) every bucket must be owned by a live
    /// agent whose kernel accepts it:
    ///
    /// - every controller has been up since the heal (T_heal <= T_live), so by
    ///   `T_live + L_c/(1-rho)` every voter's promise to a dead, evicted or fenced
    ///   agent ran out, also on restarted controllers (a restart renews every
    ///   promise);
    /// - the leader fences within `retry_ms` (plan every H/2, a lost fence round
    ///   is retried after `retry_ms`) plus a round trip, and the freed buckets are
    ///   given out at the next plan: `SetOwners`, commit, the new owner's
    ///   assignment stream, its next lease round (H) and kernel install (delta);
    /// - if no live member may take buckets (all fenced), re-admission needs
    ///   `min_stable_ms` of steady heartbeats on the leader's clock first;
    /// - when more than half of the members may be silent at T_live (not fenced
    ///   yet, and their agent is dead or holds no lease, or the leader or some
    ///   voter refuses their epoch for good), the leader fences only one per
    ///   `mass_failure_interval_ms`, and it may have used its budget just before
    ///   T_live: one interval per such member.
    ///
    /// Plus 10 heartbeats for commits, stream and kernel delays.
    pub(super) fn converge_bound(&self) -> (u64, String) {
        let t = self.lease.timing;
        let rho = t.clock_rate_ppm as f64 / 1e6;
        let slow = |ms: u64| (ms as f64 / (1.0 - rho)).ceil() as u64;
        let cfg = PlannerConfig::default();
        let damping = self
            .leader()
            .and_then(|(l, _)| self.nodes.get(&l).and_then(Node::replica))
            .and_then(|r| r.state().settings.as_ref().map(|s| s.damping))
            .unwrap_or_default();
        let mut bound = slow(t.controller_promise_ms())
            + slow(damping.min_stable_ms)
            + cfg.retry_ms
            + 10 * t.heartbeat_ms;
        let mut why = format!("L_c/(1-rho) + min_stable/(1-rho) + retry + 10 H = {bound}ms");
        // Mass silence: members to fence beyond the first, one per interval.
        if let Some((l, s)) = self
            .leader()
            .and_then(|(l, _)| Some((l, self.nodes.get(&l).and_then(Node::replica)?.state())))
        {
            // Epochs some voter refuses for good (fence marks, eviction).
            let refused = |name: &str, m: &Member| {
                m.evicted
                    || self.checker.voters().iter().chain([&l]).any(|v| {
                        self.ctl
                            .get(v)
                            .is_some_and(|c| c.fenced.get(name).is_some_and(|&f| f >= m.epoch))
                    })
            };
            let up: Vec<&String> = s
                .members
                .iter()
                .filter(|(_, m)| !m.down)
                .map(|(n, _)| n)
                .collect();
            let now = self.now;
            let silent = up
                .iter()
                .filter(|n| {
                    refused(n, &s.members[n.as_str()])
                        || self.host_by_name(n).is_none_or(|i| {
                            let h = &self.hosts[i];
                            let local = h.clock.local(now);
                            h.agent.as_ref().is_none_or(|a| !a.lease_valid(local))
                        })
                })
                .count();
            if up.len() > 1 && silent * 2 > up.len() {
                let extra = silent as u64 * slow(cfg.mass_failure_interval_ms);
                bound += extra;
                why += &format!(
                    ", + {extra}ms: {silent} of {} unfenced members may be silent (mass-failure pacing)",
                    up.len()
                );
            }
        }
        (bound, why)
    }

    /// Probe of the convergence and quiet phases (every 50 ms).
    pub(in crate::world) fn end_probe(&mut self, phase: EndPhase) -> Result<(), Failure> {
        let leader = self
            .leader()
            .filter(|(l, _)| self.checker.voters().contains(l) && !self.is_paused(*l));
        match phase {
            EndPhase::Converge => self.converge_probe(leader),
            EndPhase::Quiet { until } => {
                let q = self.lease.quiet.clone();
                if let Some(q) = q {
                    if leader != Some(q.leader) {
                        return Err(Failure {
                            kind: FailureKind::Quiet,
                            time_ms: self.now,
                            message: format!(
                                "seed {}, t={}ms: quiet violated: the leader changed from n{} (term {}) to {leader:?} in a fault-free window",
                                self.cfg.seed, self.now, q.leader.0, q.leader.1
                            ),
                        });
                    }
                }
                if self.now >= until {
                    self.trace(None, || {
                        "QUIET: no bucket moved in the fault-free window".into()
                    });
                    self.phase = Phase::Done;
                    return Ok(());
                }
                self.schedule(self.now + 50, Event::Probe);
                Ok(())
            }
        }
    }

    /// Added under leader `l` and never heard from since (its agent may never
    /// run): the planner neither fences it nor gives it buckets, by design.
    fn awaits_first_heartbeat(&self, l: u64, name: &str) -> bool {
        let owns = self
            .nodes
            .get(&l)
            .and_then(Node::replica)
            .is_some_and(|r| r.state().owned_by(name).next().is_some());
        !owns
            && self
                .ctl
                .get(&l)
                .and_then(|c| c.planner.as_ref())
                .is_some_and(|p| p.awaits_first_heartbeat(name))
    }

    /// A fenced member kept out by damping for longer than `margin`.
    pub(super) fn damped(&self, m: &Member, d: Damping, margin: u64) -> bool {
        m.suppressed
            && d.current(m.penalty, self.now) > d.reuse
            && d.time_to_reuse(m.penalty, self.now) > margin
    }

    fn converge_probe(&mut self, leader: Option<(u64, u64)>) -> Result<(), Failure> {
        self.schedule(self.now + 50, Event::Probe);
        let Some((l, term)) = leader else {
            return self.converge_deadline_check("no leader");
        };
        let Some(r) = self.nodes.get(&l).and_then(Node::replica) else {
            return Ok(());
        };
        let s = r.state().clone();
        let applied = r.applied_index();
        let last = r.last_index();
        let Some(settings) = s.settings.clone() else {
            return self.converge_deadline_check("cluster not initialised");
        };
        let now = self.now;

        // The operator: every agent is a member, nobody stays drained.
        // Its changes are not in this state yet: nothing settles this round.
        let mut operator_acted = false;
        if now >= self.lease.operator_next {
            self.lease.operator_next = now + 500;
            for h in self.hosts.clone() {
                if !s.members.contains_key(&h.name) {
                    operator_acted = true;
                    self.operator_propose(Command::AddMember {
                        name: h.name.clone(),
                        weight: 1,
                    })?;
                }
            }
            for (name, m) in &s.members {
                if m.state == MemberState::Draining {
                    operator_acted = true;
                    self.operator_propose(Command::Undrain { name: name.clone() })?;
                }
            }
        }

        let running: BTreeSet<String> = self
            .hosts
            .iter()
            .filter(|h| h.running(now) && !h.kept_dead)
            .map(|h| h.name.clone())
            .collect();
        let live = |name: &str| running.contains(name);
        let acked_by_leader: BTreeSet<String> = self.ctl.get(&l).map_or_else(BTreeSet::new, |c| {
            let local = c.clock.local(now);
            s.members
                .keys()
                .filter(|n| {
                    c.promises
                        .as_ref()
                        .is_some_and(|p| p.steady_for(local, n).is_some())
                })
                .cloned()
                .collect()
        });
        let leader_acks = |name: &str| acked_by_leader.contains(name);
        // Nothing can converge while every live member is damped for longer.
        let quiet_margin = self.cfg.quiet_ms + 1000;
        let left = self.lease.converge_deadline.saturating_sub(now);
        let hopeful = s
            .members
            .iter()
            .any(|(n, m)| live(n) && !(m.down && self.damped(m, settings.damping, left)));
        if !hopeful {
            self.stats.convergence_skipped = true;
            self.trace(None, || {
                "CONVERGE skipped: every live member is damped past the bound".into()
            });
            self.phase = Phase::Done;
            return Ok(());
        }

        let mut problems = Vec::new();
        for (i, b) in s.buckets.iter().enumerate() {
            let Some(owner) = &b.owner else {
                problems.push(format!("bucket {i} unowned"));
                continue;
            };
            if !live(owner) {
                problems.push(format!("bucket {i} owned by {owner}, which is not running"));
                continue;
            }
            let accepted = self
                .host_by_name(owner)
                .is_some_and(|h| self.hosts[h].kernel.accepts(i as u32, now).is_some());
            if !accepted {
                problems.push(format!("bucket {i} owned by {owner}, not in its kernel"));
            }
        }
        if !problems.is_empty() {
            if self.stats.convergence_ms.is_none() {
                return self.converge_deadline_check(&problems.join("; "));
            }
            // Converged already: a planned move in flight leaves its bucket
            // unaccepted for a moment; settling must still finish in time.
            return self.settle_deadline_check(&problems);
        }
        // Converged; settled too? (Nothing left for the planner to do.)
        if self.stats.convergence_ms.is_none() {
            let took = now - self.lease.live_at;
            self.stats.convergence_ms = Some(took);
            self.trace(None, || format!("CONVERGED {took}ms after raft was live"));
        }
        let caught_up = self.checker.voters().iter().all(|v| {
            self.nodes
                .get(v)
                .and_then(Node::replica)
                .is_some_and(|r| r.applied_index() == applied)
        });
        let mut unsettled = Vec::new();
        if operator_acted {
            unsettled.push("the operator's changes not applied yet".to_string());
        }
        if !caught_up {
            unsettled.push("voters not caught up".to_string());
        }
        if last > applied {
            // The planner's proposals of a moment ago are not applied yet.
            unsettled.push("the leader's log has unapplied entries".to_string());
        }
        for (i, b) in s.buckets.iter().enumerate() {
            if b.releasing {
                unsettled.push(format!("bucket {i} releasing"));
            }
        }
        for h in self.hosts.iter().filter(|h| h.kernel.stalled_until > now) {
            unsettled.push(format!("{}'s stalled kernel write still in flight", h.name));
        }
        // A lease earned before the faults ended may run out before the next
        // renewal lands (a host cut off until the end of the faults, a late
        // ack of an old round): the faults' effect, not a lapse of the
        // settled cluster.
        let healed = self.lease.healed_at;
        let owners: BTreeSet<&str> = s
            .buckets
            .iter()
            .filter_map(|b| b.owner.as_deref())
            .collect();
        for h in &self.hosts {
            if owners.contains(h.name.as_str()) && h.kernel.earned < h.clock.local(healed) {
                unsettled.push(format!(
                    "{}'s kernel holds a lease earned before the faults ended",
                    h.name
                ));
            }
        }
        for (name, m) in &s.members {
            if m.evicted {
                unsettled.push(format!("{name} evicted"));
            }
            // Fence marks of rounds that never completed: the member will have to
            // be fenced (it yields), then re-admitted.
            let marked: Vec<u64> = self
                .checker
                .voters()
                .iter()
                .copied()
                .filter(|v| {
                    self.ctl
                        .get(v)
                        .is_some_and(|c| c.fenced.get(name).is_some_and(|&f| f >= m.epoch))
                })
                .collect();
            // By the leader or by so many that no majority acks: the member
            // yields and will be fenced. (A minority of followers with marks is
            // harmless until one of them leads.)
            let voters = self.checker.voters().len();
            let blocking = marked.contains(&l) || marked.len() > voters - majority(voters);
            if !m.down && blocking {
                unsettled.push(format!("{name}@{} refused for good by {marked:?}", m.epoch));
            }
            if m.state == MemberState::Draining {
                unsettled.push(format!("{name} draining"));
            }
            if live(name) {
                if m.down && !self.damped(m, settings.damping, quiet_margin) {
                    unsettled.push(format!("{name} down, not yet re-admitted"));
                }
            } else if !m.down && !self.awaits_first_heartbeat(l, name) {
                unsettled.push(format!("{name} not running but not fenced"));
            } else if leader_acks(name) {
                // Heartbeats it sent before it died still arrive: the leader
                // may re-admit it yet.
                unsettled.push(format!("{name} not running but still acked by the leader"));
            }
        }
        let eligible: Vec<policy::Member> = s
            .members
            .iter()
            .map(|(n, m)| {
                policy::Member::new(n.clone(), m.weight, m.assignable() && !m.evicted && live(n))
            })
            .collect();
        if let Ok(target) = policy::assign(&s.buckets, &eligible) {
            for (i, (b, t)) in s.buckets.iter().zip(&target.owners).enumerate() {
                if b.owner != *t {
                    unsettled.push(format!("bucket {i} is to move from {:?} to {t:?}", b.owner));
                }
            }
        }
        // The world's view above says where buckets will end; the leader's own
        // view (a member added a moment ago and just heard from, one in its
        // health grace) says whether its planner still moves one now.
        if let Some(c) = self.ctl.get(&l) {
            if let (Some(planner), Some(p)) = (c.planner.as_ref(), c.promises.as_ref()) {
                let eligible = planner.eligible(&s, p, c.clock.local(now));
                if let Ok(target) = policy::assign(&s.buckets, &eligible) {
                    for (i, (b, t)) in s.buckets.iter().zip(&target.owners).enumerate() {
                        if b.owner != *t {
                            unsettled.push(format!(
                                "the leader's planner moves bucket {i} from {:?} to {t:?}",
                                b.owner
                            ));
                        }
                    }
                }
            }
        }
        if !unsettled.is_empty() {
            return self.settle_deadline_check(&unsettled);
        }
        let until = now + self.cfg.quiet_ms;
        self.lease.quiet = Some(QuietRecord {
            owners: s
                .buckets
                .iter()
                .map(|b| (b.owner.clone(), b.epoch))
                .collect(),
            leader: (l, term),
        });
        self.stats.settled_ms = Some(now - self.lease.live_at);
        self.trace(None, || {
            format!("SETTLED: quiet window until {until}ms, leader n{l} term {term}")
        });
        self.phase = Phase::End(EndPhase::Quiet { until });
        Ok(())
    }

    /// Settling (nothing left for the planner to do) may take until the
    /// convergence deadline plus the quiet margin (damped members coming back).
    fn settle_deadline_check(&self, unsettled: &[String]) -> Result<(), Failure> {
        let deadline = self.lease.converge_deadline + self.cfg.quiet_ms + 1000;
        if self.now < deadline {
            return Ok(());
        }
        Err(Failure {
            kind: FailureKind::Liveness,
            time_ms: self.now,
            message: format!(
                "seed {}, t={}ms: ownership did not settle by {deadline}ms (raft live at {}ms): {}",
                self.cfg.seed,
                self.now,
                self.lease.live_at,
                unsettled.join("; ")
            ),
        })
    }

    fn converge_deadline_check(&mut self, why: &str) -> Result<(), Failure> {
        if self.now < self.lease.converge_deadline {
            return Ok(());
        }
        Err(Failure {
            kind: FailureKind::Liveness,
            time_ms: self.now,
            message: format!(
                "seed {}, t={}ms: buckets did not converge within {}ms of raft being live again (at {}ms, faults healed at {}ms): {why}",
                self.cfg.seed,
                self.now,
                self.lease.converge_deadline - self.lease.live_at,
                self.lease.live_at,
                self.lease.healed_at
            ),
        })
    }

    // ---- invariants ----------------------------------------------------------

    /// Exclusivity, after every step; and in the quiet window, every owner keeps
    /// accepting its buckets.
    pub(in crate::world) fn check_leases(&mut self) -> Result<(), Failure> {
        if !self.agents_on() {
            return Ok(());
        }
        let now = self.now;
        // Availability during the faults: bucket-milliseconds no kernel accepts.
        if self.phase == Phase::Faults {
            let buckets = self.lease.bucket_count;
            if buckets > 0 {
                let served = self
                    .hosts
                    .iter()
                    .flat_map(|h| h.kernel.accepting(now).map(|(b, _)| b))
                    .collect::<BTreeSet<u32>>()
                    .len() as u64;
                let dt = now - self.lease.last_check;
                self.stats.unserved_bucket_ms += dt * buckets.saturating_sub(served);
                self.stats.bucket_ms += dt * buckets;
            }
            self.lease.last_check = now;
        }
        let mut holder: BTreeMap<u32, usize> = BTreeMap::new();
        for (i, h) in self.hosts.iter().enumerate() {
            for (b, e) in h.kernel.accepting(now) {
                if let Some(&j) = holder.get(&b) {
                    let other = &self.hosts[j];
                    let oe = other.kernel.set[&b];
                    let owners = self.owners_now(b);
                    return Err(Failure {
                        kind: FailureKind::Safety,
                        time_ms: now,
                        message: format!(
                            "seed {}, t={now}ms: exclusivity violated: bucket {b} accepts new flows on {} (since {}ms, until {}ms, bucket epoch {}, member epoch {}) and on {} (since {}ms, until {}ms, bucket epoch {}, member epoch {}); owners in the controllers' applied states: {owners}",
                            self.cfg.seed,
                            other.name,
                            oe.since,
                            oe.until,
                            oe.bucket_epoch,
                            oe.member_epoch,
                            h.name,
                            e.since,
                            e.until,
                            e.bucket_epoch,
                            e.member_epoch
                        ),
                    });
                }
                holder.insert(b, i);
            }
        }
        if let (Some(EndPhase::Quiet { .. }), Some(q)) = (self.end_phase(), &self.lease.quiet) {
            for (b, (owner, _)) in q.owners.iter().enumerate() {
                let owner = owner.as_deref().unwrap_or("nobody");
                let ok = self
                    .host_by_name(owner)
                    .is_some_and(|i| holder.get(&(b as u32)) == Some(&i));
                if !ok {
                    return Err(Failure {
                        kind: FailureKind::Quiet,
                        time_ms: now,
                        message: format!(
                            "seed {}, t={now}ms: quiet violated: bucket {b} stopped accepting new flows on its owner {owner} in a fault-free window",
                            self.cfg.seed
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    fn owners_now(&self, b: u32) -> String {
        self.nodes
            .iter()
            .filter_map(|(id, n)| {
                let r = n.replica()?;
                let bk = r.state().buckets.get(b as usize)?;
                Some(format!(
                    "n{id}@{}: {}@{}{}",
                    r.applied_index(),
                    bk.owner.as_deref().unwrap_or("-"),
                    bk.epoch,
                    if bk.releasing { " releasing" } else { "" }
                ))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

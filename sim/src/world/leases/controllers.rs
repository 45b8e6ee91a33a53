//! The controllers' side of the lease protocol in the world: assignment
//! streams, heartbeat answers (core's `heartbeat::answer` on each controller's
//! own `Promises`), and the leader's ownership loop (core's `Planner`: wake-ups,
//! ticks, proposals) with its fence rounds (core's `FenceRound`) over the
//! simulated network.

use super::*;

impl World {
    /// Streams the assignment at `id`'s applied index to every agent watching it
    /// (or only to `only`), when it changed or when `force`d.
    pub(super) fn push_assignments(&mut self, id: u64, only: Option<usize>, force: bool) {
        let Some(r) = self.nodes.get(&id).and_then(Node::replica) else {
            return;
        };
        if self
            .nodes
            .get(&id)
            .is_some_and(|n| n.paused_until > self.now)
        {
            return;
        }
        let voter = r.conf_state().voters.contains(&id);
        let Some(c) = self.ctl.get_mut(&id) else {
            return;
        };
        if !voter {
            // As the controller's WatchAssignments: a controller that is not a
            // voter of its applied configuration ends every stream.
            c.streams.clear();
            return;
        }
        let mut out = Vec::new();
        for (i, h) in self.hosts.iter().enumerate() {
            if only.is_some_and(|o| o != i) {
                continue;
            }
            let Some(agent) = &h.agent else {
                c.streams.remove(&i);
                continue;
            };
            if !agent.watches(id) {
                c.streams.remove(&i);
                continue;
            }
            let a = assignment_of(r, &h.name);
            if !force && c.streams.get(&i).is_some_and(|last| !a.differs(last)) {
                continue;
            }
            c.streams.insert(i, a.clone());
            out.push((h.id, a));
        }
        for (to, a) in out {
            self.lease_send(
                id,
                to,
                LeaseMsg::Assignment {
                    controller: id,
                    assignment: Box::new(a),
                },
            );
        }
    }

    pub(super) fn ctl_recv(
        &mut self,
        id: u64,
        from: u64,
        from_incarnation: u64,
        msg: LeaseMsg,
    ) -> Result<(), Failure> {
        let now = self.now;
        match msg {
            LeaseMsg::Heartbeat { round, hb } => {
                let Some(r) = self.nodes.get(&id).and_then(Node::replica) else {
                    return Ok(());
                };
                let Some(c) = self.ctl.get_mut(&id) else {
                    return Ok(());
                };
                let Some(p) = c.promises.as_mut() else {
                    return Ok(());
                };
                let voter = r.conf_state().voters.contains(&id);
                let local = c.clock.local(now);
                let answer = heartbeat::answer(p, local, r.state(), voter, &hb);
                let reply = Reply {
                    controller: id,
                    round,
                    acked: answer.verdict.is_ok(),
                    member_epoch: answer.member_epoch,
                    leader: r.role().leader,
                    lease_ms: answer.lease_ms,
                    stale_assignment: matches!(
                        answer.verdict,
                        Err(Refusal::StaleAssignment { .. })
                    ),
                };
                self.lease_reply(id, from, from_incarnation, LeaseMsg::HeartbeatReply(reply));
            }
            LeaseMsg::Released { member, buckets } => {
                if let Some(p) = self.ctl.get_mut(&id).and_then(|c| c.planner.as_mut()) {
                    for (b, e) in buckets {
                        p.released(&member, b, e);
                    }
                    // The controller's loop plans at once on a confirmation.
                    self.wake_at(id, self.now);
                }
            }
            LeaseMsg::FenceRequest {
                round,
                member,
                epoch,
                commit,
            } => {
                let Some(c) = self.ctl.get_mut(&id) else {
                    return Ok(());
                };
                let Some(p) = c.promises.as_mut() else {
                    return Ok(());
                };
                let local = c.clock.local(now);
                let wait_ms = Some(p.promised_until(&member).saturating_sub(local));
                let agreed = if commit {
                    let agreed = p.fence(local, &member, epoch);
                    if agreed {
                        // Persisted (fsync'd) before the answer.
                        c.fenced = p.fenced().clone();
                        self.trace(Some(id), || {
                            format!("agrees to fence {member}@{epoch}: never acks it again")
                        });
                    }
                    agreed
                } else {
                    p.may_fence(local, &member)
                };
                self.lease_reply(
                    id,
                    from,
                    from_incarnation,
                    LeaseMsg::FenceReply {
                        round,
                        controller: id,
                        agreed,
                        commit,
                        wait_ms: wait_ms.filter(|_| !agreed),
                    },
                );
            }
            LeaseMsg::FenceReply {
                round,
                controller,
                agreed,
                commit,
                wait_ms,
            } => {
                let Some(rd) = self.ctl.get_mut(&id).and_then(|c| c.rounds.get_mut(&round)) else {
                    return Ok(());
                };
                let cmds = rd.fence.answer_waiting(controller, commit, agreed, wait_ms);
                self.fence_commands(id, round, cmds)?;
            }
            LeaseMsg::HeartbeatReply(_) | LeaseMsg::Assignment { .. } => {}
        }
        Ok(())
    }

    /// An out-of-tick plan of controller `id` at true time `at`, unless one is
    /// already due no later.
    pub(super) fn wake_at(&mut self, id: u64, at: u64) {
        let Some(c) = self.ctl.get_mut(&id) else {
            return;
        };
        if c.wake_at.is_some_and(|w| w >= self.now && w <= at) {
            return;
        }
        c.wake_at = Some(at);
        let incarnation = self.nodes.get(&id).map_or(0, |n| n.incarnation);
        self.schedule(
            at,
            Event::Lease(LeaseEvent::PlanWake {
                node: id,
                incarnation,
            }),
        );
    }

    /// Schedules controller `id`'s plan for when its planner next has
    /// something due, if that comes before its next tick.
    fn wake_when_due(&mut self, id: u64) {
        let Some(r) = self.nodes.get(&id).and_then(Node::replica) else {
            return;
        };
        let Some(c) = self.ctl.get(&id) else {
            return;
        };
        let (Some(pl), Some(p)) = (c.planner.as_ref(), c.promises.as_ref()) else {
            return;
        };
        let local = c.clock.local(self.now);
        let Some(at) = pl.next_wake(local, r.state(), p) else {
            return;
        };
        let at = self.now + c.clock.true_ms(at - local);
        self.wake_at(id, at);
    }

    /// The ownership loop of controller `id`, every H/2 on its clock
    /// (`periodic`), and when something is due in between.
    pub(super) fn plan_tick(
        &mut self,
        id: u64,
        incarnation: u64,
        periodic: bool,
    ) -> Result<(), Failure> {
        let Some(n) = self.nodes.get(&id) else {
            return Ok(());
        };
        if n.incarnation != incarnation || !n.is_up() {
            return Ok(());
        }
        let Some(r) = n.replica() else {
            return Ok(());
        };
        let Some(c) = self.ctl.get_mut(&id) else {
            return Ok(());
        };
        let state = r.state();
        let timing = state.settings.as_ref().map(|s| s.lease).unwrap_or_default();
        let period = c.clock.true_ms((timing.heartbeat_ms / 2).max(10));
        if periodic {
            self.schedule(
                self.now + period,
                Event::Lease(LeaseEvent::Plan {
                    node: id,
                    incarnation,
                }),
            );
        }
        if self.is_paused(id) {
            return Ok(());
        }
        let Some(r) = self.nodes.get(&id).and_then(Node::replica) else {
            return Ok(());
        };
        let Some(c) = self.ctl.get_mut(&id) else {
            return Ok(());
        };
        let Some(p) = c.promises.as_mut() else {
            return Ok(());
        };
        let now = self.now;
        c.rounds.retain(|_, rd| now < rd.started + 1000);
        let leader = r.role().role == StateRole::Leader;
        let skip_fence_wait = self.cfg.skip_fence_wait;
        let new_planner = || {
            let mut pl = Planner::new(PlannerConfig::default());
            pl.set_faults(PlannerFaults { skip_fence_wait });
            pl
        };
        let had_planner = c.planner.is_some();
        // The controller's own loop step (`Ownership::run` runs the same).
        let tick = Tick {
            now: c.clock.local(now),
            state: r.state(),
            applied: r.applied_index(),
            commit: r.commit_index(),
            leader,
        };
        let actions = ownership::tick(p, &mut c.planner, new_planner, tick);
        if !leader {
            if had_planner && self.trace.print {
                self.trace(Some(id), || "planner reset (not leader)".into());
            }
            return Ok(());
        }
        self.carry_out(id, actions)?;
        self.wake_when_due(id);
        Ok(())
    }

    /// The leader `id`'s planner actions: proposals and fence rounds.
    fn carry_out(&mut self, id: u64, actions: Vec<Action>) -> Result<(), Failure> {
        let Some(r) = self.nodes.get(&id).and_then(Node::replica) else {
            return Ok(());
        };
        let mut voters = r.conf_state().voters.clone();
        voters.sort_unstable();
        for a in actions {
            match a {
                Action::Propose(cmd) => self.ownership_propose(id, cmd)?,
                // The round stamps the world's time (fence_round).
                Action::Fence { member, epoch, .. } => {
                    self.fence_round(id, member, epoch, &voters)?;
                }
            }
        }
        Ok(())
    }

    pub(super) fn ownership_propose(&mut self, id: u64, cmd: Command) -> Result<(), Failure> {
        let pid = ProposalId {
            node: id,
            seq: self.next_proposal,
        };
        self.next_proposal += 1;
        let Some(r) = self.nodes.get_mut(&id).and_then(Node::replica_mut) else {
            return Ok(());
        };
        let stamp = vipshare_core::command::Stamp {
            at_ms: self.now,
            by: "leader".into(),
        };
        let ok = r.propose(pid, &stamp, &cmd).is_ok();
        if ok {
            self.stats.ownership_proposals += 1;
            if matches!(cmd, Command::FenceMember { .. }) {
                self.stats.fences_proposed += 1;
            }
        }
        if self.tracing() {
            self.trace(Some(id), || {
                format!(
                    "planner proposes n{id}#{} {cmd:?}{}",
                    pid.seq,
                    if ok { "" } else { " (refused)" }
                )
            });
        }
        if ok {
            self.process(id)
        } else {
            Ok(())
        }
    }

    /// Starts a fence round of `member` at `epoch` over every voter.
    fn fence_round(
        &mut self,
        id: u64,
        member: String,
        epoch: u64,
        voters: &[u64],
    ) -> Result<(), Failure> {
        let now = self.now;
        let faults = self.cfg.fence_faults;
        let Some(c) = self.ctl.get_mut(&id) else {
            return Ok(());
        };
        let Some(p) = c.promises.as_ref() else {
            return Ok(());
        };
        let round = c.next_round;
        c.next_round += 1;
        let could = p.may_fence(c.clock.local(now), &member);
        let (fence, cmds) =
            FenceRound::start_faulty(id, voters, &member, epoch, now, could, faults);
        c.rounds.insert(
            round,
            Round {
                fence,
                started: now,
            },
        );
        self.stats.fence_rounds += 1;
        self.trace(Some(id), || {
            format!("fence round {round}: {member}@{epoch}, asking {voters:?}")
        });
        self.fence_commands(id, round, cmds)
    }

    /// Carries out what fence round `round` of controller `id` asks for.
    fn fence_commands(
        &mut self,
        id: u64,
        round: u64,
        cmds: Vec<FenceCommand>,
    ) -> Result<(), Failure> {
        let mut todo: VecDeque<FenceCommand> = cmds.into();
        while let Some(cmd) = todo.pop_front() {
            let now = self.now;
            let Some(c) = self.ctl.get_mut(&id) else {
                return Ok(());
            };
            let Some(rd) = c.rounds.get_mut(&round) else {
                return Ok(());
            };
            let (member, epoch) = (rd.fence.member().to_string(), rd.fence.epoch());
            match cmd {
                FenceCommand::Ask { to, commit } => {
                    for v in to {
                        let m = LeaseMsg::FenceRequest {
                            round,
                            member: member.clone(),
                            epoch,
                            commit,
                        };
                        self.lease_send(id, v, m);
                    }
                }
                FenceCommand::MarkSelf => {
                    let ok = match c.promises.as_mut() {
                        Some(p) => p.fence(c.clock.local(now), &member, epoch),
                        None => false,
                    };
                    if ok {
                        // Persisted (fsync'd) before it counts.
                        c.fenced = c
                            .promises
                            .as_ref()
                            .map_or_else(Default::default, |p| p.fenced().clone());
                    }
                    todo.extend(rd.fence.marked_self(ok));
                    if ok {
                        self.trace(Some(id), || {
                            format!("agrees to fence {member}@{epoch}: never acks it again")
                        });
                    }
                }
                FenceCommand::GiveUp {
                    yes,
                    need,
                    retry_in_ms,
                } => {
                    self.trace(Some(id), || {
                        format!("fence round {round} not agreed ({yes} of {need}, retry in {retry_in_ms:?})")
                    });
                    if let Some(retry) = retry_in_ms {
                        if let Some(c) = self.ctl.get_mut(&id) {
                            let local = c.clock.local(now);
                            if let Some(p) = c.planner.as_mut() {
                                p.fence_not_agreed(&member, epoch, local, retry);
                            }
                        }
                        self.wake_when_due(id);
                    }
                }
                FenceCommand::Propose(cmd) => {
                    self.trace(Some(id), || format!("fence round {round} agreed"));
                    // As the controller: the plan for the state after the
                    // fence, proposed right behind it.
                    let then = match (
                        self.nodes.get(&id).and_then(Node::replica),
                        self.ctl.get_mut(&id),
                    ) {
                        (Some(r), Some(c)) => match (c.promises.as_ref(), c.planner.as_mut()) {
                            (Some(p), Some(pl)) if r.role().role == StateRole::Leader => {
                                ownership::after_fence(p, pl, c.clock.local(now), r.state(), &cmd)
                            }
                            _ => Vec::new(),
                        },
                        _ => Vec::new(),
                    };
                    self.ownership_propose(id, cmd)?;
                    self.carry_out(id, then)?;
                }
            }
        }
        Ok(())
    }

    // ---- agents --------------------------------------------------------------
}

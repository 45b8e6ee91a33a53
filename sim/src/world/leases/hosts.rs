//! The hosts' agents in the world: each runs the shipping agent `Engine`; this
//! file starts, kills, pauses and heals them and carries out the engine's
//! commands (messages, kernel writes, the state file) as the agent's runtime does.

use super::*;

impl World {
    /// The controllers an agent's configuration file lists: a random
    /// non-empty subset of the cluster's voters (an operator seldom lists
    /// them all, and a config outlives additions); the engine learns the
    /// rest from the controllers' assignments.
    pub(super) fn configured_seeds(&mut self) -> Vec<AgentController> {
        let cluster: Vec<u64> = self
            .checker
            .voters()
            .iter()
            .copied()
            .filter(|id| {
                self.nodes
                    .get(id)
                    .is_some_and(|n| !matches!(n.slot, Slot::Gone))
            })
            .collect();
        let cluster = if cluster.is_empty() {
            self.all_ids()
        } else {
            cluster
        };
        let k = self.models.gen_range(1..=cluster.len().max(1));
        let mut listed: Vec<u64> = cluster
            .choose_multiple(&mut self.models, k)
            .copied()
            .collect();
        listed.sort_unstable();
        if listed.len() < cluster.len() {
            self.stats.agent_partial_seeds += 1;
        }
        listed
            .into_iter()
            .map(|id| AgentController {
                id,
                address: address(id),
                voter: true,
            })
            .collect()
    }

    pub(super) fn start_agent(&mut self, i: usize) {
        let seeds = self.configured_seeds();
        let known: Vec<u64> = seeds.iter().map(|c| c.id).collect();
        let faults = self.cfg.agent_faults;
        let h = &mut self.hosts[i];
        h.incarnation += 1;
        h.paused_until = 0;
        let mut engine = Engine::new(seeds, h.state_file.clone());
        engine.set_faults(faults);
        h.agent = Some(engine);
        let incarnation = h.incarnation;
        let period = h.clock.true_ms(self.lease.timing.heartbeat_ms);
        let first = self.rng.gen_range(1..=period.max(1));
        if incarnation > 1 {
            self.stats.agent_restarts += 1;
        }
        self.trace_host(i, || {
            format!("agent starts (incarnation {incarnation}), configured with {known:?}")
        });
        self.schedule(
            self.now + first,
            Event::Lease(LeaseEvent::AgentRound {
                host: i,
                incarnation,
            }),
        );
        for c in known {
            if let Some(ctl) = self.ctl.get_mut(&c) {
                ctl.streams.remove(&i);
            }
            self.push_assignments(c, Some(i), true);
        }
    }

    pub(super) fn kill_agent(&mut self, i: usize, why: &str) {
        let h = &mut self.hosts[i];
        if h.agent.take().is_none() {
            return;
        }
        h.paused_until = 0;
        for c in self.ctl.values_mut() {
            c.streams.remove(&i);
        }
        self.stats.agent_kills += 1;
        self.trace_host(i, || format!("AGENT KILLED ({why}); the kernel set stays"));
    }

    /// Feeds one event to host `i`'s agent engine and carries out its commands,
    /// as `vipshare-agent`'s runtime does.
    pub(in crate::world) fn agent_step(&mut self, i: usize, ev: AgentEvent) {
        let now = self.now;
        let h = &mut self.hosts[i];
        let running = h.paused_until <= now;
        let local = h.clock.local(now);
        let Some(a) = h.agent.as_mut() else {
            return;
        };
        let before: BTreeSet<u64> = a.controllers().iter().map(|c| c.id).collect();
        let (epoch, silent, expiry) = (a.epoch(), a.silent_until(), a.lease_expiry());
        let cmds = a.step(local, ev);
        if a.lease_expiry() > expiry && a.epoch() == epoch {
            self.stats.lease_extensions += 1;
        }
        if a.silent_until() != silent && a.silent_until().is_some() {
            self.stats.agent_yields += 1;
            self.trace_host(i, || {
                format!("refused for good at epoch {epoch}: silent to be fenced")
            });
        }
        if let Some(a) = self.hosts[i].agent.as_ref().filter(|a| a.epoch() != epoch) {
            let new = a.epoch();
            self.trace_host(i, || format!("adopts member epoch {new} (was {epoch})"));
        }
        let (from, name, incarnation) = {
            let h = &self.hosts[i];
            (h.id, h.name.clone(), h.incarnation)
        };
        for cmd in cmds {
            match cmd {
                AgentCommand::Persist(state) => self.hosts[i].state_file = state,
                AgentCommand::Heartbeat {
                    round,
                    epoch,
                    assignment_index,
                    to,
                } => {
                    for c in to {
                        let hb = LeaseMsg::Heartbeat {
                            round,
                            hb: heartbeat::Heartbeat {
                                member: name.clone(),
                                epoch,
                                assignment_index: Some(assignment_index),
                                problems: Vec::new(),
                            },
                        };
                        self.lease_send(from, c, hb);
                    }
                }
                AgentCommand::Released { buckets, to } => {
                    // A stopped process sends nothing; the next round repeats it.
                    if !running {
                        continue;
                    }
                    if let Some((until, down_ms)) = self.lease.restart_on_release.remove(&i) {
                        if now < until {
                            self.schedule(
                                now,
                                Event::Lease(LeaseEvent::RestartAfterRelease { host: i, down_ms }),
                            );
                        }
                    }
                    for c in to {
                        let m = LeaseMsg::Released {
                            member: name.clone(),
                            buckets: buckets.clone(),
                        };
                        self.lease_send(from, c, m);
                    }
                }
                AgentCommand::Install {
                    buckets,
                    timeout_ms,
                    member_epoch,
                } => {
                    let earned = self.hosts[i]
                        .agent
                        .as_ref()
                        .and_then(|a| a.lease_earned_at())
                        .unwrap_or(0);
                    self.kernel_submit(
                        i,
                        KernelOp::Install {
                            buckets,
                            timeout_ms,
                            member_epoch,
                            earned,
                        },
                    )
                }
                AgentCommand::Withdraw { bucket, epoch } => {
                    self.trace_host(i, || format!("withdraws bucket {bucket}@{epoch} (release)"));
                    self.kernel_submit(
                        i,
                        KernelOp::Withdraw {
                            bucket,
                            epoch,
                            incarnation,
                        },
                    );
                }
                AgentCommand::Watch { controllers } => {
                    for c in controllers.iter().filter(|c| !before.contains(&c.id)) {
                        self.push_assignments(c.id, Some(i), true);
                    }
                }
            }
        }
    }

    pub(super) fn agent_round(&mut self, i: usize, incarnation: u64) {
        let now = self.now;
        let Some(h) = self.hosts.get(i) else {
            return;
        };
        if h.incarnation != incarnation {
            return;
        }
        let paused = h.paused_until > now;
        let Some(a) = h.agent.as_ref() else {
            return;
        };
        let period = h.clock.true_ms(a.timing().heartbeat_ms);
        self.schedule(
            now + period,
            Event::Lease(LeaseEvent::AgentRound {
                host: i,
                incarnation,
            }),
        );
        if !paused {
            self.agent_step(i, AgentEvent::Tick);
        }
    }

    pub(super) fn agent_recv(&mut self, i: usize, msg: LeaseMsg) {
        match msg {
            LeaseMsg::HeartbeatReply(reply) => self.agent_step(i, AgentEvent::Reply(reply)),
            LeaseMsg::Assignment {
                controller,
                assignment,
            } => self.agent_step(
                i,
                AgentEvent::Assignment {
                    controller,
                    assignment: *assignment,
                },
            ),
            // Requests go to controllers only.
            LeaseMsg::Heartbeat { .. }
            | LeaseMsg::Released { .. }
            | LeaseMsg::FenceRequest { .. }
            | LeaseMsg::FenceReply { .. } => {}
        }
    }

    // ---- faults --------------------------------------------------------------

    pub(super) fn random_host(&mut self, running: bool, prefer_owner: bool) -> Option<usize> {
        let now = self.now;
        let cands: Vec<usize> = self
            .hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| if running { h.running(now) } else { h.is_up() })
            .map(|(i, _)| i)
            .collect();
        if prefer_owner && self.rng.gen_ratio(7, 8) {
            let owners: Vec<usize> = cands
                .iter()
                .copied()
                .filter(|&i| self.hosts[i].kernel.accepting(now).next().is_some())
                .collect();
            if let Some(&i) = owners.choose(&mut self.rng) {
                return Some(i);
            }
        }
        cands.choose(&mut self.rng).copied()
    }

    pub(super) fn pause_agent(&mut self, i: usize, pause_ms: u64) {
        let until = self.now + pause_ms;
        self.hosts[i].paused_until = until;
        self.stats.agent_pauses += 1;
        self.trace_host(i, || format!("FAULT agent paused for {pause_ms}ms"));
        self.schedule(until, Event::Lease(LeaseEvent::AgentResume { host: i }));
    }

    pub(super) fn operator_propose(&mut self, cmd: Command) -> Result<(), Failure> {
        let Some(l) = self.leader_for_change() else {
            return Ok(());
        };
        self.trace(Some(l), || format!("OPERATOR {cmd:?}"));
        self.ownership_propose(l, cmd)
    }

    /// Agent network ids, for faults that cut whole hosts.
    pub(in crate::world) fn agent_ids(&self) -> Vec<u64> {
        self.hosts.iter().map(|h| h.id).collect()
    }

    // ---- end of run ----------------------------------------------------------

    /// End of the faults: every agent resumes, dead agents restart, and sometimes
    /// one agent is killed for good (its buckets must fail over).
    pub(in crate::world) fn agents_heal(&mut self) {
        if !self.agents_on() {
            return;
        }
        self.lease.healed_at = self.now;
        let keep_dead = if self.hosts.len() >= 3 && self.rng.gen_ratio(1, 3) {
            Some(self.rng.gen_range(0..self.hosts.len()))
        } else {
            None
        };
        for i in 0..self.hosts.len() {
            self.hosts[i].paused_until = 0;
            if Some(i) == keep_dead {
                self.kill_agent(i, "for good");
                self.hosts[i].kept_dead = true;
            } else if self.hosts[i].agent.is_none() {
                self.start_agent(i);
            }
        }
        self.restart_stranded_agents();
    }

    /// After the faults, the operator restarts (with a fresh configuration)
    /// an agent that talks only to controllers that are gone: configured with
    /// some of the controllers only, it restarted, and those were removed
    /// before it heard of the others. Nothing else would ever reconnect it.
    pub(in crate::world) fn restart_stranded_agents(&mut self) {
        if !self.agents_on() || self.phase == Phase::Faults {
            return;
        }
        for i in 0..self.hosts.len() {
            let stranded = self.hosts[i].agent.as_ref().is_some_and(|a| {
                a.controllers().iter().all(|c| {
                    self.nodes
                        .get(&c.id)
                        .is_none_or(|n| matches!(n.slot, Slot::Gone))
                })
            });
            if stranded {
                self.kill_agent(i, "operator: every controller it knows is gone");
                self.start_agent(i);
            }
        }
    }

    /// Raft is live again: agents mode goes on to check convergence.
    pub(in crate::world) fn agents_after_live(&mut self) -> bool {
        if !self.agents_on() {
            return false;
        }
        self.lease.live_at = self.now;
        let (bound, why) = self.converge_bound();
        self.lease.converge_deadline = self.now + bound;
        self.phase = Phase::End(EndPhase::Converge);
        let deadline = self.lease.converge_deadline;
        self.trace(None, || {
            format!(
                "CONVERGE: every bucket must be owned by a live agent and accepted by its kernel by {deadline}ms ({why})"
            )
        });
        true
    }
}

//! Faults done to agents: pauses, kills, partitions of one host, stalled
//! kernel writes, restarts against a lagging controller.

use super::*;

impl World {
    pub(super) fn inject_agent(&mut self, f: AgentFault) -> Result<(), Failure> {
        self.stats.agent_faults += 1;
        let members: Vec<String> = self.hosts.iter().map(|h| h.name.clone()).collect();
        match f {
            AgentFault::Pause { pause_ms } => {
                let Some(i) = self.random_host(true, false) else {
                    return Ok(());
                };
                self.pause_agent(i, pause_ms);
            }
            AgentFault::Kill { down_ms } => {
                let Some(i) = self.random_host(false, true) else {
                    return Ok(());
                };
                self.kill_agent(i, &format!("down for {down_ms}ms"));
                let incarnation = self.hosts[i].incarnation;
                self.schedule(
                    self.now + down_ms,
                    Event::Lease(LeaseEvent::AgentStart {
                        host: i,
                        incarnation,
                    }),
                );
            }
            AgentFault::Flap {
                cycles,
                up_ms,
                down_ms,
            } => {
                let Some(i) = self.random_host(false, false) else {
                    return Ok(());
                };
                self.trace_host(i, || {
                    format!("FAULT agent flaps {cycles} times (up {up_ms}ms, down {down_ms}ms)")
                });
                self.schedule(
                    self.now,
                    Event::Lease(LeaseEvent::FlapKill {
                        host: i,
                        left: cycles,
                        up_ms,
                        down_ms,
                    }),
                );
            }
            AgentFault::CutFromLeader { duration_ms } => {
                let Some(i) = self.random_host(false, true) else {
                    return Ok(());
                };
                let leader = match self.leader() {
                    Some((l, _)) => l,
                    None => match self.all_ids().choose(&mut self.rng) {
                        Some(&c) => c,
                        None => return Ok(()),
                    },
                };
                let a = self.hosts[i].id;
                let what = format!("{} <-/-> leader n{leader}", self.hosts[i].name);
                self.partition(cut(&[a], &[leader], false), duration_ms, what);
            }
            AgentFault::CutFromLeaderThenStop {
                duration_ms,
                stop_after_ms,
                stop_ms,
                kill,
            } => {
                let Some(i) = self.random_host(true, true) else {
                    return Ok(());
                };
                let Some(leader) = self.leader_for_change() else {
                    return Ok(());
                };
                let a = self.hosts[i].id;
                let what = format!(
                    "{} <-/-> leader n{leader}, then {} after {stop_after_ms}ms for {stop_ms}ms",
                    self.hosts[i].name,
                    if kill { "killed" } else { "paused" }
                );
                self.partition(cut(&[a], &[leader], false), duration_ms, what);
                self.schedule(
                    self.now + stop_after_ms,
                    Event::Lease(LeaseEvent::Stop {
                        host: i,
                        ms: stop_ms,
                        kill,
                    }),
                );
            }
            AgentFault::OneWayLeader {
                agent_to_leader,
                duration_ms,
            } => {
                let Some(i) = self.random_host(false, true) else {
                    return Ok(());
                };
                let Some((leader, _)) = self.leader() else {
                    return Ok(());
                };
                let a = self.hosts[i].id;
                let name = self.hosts[i].name.clone();
                let (links, what) = if agent_to_leader {
                    (vec![(a, leader)], format!("{name} -/-> leader n{leader}"))
                } else {
                    (vec![(leader, a)], format!("leader n{leader} -/-> {name}"))
                };
                self.partition(links, duration_ms, what);
            }
            AgentFault::Isolate { duration_ms } => {
                let Some(i) = self.random_host(false, true) else {
                    return Ok(());
                };
                let a = self.hosts[i].id;
                let ctls = self.all_ids();
                let what = format!("{} isolated from the controllers", self.hosts[i].name);
                self.partition(cut(&[a], &ctls, false), duration_ms, what);
            }
            AgentFault::CutSome {
                one_way,
                duration_ms,
            } => {
                let Some(i) = self.random_host(false, true) else {
                    return Ok(());
                };
                let mut ctls = self.all_ids();
                if ctls.is_empty() {
                    return Ok(());
                }
                ctls.shuffle(&mut self.rng);
                let k = self.rng.gen_range(1..=ctls.len());
                let some = &ctls[..k];
                let a = self.hosts[i].id;
                let name = self.hosts[i].name.clone();
                let (links, what) = if !one_way {
                    (cut(&[a], some, false), format!("{name} <-/-> {some:?}"))
                } else if self.rng.gen_bool(0.5) {
                    (cut(&[a], some, true), format!("{name} -/-> {some:?}"))
                } else {
                    (cut(some, &[a], true), format!("{some:?} -/-> {name}"))
                };
                self.partition(links, duration_ms, what);
            }
            AgentFault::Drain => {
                let Some(name) = members.choose(&mut self.rng).cloned() else {
                    return Ok(());
                };
                self.operator_propose(Command::Drain { name })?;
            }
            AgentFault::Undrain => {
                let draining: Vec<String> = self
                    .leader()
                    .and_then(|(l, _)| self.nodes.get(&l).and_then(Node::replica))
                    .map(|r| {
                        r.state()
                            .members
                            .iter()
                            .filter(|(_, m)| m.state == MemberState::Draining)
                            .map(|(n, _)| n.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                let pool = if draining.is_empty() {
                    &members
                } else {
                    &draining
                };
                let Some(name) = pool.choose(&mut self.rng).cloned() else {
                    return Ok(());
                };
                self.operator_propose(Command::Undrain { name })?;
            }
            AgentFault::SetWeight { weight } => {
                let Some(name) = members.choose(&mut self.rng).cloned() else {
                    return Ok(());
                };
                self.operator_propose(Command::SetWeight { name, weight })?;
            }
            AgentFault::RestartAgainstLaggingController {
                drain,
                lag_ms,
                down_ms,
            } => self.restart_against_lagging(drain, lag_ms, down_ms)?,
        }
        Ok(())
    }

    /// [`AgentFault::RestartAgainstLaggingController`]: a running member
    /// (an owner if any), a follower cut off from the other controllers (its
    /// raft traffic blocked; the agents still reach it), the member's buckets
    /// released by the operator, and its agent armed to be restarted right
    /// after it confirms a release.
    fn restart_against_lagging(
        &mut self,
        drain: bool,
        lag_ms: u64,
        down_ms: u64,
    ) -> Result<(), Failure> {
        let Some(i) = self.random_host(true, true) else {
            return Ok(());
        };
        let Some(leader) = self.leader_for_change() else {
            return Ok(());
        };
        let ctls = self.all_ids();
        let followers: Vec<u64> = ctls.iter().copied().filter(|&c| c != leader).collect();
        let Some(&lagging) = followers.choose(&mut self.rng) else {
            return Ok(());
        };
        let others: Vec<u64> = ctls.into_iter().filter(|&c| c != lagging).collect();
        let name = self.hosts[i].name.clone();
        self.partition(
            cut(&[lagging], &others, false),
            lag_ms,
            format!("n{lagging} lags (cut from the controllers); {name} to restart after its next release"),
        );
        self.lease
            .restart_on_release
            .insert(i, (self.now + lag_ms, down_ms));
        let cmd = if drain {
            Command::Drain { name }
        } else {
            Command::SetWeight { name, weight: 0 }
        };
        self.operator_propose(cmd)
    }
}

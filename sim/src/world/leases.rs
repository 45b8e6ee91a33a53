//! Agents, leases and the ownership planner in the world: the lease messages
//! and their delivery here; the controllers' side in [`controllers`], the
//! agents in [`hosts`], faults done to agents in [`agent_faults`], the lease
//! invariants and liveness checks in [`checkers`].
//!
//! Controllers answer heartbeats from their own applied state and their own
//! [`Promises`] (on their own drifting clock; the fence marks survive crashes, as
//! `fences.json` does), exactly as `controller/src/service/agent.rs` does. Every
//! controller refreshes its promise timing from its applied settings every H/2,
//! and the leader runs the real [`Planner`] then (a fresh one on becoming leader,
//! dropped on losing leadership) and carries out its actions: fence rounds over
//! the simulated network to every voter, proposals to raft. Assignment streams
//! are messages from each controller to each agent that watches it, sent when the
//! assignment at the controller's applied index changes and every second (a
//! broken stream reconnects and starts with the current assignment).
//!
//! Agents run the shipping [`Engine`] (`vipshare_core::agent`); the world
//! carries out its commands (network, kernel, state file) as the agent's
//! runtime does.
//!
//! Invariants (checked after every step, or whenever the state they read changes):
//! - **exclusivity**: at no true instant do two hosts' kernels accept new flows
//!   for one bucket. Acceptance only grows when a kernel applies an install, and
//!   only shrinks in between, so checking after every step is exact;
//! - **bucket epochs only increase** with the applied index, over every
//!   controller's applied states;
//! - **a suppressed member owns nothing**, in every applied state;
//! - **convergence** after the faults (see `World::converge_bound`);
//! - **quiet**: in a fault-free window after convergence no bucket changes
//!   owner (or epoch), the leader stays, and every owner's kernel keeps
//!   accepting its buckets.

use std::collections::BTreeSet;

use std::collections::VecDeque;

use vipshare_core::damping::Damping;
use vipshare_core::fence::{FenceCommand, FenceRound};
use vipshare_core::heartbeat;
use vipshare_core::lease::{majority, LeaseTiming, Promises, Refusal};
use vipshare_core::ownership::{self, Action, Planner, PlannerConfig, PlannerFaults, Tick};
use vipshare_core::policy;
use vipshare_core::state::{Member, MemberState};

use super::*;
use vipshare_core::agent::{
    Assignment, Command as AgentCommand, Controller as AgentController, Engine,
    Event as AgentEvent, Reply,
};

use crate::agents::{Clock, Host, Kernel, KernelOp, LeaseMsg, AGENT_ID_BASE};
use crate::faults::{AgentFault, AgentFaultPlan};

mod agent_faults;
mod checkers;
mod controllers;
mod hosts;

/// Lease events of the world's queue.
#[derive(Debug)]
pub(super) enum LeaseEvent {
    Deliver {
        from: u64,
        /// The sender's incarnation: a reply goes back over the same connection,
        /// so it is lost if the sender restarted meanwhile.
        from_incarnation: u64,
        to: u64,
        to_incarnation: u64,
        msg: Box<LeaseMsg>,
    },
    /// (Re)start a dead agent that died in incarnation `incarnation`.
    AgentStart {
        host: usize,
        incarnation: u64,
    },
    AgentRound {
        host: usize,
        incarnation: u64,
    },
    AgentResume {
        host: usize,
    },
    Kernel {
        host: usize,
        op: KernelOp,
        /// When the agent handed it over (rendered its timeout).
        submitted: u64,
    },
    Plan {
        node: u64,
        incarnation: u64,
    },
    /// A plan out of the periodic ones, when something is due before the next
    /// (`Planner::next_wake`, a confirmed release), as the controller's loop
    /// wakes.
    PlanWake {
        node: u64,
        incarnation: u64,
    },
    Resync {
        node: u64,
        incarnation: u64,
    },
    Fault(AgentFault),
    FlapKill {
        host: usize,
        left: u32,
        up_ms: u64,
        down_ms: u64,
    },
    /// Kill an agent that just confirmed a release and restart it after
    /// `down_ms` ([`AgentFault::RestartAgainstLaggingController`]).
    RestartAfterRelease {
        host: usize,
        down_ms: u64,
    },
    /// Stop (pause or kill) an agent's process now, for `ms`.
    Stop {
        host: usize,
        ms: u64,
        kill: bool,
    },
}

/// One fence round the leader runs ([`vipshare_core::fence::FenceRound`]).
#[derive(Debug, Clone)]
struct Round {
    fence: FenceRound,
    started: u64,
}

/// A controller's lease side.
#[derive(Debug)]
pub(super) struct CtlLease {
    clock: Clock,
    /// `fences.json`: durable, survives crashes.
    fenced: BTreeMap<String, u64>,
    promises: Option<Promises>,
    planner: Option<Planner>,
    rounds: BTreeMap<u64, Round>,
    next_round: u64,
    /// Last assignment sent on each agent's stream.
    streams: BTreeMap<usize, Assignment>,
    observed_applied: Option<u64>,
    /// The earliest out-of-tick plan scheduled (true time).
    wake_at: Option<u64>,
}

impl CtlLease {
    /// The controller left the cluster: it answers nothing any more.
    pub(super) fn stop(&mut self) {
        self.promises = None;
        self.planner = None;
        self.rounds.clear();
        self.streams.clear();
    }
}

/// Record of the quiet window.
#[derive(Debug, Clone)]
struct QuietRecord {
    owners: Vec<(Option<String>, u64)>,
    leader: (u64, u64),
}

/// The lease side of the world: configuration and what the checkers remember.
#[derive(Debug, Default)]
pub(super) struct LeaseWorld {
    /// The timing the cluster is initialised with.
    pub timing: LeaseTiming,
    /// Applied index -> every bucket's epoch at that index.
    epochs: BTreeMap<u64, Vec<u64>>,
    quiet: Option<QuietRecord>,
    operator_next: u64,
    healed_at: u64,
    live_at: u64,
    converge_deadline: u64,
    /// Buckets in the cluster (once initialised) and the previous check.
    bucket_count: u64,
    last_check: u64,
    /// Agents to restart right after their next `Released`, until a time,
    /// after how long ([`AgentFault::RestartAgainstLaggingController`]).
    restart_on_release: BTreeMap<usize, (u64, u64)>,
}

/// The end-of-run phases that follow raft liveness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EndPhase {
    Converge,
    Quiet { until: u64 },
}

fn is_agent(id: u64) -> bool {
    id >= AGENT_ID_BASE
}

fn draw_ppm(rng: &mut ChaCha8Rng, rho_ppm: u64) -> i64 {
    let rho = rho_ppm as i64;
    match rng.gen_range(0..3) {
        0 => -rho,
        1 => rho,
        _ => rng.gen_range(-rho..=rho),
    }
}

/// The assignment a controller streams to `member` from its applied state.
fn assignment_of(r: &Replica<SimDisk>, member: &str) -> Assignment {
    Assignment::of(r.state(), r.applied_index(), &r.conf_state().voters, member)
}

impl World {
    // ---- setup -------------------------------------------------------------

    /// Agents, their clocks and their fault plan (agents mode only).
    pub(super) fn init_agents(&mut self, plan_seed: u64) {
        let mut timing = LeaseTiming::default();
        if self.rng.gen_ratio(1, 4) {
            // Some seeds run with other (valid) timings: faster, slower, worse clocks.
            timing = match self.rng.gen_range(0..3) {
                0 => LeaseTiming {
                    heartbeat_ms: 50,
                    lease_ms: 300,
                    kernel_delay_ms: 30,
                    clock_rate_ppm: 20_000,
                    margin_ms: 20,
                },
                1 => LeaseTiming {
                    heartbeat_ms: 200,
                    lease_ms: 1000,
                    kernel_delay_ms: 100,
                    clock_rate_ppm: 50_000,
                    margin_ms: 50,
                },
                _ => LeaseTiming {
                    heartbeat_ms: 100,
                    lease_ms: 400,
                    kernel_delay_ms: 80,
                    clock_rate_ppm: 30_000,
                    margin_ms: 10,
                },
            };
        }
        self.lease.timing = timing;
        self.workload.set_lease_timing(timing);
        let count = self
            .cfg
            .agent_count
            .unwrap_or_else(|| self.rng.gen_range(3..=8));
        for i in 0..count {
            let ppm = draw_ppm(&mut self.rng, timing.clock_rate_ppm);
            let offset = self.rng.gen_range(0..1_000_000);
            self.hosts.push(Host {
                name: format!("h{i}"),
                id: AGENT_ID_BASE + i as u64,
                clock: Clock::new(ppm, offset),
                kernel: Kernel::default(),
                agent: None,
                incarnation: 0,
                paused_until: 0,
                state_file: Default::default(),
                kept_dead: false,
            });
        }
        self.workload
            .set_members(self.hosts.iter().map(|h| h.name.clone()).collect());
        let clocks: Vec<String> = self
            .hosts
            .iter()
            .map(|h| format!("{}:{:+}ppm", h.name, h.clock.ppm))
            .collect();
        self.trace(None, || {
            format!(
                "agents {} timing {timing:?} L_c={} clocks {}",
                count,
                timing.controller_promise_ms(),
                clocks.join(" ")
            )
        });
        let mut plan_rng = ChaCha8Rng::seed_from_u64(plan_seed);
        plan_rng.set_stream(2);
        let plan = AgentFaultPlan::generate(
            &mut plan_rng,
            self.cfg.duration_ms,
            self.cfg.agent_fault_gap_ms,
        );
        for (t, f) in plan.faults {
            self.trace(None, || format!("agent plan: at {t}ms {f:?}"));
            self.schedule(t, Event::Lease(LeaseEvent::Fault(f)));
        }
        for i in 0..self.hosts.len() {
            let at = self.rng.gen_range(1..200);
            self.schedule(
                at,
                Event::Lease(LeaseEvent::AgentStart {
                    host: i,
                    incarnation: 0,
                }),
            );
        }
    }

    fn agents_on(&self) -> bool {
        self.cfg.agents
    }

    pub(super) fn trace_host(&mut self, host: usize, text: impl FnOnce() -> String) {
        if !self.tracing() {
            return;
        }
        let who = self.hosts.get(host).map_or("h?".into(), |h| h.name.clone());
        self.trace_line(&who, text);
    }

    fn host_by_name(&self, name: &str) -> Option<usize> {
        self.hosts.iter().position(|h| h.name == name)
    }

    fn host_by_id(&self, id: u64) -> Option<usize> {
        id.checked_sub(AGENT_ID_BASE)
            .map(|i| i as usize)
            .filter(|&i| i < self.hosts.len())
    }

    // ---- controller lifecycle hooks -----------------------------------------

    /// A controller (re)started: fresh promises (everyone counts as acked now), the
    /// fence marks from its disk, and its timers.
    pub(super) fn lease_node_started(&mut self, id: u64) {
        if !self.agents_on() {
            return;
        }
        if !self.ctl.contains_key(&id) {
            let ppm = draw_ppm(&mut self.rng, self.lease.timing.clock_rate_ppm);
            let offset = self.rng.gen_range(0..1_000_000);
            self.ctl.insert(
                id,
                CtlLease {
                    clock: Clock::new(ppm, offset),
                    fenced: BTreeMap::new(),
                    promises: None,
                    planner: None,
                    rounds: BTreeMap::new(),
                    next_round: 1,
                    streams: BTreeMap::new(),
                    observed_applied: None,
                    wake_at: None,
                },
            );
        }
        let incarnation = self.nodes.get(&id).map_or(0, |n| n.incarnation);
        let now = self.now;
        let Some(c) = self.ctl.get_mut(&id) else {
            return;
        };
        // Like `Leases::open`: default timing until the ownership loop reads the
        // settings from the applied state.
        let mut promises =
            Promises::new(LeaseTiming::default(), c.clock.local(now), c.fenced.clone());
        promises.set_faults(self.cfg.promise_faults);
        c.promises = Some(promises);
        c.planner = None;
        c.rounds.clear();
        c.streams.clear();
        c.observed_applied = None;
        c.wake_at = None;
        let plan_at = now + self.rng.gen_range(1..=50);
        let resync_at = now + self.rng.gen_range(1..=1000);
        self.schedule(
            plan_at,
            Event::Lease(LeaseEvent::Plan {
                node: id,
                incarnation,
            }),
        );
        self.schedule(
            resync_at,
            Event::Lease(LeaseEvent::Resync {
                node: id,
                incarnation,
            }),
        );
    }

    /// A controller crashed or was stopped: everything but the fence marks is lost.
    pub(super) fn lease_node_down(&mut self, id: u64) {
        if let Some(c) = self.ctl.get_mut(&id) {
            c.promises = None;
            c.planner = None;
            c.rounds.clear();
            c.streams.clear();
            c.observed_applied = None;
        }
    }

    /// After `id` took a step: observe its applied state if it changed (epoch and
    /// damping invariants, the quiet window) and stream assignments.
    pub(super) fn lease_after_process(&mut self, id: u64) -> Result<(), Failure> {
        if !self.agents_on() {
            return Ok(());
        }
        let Some(r) = self.nodes.get(&id).and_then(Node::replica) else {
            return Ok(());
        };
        let Some(c) = self.ctl.get_mut(&id) else {
            return Ok(());
        };
        let applied = r.applied_index();
        if c.observed_applied == Some(applied) {
            return Ok(());
        }
        c.observed_applied = Some(applied);
        let s = r.state();
        let (seed, now) = (self.cfg.seed, self.now);
        let fail = |invariant: &str, detail: String| Failure {
            kind: FailureKind::Safety,
            time_ms: now,
            message: format!("seed {seed}, t={now}ms: {invariant} violated on n{id}: {detail}"),
        };

        // Bucket epochs never go down as the applied index grows.
        let epochs: Vec<u64> = s.buckets.iter().map(|b| b.epoch).collect();
        self.lease.bucket_count = self.lease.bucket_count.max(epochs.len() as u64);
        if !epochs.is_empty() {
            let before = self.lease.epochs.range(..applied).next_back();
            let after = self.lease.epochs.range(applied + 1..).next();
            for (i, &e) in epochs.iter().enumerate() {
                if let Some((&at, prev)) = before {
                    if prev.get(i).is_some_and(|&p| p > e) {
                        return Err(fail(
                            "bucket epochs only increase",
                            format!(
                                "bucket {i} has epoch {e} at applied index {applied}, but {} at index {at}",
                                prev[i]
                            ),
                        ));
                    }
                }
                if let Some((&at, next)) = after {
                    if next.get(i).is_some_and(|&n| n < e) {
                        return Err(fail(
                            "bucket epochs only increase",
                            format!(
                                "bucket {i} has epoch {e} at applied index {applied}, but {} at later index {at}",
                                next[i]
                            ),
                        ));
                    }
                }
            }
            self.lease.epochs.entry(applied).or_insert(epochs);
        }

        // A suppressed member owns nothing.
        for (name, m) in &s.members {
            if m.suppressed {
                let owned: Vec<u32> = s.owned_by(name).collect();
                if !owned.is_empty() {
                    return Err(fail(
                        "suppressed members gain no buckets",
                        format!(
                            "{name} is suppressed (penalty {:?}) but owns buckets {owned:?} at applied index {applied}",
                            m.penalty
                        ),
                    ));
                }
            }
        }

        // The quiet window: no owner or epoch changes anywhere.
        if let (Some(EndPhase::Quiet { .. }), Some(q)) = (self.end_phase(), &self.lease.quiet) {
            for (i, (b, (owner, epoch))) in s.buckets.iter().zip(&q.owners).enumerate() {
                if b.owner != *owner || b.epoch != *epoch {
                    return Err(Failure {
                        kind: FailureKind::Quiet,
                        time_ms: now,
                        message: format!(
                            "seed {seed}, t={now}ms: quiet violated: in a fault-free window after convergence, bucket {i} went from {:?}@{} to {:?}@{} on n{id} (applied index {applied})",
                            owner, epoch, b.owner, b.epoch
                        ),
                    });
                }
            }
        }
        self.push_assignments(id, None, false);
        // The controller's loop runs at once when its applied state moved
        // (`Ownership::run` wakes on the node's view).
        self.wake_at(id, self.now);
        Ok(())
    }

    fn end_phase(&self) -> Option<EndPhase> {
        match self.phase {
            Phase::End(p) => Some(p),
            _ => None,
        }
    }

    // ---- messaging -----------------------------------------------------------

    /// Incarnation of a running receiver, if it runs.
    fn lease_receiver(&self, to: u64) -> Option<u64> {
        if is_agent(to) {
            let h = self.hosts.get(self.host_by_id(to)?)?;
            h.agent.as_ref().map(|_| h.incarnation)
        } else {
            let n = self.nodes.get(&to)?;
            n.is_up().then_some(n.incarnation)
        }
    }

    fn label(&self, id: u64) -> String {
        match self.host_by_id(id) {
            Some(i) if is_agent(id) => self.hosts[i].name.clone(),
            _ => format!("n{id}"),
        }
    }

    fn lease_send(&mut self, from: u64, to: u64, msg: LeaseMsg) {
        let to_incarnation = self.lease_receiver(to);
        self.lease_send_to(from, to, to_incarnation, msg);
    }

    /// Answers a request from `to` in incarnation `to_incarnation`.
    fn lease_reply(&mut self, from: u64, to: u64, to_incarnation: u64, msg: LeaseMsg) {
        let current = self.lease_receiver(to).filter(|&i| i == to_incarnation);
        self.lease_send_to(from, to, current, msg);
    }

    fn lease_send_to(&mut self, from: u64, to: u64, to_incarnation: Option<u64>, msg: LeaseMsg) {
        self.stats.lease_messages += 1;
        let from_incarnation = self.lease_receiver(from).unwrap_or(0);
        let Some(to_incarnation) = to_incarnation else {
            if self.tracing() {
                let (a, b) = (self.label(from), self.label(to));
                self.trace_line(&a, || {
                    format!("send {} to {b} DROPPED (down)", msg.describe())
                });
            }
            return;
        };
        match self.net.route(&mut self.rng, from, to) {
            Route::Blocked | Route::Lost => {
                if self.tracing() {
                    let (a, b) = (self.label(from), self.label(to));
                    self.trace_line(&a, || {
                        format!("send {} to {b} LOST/BLOCKED", msg.describe())
                    });
                }
            }
            Route::Deliver(delays) => {
                if self.tracing() {
                    let (a, b) = (self.label(from), self.label(to));
                    self.trace_line(&a, || {
                        format!("send {} to {b} in {delays:?}ms", msg.describe())
                    });
                }
                let last = delays.len() - 1;
                let mut msg = Some(msg);
                for (i, d) in delays.into_iter().enumerate() {
                    let m = if i == last { msg.take() } else { msg.clone() };
                    if let Some(m) = m {
                        self.schedule(
                            self.now + d,
                            Event::Lease(LeaseEvent::Deliver {
                                from,
                                from_incarnation,
                                to,
                                to_incarnation,
                                msg: Box::new(m),
                            }),
                        );
                    }
                }
            }
        }
    }

    fn lease_deliver(
        &mut self,
        from: u64,
        from_incarnation: u64,
        to: u64,
        to_incarnation: u64,
        msg: Box<LeaseMsg>,
    ) -> Result<(), Failure> {
        if self.lease_receiver(to) != Some(to_incarnation) {
            return Ok(());
        }
        let paused_until = if is_agent(to) {
            self.host_by_id(to)
                .map_or(0, |i| self.hosts[i].paused_until)
        } else {
            self.nodes.get(&to).map_or(0, |n| n.paused_until)
        };
        if paused_until > self.now {
            // Waits in the socket buffer until the process runs again.
            let at = paused_until + self.rng.gen_range(0..5);
            self.schedule(
                at,
                Event::Lease(LeaseEvent::Deliver {
                    from,
                    from_incarnation,
                    to,
                    to_incarnation,
                    msg,
                }),
            );
            return Ok(());
        }
        if self.net.is_blocked(from, to) {
            return Ok(());
        }
        if self.tracing() {
            let (a, b) = (self.label(to), self.label(from));
            self.trace_line(&a, || format!("recv {} from {b}", msg.describe()));
        }
        if is_agent(to) {
            let Some(i) = self.host_by_id(to) else {
                return Ok(());
            };
            self.agent_recv(i, *msg);
            Ok(())
        } else {
            self.ctl_recv(to, from, from_incarnation, *msg)
        }
    }

    pub(super) fn lease_step(&mut self, ev: LeaseEvent) -> Result<(), Failure> {
        match ev {
            LeaseEvent::Deliver {
                from,
                from_incarnation,
                to,
                to_incarnation,
                msg,
            } => self.lease_deliver(from, from_incarnation, to, to_incarnation, msg),
            LeaseEvent::AgentStart { host, incarnation } => {
                let due = self.hosts.get(host).is_some_and(|h| {
                    h.incarnation == incarnation && h.agent.is_none() && !h.kept_dead
                });
                if due {
                    self.start_agent(host);
                }
                Ok(())
            }
            LeaseEvent::AgentRound { host, incarnation } => {
                self.agent_round(host, incarnation);
                Ok(())
            }
            LeaseEvent::AgentResume { host } => {
                if self
                    .hosts
                    .get(host)
                    .is_some_and(|h| h.paused_until == self.now && h.agent.is_some())
                {
                    self.trace_host(host, || "agent resumes".into());
                }
                Ok(())
            }
            LeaseEvent::Kernel {
                host,
                op,
                submitted,
            } => {
                self.kernel_land(host, op, submitted);
                Ok(())
            }
            LeaseEvent::Plan { node, incarnation } => self.plan_tick(node, incarnation, true),
            LeaseEvent::PlanWake { node, incarnation } => {
                let Some(c) = self.ctl.get_mut(&node) else {
                    return Ok(());
                };
                if c.wake_at != Some(self.now) {
                    // Superseded by an earlier one.
                    return Ok(());
                }
                c.wake_at = None;
                self.plan_tick(node, incarnation, false)
            }
            LeaseEvent::Resync { node, incarnation } => {
                let Some(n) = self.nodes.get(&node) else {
                    return Ok(());
                };
                if n.incarnation != incarnation || !n.is_up() {
                    return Ok(());
                }
                let period = self.ctl.get(&node).map_or(1000, |c| c.clock.true_ms(1000));
                self.schedule(
                    self.now + period,
                    Event::Lease(LeaseEvent::Resync { node, incarnation }),
                );
                if !self.is_paused(node) {
                    self.push_assignments(node, None, true);
                }
                Ok(())
            }
            LeaseEvent::Fault(f) => {
                if self.phase == Phase::Faults {
                    self.inject_agent(f)?;
                }
                Ok(())
            }
            LeaseEvent::RestartAfterRelease { host, down_ms } => {
                if self.phase != Phase::Faults || !self.hosts[host].running(self.now) {
                    return Ok(());
                }
                self.stats.lagging_restarts += 1;
                self.kill_agent(
                    host,
                    &format!(
                        "right after a release, while a controller lags; down for {down_ms}ms"
                    ),
                );
                let incarnation = self.hosts[host].incarnation;
                self.schedule(
                    self.now + down_ms,
                    Event::Lease(LeaseEvent::AgentStart { host, incarnation }),
                );
                Ok(())
            }
            LeaseEvent::Stop { host, ms, kill } => {
                if self.phase != Phase::Faults || !self.hosts[host].running(self.now) {
                    return Ok(());
                }
                if kill {
                    self.kill_agent(host, &format!("down for {ms}ms"));
                    let incarnation = self.hosts[host].incarnation;
                    self.schedule(
                        self.now + ms,
                        Event::Lease(LeaseEvent::AgentStart { host, incarnation }),
                    );
                } else {
                    self.pause_agent(host, ms);
                }
                Ok(())
            }
            LeaseEvent::FlapKill {
                host,
                left,
                up_ms,
                down_ms,
            } => {
                if left == 0 || self.phase != Phase::Faults {
                    return Ok(());
                }
                if self.hosts.get(host).is_some_and(|h| h.agent.is_some()) {
                    self.kill_agent(host, &format!("flapping, {left} more"));
                    let incarnation = self.hosts[host].incarnation;
                    self.schedule(
                        self.now + down_ms,
                        Event::Lease(LeaseEvent::AgentStart { host, incarnation }),
                    );
                }
                self.schedule(
                    self.now + down_ms + up_ms,
                    Event::Lease(LeaseEvent::FlapKill {
                        host,
                        left: left - 1,
                        up_ms,
                        down_ms,
                    }),
                );
                Ok(())
            }
        }
    }

    // ---- controllers ---------------------------------------------------------
}

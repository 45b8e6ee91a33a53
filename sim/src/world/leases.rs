//! Agents, leases and the ownership planner in the world.
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

    /// Streams the assignment at `id`'s applied index to every agent watching it
    /// (or only to `only`), when it changed or when `force`d.
    fn push_assignments(&mut self, id: u64, only: Option<usize>, force: bool) {
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

    fn ctl_recv(
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
    fn wake_at(&mut self, id: u64, at: u64) {
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
    fn plan_tick(&mut self, id: u64, incarnation: u64, periodic: bool) -> Result<(), Failure> {
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

    fn ownership_propose(&mut self, id: u64, cmd: Command) -> Result<(), Failure> {
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

    /// The controllers an agent's configuration file lists: a random
    /// non-empty subset of the cluster's voters (an operator seldom lists
    /// them all, and a config outlives additions); the engine learns the
    /// rest from the controllers' assignments.
    fn configured_seeds(&mut self) -> Vec<AgentController> {
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

    fn start_agent(&mut self, i: usize) {
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

    fn kill_agent(&mut self, i: usize, why: &str) {
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
    pub(super) fn agent_step(&mut self, i: usize, ev: AgentEvent) {
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
                } => self.kernel_submit(
                    i,
                    KernelOp::Install {
                        buckets,
                        timeout_ms,
                        member_epoch,
                    },
                ),
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

    fn agent_round(&mut self, i: usize, incarnation: u64) {
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

    fn agent_recv(&mut self, i: usize, msg: LeaseMsg) {
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

    fn random_host(&mut self, running: bool, prefer_owner: bool) -> Option<usize> {
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

    fn pause_agent(&mut self, i: usize, pause_ms: u64) {
        let until = self.now + pause_ms;
        self.hosts[i].paused_until = until;
        self.stats.agent_pauses += 1;
        self.trace_host(i, || format!("FAULT agent paused for {pause_ms}ms"));
        self.schedule(until, Event::Lease(LeaseEvent::AgentResume { host: i }));
    }

    fn operator_propose(&mut self, cmd: Command) -> Result<(), Failure> {
        let Some(l) = self.leader_for_change() else {
            return Ok(());
        };
        self.trace(Some(l), || format!("OPERATOR {cmd:?}"));
        self.ownership_propose(l, cmd)
    }

    fn inject_agent(&mut self, f: AgentFault) -> Result<(), Failure> {
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

    /// Agent network ids, for faults that cut whole hosts.
    pub(super) fn agent_ids(&self) -> Vec<u64> {
        self.hosts.iter().map(|h| h.id).collect()
    }

    // ---- end of run ----------------------------------------------------------

    /// End of the faults: every agent resumes, dead agents restart, and sometimes
    /// one agent is killed for good (its buckets must fail over).
    pub(super) fn agents_heal(&mut self) {
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
    pub(super) fn restart_stranded_agents(&mut self) {
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
    pub(super) fn agents_after_live(&mut self) -> bool {
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
    fn converge_bound(&self) -> (u64, String) {
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
    pub(super) fn end_probe(&mut self, phase: EndPhase) -> Result<(), Failure> {
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
    fn damped(&self, m: &Member, d: Damping, margin: u64) -> bool {
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
    pub(super) fn check_leases(&mut self) -> Result<(), Failure> {
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

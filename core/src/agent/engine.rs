//! The agent's state machine: events in, commands out (see the module diagram).

use std::collections::{BTreeMap, BTreeSet};

use super::{AgentState, Assignment, Controller};
use crate::lease::{majority, AgentLease, LeaseTiming};

/// A controller's answer to one heartbeat round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub controller: u64,
    pub round: u64,
    pub acked: bool,
    /// The member's epoch in that controller's applied state.
    pub member_epoch: u64,
    /// The leader that controller knows of (0: none).
    pub leader: u64,
    /// The lease the ack promises (0: not said).
    pub lease_ms: u64,
    /// Refused because the heartbeat's assignment is older than a release:
    /// not a refusal for good (see [`crate::lease::Refusal::StaleAssignment`]).
    pub stale_assignment: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The heartbeat timer fired (every `timing().heartbeat_ms`).
    Tick,
    Reply(Reply),
    Assignment {
        controller: u64,
        assignment: Assignment,
    },
    /// The kernel applied a [`Command::Withdraw`].
    Withdrawn {
        bucket: u32,
        epoch: u64,
    },
    /// The host was suspended (or its VM paused): its kernel timers stood still,
    /// so what the kernel holds may outlast the lease the controllers promised.
    Resumed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Write and fsync this state before carrying out the commands after it.
    Persist(AgentState),
    Heartbeat {
        round: u64,
        epoch: u64,
        /// Applied index of the assignment it acts on (0: none yet).
        assignment_index: u64,
        to: Vec<u64>,
    },
    /// Replace the kernel set by these (bucket, grant epoch), each timing out
    /// `timeout_ms` after it is written (nothing: accept no bucket).
    Install {
        buckets: Vec<(u32, u64)>,
        timeout_ms: u64,
        member_epoch: u64,
    },
    /// Remove one bucket from the kernel now; answer [`Event::Withdrawn`] once
    /// the kernel applied it.
    Withdraw { bucket: u32, epoch: u64 },
    /// Tell the controllers these releases are out of the kernel.
    Released {
        buckets: Vec<(u32, u64)>,
        to: Vec<u64>,
    },
    /// Heartbeat and watch exactly these controllers from now on.
    Watch { controllers: Vec<Controller> },
}

/// Deliberate bugs for the simulator to catch: settable only with the
/// `faults` feature, which only the simulator enables.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentFaults {
    /// Never emit [`Command::Persist`]: a restart forgets everything.
    pub skip_persist: bool,
    /// A release does not raise the bucket's floor.
    pub forget_releases: bool,
    /// Keep heartbeating an epoch a majority refuses for good.
    pub never_yield: bool,
}

/// One agent process's decisions; a restart starts a new one from the
/// persisted [`AgentState`].
#[derive(Debug, Clone)]
pub struct Engine {
    /// 0 until a controller tells us.
    epoch: u64,
    lease: AgentLease,
    state: AgentState,
    state_changed: bool,
    /// Floors raised only for buckets granted: written after the commands of
    /// this step (nothing depends on them being durable first).
    state_raised: bool,
    controllers: Vec<Controller>,
    /// The newest assignment accepted (highest applied index at `epoch`).
    assignment: Option<Assignment>,
    /// What the last install put in the kernel.
    installed: Vec<(u32, u64)>,
    /// Releases handed to the kernel, and those it applied (confirmable).
    withdrawing: BTreeSet<(u32, u64)>,
    withdrawn: BTreeSet<(u32, u64)>,
    /// Voters that refused a round at the current epoch, by round.
    refusals: BTreeMap<u64, BTreeSet<u64>>,
    /// First round sent at the current epoch.
    epoch_round: Option<u64>,
    /// Until then no heartbeats: the epoch is refused for good, so it lets
    /// every promise run out to be fenced.
    silent_until: Option<u64>,
    out: Vec<Command>,
    faults: AgentFaults,
}

impl Engine {
    /// `seeds`: the controllers of the configuration file, talked to (with
    /// those the persisted state lists, for ids the file does not name) until
    /// an assignment lists the cluster's; `state`: as last persisted.
    pub fn new(mut seeds: Vec<Controller>, state: AgentState) -> Self {
        for (&id, address) in &state.controllers {
            if !seeds.iter().any(|c| c.id == id) {
                seeds.push(Controller {
                    id,
                    address: address.clone(),
                    voter: state.voters.contains(&id),
                });
            }
        }
        let timing = state.timing.unwrap_or_default();
        Engine {
            epoch: 0,
            lease: AgentLease::new(timing, state.voters.clone()),
            state,
            state_changed: false,
            state_raised: false,
            controllers: seeds,
            assignment: None,
            installed: Vec::new(),
            withdrawing: BTreeSet::new(),
            withdrawn: BTreeSet::new(),
            refusals: BTreeMap::new(),
            epoch_round: None,
            silent_until: None,
            out: Vec::new(),
            faults: AgentFaults::default(),
        }
    }

    #[cfg(feature = "faults")]
    pub fn set_faults(&mut self, faults: AgentFaults) {
        self.faults = faults;
    }

    fn fault(&self, f: impl Fn(&AgentFaults) -> bool) -> bool {
        f(&self.faults)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The cluster's timing if known, else the default (heartbeat period only).
    pub fn timing(&self) -> LeaseTiming {
        self.lease.timing()
    }

    pub fn state(&self) -> &AgentState {
        &self.state
    }

    pub fn assignment(&self) -> Option<&Assignment> {
        self.assignment.as_ref()
    }

    pub fn controllers(&self) -> &[Controller] {
        &self.controllers
    }

    pub fn watches(&self, controller: u64) -> bool {
        self.controllers.iter().any(|c| c.id == controller)
    }

    /// Until when it stays silent to be fenced (see [`Engine::step`] on refusals).
    pub fn silent_until(&self) -> Option<u64> {
        self.silent_until
    }

    pub fn lease_valid(&self, now: u64) -> bool {
        self.lease.valid(now)
    }

    pub fn lease_expiry(&self) -> Option<u64> {
        self.lease.expiry()
    }

    /// When the heartbeat round that earned the lease was sent (agent clock).
    pub fn lease_earned_at(&self) -> Option<u64> {
        self.lease.earned_at()
    }

    /// Kernel timeout to write now (lease left minus the kernel delay).
    pub fn kernel_timeout_ms(&self, now: u64) -> Option<u64> {
        self.lease.kernel_timeout_ms(now)
    }

    /// What the last install put in the kernel.
    pub fn installed(&self) -> &[(u32, u64)] {
        &self.installed
    }

    /// Whether nothing is owned or being released (a drain is complete).
    pub fn holds_nothing(&self) -> bool {
        self.assignment
            .as_ref()
            .is_none_or(|a| a.owned.is_empty() && a.release.is_empty())
    }

    /// Feed one event at agent-clock time `now`; carry out the answer in order.
    pub fn step(&mut self, now: u64, ev: Event) -> Vec<Command> {
        match ev {
            Event::Tick => self.tick(now),
            Event::Reply(r) => self.reply(now, r),
            Event::Assignment {
                controller,
                assignment,
            } => self.on_assignment(now, controller, assignment),
            Event::Resumed => {
                // Withdraw before anything else; a new majority gives a new lease.
                self.lease.revoke();
                self.installed.clear();
                self.out.push(Command::Install {
                    buckets: Vec::new(),
                    timeout_ms: 0,
                    member_epoch: self.epoch,
                });
            }
            Event::Withdrawn { bucket, epoch } => {
                self.withdrawing.remove(&(bucket, epoch));
                self.withdrawn.insert((bucket, epoch));
                let to = self.ids();
                self.out.push(Command::Released {
                    buckets: vec![(bucket, epoch)],
                    to,
                });
            }
        }
        let mut out = std::mem::take(&mut self.out);
        let raised = std::mem::take(&mut self.state_raised);
        if std::mem::take(&mut self.state_changed) && !self.fault(|f| f.skip_persist) {
            out.insert(0, Command::Persist(self.state.clone()));
        } else if raised && !self.fault(|f| f.skip_persist) {
            out.push(Command::Persist(self.state.clone()));
        }
        out
    }

    fn ids(&self) -> Vec<u64> {
        self.controllers.iter().map(|c| c.id).collect()
    }

    fn tick(&mut self, now: u64) {
        if self.silent_until.is_some_and(|t| now < t) {
            return;
        }
        let round = self.lease.start_round(now);
        self.epoch_round.get_or_insert(round);
        let to = self.ids();
        self.out.push(Command::Heartbeat {
            round,
            epoch: self.epoch,
            assignment_index: self.assignment.as_ref().map_or(0, |a| a.applied_index),
            to: to.clone(),
        });
        let confirm = self.confirmable();
        if !confirm.is_empty() {
            self.out.push(Command::Released {
                buckets: confirm,
                to,
            });
        }
    }

    fn reply(&mut self, now: u64, r: Reply) {
        if r.member_epoch > self.epoch {
            self.adopt_epoch(r.member_epoch);
            return;
        }
        if r.acked {
            // No lease before the cluster's timing is known.
            if r.member_epoch == self.epoch
                && self.state.timing.is_some()
                && self.lease.ack(r.round, r.controller, r.lease_ms).is_some()
            {
                self.extend(now);
            }
        } else if !self.fault(|f| f.never_yield)
            && !r.stale_assignment
            && self.epoch > 0
            && r.member_epoch == self.epoch
            && self.epoch_round.is_some_and(|first| r.round >= first)
            && (self.refused(r.round, r.controller)
                || (r.leader == r.controller && self.state.voters.contains(&r.controller)))
        {
            // Refused for good at the current epoch (fence marks of rounds that
            // never completed, or eviction), by a majority or by the leader. A
            // majority: no lease is possible any more, but a leader in the
            // minority that still acks never fences it. The leader: it sees the
            // member silent, so it can neither fence it (the others ack) nor move
            // its buckets. Either way, go silent until every promise ran out and
            // the leader fences it: until the stream shows the new epoch, or
            // after a while (a fence can wait for the mass-failure interval).
            let quiet = 10_000 + 2 * self.lease.timing().controller_promise_ms();
            self.silent_until = Some(now + quiet);
            self.refusals.clear();
        }
    }

    /// Whether so many voters refused `round` at the current epoch that the
    /// others can no longer make a majority.
    fn refused(&mut self, round: u64, controller: u64) -> bool {
        let voters = if self.state.voters.is_empty() {
            self.ids().into_iter().collect()
        } else {
            self.state.voters.clone()
        };
        if !voters.contains(&controller) {
            return false;
        }
        let set = self.refusals.entry(round).or_default();
        set.insert(controller);
        let n = set.len();
        while self.refusals.len() > 16 {
            self.refusals.pop_first();
        }
        n == voters.len() + 1 - majority(voters.len())
    }

    /// The member was fenced (a newer epoch exists): drop the lease and the buckets.
    fn adopt_epoch(&mut self, new: u64) {
        let old = self.epoch;
        self.lease.revoke();
        self.epoch = new;
        self.assignment = None;
        self.withdrawing.clear();
        self.withdrawn.clear();
        self.refusals.clear();
        self.silent_until = None;
        self.epoch_round = None;
        if old > 0 {
            self.installed.clear();
            self.out.push(Command::Install {
                buckets: Vec::new(),
                timeout_ms: 0,
                member_epoch: new,
            });
        }
    }

    /// Owned in the newest assignment, not below its floor, not being released.
    fn desired(&self) -> Vec<(u32, u64)> {
        let Some(a) = &self.assignment else {
            return Vec::new();
        };
        a.owned
            .iter()
            .map(|(&b, &e)| (b, e))
            .filter(|&(b, e)| self.state.admits(b, e))
            .filter(|g| !self.withdrawing.contains(g))
            .collect()
    }

    fn confirmable(&self) -> Vec<(u32, u64)> {
        self.assignment.as_ref().map_or(Vec::new(), |a| {
            a.release
                .iter()
                .map(|(&b, &e)| (b, e))
                .filter(|g| self.withdrawn.contains(g))
                .collect()
        })
    }

    /// A majority acked a round: renew the kernel set with the lease's timeout.
    fn extend(&mut self, now: u64) {
        let Some(timeout_ms) = self.lease.kernel_timeout_ms(now) else {
            return;
        };
        let desired = self.desired();
        if desired.is_empty() && self.installed.is_empty() {
            return;
        }
        self.installed = desired.clone();
        self.out.push(Command::Install {
            buckets: desired,
            timeout_ms,
            member_epoch: self.epoch,
        });
    }

    fn on_assignment(&mut self, now: u64, controller: u64, asg: Assignment) {
        // An assignment from a controller without state yet (no controllers)
        // says nothing; taking it would leave the agent talking to nobody.
        if !self.watches(controller) || asg.member_epoch < self.epoch || asg.controllers.is_empty()
        {
            return;
        }
        if asg.member_epoch > self.epoch {
            self.adopt_epoch(asg.member_epoch);
        }
        if self
            .assignment
            .as_ref()
            .is_some_and(|cur| cur.applied_index >= asg.applied_index)
        {
            return;
        }
        if let Some(t) = asg.timing.filter(|t| self.state.timing != Some(*t)) {
            self.lease.set_timing(t);
            self.state.timing = Some(t);
            self.state_changed = true;
        }
        let voters = asg.voters();
        if !voters.is_empty() && voters != self.state.voters {
            // Acks counted against another voter set prove nothing now.
            self.lease.revoke();
            self.lease.set_voters(voters.clone());
            self.state.voters = voters;
            self.state_changed = true;
        }
        let listed: BTreeMap<u64, String> = asg
            .controllers
            .iter()
            .map(|c| (c.id, c.address.clone()))
            .collect();
        if !listed.is_empty() && listed != self.state.controllers {
            self.state.controllers = listed;
            self.state_changed = true;
        }
        if asg.controllers != self.controllers {
            self.controllers = asg.controllers.clone();
            self.out.push(Command::Watch {
                controllers: asg.controllers.clone(),
            });
        }
        for (&b, &e) in &asg.owned {
            self.state_raised |= self.state.raise(b, e);
        }
        let mut withdraw = Vec::new();
        for (&b, &e) in &asg.release {
            if !self.fault(|f| f.forget_releases) {
                self.state_changed |= self.state.raise(b, e + 1);
            }
            if !self.withdrawn.contains(&(b, e)) && self.withdrawing.insert((b, e)) {
                withdraw.push((b, e));
            }
        }
        self.assignment = Some(asg);
        for (bucket, epoch) in withdraw {
            self.out.push(Command::Withdraw { bucket, epoch });
        }
        if self.lease.valid(now) {
            let desired = self.desired();
            if desired != self.installed {
                if let Some(timeout_ms) = self.lease.kernel_timeout_ms(now) {
                    self.installed = desired.clone();
                    self.out.push(Command::Install {
                        buckets: desired,
                        timeout_ms,
                        member_epoch: self.epoch,
                    });
                }
            }
        }
    }
}

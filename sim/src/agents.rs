//! Node agents, their clocks and their kernel filters, and the messages of the
//! lease protocol. The world (`world/leases.rs`) drives them; this module holds
//! the model's state and the parts of it that need no world.
//!
//! - **Clock** ([`Clock`]): every host (agent or controller) has a monotonic
//!   clock running at `1 + ppm / 10^6` times true time, with `|ppm| <= rho`.
//! - **Kernel** ([`Kernel`]): the nftables set of one host, as bucket -> expiry
//!   in *true* time. An install replaces the whole set (`flush set` + elements
//!   with a timeout, as the Linux data plane does) and the timeout counts on the
//!   host's clock from the moment the kernel applies it. Operations reach the
//!   kernel in the order the agent issued them, each after a delay of at most
//!   `kernel_delay_ms` (delta). The kernel keeps enforcing while the agent is
//!   stopped or dead.
//! - **Agent**: the process runs the shipping decision code,
//!   [`vipshare_core::agent::Engine`]; a kill loses it. What survives a kill is
//!   on [`Host`]: the kernel set and the agent's state file
//!   ([`vipshare_core::agent::AgentState`], as last persisted).

use std::collections::BTreeMap;

use vipshare_core::agent::{AgentState, Assignment, Engine, Reply};
use vipshare_core::heartbeat::Heartbeat;

/// Network ids of agents start here (controllers use small ids).
pub const AGENT_ID_BASE: u64 = 1000;

/// A host's monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    /// Rate error in parts per million: the clock advances `1 + ppm/10^6` ms per
    /// true ms.
    pub ppm: i64,
    /// Reading at true time 0.
    pub offset: u64,
}

impl Clock {
    pub fn new(ppm: i64, offset: u64) -> Self {
        Clock { ppm, offset }
    }

    /// The clock's reading at true time `t` (rounded down: monotonic).
    pub fn local(&self, t: u64) -> u64 {
        let scaled = i128::from(t) * (1_000_000 + i128::from(self.ppm)) / 1_000_000;
        self.offset + scaled as u64
    }

    /// True time this clock takes to advance `d` ms, rounded up (a timeout of `d`
    /// on this clock ends no earlier than this).
    pub fn true_ms(&self, d: u64) -> u64 {
        let num = i128::from(d) * 1_000_000;
        let den = 1_000_000 + i128::from(self.ppm);
        ((num + den - 1) / den) as u64
    }
}

/// One element of a kernel set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelEntry {
    /// True time the element times out (accepting while `now < until`).
    pub until: u64,
    /// True time this run of acceptance began (for reports).
    pub since: u64,
    /// The grant it was installed for.
    pub bucket_epoch: u64,
    pub member_epoch: u64,
}

/// An operation the agent hands to the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelOp {
    /// Replace the set by these buckets, each timing out `timeout_ms` (host clock)
    /// after the kernel applies it.
    Install {
        buckets: Vec<(u32, u64)>,
        timeout_ms: u64,
        member_epoch: u64,
        /// Agent-clock time the heartbeat round that earned the lease was sent.
        earned: u64,
    },
    /// Remove one bucket now (planned release); the agent confirms it once the
    /// kernel applied it.
    Withdraw {
        bucket: u32,
        epoch: u64,
        incarnation: u64,
    },
}

/// The kernel filter of one host.
#[derive(Debug, Clone, Default)]
pub struct Kernel {
    pub set: BTreeMap<u32, KernelEntry>,
    /// True time the last issued operation lands; later ones never overtake it.
    pub last_land: u64,
    /// True time until which a stalled install still has effects: its landing,
    /// and after a late ack the rewrite's landing plus a heartbeat and a kernel
    /// delay (writes queued behind a stall are still the fault's effect).
    pub stalled_until: u64,
    /// Agent-clock time the heartbeat round behind the last landed install
    /// was sent.
    pub earned: u64,
    /// Per bucket, when this host last stopped accepting it, and whether it was
    /// because the element timed out (rather than being withdrawn or replaced).
    pub ended: BTreeMap<u32, (u64, bool)>,
}

impl Kernel {
    pub fn accepts(&self, bucket: u32, now: u64) -> Option<&KernelEntry> {
        self.set.get(&bucket).filter(|e| e.until > now)
    }

    /// Buckets accepting new flows at `now`.
    pub fn accepting(&self, now: u64) -> impl Iterator<Item = (u32, &KernelEntry)> {
        self.set
            .iter()
            .filter(move |(_, e)| e.until > now)
            .map(|(&b, e)| (b, e))
    }

    /// When this host last stopped accepting `bucket` (as of `now`, while it does
    /// not accept it), and whether by timing out.
    pub fn last_end(&self, bucket: u32, now: u64) -> Option<(u64, bool)> {
        match self.set.get(&bucket) {
            Some(e) if e.until <= now => Some((e.until, true)),
            _ => self.ended.get(&bucket).copied(),
        }
    }

    fn end(&mut self, bucket: u32, e: &KernelEntry, now: u64) {
        let end = if e.until <= now {
            (e.until, true)
        } else {
            (now, false)
        };
        self.ended.insert(bucket, end);
    }

    /// `flush set` + add the elements with a timeout ending at true time `until`.
    pub fn install(&mut self, now: u64, buckets: &[(u32, u64)], until: u64, member_epoch: u64) {
        let old = std::mem::take(&mut self.set);
        for (b, e) in &old {
            if e.until <= now || !buckets.iter().any(|g| g.0 == *b) {
                self.end(*b, e, now);
            }
        }
        for &(b, bucket_epoch) in buckets {
            let since = old
                .get(&b)
                .filter(|e| e.until > now)
                .map_or(now, |e| e.since);
            self.set.insert(
                b,
                KernelEntry {
                    until,
                    since,
                    bucket_epoch,
                    member_epoch,
                },
            );
        }
    }

    pub fn withdraw(&mut self, bucket: u32, now: u64) {
        if let Some(e) = self.set.remove(&bucket) {
            self.end(bucket, &e, now);
        }
    }

    /// Forget elements that timed out (they accept nothing any more).
    pub fn expire(&mut self, now: u64) {
        let gone: Vec<(u32, KernelEntry)> = self
            .set
            .iter()
            .filter(|(_, e)| e.until <= now)
            .map(|(&b, &e)| (b, e))
            .collect();
        for (b, e) in gone {
            self.set.remove(&b);
            self.end(b, &e, now);
        }
    }
}

/// A message of the lease protocol (agent API and controller fencing RPCs).
#[derive(Debug, Clone)]
pub enum LeaseMsg {
    Heartbeat {
        round: u64,
        hb: Heartbeat,
    },
    HeartbeatReply(Reply),
    Assignment {
        controller: u64,
        assignment: Box<Assignment>,
    },
    Released {
        member: String,
        buckets: Vec<(u32, u64)>,
    },
    FenceRequest {
        round: u64,
        member: String,
        epoch: u64,
        /// False: could it agree (records nothing); true: agree for real.
        commit: bool,
    },
    FenceReply {
        round: u64,
        controller: u64,
        agreed: bool,
        commit: bool,
        /// A refusal: how long until its promise runs out (the controller's
        /// `FenceReply::retry_after_ms`).
        wait_ms: Option<u64>,
    },
}

impl LeaseMsg {
    pub fn describe(&self) -> String {
        match self {
            LeaseMsg::Heartbeat { round, hb } => {
                format!("Heartbeat {}@{} round {round}", hb.member, hb.epoch)
            }
            LeaseMsg::HeartbeatReply(r) => format!(
                "HeartbeatReply n{} round {} acked={} epoch={} leader=n{}",
                r.controller, r.round, r.acked, r.member_epoch, r.leader
            ),
            LeaseMsg::Assignment {
                controller,
                assignment: a,
            } => format!(
                "Assignment n{controller} applied={} epoch={} owned={:?} release={:?}",
                a.applied_index,
                a.member_epoch,
                a.owned.keys().collect::<Vec<_>>(),
                a.release.keys().collect::<Vec<_>>()
            ),
            LeaseMsg::Released { member, buckets } => format!("Released {member} {buckets:?}"),
            LeaseMsg::FenceRequest {
                round,
                member,
                epoch,
                commit,
            } => format!("FenceRequest {round} {member}@{epoch} commit={commit}"),
            LeaseMsg::FenceReply {
                round,
                controller,
                agreed,
                commit,
                wait_ms,
            } => format!(
                "FenceReply {round} n{controller} agreed={agreed} commit={commit} wait={wait_ms:?}"
            ),
        }
    }
}

/// One agent host.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    /// Network id.
    pub id: u64,
    pub clock: Clock,
    pub kernel: Kernel,
    /// The agent process; `None` while it is dead.
    pub agent: Option<Engine>,
    /// Bumped at every (re)start; stale timers and replies carry an older one.
    pub incarnation: u64,
    pub paused_until: u64,
    /// The agent's state file, as last persisted (fsync'd).
    pub state_file: AgentState,
    /// Kept dead through the end of the run (failover must still converge).
    pub kept_dead: bool,
}

impl Host {
    pub fn is_up(&self) -> bool {
        self.agent.is_some()
    }

    pub fn running(&self, now: u64) -> bool {
        self.agent.is_some() && self.paused_until <= now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_drift_within_their_rate_and_timeouts_round_up() {
        let slow = Clock::new(-10_000, 0);
        let fast = Clock::new(10_000, 7);
        assert_eq!(slow.local(1000), 990);
        assert_eq!(fast.local(1000), 1017);
        // 500 ms on a 1% slow clock take 505.05.. true ms: rounded up.
        assert_eq!(slow.true_ms(500), 506);
        assert_eq!(fast.true_ms(505), 500);
        for t in [0, 1, 99, 12345] {
            assert!(slow.local(t + slow.true_ms(100)) >= slow.local(t) + 100);
        }
    }

    #[test]
    fn install_replaces_the_set_and_keeps_when_acceptance_began() {
        let mut k = Kernel::default();
        k.install(10, &[(1, 1), (2, 1)], 500, 1);
        k.install(100, &[(2, 1), (3, 1)], 600, 1);
        assert!(k.accepts(1, 100).is_none());
        assert_eq!(k.accepts(2, 599).map(|e| e.since), Some(10));
        assert!(k.accepts(3, 600).is_none(), "half-open: not at its expiry");
        k.withdraw(2, 200);
        assert_eq!(k.accepting(200).map(|(b, _)| b).collect::<Vec<_>>(), [3]);
        assert_eq!(k.last_end(1, 200), Some((100, false)), "replaced away");
        assert_eq!(k.last_end(2, 200), Some((200, false)), "withdrawn");
        assert_eq!(k.last_end(3, 700), Some((600, true)), "timed out");
        k.expire(700);
        assert_eq!(k.last_end(3, 700), Some((600, true)));
    }
}

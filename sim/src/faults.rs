//! The fault schedule ("nemesis"), generated up front from the seed.
//!
//! The plan fixes *when* each fault happens, what kind it is and how long it lasts.
//! *Whom* it hits is resolved when it fires ([`Target`]), from the world as it is
//! then (the current leader, a random follower...), still with the seeded RNG, so a
//! run is fully determined by its seed.
//!
//! Guard rails applied when a fault fires (see `world.rs`): a crash that would take
//! down a majority of the voters only goes ahead when the plan says
//! `allow_quorum_loss` (about one crash in eight, and then only briefly); the
//! controller set stays between 3 and `nodes + 2` voters.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::network::NetProfile;

/// Who a fault hits, resolved when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The current leader (a random node if there is none).
    Leader,
    /// A random node that is not the leader.
    Follower,
    /// Any node.
    Any,
}

/// Direction of an asymmetric partition around one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The node hears nobody, but everybody hears it.
    Deaf,
    /// Nobody hears the node, but it hears everybody.
    Mute,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Power loss: the process dies, unsynced writes are lost; restarts after `down_ms`.
    Crash {
        target: Target,
        down_ms: u64,
        allow_quorum_loss: bool,
    },
    /// The next fsync fails: the node dies in the middle of a Ready round, leaving a
    /// torn write; restarts after `down_ms`.
    FsyncFailure { target: Target, down_ms: u64 },
    /// The process freezes (GC pause, VM migration): no ticks, no messages in or out.
    Pause { target: Target, pause_ms: u64 },
    /// One node cut off from everyone, both ways.
    Isolate { target: Target, duration_ms: u64 },
    /// One node cut off in one direction only.
    OneWay {
        target: Target,
        direction: Direction,
        duration_ms: u64,
    },
    /// The nodes split into two random groups (possibly neither with a majority).
    Split { duration_ms: u64 },
    /// A random pair of nodes where the first can reach the second but not back.
    OneWayPair { duration_ms: u64 },
    /// The network turns lossy / slow / reordering for a while.
    Network {
        profile: NetProfile,
        duration_ms: u64,
    },
    /// A new controller (fresh id, empty disk) joins through a configuration change.
    AddController,
    /// A controller leaves through a configuration change, then is stopped.
    RemoveController { target: Target },
}

/// The whole schedule: faults in time order.
#[derive(Debug, Clone)]
pub struct FaultPlan {
    pub faults: Vec<(u64, Fault)>,
}

impl FaultPlan {
    /// Faults between 500 ms and `duration_ms`, one every `mean_gap_ms` on average.
    pub fn generate(rng: &mut ChaCha8Rng, duration_ms: u64, mean_gap_ms: u64) -> Self {
        let mut faults = Vec::new();
        let mut t = 500 + rng.gen_range(0..mean_gap_ms);
        while t < duration_ms {
            faults.push((t, random_fault(rng)));
            t += rng.gen_range(mean_gap_ms / 4..mean_gap_ms * 7 / 4);
        }
        FaultPlan { faults }
    }
}

fn target(rng: &mut ChaCha8Rng) -> Target {
    match rng.gen_range(0..5) {
        0 | 1 => Target::Leader,
        2 => Target::Follower,
        _ => Target::Any,
    }
}

fn random_fault(rng: &mut ChaCha8Rng) -> Fault {
    // Weights: crash 22, fsync 6, pause 7, isolate 12, one-way 10, split 8,
    // one-way pair 5, network 14, add 8, remove 8.
    let roll = rng.gen_range(0..100);
    match roll {
        0..=21 => {
            let allow_quorum_loss = rng.gen_ratio(1, 8);
            let down_ms = if allow_quorum_loss {
                rng.gen_range(300..2500)
            } else {
                rng.gen_range(200..8000)
            };
            Fault::Crash {
                target: target(rng),
                down_ms,
                allow_quorum_loss,
            }
        }
        22..=27 => Fault::FsyncFailure {
            target: target(rng),
            down_ms: rng.gen_range(200..5000),
        },
        28..=34 => Fault::Pause {
            target: target(rng),
            pause_ms: rng.gen_range(200..3000),
        },
        35..=46 => Fault::Isolate {
            target: target(rng),
            duration_ms: rng.gen_range(500..6000),
        },
        47..=56 => Fault::OneWay {
            target: target(rng),
            direction: if rng.gen_bool(0.5) {
                Direction::Deaf
            } else {
                Direction::Mute
            },
            duration_ms: rng.gen_range(500..6000),
        },
        57..=64 => Fault::Split {
            duration_ms: rng.gen_range(500..5000),
        },
        65..=69 => Fault::OneWayPair {
            duration_ms: rng.gen_range(500..6000),
        },
        70..=83 => Fault::Network {
            profile: NetProfile::random(rng),
            duration_ms: rng.gen_range(1000..8000),
        },
        84..=91 => Fault::AddController,
        _ => Fault::RemoveController {
            target: target(rng),
        },
    }
}

/// A fault (or operator action) aimed at the node agents and their links to the
/// controllers. Which agent it hits is resolved when it fires.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentFault {
    /// SIGSTOP: no heartbeat rounds, no processing; the kernel keeps enforcing the
    /// timeouts it has.
    Pause { pause_ms: u64 },
    /// The agent process dies and restarts after `down_ms` with a fresh lease; the
    /// kernel set stays until its elements time out.
    Kill { down_ms: u64 },
    /// Repeated kill and restart (a crash-looping agent).
    Flap {
        cycles: u32,
        up_ms: u64,
        down_ms: u64,
    },
    /// The agent and the raft leader cannot reach each other; the agent still
    /// reaches the other controllers.
    CutFromLeader { duration_ms: u64 },
    /// The agent is cut from the leader (reaching the others, so it keeps its
    /// lease), and after `stop_after_ms` its process stops (SIGSTOP for
    /// `stop_ms`, or killed and restarted after `stop_ms`): it cannot react to
    /// being fenced, while its kernel keeps the last lease it installed.
    CutFromLeaderThenStop {
        duration_ms: u64,
        stop_after_ms: u64,
        stop_ms: u64,
        kill: bool,
    },
    /// One direction only between the agent and the leader.
    OneWayLeader {
        agent_to_leader: bool,
        duration_ms: u64,
    },
    /// The agent reaches no controller.
    Isolate { duration_ms: u64 },
    /// The agent is cut from a random subset of the controllers (one way or both).
    CutSome { one_way: bool, duration_ms: u64 },
    /// Operator: drain a member (its buckets move away by release and transfer).
    Drain,
    /// Operator: undrain a draining member.
    Undrain,
    /// Operator: change a member's weight.
    SetWeight { weight: u32 },
    /// A member's buckets are released (the operator drains it, or sets its
    /// weight to 0) while one controller (not the leader) is cut off from the
    /// other controllers for `lag_ms`, so it lags behind with the member's old
    /// assignment; right after the agent confirms a release (sends
    /// `Released`), it is killed and restarted `down_ms` later, and may first
    /// hear the lagging controller.
    RestartAgainstLaggingController {
        drain: bool,
        lag_ms: u64,
        down_ms: u64,
    },
}

/// The agents' schedule: faults in time order.
#[derive(Debug, Clone)]
pub struct AgentFaultPlan {
    pub faults: Vec<(u64, AgentFault)>,
}

impl AgentFaultPlan {
    /// Agent faults between 1 s and `duration_ms`, one every `mean_gap_ms` on average.
    pub fn generate(rng: &mut ChaCha8Rng, duration_ms: u64, mean_gap_ms: u64) -> Self {
        let mut faults = Vec::new();
        let mut t = 1000 + rng.gen_range(0..mean_gap_ms);
        while t < duration_ms {
            faults.push((t, random_agent_fault(rng)));
            t += rng.gen_range(mean_gap_ms / 4..mean_gap_ms * 7 / 4);
        }
        AgentFaultPlan { faults }
    }
}

fn random_agent_fault(rng: &mut ChaCha8Rng) -> AgentFault {
    // Weights: pause 10, kill 10, flap 6, cut from leader 10, cut from leader
    // then stop 14, one-way leader 10, isolate 8, cut some 8, drain 8, undrain 8,
    // weight 8, restart against a lagging controller 6.
    match rng.gen_range(0..106) {
        0..=9 => AgentFault::Pause {
            pause_ms: rng.gen_range(100..3000),
        },
        10..=19 => AgentFault::Kill {
            down_ms: rng.gen_range(100..6000),
        },
        20..=25 => AgentFault::Flap {
            cycles: rng.gen_range(3..8),
            up_ms: rng.gen_range(200..2000),
            down_ms: rng.gen_range(50..1500),
        },
        26..=35 => AgentFault::CutFromLeader {
            duration_ms: rng.gen_range(300..6000),
        },
        36..=49 => AgentFault::CutFromLeaderThenStop {
            duration_ms: rng.gen_range(1000..6000),
            stop_after_ms: rng.gen_range(250..480),
            stop_ms: rng.gen_range(300..3000),
            kill: rng.gen_ratio(1, 3),
        },
        50..=59 => AgentFault::OneWayLeader {
            agent_to_leader: rng.gen_bool(0.5),
            duration_ms: rng.gen_range(300..6000),
        },
        60..=67 => AgentFault::Isolate {
            duration_ms: rng.gen_range(300..6000),
        },
        68..=75 => AgentFault::CutSome {
            one_way: rng.gen_bool(0.5),
            duration_ms: rng.gen_range(300..6000),
        },
        76..=83 => AgentFault::Drain,
        84..=91 => AgentFault::Undrain,
        92..=99 => AgentFault::SetWeight {
            weight: if rng.gen_ratio(1, 10) {
                0
            } else {
                rng.gen_range(1..=8)
            },
        },
        _ => AgentFault::RestartAgainstLaggingController {
            drain: rng.gen_ratio(2, 3),
            lag_ms: rng.gen_range(1000..5000),
            down_ms: rng.gen_range(0..=200),
        },
    }
}

//! `vipshare-sim`: a deterministic simulator for vipshare's controllers, node
//! agents and bucket leases.
//!
//! It runs N controller replicas — the real [`vipshare_core::replica::Replica`] and
//! state machine, unmodified — on one thread, against a simulated disk and a
//! simulated network, in virtual time, all from one `u64` seed. The same seed
//! always produces the same run, byte for byte: every random choice comes from one
//! ChaCha8 stream (the fault plans from other streams of the same seed), every
//! collection the simulator iterates is ordered, and no wall clock is read. Raft's
//! own election randomness is neutralised by the replica's configuration
//! (`max_election_tick = election_tick + 1`); elections are decided by the tick
//! phases the simulator draws.
//!
//! # Model
//!
//! - **Clock and ticks** ([`world`]): virtual milliseconds. Each node ticks every
//!   `tick_ms` (±3%, a slightly fast or slow clock), starting at a random phase,
//!   redrawn at every restart.
//! - **Disk** ([`disk`]): writes are pending until `sync`; a crash keeps a random
//!   ordered prefix of the pending writes; a disk can be made to fail its next
//!   fsync, which crashes the node mid-Ready-round.
//! - **Network** ([`network`]): per-message delay, loss, duplication and
//!   reordering from a profile that faults change; directed link blocks model
//!   symmetric and asymmetric partitions. Dropped snapshots are reported to the
//!   leader (`report_snapshot`), blocked links as unreachable.
//! - **Faults** ([`faults`]): a schedule drawn from the seed — crashes and
//!   restarts, fsync failures, process pauses, isolations, one-way and split
//!   partitions, network degradation, controllers added (empty disk, catching up
//!   by snapshot) and removed. Most of the time at most a minority is down;
//!   sometimes quorum is lost briefly.
//! - **Clients** ([`workload`]): random commands proposed to whichever node is
//!   leader, each tracked by its `ProposalId` until applied or dropped; and
//!   ReadIndex reads at random nodes, checked for linearizability.
//! - **Invariants** ([`invariants`]): checked after every step; see that module.
//! - **Durability**: a crashed node's disk is checked against what the node told
//!   others before it crashed (its term, its vote, the entries it acknowledged).
//! - **Agents and leases** ([`agents`], `world/leases.rs` with its parts in
//!   `world/leases/`: `controllers.rs`, `hosts.rs`, `agent_faults.rs`,
//!   `checkers.rs`; on by default,
//!   `SimConfig::agents`): 3 to 8 node agents run the shipping agent engine
//!   ([`vipshare_core::agent::Engine`]) against every controller, with a state
//!   file that survives kills; controllers answer with the shipping
//!   [`vipshare_core::heartbeat::answer`] and their own
//!   [`vipshare_core::lease::Promises`], and the leader runs the shipping
//!   [`vipshare_core::ownership::Planner`] and two-phase
//!   [`vipshare_core::fence::FenceRound`]. The sim holds no protocol decisions
//!   of its own, only models of the world. Deliberate bugs of the shipping code
//!   (core's `faults` feature) are switched on by `--bug`. Every host (agent or controller) has
//!   its own clock, running up to rho fast or slow. Each agent host has a kernel
//!   filter model: bucket -> expiry in true time, installed after a delay of at
//!   most delta, kept while the agent is stopped or dead. Agent faults: pauses,
//!   kills, crash loops, partitions from the leader (also followed by a freeze),
//!   from some or all controllers, one way or both, and operator drains,
//!   undrains and weight changes.
//! - **World models** (issue 10, item 4; counted in [`Stats`] and traced):
//!   kernel installs whose writer stalls land past the kernel delay with their
//!   deadline stretched (`world/kernel.rs`); controllers removed from the
//!   voters keep running for up to 3 s (`World::removed`); agents are
//!   configured with a random non-empty subset of the voters
//!   (`configured_seeds`); agents restarted right after a release while a
//!   controller lags ([`faults::AgentFault::RestartAgainstLaggingController`]).
//! - **Ownership invariants**: no two hosts' kernels accept one bucket at the
//!   same true instant (exclusivity); bucket epochs only grow with the applied
//!   index; a suppressed member owns nothing.
//! - **Liveness**: at the end every fault is healed and every crashed node
//!   restarted; within a bound, every voter must have applied the same last
//!   index and a fresh proposal must have committed. With agents, every bucket
//!   must then be owned by a running agent whose kernel accepts it within a
//!   stated bound, the planner must settle, and nothing may move in a
//!   fault-free quiet window.
//!
//! A run is [`world::run_seed`]; the CLI (`vipshare-sim --seeds 500`) runs many.

pub mod agents;
pub mod disk;
pub mod faults;
pub mod invariants;
pub mod network;
pub mod workload;
pub mod world;

pub use world::{run_seed, Failure, FailureKind, RunReport, SimConfig, Stats, World};

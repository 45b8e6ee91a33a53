//! vipshare's deterministic core. Nothing in this crate does I/O or reads a clock,
//! so the controller and the simulator (`vipshare-sim`) run the very same code.
//!
//! - [`agent`]: the node agent's decisions (lease, floors, voters, yielding), sans-IO.
//! - [`storage`]: the raft log in memory over a crash-safe [`storage::Durable`] backend.
//! - [`replica`]: one controller's raft `RawNode` and its Ready loop, sans-IO.
//! - [`command`]: the log entries the state machine understands.
//! - [`state`]: the replicated state machine (settings, members, bucket owners).
//! - [`history`]: every ownership change and its reason, replicated with the state.
//! - [`lease`]: quorum-lease arithmetic for agents and controllers.
//! - [`net`]: the typed addresses: a VIP and its MAC.
//! - [`fence`]: the leader's two-phase fence round.
//! - [`heartbeat`]: a controller's answer to an agent's heartbeat.
//! - [`damping`]: flap-damping penalties.
//! - [`ownership`]: the leader's planner: fencing, re-admission, bucket moves.
//! - [`bucket`]: bucket functions (nftables jhash, low bits), bit-exact with the kernel.
//! - [`policy`]: the assignment policy (which member should own each bucket), pure.

pub mod agent;
pub mod bucket;
pub mod command;
pub mod damping;
pub mod fence;
pub mod heartbeat;
pub mod history;
pub mod lease;
pub mod net;
pub mod ownership;
pub mod policy;
pub mod replica;
pub mod state;
pub mod storage;

//! The node agent's decisions, sans-IO: the node agent (`vipshare-agent`) and
//! the simulator drive this very engine.
//!
//! ```text
//!  Tick ───────────┐                         ┌─> Persist(state)   write + fsync first
//!  Reply ──────────┤                         ├─> Heartbeat{round} to the controllers
//!  Assignment ─────┼─> Engine::step(now, ev) ├─> Install{buckets, timeout} replace the kernel set
//!  Withdrawn ──────┤   (lease, floors,       ├─> Withdraw{bucket} remove one, report Withdrawn
//!  Resumed ────────┘    voters, yield)       ├─> Released{buckets} to the controllers
//!                                            └─> Watch{controllers} talk to exactly these
//! ```
//!
//! Commands are carried out in order: a `Persist` precedes whatever depends on
//! it (a `Released` is only ever answered to a `Withdrawn` that came after the
//! floor it raised was persisted). Times are the agent's milliseconds on a clock that counts suspend.
//!
//! - [`assignment`]: the assignment as the engine sees it (domain types).
//! - [`durable`]: what survives a restart (floors, voters, timing).
//! - [`engine`]: the state machine.
//! - [`late_write`]: what a kernel write acknowledged past the budget calls for.

pub mod assignment;
pub mod durable;
pub mod engine;
pub mod late_write;

pub use assignment::{Assignment, Controller};
pub use durable::AgentState;
pub use engine::{AgentFaults, Command, Engine, Event, Reply};
pub use late_write::{after_ack, AfterAck};

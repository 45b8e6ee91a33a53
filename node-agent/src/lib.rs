//! vipshare node agent: holds this host's bucket lease and programs the kernel.
//!
//! Every host of a cluster holds the same shared address (VIP). ARP answers with
//! a multicast MAC, so every host receives every packet, and each host accepts a
//! NEW flow only when it owns the bucket of the flow's source address. The agent
//! learns which buckets it owns (and for how long: the lease) from the
//! controllers and turns that into kernel state.
//!
//! # Layout
//! - [`agent`]: the runtime (heartbeats to every controller, assignment
//!   streams, Released, the state file, drain on SIGTERM) around
//!   `vipshare_core::agent::Engine`, the decisions (which assignment counts,
//!   member epoch, lease, floors, voters, yielding), which the simulator runs too;
//!   [`agent::wire`] checks the protobuf messages.
//! - [`config`]: the `agent.toml` file.
//! - [`metrics`]: the Prometheus metric names.
//! - [`dataplane`]: the [`dataplane::DataPlane`] trait every kernel backend
//!   implements, and the types it takes ([`dataplane::Desired`]: VIPs, bucket
//!   function, owned buckets, remaining lease).
//! - [`dataplane::linux`]: the Linux backend (IPv4 VIP as a secondary address,
//!   ARP rewritten to the multicast MAC by nftables; IPv6 VIP on loopback,
//!   neighbour discovery answered with the multicast MAC from user space; an
//!   nftables input filter per family whose owned-bucket set elements carry
//!   the lease as their kernel `timeout`).
//! - [`dataplane::freebsd`]: the FreeBSD backend (CARP-INIT shared alias,
//!   published multicast ARP entry, IGMP membership, ipfw mask rules swapped
//!   atomically, and a watchdog process that withdraws the rules when the lease
//!   runs out, since ipfw rules cannot expire by themselves).
//!
//! Backends split into a pure planner (desired state in, list of steps out,
//! covered by golden tests) and one executor, the only code that touches the
//! operating system.

pub mod agent;
pub mod config;
pub mod dataplane;
pub mod metrics;

//! The kernel side of an agent host: operations the agent hands to its
//! kernel filter ([`crate::agents::Kernel`]) land after a delay, in order.
//!
//! The agent renders an install's timeout relative to its clock reading; the
//! kernel counts it from the moment it inserts the elements. Normally that is
//! within `kernel_delay_ms` (delta), which the lease subtracts from the
//! timeout. Occasionally the writer stalls between rendering and inserting (a
//! starved or descheduled process, a slow netlink round trip): the install
//! lands later than delta and its deadline is stretched by the stall
//! ([`World::kernel_submit`], counted in `Stats::kernel_late_installs`).
//!
//! What the shipping code does about a late write: the agent engine
//! (`vipshare_core::agent::Engine`) has no kernel ack for installs (only
//! `Event::Withdrawn` for withdrawals), so it neither sees nor handles one.
//! The rule "the ack came after the kernel-delay budget: write again from a
//! fresh clock reading, and delete the owned elements if that is late too"
//! lives only in the Linux data plane of the node agent
//! (`node-agent/src/dataplane/linux/exec.rs`, `nft_timed_batch`), which the
//! simulator does not run: here a late install stands until it times out or
//! is replaced by the agent's next install.

use super::leases::LeaseEvent;
use super::*;
use crate::agents::KernelOp;
use vipshare_core::agent::Event as AgentEvent;

/// One install in this many stalls past the kernel delay.
const STALL_ONE_IN: u32 = 40;

impl World {
    /// Hands an operation to the kernel: it lands after at most delta, in
    /// order; an install whose writer stalls lands up to 3 delta later than that.
    pub(super) fn kernel_submit(&mut self, i: usize, op: KernelOp) {
        let delta = self.lease.timing.kernel_delay_ms;
        let d = match self.rng.gen_range(0..4) {
            0 => delta,
            1 => 0,
            _ => self.rng.gen_range(0..=delta),
        };
        let stall = match op {
            // A fault like the others: none in the fault-free end of the run.
            KernelOp::Install { .. }
                if self.phase == Phase::Faults && self.models.gen_ratio(1, STALL_ONE_IN) =>
            {
                delta - d + self.models.gen_range(1..=3 * delta)
            }
            _ => 0,
        };
        let h = &mut self.hosts[i];
        let land = (self.now + d + stall).max(h.kernel.last_land);
        h.kernel.last_land = land;
        if stall > 0 {
            // Later operations of this writer queue behind it.
            let late = land - self.now;
            self.stats.kernel_late_installs += 1;
            self.stats.kernel_max_stall_ms = self.stats.kernel_max_stall_ms.max(late - delta);
            self.trace_host(i, || {
                format!(
                    "kernel writer stalls: this install lands in {late}ms, {}ms past the kernel delay",
                    late - delta
                )
            });
        }
        let submitted = self.now;
        self.schedule(
            land,
            Event::Lease(LeaseEvent::Kernel {
                host: i,
                op,
                submitted,
            }),
        );
    }

    /// The kernel applies `op` (handed over at `submitted`). An install's
    /// timeout counts from now, on the host's clock.
    pub(super) fn kernel_land(&mut self, i: usize, op: KernelOp, submitted: u64) {
        let now = self.now;
        match op {
            KernelOp::Install {
                buckets,
                timeout_ms,
                member_epoch,
            } => {
                let h = &self.hosts[i];
                let until = now + h.clock.true_ms(timeout_ms);
                // How long after another host stopped accepting a bucket this
                // host starts: the protocol's slack at every handover.
                if until > now {
                    for &(b, _) in &buckets {
                        if h.kernel.accepts(b, now).is_some() {
                            continue;
                        }
                        let prev = self
                            .hosts
                            .iter()
                            .enumerate()
                            .filter(|(j, _)| *j != i)
                            .filter_map(|(_, o)| o.kernel.last_end(b, now))
                            .max();
                        if let Some((end, by_expiry)) = prev.filter(|p| p.0 <= now) {
                            let gap = now - end;
                            let slot = if by_expiry {
                                &mut self.stats.closest_handover_after_expiry_ms
                            } else {
                                &mut self.stats.closest_handover_after_withdrawal_ms
                            };
                            *slot = Some(slot.map_or(gap, |g| g.min(gap)));
                        }
                    }
                }
                let h = &mut self.hosts[i];
                h.kernel.expire(now);
                h.kernel.install(now, &buckets, until, member_epoch);
                self.stats.kernel_installs += 1;
                if self.tracing() {
                    let list: Vec<u32> = buckets.iter().map(|g| g.0).collect();
                    let lag = now - submitted;
                    let delta = self.lease.timing.kernel_delay_ms;
                    let late = if lag > delta {
                        format!(
                            "; LATE: {lag}ms after the agent rendered the timeout, {}ms over the kernel delay (the engine hears no ack)",
                            lag - delta
                        )
                    } else {
                        String::new()
                    };
                    self.trace_host(i, || {
                        format!(
                            "kernel: accepts {list:?} until {until}ms (epoch {member_epoch}){late}"
                        )
                    });
                }
            }
            KernelOp::Withdraw {
                bucket,
                epoch,
                incarnation,
            } => {
                let h = &mut self.hosts[i];
                h.kernel.withdraw(bucket, now);
                let current = h.incarnation == incarnation;
                self.trace_host(i, || format!("kernel: bucket {bucket} withdrawn"));
                if current {
                    self.agent_step(i, AgentEvent::Withdrawn { bucket, epoch });
                }
            }
        }
    }
}

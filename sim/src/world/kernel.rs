//! The kernel side of an agent host: operations the agent hands to its
//! kernel filter ([`crate::agents::Kernel`]) land after a delay, in order.
//!
//! The agent renders an install's timeout relative to its clock reading; the
//! kernel counts it from the moment it inserts the elements. Normally that is
//! within `kernel_delay_ms` (delta), which the lease subtracts from the
//! timeout. Occasionally the writer stalls between rendering and inserting (a
//! starved or descheduled process, a slow netlink round trip): the install
//! lands later than delta and its element timeouts are stretched by the stall
//! ([`World::kernel_submit`], counted in `Stats::kernel_late_installs`).
//!
//! What the shipping code does about a late write is decided in core
//! ([`vipshare_core::agent::late_write`]) and carried out by the Linux data
//! plane (`node-agent/src/dataplane/linux/exec.rs`, `nft_timed_batch`), not by
//! the agent engine, which hears no ack for installs. This model runs the same
//! decision: the ack of a late install comes back as it lands, the data plane
//! writes the elements again from a fresh clock reading (what is left of the
//! lease then, nothing if it ran out), and deletes them if that write is late
//! too. The writer is one executor, so nothing the agent hands over later
//! lands before the rewrite. The stretched element timeouts do not make the
//! kernel accept longer: it also checks the lease's absolute deadline, written
//! from the same clock reading (`node-agent/src/dataplane/linux/deadline.rs`),
//! which [`World::kernel_land`] applies as a cap.

use super::leases::LeaseEvent;
use super::*;
use crate::agents::KernelOp;
use std::time::Duration;
use vipshare_core::agent::Event as AgentEvent;
use vipshare_core::agent::{after_ack, AfterAck};

/// One install in this many stalls past the kernel delay.
const STALL_ONE_IN: u32 = 40;

impl World {
    /// Hands an operation to the kernel: it lands after at most delta, in
    /// order; an install whose writer stalls lands up to 3 delta later than
    /// that, and is followed by what the data plane does about a late ack.
    pub(super) fn kernel_submit(&mut self, i: usize, op: KernelOp) {
        let d = self.kernel_delay(false);
        let (mut read_at, mut acked, sent) = self.kernel_schedule(i, op, self.now, d);
        let KernelOp::Install {
            buckets,
            timeout_ms,
            member_epoch,
            earned,
        } = sent
        else {
            return;
        };
        let budget = Duration::from_millis(self.lease.timing.kernel_delay_ms);
        let clock = self.hosts[i].clock;
        let mut rewrite = false;
        loop {
            let lag = Duration::from_millis(clock.local(acked) - clock.local(read_at));
            let next = match after_ack(lag, budget, rewrite) {
                AfterAck::Done => return,
                // Rendered from the clock read at the ack: what is left then.
                AfterAck::WriteAgain => KernelOp::Install {
                    buckets: buckets.clone(),
                    timeout_ms: timeout_ms
                        .saturating_sub(clock.local(acked) - clock.local(read_at)),
                    member_epoch,
                    earned,
                },
                AfterAck::DeleteOwned => KernelOp::Install {
                    buckets: Vec::new(),
                    timeout_ms: 0,
                    member_epoch,
                    earned,
                },
            };
            self.trace_host(i, || {
                format!("data plane: the ack came {lag:?} after the clock reading; writes {next:?}")
            });
            let last = rewrite;
            let d = self.kernel_delay(true);
            (read_at, acked, _) = self.kernel_schedule(i, next, acked, d);
            // The fault lasts until the rewrite landed and the next renewal
            // after it could (a heartbeat and a kernel delay later): the host
            // may lapse meanwhile, which the settle check must not call quiet.
            let t = self.lease.timing;
            let k = &mut self.hosts[i].kernel;
            k.stalled_until = k
                .stalled_until
                .max(acked + t.heartbeat_ms + t.kernel_delay_ms);
            if last {
                return;
            }
            rewrite = true;
        }
    }

    /// How long the kernel takes to apply an operation handed over now: at most
    /// delta. Rewrites draw from the world models' generator, so that modelling
    /// them leaves the main sequence of draws as it was.
    fn kernel_delay(&mut self, rewrite: bool) -> u64 {
        let delta = self.lease.timing.kernel_delay_ms;
        let rng = if rewrite {
            &mut self.models
        } else {
            &mut self.rng
        };
        match rng.gen_range(0..4) {
            0 => delta,
            1 => 0,
            _ => rng.gen_range(0..=delta),
        }
    }

    /// Schedules `op`, handed over at `from`, to land `d` later (and later
    /// still if its writer stalls), never before an earlier operation of the
    /// host. The writer is one executor: it reads the clock for an install's
    /// timeout when it takes the operation up, after the earlier ones landed,
    /// and renders what is left of the lease then. Returns that reading's
    /// time, when the operation lands, and the operation as sent.
    fn kernel_schedule(
        &mut self,
        i: usize,
        mut op: KernelOp,
        from: u64,
        d: u64,
    ) -> (u64, u64, KernelOp) {
        let delta = self.lease.timing.kernel_delay_ms;
        let (clock, last_land) = (self.hosts[i].clock, self.hosts[i].kernel.last_land);
        let read_at = from.max(last_land);
        // At most delta on the host's own clock, which the kernel's timers and
        // the agent's measure of the round trip both run on.
        let mut d = d;
        while d > 0 && clock.local(read_at + d) - clock.local(read_at) > delta {
            d -= 1;
        }
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
        if let KernelOp::Install {
            buckets,
            timeout_ms,
            ..
        } = &mut op
        {
            let waited = h.clock.local(read_at) - h.clock.local(from);
            *timeout_ms = timeout_ms.saturating_sub(waited);
            if *timeout_ms == 0 {
                buckets.clear();
            }
        }
        let land = (from + d + stall).max(h.kernel.last_land);
        h.kernel.last_land = land;
        if stall > 0 {
            // Later operations of this writer queue behind it.
            let late = land - from;
            h.kernel.stalled_until = land;
            self.stats.kernel_late_installs += 1;
            self.stats.kernel_max_stall_ms = self.stats.kernel_max_stall_ms.max(late - delta);
            self.trace_host(i, || {
                format!(
                    "kernel writer stalls: this install lands in {late}ms, {}ms past the kernel delay",
                    late - delta
                )
            });
        }
        self.schedule(
            land,
            Event::Lease(LeaseEvent::Kernel {
                host: i,
                op: op.clone(),
                submitted: read_at,
            }),
        );
        (read_at, land, op)
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
                earned,
            } => {
                let h = &self.hosts[i];
                // The elements would count their timeout from now, but the
                // kernel's absolute deadline (the Linux data plane's `lease`
                // chain, from the clock reading at `submitted`) ends acceptance
                // first, so a late landing stretches nothing.
                let until = submitted + h.clock.true_ms(timeout_ms);
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
                h.kernel.earned = earned;
                self.stats.kernel_installs += 1;
                if self.tracing() {
                    let list: Vec<u32> = buckets.iter().map(|g| g.0).collect();
                    let lag = now - submitted;
                    let delta = self.lease.timing.kernel_delay_ms;
                    let late = if lag > delta {
                        format!(
                            "; LATE: {lag}ms after the agent rendered the timeout, {}ms over the kernel delay",
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

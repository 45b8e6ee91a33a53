//! A lease write the kernel acknowledged late.
//!
//! The agent renders element timeouts from a clock reading taken immediately
//! before it sends them; the kernel counts each timeout from its insert,
//! somewhere between that reading and the ack. Normally the round trip is
//! within the kernel-delay budget, which the lease already subtracts. When it
//! is not (the writer was stopped or starved between reading and sending), the
//! kernel's deadlines are stretched by the stall, so the write is repeated at
//! once from a fresh reading, which replaces the stretched timeouts; if that
//! is late as well, the owned elements are deleted: a host too slow to keep
//! within the budget serves nothing rather than too long.
//!
//! The Linux data plane (`node-agent`, `nft_timed_batch`) and the simulator's
//! kernel model both take this decision here.

use std::time::Duration;

/// What to do once the kernel acknowledged a write of the owned elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterAck {
    /// Within the budget: no deadline outlives the lease by more than it.
    Done,
    /// Late: write the elements again, timeouts rendered from a fresh clock
    /// reading.
    WriteAgain,
    /// The rewrite was late too: delete the owned elements.
    DeleteOwned,
}

/// The decision for a write acknowledged `lag` after its clock reading;
/// `rewrite` says whether it was already the second attempt.
pub fn after_ack(lag: Duration, budget: Duration, rewrite: bool) -> AfterAck {
    match (lag <= budget, rewrite) {
        (true, _) => AfterAck::Done,
        (false, false) => AfterAck::WriteAgain,
        (false, true) => AfterAck::DeleteOwned,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_write_is_repeated_once_then_deleted() {
        let ms = Duration::from_millis;
        assert_eq!(after_ack(ms(20), ms(20), false), AfterAck::Done);
        assert_eq!(after_ack(ms(20), ms(20), true), AfterAck::Done);
        assert_eq!(after_ack(ms(21), ms(20), false), AfterAck::WriteAgain);
        assert_eq!(after_ack(ms(21), ms(20), true), AfterAck::DeleteOwned);
    }
}

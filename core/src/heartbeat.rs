//! A controller's answer to an agent's heartbeat: from its own applied state and
//! its own [`Promises`]. The controller's agent API and the simulator call this.

use crate::lease::{Promises, Refusal};
use crate::state::ClusterState;

/// What an agent's heartbeat says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Heartbeat {
    pub member: String,
    /// The member epoch the agent believes it holds.
    pub epoch: u64,
    /// The applied index of the assignment the agent acts on (`None`: an agent
    /// too old to say).
    pub assignment_index: Option<u64>,
    /// What keeps its data plane from serving (wrong interface, VIP missing,
    /// filter gone, failed apply); empty when it serves.
    pub problems: Vec<String>,
}

/// What a controller tells the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub verdict: Result<(), Refusal>,
    /// The member's epoch in the applied state (0: unknown member).
    pub member_epoch: u64,
    /// The lease an ack promises (the timing's `lease_ms`; 0 when refused):
    /// the agent's lease is the shortest its majority carried.
    pub lease_ms: u64,
}

/// Decide on heartbeat `hb`, at `now` on this controller's clock. `voter`:
/// whether this controller is in its own applied voter set; a controller that
/// is not (removed, or a learner) promises nothing, since the leader does not
/// ask it before fencing. An assignment index older than the member's last
/// release is not acked, a second guard after the agent's own floors against
/// installing a released bucket from a lagging controller's assignment. The
/// problems it reports are recorded whatever the verdict (the planner gives
/// nothing to a member that cannot serve).
pub fn answer(
    promises: &mut Promises,
    now: u64,
    state: &ClusterState,
    voter: bool,
    hb: &Heartbeat,
) -> Answer {
    let (member, epoch) = (hb.member.as_str(), hb.epoch);
    let m = state.members.get(member);
    if m.is_some() {
        promises.report_health(now, member, &hb.problems);
    }
    let member_epoch = m.map_or(0, |m| m.epoch);
    let verdict = match m {
        _ if !voter => Err(Refusal::NotAVoter),
        Some(m) if m.evicted && m.epoch == epoch => Err(Refusal::Evicted { epoch }),
        Some(m)
            if hb.assignment_index.is_some_and(|i| i < m.released_at)
                && !promises.faults().ack_stale_assignments =>
        {
            Err(Refusal::StaleAssignment {
                released_at: m.released_at,
            })
        }
        _ => promises.heartbeat(now, member, epoch, m.map(|m| m.epoch)),
    };
    let lease_ms = if verdict.is_ok() {
        promises.timing().lease_ms
    } else {
        0
    };
    Answer {
        verdict,
        member_epoch,
        lease_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(member: &str, epoch: u64, assignment_index: Option<u64>) -> Heartbeat {
        Heartbeat {
            member: member.into(),
            epoch,
            assignment_index,
            problems: Vec::new(),
        }
    }
    use crate::command::Command;
    use crate::lease::LeaseTiming;
    use std::collections::BTreeMap;

    #[test]
    fn acks_only_as_a_voter_and_never_an_evicted_epoch() {
        let mut s = crate::ownership::tests::cluster(&["h1"]);
        let mut p = Promises::new(LeaseTiming::default(), 0, BTreeMap::new());
        assert_eq!(
            answer(&mut p, 1, &s, true, &hb("h1", 1, None)).verdict,
            Ok(())
        );
        let a = answer(&mut p, 1, &s, false, &hb("h1", 1, None));
        assert_eq!((a.verdict, a.member_epoch), (Err(Refusal::NotAVoter), 1));
        s.apply(Command::Evict {
            name: "h1".into(),
            epoch: 1,
        })
        .unwrap();
        assert_eq!(
            answer(&mut p, 2, &s, true, &hb("h1", 1, None)).verdict,
            Err(Refusal::Evicted { epoch: 1 })
        );
        assert_eq!(
            answer(&mut p, 2, &s, true, &hb("h9", 1, None)).verdict,
            Err(Refusal::UnknownMember)
        );
    }

    #[test]
    fn no_ack_for_an_assignment_older_than_the_last_release() {
        let mut s = crate::ownership::tests::cluster(&["h1"]);
        s.buckets[2].owner = Some("h1".into());
        let stamp = crate::command::Stamp {
            at_ms: 0,
            by: "test".into(),
        };
        let release = Command::Release {
            name: "h1".into(),
            buckets: vec![2],
        };
        s.apply_stamped(40, &stamp, release).unwrap();
        assert_eq!(s.members["h1"].released_at, 40);
        let mut p = Promises::new(LeaseTiming::default(), 0, BTreeMap::new());
        let a = answer(&mut p, 1, &s, true, &hb("h1", 1, Some(39)));
        assert_eq!(a.verdict, Err(Refusal::StaleAssignment { released_at: 40 }));
        assert_eq!(a.lease_ms, 0);
        assert_eq!(
            answer(&mut p, 1, &s, true, &hb("h1", 1, Some(0))).verdict,
            a.verdict,
            "no assignment yet"
        );
        assert_eq!(
            answer(&mut p, 1, &s, true, &hb("h1", 1, Some(40))).verdict,
            Ok(())
        );
        assert_eq!(
            answer(&mut p, 1, &s, true, &hb("h1", 1, None)).verdict,
            Ok(()),
            "an older agent"
        );
        // A release of nothing it owns moves nothing and raises nothing.
        let nothing = Command::Release {
            name: "h1".into(),
            buckets: vec![5],
        };
        s.apply_stamped(50, &stamp, nothing).unwrap();
        assert_eq!(s.members["h1"].released_at, 40);
    }
}

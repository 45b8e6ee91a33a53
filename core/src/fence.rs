//! The leader's fence round, sans-IO. Marking one controller while the others
//! still ack the member would cut a live member off that controller, so:
//!
//! ```text
//!  start(self_could) ─> Ask{commit: false}   could each voter agree? (records nothing)
//!  answer × n        ─> Ask{commit: true}    a majority could: agree for real
//!  answer × n        ─> MarkSelf             the others' marks + this one make a majority
//!  marked_self(ok)   ─> Propose(FenceMember) a majority marked
//!  (any phase)       ─> GiveUp               every answer is in and no majority
//! ```
//!
//! The leader marks last, so a leader cut off from the members marks nobody it
//! cannot fence. The controller (`controller/src/ownership.rs`) and the
//! simulator drive this over their networks.

use std::collections::BTreeSet;

use crate::command::Command;
use crate::lease::majority;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceCommand {
    /// Send a fence request to these voters; answer each with [`FenceRound::answer`].
    Ask { to: Vec<u64>, commit: bool },
    /// Agree on this controller (persist the mark), then [`FenceRound::marked_self`].
    MarkSelf,
    /// A majority marked: propose the fence.
    Propose(Command),
    /// No majority; the planner tries again later: in `retry_in_ms` when the
    /// refusals said how long until enough of them could agree
    /// ([`crate::ownership::Planner::fence_not_agreed`]), else after its retry
    /// interval.
    GiveUp {
        yes: usize,
        need: usize,
        retry_in_ms: Option<u64>,
    },
}

/// Deliberate bugs for the simulator to catch (settable with core's `faults`
/// feature only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FenceFaults {
    /// Mark this controller first and ask the others to commit at once.
    pub leader_marks_first: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Asking,
    Marking,
    MarkingSelf,
    Done,
}

/// One round, on the leader.
#[derive(Debug, Clone)]
pub struct FenceRound {
    me: u64,
    member: String,
    epoch: u64,
    at_ms: u64,
    others: BTreeSet<u64>,
    need: usize,
    phase: Phase,
    /// Voters that said yes in the current phase, and those that answered.
    yes: BTreeSet<u64>,
    answered: BTreeSet<u64>,
    /// The current phase's refusals: how long until each could agree (`None`:
    /// it did not say, or it cannot answer).
    waits: Vec<Option<u64>>,
    self_tried: bool,
}

impl FenceRound {
    /// Fence `member` at `epoch` over `voters`, stamped `at_ms` (cluster time,
    /// [`crate::damping::ClusterClock`]);
    /// `self_could`: whether this controller's own promise ran out.
    pub fn start(
        me: u64,
        voters: &[u64],
        member: &str,
        epoch: u64,
        at_ms: u64,
        self_could: bool,
    ) -> (Self, Vec<FenceCommand>) {
        Self::start_with(
            me,
            voters,
            member,
            epoch,
            at_ms,
            self_could,
            FenceFaults::default(),
        )
    }

    #[cfg(feature = "faults")]
    pub fn start_faulty(
        me: u64,
        voters: &[u64],
        member: &str,
        epoch: u64,
        at_ms: u64,
        self_could: bool,
        faults: FenceFaults,
    ) -> (Self, Vec<FenceCommand>) {
        Self::start_with(me, voters, member, epoch, at_ms, self_could, faults)
    }

    fn start_with(
        me: u64,
        voters: &[u64],
        member: &str,
        epoch: u64,
        at_ms: u64,
        self_could: bool,
        faults: FenceFaults,
    ) -> (Self, Vec<FenceCommand>) {
        let mut r = FenceRound {
            me,
            member: member.to_string(),
            epoch,
            at_ms,
            others: voters.iter().copied().filter(|&v| v != me).collect(),
            need: majority(voters.len()),
            phase: Phase::Asking,
            yes: BTreeSet::new(),
            answered: BTreeSet::new(),
            waits: Vec::new(),
            self_tried: false,
        };
        if faults.leader_marks_first {
            r.phase = Phase::MarkingSelf;
            r.self_tried = true;
            let to = r.others.iter().copied().collect();
            return (
                r,
                vec![
                    FenceCommand::MarkSelf,
                    FenceCommand::Ask { to, commit: true },
                ],
            );
        }
        if self_could {
            r.yes.insert(me);
        }
        let mut out = vec![FenceCommand::Ask {
            to: r.others.iter().copied().collect(),
            commit: false,
        }];
        r.progress(&mut out);
        (r, out)
    }

    pub fn member(&self) -> &str {
        &self.member
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// `from` answered a request of the `commit` phase.
    pub fn answer(&mut self, from: u64, commit: bool, agreed: bool) -> Vec<FenceCommand> {
        self.answer_waiting(from, commit, agreed, None)
    }

    /// [`FenceRound::answer`], with a refusal's wait: how long until `from`'s
    /// promise runs out (`FenceReply::retry_after_ms`). A round given up for
    /// promises that run out a few milliseconds after the leader's own is
    /// retried then, not a whole retry interval later.
    pub fn answer_waiting(
        &mut self,
        from: u64,
        commit: bool,
        agreed: bool,
        wait_ms: Option<u64>,
    ) -> Vec<FenceCommand> {
        let current = match self.phase {
            Phase::Asking => false,
            Phase::Marking | Phase::MarkingSelf => true,
            Phase::Done => return Vec::new(),
        };
        if commit != current || !self.others.contains(&from) || !self.answered.insert(from) {
            return Vec::new();
        }
        if agreed {
            self.yes.insert(from);
        } else {
            self.waits.push(wait_ms.filter(|&w| w > 0));
        }
        let mut out = Vec::new();
        self.progress(&mut out);
        out
    }

    /// This controller's own mark: `ok` if it agreed and the mark is on disk.
    pub fn marked_self(&mut self, ok: bool) -> Vec<FenceCommand> {
        if self.phase != Phase::MarkingSelf {
            return Vec::new();
        }
        if ok {
            self.yes.insert(self.me);
        }
        self.phase = Phase::Marking;
        let mut out = Vec::new();
        self.progress(&mut out);
        out
    }

    fn all_answered(&self) -> bool {
        self.answered.len() == self.others.len()
    }

    fn progress(&mut self, out: &mut Vec<FenceCommand>) {
        match self.phase {
            Phase::Asking => {
                if self.yes.len() >= self.need {
                    self.phase = Phase::Marking;
                    self.yes.clear();
                    self.answered.clear();
                    self.waits.clear();
                    out.push(FenceCommand::Ask {
                        to: self.others.iter().copied().collect(),
                        commit: true,
                    });
                    self.progress(out);
                } else if self.all_answered() {
                    self.give_up(out);
                }
            }
            Phase::Marking => {
                if self.yes.len() >= self.need {
                    self.phase = Phase::Done;
                    out.push(FenceCommand::Propose(Command::FenceMember {
                        name: self.member.clone(),
                        epoch: self.epoch,
                        at_ms: self.at_ms,
                        marked_by: self.yes.iter().copied().collect(),
                    }));
                } else if !self.self_tried && self.yes.len() + 1 >= self.need {
                    self.self_tried = true;
                    self.phase = Phase::MarkingSelf;
                    out.push(FenceCommand::MarkSelf);
                } else if self.all_answered() {
                    self.give_up(out);
                }
            }
            Phase::MarkingSelf | Phase::Done => {}
        }
    }

    fn give_up(&mut self, out: &mut Vec<FenceCommand>) {
        self.phase = Phase::Done;
        // Enough refusers must come round: the soonest `missing` of them, if
        // every one of those said when (the leader's own "yes" is counted in
        // `yes`; a leader that could not agree itself fences only on its plan).
        let missing = self.need.saturating_sub(self.yes.len());
        let mut known: Vec<u64> = self.waits.iter().filter_map(|w| *w).collect();
        known.sort_unstable();
        let retry_in_ms = (missing > 0 && self.yes.contains(&self.me))
            .then(|| known.get(missing - 1).copied())
            .flatten();
        out.push(FenceCommand::GiveUp {
            yes: self.yes.len(),
            need: self.need,
            retry_in_ms,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fence(epoch: u64, marked_by: &[u64]) -> FenceCommand {
        FenceCommand::Propose(Command::FenceMember {
            name: "h1".into(),
            epoch,
            at_ms: 7,
            marked_by: marked_by.to_vec(),
        })
    }

    #[test]
    fn asks_then_marks_others_first_and_itself_last() {
        let (mut r, out) = FenceRound::start(1, &[1, 2, 3], "h1", 4, 7, true);
        assert_eq!(
            out,
            vec![FenceCommand::Ask {
                to: vec![2, 3],
                commit: false
            }]
        );
        assert_eq!(r.answer(2, true, true), vec![], "wrong phase");
        assert_eq!(
            r.answer(2, false, true),
            vec![FenceCommand::Ask {
                to: vec![2, 3],
                commit: true
            }]
        );
        assert_eq!(r.answer(3, false, true), vec![], "late phase-1 answer");
        assert_eq!(r.answer(3, true, true), vec![FenceCommand::MarkSelf]);
        assert_eq!(
            r.marked_self(true),
            vec![fence(4, &[1, 3])],
            "marked by 3, then itself"
        );
        assert!(r.done());
    }

    #[test]
    fn the_leader_does_not_mark_without_a_majority_of_others() {
        let (mut r, _) = FenceRound::start(1, &[1, 2, 3, 4, 5], "h1", 4, 7, true);
        r.answer(2, false, true);
        assert_eq!(r.answer(3, false, true).len(), 1, "3 of 5 could: commit");
        assert_eq!(r.answer(2, true, true), vec![]);
        assert_eq!(r.answer(3, true, false), vec![]);
        assert_eq!(r.answer(4, true, false), vec![]);
        assert_eq!(
            r.answer(5, true, false),
            vec![FenceCommand::GiveUp {
                yes: 1,
                need: 3,
                retry_in_ms: None
            }],
            "never marked itself"
        );
    }

    #[test]
    fn still_acked_by_a_majority_records_nothing() {
        let (mut r, _) = FenceRound::start(1, &[1, 2, 3], "h1", 4, 7, false);
        r.answer(2, false, true);
        assert_eq!(
            r.answer(3, false, false),
            vec![FenceCommand::GiveUp {
                yes: 1,
                need: 2,
                retry_in_ms: None
            }]
        );
    }

    #[test]
    fn a_round_refused_for_promises_about_to_run_out_says_when_to_retry() {
        let (mut r, _) = FenceRound::start(1, &[1, 2, 3, 4, 5], "h1", 4, 7, true);
        r.answer_waiting(2, false, false, Some(30));
        r.answer_waiting(3, false, false, Some(4));
        r.answer_waiting(4, false, false, Some(9));
        assert_eq!(
            r.answer_waiting(5, false, false, None),
            vec![FenceCommand::GiveUp {
                yes: 1,
                need: 3,
                retry_in_ms: Some(9)
            }],
            "two more needed: the second soonest"
        );
        // Unreachable voters say nothing: no early retry without enough waits.
        let (mut r, _) = FenceRound::start(1, &[1, 2, 3], "h1", 4, 7, true);
        r.answer_waiting(2, false, false, None);
        assert_eq!(
            r.answer_waiting(3, false, false, None),
            vec![FenceCommand::GiveUp {
                yes: 1,
                need: 2,
                retry_in_ms: None
            }]
        );
    }

    #[test]
    fn a_single_voter_fences_alone() {
        let (_, out) = FenceRound::start(1, &[1], "h1", 4, 7, true);
        assert_eq!(
            out,
            vec![
                FenceCommand::Ask {
                    to: vec![],
                    commit: false
                },
                FenceCommand::Ask {
                    to: vec![],
                    commit: true
                },
                FenceCommand::MarkSelf
            ]
        );
    }
}

//! Safety invariants, checked by the world after every step.
//!
//! The [`Checker`] keeps a global, all-time record of what the replicas did and
//! refuses anything that contradicts it. It never looks inside raft: it sees only
//! what a replica exposes (role, log, applied entries, state machine, snapshot),
//! what it sends, and what its disk holds.
//!
//! | invariant | how |
//! |---|---|
//! | election safety | at most one leader per term, over the whole run ([`Checker::observe_role`]) |
//! | log matching | every `(index, term)` ever seen in a log maps to one entry and one predecessor term; by induction, two logs holding the same `(index, term)` agree on everything before it ([`Checker::observe_log`]) |
//! | leader completeness | a leader of a term above every term seen when an entry was first applied holds that entry ([`Checker::observe_role`]) |
//! | state machine safety | every node applies the same entry at each index, across crashes and incarnations; a proposal is applied at one index only ([`Checker::observe_applied`]) |
//! | monotonic apply | a node's applied index never goes backwards within an incarnation ([`Checker::observe_state`]) |
//! | identical state | nodes at the same applied index have byte-identical state machines (encoding and configuration); a snapshot equals the state at its index ([`Checker::observe_state`], [`Checker::observe_snapshot`]) |
//! | committed entries survive | the newest applied entry is held (log or snapshot; on disk for a crashed node) by enough voters that every quorum of the newest configuration includes one ([`Checker::check_committed_held`]) |
//! | linearizable reads | a ReadIndex read is served from a state that includes every entry applied anywhere before the read started ([`Checker::observe_read_served`]) |
//! | durable promises | after a crash, the disk still has every term the node sent a message in, every vote it granted, and (within the same term) every log position it acknowledged ([`Checker::check_recovered`]) |

use std::collections::BTreeMap;
use std::fmt;

use raft::eraftpb::{ConfState, Entry, HardState, Message, MessageType};
use raft::StateRole;
use vipshare_core::command::ProposalId;
use vipshare_core::replica::{AppliedEntry, Outcome, RoleState};

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub invariant: &'static str,
    pub node: u64,
    pub index: Option<u64>,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} violated on n{}", self.invariant, self.node)?;
        if let Some(i) = self.index {
            write!(f, " at index {i}")?;
        }
        write!(f, ": {}", self.detail)
    }
}

fn violation(
    invariant: &'static str,
    node: u64,
    index: Option<u64>,
    detail: String,
) -> Result<(), Violation> {
    Err(Violation {
        invariant,
        node,
        index,
        detail,
    })
}

/// FNV-1a, 64 bit: stable across builds and platforms (unlike `DefaultHasher`).
#[derive(Debug, Clone, Copy)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub fn write_u64(&mut self, v: u64) {
        self.write(&v.to_le_bytes());
    }
}

/// Identity of a log entry's contents.
pub fn entry_hash(e: &Entry) -> u64 {
    let mut h = Fnv::default();
    h.write_u64(e.get_entry_type() as u64);
    h.write_u64(e.data.len() as u64);
    h.write(&e.data);
    h.write(&e.context);
    h.0
}

fn sorted(v: &[u64]) -> Vec<u64> {
    let mut v = v.to_vec();
    v.sort_unstable();
    v
}

/// A configuration with its member lists sorted (raft keeps them in hash sets).
pub fn conf_key(cs: &ConfState) -> String {
    format!(
        "voters={:?} learners={:?}",
        sorted(&cs.voters),
        sorted(&cs.learners)
    )
}

/// Identity of a state machine: its encoding plus the raft configuration.
pub fn state_hash(encoded_state: &[u8], cs: &ConfState) -> u64 {
    let mut h = Fnv::default();
    h.write(encoded_state);
    h.write(conf_key(cs).as_bytes());
    h.0
}

/// What applying an entry did, comparable across nodes.
pub fn outcome_key(o: &Outcome) -> String {
    match o {
        Outcome::Empty => "empty".into(),
        Outcome::Dropped => "dropped".into(),
        Outcome::Applied(Ok(())) => "applied".into(),
        Outcome::Applied(Err(e)) => format!("refused ({e})"),
        Outcome::ConfChanged(Ok(cs)) => format!("conf change -> {}", conf_key(cs)),
        Outcome::ConfChanged(Err(e)) => format!("conf change refused ({e})"),
    }
}

#[derive(Debug, Clone)]
struct LogRecord {
    hash: u64,
    prev_term: Option<u64>,
    node: u64,
}

#[derive(Debug, Clone)]
struct AppliedRecord {
    term: u64,
    proposal: Option<ProposalId>,
    outcome: String,
    node: u64,
}

/// What a node told others, which its disk must remember across a crash.
#[derive(Debug, Clone, Copy, Default)]
struct Promise {
    max_term: u64,
    /// The newest granted vote: (term, candidate).
    vote: Option<(u64, u64)>,
    /// The newest acknowledged log position: (term, index). Within one term a
    /// follower's log never shrinks below what it acknowledged to that term's leader.
    ack: Option<(u64, u64)>,
}

#[derive(Debug, Clone, Copy)]
struct Progress {
    incarnation: u64,
    applied: u64,
}

/// The global record. See the module docs for the invariants.
#[derive(Debug, Default)]
pub struct Checker {
    leaders: BTreeMap<u64, u64>,
    max_term: u64,
    log: BTreeMap<(u64, u64), LogRecord>,
    applied: BTreeMap<u64, AppliedRecord>,
    max_applied: u64,
    /// (max term seen when first applied, index, term): non-decreasing in both.
    commit_tips: Vec<(u64, u64, u64)>,
    states: BTreeMap<u64, (u64, u64)>,
    proposals: BTreeMap<ProposalId, u64>,
    progress: BTreeMap<u64, Progress>,
    promises: BTreeMap<u64, Promise>,
    conf_index: u64,
    voters: Vec<u64>,
    /// Outstanding reads: context -> newest index applied anywhere when it started.
    reads: BTreeMap<Vec<u8>, u64>,
}

impl Checker {
    /// `bootstrap` is the founders' snapshot: index, term, voters, state hash.
    pub fn new(snap_index: u64, snap_term: u64, voters: &[u64], state: u64) -> Self {
        let mut c = Checker {
            voters: sorted(voters),
            conf_index: snap_index,
            max_applied: snap_index,
            ..Default::default()
        };
        c.applied.insert(
            snap_index,
            AppliedRecord {
                term: snap_term,
                proposal: None,
                outcome: "bootstrap snapshot".into(),
                node: 0,
            },
        );
        c.commit_tips.push((0, snap_index, snap_term));
        c.states.insert(snap_index, (state, 0));
        c
    }

    /// Voters of the newest configuration applied anywhere.
    pub fn voters(&self) -> &[u64] {
        &self.voters
    }

    /// The newest entry applied anywhere: (index, term).
    pub fn committed_tip(&self) -> (u64, u64) {
        let (_, i, t) = self.commit_tips.last().copied().unwrap_or_default();
        (i, t)
    }

    /// Index at which a proposal was applied, if it was.
    pub fn applied_at(&self, id: ProposalId) -> Option<u64> {
        self.proposals.get(&id).copied()
    }

    pub fn leaders_elected(&self) -> usize {
        self.leaders.len()
    }

    /// Role and term of a node after a step. `holds(index, term)` answers whether the
    /// node's log (or snapshot) holds that entry, for leader completeness.
    pub fn observe_role(
        &mut self,
        node: u64,
        role: RoleState,
        holds: impl Fn(u64, u64) -> bool,
    ) -> Result<(), Violation> {
        self.max_term = self.max_term.max(role.term);
        if role.role != StateRole::Leader {
            return Ok(());
        }
        match self.leaders.get(&role.term) {
            Some(&other) if other != node => {
                return violation(
                    "election safety",
                    node,
                    None,
                    format!("n{node} and n{other} are both leader of term {}", role.term),
                )
            }
            Some(_) => return Ok(()),
            None => {
                self.leaders.insert(role.term, node);
            }
        }
        // Newest entry first applied while every term seen was below this one.
        let k = self
            .commit_tips
            .partition_point(|(bound, _, _)| *bound < role.term);
        if let Some(&(_, index, term)) = k.checked_sub(1).and_then(|k| self.commit_tips.get(k)) {
            if !holds(index, term) {
                return violation(
                    "leader completeness",
                    node,
                    Some(index),
                    format!(
                        "n{node} became leader of term {} without committed entry {index} (term {term})",
                        role.term
                    ),
                );
            }
        }
        Ok(())
    }

    /// Entries a node's log now holds; `prev_term` is the term of the entry before
    /// the first one (None if unknown).
    pub fn observe_log(
        &mut self,
        node: u64,
        prev_term: Option<u64>,
        entries: &[Entry],
    ) -> Result<(), Violation> {
        let mut prev = prev_term;
        let mut prev_index = entries.first().map_or(0, |e| e.index.saturating_sub(1));
        for e in entries {
            if e.index != prev_index + 1 {
                return violation(
                    "log matching",
                    node,
                    Some(e.index),
                    format!("log of n{node} has a gap after index {prev_index}"),
                );
            }
            let hash = entry_hash(e);
            match self.log.get_mut(&(e.index, e.term)) {
                None => {
                    self.log.insert(
                        (e.index, e.term),
                        LogRecord {
                            hash,
                            prev_term: prev,
                            node,
                        },
                    );
                }
                Some(rec) => {
                    if rec.hash != hash {
                        return violation(
                            "log matching",
                            node,
                            Some(e.index),
                            format!(
                                "entry (index {}, term {}) of n{node} differs from the one n{} holds",
                                e.index, e.term, rec.node
                            ),
                        );
                    }
                    match (rec.prev_term, prev) {
                        (Some(a), Some(b)) if a != b => {
                            return violation(
                                "log matching",
                                node,
                                Some(e.index),
                                format!(
                                    "entry (index {}, term {}) follows term {b} on n{node} but term {a} on n{}",
                                    e.index, e.term, rec.node
                                ),
                            )
                        }
                        (None, Some(_)) => rec.prev_term = prev,
                        _ => {}
                    }
                }
            }
            prev = Some(e.term);
            prev_index = e.index;
        }
        Ok(())
    }

    /// An entry a node applied.
    pub fn observe_applied(&mut self, node: u64, e: &AppliedEntry) -> Result<(), Violation> {
        let outcome = outcome_key(&e.outcome);
        match self.applied.get(&e.index) {
            Some(rec) => {
                if rec.term != e.term || rec.proposal != e.proposal || rec.outcome != outcome {
                    return violation(
                        "state machine safety",
                        node,
                        Some(e.index),
                        format!(
                            "n{node} applied (term {}, proposal {:?}, {outcome}) but n{} applied (term {}, proposal {:?}, {})",
                            e.term, e.proposal, rec.node, rec.term, rec.proposal, rec.outcome
                        ),
                    );
                }
            }
            None => {
                self.applied.insert(
                    e.index,
                    AppliedRecord {
                        term: e.term,
                        proposal: e.proposal,
                        outcome,
                        node,
                    },
                );
                if e.index > self.max_applied {
                    self.max_applied = e.index;
                    self.commit_tips.push((self.max_term, e.index, e.term));
                }
            }
        }
        if let Some(id) = e.proposal {
            match self.proposals.get(&id) {
                Some(&i) if i != e.index => {
                    return violation(
                        "state machine safety",
                        node,
                        Some(e.index),
                        format!(
                            "proposal {id:?} applied at index {} and at index {i}",
                            e.index
                        ),
                    )
                }
                Some(_) => {}
                None => {
                    self.proposals.insert(id, e.index);
                }
            }
        }
        if let Outcome::ConfChanged(Ok(cs)) = &e.outcome {
            if e.index > self.conf_index {
                self.conf_index = e.index;
                self.voters = sorted(&cs.voters);
            }
        }
        Ok(())
    }

    /// A node's state machine after a step: applied index and state hash.
    pub fn observe_state(
        &mut self,
        node: u64,
        incarnation: u64,
        applied: u64,
        hash: u64,
    ) -> Result<(), Violation> {
        match self.progress.get(&node) {
            Some(p) if p.incarnation == incarnation && applied < p.applied => {
                return violation(
                    "monotonic apply",
                    node,
                    Some(applied),
                    format!(
                        "applied index of n{node} went back from {} to {applied} without a restart",
                        p.applied
                    ),
                )
            }
            _ => {}
        }
        self.progress.insert(
            node,
            Progress {
                incarnation,
                applied,
            },
        );
        self.same_state("identical state", node, applied, hash)
    }

    /// A node's newest snapshot (installed from the leader, or its own compaction).
    pub fn observe_snapshot(&mut self, node: u64, index: u64, hash: u64) -> Result<(), Violation> {
        self.same_state("snapshot integrity", node, index, hash)
    }

    fn same_state(
        &mut self,
        invariant: &'static str,
        node: u64,
        index: u64,
        hash: u64,
    ) -> Result<(), Violation> {
        match self.states.get(&index) {
            Some(&(h, other)) if h != hash => violation(
                invariant,
                node,
                Some(index),
                format!("state of n{node} at applied index {index} differs from that of n{other}"),
            ),
            Some(_) => Ok(()),
            None => {
                self.states.insert(index, (hash, node));
                Ok(())
            }
        }
    }

    /// A client starts a linearizable read with this context.
    pub fn observe_read_started(&mut self, ctx: Vec<u8>) {
        let (tip, _) = self.committed_tip();
        self.reads.insert(ctx, tip);
    }

    /// A node served the read `ctx` from a state at `applied`.
    pub fn observe_read_served(
        &mut self,
        node: u64,
        ctx: &[u8],
        applied: u64,
    ) -> Result<(), Violation> {
        let Some(&floor) = self.reads.get(ctx) else {
            return Ok(());
        };
        if applied < floor {
            return violation(
                "linearizable reads",
                node,
                Some(applied),
                format!(
                    "n{node} served read {:?} at applied index {applied}, but index {floor} had been applied before the read started",
                    String::from_utf8_lossy(ctx)
                ),
            );
        }
        Ok(())
    }

    /// Reads not served (yet).
    pub fn reads_outstanding(&self) -> usize {
        self.reads.len()
    }

    /// A message a node handed to the network: what it promises to remember.
    pub fn observe_sent(&mut self, node: u64, m: &Message) {
        let p = self.promises.entry(node).or_default();
        match m.get_msg_type() {
            // A pre-vote carries the term the node *would* campaign in.
            MessageType::MsgRequestPreVote | MessageType::MsgRequestPreVoteResponse => {}
            MessageType::MsgRequestVoteResponse => {
                p.max_term = p.max_term.max(m.term);
                if !m.reject && p.vote.is_none_or(|(t, _)| t < m.term) {
                    p.vote = Some((m.term, m.to));
                }
            }
            MessageType::MsgAppendResponse => {
                p.max_term = p.max_term.max(m.term);
                if !m.reject && p.ack.is_none_or(|a| a < (m.term, m.index)) {
                    p.ack = Some((m.term, m.index));
                }
            }
            _ => p.max_term = p.max_term.max(m.term),
        }
    }

    /// After a crash: the disk (hard state, last log index) must still hold what
    /// the node promised.
    pub fn check_recovered(
        &self,
        node: u64,
        hs: &HardState,
        last_index: u64,
    ) -> Result<(), Violation> {
        let Some(p) = self.promises.get(&node) else {
            return Ok(());
        };
        if hs.term < p.max_term {
            return violation(
                "durable promises",
                node,
                None,
                format!(
                    "n{node} sent messages in term {} but its disk recovers term {}",
                    p.max_term, hs.term
                ),
            );
        }
        if let Some((term, cand)) = p.vote {
            if hs.term == term && hs.vote != cand {
                return violation(
                    "durable promises",
                    node,
                    None,
                    format!(
                        "n{node} granted its term-{term} vote to n{cand} but its disk recovers a vote for n{}",
                        hs.vote
                    ),
                );
            }
        }
        if let Some((term, index)) = p.ack {
            if hs.term == term && last_index < index {
                return violation(
                    "durable promises",
                    node,
                    Some(index),
                    format!(
                        "n{node} acknowledged log entries up to {index} in term {term} but its disk recovers only up to {last_index}"
                    ),
                );
            }
        }
        Ok(())
    }

    /// `holders` voters (of [`Checker::voters`]) hold the newest committed entry: it
    /// must be enough that every quorum includes one of them.
    pub fn check_committed_held(&self, holders: &[u64], missing: &[u64]) -> Result<(), Violation> {
        let n = holders.len() + missing.len();
        if 2 * holders.len() >= n {
            return Ok(());
        }
        let (index, term) = self.committed_tip();
        violation(
            "committed entries survive",
            missing.first().copied().unwrap_or(0),
            Some(index),
            format!(
                "committed entry {index} (term {term}) is held by only {holders:?} of voters {:?}; nodes {missing:?} lost it or never had it",
                self.voters
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leader(term: u64) -> RoleState {
        RoleState {
            role: StateRole::Leader,
            term,
            leader: 0,
        }
    }

    #[test]
    fn two_leaders_in_one_term_are_caught() {
        let mut c = Checker::new(1, 1, &[1, 2, 3], 0);
        c.observe_role(1, leader(2), |_, _| true).unwrap();
        c.observe_role(1, leader(2), |_, _| true).unwrap();
        c.observe_role(2, leader(3), |_, _| true).unwrap();
        let v = c.observe_role(3, leader(2), |_, _| true).unwrap_err();
        assert_eq!(v.invariant, "election safety");
    }

    #[test]
    fn divergent_logs_are_caught() {
        let mut c = Checker::new(1, 1, &[1, 2, 3], 0);
        let e = |index, term, data: &'static [u8]| Entry {
            index,
            term,
            data: data.into(),
            ..Default::default()
        };
        c.observe_log(1, Some(1), &[e(2, 2, b"a"), e(3, 2, b"b")])
            .unwrap();
        c.observe_log(2, Some(1), &[e(2, 2, b"a")]).unwrap();
        assert!(c.observe_log(3, Some(1), &[e(2, 2, b"x")]).is_err());
        assert!(c.observe_log(3, Some(7), &[e(2, 2, b"a")]).is_err());
    }
}

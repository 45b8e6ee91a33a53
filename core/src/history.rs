//! The history of the cluster: every applied command that an operator would ask
//! about ("why did bucket 12 move at 10:02?"), with who proposed it, when, and
//! the bucket moves it caused.
//!
//! It is part of the replicated state: every replica applies the same entries
//! with the same [`Stamp`] (carried in the entry context, see
//! [`crate::command::ProposalId::context`]), so every controller answers
//! `vipsharectl history` alike, and snapshots carry it. Bounded to
//! [`HISTORY_LEN`] events; older ones are dropped.
//!
//! Stored in chunks shared by `Arc`: the controller publishes a clone of the
//! state after every change, which then copies one chunk, not the history.

use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::command::Command;
use crate::state::ClusterState;

/// Events kept; older ones are dropped.
pub const HISTORY_LEN: usize = 10_000;
const CHUNK: usize = 256;

/// Who proposed an entry, and when by the proposer's wall clock (ms since the
/// Unix epoch). Informational: nothing decides on it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stamp {
    pub at_ms: u64,
    /// An admin's identity, `leader` for the leader's own decisions, or a member
    /// for its agent's requests.
    pub by: String,
}

/// One bucket's owner change ("" = no owner).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub bucket: u32,
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub index: u64,
    pub at_ms: u64,
    pub by: String,
    /// What happened and why, in words.
    pub what: String,
    /// The members it is about (for filtering), besides those in `moves`.
    pub members: Vec<String>,
    pub moves: Vec<Move>,
}

impl Event {
    pub fn concerns_member(&self, m: &str) -> bool {
        self.members.iter().any(|x| x == m) || self.moves.iter().any(|v| v.from == m || v.to == m)
    }

    pub fn concerns_bucket(&self, b: u32) -> bool {
        self.moves.iter().any(|v| v.bucket == b)
    }
}

/// The bounded event list.
#[derive(Debug, Clone, Default)]
pub struct History {
    chunks: Vec<Arc<Vec<Event>>>,
    len: usize,
}

impl History {
    pub fn push(&mut self, e: Event) {
        match self.chunks.last_mut() {
            Some(c) if c.len() < CHUNK => Arc::make_mut(c).push(e),
            _ => self.chunks.push(Arc::new(vec![e])),
        }
        self.len += 1;
        while self.len > HISTORY_LEN && !self.chunks.is_empty() {
            let dropped = self.chunks.remove(0);
            self.len -= dropped.len();
        }
    }

    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &Event> {
        self.chunks.iter().flat_map(|c| c.iter())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl PartialEq for History {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl Eq for History {}

impl Serialize for History {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for History {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let events = Vec::<Event>::deserialize(d)?;
        let mut h = History::default();
        for e in events {
            h.push(e);
        }
        Ok(h)
    }
}

/// Whether applying `cmd` can change a bucket's owner: only these do (see
/// `ClusterState::apply`); for the others no owners are copied to diff.
pub fn moves_owners(cmd: &Command) -> bool {
    matches!(
        cmd,
        Command::SetOwners { .. } | Command::FenceMember { .. } | Command::Transfer { .. }
    )
}

/// The owners of every bucket before `cmd`, to diff around the apply; empty
/// when `cmd` cannot move any (nothing to diff).
pub fn owners_before(s: &ClusterState, cmd: &Command) -> Vec<Option<String>> {
    if !moves_owners(cmd) {
        return Vec::new();
    }
    s.buckets.iter().map(|b| b.owner.clone()).collect()
}

/// The event for `cmd` applied at `index`, given the owners before it; `None`
/// when it is not worth a line (no-ops, commands that changed no owner and
/// explain nothing).
pub fn event(
    index: u64,
    stamp: &Stamp,
    cmd: &Command,
    before: &[Option<String>],
    after: &ClusterState,
) -> Option<Event> {
    let moves: Vec<Move> = before
        .iter()
        .zip(&after.buckets)
        .enumerate()
        .filter(|(_, (b, a))| **b != a.owner)
        .map(|(i, (b, a))| Move {
            bucket: i as u32,
            from: b.clone().unwrap_or_default(),
            to: a.owner.clone().unwrap_or_default(),
        })
        .collect();
    let (what, members) = describe(cmd, after)?;
    if moves.is_empty() && matches!(cmd, Command::SetOwners { .. } | Command::Transfer { .. }) {
        return None;
    }
    Some(Event {
        index,
        at_ms: stamp.at_ms,
        by: stamp.by.clone(),
        what,
        members,
        moves,
    })
}

/// What a command means to an operator, and whom it is about.
fn describe(cmd: &Command, after: &ClusterState) -> Option<(String, Vec<String>)> {
    let one = |what: String, m: &str| Some((what, vec![m.to_string()]));
    match cmd {
        Command::InitCluster { settings } => Some((
            format!("cluster initialised with {} buckets", settings.bucket_count),
            vec![],
        )),
        Command::AddVip { vip } => Some((format!("VIP {} added", vip.address), vec![])),
        Command::RemoveVip { address } => Some((format!("VIP {address} removed"), vec![])),
        Command::AddMember { name, weight } => one(
            format!(
                "member {name} added (weight {weight}): buckets once its agent is acknowledged"
            ),
            name,
        ),
        Command::RemoveMember { name } => one(format!("member {name} removed"), name),
        Command::SetWeight { name, weight } => {
            one(format!("weight of {name} set to {weight}: rebalance"), name)
        }
        Command::Drain { name } => one(format!("{name} drained: its buckets move away"), name),
        Command::Undrain { name } => one(format!("{name} undrained: rebalance"), name),
        Command::StopSelf { name } => one(
            format!("{name}'s agent stopping (planned): drained until it returns, no penalty"),
            name,
        ),
        Command::ResetMember { name } => one(
            format!("flap penalty and suppression of {name} cleared"),
            name,
        ),
        Command::SetOwners { .. } => Some(("unowned buckets given owners".into(), vec![])),
        Command::FenceMember {
            name,
            epoch,
            marked_by,
            ..
        } => {
            let m = after.members.get(name);
            if m.is_some_and(|m| m.stopped) {
                return one(
                    format!("{name} fenced after its planned stop (holds nothing; no penalty)"),
                    name,
                );
            }
            let penalty = m.map(|m| m.penalty.value).unwrap_or_default();
            let suppressed = if m.is_some_and(|m| m.suppressed) {
                ", suppressed"
            } else {
                ""
            };
            let at = if marked_by.is_empty() {
                "a majority of controllers".to_string()
            } else {
                let ids: Vec<String> = marked_by.iter().map(u64::to_string).collect();
                format!("controllers {}", ids.join(", "))
            };
            one(
                format!(
                    "{name} fenced: its lease (epoch {epoch}) ended unrenewed, marked at {at}; \
                     penalty {penalty}{suppressed}"
                ),
                name,
            )
        }
        Command::Readmit { name, .. } => one(
            format!("{name} re-admitted: heartbeats steady again; rebalance"),
            name,
        ),
        Command::Release { name, buckets } => one(
            format!(
                "{name} asked to release {} bucket(s) (rebalance)",
                buckets.len()
            ),
            name,
        ),
        Command::Transfer { from, .. } => one(
            format!("handed over after {from} confirmed the release"),
            from,
        ),
        Command::Evict { name, epoch } => one(
            format!("{name} evicted at epoch {epoch}: never confirmed a release"),
            name,
        ),
        Command::Revoke { serial } => Some((format!("certificate {serial} revoked"), vec![])),
        Command::Unrevoke { serial } => {
            Some((format!("certificate {serial} no longer revoked"), vec![]))
        }
        Command::Noop { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(index: u64) -> Event {
        Event {
            index,
            at_ms: index,
            by: "leader".into(),
            what: "x".into(),
            members: vec![],
            moves: vec![],
        }
    }

    #[test]
    fn bounded_and_round_trips() {
        let mut h = History::default();
        for i in 0..(HISTORY_LEN as u64 + 300) {
            h.push(ev(i));
        }
        assert!(h.len() <= HISTORY_LEN && h.len() > HISTORY_LEN - CHUNK);
        assert_eq!(
            h.iter().last().map(|e| e.index),
            Some(HISTORY_LEN as u64 + 299)
        );
        let json = serde_json::to_string(&h).unwrap();
        let back: History = serde_json::from_str(&json).unwrap();
        assert_eq!(back, h);
        // A clone shares all but the chunk being written.
        let c = h.clone();
        h.push(ev(1));
        assert_ne!(c, h);
    }
}

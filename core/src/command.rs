//! Commands: what a raft log entry asks the state machine to do.
//!
//! Entries carry a command as JSON (readable in a log dump, and tolerant of new
//! optional fields) and the proposer's [`ProposalId`] in the entry context, so the
//! proposer can match the applied entry to the request that waits for it.

use serde::{Deserialize, Serialize};

pub use crate::history::Stamp;
use crate::state::{Settings, Vip};

/// Identifies one proposal: the proposing controller and its own sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProposalId {
    pub node: u64,
    pub seq: u64,
}

impl ProposalId {
    pub fn to_bytes(self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16);
        v.extend_from_slice(&self.node.to_be_bytes());
        v.extend_from_slice(&self.seq.to_be_bytes());
        v
    }

    /// The entry context: the id, then the proposer's [`Stamp`] (8 bytes of
    /// milliseconds, then who, UTF-8) for the history.
    pub fn context(self, stamp: &Stamp) -> Vec<u8> {
        let mut v = self.to_bytes();
        v.extend_from_slice(&stamp.at_ms.to_be_bytes());
        v.extend_from_slice(stamp.by.as_bytes());
        v
    }

    /// `None` for entries proposed without an id (raft's own empty entries).
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let node = u64::from_be_bytes(b.get(..8)?.try_into().ok()?);
        let seq = u64::from_be_bytes(b.get(8..16)?.try_into().ok()?);
        (b.len() == 16 || b.len() >= 24).then_some(ProposalId { node, seq })
    }
}

/// The [`Stamp`] of an entry context written by [`ProposalId::context`];
/// entries written before stamps existed have none.
pub fn stamp_of(context: &[u8]) -> Stamp {
    let at_ms = context
        .get(16..24)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or_default();
    let by = context
        .get(24..)
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default();
    Stamp { at_ms, by }
}

/// One change of bucket ownership. Applying it bumps the bucket's epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerChange {
    pub bucket: u32,
    pub owner: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    InitCluster {
        settings: Settings,
    },
    AddVip {
        vip: Vip,
    },
    RemoveVip {
        address: std::net::IpAddr,
    },
    AddMember {
        name: String,
        weight: u32,
    },
    RemoveMember {
        name: String,
    },
    SetWeight {
        name: String,
        weight: u32,
    },
    Drain {
        name: String,
    },
    Undrain {
        name: String,
    },
    /// The member's agent is stopping on purpose (SIGTERM): drain it like `Drain`,
    /// but its coming fence is not a flap (no penalty) and its return undrains it.
    StopSelf {
        name: String,
    },
    /// Operator: forget a member's flap penalty and suppression (it is re-admitted
    /// once it heartbeats steadily, like any fenced member).
    ResetMember {
        name: String,
    },
    /// Give unowned buckets to members. Refused for a bucket that has an owner:
    /// owned buckets move only by `Release` + `Transfer`, or by `FenceMember`.
    SetOwners {
        changes: Vec<OwnerChange>,
    },
    /// A majority of controllers agreed that `name`'s lease at `epoch` has ended:
    /// mark it down, bump its epoch and free its buckets. `at_ms` (leader wall
    /// clock) stamps the damping penalty.
    FenceMember {
        name: String,
        epoch: u64,
        at_ms: u64,
        /// The controllers that marked the lease ended (the fence round's
        /// majority); empty for a fence that needed no round (a planned stop).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        marked_by: Vec<u64>,
    },
    /// A fenced member heartbeats steadily again and may get buckets.
    Readmit {
        name: String,
        epoch: u64,
    },
    /// Ask `name` to withdraw these buckets from its kernel and confirm.
    Release {
        name: String,
        buckets: Vec<u32>,
    },
    /// `from` confirmed it withdrew these buckets (at these epochs): hand them over.
    Transfer {
        from: String,
        to: Option<String>,
        buckets: Vec<(u32, u64)>,
    },
    /// Controllers stop acking `name` at `epoch`, so it can be fenced although it
    /// still heartbeats (a member that never confirms a release).
    Evict {
        name: String,
        epoch: u64,
    },
    /// Put a certificate serial (lowercase hex, no leading zeros) on the deny-list:
    /// controllers refuse every connection and call presenting it.
    Revoke {
        serial: String,
    },
    /// Take a serial off the deny-list again.
    Unrevoke {
        serial: String,
    },
    /// Changes nothing; used to measure commit latency and to test the log.
    Noop {
        payload: Vec<u8>,
    },
}

impl Command {
    pub fn encode(&self) -> Vec<u8> {
        // Serialising these plain data types cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(data: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(data)
    }
}

/// The address of a controller being added, carried in a `ConfChangeV2` context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerAddress {
    pub id: u64,
    pub address: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proposal_id_round_trips_and_rejects_other_lengths() {
        let id = ProposalId { node: 3, seq: 77 };
        assert_eq!(ProposalId::from_bytes(&id.to_bytes()), Some(id));
        assert_eq!(ProposalId::from_bytes(&[]), None);
        assert_eq!(ProposalId::from_bytes(&[0; 17]), None);
    }

    #[test]
    fn command_round_trips() {
        let c = Command::SetOwners {
            changes: vec![OwnerChange {
                bucket: 4,
                owner: Some("h1".into()),
            }],
        };
        assert_eq!(Command::decode(&c.encode()).ok(), Some(c));
        assert!(Command::decode(b"{\"op\":\"launch_missiles\"}").is_err());
    }
}

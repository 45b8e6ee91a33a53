//! The agent's durable state: what a restarted agent must still know so that it
//! never installs a bucket it gave up, nor counts acks it cannot judge.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::lease::LeaseTiming;

/// Kept in a file the driver writes and fsyncs on every [`super::Command::Persist`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentState {
    /// Per bucket, the lowest grant epoch the agent may still install: a grant
    /// raises it to its epoch, a release past it.
    pub floors: BTreeMap<u32, u64>,
    /// The voters learned from the controllers (empty: none learned yet).
    pub voters: BTreeSet<u64>,
    /// The cluster's lease timing (`None`: not learned yet, so no lease).
    pub timing: Option<LeaseTiming>,
    /// The controllers (id -> address) the cluster last listed: a restart
    /// also connects to these, so an agent whose configured controllers were
    /// all replaced still finds the cluster.
    #[serde(default)]
    pub controllers: BTreeMap<u64, String>,
    /// Whose state this is: the cluster's ID and the member name, so that a
    /// state left by another cluster (rebuilt with a new CA) or another
    /// member is not taken for this one's (its floors would refuse grants
    /// whose epochs mean nothing to it). `None` in files older than this.
    #[serde(default)]
    pub owner: Option<String>,
}

impl AgentState {
    /// Whether a grant of `bucket` at `epoch` may go into the kernel.
    pub fn admits(&self, bucket: u32, epoch: u64) -> bool {
        self.floors.get(&bucket).is_none_or(|&f| epoch >= f)
    }

    /// Raise `bucket`'s floor to `floor`; whether it moved.
    pub fn raise(&mut self, bucket: u32, floor: u64) -> bool {
        let f = self.floors.entry(bucket).or_insert(0);
        if *f >= floor {
            return false;
        }
        *f = floor;
        true
    }

    /// Whether a state loaded from disk may be used by `owner`: written by it,
    /// or by a version that did not record its owner.
    pub fn belongs_to(&self, owner: &str) -> bool {
        self.owner.as_deref().is_none_or(|o| o == owner)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Parses a state file's text; the error says what is wrong with it.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let s: AgentState = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if let Some(t) = &s.timing {
            t.validate().map_err(|e| format!("timing: {e}"))?;
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floors_only_rise_and_survive_a_round_trip() {
        let mut s = AgentState::default();
        assert!(s.admits(3, 1));
        assert!(s.raise(3, 5));
        assert!(!s.raise(3, 4), "never lowered");
        assert!(!s.admits(3, 4) && s.admits(3, 5));
        s.voters = [1, 2, 3].into();
        s.timing = Some(LeaseTiming::default());
        let back = AgentState::from_json(&s.to_json()).unwrap();
        assert_eq!(back, s);
        s.owner = Some("c1/web-1".into());
        assert!(s.belongs_to("c1/web-1") && !s.belongs_to("c2/web-1"));
        assert!(
            AgentState::default().belongs_to("c2/web-1"),
            "an older file"
        );
        assert!(AgentState::from_json("{\"floors\": 3}")
            .unwrap_err()
            .contains("invalid type"));
    }
}

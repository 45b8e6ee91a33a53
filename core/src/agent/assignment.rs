//! An assignment from a controller's stream, checked and without wire types.

use std::collections::{BTreeMap, BTreeSet};

use crate::lease::LeaseTiming;
use crate::state::ClusterState;

/// A controller as an assignment lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Controller {
    pub id: u64,
    pub address: String,
    pub voter: bool,
}

/// What a controller streams to one member, from its applied state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub applied_index: u64,
    /// 0: the member is unknown to that controller.
    pub member_epoch: u64,
    /// `None` until the cluster is initialised.
    pub timing: Option<LeaseTiming>,
    /// bucket -> grant epoch, buckets the member may accept.
    pub owned: BTreeMap<u32, u64>,
    /// bucket -> grant epoch, buckets the member must withdraw and confirm.
    pub release: BTreeMap<u32, u64>,
    pub controllers: Vec<Controller>,
}

impl Assignment {
    /// What a controller streams to `member` from its applied state at
    /// `applied_index`: the grants for the member, its epoch, the timing and
    /// the controllers (`voters`: the applied voter set).
    pub fn of(
        state: &ClusterState,
        applied_index: u64,
        voters: &[u64],
        member: &str,
    ) -> Assignment {
        let grants = |releasing: bool| {
            (0u32..)
                .zip(&state.buckets)
                .filter(|(_, b)| b.owner.as_deref() == Some(member) && b.releasing == releasing)
                .map(|(i, b)| (i, b.epoch))
                .collect()
        };
        Assignment {
            applied_index,
            member_epoch: state.members.get(member).map_or(0, |m| m.epoch),
            timing: state.settings.as_ref().map(|s| s.lease),
            owned: grants(false),
            release: grants(true),
            controllers: state
                .controllers
                .iter()
                .map(|(&id, address)| Controller {
                    id,
                    address: address.clone(),
                    voter: voters.contains(&id),
                })
                .collect(),
        }
    }

    /// Whether a stream sends `self` after `old`: on a change of anything but
    /// the applied index.
    pub fn differs(&self, old: &Assignment) -> bool {
        self.member_epoch != old.member_epoch
            || self.timing != old.timing
            || self.owned != old.owned
            || self.release != old.release
            || self.controllers != old.controllers
    }

    pub fn voters(&self) -> BTreeSet<u64> {
        self.controllers
            .iter()
            .filter(|c| c.voter)
            .map(|c| c.id)
            .collect()
    }
}

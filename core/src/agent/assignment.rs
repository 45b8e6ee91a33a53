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

/// Whose assignments changed ([`Assignment::changed_members`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    All,
    Members(BTreeSet<String>),
}

impl Changed {
    pub fn concerns(&self, member: &str) -> bool {
        match self {
            Changed::All => true,
            Changed::Members(m) => m.contains(member),
        }
    }
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

    /// Whose assignment ([`Self::of`], the settings aside) can differ between
    /// the applied `old` and `new` states, each with its voter set: the members
    /// a bucket moved from or to (or whose grant epoch or release flag
    /// changed), and those whose epoch changed or who came or went. A change of
    /// settings, controllers or voters concerns everyone. One pass over the
    /// map, so a controller can wake only the streams concerned.
    pub fn changed_members(
        old: &ClusterState,
        old_voters: &[u64],
        new: &ClusterState,
        new_voters: &[u64],
    ) -> Changed {
        if old.settings != new.settings
            || old.controllers != new.controllers
            || old_voters != new_voters
            || old.buckets.len() != new.buckets.len()
        {
            return Changed::All;
        }
        let mut members = BTreeSet::new();
        for (o, n) in old.buckets.iter().zip(&new.buckets) {
            if o.owner != n.owner || o.epoch != n.epoch || o.releasing != n.releasing {
                members.extend(o.owner.iter().chain(&n.owner).cloned());
            }
        }
        let epoch = |s: &ClusterState, m: &str| s.members.get(m).map(|m| m.epoch);
        for m in old.members.keys().chain(new.members.keys()) {
            if epoch(old, m) != epoch(new, m) {
                members.insert(m.clone());
            }
        }
        Changed::Members(members)
    }

    pub fn voters(&self) -> BTreeSet<u64> {
        self.controllers
            .iter()
            .filter(|c| c.voter)
            .map(|c| c.id)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Command, OwnerChange};

    /// Every member whose streamed assignment differs is named, and nobody else.
    #[test]
    fn changed_members_names_exactly_those_whose_assignment_differs() {
        let names = ["a", "b", "c", "d"];
        let mut s = crate::ownership::tests::cluster(&names);
        let changes = (0..16)
            .map(|bucket| OwnerChange {
                bucket,
                owner: Some(names[bucket as usize % 3].to_string()),
            })
            .collect();
        let steps = [
            Command::SetOwners { changes },
            Command::Release {
                name: "a".into(),
                buckets: vec![0],
            },
            Command::Transfer {
                from: "a".into(),
                to: Some("b".into()),
                buckets: vec![(0, 1)],
            },
            Command::FenceMember {
                name: "c".into(),
                epoch: 1,
                at_ms: 0,
                marked_by: vec![],
            },
            Command::AddMember {
                name: "e".into(),
                weight: 1,
            },
            Command::Noop { payload: vec![] },
        ];
        let voters = [1, 2, 3];
        for cmd in steps {
            let old = s.clone();
            s.apply(cmd.clone()).unwrap();
            let changed = Assignment::changed_members(&old, &voters, &s, &voters);
            assert_ne!(changed, Changed::All, "{cmd:?}");
            for m in ["a", "b", "c", "d", "e"] {
                let differs =
                    Assignment::of(&s, 0, &voters, m).differs(&Assignment::of(&old, 0, &voters, m));
                assert_eq!(changed.concerns(m), differs, "{m} after {cmd:?}");
            }
        }
        assert_eq!(
            s.buckets[0].owner.as_deref(),
            Some("b"),
            "the transfer applied"
        );
        assert!(!Assignment::changed_members(&s, &voters, &s, &voters).concerns("a"));
        assert_eq!(
            Assignment::changed_members(&s, &voters, &s, &[1, 2]),
            Changed::All,
            "a voter change concerns everyone"
        );
    }
}

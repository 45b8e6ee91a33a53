//! The replicated state machine: cluster settings, controllers, members and the
//! bucket map. `apply` is deterministic and never reads a clock: every controller
//! applying the same entries reaches the same state, byte for byte.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::bucket::{validate_bucket_count, Affinity, BucketFn};
use crate::command::{Command, OwnerChange};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vip {
    pub address: String,
    pub prefix_len: u8,
    /// Multicast MAC answered in ARP for this VIP.
    pub mac: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    pub vips: Vec<Vip>,
    pub bucket_count: u32,
    pub bucket_fn: BucketFn,
    pub affinity: Affinity,
    pub seed: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    Active,
    /// Takes no new buckets; its buckets move away with their connections kept.
    Draining,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub weight: u32,
    pub state: MemberState,
    /// Bumped whenever the member is fenced or re-admitted (see leases).
    pub epoch: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    pub owner: Option<String>,
    /// Increases on every ownership change; agents ignore older epochs.
    pub epoch: u64,
    /// The member that last owned this bucket, so a returning member gets it back.
    pub home: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub settings: Option<Settings>,
    pub members: BTreeMap<String, Member>,
    pub buckets: Vec<Bucket>,
    /// Controller raft id -> address, maintained from applied configuration changes.
    pub controllers: BTreeMap<u64, String>,
    /// Raft index of the last applied entry.
    pub applied: u64,
}

/// A command that was committed but refused by the state machine. Every replica
/// refuses it identically, so the state stays the same everywhere.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("cluster is not initialised; run `vipsharectl cluster init` first")]
    NotInitialized,
    #[error("cluster is already initialised")]
    AlreadyInitialized,
    #[error("invalid settings: {0}")]
    InvalidSettings(String),
    #[error("VIP {0} already exists")]
    VipExists(String),
    #[error("no VIP {0}")]
    NoSuchVip(String),
    #[error("member {0} already exists")]
    MemberExists(String),
    #[error("no member named {0}")]
    NoSuchMember(String),
    #[error("weight must be between 1 and 1000, got {0}")]
    BadWeight(u32),
    #[error("bucket {bucket} out of range (bucket count {count})")]
    BadBucket { bucket: u32, count: u32 },
    #[error("undecodable command: {0}")]
    Undecodable(String),
}

impl ClusterState {
    /// The state every founding controller starts from.
    pub fn bootstrap(controllers: &[(u64, String)]) -> Self {
        ClusterState {
            controllers: controllers.iter().cloned().collect(),
            ..Default::default()
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(data: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(data)
    }

    pub fn initialized(&self) -> bool {
        self.settings.is_some()
    }

    pub fn owned_by<'a>(&'a self, member: &'a str) -> impl Iterator<Item = u32> + 'a {
        (0u32..)
            .zip(&self.buckets)
            .filter(move |(_, b)| b.owner.as_deref() == Some(member))
            .map(|(i, _)| i)
    }

    pub fn unowned(&self) -> usize {
        self.buckets.iter().filter(|b| b.owner.is_none()).count()
    }

    pub fn apply(&mut self, cmd: Command) -> Result<(), ApplyError> {
        match cmd {
            Command::InitCluster { settings } => {
                if self.initialized() {
                    return Err(ApplyError::AlreadyInitialized);
                }
                validate_bucket_count(settings.bucket_count)
                    .map_err(|e| ApplyError::InvalidSettings(e.to_string()))?;
                self.buckets = vec![Bucket::default(); settings.bucket_count as usize];
                self.settings = Some(settings);
                Ok(())
            }
            Command::AddVip { vip } => {
                let s = self.settings_mut()?;
                if s.vips.iter().any(|v| v.address == vip.address) {
                    return Err(ApplyError::VipExists(vip.address));
                }
                s.vips.push(vip);
                Ok(())
            }
            Command::RemoveVip { address } => {
                let s = self.settings_mut()?;
                let before = s.vips.len();
                s.vips.retain(|v| v.address != address);
                if s.vips.len() == before {
                    return Err(ApplyError::NoSuchVip(address));
                }
                Ok(())
            }
            Command::AddMember { name, weight } => {
                self.settings_mut()?;
                check_weight(weight)?;
                if self.members.contains_key(&name) {
                    return Err(ApplyError::MemberExists(name));
                }
                self.members.insert(
                    name,
                    Member {
                        weight,
                        state: MemberState::Active,
                        epoch: 1,
                    },
                );
                Ok(())
            }
            Command::RemoveMember { name } => {
                self.member_mut(&name)?;
                self.members.remove(&name);
                let freed: Vec<OwnerChange> = self
                    .owned_by(&name)
                    .map(|bucket| OwnerChange {
                        bucket,
                        owner: None,
                    })
                    .collect();
                self.set_owners(freed)
            }
            Command::SetWeight { name, weight } => {
                check_weight(weight)?;
                self.member_mut(&name)?.weight = weight;
                Ok(())
            }
            Command::Drain { name } => {
                self.member_mut(&name)?.state = MemberState::Draining;
                Ok(())
            }
            Command::Undrain { name } => {
                self.member_mut(&name)?.state = MemberState::Active;
                Ok(())
            }
            Command::SetOwners { changes } => self.set_owners(changes),
            Command::Noop { .. } => Ok(()),
        }
    }

    fn settings_mut(&mut self) -> Result<&mut Settings, ApplyError> {
        self.settings.as_mut().ok_or(ApplyError::NotInitialized)
    }

    fn member_mut(&mut self, name: &str) -> Result<&mut Member, ApplyError> {
        self.members
            .get_mut(name)
            .ok_or_else(|| ApplyError::NoSuchMember(name.to_string()))
    }

    /// All-or-nothing: a batch with one bad change changes nothing.
    fn set_owners(&mut self, changes: Vec<OwnerChange>) -> Result<(), ApplyError> {
        let count = self.buckets.len() as u32;
        for c in &changes {
            if c.bucket >= count {
                return Err(ApplyError::BadBucket {
                    bucket: c.bucket,
                    count,
                });
            }
            if let Some(o) = &c.owner {
                if !self.members.contains_key(o) {
                    return Err(ApplyError::NoSuchMember(o.clone()));
                }
            }
        }
        for c in changes {
            let b = &mut self.buckets[c.bucket as usize];
            if b.owner != c.owner {
                b.epoch += 1;
                if c.owner.is_some() {
                    b.home = c.owner.clone();
                }
                b.owner = c.owner;
            }
        }
        Ok(())
    }
}

fn check_weight(w: u32) -> Result<(), ApplyError> {
    if (1..=1000).contains(&w) {
        Ok(())
    } else {
        Err(ApplyError::BadWeight(w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(b: u32) -> Settings {
        Settings {
            vips: vec![],
            bucket_count: b,
            bucket_fn: BucketFn::Jhash,
            affinity: Affinity::Address,
            seed: 7,
        }
    }

    fn cluster() -> ClusterState {
        let mut s = ClusterState::default();
        s.apply(Command::InitCluster {
            settings: settings(8),
        })
        .unwrap();
        for m in ["a", "b"] {
            s.apply(Command::AddMember {
                name: m.into(),
                weight: 1,
            })
            .unwrap();
        }
        s
    }

    fn own(bucket: u32, owner: Option<&str>) -> OwnerChange {
        OwnerChange {
            bucket,
            owner: owner.map(String::from),
        }
    }

    #[test]
    fn refuses_bad_bucket_count_and_double_init() {
        let mut s = ClusterState::default();
        assert!(matches!(
            s.apply(Command::InitCluster {
                settings: settings(3)
            }),
            Err(ApplyError::InvalidSettings(_))
        ));
        assert!(!s.initialized());
        let mut s = cluster();
        assert_eq!(
            s.apply(Command::InitCluster {
                settings: settings(8)
            }),
            Err(ApplyError::AlreadyInitialized)
        );
    }

    #[test]
    fn ownership_changes_bump_epochs_and_are_all_or_nothing() {
        let mut s = cluster();
        s.apply(Command::SetOwners {
            changes: vec![own(0, Some("a")), own(1, Some("b"))],
        })
        .unwrap();
        assert_eq!(s.buckets[0].epoch, 1);
        let before = s.clone();
        assert_eq!(
            s.apply(Command::SetOwners {
                changes: vec![own(0, Some("b")), own(9, Some("a"))]
            }),
            Err(ApplyError::BadBucket {
                bucket: 9,
                count: 8
            })
        );
        assert_eq!(s, before);
        // Re-asserting the current owner is not a change.
        s.apply(Command::SetOwners {
            changes: vec![own(0, Some("a"))],
        })
        .unwrap();
        assert_eq!(s.buckets[0].epoch, 1);
    }

    #[test]
    fn removing_a_member_frees_its_buckets_but_keeps_home() {
        let mut s = cluster();
        s.apply(Command::SetOwners {
            changes: vec![own(2, Some("a"))],
        })
        .unwrap();
        s.apply(Command::RemoveMember { name: "a".into() }).unwrap();
        assert_eq!(s.buckets[2].owner, None);
        assert_eq!(s.buckets[2].epoch, 2);
        assert_eq!(s.buckets[2].home.as_deref(), Some("a"));
        assert_eq!(
            s.apply(Command::Drain { name: "a".into() }),
            Err(ApplyError::NoSuchMember("a".into()))
        );
    }

    #[test]
    fn snapshot_encoding_round_trips() {
        let s = cluster();
        assert_eq!(ClusterState::decode(&s.encode()).unwrap(), s);
    }
}

//! The replicated state machine: cluster settings, controllers, members and the
//! bucket map. `apply` is deterministic and never reads a clock: every controller
//! applying the same entries reaches the same state, byte for byte.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::bucket::{validate, Affinity, BucketFn};
use crate::command::{Command, OwnerChange};
use crate::damping::{Damping, Penalty};
use crate::lease::LeaseTiming;

pub use crate::net::Vip;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    pub vips: Vec<Vip>,
    pub bucket_count: u32,
    pub bucket_fn: BucketFn,
    pub affinity: Affinity,
    pub seed: u32,
    #[serde(default)]
    pub lease: LeaseTiming,
    #[serde(default)]
    pub damping: Damping,
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
    /// What the operator asked for.
    pub state: MemberState,
    /// Bumped whenever the member is fenced; heartbeats must carry the current one.
    pub epoch: u64,
    /// Fenced (its lease ended) and not yet re-admitted: holds and gets no buckets.
    #[serde(default)]
    pub down: bool,
    /// Down because of repeated lease losses: re-admitted only once the penalty
    /// decayed below `damping.reuse`.
    #[serde(default)]
    pub suppressed: bool,
    /// Controllers refuse its heartbeats at `epoch` (see `Command::Evict`).
    #[serde(default)]
    pub evicted: bool,
    #[serde(default)]
    pub penalty: Penalty,
    /// Drained by its own agent stopping (`Command::StopSelf`), not by an operator.
    #[serde(default)]
    pub stopped: bool,
    /// Log index of the last `Release` of one of its buckets: controllers ack
    /// no heartbeat that acts on an older assignment (`heartbeat::answer`).
    #[serde(default)]
    pub released_at: u64,
}

impl Member {
    fn new(weight: u32) -> Self {
        Member {
            weight,
            state: MemberState::Active,
            epoch: 1,
            down: false,
            suppressed: false,
            evicted: false,
            penalty: Penalty::default(),
            stopped: false,
            released_at: 0,
        }
    }

    /// May receive buckets (also needs a live lease, which the leader checks).
    pub fn assignable(&self) -> bool {
        self.state == MemberState::Active && !self.down
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    pub owner: Option<String>,
    /// Increases on every ownership change; agents ignore older epochs.
    pub epoch: u64,
    /// The member that last owned this bucket, so a returning member gets it back.
    pub home: Option<String>,
    /// The owner was asked to withdraw it and has not confirmed yet.
    #[serde(default)]
    pub releasing: bool,
}

impl crate::policy::BucketSlot for Bucket {
    fn owner(&self) -> Option<&str> {
        self.owner.as_deref()
    }
    fn home(&self) -> Option<&str> {
        self.home.as_deref()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub settings: Option<Settings>,
    pub members: BTreeMap<String, Member>,
    pub buckets: Vec<Bucket>,
    /// Last epoch of removed members: a member added again continues above it, so
    /// its agent and old fence marks never see an epoch twice.
    #[serde(default)]
    pub retired: BTreeMap<String, u64>,
    /// Controller raft id -> address, maintained from applied configuration changes.
    pub controllers: BTreeMap<u64, String>,
    /// Raft index of the last applied entry.
    pub applied: u64,
    /// Revoked certificate serials (lowercase hex, no leading zeros), refused by
    /// every controller.
    #[serde(default)]
    pub revoked: BTreeSet<String>,
    /// What happened and why, newest last (bounded).
    #[serde(default)]
    pub history: crate::history::History,
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
    VipExists(std::net::IpAddr),
    #[error("no VIP {0}")]
    NoSuchVip(std::net::IpAddr),
    #[error("member {0} already exists")]
    MemberExists(String),
    #[error("no member named {0}")]
    NoSuchMember(String),
    #[error("weight must be between 1 and 1000, got {0}")]
    BadWeight(u32),
    #[error("bucket {bucket} out of range (bucket count {count})")]
    BadBucket { bucket: u32, count: u32 },
    #[error("bucket {bucket} is owned by {owner}; owned buckets move by release or fencing")]
    BucketOwned { bucket: u32, owner: String },
    #[error("member {name} is at epoch {current}, not {epoch}")]
    StaleEpoch {
        name: String,
        epoch: u64,
        current: u64,
    },
    #[error(
        "member {name} still owns {buckets} buckets; drain it first (vipsharectl drain {name})"
    )]
    StillOwns { name: String, buckets: usize },
    #[error("member {0} is down; it cannot get buckets")]
    MemberDown(String),
    #[error("undecodable command: {0}")]
    Undecodable(String),
    #[error("{0:?} is not a certificate serial (lowercase hex without leading zeros, at most {MAX_SERIAL_HEX} digits)")]
    BadSerial(String),
    #[error("serial {0} is already revoked")]
    AlreadyRevoked(String),
    #[error("serial {0} is not revoked")]
    NotRevoked(String),
}

/// Longest certificate serial accepted, in hex digits.
pub const MAX_SERIAL_HEX: usize = 42;

/// Serials are stored in one spelling so that a lookup by a certificate's serial
/// finds them: lowercase hex digits without leading zeros ("0" for zero).
pub fn is_canonical_serial(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SERIAL_HEX
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && (s == "0" || !s.starts_with('0'))
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

    /// How many buckets each owner holds, in one pass over the map (members
    /// that own nothing are absent): per-member counts without N passes.
    pub fn owned_counts(&self) -> BTreeMap<&str, usize> {
        let mut counts = BTreeMap::new();
        for owner in self.buckets.iter().filter_map(|b| b.owner.as_deref()) {
            *counts.entry(owner).or_insert(0) += 1;
        }
        counts
    }

    pub fn unowned(&self) -> usize {
        self.buckets.iter().filter(|b| b.owner.is_none()).count()
    }

    /// [`Self::apply`], recording the event in the history when it succeeds.
    pub fn apply_stamped(
        &mut self,
        index: u64,
        stamp: &crate::history::Stamp,
        cmd: Command,
    ) -> Result<(), ApplyError> {
        // No event, so no copies: the commit benchmark proposes thousands a second.
        if matches!(cmd, Command::Noop { .. }) {
            return self.apply(cmd);
        }
        let before = crate::history::owners_before(self, &cmd);
        // Every ownership change bumps its bucket's epoch: a command outside
        // `moves_owners` that changed one would be missing from the history.
        let epochs = |s: &Self| s.buckets.iter().map(|b| b.epoch).sum::<u64>();
        let epochs_before = cfg!(debug_assertions).then(|| epochs(self));
        let described = cmd.clone();
        let releasing = |s: &Self| s.buckets.iter().filter(|b| b.releasing).count();
        let releasing_before = releasing(self);
        self.apply(cmd)?;
        if let Command::Release { name, .. } = &described {
            if releasing(self) > releasing_before {
                if let Some(m) = self.members.get_mut(name) {
                    m.released_at = index;
                }
            }
        }
        debug_assert!(
            crate::history::moves_owners(&described) || epochs_before == Some(epochs(self)),
            "{described:?} moved buckets but is not in history::moves_owners"
        );
        if let Some(e) = crate::history::event(index, stamp, &described, &before, self) {
            self.history.push(e);
        }
        Ok(())
    }

    pub fn apply(&mut self, cmd: Command) -> Result<(), ApplyError> {
        match cmd {
            Command::InitCluster { settings } => {
                if self.initialized() {
                    return Err(ApplyError::AlreadyInitialized);
                }
                validate(settings.bucket_fn, settings.affinity, settings.bucket_count)
                    .map_err(|e| ApplyError::InvalidSettings(e.to_string()))?;
                settings
                    .lease
                    .validate()
                    .map_err(ApplyError::InvalidSettings)?;
                settings
                    .damping
                    .validate()
                    .map_err(ApplyError::InvalidSettings)?;
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
                let mut m = Member::new(weight);
                if let Some(e) = self.retired.remove(&name) {
                    m.epoch = e + 1;
                }
                self.members.insert(name, m);
                Ok(())
            }
            Command::RemoveMember { name } => {
                self.member_mut(&name)?;
                let buckets = self.owned_by(&name).count();
                if buckets > 0 {
                    return Err(ApplyError::StillOwns { name, buckets });
                }
                if let Some(m) = self.members.remove(&name) {
                    self.retired.insert(name.clone(), m.epoch);
                }
                for b in &mut self.buckets {
                    if b.home.as_deref() == Some(name.as_str()) {
                        b.home = None;
                    }
                }
                Ok(())
            }
            Command::SetWeight { name, weight } => {
                check_weight(weight)?;
                self.member_mut(&name)?.weight = weight;
                Ok(())
            }
            Command::Drain { name } => {
                let m = self.member_mut(&name)?;
                m.state = MemberState::Draining;
                m.stopped = false;
                Ok(())
            }
            Command::Undrain { name } => {
                let m = self.member_mut(&name)?;
                m.state = MemberState::Active;
                m.stopped = false;
                Ok(())
            }
            Command::StopSelf { name } => {
                let m = self.member_mut(&name)?;
                // An operator's drain stays an operator's drain.
                if m.state == MemberState::Active {
                    m.state = MemberState::Draining;
                    m.stopped = true;
                }
                Ok(())
            }
            Command::ResetMember { name } => {
                let m = self.member_mut(&name)?;
                m.penalty = Penalty::default();
                m.suppressed = false;
                Ok(())
            }
            Command::SetOwners { changes } => self.set_owners(changes),
            Command::FenceMember {
                name, epoch, at_ms, ..
            } => {
                let damping = self
                    .settings
                    .as_ref()
                    .map(|s| s.damping)
                    .unwrap_or_default();
                let m = self.member_at(&name, epoch)?;
                m.down = true;
                m.evicted = false;
                m.epoch += 1;
                // A planned stop is not a flap.
                if !m.stopped {
                    m.penalty = damping.add_loss(m.penalty, at_ms);
                    m.suppressed = damping.current(m.penalty, at_ms) > damping.suppress;
                }
                for b in &mut self.buckets {
                    if b.owner.as_deref() == Some(name.as_str()) {
                        b.owner = None;
                        b.releasing = false;
                        b.epoch += 1;
                    }
                }
                Ok(())
            }
            Command::Readmit { name, epoch } => {
                let m = self.member_at(&name, epoch)?;
                m.down = false;
                m.suppressed = false;
                // Back from a planned stop: in service again, home buckets return.
                if m.stopped {
                    m.state = MemberState::Active;
                    m.stopped = false;
                }
                Ok(())
            }
            Command::Evict { name, epoch } => {
                self.member_at(&name, epoch)?.evicted = true;
                Ok(())
            }
            Command::Release { name, buckets } => {
                self.member_mut(&name)?;
                for bucket in buckets {
                    let b = self.bucket_mut(bucket)?;
                    if b.owner.as_deref() == Some(name.as_str()) {
                        b.releasing = true;
                    }
                }
                Ok(())
            }
            Command::Transfer { from, to, buckets } => {
                if let Some(to) = &to {
                    if !self.member_mut(to)?.assignable() {
                        return Err(ApplyError::MemberDown(to.clone()));
                    }
                }

                // Drained by a planned stop: the buckets stay home for its return.
                let keep_home = self.members.get(&from).is_some_and(|m| m.stopped);
                for (bucket, epoch) in buckets {
                    let b = self.bucket_mut(bucket)?;
                    // Stale confirmations (another epoch, no longer releasing) are
                    // skipped: the bucket moved on some other way.
                    if b.owner.as_deref() == Some(from.as_str()) && b.releasing && b.epoch == epoch
                    {
                        b.owner = to.clone();
                        b.releasing = false;
                        b.epoch += 1;
                        // A rebalancing move is where the bucket belongs in the
                        // balanced map; a failover (SetOwners) keeps the old home
                        // so a returning member gets its buckets back.
                        if to.is_some() && !keep_home {
                            b.home = to.clone();
                        }
                    }
                }
                Ok(())
            }
            Command::Revoke { serial } => {
                if !is_canonical_serial(&serial) {
                    return Err(ApplyError::BadSerial(serial));
                }
                if self.revoked.contains(&serial) {
                    return Err(ApplyError::AlreadyRevoked(serial));
                }
                self.revoked.insert(serial);
                Ok(())
            }
            Command::Unrevoke { serial } => {
                if !self.revoked.remove(&serial) {
                    return Err(ApplyError::NotRevoked(serial));
                }
                Ok(())
            }
            Command::Noop { .. } => Ok(()),
        }
    }

    fn member_at(&mut self, name: &str, epoch: u64) -> Result<&mut Member, ApplyError> {
        let m = self.member_mut(name)?;
        if m.epoch != epoch {
            return Err(ApplyError::StaleEpoch {
                name: name.to_string(),
                epoch,
                current: m.epoch,
            });
        }
        Ok(m)
    }

    fn bucket_mut(&mut self, bucket: u32) -> Result<&mut Bucket, ApplyError> {
        let count = self.buckets.len() as u32;
        self.buckets
            .get_mut(bucket as usize)
            .ok_or(ApplyError::BadBucket { bucket, count })
    }

    fn settings_mut(&mut self) -> Result<&mut Settings, ApplyError> {
        self.settings.as_mut().ok_or(ApplyError::NotInitialized)
    }

    fn member_mut(&mut self, name: &str) -> Result<&mut Member, ApplyError> {
        self.members
            .get_mut(name)
            .ok_or_else(|| ApplyError::NoSuchMember(name.to_string()))
    }

    /// All-or-nothing: a batch with one bad change changes nothing. Only unowned
    /// buckets can be given out this way, and only to members that may hold them.
    fn set_owners(&mut self, changes: Vec<OwnerChange>) -> Result<(), ApplyError> {
        let count = self.buckets.len() as u32;
        for c in &changes {
            let b = self
                .buckets
                .get(c.bucket as usize)
                .ok_or(ApplyError::BadBucket {
                    bucket: c.bucket,
                    count,
                })?;
            if let Some(owner) = b.owner.as_ref().filter(|o| Some(*o) != c.owner.as_ref()) {
                return Err(ApplyError::BucketOwned {
                    bucket: c.bucket,
                    owner: owner.clone(),
                });
            }
            if let Some(o) = &c.owner {
                let m = self
                    .members
                    .get(o)
                    .ok_or_else(|| ApplyError::NoSuchMember(o.clone()))?;
                if !m.assignable() {
                    return Err(ApplyError::MemberDown(o.clone()));
                }
            }
        }
        for c in changes {
            let b = &mut self.buckets[c.bucket as usize];
            if b.owner != c.owner {
                b.epoch += 1;
                if b.home.is_none() {
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
            lease: LeaseTiming::default(),
            damping: Damping::default(),
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
    fn reset_forgets_penalty_and_an_operators_drain_survives_a_stop() {
        let mut s = cluster();
        for epoch in 1..=3 {
            s.apply(Command::FenceMember {
                name: "a".into(),
                epoch,
                at_ms: 1000,
                marked_by: vec![],
            })
            .unwrap();
        }
        assert!(s.members["a"].suppressed);
        s.apply(Command::ResetMember { name: "a".into() }).unwrap();
        let a = &s.members["a"];
        assert!(!a.suppressed && a.penalty == Penalty::default() && a.down);

        s.apply(Command::Drain { name: "a".into() }).unwrap();
        s.apply(Command::StopSelf { name: "a".into() }).unwrap();
        assert!(!s.members["a"].stopped);
        let epoch = s.members["a"].epoch;
        s.apply(Command::Readmit {
            name: "a".into(),
            epoch,
        })
        .unwrap();
        assert_eq!(s.members["a"].state, MemberState::Draining);
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
    fn only_unowned_buckets_are_given_out_and_batches_are_all_or_nothing() {
        let mut s = cluster();
        s.apply(Command::SetOwners {
            changes: vec![own(0, Some("a")), own(1, Some("b"))],
        })
        .unwrap();
        assert_eq!(s.buckets[0].epoch, 1);
        assert_eq!(s.buckets[0].home.as_deref(), Some("a"));
        let before = s.clone();
        assert_eq!(
            s.apply(Command::SetOwners {
                changes: vec![own(2, Some("b")), own(9, Some("a"))]
            }),
            Err(ApplyError::BadBucket {
                bucket: 9,
                count: 8
            })
        );
        assert_eq!(s, before);
        assert_eq!(
            s.apply(Command::SetOwners {
                changes: vec![own(0, Some("b"))]
            }),
            Err(ApplyError::BucketOwned {
                bucket: 0,
                owner: "a".into()
            })
        );
        // Re-asserting the current owner is not a change.
        s.apply(Command::SetOwners {
            changes: vec![own(0, Some("a"))],
        })
        .unwrap();
        assert_eq!(s, before);
    }

    #[test]
    fn fencing_frees_buckets_bumps_epochs_and_keeps_home() {
        let mut s = cluster();
        s.apply(Command::SetOwners {
            changes: vec![own(2, Some("a"))],
        })
        .unwrap();
        assert_eq!(
            s.apply(Command::RemoveMember { name: "a".into() }),
            Err(ApplyError::StillOwns {
                name: "a".into(),
                buckets: 1
            })
        );
        let fence = |epoch| Command::FenceMember {
            name: "a".into(),
            epoch,
            at_ms: 0,
            marked_by: vec![],
        };
        assert!(matches!(
            s.apply(fence(7)),
            Err(ApplyError::StaleEpoch { .. })
        ));
        s.apply(fence(1)).unwrap();
        assert_eq!(s.buckets[2].owner, None);
        assert_eq!(s.buckets[2].epoch, 2);
        assert_eq!(s.buckets[2].home.as_deref(), Some("a"));
        let a = &s.members["a"];
        assert!(a.down && a.epoch == 2 && a.penalty.value > 0);
        assert_eq!(
            s.apply(Command::SetOwners {
                changes: vec![own(2, Some("a"))]
            }),
            Err(ApplyError::MemberDown("a".into()))
        );
        s.apply(Command::RemoveMember { name: "a".into() }).unwrap();
        assert_eq!(s.buckets[2].home, None);
        // Added again, it continues above its old epoch.
        s.apply(Command::AddMember {
            name: "a".into(),
            weight: 1,
        })
        .unwrap();
        assert_eq!(s.members["a"].epoch, 3);
    }

    #[test]
    fn transfer_needs_a_confirmed_release_at_the_current_epoch() {
        let mut s = cluster();
        s.apply(Command::SetOwners {
            changes: vec![own(3, Some("a"))],
        })
        .unwrap();
        let transfer = |epoch| Command::Transfer {
            from: "a".into(),
            to: Some("b".into()),
            buckets: vec![(3, epoch)],
        };
        s.apply(transfer(1)).unwrap();
        assert_eq!(
            s.buckets[3].owner.as_deref(),
            Some("a"),
            "not releasing yet"
        );
        s.apply(Command::Release {
            name: "a".into(),
            buckets: vec![3],
        })
        .unwrap();
        assert!(s.buckets[3].releasing);
        s.apply(transfer(0)).unwrap();
        assert_eq!(s.buckets[3].owner.as_deref(), Some("a"), "stale epoch");
        s.apply(transfer(1)).unwrap();
        assert_eq!(s.buckets[3].owner.as_deref(), Some("b"));
        assert_eq!(s.buckets[3].epoch, 2);
        assert!(!s.buckets[3].releasing);
    }

    #[test]
    fn snapshot_encoding_round_trips() {
        let mut s = cluster();
        s.apply(Command::Revoke {
            serial: "1a2b".into(),
        })
        .unwrap();
        assert_eq!(ClusterState::decode(&s.encode()).unwrap(), s);
    }

    #[test]
    fn revocation_list_is_kept_canonical_and_changes_only_on_real_changes() {
        // Works before `cluster init`: a leaked certificate must be revocable at once.
        let mut s = ClusterState::default();
        let revoke = |serial: &str| Command::Revoke {
            serial: serial.into(),
        };
        s.apply(revoke("7f3a")).unwrap();
        assert!(s.revoked.contains("7f3a"));
        assert_eq!(
            s.apply(revoke("7f3a")),
            Err(ApplyError::AlreadyRevoked("7f3a".into()))
        );
        for bad in ["", "07f3a", "7F3A", "7f:3a", "xyz", &"f".repeat(43)] {
            assert_eq!(s.apply(revoke(bad)), Err(ApplyError::BadSerial(bad.into())));
        }
        assert_eq!(s.revoked.len(), 1);
        s.apply(Command::Unrevoke {
            serial: "7f3a".into(),
        })
        .unwrap();
        assert!(s.revoked.is_empty());
        assert_eq!(
            s.apply(Command::Unrevoke {
                serial: "7f3a".into()
            }),
            Err(ApplyError::NotRevoked("7f3a".into()))
        );
    }

    #[test]
    fn state_without_a_revocation_list_still_decodes() {
        let mut v: serde_json::Value = serde_json::from_slice(&cluster().encode()).unwrap();
        v.as_object_mut().unwrap().remove("revoked");
        let s = ClusterState::decode(&serde_json::to_vec(&v).unwrap()).unwrap();
        assert!(s.revoked.is_empty());
    }
}

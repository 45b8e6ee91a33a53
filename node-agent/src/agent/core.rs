//! The agent's decisions without I/O or clocks: which assignment counts, what
//! the member epoch is, the lease ([`AgentLease`]) and what the kernel should
//! hold. The runtime ([`super::run`]) feeds it events with its monotonic time
//! in milliseconds and carries out what it answers.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use vipshare_core::bucket::{self, Affinity, BucketFn};
use vipshare_core::lease::{AgentLease, LeaseTiming};
use vipshare_proto::v1 as pb;

use crate::dataplane::{Desired, VipConfig};

/// Cluster settings as the data plane needs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// (address, prefix length, MAC)
    pub vips: Vec<(Ipv4Addr, u8, [u8; 6])>,
    pub bucket_count: u32,
    pub bucket_fn: BucketFn,
    pub affinity: Affinity,
    pub seed: u32,
    pub timing: LeaseTiming,
}

/// A controller as the newest assignment lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Controller {
    pub id: u64,
    pub address: String,
    pub voter: bool,
}

/// An assignment that passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub applied_index: u64,
    pub member_epoch: u64,
    /// `None` until the cluster is initialised.
    pub settings: Option<Settings>,
    /// bucket -> epoch
    pub owned: BTreeMap<u32, u64>,
    pub release: BTreeMap<u32, u64>,
    pub controllers: Vec<Controller>,
}

/// What became of an assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssignmentOutcome {
    /// Now the current assignment.
    Adopted { epoch_changed: bool },
    /// Older than what we have (lower applied index or member epoch): ignored.
    Stale,
}

/// What a heartbeat reply did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyOutcome {
    Nothing,
    /// A majority acked a round: the lease now runs to this agent-clock time.
    Renewed {
        expiry: u64,
    },
    /// A controller reports a newer member epoch: the member was fenced (or
    /// re-admitted); everything owned at the old epoch is gone.
    NewEpoch {
        old: u64,
        new: u64,
    },
}

/// The agent's state.
#[derive(Debug, Clone)]
pub struct Core {
    member: String,
    /// 0 until a controller tells us.
    epoch: u64,
    lease: AgentLease,
    current: Option<Assignment>,
    /// Highest grant epoch seen per bucket (owned or release).
    bucket_epochs: BTreeMap<u32, u64>,
    configured: BTreeSet<u64>,
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    crate::dataplane::linux::exec::parse_mac(s).filter(|m| m[0] & 1 == 1)
}

fn timing(t: Option<&pb::LeaseTiming>) -> Result<LeaseTiming, String> {
    let Some(t) = t else {
        return Ok(LeaseTiming::default());
    };
    let t = LeaseTiming {
        heartbeat_ms: t.heartbeat_ms,
        lease_ms: t.lease_ms,
        kernel_delay_ms: t.kernel_delay_ms,
        clock_rate_ppm: t.clock_rate_ppm,
        margin_ms: t.margin_ms,
    };
    t.validate().map_err(|e| format!("lease timing: {e}"))?;
    Ok(t)
}

/// Checks an assignment from the wire; the error says what is wrong with it.
pub fn validate(a: &pb::Assignment) -> Result<Assignment, String> {
    let settings = match &a.settings {
        None => None,
        Some(s) => {
            let bucket_fn: BucketFn = s.bucket_function.parse().map_err(|e| format!("{e}"))?;
            let affinity: Affinity = s.affinity.parse().map_err(|e| format!("{e}"))?;
            bucket::validate(bucket_fn, affinity, s.bucket_count).map_err(|e| e.to_string())?;
            let mut vips = Vec::new();
            for v in &s.vips {
                let addr = match v.address.parse::<IpAddr>() {
                    Ok(IpAddr::V4(a)) => a,
                    Ok(IpAddr::V6(_)) => {
                        return Err(format!(
                            "VIP {}: IPv6 VIPs are not supported by this agent yet",
                            v.address
                        ))
                    }
                    Err(_) => return Err(format!("VIP {:?}: unknown address family", v.address)),
                };
                let prefix = if v.prefix_len == 0 { 32 } else { v.prefix_len };
                if prefix > 32 {
                    return Err(format!("VIP {addr}: prefix length {prefix}"));
                }
                let mac = parse_mac(&v.mac)
                    .ok_or_else(|| format!("VIP {addr}: {:?} is not a multicast MAC", v.mac))?;
                vips.push((addr, prefix as u8, mac));
            }
            Some(Settings {
                vips,
                bucket_count: s.bucket_count,
                bucket_fn,
                affinity,
                seed: s.seed,
                timing: timing(s.lease.as_ref())?,
            })
        }
    };
    let count = settings.as_ref().map_or(0, |s| s.bucket_count);
    let grants = |list: &[pb::BucketGrant], what: &str| -> Result<BTreeMap<u32, u64>, String> {
        let mut m = BTreeMap::new();
        for g in list {
            if g.bucket >= count {
                return Err(format!(
                    "{what} bucket {} is not below the bucket count {count}",
                    g.bucket
                ));
            }
            if m.insert(g.bucket, g.epoch).is_some() {
                return Err(format!("{what} bucket {} is listed twice", g.bucket));
            }
        }
        Ok(m)
    };
    let owned = grants(&a.owned, "owned")?;
    let release = grants(&a.release, "release")?;
    if let Some(b) = owned.keys().find(|b| release.contains_key(b)) {
        return Err(format!("bucket {b} is both owned and to be released"));
    }
    let controllers = a
        .controllers
        .iter()
        .map(|c| Controller {
            id: c.id,
            address: c.address.clone(),
            voter: c.role == "voter",
        })
        .collect();
    Ok(Assignment {
        applied_index: a.applied_index,
        member_epoch: a.member_epoch,
        settings,
        owned,
        release,
        controllers,
    })
}

impl Core {
    /// `configured`: ids of the controllers in the agent's config, the voters
    /// until an assignment names them.
    pub fn new(member: &str, configured: BTreeSet<u64>) -> Self {
        Core {
            member: member.to_string(),
            epoch: 0,
            lease: AgentLease::new(LeaseTiming::default(), configured.clone()),
            current: None,
            bucket_epochs: BTreeMap::new(),
            configured,
        }
    }

    pub fn member(&self) -> &str {
        &self.member
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn timing(&self) -> LeaseTiming {
        self.lease.timing()
    }

    pub fn current(&self) -> Option<&Assignment> {
        self.current.as_ref()
    }

    pub fn lease_expiry(&self) -> Option<u64> {
        self.lease.expiry()
    }

    pub fn lease_valid(&self, now: u64) -> bool {
        self.lease.valid(now)
    }

    /// Kernel timeout to install now (lease left minus the kernel delay).
    pub fn kernel_timeout_ms(&self, now: u64) -> Option<u64> {
        self.lease.kernel_timeout_ms(now)
    }

    /// A new heartbeat round, just before sending it: (round, member epoch).
    pub fn start_round(&mut self, now: u64) -> (u64, u64) {
        (self.lease.start_round(now), self.epoch)
    }

    fn adopt_epoch(&mut self, new: u64) -> ReplyOutcome {
        let old = self.epoch;
        self.epoch = new;
        // Rounds sent at the old epoch prove nothing for the new one.
        self.lease.revoke();
        ReplyOutcome::NewEpoch { old, new }
    }

    /// A heartbeat reply to `round`, which was sent at member epoch `sent_epoch`.
    pub fn on_reply(
        &mut self,
        round: u64,
        sent_epoch: u64,
        r: &pb::HeartbeatReply,
    ) -> ReplyOutcome {
        if r.member_epoch > self.epoch {
            return self.adopt_epoch(r.member_epoch);
        }
        if r.acked && r.member_epoch == self.epoch && sent_epoch == self.epoch && self.epoch != 0 {
            if let Some(expiry) = self.lease.ack(round, r.controller_id) {
                return ReplyOutcome::Renewed { expiry };
            }
        }
        ReplyOutcome::Nothing
    }

    /// An assignment from some controller's stream. `Err` when it is refused
    /// (the current assignment stays).
    pub fn on_assignment(&mut self, a: &pb::Assignment) -> Result<AssignmentOutcome, String> {
        if a.member != self.member {
            return Err(format!("assignment for member {:?}", a.member));
        }
        let seen = self.current.as_ref().map_or(0, |c| c.applied_index);
        if a.applied_index <= seen || (a.member_epoch < self.epoch && a.member_epoch != 0) {
            return Ok(AssignmentOutcome::Stale);
        }
        let v = validate(a)?;
        for (b, e) in v.owned.iter().chain(&v.release) {
            if let Some(&seen) = self.bucket_epochs.get(b) {
                if *e < seen {
                    return Err(format!(
                        "bucket {b} granted at epoch {e}, but epoch {seen} was already seen"
                    ));
                }
            }
        }
        for (b, e) in v.owned.iter().chain(&v.release) {
            let s = self.bucket_epochs.entry(*b).or_insert(*e);
            *s = (*s).max(*e);
        }
        let mut epoch_changed = false;
        if v.member_epoch > self.epoch {
            self.adopt_epoch(v.member_epoch);
            epoch_changed = true;
        }
        if let Some(s) = &v.settings {
            self.lease.set_timing(s.timing);
        }
        let voters: BTreeSet<u64> = v
            .controllers
            .iter()
            .filter(|c| c.voter)
            .map(|c| c.id)
            .collect();
        self.lease.set_voters(if voters.is_empty() {
            self.configured.clone()
        } else {
            voters
        });
        self.current = Some(v);
        Ok(AssignmentOutcome::Adopted { epoch_changed })
    }

    /// Buckets the kernel may accept new flows for under a valid lease: owned
    /// at the current member epoch, minus those being released.
    pub fn owned(&self) -> BTreeSet<u32> {
        match &self.current {
            Some(a) if a.member_epoch == self.epoch && self.epoch != 0 => {
                a.owned.keys().copied().collect()
            }
            _ => BTreeSet::new(),
        }
    }

    /// Buckets the current assignment asks us to release (with their epochs).
    pub fn release(&self) -> Vec<pb::BucketGrant> {
        self.current.as_ref().map_or(Vec::new(), |a| {
            a.release
                .iter()
                .map(|(&bucket, &epoch)| pb::BucketGrant { bucket, epoch })
                .collect()
        })
    }

    /// Whether nothing is owned or being released (a drain is complete).
    pub fn holds_nothing(&self) -> bool {
        self.owned().is_empty() && self.release().is_empty()
    }

    /// The kernel state wanted at `now`; `None` before the cluster has settings.
    /// `start` is the instant `now` counts from: the lease end becomes an
    /// absolute deadline, so a stall before the write cannot stretch it.
    pub fn desired(&self, now: u64, start: Instant, interface: &str) -> Option<Desired> {
        let s = self.current.as_ref()?.settings.as_ref()?;
        let left = self.kernel_timeout_ms(now).unwrap_or(0);
        Some(Desired {
            vips: s
                .vips
                .iter()
                .map(|&(addr, prefix_len, mac)| VipConfig {
                    addr,
                    prefix_len,
                    mac,
                    interface: interface.to_string(),
                })
                .collect(),
            bucket_count: s.bucket_count,
            bucket_fn: s.bucket_fn,
            affinity: s.affinity,
            seed: s.seed,
            owned: if left > 0 {
                self.owned()
            } else {
                BTreeSet::new()
            },
            lease_until: start + Duration::from_millis(now + left),
        })
    }

    /// Controllers to talk to, as the newest assignment lists them (`None`
    /// before one lists any: the configured ones apply).
    pub fn controllers(&self) -> Option<&[Controller]> {
        self.current
            .as_ref()
            .map(|a| a.controllers.as_slice())
            .filter(|c| !c.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> pb::ClusterSettings {
        pb::ClusterSettings {
            vips: vec![pb::Vip {
                address: "192.0.2.10".into(),
                prefix_len: 32,
                mac: "01:00:5e:00:02:0a".into(),
            }],
            bucket_count: 16,
            bucket_function: "jhash".into(),
            affinity: "address".into(),
            seed: 7,
            lease: None,
            damping: None,
        }
    }

    fn assignment(index: u64, epoch: u64, owned: &[(u32, u64)]) -> pb::Assignment {
        pb::Assignment {
            protocol_version: 1,
            member: "h1".into(),
            member_epoch: epoch,
            applied_index: index,
            settings: Some(settings()),
            owned: owned
                .iter()
                .map(|&(bucket, epoch)| pb::BucketGrant { bucket, epoch })
                .collect(),
            release: vec![],
            controllers: (1..=3)
                .map(|id| pb::ControllerInfo {
                    id,
                    address: format!("c{id}:7001"),
                    role: "voter".into(),
                })
                .collect(),
        }
    }

    fn reply(controller: u64, round: u64, acked: bool, epoch: u64) -> pb::HeartbeatReply {
        pb::HeartbeatReply {
            protocol_version: 1,
            controller_id: controller,
            round,
            acked,
            reason: String::new(),
            leader_id: 1,
            member_epoch: epoch,
        }
    }

    fn core() -> Core {
        Core::new("h1", [1, 2, 3].into())
    }

    #[test]
    fn lease_needs_a_majority_at_the_current_epoch() {
        let mut c = core();
        // Epoch unknown: the first reply teaches it, without acking.
        let (r, e) = c.start_round(0);
        assert_eq!(e, 0);
        assert_eq!(
            c.on_reply(r, e, &reply(1, r, false, 3)),
            ReplyOutcome::NewEpoch { old: 0, new: 3 }
        );
        assert_eq!(
            c.on_reply(r, e, &reply(2, r, true, 3)),
            ReplyOutcome::Nothing
        );
        let (r, e) = c.start_round(100);
        assert_eq!(e, 3);
        assert_eq!(
            c.on_reply(r, e, &reply(1, r, true, 3)),
            ReplyOutcome::Nothing
        );
        assert_eq!(
            c.on_reply(r, e, &reply(3, r, true, 3)),
            ReplyOutcome::Renewed { expiry: 600 }
        );
        assert_eq!(c.kernel_timeout_ms(150), Some(400));
        // Acks for another epoch don't count.
        let (r, e) = c.start_round(200);
        assert_eq!(
            c.on_reply(r, e, &reply(1, r, true, 2)),
            ReplyOutcome::Nothing
        );
        assert_eq!(
            c.on_reply(r, e, &reply(2, r, true, 2)),
            ReplyOutcome::Nothing
        );
        assert_eq!(c.lease_expiry(), Some(600));
    }

    #[test]
    fn fencing_drops_owned_buckets_and_the_lease() {
        let mut c = core();
        c.on_assignment(&assignment(10, 2, &[(1, 1), (2, 1)]))
            .unwrap();
        assert_eq!(c.owned(), [1, 2].into());
        let (r, e) = c.start_round(0);
        c.on_reply(r, e, &reply(1, r, true, 2));
        c.on_reply(r, e, &reply(2, r, true, 2));
        assert!(c.lease_valid(1));
        let (r, e) = c.start_round(100);
        assert_eq!(
            c.on_reply(r, e, &reply(3, r, false, 3)),
            ReplyOutcome::NewEpoch { old: 2, new: 3 }
        );
        assert!(!c.lease_valid(101));
        assert!(c.owned().is_empty(), "owned at the old epoch");
        assert_eq!(
            c.desired(101, Instant::now(), "eth0").unwrap().owned,
            BTreeSet::new()
        );
        // A stale assignment at the old epoch is ignored; the new one counts.
        assert_eq!(
            c.on_assignment(&assignment(11, 2, &[(1, 1)])).unwrap(),
            AssignmentOutcome::Stale
        );
        assert_eq!(
            c.on_assignment(&assignment(12, 3, &[(5, 2)])).unwrap(),
            AssignmentOutcome::Adopted {
                epoch_changed: false
            }
        );
        assert_eq!(c.owned(), [5].into());
    }

    #[test]
    fn highest_applied_index_wins() {
        let mut c = core();
        c.on_assignment(&assignment(10, 1, &[(1, 1)])).unwrap();
        assert_eq!(
            c.on_assignment(&assignment(9, 1, &[(2, 1)])).unwrap(),
            AssignmentOutcome::Stale
        );
        assert_eq!(
            c.on_assignment(&assignment(10, 1, &[(2, 1)])).unwrap(),
            AssignmentOutcome::Stale
        );
        assert_eq!(c.owned(), [1].into());
    }

    #[test]
    fn bad_assignments_are_refused() {
        let mut c = core();
        c.on_assignment(&assignment(10, 1, &[(1, 4)])).unwrap();
        let e = c.on_assignment(&assignment(11, 1, &[(1, 3)])).unwrap_err();
        assert!(e.contains("epoch 3") && e.contains("epoch 4"), "{e}");
        let e = c.on_assignment(&assignment(12, 1, &[(16, 1)])).unwrap_err();
        assert!(e.contains("not below the bucket count 16"), "{e}");
        let mut a = assignment(13, 1, &[]);
        a.settings.as_mut().unwrap().vips[0].address = "fd00::1".into();
        assert!(c.on_assignment(&a).unwrap_err().contains("IPv6"));
        a.settings.as_mut().unwrap().vips[0].address = "vip.example".into();
        assert!(c
            .on_assignment(&a)
            .unwrap_err()
            .contains("unknown address family"));
        let mut a = assignment(14, 1, &[]);
        a.settings.as_mut().unwrap().vips[0].mac = "02:00:00:00:00:01".into();
        assert!(c.on_assignment(&a).is_err());
        let mut a = assignment(15, 1, &[(1, 4)]);
        a.release = vec![pb::BucketGrant {
            bucket: 1,
            epoch: 4,
        }];
        assert!(c.on_assignment(&a).is_err());
        // Nothing of that changed the current assignment.
        assert_eq!(c.current().unwrap().applied_index, 10);
        assert_eq!(c.owned(), [1].into());
    }

    #[test]
    fn release_leaves_the_kernel_set_and_drain_completes_when_empty() {
        let mut c = core();
        c.on_assignment(&assignment(10, 1, &[(1, 1), (2, 1)]))
            .unwrap();
        let mut a = assignment(11, 1, &[(2, 1)]);
        a.release = vec![pb::BucketGrant {
            bucket: 1,
            epoch: 1,
        }];
        c.on_assignment(&a).unwrap();
        assert_eq!(c.owned(), [2].into());
        assert_eq!(
            c.release(),
            vec![pb::BucketGrant {
                bucket: 1,
                epoch: 1
            }]
        );
        assert!(!c.holds_nothing());
        c.on_assignment(&assignment(12, 1, &[])).unwrap();
        assert!(c.holds_nothing());
    }

    #[test]
    fn voters_come_from_the_assignment() {
        let mut c = core();
        let mut a = assignment(10, 1, &[(1, 1)]);
        a.controllers[2].role = "learner".into();
        a.controllers.push(pb::ControllerInfo {
            id: 4,
            address: "c4:7001".into(),
            role: "voter".into(),
        });
        c.on_assignment(&a).unwrap();
        // Voters {1, 2, 4}: 3 is a learner, so 1 + 3 is no majority.
        let (r, e) = c.start_round(0);
        assert_eq!(
            c.on_reply(r, e, &reply(1, r, true, 1)),
            ReplyOutcome::Nothing
        );
        assert_eq!(
            c.on_reply(r, e, &reply(3, r, true, 1)),
            ReplyOutcome::Nothing
        );
        assert_eq!(
            c.on_reply(r, e, &reply(4, r, true, 1)),
            ReplyOutcome::Renewed { expiry: 500 }
        );
    }
}

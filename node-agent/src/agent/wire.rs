//! Assignments and heartbeat replies from the wire, checked and turned into the
//! domain types of [`vipshare_core::agent`], which makes every decision. The
//! cluster settings the data plane needs (VIPs, bucket function) stay here.

use std::collections::BTreeMap;
use std::net::IpAddr;

use vipshare_core::agent::{Assignment, Controller, Reply};
use vipshare_core::bucket::{self, Affinity, BucketFn};
use vipshare_core::lease::LeaseTiming;
use vipshare_core::net::{Mac, SwitchMode};
use vipshare_proto::v1 as pb;

/// Cluster settings as the data plane needs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// (address, prefix length, MAC, switch mode)
    pub vips: Vec<(IpAddr, u8, Mac, SwitchMode)>,
    /// VIPs this agent cannot serve, each with the reason: the others are
    /// served (one VIP never freezes the rest); reported, not applied.
    pub unserved: Vec<String>,
    pub bucket_count: u32,
    pub bucket_fn: BucketFn,
    pub affinity: Affinity,
    pub seed: u32,
    pub timing: LeaseTiming,
}

impl Settings {
    /// The IPv6 VIPs moved to `unserved` with `reason` (a backend that cannot
    /// serve them still serves the rest).
    pub fn without_ipv6(self, reason: &str) -> Settings {
        self.without(|v| v.0.is_ipv6(), |_| reason.to_string())
    }

    /// The VIPs of another switch mode than `multicast` moved to `unserved`
    /// (a backend that cannot apply the modes still serves the rest).
    pub fn only_multicast_mode(self, backend: &str) -> Settings {
        self.without(
            |v| v.3 != SwitchMode::Multicast,
            |v| format!("switch mode {} is not served on {backend} yet", v.3),
        )
    }

    fn without(
        mut self,
        drop: impl Fn(&(IpAddr, u8, Mac, SwitchMode)) -> bool,
        reason: impl Fn(&(IpAddr, u8, Mac, SwitchMode)) -> String,
    ) -> Settings {
        let (out, keep): (Vec<_>, Vec<_>) = self.vips.into_iter().partition(|v| drop(v));
        self.vips = keep;
        self.unserved
            .extend(out.iter().map(|v| format!("VIP {}: {}", v.0, reason(v))));
        self
    }
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

/// A heartbeat reply as the engine takes it.
pub fn reply(r: &pb::HeartbeatReply) -> Reply {
    Reply {
        controller: r.controller_id,
        round: r.round,
        acked: r.acked,
        member_epoch: r.member_epoch,
        leader: r.leader_id,
        lease_ms: r.lease_ms,
        stale_assignment: r.stale_assignment,
    }
}

/// Checks an assignment from the wire for `member`; the error says what is
/// wrong with it.
pub fn validate(
    member: &str,
    a: &pb::Assignment,
) -> Result<(Option<Settings>, Assignment), String> {
    if a.member != member {
        return Err(format!("assignment for member {:?}", a.member));
    }
    let settings = match &a.settings {
        None => None,
        Some(s) => {
            let bucket_fn: BucketFn = s.bucket_function.parse().map_err(|e| format!("{e}"))?;
            let affinity: Affinity = s.affinity.parse().map_err(|e| format!("{e}"))?;
            bucket::validate(bucket_fn, affinity, s.bucket_count).map_err(|e| e.to_string())?;
            let mut vips = Vec::new();
            let mut unserved = Vec::new();
            for v in &s.vips {
                let Ok(addr) = v.address.parse::<IpAddr>() else {
                    unserved.push(format!("VIP {:?}: unknown address family", v.address));
                    continue;
                };
                let max = if addr.is_ipv4() { 32 } else { 128 };
                let prefix = if v.prefix_len == 0 { max } else { v.prefix_len };
                if prefix > max {
                    return Err(format!(
                        "VIP {addr}: prefix length {prefix} is not in 1..={max}"
                    ));
                }
                // "" from controllers older than switch modes; a mode this
                // agent does not know (a newer controller's) leaves that VIP
                // unserved, reported, and the others served.
                let mode = if v.mode.is_empty() {
                    SwitchMode::Multicast
                } else {
                    match v.mode.parse::<SwitchMode>() {
                        Ok(m) => m,
                        Err(e) => {
                            unserved.push(format!("VIP {addr}: {e}"));
                            continue;
                        }
                    }
                };
                let mac = v
                    .mac
                    .parse::<Mac>()
                    .map_err(|e| format!("VIP {addr}: {e}"))?;
                mode.check_mac(addr, mac)
                    .map_err(|e| format!("VIP {addr}: {e}"))?;
                vips.push((addr, prefix as u8, mac, mode));
            }
            Some(Settings {
                vips,
                unserved,
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
    let timing = settings.as_ref().map(|s| s.timing);
    Ok((
        settings,
        Assignment {
            applied_index: a.applied_index,
            member_epoch: a.member_epoch,
            timing,
            owned,
            release,
            controllers,
        },
    ))
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
                mode: String::new(),
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
                    role: if id == 3 { "learner" } else { "voter" }.into(),
                })
                .collect(),
        }
    }

    #[test]
    fn a_good_assignment_becomes_domain_types() {
        let (s, a) = validate("h1", &assignment(10, 2, &[(1, 4)])).unwrap();
        let s = s.unwrap();
        assert_eq!(s.bucket_count, 16);
        assert_eq!(a.timing, Some(LeaseTiming::default()));
        assert_eq!(a.owned, [(1, 4)].into());
        assert_eq!(a.voters(), [1, 2].into(), "3 is a learner");
    }

    #[test]
    fn a_vip_it_cannot_serve_is_reported_and_the_others_served() {
        let mut a = assignment(13, 1, &[(1, 4)]);
        let vips = &mut a.settings.as_mut().unwrap().vips;
        vips.push(pb::Vip {
            address: "fd00::1".into(),
            ..vips[0].clone()
        });
        vips.push(pb::Vip {
            address: "vip.example".into(),
            ..vips[0].clone()
        });
        let (s, a) = validate("h1", &a).unwrap();
        let s = s.unwrap();
        assert_eq!(s.vips.len(), 2, "192.0.2.10 and fd00::1 served");
        assert_eq!(s.vips[1].0, "fd00::1".parse::<IpAddr>().unwrap());
        assert_eq!(s.unserved.len(), 1);
        assert!(s.unserved[0].contains("unknown address family"));
        assert_eq!(
            a.owned,
            [(1, 4)].into(),
            "the buckets are taken all the same"
        );
    }

    #[test]
    fn a_backend_without_ipv6_serves_the_ipv4_vips_and_reports_the_others() {
        let mut a = assignment(13, 1, &[]);
        let vips = &mut a.settings.as_mut().unwrap().vips;
        vips.push(pb::Vip {
            address: "2001:db8::10".into(),
            prefix_len: 0,
            mac: "33:33:00:00:00:10".into(),
            mode: String::new(),
        });
        let (s, _) = validate("h1", &a).unwrap();
        let s = s.unwrap().without_ipv6("not here");
        assert_eq!(s.vips.len(), 1);
        assert!(s.vips[0].0.is_ipv4());
        assert_eq!(s.unserved, ["VIP 2001:db8::10: not here"]);
    }

    #[test]
    fn switch_modes_are_read_checked_and_unknown_ones_left_unserved() {
        let mut a = assignment(13, 1, &[]);
        let vips = &mut a.settings.as_mut().unwrap().vips;
        vips.push(pb::Vip {
            address: "192.0.2.11".into(),
            prefix_len: 0,
            mac: "02:00:5e:00:02:0b".into(),
            mode: "unicast".into(),
        });
        vips.push(pb::Vip {
            address: "2001:db8::10".into(),
            prefix_len: 0,
            mac: "33:33:00:00:00:10".into(),
            mode: "igmp".into(),
        });
        vips.push(pb::Vip {
            address: "192.0.2.12".into(),
            prefix_len: 0,
            mac: "01:00:5e:00:02:0c".into(),
            mode: "carrier-pigeon".into(),
        });
        let (s, _) = validate("h1", &a).unwrap();
        let s = s.unwrap();
        let modes: Vec<SwitchMode> = s.vips.iter().map(|v| v.3).collect();
        assert_eq!(
            modes,
            [SwitchMode::Multicast, SwitchMode::Unicast, SwitchMode::Igmp]
        );
        assert_eq!(s.unserved.len(), 1);
        assert!(
            s.unserved[0].contains("192.0.2.12") && s.unserved[0].contains("carrier-pigeon"),
            "{:?}",
            s.unserved
        );
        let f = s.only_multicast_mode("FreeBSD");
        assert_eq!(f.vips.len(), 1);
        assert!(f.unserved.contains(
            &"VIP 192.0.2.11: switch mode unicast is not served on FreeBSD yet".to_string()
        ));
        assert!(f.unserved.contains(
            &"VIP 2001:db8::10: switch mode igmp is not served on FreeBSD yet".to_string()
        ));
        // A multicast MAC in mode unicast is refused, naming the VIP and why.
        let vips = &mut a.settings.as_mut().unwrap().vips;
        vips[1].mac = "01:00:5e:00:02:0b".into();
        let e = validate("h1", &a).unwrap_err();
        assert!(e.contains("192.0.2.11") && e.contains("unicast"), "{e}");
    }

    #[test]
    fn prefix_lengths_default_and_are_checked_per_family() {
        let mut a = assignment(13, 1, &[]);
        let vips = &mut a.settings.as_mut().unwrap().vips;
        vips[0].prefix_len = 0;
        vips.push(pb::Vip {
            address: "2001:db8::10".into(),
            prefix_len: 0,
            mac: "33:33:00:00:00:10".into(),
            mode: String::new(),
        });
        let (s, _) = validate("h1", &a).unwrap();
        let prefixes: Vec<u8> = s.unwrap().vips.iter().map(|v| v.1).collect();
        assert_eq!(prefixes, [32, 128]);
        a.settings.as_mut().unwrap().vips[1].prefix_len = 129;
        let e = validate("h1", &a).unwrap_err();
        assert!(e.contains("2001:db8::10") && e.contains("1..=128"), "{e}");
        a.settings.as_mut().unwrap().vips[1].prefix_len = 64;
        a.settings.as_mut().unwrap().vips[0].prefix_len = 33;
        let e = validate("h1", &a).unwrap_err();
        assert!(e.contains("192.0.2.10") && e.contains("1..=32"), "{e}");
    }

    #[test]
    fn bad_assignments_are_refused() {
        let e = validate("h2", &assignment(10, 1, &[])).unwrap_err();
        assert!(e.contains("for member \"h1\""), "{e}");
        let e = validate("h1", &assignment(12, 1, &[(16, 1)])).unwrap_err();
        assert!(e.contains("not below the bucket count 16"), "{e}");
        let mut a = assignment(14, 1, &[]);
        a.settings.as_mut().unwrap().vips[0].mac = "02:00:00:00:00:01".into();
        assert!(validate("h1", &a).is_err());
        let mut a = assignment(15, 1, &[(1, 4)]);
        a.release = vec![pb::BucketGrant {
            bucket: 1,
            epoch: 4,
        }];
        assert!(validate("h1", &a)
            .unwrap_err()
            .contains("both owned and to be released"));
        let mut a = assignment(16, 1, &[(1, 4), (1, 5)]);
        a.release.clear();
        assert!(validate("h1", &a).unwrap_err().contains("listed twice"));
    }
}

//! Golden tests of the FreeBSD backend's plans for assignment changes.
//!
//! Each scenario renders the plans of a sequence of applies (one step per
//! line) and compares them with `tests/golden/<name>.txt`. To accept changed
//! plans after review: `UPDATE_GOLDEN=1 cargo test -p vipshare-agent --test
//! freebsd_plans`, then read the diff.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The moment every plan is made at (plans are pure in it).
fn t0() -> Instant {
    static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *T0.get_or_init(Instant::now)
}

use vipshare_agent::dataplane::freebsd::exec::{Executor, RecordingExecutor};
use vipshare_agent::dataplane::freebsd::plan::{masks, plan_apply, plan_withdraw};
use vipshare_agent::dataplane::freebsd::{
    Family, FreeBsdConfig, FreeBsdDataPlane, Installed, IpfwBuckets, SharedAddress, Step,
};
use vipshare_agent::dataplane::{
    Affinity, BucketFn, DataPlane, DataPlaneError, Desired, LeaseEnforcement, Mac, VipConfig,
};
use vipshare_core::bucket::bucket_of;

fn vip(last: u8, mac_last: u8) -> VipConfig {
    VipConfig {
        addr: Ipv4Addr::new(192, 0, 2, last).into(),
        prefix_len: 32,
        mac: Mac([0x01, 0x00, 0x5e, 0x56, 0x53, mac_last]),
        interface: "vtnet0".into(),
        mode: Default::default(),
    }
}

fn desired(owned: impl IntoIterator<Item = u32>) -> Desired {
    Desired {
        vips: vec![vip(10, 1)],
        bucket_count: 256,
        bucket_fn: BucketFn::Lowbits,
        affinity: Affinity::Address,
        seed: 0,
        owned: owned.into_iter().collect(),
        lease_until: t0() + Duration::from_millis(500),
    }
}

fn cfg() -> FreeBsdConfig {
    FreeBsdConfig {
        ipfw: "ipfw".into(),
        ifconfig: "ifconfig".into(),
        arp: "arp".into(),
        sysctl: "sysctl".into(),
        ..FreeBsdConfig::default()
    }
}

/// Plans `steps` in order from a fresh agent and renders all of them.
fn render(steps: &[(&str, Desired)]) -> String {
    render_with(&cfg(), steps)
}

fn render_with(cfg: &FreeBsdConfig, steps: &[(&str, Desired)]) -> String {
    let mut installed: Option<Installed> = None;
    let mut out = String::new();
    for (title, d) in steps {
        let plan = plan_apply(cfg, installed.as_ref(), d, t0()).expect("plan");
        out.push_str(&format!(
            "# {title} (changed: {}, stop after: {:?})\n",
            plan.changed, plan.stop_after
        ));
        out.push_str(&plan.render());
        out.push('\n');
        installed = Some(plan.next);
    }
    out
}

fn golden(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.txt"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).expect("write golden");
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
    if expected != actual {
        panic!(
            "plan differs from {}:\n--- expected\n{expected}\n--- actual\n{actual}",
            path.display()
        );
    }
}

#[test]
fn golden_start_renew_and_reassign() {
    let out = render(&[
        ("start: own the aligned block 64..128", desired(64..128)),
        ("renew: same assignment", desired(64..128)),
        ("reassign: every 4th bucket", desired((0..256).step_by(4))),
        (
            "gain a block: every 4th plus 128..192",
            desired((0..256).step_by(4).chain(128..192)),
        ),
        ("lose everything", desired([])),
        ("own again: 0..85", desired(0..85)),
    ]);
    golden("start_renew_reassign", &out);
}

#[test]
fn golden_vip_changes() {
    let mut two = desired(0..128);
    two.vips.push(vip(11, 2));
    let mut moved = two.clone();
    moved.vips[1].interface = "vtnet1".into();
    let out = render(&[
        ("start with one VIP", desired(0..128)),
        ("add a second VIP", two.clone()),
        ("move the second VIP to another interface", moved),
        ("drop the first VIP", {
            let mut d = two.clone();
            d.vips.remove(0);
            d
        }),
    ]);
    golden("vip_changes", &out);
}

#[test]
fn golden_lease_expiry_and_withdraw() {
    let cfg = cfg();
    let mut out = String::new();
    let p1 = plan_apply(&cfg, None, &desired(0..64), t0()).unwrap();
    out.push_str("# start\n");
    out.push_str(&p1.render());
    let mut expired = desired(0..64);
    expired.lease_until = t0() + Duration::from_millis(40); // below the 50 ms margin
    let p2 = plan_apply(&cfg, Some(&p1.next), &expired, t0()).unwrap();
    out.push_str("\n# lease nearly gone: accept nothing\n");
    out.push_str(&p2.render());
    let p3 = plan_apply(&cfg, Some(&p2.next), &desired(0..64), t0()).unwrap();
    out.push_str("\n# fresh lease again\n");
    out.push_str(&p3.render());
    let w = plan_withdraw(&cfg, Some(&p3.next));
    out.push_str("\n# withdraw\n");
    out.push_str(&w.render());
    let p4 = plan_apply(&cfg, Some(&w.next), &desired(0..64), t0()).unwrap();
    out.push_str("\n# apply after withdraw\n");
    out.push_str(&p4.render());
    golden("lease_and_withdraw", &out);
}

#[test]
fn golden_wide_buckets_and_network24() {
    let mut wide = desired(512..768);
    wide.bucket_count = 1024;
    let mut net24 = desired((0..256).step_by(2));
    net24.affinity = Affinity::Network24;
    let cfg = cfg();
    let mut out = String::from("# 1024 buckets, own 512..768\n");
    out.push_str(&plan_apply(&cfg, None, &wide, t0()).unwrap().render());
    out.push_str("\n# network24 affinity, even /24s\n");
    out.push_str(&plan_apply(&cfg, None, &net24, t0()).unwrap().render());
    golden("wide_and_network24", &out);
}

/// The rules' matches accept exactly the addresses whose bucket (by the core's
/// model) is owned.
#[test]
fn matches_agree_with_core_bucket_model() {
    for (affinity, count, owned) in [
        (
            Affinity::Address,
            256u32,
            (0..256).filter(|b| b % 3 == 1).collect::<BTreeSet<u32>>(),
        ),
        (Affinity::Address, 1024, (100..700).collect()),
        (Affinity::Network24, 64, (0..64).step_by(5).collect()),
    ] {
        let mut d = desired([]);
        d.affinity = affinity;
        d.bucket_count = count;
        d.owned = owned;
        let m = masks(&d, Family::V4).unwrap();
        let mut x: u32 = 0x1234_5678;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let addr = Ipv4Addr::from(x);
            let bucket =
                bucket_of(BucketFn::Lowbits, affinity, count, 0, addr.into(), None).unwrap();
            let hit = m.iter().any(|&(v, mask)| u128::from(x) & mask == v);
            assert_eq!(hit, d.owned.contains(&bucket), "{addr} bucket {bucket}");
        }
    }
}

#[test]
fn rejects_what_ipfw_cannot_do() {
    let cfg = cfg();
    let mut jhash = desired(0..8);
    jhash.bucket_fn = BucketFn::Jhash;
    assert!(matches!(
        plan_apply(&cfg, None, &jhash, t0()),
        Err(DataPlaneError::Unsupported(_))
    ));
    let err = plan_apply(&cfg, None, &jhash, t0())
        .unwrap_err()
        .to_string();
    assert!(err.contains("kernel-patches/0003"), "{err}");
    // A srcjhash kernel computes jhash only.
    let srcjhash = FreeBsdConfig {
        buckets: IpfwBuckets::Srcjhash,
        ..cfg.clone()
    };
    let err = plan_apply(&srcjhash, None, &desired(0..8), t0())
        .unwrap_err()
        .to_string();
    assert!(err.contains("jhash bucket function"), "{err}");
    let mut odd_mac = desired(0..8);
    odd_mac.vips[0].mac = Mac([0x03, 0xbf, 0, 0, 0, 1]);
    assert!(matches!(
        plan_apply(&cfg, None, &odd_mac, t0()),
        Err(DataPlaneError::Unsupported(_))
    ));
    let bad_sets = FreeBsdConfig {
        owned_staging_set: 3,
        ..cfg.clone()
    };
    assert!(plan_apply(&bad_sets, None, &desired(0..8), t0()).is_err());
    // An IPv6 VIP needs a 33:33 MAC (its MLD group opens the NIC's filter).
    let mut six = desired(0..8);
    six.vips.push(VipConfig {
        addr: "2001:db8::10".parse().unwrap(),
        prefix_len: 128,
        mac: Mac([0x01, 0x00, 0x5e, 0, 0, 0x10]),
        interface: "vtnet0".into(),
        mode: Default::default(),
    });
    let err = plan_apply(&cfg, None, &six, t0()).unwrap_err();
    assert!(matches!(err, DataPlaneError::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("2001:db8::10"), "{err}");
    assert!(err.to_string().contains("33:33"), "{err}");
    // Switch modes other than multicast are refused by name.
    let mut igmp = desired(0..8);
    igmp.vips[0].mode = vipshare_agent::dataplane::SwitchMode::Igmp;
    let err = plan_apply(&cfg, None, &igmp, t0()).unwrap_err();
    assert!(matches!(err, DataPlaneError::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("switch mode igmp"), "{err}");
}

#[test]
fn dataplane_runs_plans_and_recovers_from_failure() {
    let mut dp = FreeBsdDataPlane::new(cfg(), RecordingExecutor::default());
    assert_eq!(dp.name(), "freebsd-ipfw");
    let r = dp.apply(&desired(64..128)).unwrap();
    assert!(r.changed);
    assert_eq!(r.owned_rules, 1);
    assert_eq!(r.lease_enforcement, LeaseEnforcement::Watchdog);
    // The lease end is absolute: the backend's clock reading comes after t0.
    let stop = r.stop_after.expect("a deadline");
    assert!(
        stop <= Duration::from_millis(450) && stop > Duration::from_millis(400),
        "{stop:?}"
    );
    let first = dp.executor().steps.len();
    // Renewal: arm + re-enable only.
    let r = dp.apply(&desired(64..128)).unwrap();
    assert!(!r.changed);
    assert_eq!(dp.executor().steps.len() - first, 2);
    assert!(matches!(
        dp.executor().steps[first],
        Step::ArmWatchdog { .. }
    ));

    // A failing step leaves the state unknown; the next apply starts over.
    let mut dp = FreeBsdDataPlane::new(
        cfg(),
        RecordingExecutor {
            fail_at: Some(6),
            ..Default::default()
        },
    );
    assert!(dp.apply(&desired(0..8)).is_err());
    assert!(dp.installed().is_none());
    let before = dp.executor().steps.len();
    dp.apply(&desired(0..8)).unwrap();
    let replay = &dp.executor().steps[before..];
    assert!(replay.iter().any(
        |s| matches!(s, Step::Run { argv, .. } if argv.join(" ") == "sysctl net.inet.carp.allow=0")
    ));
    dp.withdraw().unwrap();
    assert!(!dp.installed().unwrap().owned_enabled);
}

// ---------------------------------------------------------------------------
// Kernels with kernel-patches/0003 (ipfw srcjhash, kernel lease deadlines).

/// A kernel with all three patches: the flag and srcjhash.
fn srcjhash_cfg() -> FreeBsdConfig {
    FreeBsdConfig {
        buckets: IpfwBuckets::Srcjhash,
        address: SharedAddress::Flag,
        ..cfg()
    }
}

fn jhash(owned: impl IntoIterator<Item = u32>) -> Desired {
    Desired {
        bucket_fn: BucketFn::Jhash,
        seed: 0x4e4c_4221,
        ..desired(owned)
    }
}

#[test]
fn golden_srcjhash_leases_in_the_kernel() {
    let cfg = srcjhash_cfg();
    let mut nearly_gone = jhash(0..64);
    nearly_gone.lease_until = t0() + Duration::from_millis(40); // below the 50 ms margin
    let mut port = jhash((0..256).step_by(2));
    port.affinity = Affinity::AddressPort;
    let mut out = render_with(
        &cfg,
        &[
            ("start: own 64..128", jhash(64..128)),
            ("renew: same buckets, a new deadline", jhash(64..128)),
            ("reassign: every 4th bucket", jhash((0..256).step_by(4))),
            ("lose everything", jhash([])),
            ("own again", jhash(0..64)),
            ("lease nearly gone: accept nothing", nearly_gone),
            ("address_port affinity: rules change", port),
        ],
    );
    let p = plan_apply(&cfg, None, &jhash(0..8), t0()).unwrap();
    out.push_str("# withdraw\n");
    out.push_str(&plan_withdraw(&cfg, Some(&p.next)).render());
    golden("srcjhash_leases", &out);
}

/// Reports sysctls as present: a kernel with kernel-patches/0003.
struct PatchedKernel(RecordingExecutor);

impl Executor for PatchedKernel {
    fn execute(&mut self, step: &Step, started: Instant) -> Result<(), DataPlaneError> {
        self.0.execute(step, started)
    }

    fn probe_sysctl(&mut self, _sysctl: &str, name: &str) -> Option<String> {
        ["net.inet.ip.fw.srcjhash_enable", "net.inet.ip.shared_addr"]
            .contains(&name)
            .then(|| "0".into())
    }
}

#[test]
fn the_backend_probes_the_kernel_and_lets_it_enforce_the_lease() {
    // Stock kernel: masks and the watchdog.
    let mut stock = FreeBsdDataPlane::new(cfg(), RecordingExecutor::default());
    let r = stock.apply(&desired(0..8)).unwrap();
    assert_eq!(r.lease_enforcement, LeaseEnforcement::Watchdog);
    assert_eq!(stock.config().buckets, IpfwBuckets::Masks);
    assert_eq!(stock.config().address, SharedAddress::CarpInit);
    assert!(
        stock.apply(&jhash(0..8)).is_err(),
        "stock ipfw has no jhash"
    );

    // Patched kernel: srcjhash, one lease write per renewal, no watchdog.
    let mut dp = FreeBsdDataPlane::new(cfg(), PatchedKernel(RecordingExecutor::default()));
    let r = dp.apply(&jhash(64..128)).unwrap();
    assert_eq!(dp.config().buckets, IpfwBuckets::Srcjhash);
    assert_eq!(dp.config().address, SharedAddress::Flag);
    assert!(dp.executor().0.steps.iter().any(
        |s| matches!(s, Step::AddSharedAddress { addr, .. } if addr.octets() == [192, 0, 2, 10])
    ));
    assert!(!dp
        .executor()
        .0
        .steps
        .iter()
        .any(|s| s.to_string().contains("carp") || s.to_string().contains("vhid")));
    assert_eq!(r.lease_enforcement, LeaseEnforcement::KernelTimeout);
    assert_eq!(r.owned_rules, 1);
    let steps = &dp.executor().0.steps;
    assert!(!steps
        .iter()
        .any(|s| matches!(s, Step::ArmWatchdog { .. } | Step::DisarmWatchdog)));
    let first = steps.len();
    // The lease ends 500 ms from now; the backend stops 50 ms earlier, measured
    // from the apply's own clock reading (so at most 450 ms from here).
    let mut renew = jhash(64..128);
    renew.lease_until = Instant::now() + Duration::from_millis(500);
    let r = dp.apply(&renew).unwrap();
    assert!(!r.changed);
    let renewal = &dp.executor().0.steps[first..];
    assert_eq!(renewal.len(), 1, "{renewal:?}");
    assert!(matches!(
        &renewal[0],
        Step::SetLease { buckets, stop_after, .. }
            if *buckets == (64..128).collect::<BTreeSet<u32>>()
                && *stop_after <= Duration::from_millis(450)
                && *stop_after > Duration::from_millis(400)
    ));
    // Withdraw empties the map at once.
    dp.withdraw().unwrap();
    assert!(matches!(
        dp.executor().0.steps.last(),
        Some(Step::SetLease { buckets, .. }) if buckets.is_empty()
    ));
}

#[test]
fn lease_map_writes_are_compact_and_absolute() {
    use vipshare_agent::dataplane::freebsd::plan::{bucket_ranges, lease_assignment};
    let set = |v: &[u32]| v.iter().copied().collect::<BTreeSet<u32>>();
    assert_eq!(bucket_ranges(&set(&[])), "-");
    assert_eq!(bucket_ranges(&set(&[7])), "7");
    assert_eq!(bucket_ranges(&set(&[0, 1, 2, 3, 8, 10, 11])), "0-3,8,10-11");
    assert_eq!(bucket_ranges(&(0..4096).collect()), "0-4095");
    assert_eq!(
        lease_assignment(2, 123_456_789_000, &set(&[5, 6])),
        "net.inet.ip.fw.srcjhash_lease=2 123456789000 5-6"
    );
    // Every other bucket of 4096: the longest write, well under the kernel's
    // 32768-byte limit.
    let worst = lease_assignment(15, u64::MAX / 8, &(0..4096).step_by(2).collect());
    assert!(worst.len() < 32768, "{}", worst.len());
}

// ---------------------------------------------------------------------------
// IPv6 VIPs, next to IPv4 ones in one cluster.

fn vip6(last: u16) -> VipConfig {
    let addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last);
    VipConfig {
        addr: addr.into(),
        prefix_len: 128,
        mac: vipshare_agent::dataplane::Mac::for_vip(addr.into()),
        interface: "vtnet0".into(),
        mode: Default::default(),
    }
}

/// `base` with the IPv6 VIP 2001:db8::10 beside its IPv4 one.
fn dual(base: Desired) -> Desired {
    let mut d = base;
    d.vips.push(vip6(0x10));
    d
}

/// Start, renew, reassign, lease loss, withdraw and VIP removal with a v4+v6
/// pair, on `cfg`.
fn dual_scenario(cfg: &FreeBsdConfig, make: fn(Vec<u32>) -> Desired) -> String {
    let mut nearly_gone = dual(make((0..64).collect()));
    nearly_gone.lease_until = t0() + Duration::from_millis(40); // below the 50 ms margin
    let mut out = render_with(
        cfg,
        &[
            (
                "start: v4+v6 pair, own 64..128",
                dual(make((64..128).collect())),
            ),
            ("renew: same buckets", dual(make((64..128).collect()))),
            (
                "reassign: every 4th bucket",
                dual(make((0..256).step_by(4).collect())),
            ),
            ("lease nearly gone: accept nothing", nearly_gone),
            ("own again: 0..64", dual(make((0..64).collect()))),
        ],
    );
    let p = plan_apply(cfg, None, &dual(make((0..64).collect())), t0()).unwrap();
    out.push_str("# withdraw (from a fresh start owning 0..64)\n");
    let w = plan_withdraw(cfg, Some(&p.next));
    out.push_str(&w.render());
    let back = plan_apply(cfg, Some(&w.next), &dual(make((0..64).collect())), t0()).unwrap();
    out.push_str("\n# apply after withdraw\n");
    out.push_str(&back.render());
    let v4_only = plan_apply(cfg, Some(&back.next), &make((0..64).collect()), t0()).unwrap();
    out.push_str("\n# remove the IPv6 VIP\n");
    out.push_str(&v4_only.render());
    let mut v6_only = dual(make((0..64).collect()));
    v6_only.vips.remove(0);
    let p = plan_apply(cfg, Some(&v4_only.next), &v6_only, t0()).unwrap();
    out.push_str("\n# swap: the IPv6 VIP back, the IPv4 VIP removed\n");
    out.push_str(&p.render());
    out
}

#[test]
fn golden_ipv6_vips() {
    let mut out = String::from("## stock kernel: CARP-INIT, lowbits masks, watchdog\n\n");
    out.push_str(&dual_scenario(&cfg(), desired));
    let mut net = dual(desired((0..256).step_by(2)));
    net.affinity = Affinity::Network24;
    out.push_str("\n# network24 affinity (IPv6: the /64's low 32 bits), even buckets\n");
    out.push_str(&plan_apply(&cfg(), None, &net, t0()).unwrap().render());
    out.push_str("\n## kernel-patches 0001-0004: flag (IPv4 only), srcjhash, kernel leases\n\n");
    out.push_str(&dual_scenario(&srcjhash_cfg(), jhash));
    golden("freebsd_ipv6", &out);
}

/// The IPv6 mask rules accept exactly the sources whose bucket (core's
/// Lowbits over the low 32 bits, or over `addr >> 64` for network24) is
/// owned; so do the IPv4 ones of the same assignment.
#[test]
fn ipv6_masks_agree_with_core_bucket_model() {
    for (affinity, count, owned) in [
        (
            Affinity::Address,
            256u32,
            (0..256).filter(|b| b % 3 == 1).collect::<BTreeSet<u32>>(),
        ),
        (Affinity::Address, 1024, (100..700).collect()),
        (Affinity::Network24, 256, (0..256).step_by(5).collect()),
        (Affinity::Network24, 4096, (1024..3072).collect()),
    ] {
        let mut d = dual(desired([]));
        d.affinity = affinity;
        d.bucket_count = count;
        d.owned = owned;
        let m6 = masks(&d, Family::V6).unwrap();
        let m4 = masks(&d, Family::V4).unwrap();
        // Every rule is over bits core's bucket reads, nothing above or below.
        let shift = if affinity == Affinity::Network24 {
            64
        } else {
            0
        };
        for &(v, mask) in &m6 {
            assert_eq!(v & !mask, 0);
            assert_eq!(mask & !(u128::from(count - 1) << shift), 0, "{mask:x}");
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..500 {
            let bits = (u128::from(next()) << 64) | u128::from(next());
            // Global unicast, never IPv4-mapped (core treats those as IPv4).
            let bits = (bits & !(0xffff_u128 << 112)) | (0x2001_u128 << 112);
            let addr = Ipv6Addr::from(bits);
            let bucket = bucket_of(
                BucketFn::Lowbits,
                affinity,
                count,
                0,
                IpAddr::V6(addr),
                None,
            )
            .unwrap();
            let hit = m6.iter().any(|&(v, mask)| bits & mask == v);
            assert_eq!(hit, d.owned.contains(&bucket), "{addr} bucket {bucket}");
            // The IPv4 source with the same key bits lands in the same bucket.
            let key = (bits >> shift) as u32;
            let v4 = match affinity {
                Affinity::Network24 => Ipv4Addr::from(key << 8),
                _ => Ipv4Addr::from(key),
            };
            let hit4 = m4
                .iter()
                .any(|&(v, mask)| u128::from(u32::from(v4)) & mask == v);
            assert_eq!(hit4, hit, "{v4} vs {addr}");
        }
    }
}

#[test]
fn ipv6_rules_name_one_family_each() {
    let p = plan_apply(&cfg(), None, &dual(desired(64..128)), t0()).unwrap();
    let text = p.render();
    for line in text.lines().filter(|l| l.contains(" to ")) {
        let to = line.split(" to ").nth(1).unwrap_or_default();
        let list = to.split_whitespace().next().unwrap_or_default();
        let v6 = list.split(',').filter(|a| a.contains(':')).count();
        assert!(
            v6 == 0 || v6 == list.split(',').count(),
            "mixed list: {line}"
        );
    }
    assert!(text.contains("mld join ff05::10 on vtnet0"), "{text}");
    assert!(
        text.contains("mld join ff02::1:ff00:10 on vtnet0"),
        "{text}"
    );
    assert!(
        text.contains("netlink RTM_NEWNEIGH vtnet0 2001:db8::10 lladdr 33:33:00:00:00:10 proxy"),
        "{text}"
    );
    assert!(
        text.contains("ifconfig lo0 inet6 2001:db8::10/128 alias"),
        "{text}"
    );
    // No CARP for IPv6: the VIP is on lo0, not on vtnet0.
    assert!(
        !text.contains("inet6 2001:db8::10/128 alias vhid"),
        "{text}"
    );
    // The IPv6 VIP is no shared (IPv4) address even on a flag kernel.
    let p = plan_apply(&srcjhash_cfg(), None, &dual(jhash(0..8)), t0()).unwrap();
    assert_eq!(
        p.steps
            .iter()
            .filter(|s| matches!(s, Step::AddSharedAddress { .. }))
            .count(),
        1
    );
}

#[test]
fn mask_rules_of_both_families_share_the_rule_budget() {
    // 683 single-bucket cubes: fits for one family, not for two.
    let mut d = desired((0..2048).filter(|b| b % 3 == 0));
    d.bucket_count = 2048;
    assert!(plan_apply(&cfg(), None, &d, t0()).is_ok());
    let err = plan_apply(&cfg(), None, &dual(d), t0())
        .unwrap_err()
        .to_string();
    assert!(err.contains("both address families"), "{err}");
}

//! Golden tests of the Linux backend's plans (the nft text and the commands).
//!
//! Each scenario renders the plans of a sequence of applies and compares them
//! with `tests/golden/linux_<name>.txt`. To accept changed plans after review:
//! `UPDATE_GOLDEN=1 cargo test -p vipshare-agent --test linux_plans`, then read
//! the diff.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The moment every plan is made at (plans are pure in it).
fn t0() -> Instant {
    static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *T0.get_or_init(Instant::now)
}

use vipshare_agent::dataplane::linux::{
    objects_of, plan_apply, plan_teardown, plan_withdraw, LinuxConfig, LinuxDataPlane, Present,
    RecordingExecutor, Step,
};
use vipshare_agent::dataplane::{
    Affinity, BucketFn, DataPlane, Desired, LeaseEnforcement, Mac, SwitchMode, VipConfig,
};

fn vip(last: u8) -> VipConfig {
    VipConfig {
        addr: Ipv4Addr::new(192, 0, 2, last).into(),
        prefix_len: 32,
        mac: Mac([0x01, 0x00, 0x5e, 0x00, 0x02, last]),
        interface: "eth0".into(),
        mode: Default::default(),
    }
}

fn desired(owned: impl IntoIterator<Item = u32>, lease_ms: u64) -> Desired {
    Desired {
        vips: vec![vip(10)],
        bucket_count: 256,
        bucket_fn: BucketFn::Jhash,
        affinity: Affinity::Address,
        seed: 0x4e4c4221,
        owned: owned.into_iter().collect(),
        lease_until: t0() + Duration::from_millis(lease_ms),
    }
}

fn cfg() -> LinuxConfig {
    LinuxConfig {
        state_dir: None,
        ..LinuxConfig::default()
    }
}

fn golden(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("linux_{name}.txt"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("{} missing; run with UPDATE_GOLDEN=1", path.display()));
    assert_eq!(
        actual,
        expected,
        "plans differ from {} (UPDATE_GOLDEN=1 to accept)",
        path.display()
    );
}

/// Plans over an empty kernel.
fn plan_fresh(
    cfg: &LinuxConfig,
    d: &Desired,
    reset: &BTreeSet<u32>,
) -> Result<vipshare_agent::dataplane::linux::Plan, vipshare_agent::dataplane::DataPlaneError> {
    plan_apply(cfg, None, d, reset, &Present::default(), t0())
}

/// Applies each desired state in turn and renders every plan; the kernel holds
/// what the previous plan installed.
fn scenario(steps: &[(&str, Desired)]) -> String {
    let cfg = cfg();
    let mut installed: Option<vipshare_agent::dataplane::linux::Installed> = None;
    let mut out = String::new();
    for (title, d) in steps {
        let present = installed.as_ref().map_or(Present::default(), |i| {
            objects_of(i, cfg.arp_egress).unwrap()
        });
        let plan = plan_apply(
            &cfg,
            installed.as_ref(),
            d,
            &BTreeSet::new(),
            &present,
            t0(),
        )
        .unwrap();
        out.push_str(&format!(
            "## {title} (changed: {}, stop after: {:?})\n",
            plan.changed, plan.stop_after
        ));
        out.push_str(&plan.render());
        installed = plan.next;
    }
    out
}

#[test]
fn start_renew_reassign_expire() {
    let out = scenario(&[
        ("start without a lease", desired([], 0)),
        ("first lease", desired([1, 2, 3], 450)),
        ("renewal", desired([1, 2, 3], 430)),
        ("bucket 2 released, 7 granted", desired([1, 3, 7], 420)),
        ("lease ran out", desired([1, 3, 7], 0)),
    ]);
    golden("start_renew_reassign_expire", &out);
}

#[test]
fn vips_added_and_removed() {
    let mut two = desired([5], 400);
    two.vips.push(vip(11));
    let mut other_if = two.clone();
    other_if.vips[1].interface = "eth1".into();
    let out = scenario(&[
        ("one VIP", desired([5], 400)),
        ("second VIP", two),
        ("second VIP on another interface", other_if),
        ("back to one", desired([5], 400)),
    ]);
    golden("vip_changes", &out);
}

#[test]
fn lowbits_and_address_port() {
    let mut low = desired([1, 255], 400);
    low.bucket_fn = BucketFn::Lowbits;
    let mut net = low.clone();
    net.affinity = Affinity::Network24;
    let mut port = desired([9], 400);
    port.affinity = Affinity::AddressPort;
    port.bucket_count = 64;
    let mut out = scenario(&[("lowbits address", low)]);
    out.push_str(&scenario(&[("lowbits network24", net)]));
    out.push_str(&scenario(&[("jhash address_port", port)]));
    golden("bucket_functions", &out);
}

fn vip6(last: u16) -> VipConfig {
    VipConfig {
        addr: std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last).into(),
        prefix_len: 64,
        mac: Mac([0x33, 0x33, 0, 0, 0, last as u8]),
        interface: "eth0".into(),
        mode: Default::default(),
    }
}

/// IPv6 beside IPv4: the ip6 table has the shape of the ip one, a renewal
/// writes both families' sets in one transaction, and a family whose last VIP
/// goes leaves an empty table.
#[test]
fn ipv6_beside_ipv4() {
    let mut mixed = desired([2, 5], 400);
    mixed.vips.push(vip6(0x10));
    let mut renewed = mixed.clone();
    renewed.lease_until = t0() + Duration::from_millis(380);
    let mut only6 = desired([5], 400);
    only6.vips = vec![vip6(0x10)];
    let mut out = scenario(&[
        ("IPv4 and IPv6", mixed.clone()),
        ("renewal", renewed),
        ("IPv6 only", only6.clone()),
    ]);
    let mut low = only6.clone();
    low.bucket_fn = BucketFn::Lowbits;
    let mut net = low.clone();
    net.affinity = Affinity::Network24;
    out.push_str(&scenario(&[("IPv6 lowbits address", low)]));
    out.push_str(&scenario(&[("IPv6 lowbits network24", net)]));
    let t = plan_teardown(&cfg(), None, &mixed.vips);
    out.push_str("## teardown\n");
    out.push_str(&t.render());
    golden("ipv6", &out);
}

#[test]
fn withdraw_and_teardown() {
    let cfg = cfg();
    let first = plan_fresh(&cfg, &desired([1], 400), &BTreeSet::from([1, 9])).unwrap();
    let mut out = String::from("## apply with bucket 1 reset-on-invalid\n");
    out.push_str(&first.render());
    let w = plan_withdraw(&cfg, first.next.as_ref(), &Present::default());
    out.push_str("## withdraw\n");
    out.push_str(&w.render());
    // Nothing installed (before the first apply): the sets an earlier run
    // left, of both families, and nothing that is not there.
    let mut mixed = desired([1], 400);
    mixed.vips.push(vip6(0x10));
    let both = plan_fresh(&cfg, &mixed, &BTreeSet::new()).unwrap();
    let present = objects_of(both.next.as_ref().unwrap(), cfg.arp_egress).unwrap();
    let w0 = plan_withdraw(&cfg, None, &present);
    out.push_str(
        "## withdraw with nothing installed, an earlier run's ip and ip6 tables present\n",
    );
    out.push_str(&w0.render());
    assert!(w0.next.is_none());
    let none = plan_withdraw(&cfg, None, &Present::default());
    out.push_str("## withdraw with nothing installed, no table present\n");
    out.push_str(&none.render());
    assert!(none.steps.is_empty());
    assert!(w.next.as_ref().unwrap().owned.is_empty());
    let t = plan_teardown(&cfg, w.next.as_ref(), &[vip(12)]);
    out.push_str("## teardown (192.0.2.12 remembered from an earlier run)\n");
    out.push_str(&t.render());
    assert!(t.next.is_none());
    golden("withdraw_teardown", &out);
}

#[test]
fn vip_addresses_come_after_their_filter_and_leave_before_it() {
    let cfg = cfg();
    let first = plan_fresh(&cfg, &desired([1], 400), &BTreeSet::new()).unwrap();
    let nft = first
        .steps
        .iter()
        .position(|s| matches!(s, Step::Nft(_)))
        .unwrap();
    let add = first
        .steps
        .iter()
        .position(|s| matches!(s, Step::AddAddress(_)))
        .unwrap();
    assert!(nft < add);
    let mut two = desired([1], 400);
    two.vips = vec![vip(11)];
    let second = plan_apply(
        &cfg,
        first.next.as_ref(),
        &two,
        &BTreeSet::new(),
        &Present::default(),
        t0(),
    )
    .unwrap();
    let del = second
        .steps
        .iter()
        .position(|s| matches!(s, Step::DelAddress(v) if v.addr == vip(10).addr))
        .unwrap();
    let nft = second
        .steps
        .iter()
        .position(|s| matches!(s, Step::Nft(_)))
        .unwrap();
    assert!(del < nft);
    let t = plan_teardown(&cfg, second.next.as_ref(), &[]);
    let del = t
        .steps
        .iter()
        .position(|s| matches!(s, Step::DelAddress(_)))
        .unwrap();
    let nft = t
        .steps
        .iter()
        .position(|s| matches!(s, Step::Nft(_)))
        .unwrap();
    assert!(del < nft);
}

#[test]
fn backend_renews_cheaply_and_rebuilds_after_a_failure() {
    let mut p = LinuxDataPlane::new(cfg(), RecordingExecutor::default()).unwrap();
    let r = p.apply(&desired([1, 2], 450)).unwrap();
    assert!(r.changed);
    assert_eq!(r.owned_rules, 2);
    assert_eq!(r.lease_enforcement, LeaseEnforcement::KernelTimeout);
    // The backend plans from its own clock reading, a little after t0.
    let stop = r.stop_after.expect("a deadline");
    assert!(
        stop <= Duration::from_millis(450) && stop > Duration::from_millis(400),
        "{stop:?}"
    );
    let n = p.executor().steps.len();
    let r = p.apply(&desired([1, 2], 440)).unwrap();
    assert!(!r.changed);
    assert_eq!(
        p.executor().steps.len(),
        n + 1,
        "a renewal is one nft batch"
    );
    // A failing step leaves the kernel state unknown: the next apply rebuilds.
    let mut p = LinuxDataPlane::new(
        cfg(),
        RecordingExecutor {
            fail_at: Some(1),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(p.apply(&desired([1], 400)).is_err());
    assert!(p.installed().is_none());
    assert!(p.apply(&desired([1], 400)).unwrap().changed);
    // No lease: nothing accepted, no deadline.
    let r = p.apply(&desired([1], 0)).unwrap();
    assert_eq!((r.owned_rules, r.stop_after), (0, None));
}

#[test]
fn invalid_desired_states_are_refused() {
    let cfg = cfg();
    let mut d = desired([300], 400);
    assert!(plan_fresh(&cfg, &d, &BTreeSet::new()).is_err());
    d = desired([1], 400);
    d.bucket_fn = BucketFn::Lowbits;
    d.affinity = Affinity::AddressPort;
    assert!(plan_fresh(&cfg, &d, &BTreeSet::new()).is_err());
    let bad = LinuxConfig {
        table: "vip share".into(),
        ..cfg
    };
    assert!(LinuxDataPlane::new(bad, RecordingExecutor::default()).is_err());
}

fn with_mode(mut v: VipConfig, mode: SwitchMode) -> VipConfig {
    v.mode = mode;
    if mode == SwitchMode::Unicast {
        v.mac = Mac::unicast_for_vip(v.addr);
    }
    v
}

/// Switch modes: `igmp` adds the joins of the groups mapped from the MACs
/// (IGMP and MLD) and a multicast router advertiser per interface and family;
/// `unicast` adds a receive-only device per shared MAC before the rebuild
/// (whose egress chain drops whatever would leave it), answers ARP and ND
/// with the shared MAC and neither adds multicast MACs nor joins groups;
/// back to `multicast` undoes both.
#[test]
fn switch_modes() {
    let both = |mode: SwitchMode| {
        let mut d = desired([2, 5], 400);
        d.vips = vec![with_mode(vip(10), mode), with_mode(vip6(0x10), mode)];
        d
    };
    let out = scenario(&[
        ("multicast (IPv4 and IPv6)", both(SwitchMode::Multicast)),
        ("igmp", both(SwitchMode::Igmp)),
        ("unicast", both(SwitchMode::Unicast)),
        ("multicast again", both(SwitchMode::Multicast)),
    ]);
    let mut out = out;
    let t = plan_teardown(&cfg(), None, &both(SwitchMode::Unicast).vips);
    out.push_str("## teardown of unicast VIPs remembered from an earlier run\n");
    out.push_str(&t.render());
    golden("switch_modes", &out);

    // Order: the device before the rebuild naming it in an egress chain, its
    // deletion after the rebuild that dropped the chain.
    let cfg = cfg();
    let uni = plan_fresh(&cfg, &both(SwitchMode::Unicast), &BTreeSet::new()).unwrap();
    let at = |p: &vipshare_agent::dataplane::linux::Plan, f: &dyn Fn(&Step) -> bool| {
        p.steps.iter().position(f).unwrap()
    };
    assert!(
        at(&uni, &|s| matches!(s, Step::AddRecvDevice { .. }))
            < at(&uni, &|s| matches!(s, Step::Nft(_)))
    );
    let back = plan_apply(
        &cfg,
        uni.next.as_ref(),
        &both(SwitchMode::Multicast),
        &BTreeSet::new(),
        &objects_of(uni.next.as_ref().unwrap(), true).unwrap(),
        t0(),
    )
    .unwrap();
    assert!(
        at(&back, &|s| matches!(s, Step::Nft(_)))
            < at(&back, &|s| matches!(s, Step::DelRecvDevice { .. }))
    );
    // A unicast MAC where a multicast one is needed, and the reverse, are
    // refused naming the VIP.
    let mut bad = both(SwitchMode::Unicast);
    bad.vips[0].mac = Mac::for_vip(bad.vips[0].addr);
    let e = plan_fresh(&cfg, &bad, &BTreeSet::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("192.0.2.10") && e.contains("unicast"), "{e}");
    let mut bad = both(SwitchMode::Igmp);
    bad.vips[1].mac = Mac::unicast_for_vip(bad.vips[1].addr);
    let e = plan_fresh(&cfg, &bad, &BTreeSet::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("2001:db8::10") && e.contains("igmp"), "{e}");
}

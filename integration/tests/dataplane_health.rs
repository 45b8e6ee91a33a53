//! Issue 11 item 5, the agent's side: the Linux backend reports what keeps it
//! from serving (wrong interface, VIP removed by hand, filter gone, failed
//! apply). Needs root.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use vipshare_agent::dataplane::linux::{LinuxConfig, LinuxDataPlane};
use vipshare_agent::dataplane::{Affinity, BucketFn, DataPlane, Desired, Mac, Problem, VipConfig};
use vipshare_integration::netns::NetLab;

#[test]
fn health_names_what_keeps_the_host_from_serving() {
    let net = NetLab::new(1, 1).unwrap();
    let host = &net.hosts[0];
    let tmp = tempfile::tempdir().unwrap();
    let cfg = LinuxConfig {
        state_dir: Some(tmp.path().to_path_buf()),
        ..LinuxConfig::default()
    };
    let vip = net.vip();
    let desired = move |interface: &str| Desired {
        vips: vec![VipConfig {
            addr: vip.into(),
            prefix_len: 32,
            mac: Mac([0x01, 0x00, 0x5e, 0x7f, 0x04, 0x01]),
            interface: interface.into(),
            mode: Default::default(),
        }],
        bucket_count: 8,
        bucket_fn: BucketFn::Jhash,
        affinity: Affinity::Address,
        seed: 7,
        owned: (0..8).collect(),
        lease_until: Instant::now() + Duration::from_secs(600),
    };
    let (wrong, right) = (desired("nosuch0"), desired("eth0"));
    let (mut plane, before, wrong_if, healthy) = host.run(move || {
        let mut p = LinuxDataPlane::os(cfg).unwrap();
        let before = p.health();
        assert!(p.apply(&wrong).is_err(), "applied on a missing interface");
        let wrong_if = p.health();
        p.apply(&right).unwrap();
        let healthy = p.health();
        (p, before, wrong_if, healthy)
    });
    assert_eq!(before, None, "health before any apply");
    let wrong_if = wrong_if.unwrap();
    for p in [
        Problem::InterfaceMissing,
        Problem::VipMissing,
        Problem::FilterMissing,
        Problem::LastApplyFailed,
    ] {
        assert!(wrong_if.contains(&p), "{p:?} not in {wrong_if:?}");
    }
    assert_eq!(healthy, Some(BTreeSet::new()));

    // The VIP removed by hand, then the filter flushed by hand.
    host.ip(&["addr", "del", &format!("{vip}/32"), "dev", "eth0"])
        .unwrap();
    let (p, vip_gone) = host.run(move || {
        let h = plane.health();
        (plane, h)
    });
    plane = p;
    assert_eq!(vip_gone, Some([Problem::VipMissing].into()));
    host.exec("nft", &["flush", "ruleset"]).unwrap();
    let (p, filter_gone) = host.run(move || {
        let h = plane.health();
        (plane, h)
    });
    plane = p;
    assert_eq!(
        filter_gone,
        Some([Problem::VipMissing, Problem::FilterMissing].into())
    );
    host.ip(&["link", "set", "eth0", "down"]).unwrap();
    let (_, down) = host.run(move || {
        let h = plane.health();
        (plane, h)
    });
    assert!(down.unwrap().contains(&Problem::InterfaceDown));
}

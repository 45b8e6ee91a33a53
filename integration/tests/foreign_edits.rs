//! Issue 11 item 3: foreign edits of the agent's nftables tables (`nft flush
//! ruleset`, a deleted table, an edited set) are seen through netlink
//! notifications and the filter is restored at once; the agent's own writes
//! are not reported. Needs root.

use std::collections::BTreeSet;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vipshare_agent::dataplane::linux::watch::{ForeignEdit, Watcher};
use vipshare_agent::dataplane::linux::{LinuxConfig, LinuxDataPlane};
use vipshare_agent::dataplane::{Affinity, BucketFn, DataPlane, Desired, Mac, VipConfig};
use vipshare_integration::netns::{owned_set, NetLab};

/// The restore goal of the issue, from the notification to the filter being
/// back.
const GOAL: Duration = Duration::from_millis(10);
/// Each edit is made this many times.
const ROUNDS: usize = 3;

#[test]
fn foreign_edits_are_reported_and_repaired() {
    let net = NetLab::new(1, 1).unwrap();
    let host = &net.hosts[0];
    let tmp = tempfile::tempdir().unwrap();
    let cfg = LinuxConfig {
        state_dir: Some(tmp.path().to_path_buf()),
        ..LinuxConfig::default()
    };
    let owned: BTreeSet<u32> = (0..4).collect();
    let desired = Desired {
        vips: vec![VipConfig {
            addr: net.vip().into(),
            prefix_len: 32,
            mac: Mac([0x01, 0x00, 0x5e, 0x7f, 0x03, net.k]),
            interface: "eth0".into(),
            mode: Default::default(),
        }],
        bucket_count: 16,
        bucket_fn: BucketFn::Jhash,
        affinity: Affinity::Address,
        seed: 7,
        owned: owned.clone(),
        lease_until: Instant::now() + Duration::from_secs(600),
    };
    const EDITS: [&str; 5] = [
        "flush ruleset",
        "delete table ip vipshare",
        "add element ip vipshare owned { 9 timeout 1h }",
        "flush set ip vipshare owned",
        "flush chain ip vipshare input",
    ];
    // One thread in the host namespace plays the agent: it applies, then
    // answers every reported edit with a filter repair, as the agent's loop
    // does.
    let (tx, repairs) = mpsc::channel::<(ForeignEdit, Instant)>();
    let (ready_tx, ready) = mpsc::channel();
    let d = desired.clone();
    let agent = host.spawn(move || {
        let mut w = Watcher::open("vipshare").expect("watcher");
        let mut p = LinuxDataPlane::os(cfg).unwrap();
        p.apply(&d).unwrap();
        // Renewals and a rebuild by the agent itself are not foreign.
        p.apply(&d).unwrap();
        p.invalidate();
        p.apply(&d).unwrap();
        ready_tx.send(()).unwrap();
        for _ in 0..EDITS.len() * ROUNDS {
            let e = w.wait().expect("notifications");
            p.invalidate_filter();
            // As the agent does: a failed apply (a late write on a loaded
            // host) is retried.
            let mut tries = 0;
            while let Err(err) = p.apply(&d) {
                tries += 1;
                assert!(tries < 5, "repair keeps failing: {err}");
            }
            tx.send((e, Instant::now())).unwrap();
        }
        p
    });
    ready.recv().unwrap();
    assert_eq!(owned_set(host), Some(owned.clone()));
    assert!(
        repairs.recv_timeout(Duration::from_millis(300)).is_err(),
        "the agent's own writes were reported as foreign"
    );

    let mut took = Vec::new();
    for edit in (0..ROUNDS).flat_map(|_| EDITS) {
        host.exec("nft", &[edit]).unwrap();
        let (e, repaired) = repairs
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("`nft {edit}` was not reported"));
        let from_seen = repaired.saturating_duration_since(e.seen);
        eprintln!(
            "`nft {edit}` by {} (thread {:?}): repaired {from_seen:?} after the notification",
            e.process, e.pid,
        );
        took.push(from_seen);
        assert_eq!(owned_set(host), Some(owned.clone()), "after `nft {edit}`");
        let rules = host
            .exec("nft", &["list", "chain", "ip", "vipshare", "input"])
            .unwrap();
        assert!(
            rules.contains("jump vip_"),
            "input chain not restored: {rules}"
        );
        // The repair itself is not reported back.
        assert!(
            repairs.recv_timeout(Duration::from_millis(100)).is_err(),
            "the repair was reported as foreign"
        );
    }
    let mut plane = agent.join().unwrap();
    // The 10 ms goal of the issue is a timing figure, printed here (and by
    // dataplane_bench), not asserted: on a loaded 2-core host one repair
    // transaction alone varies between 1 and 15 ms of wall time.
    took.sort();
    eprintln!(
        "notification -> filter restored ({} repairs): median {:?}, max {:?} (goal {GOAL:?})",
        took.len(),
        took[took.len() / 2],
        took[took.len() - 1]
    );
    let _ = host.run(move || plane.teardown());
}

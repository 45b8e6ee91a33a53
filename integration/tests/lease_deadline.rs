//! Issue 11 item 2: a late write cannot extend a lease. The lease end is an
//! absolute deadline; the executor reads the clock immediately before the
//! kernel write, and a write acknowledged later than the kernel-delay budget
//! is undone at once. Stalls are injected between computing the desired state
//! and writing it (before `apply`, and inside the executor right before the
//! nftables step); the kernel's own expiry of every owned element must stay
//! within the deadline plus the budget. Needs root.

use std::time::{Duration, Instant};

use vipshare_agent::dataplane::linux::exec::default_kernel_delay_budget;
use vipshare_agent::dataplane::linux::libnft::Nft;
use vipshare_agent::dataplane::linux::plan::parse_expires;
use vipshare_agent::dataplane::linux::{
    Executor, LinuxConfig, LinuxDataPlane, OsExecutor, Present, Step,
};
use vipshare_agent::dataplane::{
    Affinity, BucketFn, DataPlane, DataPlaneError, Desired, Mac, VipConfig,
};
use vipshare_integration::netns::{NetLab, Netns};

/// The OS executor, pausing before every nftables step (a starved or frozen
/// agent between computing and writing).
struct Stalling {
    os: OsExecutor,
    stall: Duration,
}

impl Executor for Stalling {
    fn execute(&mut self, step: &Step, started: Instant) -> Result<(), DataPlaneError> {
        if matches!(step, Step::Nft(_)) {
            std::thread::sleep(self.stall);
        }
        self.os.execute(step, started)
    }

    fn present(&mut self, table: &str) -> Result<Present, DataPlaneError> {
        self.os.present(table)
    }
}

fn desired(net: &NetLab, until: Instant) -> Desired {
    Desired {
        vips: vec![VipConfig {
            addr: net.vip().into(),
            prefix_len: 32,
            mac: Mac([0x01, 0x00, 0x5e, 0x7f, 0x02, net.k]),
            interface: "eth0".into(),
            mode: Default::default(),
        }],
        bucket_count: 8,
        bucket_fn: BucketFn::Jhash,
        affinity: Affinity::Address,
        seed: 7,
        owned: (0..8).collect(),
        lease_until: until,
    }
}

/// The latest moment any owned element still accepts, by the kernel's own
/// count (`None` when the set is empty): an upper bound, taken as the listing
/// returns, plus 1 ms for the listing's rounding down.
fn kernel_end(nft: &mut Nft) -> Option<Instant> {
    let out = nft
        .run("list set ip vipshare owned")
        .expect("listing the set");
    let after = Instant::now();
    parse_expires(&out)
        .into_iter()
        .max()
        .map(|left| after + left + Duration::from_millis(1))
}

fn cfg(dir: &std::path::Path) -> LinuxConfig {
    LinuxConfig {
        state_dir: Some(dir.to_path_buf()),
        ..LinuxConfig::default()
    }
}

fn run_in<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    ns.run(f)
}

#[test]
fn stalls_before_the_write_do_not_extend_the_lease() {
    let net = NetLab::new(1, 1).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = cfg(tmp.path());
    let stall = Duration::from_millis(300);
    let d = |until| desired(&net, until);
    let (first, stalled_outside, stalled_inside, expired) = {
        let now = Instant::now();
        (
            d(now + Duration::from_secs(5)),
            d(now + Duration::from_millis(900)),
            d(now + Duration::from_millis(1400)),
            d(now + Duration::from_millis(1600)),
        )
    };
    let report = run_in(&net.hosts[0], move || {
        let mut nft = Nft::new().unwrap();
        let os = OsExecutor::new(&cfg).unwrap();
        let mut p = LinuxDataPlane::new(
            cfg,
            Stalling {
                os,
                stall: Duration::ZERO,
            },
        )
        .unwrap();
        p.apply(&first).unwrap();
        let mut lines = Vec::new();
        // 1. The desired state is computed, then the agent stalls before apply.
        std::thread::sleep(stall);
        p.apply(&stalled_outside).unwrap();
        let end = kernel_end(&mut nft).expect("owned elements");
        lines.push(("stall before apply", end, stalled_outside.lease_until));
        // 2. The agent stalls inside apply, right before the nftables write.
        let os = OsExecutor::new(p.config()).unwrap();
        let mut p = LinuxDataPlane::new(p.config().clone(), Stalling { os, stall }).unwrap();
        p.apply(&stalled_inside).unwrap();
        let end = kernel_end(&mut nft).expect("owned elements");
        lines.push(("stall inside apply", end, stalled_inside.lease_until));
        // 3. A stall past the deadline: nothing may be accepted at all.
        std::thread::sleep(
            expired
                .lease_until
                .saturating_duration_since(Instant::now())
                .saturating_sub(stall / 2),
        );
        p.apply(&expired).unwrap();
        let none = kernel_end(&mut nft);
        (lines, none)
    });
    let (lines, none) = report;
    let budget = default_kernel_delay_budget();
    for (what, end, deadline) in lines {
        let over = end.saturating_duration_since(deadline);
        eprintln!("{what}: kernel end - deadline = {over:?}");
        assert!(
            end <= deadline + budget,
            "{what}: an element outlives its lease by {over:?} (budget {budget:?})"
        );
    }
    assert!(
        none.is_none(),
        "elements written after the lease ran out during a stall"
    );
}

#[test]
fn a_write_acknowledged_over_budget_is_undone() {
    let net = NetLab::new(1, 1).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = cfg(tmp.path());
    let d = desired(&net, Instant::now() + Duration::from_secs(5));
    let (result, left) = run_in(&net.hosts[0], move || {
        let mut nft = Nft::new().unwrap();
        // No round trip fits a zero budget: every lease write is late.
        let os = OsExecutor::new(&cfg)
            .unwrap()
            .with_kernel_delay_budget(Duration::ZERO);
        let mut p = LinuxDataPlane::new(cfg, os).unwrap();
        let r = p.apply(&d).map(|_| ());
        (r, kernel_end(&mut nft))
    });
    match result {
        Err(DataPlaneError::LateWrite { lag, budget }) => {
            assert!(lag > budget);
        }
        other => panic!("expected a late write, got {other:?}"),
    }
    assert!(left.is_none(), "the late elements were left in the kernel");
}

#[test]
fn elements_a_late_write_stretched_accept_nothing_past_the_deadline() {
    // What a writer stopped between its clock reading and the send leaves
    // behind: owned elements with far too long a timeout. The kernel's own
    // check of the absolute deadline (chain `lease`, `meta time`) still ends
    // the lease on time, seen from a client.
    const PORT: u16 = 7080;
    let net = NetLab::new(1, 1).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = cfg(tmp.path());
    let _servers = vipshare_integration::netns::Servers::start(
        &net.hosts[0],
        "h1",
        net.vip(),
        PORT,
        Default::default(),
    )
    .unwrap();
    let lease = desired(&net, Instant::now() + Duration::from_secs(2));
    let deadline = lease.lease_until;
    let left = run_in(&net.hosts[0], move || {
        let mut p = LinuxDataPlane::os(cfg).unwrap();
        p.apply(&lease).unwrap();
        let mut nft = Nft::new().unwrap();
        let stretched: Vec<String> = (0..8).map(|b| format!("{b} timeout 60s")).collect();
        nft.run(&format!(
            "add element ip vipshare owned {{ {} }}",
            stretched.join(", ")
        ))
        .unwrap();
        kernel_end(&mut nft)
    });
    let left = left.expect("owned elements");
    assert!(left > deadline + Duration::from_secs(30), "not stretched");
    let src = net.sources().unwrap()[0];
    let dst = std::net::SocketAddrV4::new(net.vip(), PORT);
    let probe = move |timeout| {
        net.client.run(move || {
            vipshare_integration::netns::tcp_round(&[src], dst, timeout)[0]
                .1
                .clone()
        })
    };
    let before = probe(Duration::from_millis(1500));
    assert!(Instant::now() < deadline, "the probe outlasted the lease");
    assert_eq!(before, Ok("h1".to_string()), "no answer within the lease");
    std::thread::sleep(
        deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(50),
    );
    let after = probe(Duration::from_millis(1000));
    assert!(
        after.is_err(),
        "answered {after:?} after the deadline, by an element that outlives it"
    );
}

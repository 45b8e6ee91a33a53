//! Switch modes on a bridge that snoops IGMP/MLD with an active querier (a
//! Linux bridge, `mcast_snooping 1`, `mcast_querier 1`): the lab of
//! `vipshare_integration::netns` (three hosts with real agents, a client with
//! many source addresses) serves three VIP pairs (IPv4 and IPv6), one per
//! mode, all on one bucket map:
//! - `multicast` (the cluster's first VIPs, 10.K.0.100 and fd00:0:K::100):
//!   once the querier is active, the bridge forwards the VIP's frames (a
//!   multicast MAC, a unicast IP destination) only to multicast router
//!   ports, and no client packet reaches any host: why the other modes exist;
//! - `unicast` (.102): answered by exactly the owner of each source's bucket,
//!   and no frame on the bridge ever has the shared unicast MAC as source
//!   (tcpdump on the bridge for the whole test), so the bridge keeps flooding
//!   it;
//! - `igmp` (.101): the hosts' Multicast Router Advertisements make their
//!   ports router ports, and each source is answered by exactly its owner.
//!
//! Needs root and tcpdump; build the binaries first (`cargo build --workspace
//! --bins`).

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vipshare_core::net::Mac;
use vipshare_integration::netns::{tcp_round, v6_twin, Cluster};

const SOURCES: usize = 24;
const BUCKETS: u32 = 16;

fn members() -> Vec<String> {
    ["h1", "h2", "h3"].iter().map(|s| s.to_string()).collect()
}

/// The IPv4 and IPv6 VIP of the lab ending in `last` (10.K.0.last and its
/// twin fd00:0:K::last).
fn vips(c: &Cluster, last: u8) -> [IpAddr; 2] {
    let v4 = Ipv4Addr::new(10, c.net.k, 0, last);
    [v4.into(), v6_twin(v4).into()]
}

/// Every source of the VIP's family connects over TCP to it: (source,
/// answering host or error).
fn round(c: &Cluster, vip: IpAddr, timeout: Duration) -> Vec<(IpAddr, Result<String, String>)> {
    let sources: Vec<IpAddr> = match vip {
        IpAddr::V4(_) => c
            .net
            .sources()
            .unwrap()
            .into_iter()
            .map(Into::into)
            .collect(),
        IpAddr::V6(_) => c
            .net
            .sources6()
            .unwrap()
            .into_iter()
            .map(Into::into)
            .collect(),
    };
    assert_eq!(sources.len(), SOURCES);
    let dst = SocketAddr::new(vip, c.port);
    c.net.client.run(move || tcp_round(&sources, dst, timeout))
}

/// The sources not answered by exactly the host the bucket map names.
fn wrong(c: &Cluster, map: &[String], vip: IpAddr, timeout: Duration) -> Vec<String> {
    round(c, vip, timeout)
        .into_iter()
        .filter_map(|(src, got)| {
            let want = &map[c.bucket_of(src) as usize];
            (got.as_ref().ok() != Some(want))
                .then(|| format!("{vip} from {src}: {got:?}, want {want}"))
        })
        .collect()
}

/// Polls until every source of each VIP is answered by its owner in the
/// bucket map of the moment, with every host's kernel set matching it (at
/// most `limit`; a rebuild can cost a host its lease on this loaded machine
/// and move buckets); fails with the last wrong answers. Returns the time
/// taken and the map.
async fn wait_served(c: &Cluster, vips: &[IpAddr], limit: Duration) -> (Duration, Vec<String>) {
    let start = Instant::now();
    loop {
        let map = c
            .wait_converged(&members(), limit)
            .await
            .expect("converged");
        let bad: Vec<String> = vips
            .iter()
            .flat_map(|&v| wrong(c, &map, v, Duration::from_secs(2)))
            .collect();
        if bad.is_empty() {
            return (start.elapsed(), map);
        }
        assert!(
            start.elapsed() < limit,
            "not served after {limit:?}: {bad:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn ctl_ok(c: &Cluster, args: &[&str]) -> String {
    let out = c.lab.ctl(args).expect("vipsharectl");
    assert!(
        out.status.success(),
        "vipsharectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// tcpdump on the switch's bridge, writing frames to or from the shared
/// unicast MACs to a file; returns once it listens.
fn capture(c: &Cluster, macs: &[Mac], file: &std::path::Path) -> Child {
    let filter = macs
        .iter()
        .map(|m| format!("ether host {m}"))
        .collect::<Vec<_>>()
        .join(" or ");
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &c.net.switch.name,
            "tcpdump",
            "-i",
            "br0",
            "-U",
            "-w",
        ])
        .arg(file)
        .arg(&filter)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump (install it: apt-get install tcpdump)");
    let mut err = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    // "listening on br0, ..." once the capture is open.
    while err.read_line(&mut line).expect("tcpdump stderr") > 0 {
        if line.contains("listening on") {
            // Keep draining so tcpdump never blocks on a full pipe.
            std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
            return child;
        }
        line.clear();
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("tcpdump did not start: {line}");
}

/// (frames with `mac` as source, frames with it as destination) in `file`.
fn count_frames(file: &std::path::Path, mac: Mac) -> (usize, usize) {
    let out = Command::new("tcpdump")
        .args(["-r"])
        .arg(file)
        .args(["-n", "-e"])
        .output()
        .expect("tcpdump -r");
    let text = String::from_utf8_lossy(&out.stdout);
    let m = mac.to_string();
    // `-e` lines: "TIME SRC > DST, ethertype ..."
    let mut src = 0;
    let mut dst = 0;
    for l in text.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        if w.get(1) == Some(&m.as_str()) {
            src += 1;
        }
        if w.get(3).map(|d| d.trim_end_matches(',')) == Some(m.as_str()) {
            dst += 1;
        }
    }
    (src, dst)
}

/// The bridge's multicast router ports (`bridge -d mdb show`: "router ports
/// on br0: h1 ...").
fn router_ports(c: &Cluster) -> Vec<String> {
    let out = c
        .net
        .switch
        .exec("bridge", &["-d", "mdb", "show", "dev", "br0"])
        .unwrap_or_default();
    let mut ports: Vec<String> = out
        .lines()
        .filter_map(|l| l.split("router ports on br0:").nth(1))
        .flat_map(|rest| rest.split_whitespace().map(str::to_string))
        .filter(|w| w.starts_with('h'))
        .collect();
    ports.sort();
    ports.dedup();
    ports
}

fn neighbour(c: &Cluster, vip: IpAddr) -> String {
    let fam = if vip.is_ipv4() { "-4" } else { "-6" };
    c.net
        .client
        .ip(&[fam, "neigh", "show", &vip.to_string()])
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_modes_on_a_snooping_bridge() {
    let c = Cluster::start(3, SOURCES, BUCKETS).await.expect("lab");
    c.wait_converged(&members(), Duration::from_secs(30))
        .await
        .expect("initial convergence");
    let multicast = vips(&c, 100);
    let igmp = vips(&c, 101);
    let unicast = vips(&c, 102);
    let shared: Vec<Mac> = unicast.iter().map(|&v| Mac::unicast_for_vip(v)).collect();
    let pcap = c.lab.root.path().join("bridge.pcap");
    let mut dump = capture(&c, &shared, &pcap);

    // Snooping still off: the unicast VIPs are served like the others.
    for v in unicast {
        ctl_ok(&c, &["vip", "add", &v.to_string(), "--mode", "unicast"]);
    }
    let (took, _) = wait_served(&c, &unicast, Duration::from_secs(30)).await;
    eprintln!("unicast VIPs served {took:?} after vip add (snooping off)");
    let list = ctl_ok(&c, &["vip", "list"]);
    assert!(
        list.contains(&format!("{}", shared[0])) && list.contains("unicast"),
        "{list}"
    );

    // Snooping on with an active querier (short intervals: the bridge counts
    // a querier as present one query response interval after it starts).
    c.net
        .switch
        .ip(&[
            "link",
            "set",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "1",
            "mcast_querier",
            "1",
            "mcast_query_response_interval",
            "100",
            "mcast_startup_query_interval",
            "100",
            "mcast_query_interval",
            "500",
        ])
        .expect("snooping on");

    // The default mode fails there: poll until no source of either multicast
    // VIP is answered, then check it stays so with a longer timeout.
    let start = Instant::now();
    loop {
        let answered: usize = multicast
            .iter()
            .map(|&v| {
                round(&c, v, Duration::from_millis(1500))
                    .iter()
                    .filter(|(_, r)| r.is_ok())
                    .count()
            })
            .sum();
        if answered == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "multicast VIPs still answered ({answered}) 40 s after snooping went on"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "multicast mode stopped being delivered {:?} after snooping and the querier went on",
        start.elapsed()
    );
    for v in multicast {
        let delivered: Vec<_> = round(&c, v, Duration::from_secs(3))
            .into_iter()
            .filter(|(_, r)| r.is_ok())
            .collect();
        assert!(
            delivered.is_empty(),
            "multicast VIP {v} answered through a querier-active snooping bridge: {delivered:?}"
        );
        eprintln!("multicast {v}: 0/{SOURCES} sources answered");
    }
    assert!(
        router_ports(&c).is_empty(),
        "no host port is a router port yet"
    );

    // Unicast mode through the same bridge: every source answered by its owner.
    let (_, map) = wait_served(&c, &unicast, Duration::from_secs(30)).await;
    for v in unicast {
        let bad = wrong(&c, &map, v, Duration::from_secs(3));
        assert!(bad.is_empty(), "unicast through snooping: {bad:#?}");
        eprintln!("unicast {v}: {SOURCES}/{SOURCES} sources answered by their owners");
        let n = neighbour(&c, v);
        let mac = Mac::unicast_for_vip(v).to_string();
        assert!(n.contains(&mac), "client's neighbour entry for {v}: {n}");
    }

    // IGMP mode: the hosts advertise themselves as multicast routers.
    for v in igmp {
        ctl_ok(&c, &["vip", "add", &v.to_string(), "--mode", "igmp"]);
    }
    let (took, map) = wait_served(&c, &igmp, Duration::from_secs(30)).await;
    eprintln!("igmp VIPs served {took:?} after vip add (snooping on, querier active)");
    for v in igmp {
        let bad = wrong(&c, &map, v, Duration::from_secs(3));
        assert!(bad.is_empty(), "igmp through snooping: {bad:#?}");
        eprintln!("igmp {v}: {SOURCES}/{SOURCES} sources answered by their owners");
        let n = neighbour(&c, v);
        assert!(n.contains(&Mac::for_vip(v).to_string()), "{v}: {n}");
    }
    assert_eq!(
        router_ports(&c),
        ["h1", "h2", "h3"],
        "hosts' ports are router ports"
    );
    // A router port takes every multicast frame whose IP destination is
    // unicast, so the multicast-mode VIPs are delivered again too (what the
    // operator sees when one VIP of the segment is in mode igmp).
    for v in multicast {
        let ok = round(&c, v, Duration::from_secs(3))
            .iter()
            .filter(|(_, r)| r.is_ok())
            .count();
        eprintln!("multicast {v} with the hosts' ports router ports: {ok}/{SOURCES} answered");
    }
    // The status lists each VIP's mode.
    let status = ctl_ok(&c, &["status"]);
    assert!(
        status.contains(&format!("{} (igmp)", igmp[0]))
            && status.contains(&format!("{} (unicast)", unicast[1])),
        "{status}"
    );

    // No frame ever left a host from the shared unicast MACs: the bridge
    // never learnt them. Frames to them were seen (the capture worked).
    // SAFETY: a signal to the tcpdump this test started.
    unsafe { libc::kill(dump.id() as i32, libc::SIGTERM) };
    let _ = dump.wait();
    for mac in &shared {
        let (src, dst) = count_frames(&pcap, *mac);
        eprintln!("frames on the bridge: from {mac}: {src}, to {mac}: {dst}");
        assert_eq!(src, 0, "a frame was sent from the shared unicast MAC {mac}");
        assert!(
            dst > 0,
            "no frame to {mac} captured: the capture did not work"
        );
    }
    // Removing the unicast VIPs removes their receive devices (after the
    // rebuild that dropped their egress chains); the igmp VIPs stay served.
    for v in unicast {
        ctl_ok(&c, &["vip", "remove", &v.to_string()]);
    }
    let devices: Vec<String> = shared
        .iter()
        .map(|m| format!("vsu{}", m.to_string().replace(':', "")))
        .collect();
    let start = Instant::now();
    loop {
        let left: Vec<String> = c
            .net
            .hosts
            .iter()
            .flat_map(|h| {
                let links = h.ip(&["-o", "link", "show"]).unwrap_or_default();
                devices
                    .iter()
                    .filter(|d| links.contains(d.as_str()))
                    .map(|d| format!("{} {d}", h.name))
                    .collect::<Vec<_>>()
            })
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "receive devices left after vip remove: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "receive devices gone {:?} after vip remove",
        start.elapsed()
    );
    wait_served(&c, &igmp, Duration::from_secs(30)).await;

    let fdb = c
        .net
        .switch
        .exec("bridge", &["fdb", "show", "br", "br0"])
        .unwrap_or_default();
    for mac in &shared {
        assert!(
            !fdb.contains(&mac.to_string()),
            "bridge learnt {mac}: {fdb}"
        );
    }
}

/// The data plane alone in one host namespace (no controllers): a unicast
/// VIP pair's receive devices as planned, re-asserted by a restarted agent
/// without change, reported healthy, and removed by the teardown of an agent
/// that knows them only from its state file.
mod direct {
    use super::*;
    use vipshare_agent::dataplane::linux::{LinuxConfig, LinuxDataPlane, OsExecutor};
    use vipshare_agent::dataplane::{
        Affinity, BucketFn, DataPlane, Desired, SwitchMode, VipConfig,
    };
    use vipshare_integration::netns::{NetLab, Netns};

    type Plane = LinuxDataPlane<OsExecutor>;

    fn plane(ns: &Netns, state: &std::path::Path) -> Plane {
        let cfg = LinuxConfig {
            state_dir: Some(state.to_path_buf()),
            ..LinuxConfig::default()
        };
        ns.run(move || LinuxDataPlane::os(cfg).unwrap())
    }

    fn desired(net: &NetLab) -> Desired {
        let v4 = Ipv4Addr::new(10, net.k, 0, 102);
        let vip = |addr: IpAddr, mode: SwitchMode| VipConfig {
            addr,
            prefix_len: if addr.is_ipv4() { 32 } else { 128 },
            mac: Mac::default_for(addr, mode),
            interface: "eth0".into(),
            mode,
        };
        Desired {
            vips: vec![
                vip(v4.into(), SwitchMode::Unicast),
                vip(v6_twin(v4).into(), SwitchMode::Unicast),
                vip(Ipv4Addr::new(10, net.k, 0, 101).into(), SwitchMode::Igmp),
            ],
            bucket_count: 4,
            bucket_fn: BucketFn::Jhash,
            affinity: Affinity::Address,
            seed: 7,
            owned: (0..4).collect(),
            lease_until: Instant::now() + Duration::from_secs(60),
        }
    }

    /// Applies `d` (or tears down) inside the namespace; returns the plane
    /// and its health after.
    fn apply(ns: &Netns, plane: Plane, d: Option<Desired>) -> (Plane, String) {
        ns.run(move || {
            let mut p = plane;
            let start = Instant::now();
            match d {
                Some(d) => {
                    p.apply(&d).unwrap();
                }
                None => p.teardown().unwrap(),
            }
            eprintln!("apply or teardown took {:?}", start.elapsed());
            let h = format!("{:?}", p.health());
            (p, h)
        })
    }

    #[test]
    fn receive_devices_are_reasserted_and_torn_down() {
        let net = NetLab::new(1, 1).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let h1 = &net.hosts[0];
        let d = desired(&net);
        let devices: Vec<String> = d.vips[..2]
            .iter()
            .map(|v| format!("vsu{}", v.mac.to_string().replace(':', "")))
            .collect();
        let check = |when: &str| {
            for dev in &devices {
                let link = h1.ip(&["-o", "link", "show", "dev", dev]).unwrap();
                assert!(
                    link.contains("NOARP") && link.contains(",UP") && !link.contains("MULTICAST"),
                    "{when}: {link}"
                );
                let v6 = h1.ip(&["-6", "-o", "addr", "show", "dev", dev]).unwrap();
                assert!(v6.trim().is_empty(), "{when}: no IPv6 address: {v6}");
                let chain = h1
                    .exec(
                        "nft",
                        &[
                            "list",
                            "chain",
                            "netdev",
                            "vipshare",
                            &format!("egress_{dev}"),
                        ],
                    )
                    .unwrap();
                assert!(chain.contains("policy drop"), "{when}: {chain}");
            }
            let a4 = h1
                .ip(&["-4", "-o", "addr", "show", "dev", &devices[0]])
                .unwrap();
            assert!(
                a4.contains(&format!("{}/32", d.vips[0].addr)),
                "{when}: {a4}"
            );
        };
        let p = plane(h1, tmp.path());
        let (p, health) = apply(h1, p, Some(d.clone()));
        check("first apply");
        assert_eq!(health, "Some({})", "healthy");
        let index = |dev: &str| h1.ip(&["-o", "link", "show", "dev", dev]).unwrap();
        let before: Vec<String> = devices.iter().map(|d| index(d)).collect();
        drop(p);
        // A restarted agent rebuilds over what is there.
        let p = plane(h1, tmp.path());
        let (p, health) = apply(h1, p, Some(d.clone()));
        check("after a restart");
        assert_eq!(health, "Some({})", "healthy after a restart");
        for (dev, b) in devices.iter().zip(&before) {
            let after = index(dev);
            assert_eq!(
                b.split(':').next(),
                after.split(':').next(),
                "the restart kept {dev} (same index): {b} / {after}"
            );
        }
        drop(p);
        // An agent that applied nothing tears down from its state file.
        let p = plane(h1, tmp.path());
        let (_p, _) = apply(h1, p, None);
        let links = h1.ip(&["-o", "link", "show"]).unwrap();
        for dev in &devices {
            assert!(!links.contains(dev.as_str()), "{dev} left: {links}");
        }
        let all = h1.ip(&["-o", "addr", "show"]).unwrap();
        assert!(!all.contains(&d.vips[0].addr.to_string()), "{all}");
        assert!(h1
            .exec("nft", &["list", "table", "netdev", "vipshare"])
            .is_err());
    }
}

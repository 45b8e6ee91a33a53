//! The Linux data plane on real kernels: network namespaces, a bridge, three
//! controllers, three hosts each running a real `vipshare-agent` and a server
//! answering with its name, and a client with 200 source addresses (layout in
//! `vipshare_integration::netns`). The cluster serves an IPv4 and an IPv6 VIP
//! (one bucket map); every check of who answers is made over both, from the
//! 200 IPv4 sources and their 200 IPv6 twins. Needs root; build the binaries
//! first (`cargo build --workspace --bins`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vipshare_integration::netns::{owned_set, tcp_round, udp_round, v6_twin, Cluster};

const SOURCES: usize = 200;

/// One UDP round: when it started and who answered each source.
type Round = (Instant, BTreeMap<IpAddr, Vec<String>>);
/// Probe failures and answers per host.
type ProbeResult = (Vec<String>, BTreeMap<String, usize>);
const BUCKETS: u32 = 64;
/// The default lease (LeaseTiming::default().lease_ms).
const LEASE: Duration = Duration::from_millis(500);

fn members(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

async fn cluster() -> Cluster {
    let c = Cluster::start(3, SOURCES, BUCKETS).await.expect("lab");
    c.wait_converged(&members(&["h1", "h2", "h3"]), Duration::from_secs(30))
        .await
        .expect("initial convergence");
    c
}

/// Every source connects (TCP) and asks (UDP), to the IPv4 VIP from its IPv4
/// address and to the IPv6 VIP from its IPv6 twin; each must be answered by
/// exactly the owner the bucket map names, and by no one else.
fn check_predicted(c: &Cluster, map: &[String]) {
    let v4: Vec<IpAddr> = c
        .net
        .sources()
        .unwrap()
        .into_iter()
        .map(IpAddr::from)
        .collect();
    let v6: Vec<IpAddr> = c
        .net
        .sources6()
        .unwrap()
        .into_iter()
        .map(IpAddr::from)
        .collect();
    check_predicted_from(c, map, v4, c.vip_addr().into());
    check_predicted_from(c, map, v6, c.vip6_addr().into());
}

fn check_predicted_from(c: &Cluster, map: &[String], sources: Vec<IpAddr>, dst: SocketAddr) {
    assert_eq!(sources.len(), SOURCES);
    let srcs = sources.clone();
    let tcp = c
        .net
        .client
        .run(move || tcp_round(&srcs, dst, Duration::from_secs(3)));
    let srcs = sources.clone();
    let mut udp = c
        .net
        .client
        .run(move || udp_round(&srcs, dst, Duration::from_millis(300)))
        .unwrap();
    // UDP may be lost (200 datagrams at once to one unresolved neighbour, a
    // loaded machine): a source with no answer asks again from a fresh port. A
    // wrong or double answer is never retried away.
    for _ in 0..3 {
        let silent: Vec<_> = udp
            .iter()
            .filter(|(_, u)| u.is_empty())
            .map(|(s, _)| *s)
            .collect();
        if silent.is_empty() {
            break;
        }
        let again = c
            .net
            .client
            .run(move || udp_round(&silent, dst, Duration::from_millis(500)))
            .unwrap();
        for (src, got) in again {
            if let Some(slot) = udp.iter_mut().find(|(s, _)| *s == src) {
                slot.1 = got;
            }
        }
    }
    let mut wrong = Vec::new();
    for ((src, t), (_, u)) in tcp.iter().zip(&udp) {
        let want = &map[c.bucket_of(*src) as usize];
        if t.as_ref().ok() != Some(want) {
            wrong.push(format!("{src} tcp: {t:?}, want {want}"));
        }
        if u != &vec![want.clone()] {
            wrong.push(format!("{src} udp: {u:?}, want [{want}]"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} wrong answers: {wrong:#?}",
        wrong.len()
    );
}

/// Probes every source over UDP in a loop until stopped; records any source
/// that got answers from two different hosts in one round, and the sources
/// that got no answer per round.
struct DoubleWatch {
    stop: Arc<AtomicBool>,
    doubles: Arc<Mutex<Vec<String>>>,
    rounds: Arc<Mutex<Vec<Round>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DoubleWatch {
    /// Over IPv4 and IPv6: the IPv4 sources and their IPv6 twins.
    fn start(c: &Cluster, sources: Vec<Ipv4Addr>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let doubles = Arc::new(Mutex::new(Vec::new()));
        let rounds = Arc::new(Mutex::new(Vec::new()));
        let (dst, dst6) = (c.vip_addr(), c.vip6_addr());
        let sources6: Vec<IpAddr> = sources.iter().map(|&a| v6_twin(a).into()).collect();
        let sources: Vec<IpAddr> = sources.into_iter().map(IpAddr::from).collect();
        let (s, d, r) = (stop.clone(), doubles.clone(), rounds.clone());
        let thread = c.net.client.spawn(move || {
            // Alternating families, each round with its own start time.
            for ipv6 in [false, true].into_iter().cycle() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let at = Instant::now();
                let wait = Duration::from_millis(150);
                let res = if ipv6 {
                    udp_round(&sources6, dst6, wait)
                } else {
                    udp_round(&sources, dst, wait)
                };
                let Ok(res) = res else {
                    continue;
                };
                let mut round = BTreeMap::new();
                for (src, names) in res {
                    let distinct: BTreeSet<&String> = names.iter().collect();
                    if distinct.len() > 1 {
                        d.lock()
                            .unwrap()
                            .push(format!("{src}: {names:?} in the round sent at {at:?}"));
                    }
                    round.insert(src, names);
                }
                r.lock().unwrap().push((at, round));
            }
        });
        DoubleWatch {
            stop,
            doubles,
            rounds,
            thread: Some(thread),
        }
    }

    /// The rounds so far.
    fn rounds(&self) -> Vec<Round> {
        self.rounds.lock().unwrap().clone()
    }

    fn finish(mut self) -> (Vec<String>, Vec<Round>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (
            std::mem::take(&mut self.doubles.lock().unwrap()),
            std::mem::take(&mut self.rounds.lock().unwrap()),
        )
    }
}

impl Drop for DoubleWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sources_of(c: &Cluster, map: &[String], owner: &str) -> Vec<Ipv4Addr> {
    c.net
        .sources()
        .unwrap()
        .into_iter()
        .filter(|s| map[c.bucket_of(*s) as usize] == owner)
        .collect()
}

/// The IPv6 sources whose bucket `owner` holds (not the twins of
/// [`sources_of`]: an address and its twin hash to unrelated buckets).
fn sources6_of(c: &Cluster, map: &[String], owner: &str) -> Vec<Ipv6Addr> {
    c.net
        .sources6()
        .unwrap()
        .into_iter()
        .filter(|s| map[c.bucket_of(*s) as usize] == owner)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_is_answered_by_the_predicted_host() {
    let c = cluster().await;
    let map = c.bucket_map().unwrap();
    check_predicted(&c, &map);
    // The client learnt the VIP's MAC from ARP: the cluster's multicast MAC.
    let neigh = c
        .net
        .client
        .ip(&["neigh", "show", &c.net.vip().to_string()])
        .unwrap();
    assert!(
        neigh.contains("01:00:5e:"),
        "client neighbour entry: {neigh}"
    );
    // And from neighbour discovery for the IPv6 VIP: its 33:33 MAC.
    let vip6 = c.net.vip6();
    let neigh = c
        .net
        .client
        .ip(&["-6", "neigh", "show", &vip6.to_string()])
        .unwrap();
    let o = vip6.octets();
    let mac = format!(
        "33:33:{:02x}:{:02x}:{:02x}:{:02x}",
        o[12], o[13], o[14], o[15]
    );
    assert!(neigh.contains(&mac), "client IPv6 neighbour entry: {neigh}");
    // `vipsharectl which` names the same host as the map for IPv6 sources.
    for src in c.net.sources6().unwrap().into_iter().step_by(20) {
        let out = c.lab.ctl(&["which", &src.to_string(), "--json"]).unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let b = c.bucket_of(src);
        assert_eq!(v["bucket"], b, "{src}");
        assert_eq!(v["owner"], map[b as usize].as_str(), "{src}");
    }
    // Each agent exports its buckets, lease and the kernel's packet counters.
    let vip = c.net.vip().to_string();
    let text = vipshare_integration::wait_for(Duration::from_secs(5), "agent metrics", || async {
        let t = c.agent_metrics(0).await.ok()?;
        let accepted =
            format!("vipshare_agent_packets_total{{vip=\"{vip}\",verdict=\"accepted\"}}");
        t.lines().any(|l| l.starts_with(&accepted)).then_some(t)
    })
    .await
    .unwrap();
    let owned = map.iter().filter(|o| *o == "h1").count();
    assert!(
        text.contains(&format!("vipshare_agent_buckets_owned {owned}")),
        "{text}"
    );
    for name in [
        "vipshare_agent_lease_remaining_seconds",
        "vipshare_agent_reconcile_seconds",
        "verdict=\"not_owned\"",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    // The servers saw each accepted flow exactly once, on one host.
    let accepted = c.accepted.lock().unwrap().clone();
    let mut seen = BTreeMap::new();
    for (host, peer) in &accepted {
        if let Some(other) = seen.insert(*peer, host.clone()) {
            panic!("{peer} accepted by {other} and {host}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_stops_accepting_within_its_lease_and_others_take_over() {
    let mut c = cluster().await;
    let map = c.bucket_map().unwrap();
    let h1_sources = sources_of(&c, &map, "h1");
    assert!(
        !h1_sources.is_empty() && h1_sources.len() < SOURCES,
        "h1 serves {} of {SOURCES} sources",
        h1_sources.len()
    );
    let watch = DoubleWatch::start(&c, c.net.sources().unwrap());
    let killed = Instant::now();
    c.agents[0].kill();
    // The kernel alone empties h1's set: nobody renews it any more.
    loop {
        let set = owned_set(&c.net.hosts[0]).unwrap_or_default();
        if set.is_empty() {
            break;
        }
        assert!(
            killed.elapsed() < LEASE + Duration::from_millis(100),
            "h1 still accepts {set:?} {:?} after SIGKILL",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let emptied = killed.elapsed();
    let map2 = c
        .wait_converged(&members(&["h2", "h3"]), Duration::from_secs(20))
        .await
        .unwrap();
    let moved = killed.elapsed();
    // Failover per family: when the last of h1's sources was first answered
    // by another host, over rounds sent after the kill (a lost datagram only
    // delays its source by a round; h1 answering late is checked below).
    let h1_sources6 = sources6_of(&c, &map, "h1");
    let failover = |rounds: &[Round], v6: bool| {
        let srcs: Vec<IpAddr> = if v6 {
            h1_sources6.iter().map(|&a| a.into()).collect()
        } else {
            h1_sources.iter().map(|&a| a.into()).collect()
        };
        let first = |s: &IpAddr| {
            rounds
                .iter()
                .filter(|(at, _)| *at > killed)
                .find(|(_, r)| {
                    r.get(s)
                        .is_some_and(|n| !n.is_empty() && n.iter().all(|n| n != "h1"))
                })
                .map(|(at, _)| at.duration_since(killed))
        };
        srcs.iter()
            .map(first)
            .collect::<Option<Vec<_>>>()?
            .into_iter()
            .max()
    };
    let (f4, f6) = vipshare_integration::wait_for(
        Duration::from_secs(10),
        "failover seen by the client",
        || async {
            let r = watch.rounds();
            Some((failover(&r, false)?, failover(&r, true)?))
        },
    )
    .await
    .unwrap();
    let (doubles, rounds) = watch.finish();
    assert!(doubles.is_empty(), "two hosts answered: {doubles:?}");
    check_predicted(&c, &map2);
    // After the kernel timeout, h1 answered no new flow.
    let late: Vec<_> = rounds
        .iter()
        .filter(|(at, _)| at.duration_since(killed) > LEASE)
        .flat_map(|(_, r)| r.iter())
        .filter(|(_, names)| names.iter().any(|n| n == "h1"))
        .map(|(s, _)| *s)
        .collect();
    assert!(late.is_empty(), "h1 answered after its lease: {late:?}");
    eprintln!(
        "h1 killed: kernel set empty after {emptied:?}, its {} IPv4 and {} IPv6 sources served by \
         others after {moved:?} (map); all answered elsewhere after IPv4 {f4:?}, IPv6 {f6:?}",
        h1_sources.len(),
        h1_sources6.len()
    );
    // Both families fail over with the same buckets and leases: IPv6 within
    // IPv4's time plus a few probe rounds (150 ms each, alternating families).
    assert!(
        f6 <= f4 + Duration::from_millis(600),
        "IPv6 failover {f6:?} against IPv4 {f4:?}"
    );
}

/// A connection that sends a line every 100 ms and records every answer.
struct LongLived {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<Vec<String>, String>>>,
}

impl LongLived {
    fn open(c: &Cluster, src: Ipv4Addr) -> Self {
        Self::open_on(&c.net.client, src.into(), c.vip_addr().into())
    }

    fn open6(c: &Cluster, src: Ipv6Addr) -> Self {
        Self::open_on(&c.net.client, src.into(), c.vip6_addr().into())
    }

    fn open_on(client: &vipshare_integration::netns::Netns, src: IpAddr, dst: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = client.spawn(move || {
            use std::io::{BufRead, BufReader, Write};
            let domain = socket2::Domain::for_address(dst);
            let sock = socket2::Socket::new(domain, socket2::Type::STREAM, None)
                .map_err(|e| e.to_string())?;
            sock.bind(&SocketAddr::new(src, 0).into())
                .map_err(|e| e.to_string())?;
            sock.connect_timeout(&dst.into(), Duration::from_secs(3))
                .map_err(|e| e.to_string())?;
            let stream: std::net::TcpStream = sock.into();
            stream
                .set_read_timeout(Some(Duration::from_secs(3)))
                .map_err(|e| e.to_string())?;
            let mut w = stream.try_clone().map_err(|e| e.to_string())?;
            let mut r = BufReader::new(stream);
            let mut answers = Vec::new();
            let mut line = String::new();
            r.read_line(&mut line).map_err(|e| e.to_string())?;
            answers.push(line.trim().to_string());
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                w.write_all(b"ping\n")
                    .map_err(|e| format!("write after {} answers: {e}", answers.len()))?;
                line.clear();
                match r.read_line(&mut line) {
                    Ok(0) => return Err(format!("closed after {} answers", answers.len())),
                    Ok(_) => answers.push(line.trim().to_string()),
                    Err(e) => return Err(format!("read after {} answers: {e}", answers.len())),
                }
            }
            Ok(answers)
        });
        LongLived {
            stop,
            thread: Some(thread),
        }
    }

    /// Waits (at most 5 s) for the connection to fail; `Ok` if it did not.
    fn wait(&mut self) -> Result<Vec<String>, String> {
        let stop = self.stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(5));
            stop.store(true, Ordering::Relaxed);
        });
        self.thread.take().unwrap().join().unwrap()
    }

    fn close(mut self) -> Result<Vec<String>, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for LongLived {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One UDP flow (a fixed source address and port) that sends a datagram every
/// 100 ms and records, per datagram, the hosts that answered it within the
/// 100 ms before the next one.
struct UdpFlow {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<Vec<Vec<String>>, String>>>,
}

impl UdpFlow {
    fn open(c: &Cluster, src: Ipv4Addr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let dst = c.vip_addr();
        let thread = c.net.client.spawn(move || {
            // Above udp_round's ports: no other flow of this test uses it.
            let sock = std::net::UdpSocket::bind(SocketAddrV4::new(src, 33_000))
                .map_err(|e| e.to_string())?;
            sock.set_read_timeout(Some(Duration::from_millis(10)))
                .map_err(|e| e.to_string())?;
            let mut answers = Vec::new();
            let mut buf = [0u8; 64];
            while !s.load(Ordering::Relaxed) {
                sock.send_to(b"who\n", dst).map_err(|e| e.to_string())?;
                let end = Instant::now() + Duration::from_millis(100);
                let mut got = Vec::new();
                while Instant::now() < end {
                    if let Ok((n, _)) = sock.recv_from(&mut buf) {
                        got.push(String::from_utf8_lossy(&buf[..n]).trim().to_string());
                    }
                }
                answers.push(got);
            }
            Ok(answers)
        });
        UdpFlow {
            stop,
            thread: Some(thread),
        }
    }

    fn close(mut self) -> Result<Vec<Vec<String>>, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("joined once")
            .join()
            .expect("flow thread")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_lived_connection_survives_a_planned_move_of_its_bucket() {
    let c = cluster().await;
    let map = c.bucket_map().unwrap();
    let src = sources_of(&c, &map, "h1")[0];
    let conn = LongLived::open(&c, src);
    // IPv6 connections from ten of h1's sources: the drain moves all their
    // buckets.
    let conns6: Vec<LongLived> = sources6_of(&c, &map, "h1")
        .into_iter()
        .take(10)
        .map(|s| LongLived::open6(&c, s))
        .collect();
    let flow = UdpFlow::open(&c, src);
    // Let them talk to h1 for a moment before the move.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let watch = DoubleWatch::start(&c, c.net.sources().unwrap());
    let out = c.lab.ctl(&["drain", "h1"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let map2 = c
        .wait_converged(&members(&["h2", "h3"]), Duration::from_secs(20))
        .await
        .unwrap();
    // The old connection keeps talking to h1 for a while after the move.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let answers = conn.close().expect("long-lived connection broke");
    for (i, c6) in conns6.into_iter().enumerate() {
        let a = c6.close().expect("long-lived IPv6 connection broke");
        assert!(
            a.len() >= 8,
            "IPv6 connection {i}: only {} answers",
            a.len()
        );
        assert!(
            a.iter().all(|a| a == "h1"),
            "IPv6 connection {i} switched hosts: {a:?}"
        );
    }
    let datagrams = flow.close().expect("UDP flow");
    let (doubles, _) = watch.finish();
    assert!(doubles.is_empty(), "two hosts answered: {doubles:?}");
    assert!(answers.len() >= 8, "only {} answers", answers.len());
    assert!(
        answers.iter().all(|a| a == "h1"),
        "answers switched hosts: {answers:?}"
    );
    // A new connection from the same source goes to the bucket's new owner.
    let dst = c.vip_addr();
    let new = c
        .net
        .client
        .run(move || tcp_round(&[src], dst, Duration::from_secs(3)));
    let want = &map2[c.bucket_of(src) as usize];
    assert_eq!(new[0].1.as_ref(), Ok(want));
    assert_ne!(want, "h1");
    // The UDP flow moved with its bucket: answered by h1, then by the new
    // owner alone (h1's conntrack entry for it no longer lets it through),
    // never by both.
    let twice: Vec<_> = datagrams
        .iter()
        .enumerate()
        .filter(|(_, got)| got.len() > 1)
        .collect();
    assert!(twice.is_empty(), "UDP datagrams answered twice: {twice:?}");
    let names: Vec<&str> = datagrams.iter().flatten().map(String::as_str).collect();
    assert_eq!(names.first(), Some(&"h1"), "UDP answers: {names:?}");
    assert_eq!(names.last(), Some(&want.as_str()), "UDP answers: {names:?}");
    let switched = names.iter().position(|n| *n != "h1").unwrap_or(names.len());
    assert!(
        names[switched..].iter().all(|n| n == want),
        "UDP answers went back and forth: {names:?}"
    );
    check_predicted(&c, &map2);
}

/// TCP probes from `sources`, round after round, until stopped: (failures,
/// answers per host). A probe may take a SYN retransmission (3 s timeout).
struct Prober {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<ProbeResult>>,
}

impl Prober {
    fn start(c: &Cluster, sources: Vec<Ipv4Addr>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let dst = c.vip_addr();
        let thread = c.net.client.spawn(move || {
            let mut failures = Vec::new();
            let mut answers = BTreeMap::new();
            while !s.load(Ordering::Relaxed) {
                for (src, r) in tcp_round(&sources, dst, Duration::from_secs(3)) {
                    match r {
                        Ok(name) => *answers.entry(name).or_insert(0) += 1,
                        Err(e) => failures.push(format!("{src}: {e}")),
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (failures, answers)
        });
        Prober {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> ProbeResult {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_an_agent_causes_no_gap_for_its_buckets() {
    let mut c = cluster().await;
    let map = c.bucket_map().unwrap();
    let h1_sources: Vec<Ipv4Addr> = sources_of(&c, &map, "h1").into_iter().take(20).collect();
    let watch = DoubleWatch::start(&c, c.net.sources().unwrap());
    let probe = Prober::start(&c, h1_sources.clone());

    // 1. Crash and immediate restart: the new agent adopts the kernel state
    // and renews it before the old lease runs out.
    c.agents[0].kill();
    let restarted = Instant::now();
    c.agents[0].restart().unwrap();
    let mut empty_for = Duration::ZERO;
    let mut last = Instant::now();
    while restarted.elapsed() < Duration::from_secs(2) {
        let empty = owned_set(&c.net.hosts[0]).unwrap_or_default().is_empty();
        if empty {
            empty_for += last.elapsed();
        }
        last = Instant::now();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let map_after = c.bucket_map().unwrap();
    assert_eq!(map_after, map, "a quick restart moved buckets");
    eprintln!("SIGKILL + restart: h1's kernel set was empty for {empty_for:?}");

    // 2. Planned restart: SIGTERM drains h1 (its buckets move, connections
    // kept), the agent removes its kernel state and exits 0.
    let status = c.agents[0].terminate(Duration::from_secs(25)).unwrap();
    assert!(status.success(), "agent exit status {status}");
    let after = c.bucket_map().unwrap();
    assert!(after.iter().all(|o| o != "h1"), "h1 still owns buckets");
    let h1 = &c.net.hosts[0];
    assert!(owned_set(h1).is_none(), "h1's tables are still there");
    let addrs = h1.ip(&["-4", "addr", "show", "dev", "eth0"]).unwrap();
    assert!(
        !addrs.contains(&c.net.vip().to_string()),
        "VIP still on h1: {addrs}"
    );
    assert_eq!(
        h1.read_sysctl("net.ipv4.conf.all.arp_announce").unwrap(),
        "0"
    );
    assert_eq!(
        h1.read_sysctl("net.netfilter.nf_conntrack_tcp_loose")
            .unwrap(),
        "1"
    );
    c.agents[0].restart().unwrap();
    let out = c.lab.ctl(&["undrain", "h1"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let map2 = c
        .wait_converged(&members(&["h1", "h2", "h3"]), Duration::from_secs(30))
        .await
        .unwrap();
    let (failures, answers) = probe.finish();
    let (doubles, _) = watch.finish();
    assert!(doubles.is_empty(), "two hosts answered: {doubles:?}");
    assert!(
        failures.is_empty(),
        "{} probes failed: {failures:?} (answers {answers:?})",
        failures.len()
    );
    eprintln!("probes answered during the restarts: {answers:?}");
    check_predicted(&c, &map2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_agent_loses_its_buckets_without_two_hosts_accepting() {
    let mut c = cluster().await;
    let watch = DoubleWatch::start(&c, c.net.sources().unwrap());
    let mut overlaps = Vec::new();
    let mut sample = |c: &Cluster| {
        let sets = c.kernel_sets();
        for i in 0..sets.len() {
            for j in i + 1..sets.len() {
                let (a, b) = (
                    sets[i].clone().unwrap_or_default(),
                    sets[j].clone().unwrap_or_default(),
                );
                let both: Vec<u32> = a.intersection(&b).copied().collect();
                if !both.is_empty() {
                    overlaps.push(format!("h{} and h{}: {both:?}", i + 1, j + 1));
                }
            }
        }
    };
    let frozen = Instant::now();
    c.agents[0].freeze();
    let deadline = Instant::now() + Duration::from_secs(20);
    // First only h1's own set, polled tightly, so the measured time is the
    // kernel's and not the cost of the slower checks below.
    let emptied = loop {
        if owned_set(&c.net.hosts[0]).unwrap_or_default().is_empty() {
            break frozen.elapsed();
        }
        assert!(Instant::now() < deadline, "h1's kernel set never emptied");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    loop {
        sample(&c);
        let map = c.bucket_map().unwrap();
        if map.iter().all(|o| o == "h2" || o == "h3") {
            break;
        }
        assert!(Instant::now() < deadline, "buckets never left h1: {map:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        emptied < LEASE + Duration::from_millis(100),
        "frozen h1 accepted for {emptied:?}"
    );
    let moved = frozen.elapsed();
    c.wait_converged(&members(&["h2", "h3"]), Duration::from_secs(20))
        .await
        .unwrap();
    // Thaw: the agent learns it was fenced and must not take anything back
    // that is not its own again.
    c.agents[0].thaw();
    let thawed = Instant::now();
    while thawed.elapsed() < Duration::from_secs(2) {
        sample(&c);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (doubles, _) = watch.finish();
    // h1's warnings and errors (a late lease write at thaw shows here).
    let h1_log: Vec<String> = c.agents[0]
        .log_text()
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .map(str::to_string)
        .collect();
    assert!(
        doubles.is_empty(),
        "two hosts answered: {doubles:?} (frozen at {frozen:?}, thawed at {thawed:?}); \
         h1 logged: {h1_log:#?}"
    );
    assert!(overlaps.is_empty(), "kernel sets overlapped: {overlaps:?}");
    let log = c.agents[0].log_text();
    assert!(
        log.contains("fenced"),
        "h1 never noticed it was fenced:\n{log}"
    );
    eprintln!("SIGSTOP: h1's set empty after {emptied:?}, buckets moved after {moved:?}");
}

mod direct {
    //! The data plane alone (no controllers, no agent process): kernel expiry
    //! of the lease, RST for unknown flows of buckets whose old owner is dead,
    //! and a clean teardown.

    use super::*;
    use vipshare_agent::dataplane::linux::{LinuxConfig, LinuxDataPlane, OsExecutor};
    use vipshare_agent::dataplane::{Affinity, BucketFn, DataPlane, Desired, Mac, VipConfig};
    use vipshare_integration::netns::{NetLab, Netns, Servers, PORT};

    type Plane = LinuxDataPlane<OsExecutor>;

    /// Both VIPs, IPv4 and IPv6.
    fn desired(net: &NetLab, owned: impl IntoIterator<Item = u32>, lease: Duration) -> Desired {
        Desired {
            vips: vec![
                VipConfig {
                    addr: net.vip().into(),
                    prefix_len: 32,
                    mac: Mac([0x01, 0x00, 0x5e, 0x7f, 0x00, net.k]),
                    interface: "eth0".into(),
                    mode: Default::default(),
                },
                VipConfig {
                    addr: net.vip6().into(),
                    prefix_len: 64,
                    mac: Mac([0x33, 0x33, 0x7f, 0x00, 0x00, net.k]),
                    interface: "eth0".into(),
                    mode: Default::default(),
                },
            ],
            bucket_count: 4,
            bucket_fn: BucketFn::Jhash,
            affinity: Affinity::Address,
            seed: 7,
            owned: owned.into_iter().collect(),
            lease_until: std::time::Instant::now() + lease,
        }
    }

    /// Runs `f` on the plane inside its namespace.
    fn with<T: Send + 'static>(
        ns: &Netns,
        plane: Plane,
        f: impl FnOnce(&mut Plane) -> T + Send + 'static,
    ) -> (Plane, T) {
        ns.run(move || {
            let mut p = plane;
            let t = f(&mut p);
            (p, t)
        })
    }

    fn plane(ns: &Netns, state: &std::path::Path) -> Plane {
        let cfg = LinuxConfig {
            state_dir: Some(state.to_path_buf()),
            ..LinuxConfig::default()
        };
        ns.run(move || LinuxDataPlane::os(cfg).unwrap())
    }

    #[test]
    fn kernel_expiry_reset_of_dead_owners_flows_and_teardown() {
        let net = NetLab::new(2, 4).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let accepted = Default::default();
        let _s1 =
            Servers::start(&net.hosts[0], "h1", net.vip(), PORT, Arc::clone(&accepted)).unwrap();
        let _s2 = Servers::start(&net.hosts[1], "h2", net.vip(), PORT, accepted).unwrap();
        let (h1, h2) = (&net.hosts[0], &net.hosts[1]);
        let before = h1.read_sysctl("net.ipv4.conf.all.arp_announce").unwrap();
        let p1 = plane(h1, &tmp.path().join("h1"));
        let p2 = plane(h2, &tmp.path().join("h2"));
        let all = 0..4;
        let long = Duration::from_secs(60);
        let (d1, d2) = (desired(&net, all.clone(), long), desired(&net, [], long));
        let (p1, r) = with(h1, p1, move |p| p.apply(&d1));
        r.unwrap();
        let (p2, r) = with(h2, p2, move |p| p.apply(&d2));
        r.unwrap();
        let src = net.sources().unwrap()[0];
        let dst = SocketAddrV4::new(net.vip(), PORT);
        let probe = |n: &Netns| {
            n.run(move || tcp_round(&[src], dst, Duration::from_millis(1500)))[0]
                .1
                .clone()
        };
        assert_eq!(probe(&net.client), Ok("h1".to_string()));
        let (src6, dst6) = (
            net.sources6().unwrap()[0],
            SocketAddr::new(net.vip6().into(), PORT),
        );
        let probe6 = |n: &Netns| {
            n.run(move || tcp_round(&[src6], dst6, Duration::from_millis(1500)))[0]
                .1
                .clone()
        };
        assert_eq!(probe6(&net.client), Ok("h1".to_string()));

        // The kernel ends a lease on its own: nothing renews h1's 300 ms lease.
        let short = desired(&net, all.clone(), Duration::from_millis(300));
        let (p1, r) = with(h1, p1, move |p| p.apply(&short));
        r.unwrap();
        std::thread::sleep(Duration::from_millis(450));
        assert_eq!(owned_set(h1), Some(BTreeSet::new()));
        assert!(probe(&net.client).is_err(), "h1 accepted after its lease");
        assert!(
            probe6(&net.client).is_err(),
            "h1 accepted over IPv6 after its lease"
        );
        let d1 = desired(&net, all.clone(), long);
        let (p1, r) = with(h1, p1, move |p| p.apply(&d1));
        r.unwrap();

        // A connection established on h1; its bucket moves to h2, which is
        // told the old owner is dead: h2 resets the flow it does not know.
        let mut conn = LongLived::open_on(&net.client, src.into(), dst.into());
        std::thread::sleep(Duration::from_millis(300));
        let none = desired(&net, [], long);
        let (p1, r) = with(h1, p1, move |p| p.apply(&none));
        r.unwrap();
        let d2 = desired(&net, all.clone(), long);
        let (p2, r) = with(h2, p2, move |p| {
            p.set_reset_buckets((0..4).collect());
            p.apply(&d2)
        });
        r.unwrap();
        let err = conn.wait().expect_err("the connection survived the reset");
        assert!(
            err.contains("reset") || err.contains("closed") || err.contains("os error 104"),
            "{err}"
        );
        assert_eq!(probe(&net.client), Ok("h2".to_string()));
        assert_eq!(probe6(&net.client), Ok("h2".to_string()));

        // Teardown: VIPs, tables and sysctls as before.
        for (ns, p) in [(h1, p1), (h2, p2)] {
            let (_, r) = with(ns, p, |p| p.teardown());
            r.unwrap();
            assert!(owned_set(ns).is_none());
            let addrs = ns.ip(&["-4", "addr", "show", "dev", "eth0"]).unwrap();
            assert!(!addrs.contains(&net.vip().to_string()), "{addrs}");
            let addrs = ns.ip(&["-6", "addr", "show", "dev", "lo"]).unwrap();
            assert!(!addrs.contains(&net.vip6().to_string()), "{addrs}");
            assert!(
                ns.exec("nft", &["list", "table", "ip6", "vipshare"])
                    .is_err(),
                "ip6 table left behind"
            );
            assert_eq!(
                ns.read_sysctl("net.ipv4.conf.all.arp_announce").unwrap(),
                before
            );
        }
        assert!(
            !tmp.path().join("h1/linux-vipshare.json").exists(),
            "state file left behind"
        );
    }

    /// The elements of the `owned` sets of both families as nft lists them,
    /// without timeouts.
    fn listed_elements(ns: &Netns) -> Vec<String> {
        ["ip", "ip6"]
            .iter()
            .map(|f| {
                let out = ns
                    .exec("nft", &["list", "set", f, "vipshare", "owned"])
                    .unwrap();
                let start = out.find("elements = {").map_or(out.len(), |i| i + 12);
                let end = out[start..].find('}').map_or(out.len(), |i| start + i);
                let mut e: Vec<String> = out[start..end]
                    .split(',')
                    .map(|x| x.split_whitespace().next().unwrap_or("").to_string())
                    .filter(|x| !x.is_empty())
                    .collect();
                e.sort();
                format!("{f}: {}", e.join(" "))
            })
            .collect()
    }

    /// A renewal goes to the kernel over netlink, a rebuild through
    /// libnftables: both must write the same elements, for every key type
    /// (`mark` for jhash, addresses for lowbits).
    #[test]
    fn a_renewal_over_netlink_writes_the_elements_nft_writes() {
        let net = NetLab::new(1, 1).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let h1 = &net.hosts[0];
        for bucket_fn in [BucketFn::Jhash, BucketFn::Lowbits] {
            let mut p = plane(h1, &tmp.path().join(format!("{bucket_fn:?}")));
            let long = Duration::from_secs(60);
            let with_fn = |owned: Vec<u32>| Desired {
                bucket_fn,
                ..desired(&net, owned, long)
            };
            // First apply: a rebuild, elements written by libnftables.
            let d = with_fn(vec![1, 3]);
            let r;
            (p, r) = with(h1, p, move |p| p.apply(&d));
            r.unwrap();
            let by_nft = listed_elements(h1);
            assert!(
                by_nft.iter().all(|l| l.split(' ').count() == 3),
                "{bucket_fn:?}: two elements per family: {by_nft:?}"
            );
            // Renewals: netlink only.
            for owned in [vec![0, 2], vec![1, 3]] {
                let d = with_fn(owned);
                let r;
                (p, r) = with(h1, p, move |p| p.apply(&d));
                assert!(!r.unwrap().changed, "{bucket_fn:?}: a renewal rebuilt");
            }
            assert_eq!(listed_elements(h1), by_nft, "{bucket_fn:?}");
            let (_, r) = with(h1, p, |p| p.withdraw());
            r.unwrap();
        }
    }
}

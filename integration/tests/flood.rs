//! Knocking does not lock anyone out (issue 13): 2,000 idle unauthenticated
//! connections to each of the three controllers (half silent TCP, half stalled
//! inside a TLS record), from 50 client addresses, each opened again as soon as a
//! controller closes it. Meanwhile agents keep their leases (no bucket moves),
//! `vipsharectl` reads succeed, a drain and an undrain converge, a killed agent's
//! restart connects anew and gets its buckets back, and the controllers' logs of
//! refusals stay bounded while the metric counts every one.
//!
//! Needs root; build the binaries first (`cargo build --workspace --bins`).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use socket2::{Domain, Protocol, Socket, Type};
use vipshare_integration::scenario::{
    poll, wait_converged, HostProvider, LabOptions, MapWatch, NetnsProvider,
};

/// Idle connections held open to each controller.
const PER_CONTROLLER: usize = 2000;
/// Client addresses the flood comes from.
const FLOOD_SOURCES: usize = 50;
/// How often the attacker looks for closed connections to open again.
const ROUND: Duration = Duration::from_millis(50);
const CONVERGE: Duration = Duration::from_secs(30);
/// A TLS handshake record header announcing 512 bytes that never come.
const STALLED_RECORD: [u8; 5] = [0x16, 0x03, 0x01, 0x02, 0x00];

struct Conn {
    sock: Socket,
    stalled: bool,
    sent: bool,
}

/// The attacker: a thread in the client namespace holding the connections.
struct Flood {
    stop: Arc<AtomicBool>,
    open: Arc<AtomicUsize>,
    reopened: Arc<AtomicUsize>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

fn open(src: Ipv4Addr, dst: SocketAddrV4) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
    match s.connect(&SocketAddr::V4(dst).into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(s)
}

/// Whether the peer closed or reset `s` (a connection still connecting is alive).
fn closed(s: &Socket) -> bool {
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    match s.peek(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

impl Flood {
    fn start(p: &NetnsProvider, targets: Vec<SocketAddrV4>) -> anyhow::Result<Self> {
        let sources: Vec<Ipv4Addr> = p.net.sources()?.into_iter().take(FLOOD_SOURCES).collect();
        ensure!(sources.len() == FLOOD_SOURCES, "too few client addresses");
        let stop = Arc::new(AtomicBool::new(false));
        let open_n = Arc::new(AtomicUsize::new(0));
        let reopened = Arc::new(AtomicUsize::new(0));
        let (s, o, r) = (stop.clone(), open_n.clone(), reopened.clone());
        let thread = p.net.client.spawn(move || -> anyhow::Result<()> {
            let slots: Vec<(Ipv4Addr, SocketAddrV4, bool)> = targets
                .iter()
                .flat_map(|&t| {
                    let sources = sources.clone();
                    (0..PER_CONTROLLER).map(move |i| (sources[i % sources.len()], t, i % 2 == 1))
                })
                .collect();
            let mut conns: Vec<Option<Conn>> = slots.iter().map(|_| None).collect();
            while !s.load(Ordering::Relaxed) {
                let mut alive = 0;
                for (i, &(src, dst, stalled)) in slots.iter().enumerate() {
                    let slot = &mut conns[i];
                    if slot.as_ref().is_some_and(|c| closed(&c.sock)) {
                        *slot = None;
                        r.fetch_add(1, Ordering::Relaxed);
                    }
                    if slot.is_none() {
                        let sock = open(src, dst).with_context(|| format!("{src} -> {dst}"))?;
                        *slot = Some(Conn {
                            sock,
                            stalled,
                            sent: false,
                        });
                    }
                    if let Some(c) = slot.as_mut() {
                        if c.stalled && !c.sent {
                            // Fails (EAGAIN) while still connecting: tried again next round.
                            c.sent = c.sock.send(&STALLED_RECORD).is_ok();
                        }
                        alive += 1;
                    }
                }
                o.store(alive, Ordering::Relaxed);
                std::thread::sleep(ROUND);
            }
            Ok(())
        });
        Ok(Flood {
            stop,
            open: open_n,
            reopened,
            thread: Some(thread),
        })
    }

    fn finish(mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => anyhow::bail!("flood thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Value of `metric` (a counter or gauge line prefix, labels included) summed.
fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn raise_fd_limit(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn flood_scenario(p: &mut NetnsProvider) -> anyhow::Result<()> {
    let hosts = p.hosts();
    let all: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let m0 = wait_converged(p, &all, CONVERGE)?;
    let targets: Vec<SocketAddrV4> = (1..=3)
        .map(|id| p.lab.address(id).parse())
        .collect::<Result<_, _>>()?;
    let before: Vec<f64> = (1..=3)
        .map(|id| {
            let m = p.block_on(p.lab.metrics(id)).unwrap_or_default();
            metric_sum(&m, "vipshare_tls_handshake_failures_total{")
        })
        .collect();
    let log_lines = |p: &NetnsProvider, id: u64| {
        p.controller_log(id)
            .lines()
            .filter(|l| l.contains("TLS connection rejected"))
            .count()
    };
    let lines_before: Vec<usize> = (1..=3).map(|id| log_lines(p, id)).collect();

    let watch = MapWatch::start(p.ctl());
    let started = Instant::now();
    let flood = Flood::start(p, targets)?;
    poll(
        Duration::from_secs(30),
        "the flood to hold its connections",
        || (flood.open.load(Ordering::Relaxed) >= 3 * PER_CONTROLLER).then_some(()),
    )?;
    // The flood bites: every controller's pending slots are full and it is evicting.
    poll(Duration::from_secs(30), "every controller evicting", || {
        (1..=3)
            .all(|id| {
                let m = p.block_on(p.lab.metrics(id)).unwrap_or_default();
                metric_sum(
                    &m,
                    "vipshare_tls_handshake_failures_total{reason=\"overloaded\"",
                ) > 0.0
            })
            .then_some(())
    })?;
    eprintln!("[flood] established in {:.1?}", started.elapsed());

    // Reads: each a new connection through the flood.
    let mut took = Vec::new();
    for i in 0..20 {
        let t = Instant::now();
        let args: &[&str] = if i % 2 == 0 {
            &["status"]
        } else {
            &["buckets", "--json"]
        };
        p.ctl()
            .run(args)
            .with_context(|| format!("read {i} during the flood"))?;
        took.push(t.elapsed());
    }
    took.sort();
    eprintln!(
        "[flood] 20 of 20 reads succeeded: median {:?}, max {:?}",
        took[took.len() / 2],
        took[took.len() - 1]
    );
    // Heartbeats: a while of flood moves nothing.
    std::thread::sleep(Duration::from_secs(5));
    let history = watch.finish();
    ensure!(
        history.moved_from(&m0).is_empty(),
        "buckets moved during the flood with nothing planned: {:?}",
        history.moved_from(&m0)
    );

    // A drain and an undrain commit and converge.
    let t = Instant::now();
    p.ctl().run(&["drain", "h1"])?;
    let others: Vec<&str> = all.iter().copied().filter(|h| *h != "h1").collect();
    wait_converged(p, &others, CONVERGE).context("drain during the flood")?;
    let drained = t.elapsed();
    let t = Instant::now();
    p.ctl().run(&["undrain", "h1"])?;
    wait_converged(p, &all, CONVERGE).context("undrain during the flood")?;
    eprintln!(
        "[flood] drain converged in {drained:?}, undrain in {:?}",
        t.elapsed()
    );

    // A restarted agent dials every controller anew and gets buckets back.
    p.kill_agent("h2")?;
    p.restart_agent("h2")?;
    wait_converged(p, &all, CONVERGE).context("agent restart during the flood")?;

    let reopened = flood.reopened.load(Ordering::Relaxed);
    let secs = started.elapsed().as_secs_f64();
    flood.finish()?;
    for id in 1..=3u64 {
        let m = p.block_on(p.lab.metrics(id))?;
        let refused =
            metric_sum(&m, "vipshare_tls_handshake_failures_total{") - before[id as usize - 1];
        let lines = log_lines(p, id) - lines_before[id as usize - 1];
        eprintln!(
            "[flood] controller {id}: {refused} connections refused, {lines} log lines of refusals"
        );
        ensure!(refused >= 1000.0, "controller {id} refused only {refused}");
        // 20 lines per 10 s window (plus one summary each, not counted here).
        let windows = (secs / 10.0).ceil() as usize + 1;
        ensure!(
            lines <= 20 * windows,
            "controller {id} logged {lines} refusals in {secs:.0} s"
        );
    }
    eprintln!(
        "[flood] {reopened} connections opened again after the controllers closed them ({:.0}/s)",
        reopened as f64 / secs
    );
    Ok(())
}

#[test]
fn idle_connection_flood_locks_out_no_agent_or_admin() {
    raise_fd_limit(3 * PER_CONTROLLER as u64 + 4096);
    let mut p = NetnsProvider::start(LabOptions {
        hosts: 3,
        sources: FLOOD_SOURCES,
        buckets: 64,
        ..Default::default()
    })
    .expect("lab");
    let t = Instant::now();
    let r = flood_scenario(&mut p);
    eprintln!("[flood] finished in {:.1?}: {r:?}", t.elapsed());
    r.unwrap();
}

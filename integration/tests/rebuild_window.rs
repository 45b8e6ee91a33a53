//! Issue 16: a full rebuild of the nftables filter must never accept a new flow
//! of a bucket the host does not own, not even for one packet.
//!
//! One host namespace runs the real data plane and rebuilds it in a loop
//! (`invalidate` + `apply`, and applies that fail at an injected step, which
//! also force the next apply to rebuild), while a client namespace floods SYNs
//! from sources of buckets the host does not own, and a few from owned buckets.
//! A packet socket in the client captures every TCP segment from the VIP: the
//! host must answer owned sources (the capture works) and never a foreign one.
//! Needs root.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vipshare_agent::dataplane::linux::{
    Executor, LinuxConfig, LinuxDataPlane, OsExecutor, Present, Step,
};
use vipshare_agent::dataplane::{
    Affinity, BucketFn, DataPlane, DataPlaneError, Desired, Mac, VipConfig,
};
use vipshare_integration::netns::{NetLab, Netns, PORT};

const BUCKETS: u32 = 16;
const SEED: u32 = 0x4e4c_4221;
const SOURCES: usize = 64;

fn bucket(src: Ipv4Addr) -> u32 {
    vipshare_core::bucket::bucket_of(
        BucketFn::Jhash,
        Affinity::Address,
        BUCKETS,
        SEED,
        std::net::IpAddr::V4(src),
        None,
    )
    .expect("valid bucket config")
}

/// The OS executor, failing one step of every `every`-th plan it runs (after
/// running it, so the kernel is left half-changed as by a real failure).
struct Faulty {
    os: OsExecutor,
    every: usize,
    plans: usize,
    failed: usize,
}

impl Executor for Faulty {
    fn execute(&mut self, step: &Step, started: Instant) -> Result<(), DataPlaneError> {
        self.os.execute(step, started)?;
        // Fail right after the filter was rewritten: the next apply rebuilds.
        if matches!(step, Step::Nft(_)) {
            self.plans += 1;
            if self.plans.is_multiple_of(self.every) {
                self.failed += 1;
                return Err(DataPlaneError::Command {
                    command: step.to_string(),
                    detail: "injected failure".into(),
                });
            }
        }
        Ok(())
    }

    fn present(&mut self, table: &str) -> Result<Present, DataPlaneError> {
        self.os.present(table)
    }
}

fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet holding a TCP SYN from `src:sport` to `dst:PORT`.
fn syn(src: Ipv4Addr, sport: u16, dst: Ipv4Addr) -> Vec<u8> {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&PORT.to_be_bytes());
    tcp[4..8].copy_from_slice(&u32::from(sport).wrapping_mul(2_654_435_761).to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&tcp);
    let sum = checksum(&pseudo, 0);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(&tcp);
    ip
}

fn os_check(rc: libc::c_int, what: &str) -> std::io::Result<libc::c_int> {
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(rc)
}

/// Sends SYNs round-robin over `sources` (fresh source port each) until
/// stopped; returns how many were sent per source.
fn flood(sources: Vec<Ipv4Addr>, dst: Ipv4Addr, stop: Arc<AtomicBool>) -> std::io::Result<u64> {
    // SAFETY: plain socket calls with valid arguments; the fd is closed below.
    let fd = os_check(
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) },
        "raw socket",
    )?;
    let mut sent = 0u64;
    let mut port: u16 = 20000;
    while !stop.load(Ordering::Relaxed) {
        for &src in &sources {
            port = if port >= 60000 { 20000 } else { port + 1 };
            let pkt = syn(src, port, dst);
            let to = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from(dst).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: a valid buffer and address of the given sizes.
            let rc = unsafe {
                libc::sendto(
                    fd,
                    pkt.as_ptr().cast(),
                    pkt.len(),
                    0,
                    (&to as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if rc >= 0 {
                sent += 1;
            }
        }
        // Leave the CPU to the host's rebuilds now and then (2 shared cores).
        std::thread::sleep(Duration::from_micros(200));
    }
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(fd) };
    Ok(sent)
}

/// Captures IPv4 TCP segments from `vip:PORT` on the client's eth0 until
/// stopped: (answers to owned sources, answers to foreign sources as
/// "source (bucket)").
fn capture(
    vip: Ipv4Addr,
    owned: BTreeSet<u32>,
    stop: Arc<AtomicBool>,
    ready: Arc<AtomicU64>,
) -> std::io::Result<(u64, Vec<String>)> {
    let proto = (libc::ETH_P_IP as u16).to_be();
    // SAFETY: plain socket calls with valid arguments; the fd is closed below.
    let fd = os_check(
        unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(proto)) },
        "packet socket",
    )?;
    let name = std::ffi::CString::new("eth0").expect("no NUL");
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = index as i32;
    // SAFETY: binding to a valid sockaddr_ll of its size.
    os_check(
        unsafe {
            libc::bind(
                fd,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        },
        "binding the packet socket",
    )?;
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: a valid timeval of its size.
    os_check(
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        },
        "SO_RCVTIMEO",
    )?;
    // A large buffer: the capture must not lose answers under the flood.
    let size: libc::c_int = 16 << 20;
    // SAFETY: a valid int of its size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    ready.store(1, Ordering::SeqCst);
    let mut answered_owned = 0u64;
    let mut foreign = Vec::new();
    let mut buf = [0u8; 2048];
    // Drain until stopped and then until quiet, so late answers are counted.
    let mut quiet_since: Option<Instant> = None;
    loop {
        // SAFETY: reading into a valid buffer of its size.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            if stop.load(Ordering::Relaxed) {
                let since = *quiet_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_millis(300) {
                    break;
                }
            }
            continue;
        }
        quiet_since = None;
        let p = &buf[..n as usize];
        if p.len() < 40 || p[0] >> 4 != 4 || p[9] != 6 {
            continue;
        }
        let ihl = usize::from(p[0] & 0x0f) * 4;
        let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
        let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
        if src != vip || p.len() < ihl + 14 {
            continue;
        }
        let sport = u16::from_be_bytes([p[ihl], p[ihl + 1]]);
        if sport != PORT {
            continue;
        }
        let b = bucket(dst);
        if owned.contains(&b) {
            answered_owned += 1;
        } else {
            let flags = p[ihl + 13];
            foreign.push(format!("{dst} (bucket {b}, tcp flags {flags:#04x})"));
        }
    }
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(fd) };
    Ok((answered_owned, foreign))
}

fn input_chain_handle(ns: &Netns) -> String {
    let out = ns
        .exec("nft", &["-a", "list", "chain", "ip", "vipshare", "input"])
        .expect("listing the input chain");
    out.lines()
        .find(|l| l.contains("chain input"))
        .and_then(|l| l.split("# handle").nth(1))
        .map(|h| h.trim().to_string())
        .expect("input chain handle")
}

#[test]
fn full_rebuilds_never_answer_a_foreign_bucket() {
    let net = NetLab::new(1, SOURCES).unwrap();
    let host = &net.hosts[0];
    let vip = net.vip();
    let sources = net.sources().unwrap();
    // The host owns the even buckets, rebuilding with all of them and with
    // some of them in turn; the odd buckets are never its own.
    let owned: BTreeSet<u32> = (0..BUCKETS).filter(|b| b % 2 == 0).collect();
    let fewer: BTreeSet<u32> = owned.iter().copied().filter(|b| b % 4 == 0).collect();
    let foreign_sources: Vec<Ipv4Addr> = sources
        .iter()
        .copied()
        .filter(|s| !owned.contains(&bucket(*s)))
        .collect();
    let owned_sources: Vec<Ipv4Addr> = sources
        .iter()
        .copied()
        .filter(|s| fewer.contains(&bucket(*s)))
        .collect();
    assert!(foreign_sources.len() >= 8 && !owned_sources.is_empty());
    // A listener, so accepted SYNs get a SYN-ACK (a RST would count as well).
    let listener = host.run(move || {
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).and_then(|s| {
            s.set_reuse_address(true)?;
            s.bind(&std::net::SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT)).into())?;
            s.listen(4096)?;
            Ok(s)
        })
    });
    let _listener = listener.unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let cfg = LinuxConfig {
        state_dir: Some(tmp.path().to_path_buf()),
        ..LinuxConfig::default()
    };
    let desired = move |owned: &BTreeSet<u32>| Desired {
        vips: vec![VipConfig {
            addr: vip.into(),
            prefix_len: 32,
            mac: Mac([0x01, 0x00, 0x5e, 0x7f, 0x01, 0x10]),
            interface: "eth0".into(),
            mode: Default::default(),
        }],
        bucket_count: BUCKETS,
        bucket_fn: BucketFn::Jhash,
        affinity: Affinity::Address,
        seed: SEED,
        owned: owned.clone(),
        lease_until: Instant::now() + Duration::from_secs(600),
    };
    let d_all = desired(&owned);
    let mut plane = host
        .run(move || {
            let os = OsExecutor::new(&cfg)?;
            let exec = Faulty {
                os,
                every: 4,
                plans: 0,
                failed: 0,
            };
            let mut p = LinuxDataPlane::new(cfg, exec)?;
            p.apply(&d_all)?;
            Ok::<_, DataPlaneError>(p)
        })
        .unwrap();
    let handle_before = input_chain_handle(host);

    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(AtomicU64::new(0));
    let cap = {
        let (stop, ready) = (stop.clone(), ready.clone());
        let owned = owned.clone();
        net.client.spawn(move || capture(vip, owned, stop, ready))
    };
    while ready.load(Ordering::SeqCst) == 0 {
        std::thread::yield_now();
    }
    let mut flood_sources = foreign_sources.clone();
    flood_sources.extend(owned_sources.iter().take(2));
    let sender = {
        let stop = stop.clone();
        net.client.spawn(move || flood(flood_sources, vip, stop))
    };

    // Rebuild for a while: every apply after `invalidate` (or after a failed
    // one) replaces the whole filter.
    let rounds = if std::env::var_os("VIPSHARE_LONG").is_some() {
        2000
    } else {
        1000
    };
    let (d_all, d_fewer) = (desired(&owned), desired(&fewer));
    let (plane_back, report) = host.run(move || {
        let started = Instant::now();
        let mut ok = 0usize;
        for i in 0..rounds {
            plane.invalidate();
            let d = if i % 2 == 0 { &d_fewer } else { &d_all };
            if plane.apply(d).is_ok() {
                ok += 1;
            }
        }
        (plane, (ok, started.elapsed()))
    });
    plane = plane_back;
    stop.store(true, Ordering::SeqCst);
    let sent = sender.join().unwrap().unwrap();
    let (answered_owned, foreign) = cap.join().unwrap().unwrap();
    let failed = plane.executor().failed;
    eprintln!(
        "{rounds} rebuilds ({} ok, {failed} failed by injection) in {:?}; {sent} SYNs sent, \
         {answered_owned} answers to owned sources, {} to foreign ones",
        report.0,
        report.1,
        foreign.len()
    );
    assert!(failed > 0, "no failure was injected");
    assert!(
        answered_owned > 0,
        "no owned source was answered: the capture or the filter is broken"
    );
    assert!(
        foreign.is_empty(),
        "the host answered {} SYNs of buckets it does not own during rebuilds: {:?}",
        foreign.len(),
        &foreign[..foreign.len().min(20)]
    );
    // Rebuilds change the rules inside the base chains, never the chains
    // themselves (a new base chain runs before the old one; see the module
    // docs of the Linux data plane).
    assert_eq!(input_chain_handle(host), handle_before);
    let _ = host.run(move || plane.teardown());
}

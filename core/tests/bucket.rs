//! Bucket functions: names, errors, low-bits semantics, and a root-only test that
//! checks `bucket_of` against the running kernel's nftables `jhash`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::Instant;

#[path = "support/sources.rs"]
mod kernel_sources;
use kernel_sources::sources;

use vipshare_core::bucket::{
    bucket_of, hash_key, jhash_bytes, nft_hash_expr, reciprocal_scale, validate,
    validate_bucket_count, Affinity, BucketError, BucketFn, IpFamily,
};

fn v4(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn names_round_trip_through_str_and_serde() {
    for f in BucketFn::ALL {
        assert_eq!(f.to_string().parse::<BucketFn>().unwrap(), f);
        let json = serde_json::to_string(&f).unwrap();
        assert_eq!(json, format!("\"{f}\""));
        assert_eq!(serde_json::from_str::<BucketFn>(&json).unwrap(), f);
    }
    for a in Affinity::ALL {
        assert_eq!(a.to_string().parse::<Affinity>().unwrap(), a);
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, format!("\"{a}\""));
        assert_eq!(serde_json::from_str::<Affinity>(&json).unwrap(), a);
    }
    assert_eq!(
        serde_json::to_string(&Affinity::AddressPort).unwrap(),
        "\"address_port\""
    );
    let e = "crc32".parse::<BucketFn>().unwrap_err();
    assert_eq!(e, BucketError::UnknownFn("crc32".into()));
    assert!(e.to_string().contains("\"jhash\" or \"lowbits\""), "{e}");
    let e = "Address".parse::<Affinity>().unwrap_err();
    assert!(e.to_string().contains("\"address_port\""), "{e}");
}

#[test]
fn bucket_count_must_be_a_power_of_two_up_to_4096() {
    for ok in [2, 4, 256, 1024, 4096] {
        assert_eq!(validate_bucket_count(ok), Ok(()));
    }
    for bad in [0, 1, 3, 100, 8192, u32::MAX] {
        let e = validate_bucket_count(bad).unwrap_err();
        assert_eq!(e, BucketError::BadBucketCount(bad));
        assert!(e.to_string().contains("power of two from 2 to 4096"), "{e}");
    }
    assert_eq!(
        validate(BucketFn::Lowbits, Affinity::AddressPort, 256),
        Err(BucketError::PortNeedsJhash)
    );
    assert_eq!(
        validate(BucketFn::Jhash, Affinity::AddressPort, 256),
        Ok(())
    );
}

#[test]
fn lowbits_takes_the_low_bits() {
    let b = |aff, count, addr: &str| bucket_of(BucketFn::Lowbits, aff, count, 99, v4(addr), None);
    assert_eq!(b(Affinity::Address, 256, "10.1.2.3"), Ok(3));
    assert_eq!(b(Affinity::Address, 4096, "10.1.2.3"), Ok(0x203));
    // Network24: the /24 decides, i.e. addr >> 8.
    assert_eq!(b(Affinity::Network24, 256, "10.1.2.3"), Ok(2));
    assert_eq!(b(Affinity::Network24, 256, "10.1.2.250"), Ok(2));
    assert_eq!(b(Affinity::Network24, 4096, "10.1.2.3"), Ok(0x102));
    // IPv6: the low 32 bits; network24 means the /64.
    assert_eq!(b(Affinity::Address, 256, "2001:db8::1:2:3:4"), Ok(4));
    assert_eq!(b(Affinity::Network24, 256, "2001:db8:0:7::9"), Ok(7));
    assert_eq!(
        bucket_of(
            BucketFn::Lowbits,
            Affinity::AddressPort,
            256,
            0,
            v4("10.0.0.1"),
            Some(1)
        ),
        Err(BucketError::PortNeedsJhash)
    );
}

#[test]
fn jhash_argument_handling() {
    let addr = v4("192.0.2.77");
    // The port is required for address_port, ignored otherwise.
    assert_eq!(
        bucket_of(BucketFn::Jhash, Affinity::AddressPort, 256, 1, addr, None),
        Err(BucketError::MissingPort)
    );
    assert_eq!(
        bucket_of(BucketFn::Jhash, Affinity::Address, 256, 1, addr, Some(80)),
        bucket_of(BucketFn::Jhash, Affinity::Address, 256, 1, addr, None)
    );
    // An IPv4-mapped IPv6 address is the IPv4 client it carries.
    let mapped: IpAddr = "::ffff:192.0.2.77".parse().unwrap();
    for aff in [Affinity::Address, Affinity::Network24] {
        assert_eq!(
            bucket_of(BucketFn::Jhash, aff, 4096, 5, mapped, None),
            bucket_of(BucketFn::Jhash, aff, 4096, 5, addr, None)
        );
    }
    // A power-of-two modulus takes the top bits of the hash.
    let h = jhash_bytes(
        hash_key(Affinity::Address, addr, None).unwrap().as_bytes(),
        5,
    );
    assert_eq!(
        bucket_of(BucketFn::Jhash, Affinity::Address, 4096, 5, addr, None),
        Ok(h >> 20)
    );
    assert_eq!(reciprocal_scale(u32::MAX, 256), 255);
    assert_eq!(
        bucket_of(BucketFn::Jhash, Affinity::Address, 3, 5, addr, None),
        Err(BucketError::BadBucketCount(3))
    );
}

#[test]
fn nft_expressions() {
    assert_eq!(
        nft_hash_expr(Affinity::Address, IpFamily::V4, 256, 0x4e4c4221).unwrap(),
        "jhash ip saddr mod 256 seed 0x4e4c4221"
    );
    assert_eq!(
        nft_hash_expr(Affinity::AddressPort, IpFamily::V6, 4096, 1).unwrap(),
        "jhash ip6 saddr . th sport mod 4096 seed 0x00000001"
    );
    assert!(nft_hash_expr(Affinity::Address, IpFamily::V4, 100, 1).is_err());
}

#[test]
fn jhash_spreads_addresses_evenly() {
    // 65536 consecutive addresses over 256 buckets: every bucket within 20% of
    // the mean (a smoke test for a broken port, not a statistical claim).
    let mut counts = [0u32; 256];
    for i in 0..65536u32 {
        let addr = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        let b = bucket_of(BucketFn::Jhash, Affinity::Address, 256, 7, addr, None).unwrap();
        counts[b as usize] += 1;
    }
    assert!(
        counts.iter().all(|&c| (205..=307).contains(&c)),
        "{counts:?}"
    );
}

// ---------------------------------------------------------------------------
// The kernel test.

const SKIP_ENV: &str = "VIPSHARE_SKIP_ROOT_TESTS";
const SEEDS: [u32; 2] = [0x4e4c_4221, 0x9e37_79b9];
/// `mod 4294967295` makes the mark the full 32-bit hash minus one.
const FULL: u32 = u32::MAX;

/// One rule: packets to `dst` get `meta mark set jhash ...` and are recorded in
/// the dynamic set `set`.
struct Case {
    family: IpFamily,
    affinity: Affinity,
    modulus: u32,
    seed: u32,
    set: String,
    dst: IpAddr,
}

impl Case {
    fn expected(&self, addr: IpAddr, port: Option<u16>) -> u32 {
        if self.modulus == FULL {
            let key = hash_key(self.affinity, addr, port).unwrap();
            reciprocal_scale(jhash_bytes(key.as_bytes(), self.seed), FULL)
        } else {
            bucket_of(
                BucketFn::Jhash,
                self.affinity,
                self.modulus,
                self.seed,
                addr,
                port,
            )
            .unwrap()
        }
    }

    fn hash_expr(&self) -> String {
        if self.modulus == FULL {
            // Same key text as the production expression, full-width modulus.
            nft_hash_expr(self.affinity, self.family, 256, self.seed)
                .unwrap()
                .replace(" mod 256 ", &format!(" mod {FULL} "))
        } else {
            nft_hash_expr(self.affinity, self.family, self.modulus, self.seed).unwrap()
        }
    }

    fn rule(&self) -> String {
        let l3 = match self.family {
            IpFamily::V4 => "ip",
            IpFamily::V6 => "ip6",
        };
        let port = if self.affinity == Affinity::AddressPort {
            " . th sport"
        } else {
            ""
        };
        format!(
            "{l3} daddr {} meta l4proto udp meta mark set {} update @{} {{ {l3} saddr{port} . meta mark }}",
            self.dst,
            self.hash_expr(),
            self.set
        )
    }

    fn set_decl(&self) -> String {
        let addr = match self.family {
            IpFamily::V4 => "ipv4_addr",
            IpFamily::V6 => "ipv6_addr",
        };
        let port = if self.affinity == Affinity::AddressPort {
            " . inet_service"
        } else {
            ""
        };
        format!(
            "set {} {{ type {addr}{port} . mark; flags dynamic; size 65536; }}",
            self.set
        )
    }
}

fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for family in [IpFamily::V4, IpFamily::V6] {
        let mut add = |affinity, modulus, seed| {
            let k = cases.iter().filter(|c: &&Case| c.family == family).count();
            let dst = match family {
                IpFamily::V4 => IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10 + k as u8)),
                IpFamily::V6 => {
                    IpAddr::V6(Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0, 0x10 + k as u16))
                }
            };
            cases.push(Case {
                family,
                affinity,
                modulus,
                seed,
                set: format!("s{k}"),
                dst,
            });
        };
        for seed in SEEDS {
            add(Affinity::Address, 256, seed);
            add(Affinity::Address, 4096, seed);
            add(Affinity::Address, FULL, seed);
            add(Affinity::AddressPort, 256, seed);
            add(Affinity::AddressPort, 4096, seed);
            add(Affinity::AddressPort, FULL, seed);
        }
        add(Affinity::Network24, 256, SEEDS[0]);
        add(Affinity::Network24, FULL, SEEDS[1]);
    }
    cases
}

fn ruleset(cases: &[Case]) -> String {
    let mut out = String::new();
    for (family, table) in [
        (IpFamily::V4, "ip vipshare_bt"),
        (IpFamily::V6, "ip6 vipshare_bt"),
    ] {
        out += &format!("table {table} {{\n");
        for c in cases.iter().filter(|c| c.family == family) {
            out += &format!("  {}\n", c.set_decl());
        }
        out += "  chain out {\n    type filter hook output priority 0; policy accept;\n";
        for c in cases.iter().filter(|c| c.family == family) {
            out += &format!("    {}\n", c.rule());
        }
        out += "  }\n}\n";
    }
    out
}

fn run(cmd: &str, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {cmd}: {e}"))?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .map_err(|e| format!("{cmd}: {e}"))?;
    }
    drop(child.stdin.take());
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{cmd} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace, deleted on drop (also when the test panics).
struct Netns {
    name: String,
}

impl Netns {
    fn create() -> Result<Netns, String> {
        let name = format!("vipshare-bt-{}", std::process::id());
        let _ = run("ip", &["netns", "del", &name], None);
        run("ip", &["netns", "add", &name], None)?;
        Ok(Netns { name })
    }

    fn ip(&self, args: &str) -> Result<String, String> {
        let mut full = vec!["-n", &self.name];
        full.extend(args.split_whitespace());
        run("ip", &full, None)
    }

    fn exec(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        run("ip", &full, stdin)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.name], None) {
            eprintln!("warning: could not delete namespace {}: {e}", self.name);
        }
    }
}

/// Why the kernel test cannot run here, if it cannot.
fn missing_prerequisite() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("it must run as root".into());
    }
    for (cmd, arg) in [("nft", "--version"), ("ip", "-V")] {
        if let Err(e) = run(cmd, &[arg], None) {
            return Some(e);
        }
    }
    None
}

/// Sends one UDP datagram from every source to every case's destination, from a
/// thread that has joined the namespace (setns only affects the calling thread).
fn send_all(ns: &str, sources: &[(IpAddr, u16)], cases: &[Case]) -> Result<(), String> {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).map_err(|e| format!("{path}: {e}"))?;
    let sources = sources.to_vec();
    let dsts: Vec<IpAddr> = cases.iter().map(|c| c.dst).collect();
    std::thread::spawn(move || -> Result<(), String> {
        // SAFETY: plain syscall on a valid descriptor; it only changes this
        // thread's network namespace.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns: {}", std::io::Error::last_os_error()));
        }
        for (src, port) in sources {
            let sock = UdpSocket::bind(SocketAddr::new(src, port))
                .map_err(|e| format!("bind {src}:{port}: {e}"))?;
            for dst in dsts.iter().filter(|d| d.is_ipv4() == src.is_ipv4()) {
                sock.send_to(b"x", SocketAddr::new(*dst, 9))
                    .map_err(|e| format!("send {src} -> {dst}: {e}"))?;
            }
        }
        Ok(())
    })
    .join()
    .map_err(|_| "sender thread panicked".to_string())?
}

/// The elements of a dynamic set: (address, port, mark).
fn read_set(ns: &Netns, case: &Case) -> Result<Vec<(IpAddr, Option<u16>, u32)>, String> {
    let family = match case.family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    };
    let json = ns.exec(
        &["nft", "-j", "list", "set", family, "vipshare_bt", &case.set],
        None,
    )?;
    let v: serde_json::Value = serde_json::from_str(&json).map_err(|e| format!("{e}: {json}"))?;
    let bad = |what: &str| format!("unexpected nft JSON ({what}): {json}");
    let set = v["nftables"]
        .as_array()
        .and_then(|a| a.iter().find_map(|o| o.get("set")))
        .ok_or_else(|| bad("no set"))?;
    let mut out = Vec::new();
    for e in set["elem"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let concat = e
            .get("concat")
            .or_else(|| e.pointer("/elem/val/concat"))
            .and_then(|c| c.as_array())
            .ok_or_else(|| bad("element"))?;
        let addr: IpAddr = concat[0]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("address"))?;
        let num = |x: &serde_json::Value| x.as_u64().ok_or_else(|| bad("number"));
        let (port, mark) = match concat.len() {
            2 => (None, num(&concat[1])?),
            3 => (Some(num(&concat[1])? as u16), num(&concat[2])?),
            _ => return Err(bad("arity")),
        };
        out.push((addr, port, mark as u32));
    }
    Ok(out)
}

#[test]
fn jhash_matches_the_kernel() {
    if let Some(why) = missing_prerequisite() {
        if std::env::var(SKIP_ENV).as_deref() == Ok("1") {
            eprintln!("skipped: the kernel jhash test cannot run ({why})");
            return;
        }
        panic!(
            "the kernel jhash test cannot run: {why} (it needs root, nft and `ip netns`); \
             set {SKIP_ENV}=1 to skip it"
        );
    }
    let started = Instant::now();
    let ns = Netns::create().expect("create network namespace");
    // A veth pair carries the test destinations; `local` routes make whole
    // ranges usable as source addresses (bind needs nonlocal_bind for IPv6).
    for cmd in [
        "link set lo up",
        "link add vbt0 type veth peer name vbt1",
        "link set vbt0 up",
        "link set vbt1 up",
        "addr add 192.0.2.1/24 dev vbt0",
        "addr add fd01::1/64 dev vbt0 nodad",
        "route add local 10.0.0.0/8 dev lo",
        "-6 route add local fd00::/16 dev lo",
    ] {
        ns.ip(cmd)
            .unwrap_or_else(|e| panic!("namespace setup: {e}"));
    }
    ns.exec(&["sysctl", "-qw", "net.ipv6.ip_nonlocal_bind=1"], None)
        .expect("sysctl");
    let cases = cases();
    let rules = ruleset(&cases);
    ns.exec(&["nft", "-f", "-"], Some(&rules))
        .unwrap_or_else(|e| panic!("loading\n{rules}\n{e}"));

    let sources = sources();
    send_all(&ns.name, &sources, &cases).expect("send test packets");

    let print_vectors = std::env::var("VIPSHARE_PRINT_VECTORS").as_deref() == Ok("1");
    let mut checked = 0;
    let mut addresses = BTreeSet::new();
    for case in &cases {
        let seen = read_set(&ns, case).expect("read set");
        let expected: BTreeMap<IpAddr, u16> = sources
            .iter()
            .filter(|(a, _)| a.is_ipv4() == (case.family == IpFamily::V4))
            .copied()
            .collect();
        assert_eq!(
            seen.len(),
            expected.len(),
            "set {} recorded {} of {} sources",
            case.set,
            seen.len(),
            expected.len()
        );
        for &(addr, port, mark) in &seen {
            let sport = expected[&addr];
            if case.affinity == Affinity::AddressPort {
                assert_eq!(port, Some(sport));
            }
            let port = (case.affinity == Affinity::AddressPort).then_some(sport);
            assert_eq!(
                mark,
                case.expected(addr, port),
                "kernel disagrees: `{}` for {addr} port {port:?}",
                case.hash_expr()
            );
            checked += 1;
            addresses.insert(addr);
        }
        if print_vectors && case.modulus == FULL {
            // Lowest, middle and highest mark: the listing is sorted.
            for &(addr, _, mark) in [0, seen.len() / 2, seen.len() - 1].map(|i| &seen[i]) {
                let port = (case.affinity == Affinity::AddressPort).then_some(expected[&addr]);
                println!(
                    "({:#010x}, Affinity::{:?}, \"{addr}\", {port:?}, {mark:#010x}),",
                    case.seed, case.affinity
                );
            }
        }
    }
    println!(
        "kernel jhash: {checked} (address, mark) pairs from {} source addresses over {} rules \
         (seeds {:#x} and {:#x}, mod 256/4096/2^32-1, IPv4 and IPv6) all match, in {:?}",
        addresses.len(),
        cases.len(),
        SEEDS[0],
        SEEDS[1],
        started.elapsed()
    );
}

//! The ipfw `O_SRCJHASH` opcode's bucket function (kernel-patches/hash, C, as
//! patch 0003 adds it to the kernel) against core's Rust jhash, on the cases
//! and sources core/tests/bucket.rs checks against the Linux kernel: a
//! FreeBSD host with the opcode and a Linux host with nftables put every
//! client in the same bucket.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use vipshare_agent::dataplane::freebsd::{self, FreeBsdConfig, IpfwBuckets};
use vipshare_agent::dataplane::{linux, Desired, Mac, VipConfig};
use vipshare_core::bucket::{
    bucket_of, hash_key, jhash_bytes, reciprocal_scale, Affinity, BucketFn,
};

/// core/tests/bucket.rs: seeds, and the full-width modulus (the mark is the
/// whole hash minus one).
const SEEDS: [u32; 2] = [0x4e4c_4221, 0x9e37_79b9];
const FULL: u32 = u32::MAX;

/// core/tests/bucket.rs's sources, whose buckets were compared with the kernel's.
#[path = "../../core/tests/support/sources.rs"]
mod kernel_sources;
use kernel_sources::sources;

fn expected(affinity: Affinity, modulus: u32, seed: u32, addr: IpAddr, port: u16) -> u32 {
    if modulus == FULL {
        let key = hash_key(affinity, addr, Some(port)).unwrap();
        reciprocal_scale(jhash_bytes(key.as_bytes(), seed), FULL)
    } else {
        bucket_of(BucketFn::Jhash, affinity, modulus, seed, addr, Some(port)).unwrap()
    }
}

/// Builds the C test (gcc -Wall -Wextra -Werror) and runs its self-test.
fn build_c() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("jhash_test");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernel-patches/check-c.sh");
    let built = Command::new("sh").arg(&script).arg(&bin).output().unwrap();
    assert!(
        built.status.success(),
        "{} failed: {}{}",
        script.display(),
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );
    (dir, bin)
}

/// The C buckets of "AFFINITY SEED MODULUS ADDRESS PORT" lines.
fn c_buckets(bin: &Path, input: &str) -> Vec<u32> {
    let mut child = Command::new(bin)
        .arg("--stdin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Written from another thread: the answers fill the pipe meanwhile.
    let mut stdin = child.stdin.take().unwrap();
    let feed = input.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(feed.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<u32> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(
        got.len(),
        input.lines().count(),
        "one bucket per input line"
    );
    got
}

#[test]
fn ipfw_opcode_hash_equals_core_jhash_on_the_kernel_checked_sources() {
    let (_dir, bin) = build_c();
    let mut input = String::new();
    let mut want = Vec::new();
    for (addr, port) in sources() {
        for seed in SEEDS {
            for affinity in Affinity::ALL {
                for modulus in [2, 256, 4096, FULL] {
                    input += &format!("{affinity} {seed:#x} {modulus} {addr} {port}\n");
                    want.push(expected(affinity, modulus, seed, addr, port));
                }
            }
        }
    }
    let got = c_buckets(&bin, &input);
    let lines: Vec<&str> = input.lines().collect();
    let mismatches: Vec<String> = (0..want.len())
        .filter(|&i| got[i] != want[i])
        .map(|i| format!("{}: C {} Rust {}", lines[i], got[i], want[i]))
        .collect();
    assert!(
        mismatches.is_empty(),
        "{} of {} differ, first: {:?}",
        mismatches.len(),
        want.len(),
        &mismatches[..mismatches.len().min(5)]
    );
}

// ---------------------------------------------------------------------------
// A mixed cluster: what each backend's plan tells its kernel.

/// The words after `word` on the first line of `text` containing `anchor`.
fn after<'a>(text: &'a str, anchor: &str, word: &str) -> Vec<&'a str> {
    let line = text
        .lines()
        .find(|l| l.contains(anchor))
        .unwrap_or_else(|| panic!("no line with {anchor:?} in:\n{text}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == word).unwrap();
    words[at + 1..].to_vec()
}

fn parse_u32(s: &str) -> u32 {
    match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).unwrap(),
        None => s.parse().unwrap(),
    }
}

/// Linux: `meta mark set jhash <key> mod B seed S` and the owned marks.
fn linux_view(d: &Desired) -> (Affinity, u32, u32, BTreeSet<u32>) {
    let cfg = linux::LinuxConfig {
        state_dir: None,
        ..linux::LinuxConfig::default()
    };
    let text = linux::plan_apply(
        &cfg,
        None,
        d,
        &BTreeSet::new(),
        &linux::Present::default(),
        std::time::Instant::now(),
    )
    .unwrap()
    .render();
    let hash = after(&text, "meta mark set jhash ip saddr", "jhash");
    let affinity = if hash.contains(&"sport") {
        Affinity::AddressPort
    } else {
        Affinity::Address
    };
    let modulus = parse_u32(hash[hash.iter().position(|w| *w == "mod").unwrap() + 1]);
    let seed = parse_u32(hash[hash.iter().position(|w| *w == "seed").unwrap() + 1]);
    let owned = after(&text, "add element ip vipshare owned", "owned")
        .iter()
        .filter_map(|w| w.parse().ok())
        .collect();
    (affinity, modulus, seed, owned)
}

/// FreeBSD with srcjhash: the rule's parameters and the lease map's buckets.
fn freebsd_view(d: &Desired) -> (Affinity, u32, u32, BTreeSet<u32>) {
    let cfg = FreeBsdConfig {
        buckets: IpfwBuckets::Srcjhash,
        ..FreeBsdConfig::default()
    };
    let text = freebsd::plan_apply(&cfg, None, d, std::time::Instant::now())
        .unwrap()
        .render();
    // The first srcjhash rule: `ip` (address), or `tcp` (address_port).
    let rule = after(&text, " in srcjhash ", "srcjhash");
    let value = |k: &str| rule[rule.iter().position(|w| *w == k).unwrap() + 1];
    let affinity: Affinity = value("affinity").parse().unwrap();
    let lease = after(&text, "srcjhash_lease=", "in");
    let mut owned = BTreeSet::new();
    for part in lease[1].trim_end_matches('"').split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        owned.extend(parse_u32(a)..=parse_u32(b));
    }
    (
        affinity,
        parse_u32(value("buckets")),
        parse_u32(value("seed")),
        owned,
    )
}

#[test]
fn linux_and_freebsd_plans_accept_the_same_sources() {
    let (_dir, bin) = build_c();
    for affinity in [Affinity::Address, Affinity::AddressPort] {
        let d = Desired {
            vips: vec![VipConfig {
                addr: Ipv4Addr::new(192, 0, 2, 10).into(),
                prefix_len: 32,
                mac: Mac([0x01, 0x00, 0x5e, 0x56, 0x53, 0x01]),
                interface: "eth0".into(),
                mode: Default::default(),
            }],
            bucket_count: 256,
            bucket_fn: BucketFn::Jhash,
            affinity,
            seed: 0x9e37_79b9,
            owned: (0..256)
                .filter(|b| b % 3 == 0 || (100..140).contains(b))
                .collect(),
            lease_until: std::time::Instant::now() + Duration::from_millis(500),
        };
        let lx = linux_view(&d);
        let bsd = freebsd_view(&d);
        assert_eq!(lx, bsd, "both kernels get the same function and buckets");
        let (aff, modulus, seed, owned) = bsd;

        // The same sources: Linux's bucket by core's model of nft (checked
        // against the kernel), FreeBSD's by the opcode's C code.
        let v4: Vec<(IpAddr, u16)> = sources().into_iter().filter(|(a, _)| a.is_ipv4()).collect();
        let input: String = v4
            .iter()
            .map(|(a, p)| format!("{aff} {seed:#x} {modulus} {a} {p}\n"))
            .collect();
        let c = c_buckets(&bin, &input);
        let mut accepted = 0;
        for (i, &(addr, port)) in v4.iter().enumerate() {
            let linux_bucket =
                bucket_of(BucketFn::Jhash, lx.0, lx.1, lx.2, addr, Some(port)).unwrap();
            assert_eq!(linux_bucket, c[i], "{affinity} {addr} port {port}");
            let linux_accepts = lx.3.contains(&linux_bucket);
            assert_eq!(linux_accepts, owned.contains(&c[i]), "{addr} port {port}");
            accepted += usize::from(linux_accepts);
        }
        assert!(
            accepted > 0 && accepted < v4.len(),
            "{affinity}: {accepted} of {} accepted",
            v4.len()
        );
    }
}

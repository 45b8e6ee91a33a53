//! The ipfw `O_SRCJHASH` opcode's bucket function (kernel-patches/hash, C, as
//! patch 0003 adds it to the kernel) against core's Rust jhash, on the cases
//! and sources core/tests/bucket.rs checks against the Linux kernel: a
//! FreeBSD host with the opcode and a Linux host with nftables put every
//! client in the same bucket.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::{Command, Stdio};

use vipshare_core::bucket::{
    bucket_of, hash_key, jhash_bytes, reciprocal_scale, Affinity, BucketFn,
};

/// core/tests/bucket.rs: seeds, and the full-width modulus (the mark is the
/// whole hash minus one).
const SEEDS: [u32; 2] = [0x4e4c_4221, 0x9e37_79b9];
const FULL: u32 = u32::MAX;

/// core/tests/bucket.rs's source generator (SplitMix64 from the same seed), so
/// these are the sources whose buckets were compared with the kernel's.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn sources() -> Vec<(IpAddr, u16)> {
    let mut rng = Rng(0x7669_7073_6861_7265);
    let mut v4 = std::collections::BTreeSet::from([
        Ipv4Addr::new(10, 0, 0, 1),
        Ipv4Addr::new(10, 255, 255, 254),
        Ipv4Addr::new(10, 1, 2, 3),
        Ipv4Addr::new(10, 1, 2, 200),
    ]);
    while v4.len() < 600 {
        v4.insert(Ipv4Addr::from(
            0x0a00_0000 | (rng.next() as u32 & 0x00ff_ffff),
        ));
    }
    let mut v6 = std::collections::BTreeSet::from(["fd00::1".parse::<Ipv6Addr>().unwrap()]);
    while v6.len() < 300 {
        let x = u128::from(rng.next()) << 64 | u128::from(rng.next());
        v6.insert(Ipv6Addr::from(0xfd00u128 << 112 | (x >> 16)));
    }
    let mut port = || 1024 + (rng.next() % (65536 - 1024)) as u16;
    v4.into_iter()
        .map(IpAddr::V4)
        .chain(v6.into_iter().map(IpAddr::V6))
        .map(|a| (a, port()))
        .collect()
}

fn expected(affinity: Affinity, modulus: u32, seed: u32, addr: IpAddr, port: u16) -> u32 {
    if modulus == FULL {
        let key = hash_key(affinity, addr, Some(port)).unwrap();
        reciprocal_scale(jhash_bytes(key.as_bytes(), seed), FULL)
    } else {
        bucket_of(BucketFn::Jhash, affinity, modulus, seed, addr, Some(port)).unwrap()
    }
}

#[test]
fn ipfw_opcode_hash_equals_core_jhash_on_the_kernel_checked_sources() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("jhash_test");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernel-patches/check-hash.sh");
    // Builds with gcc -Wall -Wextra -Werror and runs the C self-test.
    let built = Command::new("sh").arg(&script).arg(&bin).output().unwrap();
    assert!(
        built.status.success(),
        "{} failed: {}{}",
        script.display(),
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );

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
    let mut child = Command::new(&bin)
        .arg("--stdin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Written from another thread: the answers fill the pipe meanwhile.
    let mut stdin = child.stdin.take().unwrap();
    let feed = input.clone();
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
    assert_eq!(got.len(), want.len(), "one bucket per input line");
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

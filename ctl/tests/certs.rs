//! Runs the built `vipsharectl` for `certs init` and `certs issue`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use vipshare_proto::pki;

fn ctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vipsharectl"))
        .args(args)
        .output()
        .expect("run vipsharectl")
}

fn ok(args: &[&str]) -> String {
    let out = ctl(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} failed: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

/// Fails, and says so on stderr; returns stderr.
fn fails(args: &[&str]) -> String {
    let out = ctl(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8(out.stderr).unwrap()
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_then_issue() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    let d = dir.to_str().unwrap();

    let out = ok(&[
        "certs",
        "init",
        "--dir",
        d,
        "--cluster",
        "east",
        "--days",
        "30",
    ]);
    let (ca_crt, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
    assert!(out.contains(ca_crt.to_str().unwrap()), "{out}");
    assert!(out.contains(ca_key.to_str().unwrap()), "{out}");
    assert_eq!(mode(&ca_key), 0o600);
    assert_eq!(mode(&dir), 0o700);
    let ca = pki::describe_cert(&ca_crt).unwrap();
    assert!(ca.is_ca);
    assert_eq!(ca.uris, vec!["vipshare://east/ca/ca"]);

    let out = ok(&[
        "certs",
        "issue",
        "--dir",
        d,
        "--role",
        "controller",
        "--name",
        "1",
        "--ip",
        "127.0.0.2",
        "--ip",
        "::1",
        "--dns",
        "c1.east.example",
    ]);
    let (crt, key) = (dir.join("controller-1.crt"), dir.join("controller-1.key"));
    assert!(out.contains(crt.to_str().unwrap()), "{out}");
    assert!(out.contains(key.to_str().unwrap()), "{out}");
    assert_eq!(mode(&key), 0o600);
    let leaf = pki::describe_cert(&crt).unwrap();
    assert!(!leaf.is_ca);
    assert_eq!(leaf.uris, vec!["vipshare://east/controller/1"]);
    assert_eq!(
        leaf.ips,
        vec![
            "127.0.0.2".parse::<std::net::IpAddr>().unwrap(),
            "::1".parse().unwrap()
        ]
    );
    assert_eq!(leaf.dns, vec!["c1.east.example"]);
    assert!(leaf.not_after <= ca.not_after);

    ok(&[
        "certs", "issue", "--dir", d, "--role", "reader", "--name", "dash",
    ]);
    let reader = pki::describe_cert(&dir.join("reader-dash.crt")).unwrap();
    assert_eq!(reader.uris, vec!["vipshare://east/reader/dash"]);
    assert_eq!(mode(&dir.join("reader-dash.key")), 0o600);
}

#[test]
fn init_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_str().unwrap();
    ok(&["certs", "init", "--dir", d, "--cluster", "east"]);
    let key_before = fs::read(tmp.path().join("ca.key")).unwrap();
    let crt_before = fs::read(tmp.path().join("ca.crt")).unwrap();

    let err = fails(&["certs", "init", "--dir", d, "--cluster", "west"]);
    assert!(
        err.contains("ca.crt") && err.contains("already exists"),
        "{err}"
    );
    assert_eq!(fs::read(tmp.path().join("ca.key")).unwrap(), key_before);
    assert_eq!(fs::read(tmp.path().join("ca.crt")).unwrap(), crt_before);

    // Even a lone leftover key blocks it.
    let tmp2 = tempfile::tempdir().unwrap();
    fs::write(tmp2.path().join("ca.key"), "x").unwrap();
    let err = fails(&[
        "certs",
        "init",
        "--dir",
        tmp2.path().to_str().unwrap(),
        "--cluster",
        "e",
    ]);
    assert!(err.contains("ca.key"), "{err}");
}

#[test]
fn errors_say_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_str().unwrap();

    let err = fails(&[
        "certs", "issue", "--dir", d, "--role", "admin", "--name", "a",
    ]);
    assert!(err.contains("vipsharectl certs init"), "{err}");

    ok(&["certs", "init", "--dir", d, "--cluster", "east"]);
    let err = fails(&[
        "certs", "issue", "--dir", d, "--role", "root", "--name", "a",
    ]);
    assert!(err.contains("controller, agent, admin or reader"), "{err}");
    let err = fails(&[
        "certs",
        "issue",
        "--dir",
        d,
        "--role",
        "controller",
        "--name",
        "c1",
    ]);
    assert!(err.contains("raft id"), "{err}");

    let ca_key = tmp.path().join("ca.key");
    fs::set_permissions(&ca_key, fs::Permissions::from_mode(0o644)).unwrap();
    let err = fails(&[
        "certs", "issue", "--dir", d, "--role", "admin", "--name", "a",
    ]);
    assert!(
        err.contains(&format!("chmod 600 {}", ca_key.display())),
        "{err}"
    );
    assert!(!tmp.path().join("admin-a.crt").exists());
}

#[test]
fn renew_show_and_ca_rotation() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    let d = dir.to_str().unwrap();
    ok(&["certs", "init", "--dir", d, "--cluster", "east"]);
    ok(&[
        "certs",
        "issue",
        "--dir",
        d,
        "--role",
        "controller",
        "--name",
        "2",
        "--ip",
        "127.0.0.2",
        "--days",
        "10",
    ]);
    let crt = dir.join("controller-2.crt");
    let before = pki::describe_cert(&crt).unwrap();
    let shown = ok(&["certs", "show", crt.to_str().unwrap()]);
    assert!(
        shown.contains(&format!("serial {}", before.serial)),
        "{shown}"
    );

    let out = ok(&[
        "certs",
        "renew",
        "--dir",
        d,
        "--role",
        "controller",
        "--name",
        "2",
        "--days",
        "20",
    ]);
    let after = pki::describe_cert(&crt).unwrap();
    assert_ne!(after.serial, before.serial);
    assert_eq!((&after.uris, &after.ips), (&before.uris, &before.ips));
    assert!(after.not_after > before.not_after);
    assert_eq!(mode(&dir.join("controller-2.key")), 0o600);
    // It says how to revoke the replaced certificate.
    assert!(
        out.contains(&format!("certs revoke --serial {}", before.serial)),
        "{out}"
    );
    let err = fails(&[
        "certs", "renew", "--dir", d, "--role", "admin", "--name", "nobody",
    ]);
    assert!(err.contains("certs issue"), "{err}");

    ok(&["certs", "ca-rotate", "--dir", d]);
    assert_eq!(pki::load_certs(&dir.join("ca.crt")).unwrap().len(), 2);
    let err = fails(&["certs", "ca-rotate", "--dir", d]);
    assert!(err.contains("ca-prune"), "{err}");
    ok(&["certs", "ca-prune", "--dir", d]);
    assert_eq!(pki::load_certs(&dir.join("ca.crt")).unwrap().len(), 1);
    assert!(!dir.join("ca.key.old").exists());
}

#[test]
fn revoke_checks_its_argument_before_connecting() {
    let err = fails(&["certs", "revoke", "--serial", "12:zz"]);
    assert!(err.contains("not hexadecimal"), "{err}");
    let err = fails(&["certs", "revoke"]);
    assert!(err.contains("--serial") && err.contains("--cert"), "{err}");
    let err = fails(&["certs", "unrevoke", "--serial", "ab", "--cert", "x.crt"]);
    assert!(err.contains("cannot be used with"), "{err}");
    // A valid serial needs a cluster to talk to.
    let err = fails(&["certs", "revoke", "--serial", "0A:1B"]);
    assert!(err.contains("--tls-dir"), "{err}");
}

//! What an operator meets: identities that cannot be confused, processes that fail
//! fast, a CLI that tells the truth, and a lifecycle without traps (issue 12).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use vipshare_integration::{bin, netns, Lab};
use vipshare_proto::pki::{self, Role};

const ELECTION: Duration = Duration::from_secs(15);

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Replace `ROLE-NAME.{crt,key}` in `dir` with a fresh pair from the CA in `from`.
fn replace_leaf(
    dir: &Path,
    from: &Path,
    role: Role,
    name: &str,
    ips: &[std::net::IpAddr],
) -> anyhow::Result<()> {
    let files = pki::issue(from, role, name, ips, &[], 30)?;
    std::fs::copy(&files.cert, dir.join(format!("{role}-{name}.crt")))?;
    std::fs::copy(&files.key, dir.join(format!("{role}-{name}.key")))?;
    std::fs::remove_file(&files.cert)?;
    std::fs::remove_file(&files.key)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_data_directory_with_the_same_name_is_refused() -> anyhow::Result<()> {
    // Cluster A ("lab") runs once and leaves its data directory behind.
    let mut a = Lab::new("127.0.40", 1)?;
    a.start_founders(1)?;
    a.wait_leader(ELECTION).await?;
    a.stop(1)?;
    let a_data = a.controllers[&1].data_dir.clone();

    // Cluster B has the same name, the same controller id, its own CA.
    let mut b = Lab::new("127.0.40", 1)?;
    assert_eq!(a.cluster, b.cluster);
    b.configure(1, &[1], false)?;
    let b_data = b.controllers[&1].data_dir.clone();
    let copy = Command::new("cp")
        .arg("-a")
        .arg(&a_data)
        .arg(&b_data)
        .status()?;
    assert!(copy.success());
    let before = std::fs::read(b_data.join("raft.redb"))?;
    let (status, log) = b.run_to_exit(1)?;
    assert!(!status.success(), "served a foreign data directory:\n{log}");
    assert!(log.contains("foreign data directory"), "{log}");
    let id_a = pki::ca_cluster_id(&a.certs.join("ca.crt"))?.expect("A has an ID");
    let id_b = pki::ca_cluster_id(&b.certs.join("ca.crt"))?.expect("B has an ID");
    assert!(
        log.contains(id_a.as_str()) && log.contains(id_b.as_str()),
        "{log}"
    );
    assert_eq!(std::fs::read(b_data.join("raft.redb"))?, before);

    // A's own controller still opens it.
    a.start(1)?;
    a.wait_leader(ELECTION).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_with_mismatched_certificate_is_refused_at_start() -> anyhow::Result<()> {
    let mut lab = Lab::new("127.0.41", 2)?;
    let other = tempfile::tempdir()?;
    let other_ca = other.path().join("pki");
    pki::init_ca(&other_ca, &lab.cluster, 30)?;

    // Controller 1's certificate comes from another CA (same cluster name, right IP).
    let ip1 = lab.address(1).rsplit_once(':').unwrap().0.parse()?;
    replace_leaf(&lab.certs, &other_ca, Role::Controller, "1", &[ip1])?;
    lab.configure(1, &[1], false)?;
    let (status, log) = lab.run_to_exit(1)?;
    assert!(!status.success(), "{log}");
    assert!(log.contains("not valid under the cluster CA"), "{log}");
    assert!(log.contains("controller-1.crt"), "{log}");

    // Controller 2's certificate is from the right CA but does not name its listen address.
    std::fs::remove_file(lab.certs.join("controller-2.crt"))?;
    std::fs::remove_file(lab.certs.join("controller-2.key"))?;
    pki::issue(&lab.certs, Role::Controller, "2", &[], &[], 30)?;
    lab.configure(2, &[2], false)?;
    let (status, log) = lab.run_to_exit(2)?;
    assert!(!status.success(), "{log}");
    assert!(log.contains("does not name listen address"), "{log}");
    assert!(!lab.controllers[&2].data_dir.exists(), "data dir created");
    Ok(())
}

#[test]
fn agent_with_another_members_certificate_or_no_interface_is_refused() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let certs = tmp.path().join("pki");
    pki::init_ca(&certs, "lab", 30)?;
    pki::issue(&certs, Role::Agent, "web-1", &[], &[], 30)?;
    let controllers = [(1, "127.0.0.1:7001".to_string())];
    let run = |config: &Path| {
        Command::new(bin("vipshare-agent"))
            .arg("--config")
            .arg(config)
            .output()
    };

    // The certificate is web-1's, the config says web-2.
    let cfg = netns::write_agent_config(&tmp.path().join("a"), "web-2", &certs, &controllers, "")?;
    let text = std::fs::read_to_string(&cfg)?
        .replace("agent-web-2", "agent-web-1")
        .replace("interface = \"eth0\"", "interface = \"lo\"");
    std::fs::write(&cfg, text)?;
    let out = run(&cfg)?;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("member") && err.contains("web-1"), "{err}");

    // Right certificate, an interface that does not exist.
    let cfg = netns::write_agent_config(&tmp.path().join("b"), "web-1", &certs, &controllers, "")?;
    let text = std::fs::read_to_string(&cfg)?.replace("\"eth0\"", "\"vsnone0\"");
    std::fs::write(&cfg, text)?;
    let out = run(&cfg)?;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("interface") && err.contains("vsnone0") && err.contains("does not exist"),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_raft_task_ends_the_process() -> anyhow::Result<()> {
    let mut lab = Lab::new("127.0.42", 3)?;
    lab.start_founders(3)?;
    let leader = lab.wait_leader(ELECTION).await?;
    for i in 0..20u8 {
        lab.noop(&[i]).await?;
    }
    // Wipe a follower and start it as a founder again: it bootstraps a one-entry log,
    // and the leader's next heartbeat commits past its end, which raft treats as a
    // broken invariant (a panic in the node task).
    let victim = if leader == 3 { 2 } else { 3 };
    lab.kill(victim)?;
    std::fs::remove_dir_all(&lab.controllers[&victim].data_dir)?;
    lab.start(victim)?;
    let status = vipshare_integration::wait_for(
        Duration::from_secs(30),
        "the wiped controller to exit",
        || {
            let r = lab.exited(victim).ok().flatten();
            async move { r }
        },
    )
    .await?;
    let log = lab.controllers[&victim].log_text();
    assert_eq!(status.code(), Some(101), "{log}");
    assert!(log.contains("panic"), "{log}");
    Ok(())
}

fn code(out: &std::process::Output) -> Option<i32> {
    out.status.code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_exit_codes_local_view_and_refusals() -> anyhow::Result<()> {
    let mut lab = Lab::new("127.0.43", 3)?;
    lab.start_founders(3)?;
    let leader = lab.wait_leader(ELECTION).await?;

    // A leader and nothing to serve yet: healthy.
    let out = lab.ctl(&["status"])?;
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let out = lab.ctl(&["cluster", "init", "--vip", "192.0.2.10", "--buckets", "16"])?;
    assert!(out.status.success(), "{}", stderr(&out));
    // Every bucket unowned (no members): 4, also after waiting for better.
    let out = lab.ctl(&["status", "--json"])?;
    assert_eq!(code(&out), Some(4), "{}", stderr(&out));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(j["health"]["exit_code"], 4);
    assert_eq!(j["unowned_buckets"], 16);
    let t = std::time::Instant::now();
    let out = lab.ctl(&["status", "--wait", "1"])?;
    assert_eq!(code(&out), Some(4), "{}", stderr(&out));
    assert!(t.elapsed() >= Duration::from_secs(1));

    // Refusals with the reason: multicast, broadcast, unspecified VIPs; an existing voter.
    for bad in ["224.0.0.1", "255.255.255.255", "0.0.0.0"] {
        let out = lab.ctl(&["vip", "add", bad])?;
        assert_eq!(code(&out), Some(1), "vip add {bad} accepted");
        assert!(stderr(&out).contains("unicast"), "{}", stderr(&out));
    }
    // A link-local IPv6 VIP is scoped to one link: refused with the reason.
    let out = lab.ctl(&["vip", "add", "fe80::10"])?;
    assert_eq!(code(&out), Some(1), "link-local VIP accepted");
    assert!(stderr(&out).contains("link-local"), "{}", stderr(&out));
    let addr2 = lab.address(2);
    let out = lab.ctl(&["controller", "add", "--id", "2", "--address", &addr2])?;
    assert_eq!(code(&out), Some(1), "controller add of a voter accepted");
    assert!(stderr(&out).contains("already a voter"), "{}", stderr(&out));

    // A certificate of another CA is named before any connection.
    let other = tempfile::tempdir()?;
    pki::init_ca(other.path(), &lab.cluster, 30)?;
    replace_leaf(&lab.certs, other.path(), Role::Admin, "mallory", &[])?;
    let out = lab.ctl(&["--user", "admin-mallory", "status"])?;
    assert_eq!(code(&out), Some(1));
    assert!(
        stderr(&out).contains("not valid under the cluster CA"),
        "{}",
        stderr(&out)
    );
    // A revoked one: the controllers' reason, from every controller in turn.
    pki::issue(&lab.certs, Role::Admin, "eve", &[], &[], 30)?;
    let eve = lab.certs.join("admin-eve.crt");
    let out = lab.ctl(&["certs", "revoke", "--cert", eve.to_str().unwrap()])?;
    assert!(out.status.success(), "{}", stderr(&out));
    // Until every controller has applied the revocation, a call may fail
    // otherwise (a connection cut while the deny-list changes): wait for the
    // refusal that names the reason.
    let refused = vipshare_integration::wait_for(Duration::from_secs(10), "eve refused", || {
        let out = lab.ctl(&["--user", "admin-eve", "members"]);
        async move {
            out.ok()
                .filter(|o| !o.status.success() && stderr(o).contains("revoked"))
        }
    })
    .await?;
    let err = stderr(&refused);
    assert!(err.contains("revoked"), "{err}");
    for id in 1..=3 {
        assert!(
            err.contains(&lab.address(id)),
            "controller {id} not tried: {err}"
        );
    }

    // No quorum: the default read says so (3) and points at --local; --local
    // answers from one controller and says it is local.
    let survivor = if leader == 1 { 2 } else { 1 };
    for id in 1..=3 {
        if id != survivor {
            lab.kill(id)?;
        }
    }
    vipshare_integration::wait_for(ELECTION, "the survivor to lose its leader", || async {
        lab.local_status(survivor)
            .await
            .filter(|s| s.leader_id == 0)
    })
    .await?;
    let out = lab.ctl(&["status"])?;
    assert_eq!(code(&out), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("--local"), "{}", stderr(&out));
    let out = lab.ctl(&["status", "--local"])?;
    assert_eq!(code(&out), Some(3), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("LOCAL VIEW of controller"), "{text}");
    assert!(text.contains("unowned 16"), "{text}");
    Ok(())
}

/// The body of an HTTP/1.0 `/metrics` answer.
fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or(response, |(_, b)| b)
}

fn promtool_check(what: &str, exposition: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!("promtool (Debian package prometheus; scripts/install-deps.sh): {e}")
        })?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(exposition.as_bytes())?;
    let out = child.wait_with_output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics on the {what}:\n{said}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_and_agent_metrics_pass_promtool() -> anyhow::Result<()> {
    netns::require_root();
    let cluster = netns::Cluster::start(2, 4, 16).await?;
    let members = vec![cluster.member(0), cluster.member(1)];
    cluster
        .wait_converged(&members, Duration::from_secs(30))
        .await?;
    let leader = cluster.lab.wait_leader(ELECTION).await?;
    let controller = cluster.lab.metrics(leader).await?;
    let agent = cluster.agent_metrics(0).await?;
    for (what, text) in [("controller", body(&controller)), ("agent", body(&agent))] {
        for needle in [
            "# HELP vipshare_build_info",
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
        ] {
            assert!(text.contains(needle), "{what} lacks {needle}:\n{text}");
        }
        promtool_check(what, text)?;
    }
    assert!(body(&controller).contains("# HELP vipshare_raft_term"));
    assert!(body(&controller).contains("# HELP vipshare_cert_expiry_seconds"));
    // Two agents connect to every controller.
    assert!(
        body(&controller).lines().any(|l| l
            .starts_with("vipshare_tls_connections{role=\"agent\"} ")
            && !l.ends_with(" 0")),
        "no agent connections counted"
    );
    assert!(body(&agent).contains("# HELP vipshare_agent_buckets_owned"));
    // The certificate alerts cover agents too.
    assert!(
        body(&agent)
            .lines()
            .any(|l| l.starts_with("vipshare_cert_expiry_seconds{") && !l.ends_with(" 0")),
        "agent exports no certificate expiry"
    );
    Ok(())
}

/// name -> (state, buckets, penalty) from `vipsharectl members --json`.
fn members(lab: &Lab) -> anyhow::Result<std::collections::BTreeMap<String, (String, u64, f64)>> {
    let out = lab.ctl(&["members", "--json"])?;
    anyhow::ensure!(out.status.success(), "members: {}", stderr(&out));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut m = std::collections::BTreeMap::new();
    for x in j["members"].as_array().into_iter().flatten() {
        m.insert(
            x["name"].as_str().unwrap_or_default().to_string(),
            (
                x["state"].as_str().unwrap_or_default().to_string(),
                x["buckets"].as_u64().unwrap_or(0),
                x["penalty"].as_f64().unwrap_or(f64::NAN),
            ),
        );
    }
    Ok(m)
}

async fn wait_state(c: &netns::Cluster, name: &str, state: &str) -> anyhow::Result<()> {
    vipshare_integration::wait_for(Duration::from_secs(30), &format!("{name} {state}"), || {
        let m = members(&c.lab).ok();
        async move { m.filter(|m| m[name].0 == state).map(|_| ()) }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_early_add_restart_home_and_reset() -> anyhow::Result<()> {
    netns::require_root();
    let mut c = netns::Cluster::start(2, 4, 16).await?;
    let both = vec![c.member(0), c.member(1)];
    c.wait_converged(&both, Duration::from_secs(30)).await?;

    // A member added before its agent runs: nothing granted, nothing black-holed,
    // no penalty, however long its agent takes. (A busy host may fence h1 or h2 on
    // its own meanwhile; this looks at h9 only.)
    pki::issue(&c.lab.certs, Role::Agent, "h9", &[], &[], 30)?;
    let out = c.lab.ctl(&["member", "add", "h9"])?;
    assert!(out.status.success(), "{}", stderr(&out));
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        let m = members(&c.lab)?;
        assert_eq!(m["h9"].1, 0, "h9 granted buckets before its agent ran");
        assert_eq!(m["h9"].2, 0.0, "h9 penalised");
        assert_eq!(m["h9"].0, "active", "h9 fenced");
        assert!(!c.bucket_map()?.contains(&"h9".to_string()));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Restart h1's agent (SIGTERM = planned stop): back home, no penalty added.
    let before = c.wait_converged(&both, Duration::from_secs(30)).await?;
    let penalty_before = members(&c.lab)?["h1"].2;
    let status = c.agents[0].terminate(Duration::from_secs(30))?;
    assert!(status.success(), "agent exit {status}");
    wait_state(&c, "h1", "stopped").await?;
    assert!(
        members(&c.lab)?["h1"].2 <= penalty_before,
        "a planned stop was penalised"
    );
    c.agents[0].restart()?;
    let home =
        |map: &[String]| -> Vec<usize> { (0..map.len()).filter(|&i| map[i] == "h1").collect() };
    vipshare_integration::wait_for(Duration::from_secs(30), "h1 back home", || {
        let map = c.bucket_map().ok();
        let want = home(&before);
        async move { map.filter(|m| home(m) == want).map(|_| ()) }
    })
    .await?;
    let m = members(&c.lab)?;
    assert_eq!(m["h1"].0, "active", "{m:?}");
    assert!(m["h1"].2 <= penalty_before, "{m:?}");

    // Crashes of h2 in a row suppress it; `member reset` lets it back at once
    // (suppression would otherwise last minutes).
    for _ in 0..4 {
        c.agents[1].kill();
        vipshare_integration::wait_for(Duration::from_secs(30), "h2 fenced", || {
            let m = members(&c.lab).ok();
            async move { m.filter(|m| m["h2"].0 != "active").map(|_| ()) }
        })
        .await?;
        if members(&c.lab)?["h2"].0 == "suppressed" {
            break;
        }
        c.agents[1].restart()?;
        wait_state(&c, "h2", "active").await?;
    }
    let m = members(&c.lab)?;
    assert_eq!(m["h2"].0, "suppressed", "{m:?}");
    assert!(m["h2"].2 > 2000.0, "{m:?}");
    let out = c.lab.ctl(&["member", "reset", "h2"])?;
    assert!(out.status.success(), "{}", stderr(&out));
    let m = members(&c.lab)?;
    assert_eq!((m["h2"].0.as_str(), m["h2"].2), ("down", 0.0), "{m:?}");
    c.agents[1].restart()?;
    c.wait_converged(&both, Duration::from_secs(30)).await?;
    Ok(())
}

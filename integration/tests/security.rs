//! Certificates in operation, against real controller processes over real mTLS:
//! refusals that `rejections.rs` does not cover (an expired certificate, a reader
//! mutating, an agent speaking for another member, a revoked certificate on an
//! established and on a new connection), and rotating every certificate and the CA
//! of a running cluster under load without a failed request or a new term.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio::task::JoinHandle;
use vipshare_integration::{wait_for, Lab};
use vipshare_proto::pki::{self, Role};
use vipshare_proto::tls::{self, TlsFiles, TlsReloader};
use vipshare_proto::v1::admin_api_client::AdminApiClient;
use vipshare_proto::v1::agent_api_client::AgentApiClient;
use vipshare_proto::v1::{self as pb, mutate_request::Op};
use vipshare_proto::PROTOCOL_VERSION;

const ELECTION: Duration = Duration::from_secs(15);
/// Long enough for a poll (2 s), the settle delay and a slow debug build.
const RELOAD: Duration = Duration::from_secs(20);

/// The two tests start three controllers each and one of them measures that no
/// election happens: never run them at the same time on a small machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Wait until one line of controller `id`'s log contains every needle.
async fn logged(lab: &Lab, id: u64, needles: &[&str]) -> anyhow::Result<()> {
    wait_for(
        RELOAD,
        &format!("a line with {needles:?} in controller {id}'s log"),
        || async {
            lab.controllers[&id]
                .log_text()
                .lines()
                .any(|l| needles.iter().all(|n| l.contains(n)))
                .then_some(())
        },
    )
    .await
}

/// How many lines of controller `id`'s log contain every needle.
fn count_lines(lab: &Lab, id: u64, needles: &[&str]) -> usize {
    lab.controllers[&id]
        .log_text()
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .count()
}

/// Wait until more than `before` lines of controller `id`'s log contain every needle.
async fn logged_again(lab: &Lab, id: u64, needles: &[&str], before: usize) -> anyhow::Result<()> {
    wait_for(
        RELOAD,
        &format!("another line with {needles:?} in controller {id}'s log"),
        || async { (count_lines(lab, id, needles) > before).then_some(()) },
    )
    .await
}

/// What must not change when a request is refused, as one controller sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Replicated {
    applied: u64,
    members: Vec<String>,
    revoked: Vec<String>,
}

async fn replicated(lab: &Lab, id: u64) -> Option<Replicated> {
    let status = lab.local_status(id).await?;
    let members = lab
        .client(id)
        .await
        .ok()?
        .members(pb::ReadRequest {
            protocol_version: PROTOCOL_VERSION,
            local: true,
        })
        .await
        .ok()?
        .into_inner();
    Some(Replicated {
        applied: status.applied_index,
        members: members.members.into_iter().map(|m| m.name).collect(),
        revoked: status.revoked_serials,
    })
}

/// The state once all controllers agree on it and it stayed put for a while
/// (the leader's planner may still be fencing members that never heartbeat).
async fn settled(lab: &Lab) -> anyhow::Result<Replicated> {
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut previous = None;
    loop {
        let mut all = Vec::new();
        for id in 1..=3 {
            all.extend(replicated(lab, id).await);
        }
        let agreed = (all.len() == 3 && all.iter().all(|r| *r == all[0])).then(|| all[0].clone());
        if agreed.is_some() && agreed == previous {
            return agreed.ok_or_else(|| anyhow::anyhow!("unreachable"));
        }
        if Instant::now() > deadline {
            anyhow::bail!("controllers never agreed on a quiet state: {all:?}");
        }
        previous = agreed;
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
}

async fn assert_unchanged(lab: &Lab, before: &Replicated) -> anyhow::Result<()> {
    for id in 1..=3 {
        let now = replicated(lab, id)
            .await
            .ok_or_else(|| anyhow::anyhow!("controller {id} stopped answering"))?;
        assert_eq!(&now, before, "controller {id}'s state changed");
        assert!(lab.controllers[&id].is_running(), "controller {id} died");
    }
    Ok(())
}

fn noop(tag: &str) -> pb::MutateRequest {
    pb::MutateRequest {
        protocol_version: PROTOCOL_VERSION,
        op: Some(Op::Noop(pb::Noop {
            payload: tag.as_bytes().to_vec(),
        })),
    }
}

fn heartbeat(member: &str, epoch: u64, round: u64) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        protocol_version: PROTOCOL_VERSION,
        assignment_index: None,
        problems: Vec::new(),
        member: member.into(),
        member_epoch: epoch,
        round,
    }
}

async fn init(lab: &Lab) -> anyhow::Result<()> {
    lab.mutate(Op::InitCluster(pb::InitCluster {
        settings: Some(pb::ClusterSettings {
            bucket_count: 16,
            ..Default::default()
        }),
    }))
    .await?;
    Ok(())
}

/// An admin certificate signed by the lab CA that expired yesterday: something
/// `pki::issue` rightly refuses to make.
fn expired_admin(lab: &Lab, dir: &Path) -> anyhow::Result<TlsFiles> {
    std::fs::create_dir_all(dir)?;
    let ca_pem = std::fs::read(lab.certs.join(pki::CA_CERT_FILE))?;
    let ca_der = CertificateDer::from_pem_slice(&ca_pem)?;
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(lab.certs.join(pki::CA_KEY_FILE))?)?;
    let issuer = rcgen::Issuer::from_ca_cert_der(&ca_der, ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI("vipshare://lab/admin/old".try_into()?)];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(10);
    params.not_after = now - time::Duration::days(1);
    let cert = params.signed_by(&key, &issuer)?;
    let files = TlsFiles {
        ca: lab.certs.join(pki::CA_CERT_FILE),
        cert: dir.join("admin-old.crt"),
        key: dir.join("admin-old.key"),
    };
    pki::write_atomic(&files.cert, cert.pem().as_bytes(), 0o644)?;
    pki::write_atomic(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
    Ok(files)
}

// ------------------------------------------------------------------ refusals

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_wrong_role_impersonating_and_revoked_peers_are_refused() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut lab = Lab::new("127.0.30", 3)?;
    lab.start_founders(3)?;
    let leader = lab.wait_leader(ELECTION).await?;
    init(&lab).await?;
    for m in ["h1", "h2"] {
        lab.mutate(Op::AddMember(pb::AddMember {
            name: m.into(),
            weight: 100,
        }))
        .await?;
    }
    let before = settled(&lab).await?;
    assert_eq!(before.members, vec!["h1", "h2"]);

    // 1. An expired certificate: refused at the handshake.
    let expired = expired_admin(&lab, &lab.root.path().join("expired"))?;
    let refused = match lab.client_with(1, tls::client_config(&expired)?).await {
        Err(_) => true,
        Ok(mut c) => c.mutate(noop("expired")).await.is_err(),
    };
    assert!(refused, "an expired certificate was accepted");
    logged(&lab, 1, &["TLS connection rejected", "\"expired\""]).await?;

    // 2. The read-only role attempting a mutation (reading is fine).
    let reader = tls::client_config(&lab.files(Role::Reader, "viewer"))?;
    let mut c = lab.client_with(1, reader).await?;
    c.status(pb::StatusRequest {
        protocol_version: PROTOCOL_VERSION,
        local: true,
    })
    .await?;
    let err = c
        .mutate(noop("reader"))
        .await
        .expect_err("a reader must not mutate");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    logged(
        &lab,
        1,
        &["refused: role not allowed", "vipshare://lab/reader/viewer"],
    )
    .await?;

    // 3. An agent speaking for another member, on every agent call.
    let agent = tls::client_config(&lab.files(Role::Agent, "h1"))?;
    let ch = tls::connect_once(&format!("https://{}", lab.address(1)), agent).await?;
    let mut a = AgentApiClient::new(ch);
    let err = a
        .heartbeat(heartbeat("h2", 1, 1))
        .await
        .expect_err("h1 must not heartbeat for h2");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let err = a
        .drain_self(pb::DrainSelfRequest {
            protocol_version: PROTOCOL_VERSION,
            member: "h2".into(),
        })
        .await
        .expect_err("h1 must not drain h2");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    logged(
        &lab,
        1,
        &[
            "impersonation",
            "vipshare://lab/agent/h1 may not act for member \"h2\"",
        ],
    )
    .await?;
    assert_unchanged(&lab, &before).await?;

    // 4. Revocation. A second admin works, over a connection it keeps open ...
    pki::issue(&lab.certs, Role::Admin, "admin2", &[], &[], 30)?;
    let admin2_files = lab.files(Role::Admin, "admin2");
    let admin2 = tls::client_config(&admin2_files)?;
    let serial = pki::describe_cert(&admin2_files.cert)?.serial;
    let mut kept = lab.client_with(leader, admin2.clone()).await?;
    kept.mutate(noop("admin2 before")).await?;
    // ... until the first admin revokes its certificate (by file, through the CLI).
    let out = lab.ctl(&[
        "certs",
        "revoke",
        "--cert",
        admin2_files.cert.to_str().unwrap_or_default(),
    ])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = settled(&lab).await?;
    assert_eq!(before.revoked, vec![serial.clone()]);
    let out = lab.ctl(&["status", "--json"])?;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(status["revoked"], serde_json::json!([serial]), "{status}");

    // The established connection: refused call by call.
    let err = kept
        .mutate(noop("admin2 revoked"))
        .await
        .expect_err("revoked admin2 mutated");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    assert!(err.message().contains("revoked"), "{err}");
    let err = kept
        .status(pb::StatusRequest {
            protocol_version: PROTOCOL_VERSION,
            local: true,
        })
        .await
        .expect_err("revoked admin2 read");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    logged(
        &lab,
        leader,
        &[
            "refused: certificate revoked",
            &format!("serial={serial}"),
            "vipshare://lab/admin/admin2",
        ],
    )
    .await?;
    // A new connection: refused at the handshake, by every controller.
    for id in 1..=3 {
        let refused = match lab.client_with(id, admin2.clone()).await {
            Err(_) => true,
            Ok(mut c) => c.mutate(noop("admin2 anew")).await.is_err(),
        };
        assert!(refused, "controller {id} accepted a revoked certificate");
        logged(
            &lab,
            id,
            &[
                "refused a revoked client certificate",
                &format!("serial={serial}"),
            ],
        )
        .await?;
        logged(&lab, id, &["TLS connection rejected", "\"revoked\""]).await?;
    }
    let metrics = lab.metrics(leader).await?;
    for (metric, label) in [
        (
            "vipshare_tls_handshake_failures_total{",
            "reason=\"revoked\"",
        ),
        ("vipshare_rpc_rejected_total{", "reason=\"revoked\""),
    ] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(metric) && l.contains(label)),
            "no {metric}{label} in\n{metrics}"
        );
    }
    assert_unchanged(&lab, &before).await?;

    // Unrevoking (serial typed the openssl way) lets it back in.
    let spelled: Vec<String> = format!("{serial:0>40}")
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    let out = lab.ctl(&["certs", "unrevoke", "--serial", &spelled.join(":")])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(RELOAD, "admin2 to be accepted again", || async {
        let mut c = lab.client_with(1, admin2.clone()).await.ok()?;
        c.status(pb::StatusRequest {
            protocol_version: PROTOCOL_VERSION,
            local: true,
        })
        .await
        .ok()
    })
    .await?;
    Ok(())
}

// ------------------------------------------------------------------ rotation

/// Requests sent and the failures among them, by a background client.
#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    failed: Vec<String>,
}

/// A long-running admin: a noop proposal through the leader every 20 ms. Between
/// requests it reloads its own files when they change and then moves to a new
/// connection, as a daemon built on `TlsReloader` would.
fn propose_forever(
    address: String,
    tls: Arc<TlsReloader>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<anyhow::Result<Tally>> {
    tokio::spawn(async move {
        let uri = format!("https://{address}");
        let mut tally = Tally::default();
        let mut generation = tls.client().generation();
        let mut client = AdminApiClient::new(tls::channel(&uri, tls.client())?);
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let t = tls.clone();
            let _ = tokio::task::spawn_blocking(move || t.reload_if_changed()).await;
            if tls.client().generation() != generation {
                generation = tls.client().generation();
                client = AdminApiClient::new(tls::channel(&uri, tls.client())?);
            }
            i += 1;
            match tokio::time::timeout(
                Duration::from_secs(5),
                client.mutate(noop(&format!("load {i}"))),
            )
            .await
            {
                Ok(Ok(_)) => tally.ok += 1,
                Ok(Err(s)) => tally.failed.push(format!("proposal {i}: {s}")),
                Err(_) => tally.failed.push(format!("proposal {i}: timed out")),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(tally)
    })
}

/// An agent for member `h1`: a heartbeat to every controller every 100 ms, with the
/// same reload-and-reconnect behaviour. Acked or not, every heartbeat must be
/// answered.
fn heartbeat_forever(
    addresses: Vec<String>,
    tls: Arc<TlsReloader>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<anyhow::Result<Tally>> {
    tokio::spawn(async move {
        let connect = |tls: &TlsReloader| {
            addresses
                .iter()
                .map(|a| {
                    Ok(AgentApiClient::new(tls::channel(
                        &format!("https://{a}"),
                        tls.client(),
                    )?))
                })
                .collect::<anyhow::Result<Vec<_>>>()
        };
        let mut tally = Tally::default();
        let mut generation = tls.client().generation();
        let mut clients = connect(&tls)?;
        let mut epoch = 1;
        let mut round = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let t = tls.clone();
            let _ = tokio::task::spawn_blocking(move || t.reload_if_changed()).await;
            if tls.client().generation() != generation {
                generation = tls.client().generation();
                clients = connect(&tls)?;
            }
            round += 1;
            for (c, address) in clients.iter_mut().zip(&addresses) {
                match tokio::time::timeout(
                    Duration::from_secs(2),
                    c.heartbeat(heartbeat("h1", epoch, round)),
                )
                .await
                {
                    Ok(Ok(r)) => {
                        tally.ok += 1;
                        epoch = epoch.max(r.into_inner().member_epoch);
                    }
                    Ok(Err(s)) => tally
                        .failed
                        .push(format!("heartbeat {round} to {address}: {s}")),
                    Err(_) => tally
                        .failed
                        .push(format!("heartbeat {round} to {address}: timed out")),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(tally)
    })
}

/// Every certificate the lab's processes use, by role and name.
const IDENTITIES: [(Role, &str); 5] = [
    (Role::Controller, "1"),
    (Role::Controller, "2"),
    (Role::Controller, "3"),
    (Role::Admin, "admin"),
    (Role::Agent, "h1"),
];

fn renew_all(lab: &Lab) -> anyhow::Result<Vec<String>> {
    IDENTITIES
        .iter()
        .map(|(role, name)| {
            let files = pki::renew(&lab.certs, *role, name, 30)?;
            Ok(pki::describe_cert(&files.cert)?.serial)
        })
        .collect()
}

/// Each controller reloaded `serials` (its own), and every new connection the
/// others, the admin and the agent made to it presents their new serials.
async fn assert_new_certificates_in_use(
    lab: &Lab,
    leader: u64,
    serials: &[String],
) -> anyhow::Result<()> {
    for id in 1..=3u64 {
        let own = &serials[id as usize - 1];
        logged(lab, id, &["TLS files reloaded", &format!("serial={own}")]).await?;
        // Peers moved their raft connections to the new certificate: every
        // controller sees every other one connect with its new serial (the leader
        // dials every follower; the followers dial the leader).
        for peer in (1..=3u64).filter(|&p| p != id && (p == leader || id == leader)) {
            logged(
                lab,
                id,
                &[
                    "TLS peer connected",
                    &format!("identity=vipshare://lab/controller/{peer} "),
                    &format!("serial={}", serials[peer as usize - 1]),
                ],
            )
            .await?;
        }
        logged(
            lab,
            id,
            &[
                "TLS peer connected",
                "identity=vipshare://lab/agent/h1 ",
                &format!("serial={}", serials[4]),
            ],
        )
        .await?;
    }
    logged(
        lab,
        leader,
        &[
            "TLS peer connected",
            "identity=vipshare://lab/admin/admin ",
            &format!("serial={}", serials[3]),
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_every_certificate_and_the_ca_under_load() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut lab = Lab::new("127.0.31", 3)?;
    lab.start_founders(3)?;
    let leader = lab.wait_leader(ELECTION).await?;
    init(&lab).await?;
    lab.mutate(Op::AddMember(pb::AddMember {
        name: "h1".into(),
        weight: 100,
    }))
    .await?;
    let term = lab
        .local_status(leader)
        .await
        .ok_or_else(|| anyhow::anyhow!("leader gone"))?
        .term;

    let stop = Arc::new(AtomicBool::new(false));
    let admin = Arc::new(TlsReloader::new(lab.files(Role::Admin, "admin"))?);
    let agent = Arc::new(TlsReloader::new(lab.files(Role::Agent, "h1"))?);
    let proposals = propose_forever(lab.address(leader), admin.clone(), stop.clone());
    let addresses = (1..=3).map(|id| lab.address(id)).collect();
    let heartbeats = heartbeat_forever(addresses, agent.clone(), stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 0. Unusable new files are refused and the old ones stay in use: a key that
    // others can read (found by the poller) ...
    let key1 = lab.files(Role::Controller, "1").key;
    let reloads = count_lines(&lab, 1, &["TLS files reloaded"]);
    set_mode(&key1, 0o644)?;
    logged(
        &lab,
        1,
        &[
            "TLS reload failed",
            &format!("chmod 600 {}", key1.display()),
        ],
    )
    .await?;
    set_mode(&key1, 0o600)?;
    logged_again(&lab, 1, &["TLS files reloaded"], reloads).await?;
    // ... and a certificate that is not one (SIGHUP).
    let cert2 = lab.files(Role::Controller, "2").cert;
    let good = std::fs::read(&cert2)?;
    pki::write_atomic(&cert2, b"not a certificate\n", 0o644)?;
    lab.sighup(2)?;
    logged(
        &lab,
        2,
        &[
            "TLS reload failed",
            &cert2.display().to_string(),
            "contains no PEM certificate",
        ],
    )
    .await?;
    assert!(lab.local_status(2).await.is_some(), "controller 2 lost TLS");
    pki::write_atomic(&cert2, &good, 0o644)?;

    // 1. Renew every leaf; controllers reload on SIGHUP.
    let old_admin = lab.root.path().join("old-admin");
    std::fs::create_dir_all(&old_admin)?;
    let serials = renew_all(&lab)?;
    for id in 1..=3 {
        lab.sighup(id)?;
    }
    assert_new_certificates_in_use(&lab, leader, &serials).await?;
    // Keep this generation of the admin certificate: the old CA signed it.
    let old_admin_files = copy_identity(&lab, Role::Admin, "admin", &old_admin)?;

    // 2. Rotate the CA, with nothing but the poller: first trust old and new ...
    pki::rotate_ca(&lab.certs, 30)?;
    for id in 1..=3 {
        logged(&lab, id, &["TLS files reloaded", "cas=2"]).await?;
    }
    for (who, r) in [("admin", &admin), ("agent", &agent)] {
        wait_for(RELOAD, &format!("the {who} to trust both CAs"), || async {
            (r.in_use().cas == 2).then_some(())
        })
        .await?;
    }
    // ... then move every leaf to the new CA ...
    let serials = renew_all(&lab)?;
    assert_new_certificates_in_use(&lab, leader, &serials).await?;
    for (who, r, serial) in [
        ("admin", &admin, &serials[3]),
        ("agent", &agent, &serials[4]),
    ] {
        wait_for(
            RELOAD,
            &format!("the {who} to use its new certificate"),
            || async { (&r.in_use().serial == serial).then_some(()) },
        )
        .await?;
    }
    // ... and drop the old CA.
    let one_ca = &["TLS files reloaded", "cas=1"];
    let before: Vec<usize> = (1..=3).map(|id| count_lines(&lab, id, one_ca)).collect();
    pki::prune_ca(&lab.certs)?;
    for id in 1..=3 {
        logged_again(&lab, id, one_ca, before[id as usize - 1]).await?;
    }
    for (who, r) in [("admin", &admin), ("agent", &agent)] {
        wait_for(RELOAD, &format!("the {who} to drop the old CA"), || async {
            (r.in_use().cas == 1).then_some(())
        })
        .await?;
    }
    // Let the load run on the final certificates for a moment.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let proposals = proposals.await??;
    let heartbeats = heartbeats.await??;
    println!(
        "during the rotation: {} proposals, {} heartbeats answered",
        proposals.ok, heartbeats.ok
    );
    assert!(
        proposals.failed.is_empty(),
        "failed proposals: {:#?}",
        proposals.failed
    );
    assert!(
        heartbeats.failed.is_empty(),
        "failed heartbeats: {:#?}",
        heartbeats.failed
    );
    assert!(proposals.ok > 50 && heartbeats.ok > 50, "too little load");
    // No election was caused by any of it.
    for id in 1..=3 {
        let s = lab
            .local_status(id)
            .await
            .ok_or_else(|| anyhow::anyhow!("controller {id} stopped answering"))?;
        assert_eq!((s.term, s.leader_id), (term, leader), "controller {id}");
    }

    // A certificate of the old CA is now refused.
    let refused = match lab
        .client_with(1, tls::client_config(&old_admin_files)?)
        .await
    {
        Err(_) => true,
        Ok(mut c) => c.mutate(noop("old CA")).await.is_err(),
    };
    assert!(refused, "a certificate of the pruned CA was accepted");
    logged(&lab, 1, &["TLS connection rejected", "\"unknown_ca\""]).await?;

    // Expiry gauges: one per file, for the certificate and the CA.
    let metrics = lab.metrics(1).await?;
    for file in [
        lab.files(Role::Controller, "1").cert,
        lab.certs.join(pki::CA_CERT_FILE),
    ] {
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with("vipshare_cert_expiry_seconds{")
                    && l.contains(&format!("file=\"{}\"", file.display()))
            })
            .ok_or_else(|| anyhow::anyhow!("no expiry gauge for {}", file.display()))?;
        let days = line.rsplit(' ').next().unwrap_or("").parse::<f64>()? / 86_400.0;
        assert!((29.0..=30.0).contains(&days), "{line}");
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Copy an identity's current certificate and key to `dir`, trusting the lab CA file.
fn copy_identity(lab: &Lab, role: Role, name: &str, dir: &Path) -> anyhow::Result<TlsFiles> {
    let from = lab.files(role, name);
    let to = TlsFiles {
        ca: from.ca.clone(),
        cert: dir.join(file_name(&from.cert)),
        key: dir.join(file_name(&from.key)),
    };
    pki::write_atomic(&to.cert, &std::fs::read(&from.cert)?, 0o644)?;
    pki::write_atomic(&to.key, &std::fs::read(&from.key)?, 0o600)?;
    Ok(to)
}

fn file_name(p: &Path) -> PathBuf {
    p.file_name().map(PathBuf::from).unwrap_or_default()
}

//! Hostile and broken clients against a running 3-controller cluster: each is
//! refused, the refusal is logged with its reason, nothing in the replicated state
//! changes, and every controller keeps running.

use std::sync::Arc;
use std::time::Duration;

use protobuf::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vipshare_integration::{wait_for, Lab};
use vipshare_proto::pki::{self, Role};
use vipshare_proto::tls::{self, TlsFiles};
use vipshare_proto::v1::admin_api_client::AdminApiClient;
use vipshare_proto::v1::raft_transport_client::RaftTransportClient;
use vipshare_proto::v1::{self as pb, mutate_request::Op};
use vipshare_proto::PROTOCOL_VERSION;

/// Wait until controller 1's log mentions `needle` (logging is asynchronous to the reply).
async fn logged(lab: &Lab, needle: &str) -> anyhow::Result<()> {
    wait_for(
        Duration::from_secs(5),
        &format!("log line {needle:?}"),
        || async {
            lab.controllers[&1]
                .log_text()
                .contains(needle)
                .then_some(())
        },
    )
    .await
}

fn status_req() -> pb::StatusRequest {
    pb::StatusRequest {
        protocol_version: PROTOCOL_VERSION,
        local: true,
    }
}

async fn status_with(lab: &Lab, cfg: Arc<rustls::ClientConfig>) -> anyhow::Result<pb::StatusReply> {
    let ch = tls::connect_once(&format!("https://{}", lab.address(1)), cfg).await?;
    Ok(AdminApiClient::new(ch)
        .status(status_req())
        .await?
        .into_inner())
}

fn raft_batch(from: u64) -> pb::RaftBatch {
    let mut m = raft::eraftpb::Message::default();
    m.set_msg_type(raft::eraftpb::MessageType::MsgHeartbeat);
    m.from = from;
    m.to = 1;
    m.term = 1000;
    pb::RaftBatch {
        protocol_version: PROTOCOL_VERSION,
        cluster: "lab".into(),
        from,
        to: 1,
        messages: vec![m.write_to_bytes().unwrap_or_default()],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_are_refused_logged_and_change_nothing() -> anyhow::Result<()> {
    let mut lab = Lab::new("127.0.20", 3)?;
    lab.start_founders(3)?;
    lab.wait_leader(Duration::from_secs(15)).await?;
    let init = lab
        .mutate(Op::InitCluster(pb::InitCluster {
            settings: Some(pb::ClusterSettings {
                vips: vec![],
                bucket_count: 16,
                ..Default::default()
            }),
        }))
        .await?;
    // Every controller has applied the init before the hostile traffic starts.
    let before = wait_for(
        Duration::from_secs(10),
        "all controllers to apply init",
        || async {
            let mut applied = Vec::new();
            for id in 1..=3 {
                applied.push(lab.local_status(id).await?);
            }
            applied
                .iter()
                .all(|s| s.applied_index >= init && s.applied_index == applied[0].applied_index)
                .then(|| applied.swap_remove(0))
        },
    )
    .await?;
    let ca = lab.certs.join("ca.crt");

    // 1. No client certificate.
    let mut roots = rustls::RootCertStore::empty();
    for c in pki::load_certs(&ca)? {
        roots.add(c)?;
    }
    let mut no_cert = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_no_client_auth();
    no_cert.alpn_protocols = vec![b"h2".to_vec()];
    assert!(status_with(&lab, Arc::new(no_cert)).await.is_err());
    logged(&lab, "no_client_cert").await?;

    // 2. A certificate from another CA (same cluster name, so only the CA differs).
    let foreign = lab.root.path().join("foreign");
    pki::init_ca(&foreign, "lab", 30)?;
    pki::issue(&foreign, Role::Admin, "mallory", &[], &[], 30)?;
    let mut files = TlsFiles::in_dir(&foreign, Role::Admin, "mallory");
    files.ca = ca.clone();
    assert!(status_with(&lab, tls::client_config(&files)?)
        .await
        .is_err());
    logged(&lab, "unknown_ca").await?;

    // 3. An agent certificate sending raft traffic.
    let agent = tls::client_config(&TlsFiles::in_dir(&lab.certs, Role::Agent, "h1"))?;
    let ch = tls::connect_once(&format!("https://{}", lab.address(1)), agent).await?;
    let err = RaftTransportClient::new(ch)
        .send(raft_batch(2))
        .await
        .expect_err("agent must not send raft");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    logged(&lab, "role not allowed").await?;

    // 3b. A controller certificate claiming another controller's raft id.
    let c3 = tls::client_config(&TlsFiles::in_dir(&lab.certs, Role::Controller, "3"))?;
    let ch = tls::connect_once(&format!("https://{}", lab.address(1)), c3).await?;
    let err = RaftTransportClient::new(ch)
        .send(raft_batch(2))
        .await
        .expect_err("controller 3 must not speak as 2");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    logged(&lab, "may not send raft messages as controller 2").await?;

    // 4. Garbage bytes on the port.
    let mut s = tokio::net::TcpStream::connect(lab.address(1)).await?;
    s.write_all(&[0x17, 0x42, 0x99, 0x00, 0xff, 0x13, 0x37, 0x00, 0x01, 0x02])
        .await?;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await??;
    assert!(
        n == 0 || buf[0] == 0x15,
        "server answered garbage with data"
    );
    logged(&lab, "not_tls").await?;

    // 5. Plaintext HTTP/2.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", lab.address(1)))?
        .connect()
        .await;
    if let Ok(ch) = plain {
        assert!(AdminApiClient::new(ch).status(status_req()).await.is_err());
    }
    logged(&lab, "plaintext_http").await?;

    // 6. An oversized message from a legitimate admin.
    let mut admin = lab.client(1).await?;
    let err = admin
        .mutate(pb::MutateRequest {
            protocol_version: PROTOCOL_VERSION,
            op: Some(Op::Noop(pb::Noop {
                payload: vec![0; 4 * 1024 * 1024],
            })),
        })
        .await
        .expect_err("4 MiB admin message must be refused");
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err}");
    logged(&lab, "call refused").await?;

    // Nothing changed, nobody crashed.
    for id in 1..=3 {
        let s = lab
            .local_status(id)
            .await
            .ok_or_else(|| anyhow::anyhow!("controller {id} stopped answering"))?;
        assert_eq!(s.applied_index, before.applied_index, "controller {id}");
        assert_eq!(s.members, before.members);
        assert!(lab.controllers[&id].is_running());
    }
    // ... and the cluster still works for a legitimate admin.
    lab.noop(b"still-alive").await?;
    Ok(())
}

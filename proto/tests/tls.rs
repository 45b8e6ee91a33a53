//! Real mTLS handshakes against a real tonic server built on `tls::serve_incoming`.
//! Every rejection test checks the RPC fails, the server-side reason, and that the
//! server still serves a good client afterwards.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Endpoint, Server};
use tonic::{Request, Response, Status};
use vipshare_proto::pki::{self, Role};
use vipshare_proto::tls::{
    self, FailureReason, HandshakeFailure, ServeOptions, TlsError, TlsFiles,
};
use vipshare_proto::v1::admin_api_client::AdminApiClient;
use vipshare_proto::v1::admin_api_server::{AdminApi, AdminApiServer};
use vipshare_proto::v1::{
    BucketsReply, MembersReply, MutateReply, MutateRequest, ReadRequest, StatusReply, StatusRequest,
};
use vipshare_proto::PROTOCOL_VERSION;

const CLUSTER: &str = "test";
/// Upper bound on any single await; a guard against hangs, never a synchroniser.
const GUARD: Duration = Duration::from_secs(20);

async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(GUARD, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

// ------------------------------------------------------------------ service

/// Echoes the caller's identity back in `role` so clients can see what the server saw.
struct Echo;

#[tonic::async_trait]
impl AdminApi for Echo {
    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let peer = tls::peer(&req).ok_or_else(|| Status::internal("no PeerInfo"))?;
        assert!(peer.addr.ip().is_loopback());
        Ok(Response::new(StatusReply {
            protocol_version: PROTOCOL_VERSION,
            id: peer.identity.controller_id().unwrap_or(0),
            role: peer.identity.to_uri(),
            ..Default::default()
        }))
    }

    async fn members(&self, _: Request<ReadRequest>) -> Result<Response<MembersReply>, Status> {
        Err(Status::unimplemented("members"))
    }

    async fn buckets(&self, _: Request<ReadRequest>) -> Result<Response<BucketsReply>, Status> {
        Err(Status::unimplemented("buckets"))
    }

    async fn mutate(&self, _: Request<MutateRequest>) -> Result<Response<MutateReply>, Status> {
        Err(Status::unimplemented("mutate"))
    }

    async fn history(
        &self,
        _: Request<vipshare_proto::v1::HistoryRequest>,
    ) -> Result<Response<vipshare_proto::v1::HistoryReply>, Status> {
        Err(Status::unimplemented("history"))
    }
    type WatchStream = tokio_stream::Empty<Result<vipshare_proto::v1::WatchReply, Status>>;
    async fn watch(&self, _: Request<ReadRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("watch"))
    }
    type WatchBucketsStream = tokio_stream::Empty<Result<BucketsReply, Status>>;

    async fn watch_buckets(
        &self,
        _: Request<ReadRequest>,
    ) -> Result<Response<Self::WatchBucketsStream>, Status> {
        Err(Status::unimplemented("watch_buckets"))
    }
}

// ------------------------------------------------------------------ fixtures

struct Pki {
    _tmp: tempfile::TempDir,
    /// The cluster CA with controller-1 (127.0.0.1, localhost) and admin-alice.
    dir: PathBuf,
    /// An unrelated CA, same cluster name, with admin-mallory.
    other: PathBuf,
}

fn pki_fixture() -> Pki {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let other = tmp.path().join("other");
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    pki::init_ca(&dir, CLUSTER, 30).unwrap();
    pki::issue(
        &dir,
        Role::Controller,
        "1",
        &[localhost],
        &["localhost".into()],
        30,
    )
    .unwrap();
    pki::issue(&dir, Role::Admin, "alice", &[], &[], 30).unwrap();
    pki::init_ca(&other, CLUSTER, 30).unwrap();
    pki::issue(&other, Role::Admin, "mallory", &[], &[], 30).unwrap();
    Pki {
        _tmp: tmp,
        dir,
        other,
    }
}

impl Pki {
    fn files(&self, role: Role, name: &str) -> TlsFiles {
        TlsFiles::in_dir(&self.dir, role, name)
    }

    fn server_files(&self) -> TlsFiles {
        self.files(Role::Controller, "1")
    }

    fn alice(&self) -> Arc<ClientConfig> {
        tls::client_config(&self.files(Role::Admin, "alice")).unwrap()
    }

    /// A certificate signed by this CA but shaped by the test (validity, SANs):
    /// things `pki::issue` rightly refuses to produce.
    fn custom(
        &self,
        stem: &str,
        uri: Option<&str>,
        ips: &[IpAddr],
        validity: (time::OffsetDateTime, time::OffsetDateTime),
    ) -> TlsFiles {
        let ca_pem = std::fs::read_to_string(self.dir.join("ca.crt")).unwrap();
        let ca_key =
            KeyPair::from_pem(&std::fs::read_to_string(self.dir.join("ca.key")).unwrap()).unwrap();
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        if let Some(uri) = uri {
            params
                .subject_alt_names
                .push(SanType::URI(uri.try_into().unwrap()));
        }
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        (params.not_before, params.not_after) = validity;
        let cert = params.signed_by(&key, &issuer).unwrap();
        let files = TlsFiles {
            ca: self.dir.join("ca.crt"),
            cert: self.dir.join(format!("{stem}.crt")),
            key: self.dir.join(format!("{stem}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        write_private(&files.key, &key.serialize_pem());
        files
    }
}

fn write_private(path: &Path, contents: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(contents.as_bytes()).unwrap();
}

fn valid_now() -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    (
        now - time::Duration::hours(1),
        now + time::Duration::days(1),
    )
}

/// Client config that skips vipshare's own server identity check: plain webpki
/// against `ca`, optionally presenting `client`. Lets a test reach the server's checks.
fn raw_client(ca: &Path, client: Option<&TlsFiles>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in pki::load_certs(ca).unwrap() {
        roots.add(c).unwrap();
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some(f) => builder
            .with_client_auth_cert(
                pki::load_certs(&f.cert).unwrap(),
                pki::load_key(&f.key).unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

fn snapshotter() -> &'static Snapshotter {
    static SNAP: OnceLock<Snapshotter> = OnceLock::new();
    SNAP.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snap = recorder.snapshotter();
        recorder
            .install()
            .expect("no other global metrics recorder");
        snap
    })
}

struct TestServer {
    addr: SocketAddr,
    failures: mpsc::UnboundedReceiver<HandshakeFailure>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

async fn start(files: &TlsFiles, cluster: &str, handshake_timeout: Duration) -> TestServer {
    snapshotter();
    let config = tls::server_config(files).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (ftx, failures) = mpsc::unbounded_channel();
    let options = ServeOptions {
        handshake_timeout,
        failures: Some(ftx),
        ..ServeOptions::default()
    };
    let incoming = tls::serve_incoming_with(listener, config, cluster.to_string(), options);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(
        Server::builder()
            .add_service(AdminApiServer::new(Echo))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            }),
    );
    TestServer {
        addr,
        failures,
        stop: Some(stop),
        task,
    }
}

impl TestServer {
    fn uri(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    async fn next_failure(&mut self) -> HandshakeFailure {
        within("handshake failure report", self.failures.recv())
            .await
            .expect("server gone")
    }

    /// The next failure must have `reason`; returns it for further checks.
    async fn expect_failure(&mut self, reason: FailureReason) -> HandshakeFailure {
        let f = self.next_failure().await;
        assert_eq!(f.reason, reason, "unexpected failure {f:?}");
        assert!(f.peer.ip().is_loopback());
        f
    }

    /// A well-configured client still gets through, and nothing else was rejected.
    async fn assert_serves_alice(&mut self, pki: &Pki) {
        let reply = status(&self.uri(), pki.alice())
            .await
            .expect("good client refused");
        assert_eq!(reply.role, format!("vipshare://{CLUSTER}/admin/alice"));
        assert!(
            self.failures.try_recv().is_err(),
            "unexpected extra rejection"
        );
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        within("server shutdown", self.task).await.unwrap().unwrap();
    }
}

async fn status(uri: &str, config: Arc<ClientConfig>) -> Result<StatusReply, Status> {
    let channel = tls::channel(uri, config).expect("valid URI");
    let mut client = AdminApiClient::new(channel);
    let req = StatusRequest {
        protocol_version: PROTOCOL_VERSION,
        local: true,
    };
    within("status RPC", client.status(req))
        .await
        .map(Response::into_inner)
}

// ------------------------------------------------------------------ accepted

#[tokio::test]
async fn valid_admin_is_served_and_identified() {
    let pki = pki_fixture();
    let mut server = start(&pki.server_files(), CLUSTER, Duration::from_secs(5)).await;
    server.assert_serves_alice(&pki).await;

    // Eager connect, and a controller as client: its raft id reaches the handler.
    let controller = tls::client_config(&pki.server_files()).unwrap();
    let channel = within("connect_once", tls::connect_once(&server.uri(), controller))
        .await
        .unwrap();
    let reply = AdminApiClient::new(channel)
        .status(StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.role, "vipshare://test/controller/1");
    assert_eq!(reply.id, 1);

    // The server name comes from the URI host: a DNS SAN works as well as an IP SAN.
    let by_name = format!("https://localhost:{}", server.addr.port());
    status(&by_name, pki.alice()).await.unwrap();
    server.stop().await;
}

// ------------------------------------------------------------------ rejected by the server

#[tokio::test]
async fn rejects_client_without_certificate() {
    let pki = pki_fixture();
    let mut server = start(&pki.server_files(), CLUSTER, Duration::from_secs(5)).await;
    let anonymous = raw_client(&pki.dir.join("ca.crt"), None);
    status(&server.uri(), anonymous).await.unwrap_err();
    server.expect_failure(FailureReason::NoClientCert).await;
    server.assert_serves_alice(&pki).await;
    server.stop().await;
}

#[tokio::test]
async fn rejects_certificate_from_another_ca() {
    let pki = pki_fixture();
    let mut server = start(&pki.server_files(), CLUSTER, Duration::from_secs(5)).await;
    // Trusts our CA (so it would accept the server) but holds a foreign-CA certificate.
    let mallory = TlsFiles {
        ca: pki.dir.join("ca.crt"),
        ..TlsFiles::in_dir(&pki.other, Role::Admin, "mallory")
    };
    let err = status(&server.uri(), tls::client_config(&mallory).unwrap())
        .await
        .unwrap_err();
    server.expect_failure(FailureReason::UnknownCa).await;
    assert_ne!(err.code(), tonic::Code::Ok);
    server.assert_serves_alice(&pki).await;
    server.stop().await;
}

#[tokio::test]
async fn rejects_expired_certificate() {
    let pki = pki_fixture();
    let mut server = start(&pki.server_files(), CLUSTER, Duration::from_secs(5)).await;
    let now = time::OffsetDateTime::now_utc();
    let expired = pki.custom(
        "admin-old",
        Some("vipshare://test/admin/old"),
        &[],
        (
            now - time::Duration::days(10),
            now - time::Duration::days(1),
        ),
    );
    status(&server.uri(), tls::client_config(&expired).unwrap())
        .await
        .unwrap_err();
    server.expect_failure(FailureReason::Expired).await;
    server.assert_serves_alice(&pki).await;
    server.stop().await;
}

#[tokio::test]
async fn rejects_certificate_of_another_cluster() {
    let pki = pki_fixture();
    let mut server = start(&pki.server_files(), CLUSTER, Duration::from_secs(5)).await;
    // Same CA, other cluster: the chain is fine, only the identity check can refuse it.
    let eve = pki.custom(
        "admin-eve",
        Some("vipshare://prod/admin/eve"),
        &[],
        valid_now(),
    );
    status(&server.uri(), raw_client(&eve.ca, Some(&eve)))
        .await
        .unwrap_err();
    let f = server.expect_failure(FailureReason::WrongCluster).await;
    assert_eq!(
        f.detail,
        "vipshare://prod/admin/eve belongs to cluster \"prod\", expected \"test\""
    );
    server.assert_serves_alice(&pki).await;
    server.stop().await;
}

#[tokio::test]
async fn rejects_certificate_without_identity() {
    let pki = pki_fixture();
    let mut server = start(&pki.server_files(), CLUSTER, Duration::from_secs(5)).await;
    for (stem, uri) in [
        ("anon", None),
        ("badrole", Some("vipshare://test/root/x")),
        ("spiffe", Some("spiffe://test/admin/x")),
    ] {
        let files = pki.custom(stem, uri, &[], valid_now());
        status(&server.uri(), raw_client(&files.ca, Some(&files)))
            .await
            .unwrap_err();
        server.expect_failure(FailureReason::NoIdentity).await;
    }
    server.assert_serves_alice(&pki).await;
    server.stop().await;
}

#[tokio::test]
async fn rejects_plaintext_http2() {
    let pki = pki_fixture();
    let mut server = start(&pki.server_files(), CLUSTER, Duration::from_secs(5)).await;
    let plain = Endpoint::from_shared(format!("http://{}", server.addr)).unwrap();
    let result = within("plaintext RPC", async {
        let channel = plain.connect().await.map_err(|e| e.to_string())?;
        AdminApiClient::new(channel)
            .status(StatusRequest::default())
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    assert!(result.is_err(), "plaintext client was served");
    let f = server.expect_failure(FailureReason::PlaintextHttp).await;
    assert!(f.detail.contains("HTTP/2"), "{}", f.detail);
    server.assert_serves_alice(&pki).await;
    server.stop().await;
}

#[tokio::test]
async fn rejects_garbage_and_counts_it() {
    let pki = pki_fixture();
    let mut server = start(&pki.server_files(), CLUSTER, Duration::from_secs(5)).await;

    let mut raw = TcpStream::connect(server.addr).await.unwrap();
    raw.write_all(b"\x00\x01\x02garbage\r\n\r\n").await.unwrap();
    let f = server.expect_failure(FailureReason::NotTls).await;
    assert!(f.detail.contains("00 01 02"), "{}", f.detail);
    // The server hung up on it.
    let mut buf = Vec::new();
    let _ = within("server closes", raw.read_to_end(&mut buf)).await;

    // Looks like a TLS record, isn't one.
    let mut raw = TcpStream::connect(server.addr).await.unwrap();
    raw.write_all(b"\x16\x03\x01\x00\x08notahello")
        .await
        .unwrap();
    server.expect_failure(FailureReason::Protocol).await;

    let counted = snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, _, _, _)| {
            let key = key.key();
            key.name() == tls::HANDSHAKE_FAILURES_METRIC
                && key
                    .labels()
                    .any(|l| l.key() == "reason" && l.value() == "not_tls")
        })
        .map(|(_, _, _, v)| match v {
            DebugValue::Counter(n) => n,
            other => panic!("not a counter: {other:?}"),
        })
        .sum::<u64>();
    assert!(counted >= 1, "not_tls failure was not counted");

    server.assert_serves_alice(&pki).await;
    server.stop().await;
}

#[tokio::test]
async fn rejects_tls12() {
    let pki = pki_fixture();
    let mut server = start(&pki.server_files(), CLUSTER, Duration::from_secs(5)).await;
    let alice = pki.files(Role::Admin, "alice");
    let mut roots = RootCertStore::empty();
    roots
        .add(pki::load_certs(&alice.ca).unwrap().remove(0))
        .unwrap();
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                pki::load_certs(&alice.cert).unwrap(),
                pki::load_key(&alice.key).unwrap(),
            )
            .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    status(&server.uri(), Arc::new(config)).await.unwrap_err();
    server.expect_failure(FailureReason::Protocol).await;
    server.assert_serves_alice(&pki).await;
    server.stop().await;
}

#[tokio::test]
async fn silent_client_neither_blocks_others_nor_lingers() {
    let pki = pki_fixture();
    // A long timeout: if handshakes were serial, alice would wait behind the silent one.
    let mut server = start(&pki.server_files(), CLUSTER, Duration::from_secs(60)).await;
    let silent = TcpStream::connect(server.addr).await.unwrap();
    server.assert_serves_alice(&pki).await;
    drop(silent);
    server.expect_failure(FailureReason::Io).await;
    server.stop().await;

    // With a short timeout, a client that never speaks is cut off.
    let mut server = start(&pki.server_files(), CLUSTER, Duration::from_millis(200)).await;
    let _silent = TcpStream::connect(server.addr).await.unwrap();
    server.expect_failure(FailureReason::Timeout).await;
    server.stop().await;
}

// ------------------------------------------------------------------ checked by the client

#[tokio::test]
async fn client_rejects_server_of_another_cluster() {
    let pki = pki_fixture();
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let impostor = pki.custom(
        "controller-prod-1",
        Some("vipshare://prod/controller/1"),
        &[localhost],
        valid_now(),
    );
    let mut server = start(&impostor, "prod", Duration::from_secs(5)).await;
    let err = within("connect", tls::connect_once(&server.uri(), pki.alice()))
        .await
        .unwrap_err();
    assert!(matches!(err, TlsError::Connect { .. }), "{err}");
    assert!(err.to_string().contains("cluster"), "{err}");
    server.expect_failure(FailureReason::ClientRejected).await;
    server.stop().await;
}

#[tokio::test]
async fn client_rejects_server_that_is_not_a_controller() {
    let pki = pki_fixture();
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    pki::issue(&pki.dir, Role::Agent, "n1", &[localhost], &[], 1).unwrap();
    let mut server = start(
        &pki.files(Role::Agent, "n1"),
        CLUSTER,
        Duration::from_secs(5),
    )
    .await;
    let err = within("connect", tls::connect_once(&server.uri(), pki.alice()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not a controller"), "{err}");
    server.expect_failure(FailureReason::ClientRejected).await;
    server.stop().await;
}

#[tokio::test]
async fn client_checks_the_dialled_address() {
    let pki = pki_fixture();
    let elsewhere: IpAddr = "127.0.0.2".parse().unwrap();
    pki::issue(&pki.dir, Role::Controller, "2", &[elsewhere], &[], 1).unwrap();
    let mut server = start(
        &pki.files(Role::Controller, "2"),
        CLUSTER,
        Duration::from_secs(5),
    )
    .await;
    // Listening on 127.0.0.1, certified for 127.0.0.2 only.
    let err = within("connect", tls::connect_once(&server.uri(), pki.alice()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not valid for name"), "{err}");
    server.expect_failure(FailureReason::ClientRejected).await;
    server.stop().await;
}

// ------------------------------------------------------------------ API edges

#[tokio::test]
async fn channel_requires_https_and_reports_unreachable() {
    let pki = pki_fixture();
    for bad in ["http://127.0.0.1:1", "127.0.0.1:1", "https://"] {
        assert!(
            matches!(tls::channel(bad, pki.alice()), Err(TlsError::BadUri { .. })),
            "{bad} accepted"
        );
    }
    // Bind then drop: a port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = within(
        "connect",
        tls::connect_once(&format!("https://127.0.0.1:{port}"), pki.alice()),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains(&port.to_string()), "{err}");
}

#[test]
fn peer_identity_checks_cluster() {
    let pki = pki_fixture();
    let der = pki::load_certs(&pki.files(Role::Admin, "alice").cert)
        .unwrap()
        .remove(0);
    let id = tls::peer_identity_from_der(&der, CLUSTER).unwrap();
    assert_eq!((id.role, id.name.as_str()), (Role::Admin, "alice"));
    let err = tls::peer_identity_from_der(&der, "prod").unwrap_err();
    assert!(err.to_string().contains("prod"), "{err}");
}

#[test]
fn configs_refuse_bad_files() {
    let pki = pki_fixture();
    use std::os::unix::fs::PermissionsExt;
    let alice = pki.files(Role::Admin, "alice");
    std::fs::set_permissions(&alice.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = tls::client_config(&alice).unwrap_err();
    assert!(err.to_string().contains("chmod 600"), "{err}");
    std::fs::set_permissions(&alice.key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A key that does not belong to the certificate.
    let mismatched = TlsFiles {
        key: pki.server_files().key,
        ..alice
    };
    assert!(tls::server_config(&mismatched).is_err());
    assert!(tls::client_config(&TlsFiles::in_dir(&pki.dir, Role::Admin, "nobody")).is_err());
}

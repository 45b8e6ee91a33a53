//! `TlsReloader` against a real tonic server: new connections use reloaded files,
//! established ones continue, unusable files leave the old configuration in place,
//! and revoked serials are refused at the handshake.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Server;
use tonic::{Request, Response, Status};
use vipshare_proto::pki::{self, Role};
use vipshare_proto::tls::{
    self, FailureReason, HandshakeFailure, ServeOptions, TlsError, TlsFiles, TlsReloader,
};
use vipshare_proto::v1::admin_api_client::AdminApiClient;
use vipshare_proto::v1::admin_api_server::{AdminApi, AdminApiServer};
use vipshare_proto::v1::{
    BucketsReply, MembersReply, MutateReply, MutateRequest, ReadRequest, StatusReply, StatusRequest,
};
use vipshare_proto::PROTOCOL_VERSION;

const GUARD: Duration = Duration::from_secs(20);

async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(GUARD, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Answers with the caller's identity and certificate serial, as the server saw them.
struct WhoAmI;

#[tonic::async_trait]
impl AdminApi for WhoAmI {
    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let peer = tls::peer(&req).ok_or_else(|| Status::internal("no PeerInfo"))?;
        Ok(Response::new(StatusReply {
            protocol_version: PROTOCOL_VERSION,
            role: format!("{} {}", peer.identity, peer.serial),
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

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    server: Arc<TlsReloader>,
    alice: Arc<TlsReloader>,
    uri: String,
    failures: mpsc::UnboundedReceiver<HandshakeFailure>,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    pki::init_ca(&dir, "test", 30).unwrap();
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    pki::issue(&dir, Role::Controller, "1", &[localhost], &[], 30).unwrap();
    pki::issue(&dir, Role::Admin, "alice", &[], &[], 30).unwrap();
    pki::issue(&dir, Role::Admin, "bob", &[], &[], 30).unwrap();
    let server = Arc::new(TlsReloader::new(TlsFiles::in_dir(&dir, Role::Controller, "1")).unwrap());
    let alice = Arc::new(TlsReloader::new(TlsFiles::in_dir(&dir, Role::Admin, "alice")).unwrap());

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("https://{}", listener.local_addr().unwrap());
    let (ftx, failures) = mpsc::unbounded_channel();
    let options = ServeOptions {
        failures: Some(ftx),
        ..ServeOptions::default()
    };
    let incoming = tls::serve_incoming_with(listener, server.server(), "test".into(), options);
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(
        Server::builder()
            .add_service(AdminApiServer::new(WhoAmI))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            }),
    );
    Fixture {
        _tmp: tmp,
        dir,
        server,
        alice,
        uri,
        failures,
        stop: Some(stop),
    }
}

/// "IDENTITY SERIAL" as the server saw the caller.
async fn who(client: &mut AdminApiClient<tonic::transport::Channel>) -> Result<String, Status> {
    let r = within(
        "status",
        client.status(StatusRequest {
            protocol_version: PROTOCOL_VERSION,
            local: true,
        }),
    )
    .await?;
    Ok(r.into_inner().role)
}

/// A new connection with `tls`'s current configuration.
async fn fresh(
    uri: &str,
    tls: &TlsReloader,
) -> Result<AdminApiClient<tonic::transport::Channel>, TlsError> {
    Ok(AdminApiClient::new(
        within("connect", tls::connect_once(uri, tls.client())).await?,
    ))
}

/// Serial of the certificate the server presents to a new connection.
async fn server_serial(uri: &str, tls: &TlsReloader) -> String {
    let addr = uri.trim_start_matches("https://");
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = tokio_rustls::TlsConnector::from(tls.client().current())
        .connect(name, tcp)
        .await
        .unwrap();
    let cert = &conn.get_ref().1.peer_certificates().unwrap()[0];
    pki::cert_serial(cert).unwrap()
}

fn serial_of(path: &Path) -> String {
    pki::describe_cert(path).unwrap().serial
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test]
async fn reload_moves_new_connections_to_the_new_files_and_keeps_old_ones() {
    let f = fixture().await;
    let alice_files = TlsFiles::in_dir(&f.dir, Role::Admin, "alice");
    let server_files = TlsFiles::in_dir(&f.dir, Role::Controller, "1");
    let old_alice = serial_of(&alice_files.cert);
    let old_server = serial_of(&server_files.cert);
    assert_eq!(f.alice.in_use().serial, old_alice);
    assert_eq!(server_serial(&f.uri, &f.alice).await, old_server);

    // A lazily connecting channel, as daemons use: one connection, kept open.
    let mut kept = AdminApiClient::new(tls::channel(&f.uri, f.alice.client()).unwrap());
    let generation = f.alice.client().generation();
    assert_eq!(
        who(&mut kept).await.unwrap(),
        format!("vipshare://test/admin/alice {old_alice}")
    );

    assert!(f.alice.reload_if_changed().is_none(), "nothing changed yet");
    pki::renew(&f.dir, Role::Admin, "alice", 10).unwrap();
    pki::renew(&f.dir, Role::Controller, "1", 10).unwrap();
    let new_alice = serial_of(&alice_files.cert);
    let new_server = serial_of(&server_files.cert);
    let in_use = f.alice.reload_if_changed().expect("renewal seen").unwrap();
    assert_eq!(in_use.serial, new_alice);
    assert_ne!(f.alice.client().generation(), generation);
    assert_eq!(f.server.reload().unwrap().serial, new_server);

    // The established connection goes on as it was ...
    assert_eq!(
        who(&mut kept).await.unwrap(),
        format!("vipshare://test/admin/alice {old_alice}")
    );
    // ... new ones present and see the new certificates.
    let mut new = fresh(&f.uri, &f.alice).await.unwrap();
    assert_eq!(
        who(&mut new).await.unwrap(),
        format!("vipshare://test/admin/alice {new_alice}")
    );
    assert_eq!(server_serial(&f.uri, &f.alice).await, new_server);
}

#[tokio::test]
async fn unusable_files_leave_the_configuration_in_use() {
    let f = fixture().await;
    let files = TlsFiles::in_dir(&f.dir, Role::Admin, "alice");
    let serial = f.alice.in_use().serial;
    let still_works = || async {
        let mut c = fresh(&f.uri, &f.alice).await.unwrap();
        assert_eq!(
            who(&mut c).await.unwrap(),
            format!("vipshare://test/admin/alice {serial}")
        );
    };

    // A key others can read: refused, naming the file and the fix.
    set_mode(&files.key, 0o640);
    let err = f
        .alice
        .reload_if_changed()
        .expect("chmod seen")
        .unwrap_err();
    assert!(
        matches!(err, TlsError::Pki(pki::PkiError::KeyPermissions { .. })),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains(&format!("chmod 600 {}", files.key.display())),
        "{err}"
    );
    assert!(f.alice.reload_if_changed().is_none(), "reported once");
    still_works().await;
    set_mode(&files.key, 0o600);
    f.alice.reload_if_changed().expect("fix seen").unwrap();

    // Not a certificate.
    let good = std::fs::read(&files.cert).unwrap();
    pki::write_atomic(&files.cert, b"junk", 0o644).unwrap();
    let err = f.alice.reload().unwrap_err();
    assert!(
        err.to_string().contains(&files.cert.display().to_string()),
        "{err}"
    );
    still_works().await;

    // A key from another pair (a renewal caught half-way, for good).
    pki::write_atomic(&files.cert, &good, 0o644).unwrap();
    let bob = TlsFiles::in_dir(&f.dir, Role::Admin, "bob");
    let alice_key = std::fs::read(&files.key).unwrap();
    pki::write_atomic(&files.key, &std::fs::read(&bob.key).unwrap(), 0o600).unwrap();
    let err = f.alice.reload().unwrap_err();
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
    still_works().await;

    // Another identity altogether.
    pki::write_atomic(&files.cert, &std::fs::read(&bob.cert).unwrap(), 0o644).unwrap();
    let err = f.alice.reload().unwrap_err();
    assert!(err.to_string().contains("identity changed"), "{err}");
    still_works().await;
    assert_eq!(f.alice.in_use().serial, serial);

    // Put right, it reloads.
    pki::write_atomic(&files.cert, &good, 0o644).unwrap();
    pki::write_atomic(&files.key, &alice_key, 0o600).unwrap();
    assert_eq!(f.alice.reload().unwrap().serial, serial);
}

#[tokio::test]
async fn revoked_serials_are_refused_at_the_handshake() {
    let mut f = fixture().await;
    let serial = f.alice.in_use().serial;
    let denied = [serial.clone()].into_iter().collect();
    assert!(f.server.revocations().replace(&denied));
    assert!(!f.server.revocations().replace(&denied), "no change");

    let refused = match fresh(&f.uri, &f.alice).await {
        Err(_) => true,
        Ok(mut c) => who(&mut c).await.is_err(),
    };
    assert!(refused, "revoked certificate accepted");
    let failure = within("failure report", f.failures.recv()).await.unwrap();
    assert_eq!(failure.reason, FailureReason::Revoked, "{failure:?}");
    assert_eq!(failure.reason.as_str(), "revoked");

    // Survives a reload (the list belongs to the reloader, not to one config).
    f.server.reload().unwrap();
    let refused = match fresh(&f.uri, &f.alice).await {
        Err(_) => true,
        Ok(mut c) => who(&mut c).await.is_err(),
    };
    assert!(refused, "revoked certificate accepted after a reload");

    f.server.revocations().replace(&Default::default());
    let mut c = fresh(&f.uri, &f.alice).await.unwrap();
    who(&mut c).await.unwrap();
}

#[tokio::test]
async fn watcher_reloads_when_the_files_change() {
    let f = fixture().await;
    let (stop, stopped) = oneshot::channel::<()>();
    let watcher = f
        .alice
        .clone()
        .spawn_watcher(Duration::from_millis(50), async {
            let _ = stopped.await;
        });
    let before = f.alice.in_use().serial;
    pki::renew(&f.dir, Role::Admin, "alice", 10).unwrap();
    let after = serial_of(&TlsFiles::in_dir(&f.dir, Role::Admin, "alice").cert);
    within("the watcher to reload", async {
        while f.alice.in_use().serial == before {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(f.alice.in_use().serial, after);
    let _ = stop.send(());
    within("the watcher to stop", watcher).await.unwrap();
}

//! Mutually authenticated TLS 1.3 for every vipshare connection.
//!
//! Both sides verify the peer's chain against the cluster CA and then its identity
//! (the `vipshare://CLUSTER/ROLE/NAME` SAN URI, see [`crate::pki`]): a server accepts
//! any role of its own cluster; a client accepts only a controller of its own cluster.
//! The cluster is taken from each side's own certificate.
//!
//! Server: [`server_config`] + [`serve_incoming`] into
//! `tonic::transport::Server::serve_with_incoming_shutdown`; handlers read the caller
//! with [`peer`]. Client: [`client_config`] + [`channel`] (lazy) or [`connect_once`].
//!
//! Daemons load their files through a [`TlsReloader`] instead: it hands out swappable
//! [`ServerTls`] / [`ClientTls`] handles, read once per new connection, and reloads
//! certificate, key and CA bundle on SIGHUP or when the files change, keeping the old
//! configuration (and saying which file is wrong) when the new files are unusable.
//! Established connections are never touched. A server built from a reloader also
//! refuses certificates whose serial is in its [`Revocations`] deny-list.

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::Stream;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::pki::{self, CertIdentityError, Identity, PkiError, Role};

mod admission;
mod refusals;

use admission::Admission;
use refusals::RefusalLog;

/// ALPN protocol id of HTTP/2, the only protocol spoken.
const ALPN_H2: &[u8] = b"h2";
/// How long a client may take from TCP accept to a completed handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes in flight at once; a newcomer beyond it evicts the oldest pending
/// handshake of the source holding the most (see `admission`).
pub const DEFAULT_MAX_PENDING_HANDSHAKES: usize = 1024;
/// Handshakes in flight at once from one source address; a newcomer beyond it
/// evicts that source's oldest.
pub const DEFAULT_MAX_PENDING_PER_SOURCE: usize = 16;
/// Client TCP + TLS connect timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Metric counting rejected incoming connections, labelled by `reason`.
pub const HANDSHAKE_FAILURES_METRIC: &str = "vipshare_tls_handshake_failures_total";
/// Gauge: handshakes in flight (set at every accept and every 10 s).
pub const PENDING_HANDSHAKES_METRIC: &str = "vipshare_tls_pending_handshakes";
/// Gauge: days until `notAfter` of the own certificate and of the CA bundle (its
/// earliest-expiring CA), labelled by `file`. Set at load, reload and every poll.
pub const CERT_EXPIRY_METRIC: &str = "vipshare_cert_expiry_seconds";
/// Counter of TLS file reloads, labelled by `result` (`ok` or `failed`).
pub const RELOADS_METRIC: &str = "vipshare_tls_reloads_total";
/// Gauge: authenticated connections open now, by the peer's role.
pub const CONNECTIONS_METRIC: &str = "vipshare_tls_connections";
/// How often [`TlsReloader::spawn_watcher`] looks at the files' metadata by default.
pub const DEFAULT_RELOAD_POLL: Duration = Duration::from_secs(2);

/// CA certificate, own certificate and own private key of one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files [`pki::issue`] writes for `role`/`name` in `dir`.
    pub fn in_dir(dir: impl AsRef<Path>, role: Role, name: &str) -> Self {
        let dir = dir.as_ref();
        TlsFiles {
            ca: dir.join(pki::CA_CERT_FILE),
            cert: dir.join(format!("{role}-{name}.crt")),
            key: dir.join(format!("{role}-{name}.key")),
        }
    }
}

/// Why a TLS configuration, a peer or a connection was refused.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("{}: {reason}", .path.display())]
    BadFile { path: PathBuf, reason: String },
    #[error("{}: not the private key of {} ({reason})", .key.display(), .cert.display())]
    KeyMismatch {
        key: PathBuf,
        cert: PathBuf,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("peer certificate rejected: {0}")]
    Peer(#[from] PeerError),
    #[error("invalid URI {uri:?}: {reason}")]
    BadUri { uri: String, reason: String },
    #[error("cannot connect to {uri}: {reason}")]
    Connect { uri: String, reason: String },
}

/// Why a peer's (already chain-verified) certificate does not name an acceptable peer.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PeerError {
    #[error("{0}")]
    Identity(#[from] CertIdentityError),
    #[error("{identity} belongs to cluster {:?}, expected {expected:?}", .identity.cluster)]
    WrongCluster {
        identity: Identity,
        expected: String,
    },
    #[error("{identity} is not a controller; servers must present a controller certificate")]
    NotController { identity: Identity },
}

/// The identity in a peer's DER certificate, required to belong to `cluster`.
pub fn peer_identity_from_der(cert_der: &[u8], cluster: &str) -> Result<Identity, TlsError> {
    Ok(check_peer(cert_der, cluster)?)
}

fn check_peer(cert_der: &[u8], cluster: &str) -> Result<Identity, PeerError> {
    let identity = pki::cert_identity(cert_der)?;
    if identity.cluster != cluster {
        return Err(PeerError::WrongCluster {
            identity,
            expected: cluster.to_string(),
        });
    }
    Ok(identity)
}

// ------------------------------------------------------------------ configs

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

struct Loaded {
    roots: Arc<RootCertStore>,
    certs: Vec<CertificateDer<'static>>,
    key: rustls_pki_types::PrivateKeyDer<'static>,
    own: Identity,
    serial: String,
    /// Seconds since the epoch: own certificate's notAfter, earliest CA notAfter.
    cert_not_after: i64,
    ca_not_after: i64,
    cas: usize,
}

fn not_after(path: &Path, der: &[u8]) -> Result<i64, TlsError> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c.validity().not_after.timestamp())
        .map_err(|e| TlsError::BadFile {
            path: path.to_path_buf(),
            reason: format!("unparsable certificate: {e}"),
        })
}

fn load(files: &TlsFiles) -> Result<Loaded, TlsError> {
    let mut roots = RootCertStore::empty();
    let mut ca_not_after = i64::MAX;
    let cas = pki::load_certs(&files.ca)?;
    let ca_count = cas.len();
    for ca in cas {
        ca_not_after = ca_not_after.min(not_after(&files.ca, &ca)?);
        roots.add(ca).map_err(|e| TlsError::BadFile {
            path: files.ca.clone(),
            reason: format!("unusable CA certificate: {e}"),
        })?;
    }
    let certs = pki::load_certs(&files.cert)?;
    let key = pki::load_key(&files.key)?;
    let own = pki::cert_identity(&certs[0]).map_err(|e| TlsError::BadFile {
        path: files.cert.clone(),
        reason: format!("own certificate: {e}"),
    })?;
    let serial = pki::cert_serial(&certs[0]).map_err(|e| TlsError::BadFile {
        path: files.cert.clone(),
        reason: format!("own certificate: {e}"),
    })?;
    let cert_not_after = not_after(&files.cert, &certs[0])?;
    // Checked here, before any config is built, so that a key and certificate from
    // different generations (a reload between the renames of a renewal) are named
    // as such.
    rustls::sign::CertifiedKey::from_der(certs.clone(), key.clone_key(), &provider()).map_err(
        |e| TlsError::KeyMismatch {
            key: files.key.clone(),
            cert: files.cert.clone(),
            reason: e.to_string(),
        },
    )?;
    Ok(Loaded {
        roots: Arc::new(roots),
        certs,
        key,
        own,
        serial,
        cert_not_after,
        ca_not_after,
        cas: ca_count,
    })
}

fn config_err(e: impl fmt::Display) -> TlsError {
    TlsError::Config(e.to_string())
}

/// Server side: TLS 1.3 only, client certificate required, chained to the CA and
/// naming the server's own cluster; ALPN h2.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    build_server(files, load(files)?, None)
}

fn build_server(
    files: &TlsFiles,
    loaded: Loaded,
    revoked: Option<Revocations>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let webpki = WebPkiClientVerifier::builder_with_provider(loaded.roots, provider.clone())
        .build()
        .map_err(config_err)?;
    let verifier = Arc::new(ClusterClientVerifier {
        inner: webpki,
        cluster: loaded.own.cluster,
        revoked,
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(loaded.certs, loaded.key)
        .map_err(|e| TlsError::BadFile {
            path: files.key.clone(),
            reason: format!("does not go with {}: {e}", files.cert.display()),
        })?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No session resumption: a resumed session skips certificate verification, so
    // every connection does a full handshake against the current CA bundle, clock
    // and deny-list. Connections are long-lived, so this costs next to nothing.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Client side: TLS 1.3 only, presents the own certificate, accepts only a server
/// certificate chained to the CA, valid for the dialled host/IP, naming a controller
/// of the client's own cluster; ALPN h2.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    build_client(files, load(files)?)
}

/// Set the [`CERT_EXPIRY_METRIC`] gauges from the files, for a process that
/// does not reload them (the agent): call it now and then, e.g. every minute.
pub fn record_expiry_of(files: &TlsFiles) -> Result<(), TlsError> {
    let loaded = load(files)?;
    for (file, t) in [
        (&files.cert, loaded.cert_not_after),
        (&files.ca, loaded.ca_not_after),
    ] {
        metrics::gauge!(CERT_EXPIRY_METRIC, "file" => file.display().to_string())
            .set(seconds_until(t));
    }
    Ok(())
}

fn build_client(files: &TlsFiles, loaded: Loaded) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let webpki = WebPkiServerVerifier::builder_with_provider(loaded.roots, provider.clone())
        .build()
        .map_err(config_err)?;
    let verifier = Arc::new(ControllerServerVerifier {
        inner: webpki,
        cluster: loaded.own.cluster,
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(loaded.certs, loaded.key)
        .map_err(|e| TlsError::BadFile {
            path: files.key.clone(),
            reason: format!("does not go with {}: {e}", files.cert.display()),
        })?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

// Identity errors travel through rustls as `CertificateError::Other` so that the peer
// gets a bad_certificate alert, and the server can still tell the reason apart.
fn reject(e: PeerError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

#[derive(Debug)]
struct ClusterClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    cluster: String,
    revoked: Option<Revocations>,
}

impl ClientCertVerifier for ClusterClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_peer(end_entity, &self.cluster).map_err(reject)?;
        if let Some(revoked) = &self.revoked {
            if let Ok(serial) = pki::cert_serial(end_entity) {
                if revoked.contains(&serial) {
                    let identity = pki::cert_identity(end_entity)
                        .map_or_else(|e| e.to_string(), |i| i.to_uri());
                    tracing::warn!(%identity, %serial, reason = "revoked", "refused a revoked client certificate");
                    // The client gets a certificate_revoked alert.
                    return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
                }
            }
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct ControllerServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    cluster: String,
}

impl ServerCertVerifier for ControllerServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let identity = check_peer(end_entity, &self.cluster).map_err(reject)?;
        if identity.role != Role::Controller {
            return Err(reject(PeerError::NotController { identity }));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

// ------------------------------------------------------------------ server side

/// What tonic hands to handlers as connect info; read it with [`peer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    pub identity: Identity,
    /// Serial of the peer's certificate, as [`pki::cert_serial`] writes it.
    pub serial: String,
}

/// The authenticated caller of a request served over [`serve_incoming`].
pub fn peer<T>(req: &tonic::Request<T>) -> Option<&PeerInfo> {
    req.extensions().get::<Arc<PeerInfo>>().map(|p| &**p)
}

/// An accepted, handshaken and identified connection.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    /// Shared: tonic copies it into every request (heartbeats: 10/s per agent).
    info: Arc<PeerInfo>,
    _open: Open,
}

/// Counts an authenticated connection in [`CONNECTIONS_METRIC`] while it lives.
struct Open(&'static str);

impl Open {
    fn new(role: &'static str) -> Self {
        metrics::gauge!(CONNECTIONS_METRIC, "role" => role).increment(1.0);
        Open(role)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        metrics::gauge!(CONNECTIONS_METRIC, "role" => self.0).decrement(1.0);
    }
}

impl TlsConn {
    pub fn peer_info(&self) -> &PeerInfo {
        &self.info
    }

    pub fn get_ref(&self) -> &tokio_rustls::server::TlsStream<TcpStream> {
        &self.inner
    }
}

impl fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConn").field("peer", &self.info).finish()
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = Arc<PeerInfo>;

    fn connect_info(&self) -> Arc<PeerInfo> {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Why an incoming connection was dropped; `as_str` is the metric's `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureReason {
    /// No completed handshake within the handshake timeout.
    Timeout,
    /// The first bytes are not a TLS record.
    NotTls,
    /// Plaintext HTTP (h2c or HTTP/1): a client configured without TLS.
    PlaintextHttp,
    NoClientCert,
    UnknownCa,
    Expired,
    NotYetValid,
    /// Chain-level problem other than the above (wrong key usage, bad signature...).
    BadCertificate,
    /// Chains to the CA but carries no valid `vipshare://` identity.
    NoIdentity,
    WrongCluster,
    /// The client refused our certificate (sent an alert).
    ClientRejected,
    /// TLS protocol mismatch: version, ALPN, malformed handshake...
    Protocol,
    /// The connection failed or closed mid-handshake.
    Io,
    /// Evicted while handshaking to make room for a newer connection (its source
    /// held too many pending handshakes, or all slots were taken and its source
    /// held the most).
    Overloaded,
    /// The certificate's serial is on the deny-list.
    Revoked,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Timeout => "timeout",
            FailureReason::NotTls => "not_tls",
            FailureReason::PlaintextHttp => "plaintext_http",
            FailureReason::NoClientCert => "no_client_cert",
            FailureReason::UnknownCa => "unknown_ca",
            FailureReason::Expired => "expired",
            FailureReason::NotYetValid => "not_yet_valid",
            FailureReason::BadCertificate => "bad_certificate",
            FailureReason::NoIdentity => "no_identity",
            FailureReason::WrongCluster => "wrong_cluster",
            FailureReason::ClientRejected => "client_rejected",
            FailureReason::Protocol => "protocol",
            FailureReason::Io => "io",
            FailureReason::Overloaded => "overloaded",
            FailureReason::Revoked => "revoked",
        }
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One rejected incoming connection, as logged and counted.
#[derive(Debug, Clone)]
pub struct HandshakeFailure {
    pub peer: SocketAddr,
    pub reason: FailureReason,
    pub detail: String,
}

/// Tuning and observation hooks for [`serve_incoming_with`].
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub handshake_timeout: Duration,
    pub max_pending_handshakes: usize,
    pub max_pending_per_source: usize,
    /// Also send every failure here (tests, diagnostics); logging and the metric
    /// happen regardless.
    pub failures: Option<mpsc::UnboundedSender<HandshakeFailure>>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_pending_handshakes: DEFAULT_MAX_PENDING_HANDSHAKES,
            max_pending_per_source: DEFAULT_MAX_PENDING_PER_SOURCE,
            failures: None,
        }
    }
}

/// Accepted connections for `tonic::transport::Server::serve_with_incoming[_shutdown]`.
/// Dropping it (tonic does on shutdown) stops accepting and closes the listener.
pub struct TlsIncoming {
    rx: mpsc::Receiver<TlsConn>,
}

impl Stream for TlsIncoming {
    type Item = Result<TlsConn, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|c| c.map(Ok))
    }
}

/// Accept TLS connections on `listener` with default [`ServeOptions`]. Only peers
/// whose certificate chains to the CA and names `cluster` are ever yielded.
/// `config` is a fixed `Arc<ServerConfig>` or a [`ServerTls`] handle (from a
/// [`TlsReloader`]), read anew for every connection.
/// Must be called inside a tokio runtime (it spawns the accept loop).
pub fn serve_incoming(
    listener: TcpListener,
    config: impl Into<ServerTls>,
    cluster: String,
) -> TlsIncoming {
    serve_incoming_with(listener, config, cluster, ServeOptions::default())
}

/// [`serve_incoming`] with explicit options. Must be called inside a tokio runtime.
/// Every connection is handshaken in its own task under a timeout, so a slow or
/// hostile client delays nobody; pending handshakes are admitted fairly by source
/// (`admission`), so idle connections cannot lock peers out; failures are counted,
/// logged at a bounded rate and never yielded.
pub fn serve_incoming_with(
    listener: TcpListener,
    config: impl Into<ServerTls>,
    cluster: String,
    options: ServeOptions,
) -> TlsIncoming {
    let (tx, rx) = mpsc::channel(64);
    let ctx = Arc::new(AcceptCtx {
        server: config.into(),
        cluster,
        timeout: options.handshake_timeout,
        failures: options.failures,
        log: RefusalLog::new(),
    });
    let admission = Admission::new(
        options.max_pending_handshakes,
        options.max_pending_per_source,
    );
    tokio::spawn(accept_loop(listener, tx, ctx, admission));
    TlsIncoming { rx }
}

struct AcceptCtx {
    server: ServerTls,
    cluster: String,
    timeout: Duration,
    failures: Option<mpsc::UnboundedSender<HandshakeFailure>>,
    log: RefusalLog,
}

impl AcceptCtx {
    fn report(&self, peer: SocketAddr, reason: FailureReason, detail: String) {
        self.log.record(peer, reason.as_str(), &detail);
        metrics::counter!(HANDSHAKE_FAILURES_METRIC, "reason" => reason.as_str()).increment(1);
        if let Some(tx) = &self.failures {
            let _ = tx.send(HandshakeFailure {
                peer,
                reason,
                detail,
            });
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    tx: mpsc::Sender<TlsConn>,
    ctx: Arc<AcceptCtx>,
    admission: Arc<Admission>,
) {
    let mut summaries = tokio::time::interval(refusals::WINDOW);
    summaries.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let accepted = tokio::select! {
            _ = tx.closed() => return,
            _ = summaries.tick() => {
                ctx.log.tick();
                metrics::gauge!(PENDING_HANDSHAKES_METRIC).set(admission.pending() as f64);
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        let (tcp, addr) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Typically EMFILE/ENFILE: back off instead of spinning on the error.
                tracing::warn!(error = %e, "accept failed");
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let (mut ticket, eviction) = admission.admit(addr.ip());
        metrics::gauge!(PENDING_HANDSHAKES_METRIC).set(admission.pending() as f64);
        if let Some(eviction) = eviction {
            tracing::debug!(%addr, ?eviction, "a pending handshake was evicted to admit this one");
        }
        let ctx = ctx.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let result = tokio::select! {
                r = tokio::time::timeout(ctx.timeout, handshake(tcp, addr, &ctx)) => r,
                _ = &mut ticket.evicted => Ok(Err((
                    FailureReason::Overloaded,
                    "evicted while handshaking: newer connections needed the slot \
                     (this source, or the busiest one, held too many pending handshakes)"
                        .into(),
                ))),
            };
            match result {
                Ok(Ok(conn)) => {
                    // Only a connection that still holds its slot goes on; the slot
                    // itself is freed either way (authenticated peers hold none).
                    if ticket.complete() {
                        // A send error only means the server is shutting down.
                        drop(tx.send(conn).await);
                    } else {
                        ctx.report(
                            addr,
                            FailureReason::Overloaded,
                            "evicted as the handshake completed".into(),
                        );
                    }
                }
                Ok(Err((reason, detail))) => ctx.report(addr, reason, detail),
                Err(_) => ctx.report(
                    addr,
                    FailureReason::Timeout,
                    format!("no TLS handshake within {:?}", ctx.timeout),
                ),
            }
        });
    }
}

type Rejection = (FailureReason, String);

async fn handshake(
    mut tcp: TcpStream,
    addr: SocketAddr,
    ctx: &AcceptCtx,
) -> Result<TlsConn, Rejection> {
    let _ = tcp.set_nodelay(true);
    sniff(&mut tcp).await?;
    // The configuration current at accept time serves this connection for its life.
    let acceptor = tokio_rustls::TlsAcceptor::from(ctx.server.current());
    let tls = acceptor.accept(tcp).await.map_err(classify_io)?;
    let (_, conn) = tls.get_ref();
    let Some(cert) = conn.peer_certificates().and_then(|c| c.first()) else {
        return Err((FailureReason::NoClientCert, "no client certificate".into()));
    };
    // The verifier checked the cluster of the server's own certificate; check the one
    // this listener serves too (they should agree) and keep the identity for handlers.
    let identity = check_peer(cert, &ctx.cluster).map_err(|e| (peer_reason(&e), e.to_string()))?;
    let serial =
        pki::cert_serial(cert).map_err(|e| (FailureReason::BadCertificate, e.to_string()))?;
    // The verifier refuses revoked certificates already; this covers a deny-list that
    // changed during the handshake.
    if ctx.server.is_revoked(&serial) {
        return Err((
            FailureReason::Revoked,
            format!("{identity} presented revoked certificate serial {serial}"),
        ));
    }
    tracing::info!(%addr, identity = %identity, %serial, "TLS peer connected");
    Ok(TlsConn {
        inner: tls,
        _open: Open::new(identity.role.as_str()),
        info: Arc::new(PeerInfo {
            addr,
            identity,
            serial,
        }),
    })
}

/// Reject non-TLS clients with a useful reason before rustls reports a bare
/// "invalid content type".
async fn sniff(tcp: &mut TcpStream) -> Result<(), Rejection> {
    const TLS_HANDSHAKE_RECORD: u8 = 0x16;
    const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";
    let mut first = [0u8; 1];
    let n = tcp
        .peek(&mut first)
        .await
        .map_err(|e| (FailureReason::Io, e.to_string()))?;
    if n == 0 {
        return Err((FailureReason::Io, "closed before sending anything".into()));
    }
    if first[0] == TLS_HANDSHAKE_RECORD {
        return Ok(());
    }
    // Not TLS, so consuming bytes is harmless: the connection is dropped anyway.
    let mut buf = [0u8; 16];
    let n = match tcp.read(&mut buf).await {
        Ok(n) if n > 0 => n,
        _ => {
            buf[0] = first[0];
            1
        }
    };
    let head = &buf[..n];
    let prefix = &head[..n.min(H2_PREFACE.len())];
    if H2_PREFACE.starts_with(prefix) {
        return Err((
            FailureReason::PlaintextHttp,
            "plaintext HTTP/2 (client not configured for TLS?)".into(),
        ));
    }
    let method_len = head.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if method_len >= 3 && head.get(method_len) == Some(&b' ') {
        return Err((
            FailureReason::PlaintextHttp,
            "plaintext HTTP/1 (client not configured for TLS?)".into(),
        ));
    }
    let hex: Vec<String> = head.iter().map(|b| format!("{b:02x}")).collect();
    Err((
        FailureReason::NotTls,
        format!("not a TLS handshake (first bytes {})", hex.join(" ")),
    ))
}

fn peer_reason(e: &PeerError) -> FailureReason {
    match e {
        PeerError::Identity(_) => FailureReason::NoIdentity,
        PeerError::WrongCluster { .. } => FailureReason::WrongCluster,
        PeerError::NotController { .. } => FailureReason::BadCertificate,
    }
}

fn classify_io(e: io::Error) -> Rejection {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return (FailureReason::Io, e.to_string());
    };
    let reason = match tls {
        rustls::Error::NoCertificatesPresented => FailureReason::NoClientCert,
        rustls::Error::InvalidCertificate(ce) => match ce {
            CertificateError::UnknownIssuer => FailureReason::UnknownCa,
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                FailureReason::Expired
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                FailureReason::NotYetValid
            }
            CertificateError::Revoked => FailureReason::Revoked,
            CertificateError::Other(OtherError(inner)) => {
                let reason = inner
                    .downcast_ref::<PeerError>()
                    .map_or(FailureReason::BadCertificate, peer_reason);
                return (reason, inner.to_string());
            }
            _ => FailureReason::BadCertificate,
        },
        rustls::Error::AlertReceived(_) => FailureReason::ClientRejected,
        _ => FailureReason::Protocol,
    };
    (reason, tls.to_string())
}

// ------------------------------------------------------------------ client side

#[derive(Clone)]
struct Target {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
}

/// Parse `https://HOST:PORT` into a tonic endpoint plus what the connector dials.
fn endpoint(uri: &str) -> Result<(Endpoint, Target), TlsError> {
    let bad = |reason: &str| TlsError::BadUri {
        uri: uri.to_string(),
        reason: reason.to_string(),
    };
    let parsed: Uri = uri
        .parse()
        .map_err(|e: tonic::codegen::http::uri::InvalidUri| bad(&e.to_string()))?;
    if parsed.scheme_str() != Some("https") {
        return Err(bad(
            "scheme must be https (every vipshare connection is TLS)",
        ));
    }
    let authority = parsed.authority().ok_or_else(|| bad("no host"))?.clone();
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = authority.port_u16().unwrap_or(443);
    // IP literals become IP server names, verified against IP SANs.
    let server_name =
        ServerName::try_from(host.clone()).map_err(|e| bad(&format!("bad host: {e}")))?;
    // tonic is handed an http:// URI because TLS is done by our connector; were tonic
    // built with its own TLS it would otherwise demand its TLS config for https. The
    // origin keeps requests' :scheme and :authority truthful.
    let endpoint = Endpoint::from_shared(format!("http://{authority}"))
        .map_err(|e| bad(&e.to_string()))?
        .origin(parsed)
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    Ok((
        endpoint,
        Target {
            host,
            port,
            server_name,
        },
    ))
}

type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Dials TCP and runs the rustls handshake; tonic drives it as its connector.
/// The client configuration is read per connection, so reconnects after a reload
/// present the new certificate.
#[derive(Clone)]
struct Connector {
    tls: ClientTls,
    target: Arc<Target>,
    /// Source address to connect from (`None`: the system's choice).
    local: Option<std::net::IpAddr>,
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<ClientStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let tls = tokio_rustls::TlsConnector::from(self.tls.current());
        let target = self.target.clone();
        let local = self.local;
        Box::pin(async move {
            let tcp = match local {
                None => TcpStream::connect((target.host.as_str(), target.port)).await?,
                Some(ip) => {
                    let remote = tokio::net::lookup_host((target.host.as_str(), target.port))
                        .await?
                        .next()
                        .ok_or_else(|| io::Error::other("no address"))?;
                    let socket = match remote {
                        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
                    };
                    socket.bind(SocketAddr::new(ip, 0))?;
                    socket.connect(remote).await?
                }
            };
            tcp.set_nodelay(true)?;
            let stream = tls.connect(target.server_name.clone(), tcp).await?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// A lazily connecting channel to `https://HOST:PORT` (reconnects as needed).
/// `tls` is a fixed `Arc<ClientConfig>` or a [`ClientTls`] handle whose current
/// configuration every new connection uses.
pub fn channel(uri: &str, tls: impl Into<ClientTls>) -> Result<Channel, TlsError> {
    channel_from(uri, tls, None)
}

/// [`channel`] from source address `local` (a load generator standing for
/// many hosts on one machine: each its own address, as the controllers'
/// per-source handshake limits expect).
pub fn channel_from(
    uri: &str,
    tls: impl Into<ClientTls>,
    local: Option<std::net::IpAddr>,
) -> Result<Channel, TlsError> {
    let (endpoint, target) = endpoint(uri)?;
    Ok(endpoint.connect_with_connector_lazy(Connector {
        tls: tls.into(),
        target: Arc::new(target),
        local,
    }))
}

/// Connect now, so that a CLI can report an unreachable or untrusted server at once.
pub async fn connect_once(uri: &str, tls: impl Into<ClientTls>) -> Result<Channel, TlsError> {
    let (endpoint, target) = endpoint(uri)?;
    endpoint
        .connect_with_connector(Connector {
            tls: tls.into(),
            target: Arc::new(target),
            local: None,
        })
        .await
        .map_err(|e| TlsError::Connect {
            uri: uri.to_string(),
            reason: error_chain(&e),
        })
}

/// "a: b: c" from an error and its sources, skipping repeats (tonic nests a lot).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let chain: Vec<&(dyn std::error::Error + 'static)> =
        std::iter::successors(Some(e), |err| err.source()).collect();
    // rustls prints `Other` certificate errors (our identity checks) with Debug;
    // substitute a readable text wherever it shows up.
    let readable = chain.iter().find_map(|err| {
        // io::Error displays, but does not yield as a source, the error it wraps.
        let tls = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<io::Error>()
                .and_then(|e| e.get_ref())
                .and_then(|e| e.downcast_ref::<rustls::Error>())
        })?;
        match tls {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
                Some((
                    tls.to_string(),
                    format!("peer certificate rejected: {inner}"),
                ))
            }
            _ => None,
        }
    });
    let mut parts: Vec<String> = Vec::new();
    for err in chain {
        let mut s = err.to_string();
        if let Some((raw, nice)) = &readable {
            s = s.replace(raw.as_str(), nice);
        }
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}

// ------------------------------------------------------------------ reloading

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// A deny-list of certificate serials (canonical form of [`pki::cert_serial`]),
/// shared between whoever maintains it (a controller mirrors the replicated list)
/// and the servers that consult it on every handshake.
#[derive(Debug, Clone, Default)]
pub struct Revocations(Arc<RwLock<BTreeSet<String>>>);

impl Revocations {
    pub fn contains(&self, serial: &str) -> bool {
        read(&self.0).contains(serial)
    }

    /// Replace the whole list; true if it changed.
    pub fn replace(&self, serials: &BTreeSet<String>) -> bool {
        // Called on every applied entry: compare under the shared lock first, so
        // handshakes are not held up by a write lock that changes nothing.
        if *read(&self.0) == *serials {
            return false;
        }
        let mut cur = write(&self.0);
        if *cur == *serials {
            return false;
        }
        cur.clone_from(serials);
        true
    }

    pub fn snapshot(&self) -> BTreeSet<String> {
        read(&self.0).clone()
    }
}

/// The server configuration used for new connections; swappable. Cheap to clone
/// (all clones see the same configuration). Made from a fixed `Arc<ServerConfig>`,
/// or by [`TlsReloader::server`].
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<RwLock<Arc<ServerConfig>>>,
    revoked: Option<Revocations>,
}

impl ServerTls {
    pub fn new(config: Arc<ServerConfig>) -> Self {
        ServerTls {
            config: Arc::new(RwLock::new(config)),
            revoked: None,
        }
    }

    /// The configuration a connection accepted now would use.
    pub fn current(&self) -> Arc<ServerConfig> {
        read(&self.config).clone()
    }

    /// New connections use `config` from now on; established ones are untouched.
    pub fn replace(&self, config: Arc<ServerConfig>) {
        *write(&self.config) = config;
    }

    fn is_revoked(&self, serial: &str) -> bool {
        self.revoked.as_ref().is_some_and(|r| r.contains(serial))
    }
}

impl From<Arc<ServerConfig>> for ServerTls {
    fn from(config: Arc<ServerConfig>) -> Self {
        ServerTls::new(config)
    }
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

/// The client configuration used for new connections; swappable. Cheap to clone.
/// Made from a fixed `Arc<ClientConfig>`, or by [`TlsReloader::client`].
#[derive(Clone)]
pub struct ClientTls {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    config: RwLock<Arc<ClientConfig>>,
    generation: AtomicU64,
}

impl ClientTls {
    pub fn new(config: Arc<ClientConfig>) -> Self {
        ClientTls {
            inner: Arc::new(ClientInner {
                config: RwLock::new(config),
                generation: AtomicU64::new(0),
            }),
        }
    }

    /// The configuration a connection made now would use.
    pub fn current(&self) -> Arc<ClientConfig> {
        read(&self.inner.config).clone()
    }

    /// New connections use `config` from now on; established ones are untouched.
    pub fn replace(&self, config: Arc<ClientConfig>) {
        *write(&self.inner.config) = config;
        self.inner.generation.fetch_add(1, Ordering::Release);
    }

    /// Increases on every [`ClientTls::replace`]. A long-lived client that wants to
    /// move its established connections to the new certificate compares it with the
    /// value it built its channel at, and builds a new channel when it differs.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }
}

impl From<Arc<ClientConfig>> for ClientTls {
    fn from(config: Arc<ClientConfig>) -> Self {
        ClientTls::new(config)
    }
}

impl From<&ClientTls> for ClientTls {
    fn from(tls: &ClientTls) -> Self {
        tls.clone()
    }
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

/// The certificate now in use, as reported by [`TlsReloader::reload`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInUse {
    pub identity: Identity,
    /// Serial of the own certificate ([`pki::cert_serial`] form).
    pub serial: String,
    /// Own certificate's notAfter, seconds since the Unix epoch.
    pub cert_not_after: i64,
    /// Earliest notAfter among the trusted CAs, seconds since the Unix epoch.
    pub ca_not_after: i64,
    /// How many CA certificates the bundle holds (2 during a CA rotation).
    pub cas: usize,
}

/// Change detector for the three files: identity of the inode plus modification
/// and status-change times (a `chmod 600` of a refused key counts as a change).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Stamp(Vec<Option<FileStamp>>);

/// Device, inode, size, mtime (s, ns), ctime (s, ns).
type FileStamp = (u64, u64, u64, i64, i64, i64, i64);

impl Stamp {
    fn of(files: &TlsFiles) -> Stamp {
        Stamp(
            [&files.ca, &files.cert, &files.key]
                .into_iter()
                .map(|p| {
                    let m = std::fs::metadata(p).ok()?;
                    #[cfg(unix)]
                    {
                        use std::os::unix::fs::MetadataExt;
                        Some((
                            m.dev(),
                            m.ino(),
                            m.size(),
                            m.mtime(),
                            m.mtime_nsec(),
                            m.ctime(),
                            m.ctime_nsec(),
                        ))
                    }
                    #[cfg(not(unix))]
                    {
                        let t = m
                            .modified()
                            .ok()
                            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                            .unwrap_or_default();
                        Some((0, 0, m.len(), t.as_secs() as i64, 0, 0, 0))
                    }
                })
                .collect(),
        )
    }
}

struct ReloadState {
    seen: Stamp,
    in_use: TlsInUse,
}

/// A process's TLS files (CA bundle, own certificate, own key) and the server and
/// client configurations built from them, reloadable without a restart.
///
/// ```ignore
/// let tls = Arc::new(TlsReloader::new(files)?);         // fails like server_config
/// let incoming = serve_incoming(listener, tls.server(), cluster); // servers
/// let channel = tls::channel(&uri, tls.client())?;       // clients
/// tls.clone().spawn_watcher(DEFAULT_RELOAD_POLL, shutdown); // SIGHUP + polling
/// ```
///
/// [`reload`](Self::reload) re-reads all three files and swaps both configurations;
/// on any error (unreadable or malformed file, key readable by others, key not
/// matching the certificate, another identity) it keeps the configurations in use,
/// logs the error naming the file and returns it. New connections use the new
/// files; established connections continue as they are.
pub struct TlsReloader {
    files: TlsFiles,
    identity: Identity,
    server: ServerTls,
    client: ClientTls,
    revoked: Revocations,
    state: Mutex<ReloadState>,
}

impl fmt::Debug for TlsReloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsReloader")
            .field("files", &self.files)
            .field("identity", &self.identity.to_uri())
            .finish_non_exhaustive()
    }
}

/// How often a reload retries a key that does not match the certificate, and how
/// long it waits in between: a renewal replaces the two files one after the other.
const MISMATCH_RETRIES: u32 = 5;
const MISMATCH_PAUSE: Duration = Duration::from_millis(100);
/// After the poller sees a change, how long the files must stay unchanged before
/// they are read (lets a copy of several files finish).
const SETTLE: Duration = Duration::from_millis(300);

impl TlsReloader {
    /// Load the files and build both configurations; fails (naming the file) like
    /// [`server_config`] and [`client_config`].
    pub fn new(files: TlsFiles) -> Result<Self, TlsError> {
        let seen = Stamp::of(&files);
        let loaded = load(&files)?;
        let revoked = Revocations::default();
        let in_use = in_use(&loaded);
        let client = build_client(&files, clone_loaded(&loaded))?;
        let server = build_server(&files, loaded, Some(revoked.clone()))?;
        let reloader = TlsReloader {
            identity: in_use.identity.clone(),
            server: ServerTls {
                config: Arc::new(RwLock::new(server)),
                revoked: Some(revoked.clone()),
            },
            client: ClientTls::new(client),
            revoked,
            state: Mutex::new(ReloadState { seen, in_use }),
            files,
        };
        reloader.record_expiry();
        Ok(reloader)
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The identity of the own certificate; fixed for the life of the reloader.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Facts of the certificate in use.
    pub fn in_use(&self) -> TlsInUse {
        self.lock().in_use.clone()
    }

    /// Handle for [`serve_incoming`]: follows reloads, refuses revoked serials.
    pub fn server(&self) -> ServerTls {
        self.server.clone()
    }

    /// Handle for [`channel`] and [`connect_once`]: follows reloads.
    pub fn client(&self) -> ClientTls {
        self.client.clone()
    }

    /// The deny-list the server handle consults; empty until someone fills it.
    pub fn revocations(&self) -> Revocations {
        self.revoked.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReloadState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Re-read every file now and, if all is well, use them for new connections.
    /// Logs the outcome, counts it, and updates the expiry gauges. Blocking: reads
    /// files and, if the key does not match the certificate (a renewal half-way
    /// through), retries for up to half a second. Call it from a blocking context or
    /// accept the short stall.
    pub fn reload(&self) -> Result<TlsInUse, TlsError> {
        let mut state = self.lock();
        let mut attempt = 0;
        let result = loop {
            state.seen = Stamp::of(&self.files);
            match self.try_load() {
                Err(TlsError::KeyMismatch { .. }) if attempt < MISMATCH_RETRIES => {
                    attempt += 1;
                    std::thread::sleep(MISMATCH_PAUSE);
                }
                other => break other,
            }
        };
        match result {
            Ok((server, client, in_use)) => {
                self.server.replace(server);
                self.client.replace(client);
                let previous = std::mem::replace(&mut state.in_use, in_use.clone());
                drop(state);
                metrics::counter!(RELOADS_METRIC, "result" => "ok").increment(1);
                self.record_expiry();
                tracing::info!(
                    cert = %self.files.cert.display(),
                    identity = %in_use.identity,
                    serial = %in_use.serial,
                    previous_serial = %previous.serial,
                    cas = in_use.cas,
                    expires_in_days = (seconds_until(in_use.cert_not_after) / 86_400.0).floor(),
                    "TLS files reloaded; new connections use them"
                );
                Ok(in_use)
            }
            Err(e) => {
                drop(state);
                metrics::counter!(RELOADS_METRIC, "result" => "failed").increment(1);
                tracing::error!(error = %e, "TLS reload failed; keeping the certificates in use");
                Err(e)
            }
        }
    }

    /// [`reload`](Self::reload) if any of the files changed (inode, size, mtime or
    /// ctime) since the last load attempt; `None` if nothing changed.
    pub fn reload_if_changed(&self) -> Option<Result<TlsInUse, TlsError>> {
        if self.changed() {
            Some(self.reload())
        } else {
            None
        }
    }

    fn changed(&self) -> bool {
        self.lock().seen != Stamp::of(&self.files)
    }

    fn try_load(&self) -> Result<(Arc<ServerConfig>, Arc<ClientConfig>, TlsInUse), TlsError> {
        let loaded = load(&self.files)?;
        if loaded.own != self.identity {
            return Err(TlsError::BadFile {
                path: self.files.cert.clone(),
                reason: format!(
                    "identity changed from {} to {}; a running daemon keeps its identity (restart it to change)",
                    self.identity, loaded.own
                ),
            });
        }
        let in_use = in_use(&loaded);
        let client = build_client(&self.files, clone_loaded(&loaded))?;
        let server = build_server(&self.files, loaded, Some(self.revoked.clone()))?;
        Ok((server, client, in_use))
    }

    /// Set the [`CERT_EXPIRY_METRIC`] gauges from the certificates in use.
    pub fn record_expiry(&self) {
        let in_use = self.in_use();
        for (file, t) in [
            (&self.files.cert, in_use.cert_not_after),
            (&self.files.ca, in_use.ca_not_after),
        ] {
            metrics::gauge!(CERT_EXPIRY_METRIC, "file" => file.display().to_string())
                .set(seconds_until(t));
        }
    }

    /// Reload on SIGHUP and whenever the files change (looked at every `poll`),
    /// until `shutdown` completes. Registers the SIGHUP handler before returning, so
    /// from then on SIGHUP no longer terminates the process. Must be called inside a
    /// tokio runtime.
    pub fn spawn_watcher(
        self: Arc<Self>,
        poll: Duration,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        #[cfg(unix)]
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler; TLS files reload only when they change");
                None
            }
        };
        tokio::spawn(async move {
            tokio::pin!(shutdown);
            let mut tick = tokio::time::interval(poll.max(Duration::from_millis(10)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                #[cfg(unix)]
                let hangup = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                };
                #[cfg(not(unix))]
                let hangup = std::future::pending::<Option<()>>();
                let reason = tokio::select! {
                    () = &mut shutdown => return,
                    got = hangup => {
                        if got.is_none() {
                            #[cfg(unix)]
                            { hup = None; }
                            continue;
                        }
                        "SIGHUP"
                    }
                    _ = tick.tick() => {
                        self.record_expiry();
                        if !self.changed() {
                            continue;
                        }
                        // Let a copy or renewal of several files finish.
                        let mut last = Stamp::of(&self.files);
                        loop {
                            tokio::time::sleep(SETTLE).await;
                            let now = Stamp::of(&self.files);
                            if now == last {
                                break;
                            }
                            last = now;
                        }
                        "files changed"
                    }
                };
                tracing::info!(trigger = reason, "reloading TLS files");
                let me = self.clone();
                // Errors are logged by reload itself.
                let _ = tokio::task::spawn_blocking(move || me.reload()).await;
            }
        })
    }
}

fn clone_loaded(l: &Loaded) -> Loaded {
    Loaded {
        roots: l.roots.clone(),
        certs: l.certs.clone(),
        key: l.key.clone_key(),
        own: l.own.clone(),
        serial: l.serial.clone(),
        cert_not_after: l.cert_not_after,
        ca_not_after: l.ca_not_after,
        cas: l.cas,
    }
}

fn in_use(l: &Loaded) -> TlsInUse {
    TlsInUse {
        identity: l.own.clone(),
        serial: l.serial.clone(),
        cert_not_after: l.cert_not_after,
        ca_not_after: l.ca_not_after,
        cas: l.cas,
    }
}

fn seconds_until(not_after: i64) -> f64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    (not_after - now) as f64
}

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

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

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
use tokio::sync::{mpsc, Semaphore};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::pki::{self, CertIdentityError, Identity, PkiError, Role};

/// ALPN protocol id of HTTP/2, the only protocol spoken.
const ALPN_H2: &[u8] = b"h2";
/// How long a client may take from TCP accept to a completed handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes in flight at once; more connections are dropped rather than queued.
pub const DEFAULT_MAX_PENDING_HANDSHAKES: usize = 1024;
/// Client TCP + TLS connect timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Metric counting rejected incoming connections, labelled by `reason`.
pub const HANDSHAKE_FAILURES_METRIC: &str = "vipshare_tls_handshake_failures_total";

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
}

fn load(files: &TlsFiles) -> Result<Loaded, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in pki::load_certs(&files.ca)? {
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
    Ok(Loaded {
        roots: Arc::new(roots),
        certs,
        key,
        own,
    })
}

fn config_err(e: impl fmt::Display) -> TlsError {
    TlsError::Config(e.to_string())
}

/// Server side: TLS 1.3 only, client certificate required, chained to the CA and
/// naming the server's own cluster; ALPN h2.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let loaded = load(files)?;
    let provider = provider();
    let webpki = WebPkiClientVerifier::builder_with_provider(loaded.roots, provider.clone())
        .build()
        .map_err(config_err)?;
    let verifier = Arc::new(ClusterClientVerifier {
        inner: webpki,
        cluster: loaded.own.cluster,
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
    Ok(Arc::new(config))
}

/// Client side: TLS 1.3 only, presents the own certificate, accepts only a server
/// certificate chained to the CA, valid for the dialled host/IP, naming a controller
/// of the client's own cluster; ALPN h2.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let loaded = load(files)?;
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
}

/// The authenticated caller of a request served over [`serve_incoming`].
pub fn peer<T>(req: &tonic::Request<T>) -> Option<&PeerInfo> {
    req.extensions().get::<PeerInfo>()
}

/// An accepted, handshaken and identified connection.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
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
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
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
    /// Too many handshakes in flight.
    Overloaded,
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
    /// Also send every failure here (tests, diagnostics); logging and the metric
    /// happen regardless.
    pub failures: Option<mpsc::UnboundedSender<HandshakeFailure>>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_pending_handshakes: DEFAULT_MAX_PENDING_HANDSHAKES,
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
/// Must be called inside a tokio runtime (it spawns the accept loop).
pub fn serve_incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    cluster: String,
) -> TlsIncoming {
    serve_incoming_with(listener, config, cluster, ServeOptions::default())
}

/// [`serve_incoming`] with explicit options. Must be called inside a tokio runtime.
/// Every connection is handshaken in its own task under a timeout, so a slow or
/// hostile client delays nobody; failures are logged, counted and never yielded.
pub fn serve_incoming_with(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    cluster: String,
    options: ServeOptions,
) -> TlsIncoming {
    let (tx, rx) = mpsc::channel(64);
    let ctx = Arc::new(AcceptCtx {
        acceptor: tokio_rustls::TlsAcceptor::from(config),
        cluster,
        timeout: options.handshake_timeout,
        failures: options.failures,
    });
    let pending = Arc::new(Semaphore::new(options.max_pending_handshakes.max(1)));
    tokio::spawn(accept_loop(listener, tx, ctx, pending));
    TlsIncoming { rx }
}

struct AcceptCtx {
    acceptor: tokio_rustls::TlsAcceptor,
    cluster: String,
    timeout: Duration,
    failures: Option<mpsc::UnboundedSender<HandshakeFailure>>,
}

impl AcceptCtx {
    fn report(&self, peer: SocketAddr, reason: FailureReason, detail: String) {
        tracing::warn!(%peer, reason = reason.as_str(), %detail, "TLS connection rejected");
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
    pending: Arc<Semaphore>,
) {
    loop {
        let accepted = tokio::select! {
            _ = tx.closed() => return,
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
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            ctx.report(
                addr,
                FailureReason::Overloaded,
                "too many handshakes in flight".into(),
            );
            continue;
        };
        let ctx = ctx.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let result = tokio::time::timeout(ctx.timeout, handshake(tcp, addr, &ctx)).await;
            drop(permit);
            match result {
                // A send error only means the server is shutting down.
                Ok(Ok(conn)) => drop(tx.send(conn).await),
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
    let tls = ctx.acceptor.accept(tcp).await.map_err(classify_io)?;
    let (_, conn) = tls.get_ref();
    let Some(cert) = conn.peer_certificates().and_then(|c| c.first()) else {
        return Err((FailureReason::NoClientCert, "no client certificate".into()));
    };
    // The verifier checked the cluster of the server's own certificate; check the one
    // this listener serves too (they should agree) and keep the identity for handlers.
    let identity = check_peer(cert, &ctx.cluster).map_err(|e| (peer_reason(&e), e.to_string()))?;
    Ok(TlsConn {
        inner: tls,
        info: PeerInfo { addr, identity },
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
#[derive(Clone)]
struct Connector {
    tls: tokio_rustls::TlsConnector,
    target: Arc<Target>,
}

impl Connector {
    fn new(target: Target, config: Arc<ClientConfig>) -> Self {
        Connector {
            tls: tokio_rustls::TlsConnector::from(config),
            target: Arc::new(target),
        }
    }
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<ClientStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let Connector { tls, target } = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect((target.host.as_str(), target.port)).await?;
            tcp.set_nodelay(true)?;
            let stream = tls.connect(target.server_name.clone(), tcp).await?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// A lazily connecting channel to `https://HOST:PORT` (reconnects as needed).
pub fn channel(uri: &str, config: Arc<ClientConfig>) -> Result<Channel, TlsError> {
    let (endpoint, target) = endpoint(uri)?;
    Ok(endpoint.connect_with_connector_lazy(Connector::new(target, config)))
}

/// Connect now, so that a CLI can report an unreachable or untrusted server at once.
pub async fn connect_once(uri: &str, config: Arc<ClientConfig>) -> Result<Channel, TlsError> {
    let (endpoint, target) = endpoint(uri)?;
    endpoint
        .connect_with_connector(Connector::new(target, config))
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

//! Connecting to the controllers: mTLS, trying each address in turn, and following
//! the `vipshare-leader` hint when a mutation reaches a follower.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use tonic::transport::Channel;
use vipshare_proto::tls::TlsFiles;
use vipshare_proto::v1::admin_api_client::AdminApiClient;
use vipshare_proto::v1::{self as pb};
use vipshare_proto::PROTOCOL_VERSION;

fn read_request(local: bool) -> pb::ReadRequest {
    pb::ReadRequest {
        protocol_version: PROTOCOL_VERSION,
        local,
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct Connection {
    /// Controller addresses, host:port, comma separated.
    #[arg(
        long,
        env = "VIPSHARE_CONTROLLERS",
        value_delimiter = ',',
        global = true
    )]
    pub controllers: Vec<String>,
    /// Directory with ca.crt and this user's certificate and key.
    #[arg(long, env = "VIPSHARE_TLS_DIR", global = true)]
    pub tls_dir: Option<PathBuf>,
    /// File stem of the certificate in --tls-dir (ROLE-NAME), e.g. admin-alice.
    #[arg(
        long,
        env = "VIPSHARE_USER",
        default_value = "admin-admin",
        global = true
    )]
    pub user: String,
}

pub struct Admin {
    tls: Arc<rustls::ClientConfig>,
    addresses: Vec<String>,
    /// Read each controller's own state instead of a linearizable (quorum) read.
    pub local: bool,
}

pub type AdminClient = AdminApiClient<Channel>;

impl Admin {
    pub fn new(c: &Connection) -> anyhow::Result<Self> {
        let dir = c.tls_dir.clone().ok_or_else(|| {
            anyhow!("no certificates: pass --tls-dir DIR (or set VIPSHARE_TLS_DIR) holding ca.crt and {}.crt/.key", c.user)
        })?;
        if c.controllers.is_empty() {
            bail!(
                "no controllers: pass --controllers HOST:PORT[,...] (or set VIPSHARE_CONTROLLERS)"
            );
        }
        let files = TlsFiles {
            ca: dir.join("ca.crt"),
            cert: dir.join(format!("{}.crt", c.user)),
            key: dir.join(format!("{}.key", c.user)),
        };
        // An expired certificate or one of another cluster's CA is named here; the
        // controllers could only say "transport error".
        vipshare_proto::pki::verify_chain(&files.cert, &files.ca)
            .context("your certificate would be refused")?;
        let tls = vipshare_proto::tls::client_config(&files)
            .with_context(|| format!("loading certificates from {}", dir.display()))?;
        Ok(Admin {
            tls,
            addresses: c.controllers.clone(),
            local: false,
        })
    }

    pub async fn connect_to(&self, address: &str) -> anyhow::Result<AdminClient> {
        let ch = vipshare_proto::tls::connect_once(&format!("https://{address}"), self.tls.clone())
            .await
            .with_context(|| format!("controller {address}"))?;
        Ok(AdminApiClient::new(ch))
    }

    /// The first controller that answers.
    pub async fn any(&self) -> anyhow::Result<(String, AdminClient)> {
        let mut errors = Vec::new();
        for a in &self.addresses {
            match self.connect_to(a).await {
                Ok(c) => return Ok((a.clone(), c)),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        bail!("no controller reachable:\n  {}", errors.join("\n  "))
    }

    /// A read on the first controller that answers it, trying the next one when a
    /// controller is unreachable, refuses the connection or has no quorum.
    async fn read<T, F, Fut>(&self, call: F) -> anyhow::Result<T>
    where
        F: Fn(AdminClient) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut errors = Vec::new();
        for address in &self.addresses {
            let client = match self.connect_to(address).await {
                Ok(c) => c,
                Err(e) => {
                    errors.push(format!("{e:#}"));
                    continue;
                }
            };
            match call(client).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if another_may_answer(&s) => {
                    errors.push(format!("{:#}", explain(s, address)))
                }
                Err(s) => return Err(explain(s, address)),
            }
        }
        Err(NoAnswer(errors).into())
    }

    pub async fn status(&self) -> anyhow::Result<pb::StatusReply> {
        let local = self.local;
        self.read(|mut c| async move {
            c.status(pb::StatusRequest {
                protocol_version: PROTOCOL_VERSION,
                local,
            })
            .await
        })
        .await
    }

    pub async fn members(&self) -> anyhow::Result<pb::MembersReply> {
        let local = self.local;
        self.read(|mut c| async move { c.members(read_request(local)).await })
            .await
    }

    pub async fn buckets(&self) -> anyhow::Result<pb::BucketsReply> {
        let local = self.local;
        self.read(|mut c| async move { c.buckets(read_request(local)).await })
            .await
    }

    pub async fn history(&self, req: pb::HistoryRequest) -> anyhow::Result<pb::HistoryReply> {
        self.read(|mut c| {
            let req = req.clone();
            async move { c.history(req).await }
        })
        .await
    }

    /// The full-picture stream of one controller (`vipsharectl watch` on a terminal).
    pub async fn watch(&self, address: &str) -> anyhow::Result<tonic::Streaming<pb::WatchReply>> {
        let mut c = self.connect_to(address).await?;
        c.watch(read_request(true))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| explain(s, address))
    }

    /// The controllers' addresses, as given.
    pub fn addresses(&self) -> &[String] {
        &self.addresses
    }

    /// The bucket map stream of one controller ([`crate::watch`]).
    pub async fn watch_buckets(
        &self,
        address: &str,
    ) -> anyhow::Result<tonic::Streaming<pb::BucketsReply>> {
        let mut c = self.connect_to(address).await?;
        c.watch_buckets(read_request(true))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| explain(s, address))
    }

    /// Run `call` against a controller, moving to the leader when told to.
    /// Attempts are bounded by [`ON_LEADER_ATTEMPTS`].
    pub async fn on_leader<T, F, Fut>(&self, call: F) -> anyhow::Result<T>
    where
        F: Fn(AdminClient) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let (mut address, mut client) = self.any().await?;
        let mut refusals = Vec::new();
        let mut unreachable = Vec::new();
        for _ in 0..ON_LEADER_ATTEMPTS {
            match call(client.clone()).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) => {
                    let leader = s
                        .metadata()
                        .get("vipshare-leader")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    match leader {
                        Some(l) if s.code() == tonic::Code::Unavailable && l != address => {
                            match self.connect_to(&l).await {
                                Ok(c) => {
                                    client = c;
                                    address = l;
                                }
                                // A busy leader (a connection flood, a loaded host) may
                                // miss one connect deadline: ask again, and be redirected
                                // again, rather than give up on the first.
                                Err(e) => {
                                    unreachable.push(format!("{e:#}"));
                                    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                                }
                            }
                        }
                        _ if s.code() == tonic::Code::Unavailable => {
                            // No leader known yet (election in progress): wait a little.
                            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                            (address, client) = self.any().await?;
                        }
                        // Refused at the TLS layer: the request never reached the
                        // service, so another controller may be asked safely.
                        _ if certificate_refusal(&s).is_some() => {
                            refusals.push(format!("{:#}", explain(s, &address)));
                            let next = self.addresses.iter().find(|a| {
                                **a != address && !refusals.iter().any(|r| r.contains(a.as_str()))
                            });
                            let Some(next) = next else {
                                return Err(NoAnswer(refusals).into());
                            };
                            address = next.clone();
                            client = self.connect_to(&address).await?;
                        }
                        _ => return Err(explain(s, &address)),
                    }
                }
            }
        }
        bail!(
            "no leader answered after {ON_LEADER_ATTEMPTS} attempts; is a majority of controllers up? \
             try `vipsharectl status`{}",
            if unreachable.is_empty() {
                String::new()
            } else {
                format!("\n  {}", unreachable.join("\n  "))
            }
        )
    }
}

/// Calls (and redirects) one mutation may take before giving up.
const ON_LEADER_ATTEMPTS: usize = 8;

/// Every controller failed a read; each one's reason, in order.
#[derive(Debug)]
pub struct NoAnswer(pub Vec<String>);

impl std::fmt::Display for NoAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no controller answered:")?;
        for e in &self.0 {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for NoAnswer {}

/// Failures where another controller may well answer: unreachable, no quorum or
/// leader here, the connection refused. Not refusals of the request itself.
fn another_may_answer(s: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        s.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unauthenticated
    )
}

/// The reason in a TLS alert the controller sent when it refused our certificate
/// (with TLS 1.3 it arrives after the handshake, as a "transport error").
fn certificate_refusal(s: &tonic::Status) -> Option<&'static str> {
    let mut text = s.message().to_string();
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        text.push_str(&format!(": {e} {e:?}"));
        source = e.source();
    }
    let alert = text.split("alert").skip(1).collect::<String>();
    let reasons = [
        (
            "CertificateRevoked",
            "your certificate is revoked (see `vipsharectl status` for the deny-list)",
        ),
        (
            "CertificateExpired",
            "your certificate has expired (renew it: `vipsharectl certs renew`)",
        ),
        (
            "UnknownCA",
            "your certificate is not from this cluster's CA",
        ),
        (
            "DecryptError",
            "your certificate is not from this cluster's CA",
        ),
        ("AccessDenied", "your certificate's identity is not allowed"),
        ("BadCertificate", "the controller refused your certificate"),
        (
            "CertificateUnknown",
            "the controller refused your certificate",
        ),
    ];
    reasons
        .iter()
        .find(|(k, _)| alert.contains(k))
        .map(|(_, r)| *r)
}

pub fn explain(s: tonic::Status, address: &str) -> anyhow::Error {
    if let Some(reason) = certificate_refusal(&s) {
        return anyhow!("controller {address}: {reason} ({})", s.message());
    }
    let hint = match s.code() {
        tonic::Code::PermissionDenied => {
            " (your certificate's role may not do this; mutations need an admin certificate)"
        }
        tonic::Code::Unauthenticated => " (the controller did not accept your certificate)",
        tonic::Code::FailedPrecondition => "",
        tonic::Code::DeadlineExceeded => {
            " (no quorum? check `vipsharectl status` on every controller)"
        }
        _ => "",
    };
    anyhow!("controller {address}: {}{hint}", s.message())
}

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

fn read_request() -> pb::ReadRequest {
    pb::ReadRequest {
        protocol_version: PROTOCOL_VERSION,
        local: false,
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
        let tls = vipshare_proto::tls::client_config(&files)
            .with_context(|| format!("loading certificates from {}", dir.display()))?;
        Ok(Admin {
            tls,
            addresses: c.controllers.clone(),
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

    /// A linearizable read on the first controller that answers.
    async fn read<T, F, Fut>(&self, call: F) -> anyhow::Result<T>
    where
        F: FnOnce(AdminClient) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let (address, client) = self.any().await?;
        call(client)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| explain(s, &address))
    }

    pub async fn status(&self) -> anyhow::Result<pb::StatusReply> {
        self.read(|mut c| async move {
            c.status(pb::StatusRequest {
                protocol_version: PROTOCOL_VERSION,
                local: false,
            })
            .await
        })
        .await
    }

    pub async fn members(&self) -> anyhow::Result<pb::MembersReply> {
        self.read(|mut c| async move { c.members(read_request()).await })
            .await
    }

    pub async fn buckets(&self) -> anyhow::Result<pb::BucketsReply> {
        self.read(|mut c| async move { c.buckets(read_request()).await })
            .await
    }

    /// Run `call` against a controller, moving to the leader when told to.
    pub async fn on_leader<T, F, Fut>(&self, call: F) -> anyhow::Result<T>
    where
        F: Fn(AdminClient) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let (mut address, mut client) = self.any().await?;
        for _ in 0..5 {
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
                            client = self.connect_to(&l).await?;
                            address = l;
                        }
                        _ if s.code() == tonic::Code::Unavailable => {
                            // No leader known yet (election in progress): wait a little.
                            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                            (address, client) = self.any().await?;
                        }
                        _ => return Err(explain(s, &address)),
                    }
                }
            }
        }
        bail!("no leader answered after 5 attempts; is a majority of controllers up? try `vipsharectl status`")
    }
}

pub fn explain(s: tonic::Status, address: &str) -> anyhow::Error {
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

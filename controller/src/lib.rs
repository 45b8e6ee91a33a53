//! The vipshare controller: one member of the 3- or 5-controller raft group that
//! owns cluster settings, membership and the bucket map.
//!
//! Layout, from the wire inwards:
//! - [`service`]: the gRPC services (raft transport, admin API, agent API), each
//!   authorising calls from the peer certificate.
//! - [`node`]: the task that owns the raft replica (`vipshare_core::replica`) and
//!   runs its Ready loop; everything else talks to it through a `NodeHandle`.
//! - [`transport`]: per-peer queues and senders for outgoing raft messages.
//! - [`storage`]: the durable raft log on redb.
//! - [`config`], [`metrics`], [`raftlog`]: configuration, Prometheus, and raft's logs.
//!
//! The pure parts (state machine, assignment policy, the replica itself) live in
//! `vipshare-core`, so the simulator runs exactly the same code.

pub mod config;
pub mod leases;
pub mod metrics;
pub mod node;
pub mod ownership;
pub mod raftlog;
pub mod service;
pub mod storage;
pub mod transport;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use vipshare_core::replica::{Replica, ReplicaConfig};
use vipshare_core::state::ClusterState;
use vipshare_core::storage::{bootstrap_snapshot, RaftStorage};
use vipshare_proto::pki::{Identity, Role};
use vipshare_proto::tls::{Revocations, TlsReloader};
use vipshare_proto::v1::admin_api_server::AdminApiServer;
use vipshare_proto::v1::agent_api_server::AgentApiServer;
use vipshare_proto::v1::raft_transport_server::RaftTransportServer;
use vipshare_proto::MAX_MESSAGE_BYTES;

use crate::config::ControllerConfig;
use crate::node::{Node, NodeView};
use crate::storage::{DiskLog, StoreIdentity};
use crate::transport::Transport;

/// How often the certificate files are checked for changes (SIGHUP reloads at once).
pub const TLS_POLL: Duration = vipshare_proto::tls::DEFAULT_RELOAD_POLL;

/// Runs a controller until `shutdown` turns true: opens (or bootstraps) the data
/// directory, starts the node task and serves the three gRPC services over mTLS.
pub async fn run(cfg: ControllerConfig, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    // First, so that a SIGHUP from now on reloads certificates instead of killing us.
    let tls = Arc::new(TlsReloader::new(cfg.tls_files()).context("TLS setup")?);
    check_identity(&cfg, tls.identity())?;
    let cluster_id = cfg.check_certificate()?;
    let mut stop_watcher = shutdown.clone();
    tls.clone().spawn_watcher(TLS_POLL, async move {
        let _ = stop_watcher.wait_for(|s| *s).await;
    });
    let client_tls = tls.client();

    let id = StoreIdentity {
        cluster: cfg.cluster.clone(),
        cluster_id,
        node_id: cfg.id,
    };
    let (disk, recovered) = DiskLog::open(&cfg.data_dir, &id)?;
    let fresh = disk.is_fresh();
    let mut storage = RaftStorage::new(disk, recovered);
    let seed_peers: BTreeMap<u64, String> = cfg
        .peers
        .iter()
        .map(|p| (p.id, p.address.clone()))
        .collect();
    if fresh && !cfg.join {
        let voters: Vec<u64> = seed_peers.keys().copied().collect();
        let founding: Vec<(u64, String)> = seed_peers.clone().into_iter().collect();
        let snap = bootstrap_snapshot(&voters, ClusterState::bootstrap(&founding).encode());
        storage.install_snapshot(&snap)?;
        storage.sync()?;
        tracing::info!(id = cfg.id, ?voters, "bootstrapped a new raft group");
    }

    let mut rc = ReplicaConfig::new(cfg.id);
    rc.election_tick = cfg.raft.election_ticks;
    rc.election_seed = rand::random();
    rc.heartbeat_tick = cfg.raft.heartbeat_ticks;
    rc.snapshot_interval = cfg.raft.snapshot_interval;
    let replica = Replica::new(rc, storage, &raftlog::logger(cfg.id))?;
    let (node, handle) = Node::new(
        replica,
        |h| {
            Transport::new(
                cfg.id,
                cfg.cluster.clone(),
                client_tls.clone(),
                h,
                cfg.raft.peer_queue,
            )
        },
        Duration::from_millis(cfg.raft.tick_ms),
        seed_peers,
    );

    let leases = std::sync::Arc::new(leases::Leases::open(&cfg.data_dir, fresh)?);
    let (released_tx, released_rx) = tokio::sync::mpsc::channel(4096);
    let ownership = ownership::Ownership {
        me: cfg.id,
        cluster: cfg.cluster.clone(),
        node: handle.clone(),
        leases: leases.clone(),
        tls: client_tls.clone(),
        released: released_rx,
    };

    raise_fd_limit();
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    tracing::info!(id = cfg.id, listen = %cfg.listen, "controller serving");
    let incoming = vipshare_proto::tls::serve_incoming(listener, tls.server(), cfg.cluster.clone());
    tokio::spawn(mirror_revocations(
        handle.subscribe(),
        tls.revocations(),
        shutdown.clone(),
    ));

    let raft = RaftTransportServer::new(service::raft::RaftService {
        id: cfg.id,
        cluster: cfg.cluster.clone(),
        node: handle.clone(),
        leases: leases.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let admin = AdminApiServer::new(service::admin::AdminService {
        node: handle.clone(),
        leases: leases.clone(),
    })
    .max_decoding_message_size(1024 * 1024);
    let fanout = Arc::new(service::agent::Fanout::default());
    tokio::spawn(fanout.clone().run(handle.subscribe()));
    let agent = AgentApiServer::new(service::agent::AgentService {
        node: handle.clone(),
        leases,
        released: released_tx,
        fanout,
    })
    .max_decoding_message_size(64 * 1024);

    let mut stop_server = shutdown.clone();
    let server = tonic::transport::Server::builder()
        .layer(service::RefusalLog)
        .add_service(raft)
        .add_service(admin)
        .add_service(agent)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop_server.wait_for(|s| *s).await;
        });
    let ownership_task = spawn_dedicated("vipshare-fence", ownership.run(shutdown.clone()))?;
    let mut stopping = shutdown.clone();
    let node_task = spawn_dedicated("vipshare-raft", node.run(shutdown))?;
    // Graceful shutdown waits for clients to close their connections; a crashed
    // host's agent never does, so give them a bounded time.
    tokio::select! {
        r = server => r.context("gRPC server")?,
        _ = async {
            let _ = stopping.wait_for(|s| *s).await;
            tokio::time::sleep(Duration::from_secs(3)).await;
        } => tracing::warn!("clients still connected 3 s after shutdown; closing anyway"),
    }
    node_task.await.context("node task panicked")??;
    ownership_task.await.context("ownership task panicked")?;
    tracing::info!("controller stopped");
    Ok(())
}

/// Runs `fut` on a thread and current-thread runtime of its own. The raft Ready
/// loop (which fsyncs synchronously) and the promise/fence path then neither
/// block a gRPC worker nor queue behind them, whatever a flood of connections
/// or a burst of heartbeats costs the shared runtime.
fn spawn_dedicated<F>(
    name: &str,
    fut: F,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<F::Output>>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .with_context(|| format!("runtime for {name}"))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || drop(tx.send(rt.block_on(fut))))
        .with_context(|| format!("thread {name}"))?;
    Ok(rx)
}

/// Open files this controller wants: every connection is one, and a flood of idle
/// ones must meet the handshake admission's eviction, not EMFILE at accept.
const WANTED_FDS: u64 = 65_536;

/// Raises the soft open-file limit towards [`WANTED_FDS`] (never above the hard
/// limit); logs what it got, since pending handshakes plus peers must fit in it.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read only the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "getrlimit(RLIMIT_NOFILE)");
        return;
    }
    let want = WANTED_FDS.min(lim.rlim_max);
    if lim.rlim_cur < want {
        let old = lim.rlim_cur;
        lim.rlim_cur = want;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), old, want, "setrlimit(RLIMIT_NOFILE)");
            return;
        }
    }
    let min = 4 * vipshare_proto::tls::DEFAULT_MAX_PENDING_HANDSHAKES as u64;
    if lim.rlim_cur < min {
        tracing::warn!(
            limit = lim.rlim_cur,
            min,
            "open-file limit is low: a flood of idle connections can exhaust it (raise LimitNOFILE)"
        );
    } else {
        tracing::debug!(limit = lim.rlim_cur, "open-file limit");
    }
}

/// The certificate must name this controller of this cluster: with another id its
/// raft messages would all be refused, and the mistake is easier to read here.
fn check_identity(cfg: &ControllerConfig, identity: &Identity) -> anyhow::Result<()> {
    if identity.role != Role::Controller
        || identity.controller_id() != Some(cfg.id)
        || identity.cluster != cfg.cluster
    {
        anyhow::bail!(
            "{}: certificate identity is {identity}, but this is controller {} of cluster {:?} \
             (expected {})",
            cfg.tls.cert.display(),
            cfg.id,
            cfg.cluster,
            Identity {
                cluster: cfg.cluster.clone(),
                role: Role::Controller,
                name: cfg.id.to_string(),
            }
        );
    }
    Ok(())
}

/// Keep the TLS layer's deny-list equal to the applied one, so revoked certificates
/// are refused at the handshake too (calls are checked against the applied state).
async fn mirror_revocations(
    mut views: watch::Receiver<Arc<NodeView>>,
    revocations: Revocations,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let view = views.borrow_and_update().clone();
        if revocations.replace(&view.state.revoked) {
            tracing::info!(
                revoked = view.state.revoked.len(),
                applied = view.applied,
                "certificate deny-list updated"
            );
        }
        tokio::select! {
            changed = views.changed() => if changed.is_err() { return },
            _ = shutdown.changed() => if *shutdown.borrow() { return },
        }
    }
}

//! Raft transport, sending side: one task per peer controller with a bounded queue.
//!
//! The node hands over messages without waiting; a full queue drops (raft
//! retransmits). Each task drains its queue into one `RaftBatch` RPC over mTLS.
//! A failed send is reported back to raft (`report_unreachable`, and
//! `report_snapshot` for snapshots) so it backs off that peer.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::Message;
use tokio::sync::mpsc;
use vipshare_core::replica::is_snapshot;
use vipshare_proto::tls::ClientTls;
use vipshare_proto::v1::raft_transport_client::RaftTransportClient;
use vipshare_proto::v1::RaftBatch;
use vipshare_proto::{MAX_MESSAGE_BYTES, PROTOCOL_VERSION};

use crate::node::{NodeHandle, NodeMsg};

const MAX_BATCH: usize = 512;
const SEND_TIMEOUT: Duration = Duration::from_secs(3);

struct Peer {
    address: String,
    tx: mpsc::Sender<Message>,
    task: tokio::task::JoinHandle<()>,
}

pub struct Transport {
    me: u64,
    cluster: String,
    tls: ClientTls,
    node: mpsc::Sender<NodeMsg>,
    queue: usize,
    peers: HashMap<u64, Peer>,
}

impl Transport {
    pub fn new(me: u64, cluster: String, tls: ClientTls, node: &NodeHandle, queue: usize) -> Self {
        Transport {
            me,
            cluster,
            tls,
            node: node.mailbox(),
            queue,
            peers: HashMap::new(),
        }
    }

    /// Start senders for new controllers and stop those of removed ones.
    pub fn update_peers(&mut self, controllers: &BTreeMap<u64, String>) {
        self.peers.retain(|id, p| {
            let keep = controllers.get(id) == Some(&p.address);
            if !keep {
                p.task.abort();
            }
            keep
        });
        for (&id, address) in controllers {
            if id == self.me || self.peers.contains_key(&id) {
                continue;
            }
            let (tx, rx) = mpsc::channel(self.queue);
            let task = tokio::spawn(peer_loop(
                PeerLink {
                    me: self.me,
                    peer: id,
                    address: address.clone(),
                    cluster: self.cluster.clone(),
                    tls: self.tls.clone(),
                    node: self.node.clone(),
                },
                rx,
            ));
            self.peers.insert(
                id,
                Peer {
                    address: address.clone(),
                    tx,
                    task,
                },
            );
        }
    }

    pub fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            let to = m.to;
            let snapshot = is_snapshot(&m);
            let queued = self
                .peers
                .get(&to)
                .is_some_and(|p| p.tx.try_send(m).is_ok());
            if !queued {
                crate::metrics::raft_messages_dropped(to, 1);
                if snapshot {
                    let _ = self.node.try_send(NodeMsg::SnapshotStatus {
                        peer: to,
                        delivered: false,
                    });
                }
            }
        }
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        for p in self.peers.values() {
            p.task.abort();
        }
    }
}

struct PeerLink {
    me: u64,
    peer: u64,
    address: String,
    cluster: String,
    tls: ClientTls,
    node: mpsc::Sender<NodeMsg>,
}

async fn peer_loop(link: PeerLink, mut rx: mpsc::Receiver<Message>) {
    let uri = format!("https://{}", link.address);
    let connect = |generation: u64| match vipshare_proto::tls::channel(&uri, &link.tls) {
        Ok(c) => Some((
            generation,
            RaftTransportClient::new(c)
                .max_encoding_message_size(MAX_MESSAGE_BYTES)
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )),
        Err(e) => {
            tracing::error!(peer = link.peer, %uri, error = %e, "cannot set up raft transport");
            None
        }
    };
    let Some((mut generation, mut client)) = connect(link.tls.generation()) else {
        return;
    };
    let mut healthy = true;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let mut bytes = 0usize;
        while batch.len() < MAX_BATCH && bytes < MAX_MESSAGE_BYTES / 4 {
            match rx.try_recv() {
                Ok(m) => {
                    bytes += m.compute_size() as usize;
                    batch.push(m);
                }
                Err(_) => break,
            }
        }
        let snapshots = batch.iter().filter(|m| is_snapshot(m)).count();
        let messages: Vec<Vec<u8>> = batch
            .iter()
            .filter_map(|m| m.write_to_bytes().ok())
            .collect();
        let n = messages.len() as u64;
        let req = RaftBatch {
            protocol_version: PROTOCOL_VERSION,
            cluster: link.cluster.clone(),
            from: link.me,
            to: link.peer,
            messages,
        };
        // Certificates were reloaded: move to a new connection (made with the new
        // certificate) between two batches; the old one closes once dropped.
        if link.tls.generation() != generation {
            if let Some((g, c)) = connect(link.tls.generation()) {
                tracing::debug!(peer = link.peer, "new raft connection after a TLS reload");
                (generation, client) = (g, c);
            }
        }
        let ok = match tokio::time::timeout(SEND_TIMEOUT, client.send(req)).await {
            Ok(Ok(_)) => true,
            Ok(Err(status)) => {
                if healthy {
                    tracing::warn!(peer = link.peer, address = %link.address, %status, "raft send failed");
                }
                false
            }
            Err(_) => {
                if healthy {
                    tracing::warn!(peer = link.peer, address = %link.address, "raft send timed out");
                }
                false
            }
        };
        if ok && !healthy {
            tracing::info!(peer = link.peer, address = %link.address, "raft peer reachable again");
        }
        healthy = ok;
        if ok {
            crate::metrics::raft_messages_sent(link.peer, n);
        } else {
            crate::metrics::raft_messages_dropped(link.peer, n);
            let _ = link.node.try_send(NodeMsg::Unreachable(link.peer));
        }
        for _ in 0..snapshots {
            let _ = link.node.try_send(NodeMsg::SnapshotStatus {
                peer: link.peer,
                delivered: ok,
            });
        }
    }
}

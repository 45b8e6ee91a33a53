//! `controller.toml`: parsed strictly (unknown keys are errors) and validated
//! before anything starts, so a typo stops the daemon with the file, key and reason.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use vipshare_proto::pki::{self, ClusterId};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// This controller's raft id (> 0). Its certificate must be issued to this id.
    pub id: u64,
    /// Cluster name; must match the cluster in every certificate.
    pub cluster: String,
    /// Address the gRPC server (raft, agent and admin APIs) listens on.
    pub listen: SocketAddr,
    /// Address other controllers, agents and vipsharectl use to reach this one;
    /// defaults to `listen`.
    #[serde(default)]
    pub advertise: Option<String>,
    pub data_dir: PathBuf,
    /// Prometheus `/metrics` listener; none when absent.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    pub tls: TlsConfig,
    /// The founding controllers, this one included. Ignored once the data directory
    /// holds state (membership then comes from the replicated log).
    #[serde(default)]
    pub peers: Vec<Peer>,
    /// Start with an empty log and wait to be added with `vipsharectl controller add`.
    #[serde(default)]
    pub join: bool,
    #[serde(default)]
    pub raft: RaftTiming,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub id: u64,
    /// `host:port` of the peer's gRPC listener.
    pub address: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftTiming {
    pub tick_ms: u64,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    pub snapshot_interval: u64,
    /// Per-peer outgoing queue; messages beyond it are dropped (raft retransmits).
    pub peer_queue: usize,
}

impl Default for RaftTiming {
    fn default() -> Self {
        RaftTiming {
            tick_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_interval: 1000,
            peer_queue: 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: {source}")]
    Parse {
        file: PathBuf,
        source: toml::de::Error,
    },
    #[error("{file}: key `{key}`: {reason}")]
    Invalid {
        file: PathBuf,
        key: &'static str,
        reason: String,
    },
}

impl ControllerConfig {
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_path_buf(),
            source,
        })?;
        Self::parse(file, &text)
    }

    pub fn parse(file: &Path, text: &str) -> Result<Self, ConfigError> {
        let cfg: ControllerConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            file: file.to_path_buf(),
            source,
        })?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let bad = |key, reason: String| ConfigError::Invalid {
            file: file.to_path_buf(),
            key,
            reason,
        };
        if self.id == 0 {
            return Err(bad("id", "must be greater than 0".into()));
        }
        if self.cluster.is_empty() || self.cluster.contains('/') {
            return Err(bad(
                "cluster",
                "must be a non-empty name without '/'".into(),
            ));
        }
        let r = &self.raft;
        if r.tick_ms == 0 || r.tick_ms > 10_000 {
            return Err(bad(
                "raft.tick_ms",
                format!("{} is not in 1..=10000", r.tick_ms),
            ));
        }
        if r.heartbeat_ticks == 0 || r.election_ticks <= r.heartbeat_ticks {
            return Err(bad(
                "raft.election_ticks",
                format!(
                    "must be greater than raft.heartbeat_ticks ({}), got {}",
                    r.heartbeat_ticks, r.election_ticks
                ),
            ));
        }
        if r.snapshot_interval < 10 {
            return Err(bad("raft.snapshot_interval", "must be at least 10".into()));
        }
        if r.peer_queue == 0 {
            return Err(bad("raft.peer_queue", "must be at least 1".into()));
        }
        if !self.join {
            if !self.peers.iter().any(|p| p.id == self.id) {
                return Err(bad(
                    "peers",
                    format!(
                        "must list this controller (id {}) unless join = true",
                        self.id
                    ),
                ));
            }
            let mut ids: Vec<u64> = self.peers.iter().map(|p| p.id).collect();
            ids.sort_unstable();
            ids.dedup();
            if ids.len() != self.peers.len() || ids.contains(&0) {
                return Err(bad("peers", "ids must be unique and greater than 0".into()));
            }
        }
        for p in &self.peers {
            if p.address.parse::<SocketAddr>().is_err() && !p.address.contains(':') {
                return Err(bad(
                    "peers.address",
                    format!("{:?} is not host:port", p.address),
                ));
            }
        }
        Ok(())
    }

    pub fn advertised(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }

    /// Checks the own certificate before serving: it chains to the configured CA and
    /// names the address peers dial (`advertise`, else `listen`), so a certificate from
    /// another cluster or host stops the start with a reason instead of failing every
    /// peer's handshake. Returns the cluster ID the certificates carry.
    pub fn check_certificate(&self) -> anyhow::Result<ClusterId> {
        let own = pki::check_own_cert(&self.tls.cert, &self.tls.ca)?;
        let advertised = self.advertised();
        let host = advertised
            .rsplit_once(':')
            .map_or(advertised.as_str(), |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let named = match host.parse::<IpAddr>() {
            Ok(ip) => own.ips.contains(&ip),
            Err(_) => own.dns.iter().any(|d| d.eq_ignore_ascii_case(host)),
        };
        if !named {
            let key = if self.advertise.is_some() {
                "advertise"
            } else {
                "listen"
            };
            anyhow::bail!(
                "{}: does not name {key} address {host} (its IP SANs: {:?}, DNS SANs: {:?}); \
                 peers dial that address, so reissue the certificate with `--ip {host}` or \
                 set `advertise` to an address it names",
                self.tls.cert.display(),
                own.ips,
                own.dns
            );
        }
        Ok(own.cluster_id)
    }

    pub fn tls_files(&self) -> vipshare_proto::tls::TlsFiles {
        vipshare_proto::tls::TlsFiles {
            ca: self.tls.ca.clone(),
            cert: self.tls.cert.clone(),
            key: self.tls.key.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
id = 1
cluster = "demo"
listen = "127.0.0.1:7001"
data_dir = "/tmp/x"
[tls]
ca = "ca.crt"
cert = "c.crt"
key = "c.key"
[[peers]]
id = 1
address = "127.0.0.1:7001"
"#;

    fn err(text: &str) -> String {
        ControllerConfig::parse(Path::new("controller.toml"), text)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn accepts_a_minimal_file() {
        let c = ControllerConfig::parse(Path::new("c.toml"), GOOD).unwrap();
        assert_eq!(c.raft.tick_ms, 100);
        assert_eq!(c.advertised(), "127.0.0.1:7001");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err(&format!("{GOOD}\n[raft]\ntick_msec = 5\n"));
        assert!(
            e.contains("controller.toml") && e.contains("tick_msec"),
            "{e}"
        );
    }

    #[test]
    fn impossible_timing_is_named() {
        let e = err(&format!(
            "{GOOD}\n[raft]\nelection_ticks = 2\nheartbeat_ticks = 2\n"
        ));
        assert!(e.contains("raft.election_ticks"), "{e}");
    }

    #[test]
    fn bad_address_is_named() {
        let e = err(&GOOD.replace("127.0.0.1:7001\"\ndata", "localhost\"\ndata"));
        assert!(e.contains("listen"), "{e}");
    }

    #[test]
    fn must_list_itself() {
        let e = err(&GOOD.replace("id = 1\naddress", "id = 2\naddress"));
        assert!(e.contains("peers"), "{e}");
    }
}

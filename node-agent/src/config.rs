//! `agent.toml`: who this host is, where the controllers are, which backend.
//!
//! ```toml
//! member = "web1"                      # the member name (= the agent certificate's name)
//! interface = "eth0"                   # where the VIPs go
//! backend = "linux"                    # or "freebsd"
//! metrics_listen = "127.0.0.1:9464"    # optional Prometheus endpoint
//! drain_timeout_ms = 30000             # optional: SIGTERM waits this long for buckets to move
//! state_dir = "/var/lib/vipshare"      # optional: the agent's durable state (persistent storage, not /run)
//! [[controllers]]
//! id = 1
//! address = "10.0.0.1:7001"            # host:port (https:// optional)
//! [tls]
//! ca = "/etc/vipshare/ca.crt"
//! cert = "/etc/vipshare/agent-web1.crt"
//! key = "/etc/vipshare/agent-web1.key"
//! [linux]                              # optional, defaults shown
//! table = "vipshare"
//! state_dir = "/run/vipshare-agent"
//! static_maddr = true
//! igmp_join = true
//! arp_egress = true
//! ```
//! Unknown keys are errors, and every error names the file, the key and why.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use vipshare_proto::pki;

use crate::dataplane::linux::LinuxConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Linux,
    Freebsd,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerEntry {
    pub id: u64,
    pub address: String,
}

impl ControllerEntry {
    /// The URI to dial: `https://host:port`.
    pub fn uri(&self) -> String {
        uri(&self.address)
    }
}

/// `host:port` or `https://host:port` to `https://host:port`.
pub fn uri(address: &str) -> String {
    if address.starts_with("https://") {
        address.to_string()
    } else {
        format!("https://{address}")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LinuxSection {
    pub table: Option<String>,
    pub nft: Option<String>,
    pub ip: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub static_maddr: Option<bool>,
    pub igmp_join: Option<bool>,
    pub arp_egress: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FreebsdSection {
    pub rule_base: Option<u32>,
    pub carp_vhid: Option<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub member: String,
    pub interface: String,
    pub backend: Backend,
    pub controllers: Vec<ControllerEntry>,
    pub tls: TlsSection,
    pub metrics_listen: Option<SocketAddr>,
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    /// The agent's durable state (`agent-state.json`): floors, voters, timing.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub linux: LinuxSection,
    #[serde(default)]
    pub freebsd: FreebsdSection,
}

fn default_drain_timeout_ms() -> u64 {
    30_000
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/vipshare")
}

/// A configuration error: file, key and reason.
#[derive(Debug, thiserror::Error)]
#[error("{}: {key}: {reason}", .file.display())]
pub struct ConfigError {
    pub file: PathBuf,
    pub key: String,
    pub reason: String,
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            key: "(file)".into(),
            reason: e.to_string(),
        })?;
        let cfg = Self::parse(path, &text)?;
        cfg.check_host(path)?;
        Ok(cfg)
    }

    /// What the file alone cannot tell: the certificate must be issued to `member`
    /// (controllers would refuse every call otherwise, with a less obvious reason), be
    /// valid under the CA, and `interface` must exist in this network namespace.
    pub fn check_host(&self, path: &Path) -> Result<(), ConfigError> {
        let err = |key: &str, reason: String| ConfigError {
            file: path.to_path_buf(),
            key: key.to_string(),
            reason,
        };
        let own = pki::check_own_cert(&self.tls.cert, &self.tls.ca)
            .map_err(|e| err("tls.cert", e.to_string()))?;
        if own.identity.role != pki::Role::Agent || own.identity.name != self.member {
            return Err(err(
                "member",
                format!(
                    "{:?}, but {} is issued to {} (expected role agent, name {:?})",
                    self.member,
                    self.tls.cert.display(),
                    own.identity,
                    self.member
                ),
            ));
        }
        let name = std::ffi::CString::new(self.interface.as_str())
            .map_err(|_| err("interface", "contains a NUL byte".into()))?;
        // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
        if unsafe { libc::if_nametoindex(name.as_ptr()) } == 0 {
            return Err(err(
                "interface",
                format!(
                    "{:?} does not exist in this network namespace ({})",
                    self.interface,
                    std::io::Error::last_os_error()
                ),
            ));
        }
        Ok(())
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let err = |key: &str, reason: String| ConfigError {
            file: path.to_path_buf(),
            key: key.to_string(),
            reason,
        };
        let cfg: AgentConfig = toml::from_str(text).map_err(|e| {
            // toml names the key in its message; add the line for humans.
            let line = e
                .span()
                .map(|s| text[..s.start].lines().count().max(1))
                .map_or(String::new(), |l| format!(" (line {l})"));
            err("(parse)", format!("{}{line}", e.message()))
        })?;
        if cfg.member.is_empty()
            || !cfg
                .member
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.')
        {
            return Err(err(
                "member",
                format!("{:?} must be letters, digits, '-', '_' or '.'", cfg.member),
            ));
        }
        if cfg.interface.is_empty()
            || cfg.interface.len() > 15
            || !cfg
                .interface
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || c == b'-')
        {
            return Err(err(
                "interface",
                format!("{:?} is not an interface name", cfg.interface),
            ));
        }
        if cfg.controllers.is_empty() {
            return Err(err(
                "controllers",
                "at least one controller is needed".into(),
            ));
        }
        let mut ids = BTreeSet::new();
        for (i, c) in cfg.controllers.iter().enumerate() {
            if c.id == 0 {
                return Err(err(
                    &format!("controllers[{i}].id"),
                    "ids start at 1".into(),
                ));
            }
            if !ids.insert(c.id) {
                return Err(err(
                    &format!("controllers[{i}].id"),
                    format!("id {} is listed twice", c.id),
                ));
            }
            let rest = c.address.strip_prefix("https://").unwrap_or(&c.address);
            if rest
                .rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(err(
                    &format!("controllers[{i}].address"),
                    format!("{:?} is not host:port", c.address),
                ));
            }
        }
        for (key, p) in [
            ("tls.ca", &cfg.tls.ca),
            ("tls.cert", &cfg.tls.cert),
            ("tls.key", &cfg.tls.key),
            ("state_dir", &cfg.state_dir),
        ] {
            if p.as_os_str().is_empty() {
                return Err(err(key, "empty path".into()));
            }
        }
        if cfg.drain_timeout_ms > 3_600_000 {
            return Err(err("drain_timeout_ms", "more than an hour".into()));
        }
        cfg.linux_config()
            .validate()
            .map_err(|e| err("linux.table", e.to_string()))?;
        Ok(cfg)
    }

    /// The Linux backend settings.
    pub fn linux_config(&self) -> LinuxConfig {
        let d = LinuxConfig::default();
        let l = &self.linux;
        LinuxConfig {
            table: l.table.clone().unwrap_or(d.table),
            nft: l.nft.clone().unwrap_or(d.nft),
            ip: l.ip.clone().unwrap_or(d.ip),
            sysctl_root: d.sysctl_root,
            state_dir: l.state_dir.clone().or(d.state_dir),
            static_maddr: l.static_maddr.unwrap_or(d.static_maddr),
            igmp_join: l.igmp_join.unwrap_or(d.igmp_join),
            arp_egress: l.arp_egress.unwrap_or(d.arp_egress),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
member = "h1"
interface = "eth0"
backend = "linux"
metrics_listen = "127.0.0.1:9464"
[[controllers]]
id = 1
address = "10.0.0.1:7001"
[[controllers]]
id = 2
address = "https://10.0.0.2:7001"
[tls]
ca = "/x/ca.crt"
cert = "/x/agent-h1.crt"
key = "/x/agent-h1.key"
[linux]
state_dir = "/tmp/s"
"#;

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(Path::new("agent.toml"), text)
    }

    #[test]
    fn good_config_parses() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.backend, Backend::Linux);
        assert_eq!(c.controllers[0].uri(), "https://10.0.0.1:7001");
        assert_eq!(c.controllers[1].uri(), "https://10.0.0.2:7001");
        assert_eq!(c.drain_timeout_ms, 30_000);
        let l = c.linux_config();
        assert_eq!(l.table, "vipshare");
        assert_eq!(l.state_dir.as_deref(), Some(Path::new("/tmp/s")));
    }

    #[test]
    fn errors_name_file_key_and_reason() {
        let e = parse(&GOOD.replace("backend = \"linux\"", "backend = \"bsd\""))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("agent.toml: "), "{e}");
        assert!(e.contains("bsd") && e.contains("line 4"), "{e}");
        let e = parse(&format!("{GOOD}\nbogus = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = parse(&GOOD.replace("id = 2", "id = 1"))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "agent.toml: controllers[1].id: id 1 is listed twice");
        let e = parse(&GOOD.replace("10.0.0.1:7001", "10.0.0.1"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("controllers[0].address"), "{e}");
        let e = parse(&GOOD.replace("\"eth0\"", "\"eth0; rm\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains(": interface: "), "{e}");
        let e = parse(&GOOD.replace("state_dir", "table = \"1x\"\nstate_dir"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("linux.table"), "{e}");
    }
}

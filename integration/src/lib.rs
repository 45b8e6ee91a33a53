//! Test harness: real `vipshare-controller` processes on loopback addresses with
//! real certificates, driven over real mTLS gRPC, killed with real SIGKILL.
//!
//! Binaries come from the workspace target directory; build them first
//! (`cargo build --workspace --bins`, which `scripts/test.sh` does).

pub mod netns;
pub mod scenario;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use tonic::transport::Channel;
use vipshare_proto::pki::{self, Role};
use vipshare_proto::tls::{self, TlsFiles};
use vipshare_proto::v1::admin_api_client::AdminApiClient;
use vipshare_proto::v1::{self as pb, mutate_request::Op};
use vipshare_proto::PROTOCOL_VERSION;

/// Path of a workspace binary, honouring CARGO_TARGET_DIR.
pub fn bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let profile = std::env::var("VIPSHARE_PROFILE").unwrap_or_else(|_| "debug".into());
    let p = target.join(profile).join(name);
    assert!(
        p.exists(),
        "{} not built; run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

/// Poll `f` every 50 ms until it returns `Some`, or fail after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub struct ControllerProc {
    pub id: u64,
    pub address: String,
    pub data_dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl ControllerProc {
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// `VIPSHARE_LAB_SLOT=S` (1..=9) moves every lab of this process to its own
/// addresses (`127.S.x.y`, `10.K` ranges of slot S), so checkouts testing at
/// the same time on one machine stay apart. Unset: slot 0, the usual addresses.
pub fn lab_slot() -> u8 {
    std::env::var("VIPSHARE_LAB_SLOT")
        .ok()
        .and_then(|s| s.parse::<u8>().ok())
        .filter(|s| *s <= 9)
        .unwrap_or(0)
}

fn lab_slot_ip_base(ip_base: &str) -> String {
    match (lab_slot(), ip_base.strip_prefix("127.0.")) {
        (0, _) | (_, None) => ip_base.to_string(),
        (slot, Some(rest)) => format!("127.{slot}.{rest}"),
    }
}

/// A cluster of controllers on `127.X.Y.id:7001`, with its own CA and data.
pub struct Lab {
    pub root: tempfile::TempDir,
    pub certs: PathBuf,
    pub cluster: String,
    ip_base: String,
    pub controllers: BTreeMap<u64, ControllerProc>,
    /// Raft tick of controllers configured from now on (election = 10 ticks).
    pub tick_ms: u64,
    /// The admin identity's files, reloaded when they change (certificate rotation).
    admin_tls: Arc<tls::TlsReloader>,
    /// Controllers started from now on join these cgroup v2 directories (by
    /// id) before they exec, so every socket they open carries the cgroup
    /// (the netns lab matches controller-to-controller traffic by it).
    pub cgroups: BTreeMap<u64, PathBuf>,
}

impl Lab {
    /// Creates the CA and certificates for controllers `1..=max_id`, an admin,
    /// a reader and an agent. `ip_base` like "127.1.1" keeps parallel tests apart.
    pub fn new(ip_base: &str, max_id: u64) -> anyhow::Result<Self> {
        let ip_base = &lab_slot_ip_base(ip_base);
        let root = tempfile::tempdir()?;
        let certs = root.path().join("certs");
        let cluster = "lab".to_string();
        pki::init_ca(&certs, &cluster, 30)?;
        for id in 1..=max_id {
            let ip = format!("{ip_base}.{id}").parse()?;
            pki::issue(&certs, Role::Controller, &id.to_string(), &[ip], &[], 30)?;
        }
        pki::issue(&certs, Role::Admin, "admin", &[], &[], 30)?;
        pki::issue(&certs, Role::Reader, "viewer", &[], &[], 30)?;
        pki::issue(&certs, Role::Agent, "h1", &[], &[], 30)?;
        let admin_tls = Arc::new(tls::TlsReloader::new(TlsFiles::in_dir(
            &certs,
            Role::Admin,
            "admin",
        ))?);
        Ok(Lab {
            root,
            certs,
            cluster,
            ip_base: ip_base.to_string(),
            controllers: BTreeMap::new(),
            tick_ms: 100,
            admin_tls,
            cgroups: BTreeMap::new(),
        })
    }

    pub fn address(&self, id: u64) -> String {
        format!("{}.{id}:7001", self.ip_base)
    }

    pub fn metrics_address(&self, id: u64) -> String {
        format!("{}.{id}:9101", self.ip_base)
    }

    /// The text of controller `id`'s `/metrics` page.
    pub async fn metrics(&self, id: u64) -> anyhow::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.metrics_address(id)).await?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .await?;
        let mut body = String::new();
        s.read_to_string(&mut body).await?;
        Ok(body)
    }

    /// Start controller `id` and wait for it to exit (for start-up refusals).
    pub fn run_to_exit(&mut self, id: u64) -> anyhow::Result<(std::process::ExitStatus, String)> {
        self.start(id)?;
        let c = self
            .controllers
            .get_mut(&id)
            .ok_or_else(|| anyhow!("no controller {id}"))?;
        let mut child = c.child.take().ok_or_else(|| anyhow!("{id} not started"))?;
        let status = child.wait()?;
        Ok((status, c.log_text()))
    }

    /// Write the config of controller `id`. `founders` are the initial voters;
    /// `join` starts it empty, to be added with `controller add`.
    pub fn configure(&mut self, id: u64, founders: &[u64], join: bool) -> anyhow::Result<()> {
        let dir = self.root.path().join(format!("c{id}"));
        std::fs::create_dir_all(&dir)?;
        let data_dir = dir.join("data");
        let config = dir.join("controller.toml");
        let files = TlsFiles::in_dir(&self.certs, Role::Controller, &id.to_string());
        let mut text = format!(
            "id = {id}\ncluster = \"{}\"\nlisten = \"{}\"\nmetrics_listen = \"{}\"\n\
             data_dir = \"{}\"\njoin = {join}\n\
             [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\
             [raft]\ntick_ms = {}\nelection_ticks = 10\nheartbeat_ticks = 2\nsnapshot_interval = 50\n",
            self.cluster,
            self.address(id),
            self.metrics_address(id),
            data_dir.display(),
            files.ca.display(),
            files.cert.display(),
            files.key.display(),
            self.tick_ms,
        );
        for f in founders {
            text.push_str(&format!(
                "[[peers]]\nid = {f}\naddress = \"{}\"\n",
                self.address(*f)
            ));
        }
        std::fs::write(&config, text)?;
        self.controllers.insert(
            id,
            ControllerProc {
                id,
                address: self.address(id),
                data_dir,
                config,
                log: dir.join("controller.log"),
                child: None,
            },
        );
        Ok(())
    }

    pub fn start(&mut self, id: u64) -> anyhow::Result<()> {
        let exe = bin("vipshare-controller");
        let c = self
            .controllers
            .get_mut(&id)
            .ok_or_else(|| anyhow!("controller {id} not configured"))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&c.log)?;
        let mut cmd = Command::new(exe);
        cmd.arg("--config")
            .arg(&c.config)
            .env(
                "RUST_LOG",
                std::env::var("VIPSHARE_LAB_CONTROLLER_LOG").unwrap_or("info,raft=info".into()),
            )
            // Plain text, so tests can grep `key=value` fields.
            .env("NO_COLOR", "1")
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(dir) = self.cgroups.get(&id) {
            join_cgroup_before_exec(&mut cmd, dir)?;
        }
        let child = cmd.spawn().context("spawning vipshare-controller")?;
        c.child = Some(child);
        Ok(())
    }

    /// Configure and start founding controllers `1..=n`.
    pub fn start_founders(&mut self, n: u64) -> anyhow::Result<()> {
        let founders: Vec<u64> = (1..=n).collect();
        for &id in &founders {
            self.configure(id, &founders, false)?;
            self.start(id)?;
        }
        Ok(())
    }

    /// SIGKILL, no goodbye.
    pub fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        let c = self
            .controllers
            .get_mut(&id)
            .ok_or_else(|| anyhow!("no controller {id}"))?;
        if let Some(mut child) = c.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// The exit status of controller `id` if it has exited on its own (reaped then).
    pub fn exited(&mut self, id: u64) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let c = self
            .controllers
            .get_mut(&id)
            .ok_or_else(|| anyhow!("no controller {id}"))?;
        let Some(child) = c.child.as_mut() else {
            return Ok(None);
        };
        let status = child.try_wait()?;
        if status.is_some() {
            c.child = None;
        }
        Ok(status)
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn stop(&mut self, id: u64) -> anyhow::Result<std::process::ExitStatus> {
        let c = self
            .controllers
            .get_mut(&id)
            .ok_or_else(|| anyhow!("no controller {id}"))?;
        let mut child = c.child.take().ok_or_else(|| anyhow!("{id} not running"))?;
        // SAFETY: signalling a child process we own by pid.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        Ok(child.wait()?)
    }

    pub async fn client(&self, id: u64) -> anyhow::Result<AdminApiClient<Channel>> {
        // Picks up renewed admin files (an unusable new pair keeps the old one).
        let _ = self.admin_tls.reload_if_changed();
        self.client_with(id, self.admin_tls.client()).await
    }

    /// An admin API client of controller `id` connecting with `tls`.
    pub async fn client_with(
        &self,
        id: u64,
        tls: impl Into<tls::ClientTls>,
    ) -> anyhow::Result<AdminApiClient<Channel>> {
        let ch = tls::connect_once(&format!("https://{}", self.address(id)), tls).await?;
        Ok(AdminApiClient::new(ch))
    }

    /// The certificate files of `role`/`name` in the lab's certificate directory.
    pub fn files(&self, role: Role, name: &str) -> TlsFiles {
        TlsFiles::in_dir(&self.certs, role, name)
    }

    /// Send SIGHUP to controller `id` (reloads its certificates).
    pub fn sighup(&self, id: u64) -> anyhow::Result<()> {
        let pid = self
            .controllers
            .get(&id)
            .and_then(ControllerProc::pid)
            .ok_or_else(|| anyhow!("controller {id} not running"))?;
        // SAFETY: signalling a child process we own by pid.
        if unsafe { libc::kill(pid as i32, libc::SIGHUP) } != 0 {
            bail!("kill -HUP {pid}: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Controller `id`'s own view (no ReadIndex round), or None if it doesn't answer.
    pub async fn local_status(&self, id: u64) -> Option<pb::StatusReply> {
        let mut c = self.client(id).await.ok()?;
        let r = tokio::time::timeout(
            Duration::from_secs(2),
            c.status(pb::StatusRequest {
                protocol_version: PROTOCOL_VERSION,
                local: true,
            }),
        )
        .await
        .ok()?
        .ok()?;
        Some(r.into_inner())
    }

    /// The leader id once all running controllers agree on one.
    pub async fn wait_leader(&self, timeout: Duration) -> anyhow::Result<u64> {
        wait_for(
            timeout,
            "a leader every running controller agrees on",
            || async {
                let mut leader = None;
                for (id, c) in &self.controllers {
                    if !c.is_running() {
                        continue;
                    }
                    let s = self.local_status(*id).await?;
                    if s.leader_id == 0 || leader.is_some_and(|l| l != s.leader_id) {
                        return None;
                    }
                    leader = Some(s.leader_id);
                }
                leader
            },
        )
        .await
    }

    /// Send a mutation to the current leader (following redirects); returns the index.
    pub async fn mutate(&self, op: Op) -> anyhow::Result<u64> {
        let mut last = anyhow!("no controller running");
        for (id, c) in self.controllers.iter().filter(|(_, c)| c.is_running()) {
            let Ok(mut client) = self.client(*id).await else {
                continue;
            };
            match client
                .mutate(pb::MutateRequest {
                    protocol_version: PROTOCOL_VERSION,
                    op: Some(op.clone()),
                })
                .await
            {
                Ok(r) => return Ok(r.into_inner().index),
                Err(s) => last = anyhow!("controller {} ({}): {}", id, c.address, s.message()),
            }
        }
        Err(last)
    }

    pub async fn noop(&self, payload: &[u8]) -> anyhow::Result<u64> {
        self.mutate(Op::Noop(pb::Noop {
            payload: payload.to_vec(),
        }))
        .await
    }

    /// Run vipsharectl against this lab as the admin.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<Output> {
        let controllers: Vec<String> = self
            .controllers
            .values()
            .filter(|c| c.is_running())
            .map(|c| c.address.clone())
            .collect();
        Ok(Command::new(bin("vipsharectl"))
            .arg("--controllers")
            .arg(controllers.join(","))
            .arg("--tls-dir")
            .arg(&self.certs)
            .args(args)
            .stdin(Stdio::null())
            .output()?)
    }
}

/// Makes `cmd`'s process move itself into the cgroup v2 directory `dir`
/// between fork and exec (writing 0 to `cgroup.procs` moves the writer).
fn join_cgroup_before_exec(cmd: &mut Command, dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    let procs = std::ffi::CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())?;
    // SAFETY: the closure only makes async-signal-safe calls (open, write,
    // close) on memory allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if n != 1 {
                return Err(err);
            }
            Ok(())
        });
    }
    Ok(())
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in self.controllers.values_mut() {
            if let Some(mut child) = c.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            for c in self.controllers.values() {
                eprintln!("---- controller {} log ----\n{}", c.id, c.log_text());
            }
        }
    }
}

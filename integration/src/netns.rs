//! A network-namespace lab for the data plane: real kernels, real nftables,
//! real `vipshare-agent` processes. Needs root.
//!
//! # Layout (one lab, `K` unique per lab in this process)
//! ```text
//!  root namespace                      switch namespace
//!  controllers on 10.K.0.1-3 (vsK) --- br0 (a bridge, snooping off)
//!                                       |-- host namespaces: eth0 10.K.1.i/16, VIP 10.K.0.100
//!                                       `-- client namespace: eth0 10.K.2.1 .. (one per source)
//! ```
//! Every address has an IPv6 twin in fd00:0:K::/64 (hosts `::1:i`, sources
//! `::2:j`, VIP `::100`, see [`NetLab::vip6`]); a [`Cluster`] serves both VIPs.
//! The controllers are the ordinary [`crate::Lab`] processes in the root
//! namespace, listening on `10.K.0.id:7001` instead of loopback, which the
//! agents in the host namespaces reach over the bridge. Servers (TCP and UDP,
//! answering with the host's name) and clients are threads of the test process
//! that entered a namespace with `setns`, so they need no helper binaries.
//!
//! Everything is removed by `Drop` (namespaces, the root-side link, agent
//! processes), also when a test fails.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, UdpSocket,
};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Whether we can build namespaces (root). Tests call [`require_root`].
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn require_root() {
    assert!(
        is_root(),
        "the data-plane tests need root (network namespaces, nftables): run them with sudo"
    );
}

/// Runs a command, failing with its stderr.
pub fn sh(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A unique short tag for this process: `v<pid%10000>_<n>`, and the lab
/// number `n`.
pub fn unique_tag() -> (String, u32) {
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    (format!("v{}_{n}", std::process::id() % 10000), n)
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A namespace holding bridge `br0`, snooping off (no querier here) and
    /// bridged frames kept out of iptables.
    pub fn switch(name: &str) -> anyhow::Result<Netns> {
        let switch = Netns::create(name)?;
        switch.ip(&[
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        for f in ["call-iptables", "call-arptables", "call-ip6tables"] {
            let _ = switch.write_sysctl(&format!("net.bridge.bridge-nf-{f}"), "0");
        }
        Ok(switch)
    }

    pub fn create(name: &str) -> anyhow::Result<Self> {
        let _ = sh("ip", &["netns", "del", name]);
        sh("ip", &["netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME args`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        sh("ip", &a)
    }

    /// `ip -n NAME -batch -` with one command per line.
    pub fn ip_batch(&self, lines: &str) -> anyhow::Result<()> {
        let mut child = Command::new("ip")
            .args(["-n", &self.name, "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(lines.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("ip -batch: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Runs `program args` inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut a = vec!["netns", "exec", self.name.as_str(), program];
        a.extend_from_slice(args);
        sh("ip", &a)
    }

    /// A command that runs inside the namespace (`ip netns exec` execs it, so
    /// the child's pid is the program's).
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Moves the calling thread into the namespace.
    pub fn enter(&self) -> std::io::Result<()> {
        let f = std::fs::File::open(format!("/var/run/netns/{}", self.name))?;
        // SAFETY: setns on an open namespace file descriptor.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Runs `f` on a thread inside the namespace (threads it spawns stay there).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().expect("namespace thread panicked")
    }

    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("namespace file");
            // SAFETY: setns on an open namespace file descriptor.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
    }

    pub fn write_sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])?;
        Ok(())
    }

    pub fn read_sysctl(&self, key: &str) -> anyhow::Result<String> {
        Ok(self.exec("sysctl", &["-n", key])?.trim().to_string())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh("ip", &["netns", "del", &self.name]);
    }
}

/// An interface in the root namespace, deleted on drop.
pub struct RootLink {
    pub name: String,
}

impl Drop for RootLink {
    fn drop(&mut self) {
        let _ = sh("ip", &["link", "del", &self.name]);
    }
}

/// The lab network: a switch, `hosts` host namespaces, one client namespace
/// with `sources` addresses, and the root namespace holding the controller
/// addresses 10.K.0.1-3.
pub struct NetLab {
    pub tag: String,
    /// Second octet of the lab's 10.K.0.0/16.
    pub k: u8,
    pub hosts: Vec<Netns>,
    pub client: Netns,
    pub switch: Netns,
    _root: RootLink,
}

impl NetLab {
    pub fn new(hosts: usize, sources: usize) -> anyhow::Result<Self> {
        require_root();
        assert!(sources <= 250 * 4);
        let (tag, n) = unique_tag();
        // Slot 0 uses 10.160-249; slot S > 0 uses its own 9 values of K.
        let k = match crate::lab_slot() {
            0 => 160 + (n % 90) as u8,
            slot => 160 + (slot - 1) * 10 + (n % 9) as u8,
        };
        let switch = Netns::switch(&format!("{tag}_sw"))?;
        let root_name = format!("vsl{k}");
        let _ = sh("ip", &["link", "del", &root_name]);
        sh(
            "ip",
            &[
                "link",
                "add",
                &root_name,
                "type",
                "veth",
                "peer",
                "name",
                "root",
                "netns",
                &switch.name,
            ],
        )?;
        let root = RootLink { name: root_name };
        switch.ip(&["link", "set", "root", "master", "br0", "up"])?;
        for id in 1..=3 {
            sh(
                "ip",
                &[
                    "addr",
                    "add",
                    &format!("10.{k}.0.{id}/16"),
                    "dev",
                    &root.name,
                ],
            )?;
        }
        sh("ip", &["link", "set", &root.name, "up"])?;
        let plug = |ns: &Netns, port: &str, addrs: &[Ipv4Addr]| -> anyhow::Result<()> {
            // No duplicate address detection for the link-local address either:
            // while it is tentative the kernel sends no neighbour solicitation
            // (they must come from a link-local source), so a host could not
            // resolve a client to answer it for the first second or two.
            ns.write_sysctl("net.ipv6.conf.default.accept_dad", "0")?;
            switch.ip(&[
                "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
            ])?;
            switch.ip(&["link", "set", port, "master", "br0", "up"])?;
            let mut batch = String::new();
            for &a in addrs {
                batch.push_str(&format!("addr add {a}/16 dev eth0\n"));
                // No DAD: the addresses are usable at once (the lab has no
                // duplicates).
                let a6 = v6_twin(a);
                batch.push_str(&format!("addr add {a6}/64 dev eth0 nodad\n"));
            }
            batch.push_str("link set eth0 up\n");
            batch.push_str("link set lo up\n");
            ns.ip_batch(&batch)
        };
        let mut host_ns = Vec::new();
        for i in 0..hosts {
            let ns = Netns::create(&format!("{tag}_h{}", i + 1))?;
            plug(
                &ns,
                &format!("h{}", i + 1),
                &[Ipv4Addr::new(10, k, 1, i as u8 + 1)],
            )?;
            host_ns.push(ns);
        }
        let client = Netns::create(&format!("{tag}_c"))?;
        let sources: Vec<Ipv4Addr> = (0..sources)
            .map(|i| Ipv4Addr::new(10, k, 2 + (i / 250) as u8, (i % 250) as u8 + 1))
            .collect();
        plug(&client, "cl", &sources)?;
        Ok(NetLab {
            tag,
            k,
            hosts: host_ns,
            client,
            switch,
            _root: root,
        })
    }

    /// Base of the controllers' addresses, for [`crate::Lab::new`].
    pub fn controller_ip_base(&self) -> String {
        format!("10.{}.0", self.k)
    }

    pub fn vip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.k, 0, 100)
    }

    /// The IPv6 VIP, `fd00:0:K::100`.
    pub fn vip6(&self) -> Ipv6Addr {
        v6_twin(self.vip())
    }

    /// Every client IPv6 source address (the twins of [`NetLab::sources`]).
    pub fn sources6(&self) -> anyhow::Result<Vec<Ipv6Addr>> {
        Ok(self.sources()?.into_iter().map(v6_twin).collect())
    }

    pub fn host_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, self.k, 1, i as u8 + 1)
    }

    /// Every client source address (as many as the lab was built with).
    pub fn sources(&self) -> anyhow::Result<Vec<Ipv4Addr>> {
        let out = self
            .client
            .ip(&["-4", "-o", "addr", "show", "dev", "eth0"])?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let i = w.iter().position(|x| *x == "inet")?;
                w.get(i + 1)?.split('/').next()?.parse().ok()
            })
            .collect())
    }
}

/// The lab's IPv6 address for its IPv4 address 10.K.x.y: `fd00:0:K::x:y`.
pub fn v6_twin(a: Ipv4Addr) -> Ipv6Addr {
    let [_, k, x, y] = a.octets();
    Ipv6Addr::new(0xfd00, 0, k.into(), 0, 0, 0, x.into(), y.into())
}

/// Flows a server accepted: (host name, client address).
pub type Accepted = Arc<Mutex<Vec<(String, SocketAddr)>>>;

/// TCP and UDP servers on `port` in a host namespace, answering every line or
/// datagram with the host's name, over IPv4 and IPv6. TCP listens on all
/// addresses; UDP binds the VIP and its IPv6 twin ([`v6_twin`]) (with
/// IP_FREEBIND, so it may start before the VIP exists), since replies must
/// leave from the VIP.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub accepted: Accepted,
}

impl Servers {
    pub fn start(
        ns: &Netns,
        name: &str,
        vip: Ipv4Addr,
        port: u16,
        accepted: Accepted,
    ) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let tcp = {
            let (stop, name, accepted, tx) =
                (stop.clone(), name.to_string(), accepted.clone(), tx.clone());
            // One async task per connection on a runtime of this thread (in the
            // host's namespace): the instrument must stay cheap on a loaded
            // machine, where a thread per connection fell behind its accept
            // queue and looked like a host that does not answer.
            ns.spawn(move || {
                let l = match tcp_listener(port, false)
                    .and_then(|l4| Ok((l4, tcp_listener(port, true)?)))
                {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e.into()));
                        return;
                    }
                };
                rt.block_on(async move {
                    let from_std = |l| tokio::net::TcpListener::from_std(l);
                    let (l4, l6) = match from_std(l.0).and_then(|l4| Ok((l4, from_std(l.1)?))) {
                        Ok(l) => {
                            let _ = tx.send(Ok(()));
                            l
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e.into()));
                            return;
                        }
                    };
                    let accept = |l: tokio::net::TcpListener| {
                        let (stop, name, accepted) = (stop.clone(), name.clone(), accepted.clone());
                        async move {
                            while !stop.load(Ordering::Relaxed) {
                                let accept =
                                    tokio::time::timeout(Duration::from_millis(100), l.accept());
                                let Ok(Ok((conn, peer))) = accept.await else {
                                    continue;
                                };
                                accepted.lock().unwrap().push((name.clone(), peer));
                                tokio::spawn(serve_conn(conn, name.clone(), stop.clone()));
                            }
                        }
                    };
                    futures::future::join(accept(l4), accept(l6)).await;
                });
            })
        };
        let udp = |vip: IpAddr| {
            let (stop, name, tx) = (stop.clone(), name.to_string(), tx.clone());
            ns.spawn(move || {
                let s = match udp_socket(vip, port) {
                    Ok(s) => {
                        let _ = tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let mut buf = [0u8; 256];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = s.recv_from(&mut buf) {
                        let _ = s.send_to(format!("{name}\n").as_bytes(), peer);
                    }
                }
            })
        };
        let threads = vec![tcp, udp(vip.into()), udp(v6_twin(vip).into())];
        for _ in 0..threads.len() {
            rx.recv_timeout(Duration::from_secs(5))
                .context("server start")?
                .context("server start")?;
        }
        Ok(Servers {
            stop,
            threads,
            accepted,
        })
    }
}

fn tcp_listener(port: u16, v6: bool) -> anyhow::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let any: SocketAddr = if v6 {
        (Ipv6Addr::UNSPECIFIED, port).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, port).into()
    };
    let s = Socket::new(Domain::for_address(any), Type::STREAM, None)?;
    if v6 {
        // IPv4 clients stay on the IPv4 socket (their peers unmapped).
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&any.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

fn udp_socket(vip: IpAddr, port: u16) -> anyhow::Result<UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let at = SocketAddr::new(vip, port);
    let s = Socket::new(Domain::for_address(at), Type::DGRAM, None)?;
    if vip.is_ipv6() {
        s.set_freebind_v6(true)?;
    } else {
        s.set_freebind_v4(true)?;
    }
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    s.bind(&at.into())?;
    Ok(s.into())
}

/// Answers the host's name at once and then to every line, until the peer
/// closes or the lab stops.
async fn serve_conn(conn: tokio::net::TcpStream, name: String, stop: Arc<AtomicBool>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let (r, mut w) = conn.into_split();
    let answer = format!("{name}\n");
    if w.write_all(answer.as_bytes()).await.is_err() {
        return;
    }
    let mut lines = tokio::io::BufReader::new(r).lines();
    while !stop.load(Ordering::Relaxed) {
        match tokio::time::timeout(Duration::from_millis(200), lines.next_line()).await {
            Err(_) => {}
            Ok(Ok(Some(_))) => {
                if w.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
            }
            Ok(_) => return,
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One TCP probe: connect from `src`, read the first line (the host's name).
pub async fn tcp_probe(
    src: impl Into<IpAddr>,
    dst: impl Into<SocketAddr>,
    timeout: Duration,
) -> Result<String, String> {
    use tokio::io::AsyncBufReadExt;
    let (src, dst) = (src.into(), dst.into());
    let s = if src.is_ipv6() {
        tokio::net::TcpSocket::new_v6()
    } else {
        tokio::net::TcpSocket::new_v4()
    }
    .map_err(|e| e.to_string())?;
    s.bind(SocketAddr::new(src, 0)).map_err(|e| e.to_string())?;
    let fut = async {
        let stream = s.connect(dst).await.map_err(|e| e.to_string())?;
        let mut r = tokio::io::BufReader::new(stream);
        let mut line = String::new();
        r.read_line(&mut line).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(line.trim().to_string())
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err("timed out".into()),
    }
}

/// TCP probes from every source at once (run inside the client namespace),
/// IPv4 or IPv6 alike. Returns (source, host name or error).
pub fn tcp_round<A: Copy + Into<IpAddr>>(
    sources: &[A],
    dst: impl Into<SocketAddr> + Copy,
    timeout: Duration,
) -> Vec<(A, Result<String, String>)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let futs = sources
            .iter()
            .map(|&src| async move { (src, tcp_probe(src, dst, timeout).await) });
        futures::future::join_all(futs).await
    })
}

static NEXT_UDP_PORT: AtomicU32 = AtomicU32::new(0);

/// UDP probes from every source at once (run inside the client namespace):
/// one datagram each to `dst`, then every reply collected for `wait`.
/// Returns (source, names of all hosts that answered).
///
/// Every round uses a source port no earlier round of this process used, so
/// a late answer to an earlier round is never counted in this one.
pub fn udp_round<A: Copy + Into<IpAddr>>(
    sources: &[A],
    dst: impl Into<SocketAddr> + Copy,
    wait: Duration,
) -> anyhow::Result<Vec<(A, Vec<String>)>> {
    let n = NEXT_UDP_PORT.fetch_add(1, Ordering::SeqCst);
    // 10000..32767: below the ephemeral range.
    let port = 10_000 + (n % 22_768) as u16;
    let mut socks = Vec::new();
    for &src in sources {
        let s = UdpSocket::bind(SocketAddr::new(src.into(), port))?;
        s.set_nonblocking(true)?;
        s.send_to(b"who\n", dst.into())?;
        socks.push((src, s, Vec::new()));
    }
    let end = Instant::now() + wait;
    let mut buf = [0u8; 256];
    while Instant::now() < end {
        let mut any = false;
        for (_, s, got) in socks.iter_mut() {
            while let Ok((n, _)) = s.recv_from(&mut buf) {
                got.push(String::from_utf8_lossy(&buf[..n]).trim().to_string());
                any = true;
            }
        }
        if !any {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    Ok(socks.into_iter().map(|(a, _, g)| (a, g)).collect())
}

/// A `vipshare-agent` running in a host namespace; killed on drop.
pub struct AgentProc {
    pub member: String,
    pub config: PathBuf,
    pub log: PathBuf,
    ns: String,
    child: Option<Child>,
    stopped: bool,
}

impl AgentProc {
    pub fn start(ns: &Netns, member: &str, config: &Path, log: &Path) -> anyhow::Result<Self> {
        let mut a = AgentProc {
            member: member.to_string(),
            config: config.to_path_buf(),
            log: log.to_path_buf(),
            ns: ns.name.clone(),
            child: None,
            stopped: false,
        };
        a.restart()?;
        Ok(a)
    }

    /// Starts the agent again (after a kill or stop).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        assert!(self.child.is_none(), "agent {} still running", self.member);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(crate::bin("vipshare-agent"))
            .arg("--config")
            .arg(&self.config)
            .env(
                "RUST_LOG",
                "info,vipshare_agent=debug,h2=info,tower=info,hyper=info",
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning vipshare-agent")?;
        self.child = Some(child);
        self.stopped = false;
        Ok(())
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: signalling our own child by pid.
            unsafe {
                libc::kill(pid, sig);
            }
        }
    }

    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    pub fn freeze(&mut self) {
        self.signal(libc::SIGSTOP);
        self.stopped = true;
    }

    pub fn thaw(&mut self) {
        self.signal(libc::SIGCONT);
        self.stopped = false;
    }

    /// SIGTERM and wait up to `timeout` for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().context("not running")?;
        let end = Instant::now() + timeout;
        loop {
            if let Some(s) = child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > end {
                let _ = child.kill();
                let _ = child.wait();
                bail!("agent {} did not exit within {timeout:?}", self.member);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if self.stopped {
            self.thaw();
        }
        self.kill();
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(80).collect();
            eprintln!("---- agent {} log (last 80 lines) ----", self.member);
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Writes an agent config for `member` (certificate issued by the caller).
pub fn write_agent_config(
    dir: &Path,
    member: &str,
    certs: &Path,
    controllers: &[(u64, String)],
    extra: &str,
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let mut text = format!(
        "member = \"{member}\"\ninterface = \"eth0\"\nbackend = \"linux\"\ndrain_timeout_ms = 20000\nstate_dir = \"{}\"\n{extra}\n",
        dir.join("agent-state").display()
    );
    for (id, addr) in controllers {
        text.push_str(&format!(
            "[[controllers]]\nid = {id}\naddress = \"{addr}\"\n"
        ));
    }
    text.push_str(&format!(
        "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[linux]\nstate_dir = \"{}\"\n",
        certs.join("ca.crt").display(),
        certs.join(format!("agent-{member}.crt")).display(),
        certs.join(format!("agent-{member}.key")).display(),
        dir.join("state").display(),
    ));
    let path = dir.join("agent.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Buckets currently in the owned set of a host namespace's `vipshare` table
/// (elements whose timeout ran out are not listed); `None` without the table.
pub fn owned_set(ns: &Netns) -> Option<BTreeSet<u32>> {
    let out = ns
        .exec("nft", &["-j", "list", "set", "ip", "vipshare", "owned"])
        .ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    let mut set = BTreeSet::new();
    for item in v.get("nftables")?.as_array()? {
        let Some(elems) = item.get("set").and_then(|s| s.get("elem")) else {
            continue;
        };
        for e in elems.as_array()? {
            let val = e
                .get("elem")
                .and_then(|x| x.get("val"))
                .or(Some(e))
                .and_then(|x| x.as_u64())?;
            set.insert(val as u32);
        }
    }
    Some(set)
}

/// The whole thing: a [`NetLab`], 3 controllers, one agent and one pair of
/// servers per host, members `h1..hN`. Fields drop in order: agents first,
/// then servers, controllers and the namespaces.
pub struct Cluster {
    pub agents: Vec<AgentProc>,
    pub servers: Vec<Servers>,
    pub lab: crate::Lab,
    pub net: NetLab,
    pub accepted: Accepted,
    pub bucket_count: u32,
    pub seed: u32,
    pub port: u16,
}

/// Server port in the host namespaces.
pub const PORT: u16 = 8080;

impl Cluster {
    /// Builds the lab, starts controllers, initialises the cluster (VIP,
    /// `buckets`, default lease timing), adds the members and starts agents and
    /// servers. Does not wait for the buckets to be assigned.
    pub async fn start(hosts: usize, sources: usize, buckets: u32) -> anyhow::Result<Self> {
        let net = NetLab::new(hosts, sources)?;
        let mut lab = crate::Lab::new(&net.controller_ip_base(), 3)?;
        lab.start_founders(3)?;
        lab.wait_leader(Duration::from_secs(20)).await?;
        let seed = 0x4e4c_4221u32;
        let out = lab.ctl(&[
            "cluster",
            "init",
            "--vip",
            &net.vip().to_string(),
            "--vip",
            &net.vip6().to_string(),
            "--buckets",
            &buckets.to_string(),
            "--seed",
            &seed.to_string(),
        ])?;
        if !out.status.success() {
            bail!("cluster init: {}", String::from_utf8_lossy(&out.stderr));
        }
        let controllers: Vec<(u64, String)> = (1..=3).map(|id| (id, lab.address(id))).collect();
        let accepted: Accepted = Arc::default();
        let mut agents = Vec::new();
        let mut servers = Vec::new();
        let names: Vec<String> = (1..=net.hosts.len()).map(|i| format!("h{i}")).collect();
        for member in &names {
            if member != "h1" {
                // Lab::new issued h1 already.
                vipshare_proto::pki::issue(
                    &lab.certs,
                    vipshare_proto::pki::Role::Agent,
                    member,
                    &[],
                    &[],
                    30,
                )?;
            }
            let out = lab.ctl(&["member", "add", member])?;
            if !out.status.success() {
                bail!("member add: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        for (ns, member) in net.hosts.iter().zip(&names) {
            servers.push(Servers::start(
                ns,
                member,
                net.vip(),
                PORT,
                accepted.clone(),
            )?);
            let dir = lab.root.path().join(format!("agent-{member}"));
            let extra = format!("metrics_listen = \"{}:9102\"", net.host_ip(agents.len()));
            let config = write_agent_config(&dir, member, &lab.certs, &controllers, &extra)?;
            agents.push(AgentProc::start(
                ns,
                member,
                &config,
                &dir.join("agent.log"),
            )?);
        }
        Ok(Cluster {
            agents,
            servers,
            lab,
            net,
            accepted,
            bucket_count: buckets,
            seed,
            port: PORT,
        })
    }

    pub fn member(&self, i: usize) -> String {
        format!("h{}", i + 1)
    }

    /// The controllers' bucket map: owner per bucket ("" when unowned).
    pub fn bucket_map(&self) -> anyhow::Result<Vec<String>> {
        let out = self.lab.ctl(&["buckets", "--json"])?;
        if !out.status.success() {
            bail!("buckets: {}", String::from_utf8_lossy(&out.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let mut map = vec![String::new(); self.bucket_count as usize];
        for b in v["buckets"].as_array().context("buckets")? {
            let i = b["bucket"].as_u64().context("bucket")? as usize;
            map[i] = b["owner"].as_str().unwrap_or("").to_string();
        }
        Ok(map)
    }

    pub fn bucket_of(&self, src: impl Into<IpAddr>) -> u32 {
        vipshare_core::bucket::bucket_of(
            vipshare_core::bucket::BucketFn::Jhash,
            vipshare_core::bucket::Affinity::Address,
            self.bucket_count,
            self.seed,
            src.into(),
            None,
        )
        .expect("valid bucket config")
    }

    /// Each host's kernel owned set.
    pub fn kernel_sets(&self) -> Vec<Option<BTreeSet<u32>>> {
        self.net.hosts.iter().map(owned_set).collect()
    }

    /// Waits until every bucket is owned by one of `members`, each owning at
    /// least half its equal share, and every host's
    /// kernel set holds exactly its buckets (hosts not in `members` hold none).
    /// Returns the map.
    pub async fn wait_converged(
        &self,
        members: &[String],
        timeout: Duration,
    ) -> anyhow::Result<Vec<String>> {
        let end = Instant::now() + timeout;
        loop {
            let last;
            match self.bucket_map() {
                Ok(map) => {
                    // Every bucket owned by one of `members`, and the map
                    // balanced (equal weights): each owns at least half its share.
                    let share = self.bucket_count as usize / members.len() / 2;
                    let all_owned = map.iter().all(|o| members.contains(o))
                        && members
                            .iter()
                            .all(|m| map.iter().filter(|o| *o == m).count() >= share);
                    let sets = self.kernel_sets();
                    let mut ok = all_owned;
                    for (i, set) in sets.iter().enumerate() {
                        let name = self.member(i);
                        let want: BTreeSet<u32> = (0..self.bucket_count)
                            .filter(|&b| map[b as usize] == name)
                            .collect();
                        let have = set.clone().unwrap_or_default();
                        if members.contains(&name) && have != want {
                            ok = false;
                        }
                        if !members.contains(&name) && !have.is_empty() {
                            ok = false;
                        }
                    }
                    if ok {
                        return Ok(map);
                    }
                    last = format!(
                        "map owners {:?}, kernel set sizes {:?}",
                        count_owners(&map),
                        sets.iter()
                            .map(|s| s.as_ref().map(|s| s.len()))
                            .collect::<Vec<_>>()
                    );
                }
                Err(e) => last = e.to_string(),
            }
            if Instant::now() > end {
                bail!("not converged on {members:?} after {timeout:?}: {last}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The text of agent `i`'s `/metrics` page (served on its host address).
    pub async fn agent_metrics(&self, i: usize) -> anyhow::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = format!("{}:9102", self.net.host_ip(i));
        let mut s = tokio::net::TcpStream::connect(&addr).await?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .await?;
        let mut body = String::new();
        s.read_to_string(&mut body).await?;
        Ok(body)
    }

    pub fn vip_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.net.vip(), self.port)
    }

    pub fn vip6_addr(&self) -> SocketAddrV6 {
        SocketAddrV6::new(self.net.vip6(), self.port, 0, 0)
    }
}

fn count_owners(map: &[String]) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for o in map {
        *m.entry(o.clone()).or_insert(0) += 1;
    }
    m
}

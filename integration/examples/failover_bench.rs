//! Host failover benchmark: vipshare against keepalived (VRRP), in the same
//! network-namespace lab ([`vipshare_integration::scenario::ScenarioNet`]),
//! same crash, same client-side measurement. Needs root, keepalived and (for
//! the chart) gnuplot: `sudo integration/bench/failover.sh` installs them,
//! builds in release mode and runs this.
//!
//! A trial: probes run (a new TCP connection every 10 ms from each probe
//! source, 300 ms timeout each, so a SYN retransmission never hides a gap);
//! the victim host crashes (its switch port goes down, its agent or both
//! keepalived processes get SIGKILL, its servers stop); failover time = from
//! the crash to the latest, over the victim's buckets, of the first probe sent
//! after the crash that a surviving host answered. Failed probes are counted
//! per probe source (one source per bucket of the victim for vipshare, four
//! sources for keepalived, where one host serves every client), and for
//! vipshare also on the other hosts' buckets (must be 0). The victim then
//! boots again (a fresh namespace) and rejoins before the next trial.
//!
//! Configurations:
//! - vipshare, default timing (heartbeat 100 ms, lease 500 ms), 3 hosts;
//! - vipshare tuned: heartbeat 50 ms, lease 200 ms (L_c 305 ms);
//! - vipshare fast: heartbeat 25 ms, lease 100 ms, kernel delay 25 ms, margin
//!   20 ms (L_c 148 ms). Configuration only: the lease arithmetic is unchanged.
//!   The kernel delay is a bound the agent must keep (decision to kernel
//!   enforcement); 25 ms holds on a healthy host with the agent real-time, not
//!   on an overloaded one where `nft` commits were seen 140 ms late;
//! - keepalived 2 hosts active/backup, advert_int 1 s (VRRPv2);
//! - keepalived advert_int 0.1 s (needs `vrrp_version 3`).
//!
//! vipshare clusters are initialised through the admin API (not
//! `vipsharectl cluster init`, which cannot set damping) with flap damping off
//! (penalty 0) and a 1 s min-stable time: the benchmark crashes the same hosts
//! again and again, which damping would rightly suppress.
//!
//! With `--busy`, stress-ng oversubscribes the CPUs twice for the whole run
//! (the agents run real-time, as their unit grants; see README "Busy hosts").
//!
//! Usage: `failover_bench [--trials N] [--out DIR] [--only vipshare|fast|keepalived] [--busy]`
//! (defaults: 20 trials, integration/bench). Writes DIR/failover.md (the
//! table), DIR/failover.csv (every trial) and, when gnuplot is installed,
//! DIR/failover.png.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use vipshare_integration::netns::{Accepted, Servers, PORT};
use vipshare_integration::scenario::{
    poll, sources_by_bucket, wait_converged, ClientSide, HostProvider, LabOptions, LoadGen,
    NetnsClient, NetnsProvider, Probe, ScenarioNet,
};
use vipshare_proto::v1 as pb;

const EVERY: Duration = Duration::from_millis(10);
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// Probing before the crash (a baseline: must all succeed).
const BEFORE: Duration = Duration::from_millis(300);
/// Probing after every bucket is served again.
const AFTER: Duration = Duration::from_millis(300);
const GIVE_UP: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
struct Trial {
    failover: Duration,
    /// Failed probes from the victim's sources, per source.
    failed_per_source: f64,
    /// Failed probes on the surviving hosts' buckets (vipshare only).
    failed_elsewhere: Option<usize>,
}

struct Config {
    name: &'static str,
    trials: Vec<Trial>,
    note: String,
}

fn main() -> anyhow::Result<()> {
    let mut trials = 20usize;
    let mut out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench");
    let mut only = String::new();
    let mut busy = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--trials" => trials = args.next().context("--trials N")?.parse()?,
            "--out" => out = args.next().context("--out DIR")?.into(),
            "--only" => only = args.next().context("--only vipshare|fast|keepalived")?,
            "--busy" => busy = true,
            _ => {
                bail!("usage: failover_bench [--trials N] [--out DIR] [--only vipshare|fast|keepalived] [--busy]")
            }
        }
    }
    if std::env::var_os("VIPSHARE_PROFILE").is_none() {
        let release = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/release/vipshare-agent")
            .exists();
        std::env::set_var(
            "VIPSHARE_PROFILE",
            if release { "release" } else { "debug" },
        );
    }
    eprintln!(
        "binaries: target/{}; {trials} trials per configuration",
        std::env::var("VIPSHARE_PROFILE").unwrap_or_default()
    );
    let _hog = if busy {
        Some(vipshare_integration::scenario::CpuHog::oversubscribe(2)?)
    } else {
        None
    };
    let mut configs = Vec::new();
    if only.is_empty() || only == "vipshare" {
        configs.push(vipshare("vipshare, default timing", None, trials)?);
        configs.push(vipshare(
            "vipshare, tuned (heartbeat 50 ms, lease 200 ms)",
            Some(Timing {
                heartbeat: 50,
                lease: 200,
                kernel_delay: None,
                margin: None,
            }),
            trials,
        )?);
    }
    if only.is_empty() || only == "vipshare" || only == "fast" {
        configs.push(vipshare(
            "vipshare, fast (heartbeat 25 ms, lease 100 ms, kernel delay 25 ms, margin 20 ms)",
            Some(FAST),
            trials,
        )?);
    }
    if only.is_empty() || only == "keepalived" {
        configs.push(keepalived("keepalived, advert_int 1 s", "1", 2, trials)?);
        configs.push(keepalived(
            "keepalived, advert_int 0.1 s (VRRPv3)",
            "0.1",
            3,
            trials,
        )?);
    }
    let table = table(&configs);
    println!("\n{table}");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("failover.md"), &table)?;
    let mut csv = String::new();
    for (i, c) in configs.iter().enumerate() {
        for (j, t) in c.trials.iter().enumerate() {
            let _ = writeln!(
                csv,
                "{i},{j},{:.1},{:.1}",
                t.failover.as_secs_f64() * 1e3,
                t.failed_per_source
            );
        }
    }
    std::fs::write(out.join("failover.csv"), &csv)?;
    match chart(&configs, &out) {
        Ok(()) => eprintln!("wrote {}", out.join("failover.png").display()),
        Err(e) => eprintln!("no chart: {e:#}"),
    }
    Ok(())
}

// ------------------------------------------------------------------ measuring

/// Failover time and failed probes of one trial, from the probes.
fn analyse(
    probes: &[Probe],
    crashed: Instant,
    victim: &str,
    victim_sources: &[Ipv4Addr],
    other_sources: &[Ipv4Addr],
) -> anyhow::Result<Trial> {
    let mut worst = Duration::ZERO;
    let mut failed = 0usize;
    for src in victim_sources {
        let mine: Vec<&Probe> = probes.iter().filter(|p| p.src == *src).collect();
        let first = mine
            .iter()
            .filter(|p| p.sent >= crashed)
            .find(|p| p.answer().is_some_and(|h| h != victim))
            .with_context(|| format!("{src}: never answered by a surviving host"))?;
        worst = worst.max(first.sent - crashed);
        failed += mine.iter().filter(|p| p.answer().is_none()).count();
    }
    let elsewhere = probes
        .iter()
        .filter(|p| other_sources.contains(&p.src) && p.answer().is_none())
        .count();
    Ok(Trial {
        failover: worst,
        failed_per_source: failed as f64 / victim_sources.len().max(1) as f64,
        failed_elsewhere: (!other_sources.is_empty()).then_some(elsewhere),
    })
}

/// Probes `sources` until every source in `victim_sources` got an answer from
/// a host other than `victim` after the crash done by `crash`.
fn measure<C: ClientSide>(
    client: &Arc<C>,
    victim: &str,
    victim_sources: &[Ipv4Addr],
    other_sources: &[Ipv4Addr],
    crash: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Trial> {
    let all: Vec<Ipv4Addr> = victim_sources
        .iter()
        .chain(other_sources)
        .copied()
        .collect();
    let load = LoadGen::start(client, all, EVERY, PROBE_TIMEOUT);
    std::thread::sleep(BEFORE);
    let baseline = load.snapshot();
    if let Some(p) = baseline.iter().find(|p| p.answer().is_none()) {
        bail!("a probe failed before the crash: {p:?}");
    }
    let crashed = Instant::now();
    crash()?;
    poll(GIVE_UP, "every victim source answered elsewhere", || {
        let s = load.snapshot();
        victim_sources
            .iter()
            .all(|src| {
                s.iter().any(|p| {
                    p.src == *src && p.sent >= crashed && p.answer().is_some_and(|h| h != victim)
                })
            })
            .then_some(())
    })?;
    std::thread::sleep(AFTER);
    let probes = load.finish();
    analyse(&probes, crashed, victim, victim_sources, other_sources)
}

// ------------------------------------------------------------------ vipshare

/// Lease timing of a tuned configuration (None: the default).
#[derive(Clone, Copy)]
struct Timing {
    heartbeat: u64,
    lease: u64,
    kernel_delay: Option<u64>,
    margin: Option<u64>,
}

/// The configuration aiming at failover p99 <= 250 ms (L_c 148 ms).
const FAST: Timing = Timing {
    heartbeat: 25,
    lease: 100,
    kernel_delay: Some(25),
    margin: Some(20),
};

fn vipshare(name: &'static str, tuned: Option<Timing>, trials: usize) -> anyhow::Result<Config> {
    eprintln!("== {name}");
    let mut p = NetnsProvider::start(LabOptions {
        hosts: 3,
        buckets: 32,
        sources: 200,
        heartbeat_ms: tuned.map(|t| t.heartbeat),
        lease_ms: tuned.map(|t| t.lease),
        kernel_delay_ms: tuned.and_then(|t| t.kernel_delay),
        margin_ms: tuned.and_then(|t| t.margin),
        damping: Some(pb::Damping {
            penalty_per_loss: 0,
            half_life_ms: 60_000,
            suppress: 2500,
            reuse: 750,
            min_stable_ms: 1000,
            cap: 8000,
        }),
        ..Default::default()
    })?;
    let hosts = p.hosts();
    let all: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let by_bucket = sources_by_bucket(&p);
    let mut out = Vec::new();
    for t in 0..trials {
        let map = wait_converged(&p, &all, Duration::from_secs(60))?;
        let victim = hosts[t % hosts.len()].clone();
        let pick = |mine: bool, n: usize| -> Vec<Ipv4Addr> {
            by_bucket
                .iter()
                .filter(|(b, _)| (map[**b as usize] == victim) == mine)
                .filter_map(|(_, s)| s.first().copied())
                .take(n)
                .collect()
        };
        let victim_sources = pick(true, usize::MAX);
        let other_sources = pick(false, 8);
        let client = p.client();
        let trial = measure(&client, &victim, &victim_sources, &other_sources, || {
            p.crash(&victim)
        })?;
        eprintln!(
            "  trial {:>2}: {victim} ({} buckets) failover {:>6.1} ms, {:.1} failed probes per source, {} elsewhere",
            t + 1,
            victim_sources.len(),
            trial.failover.as_secs_f64() * 1e3,
            trial.failed_per_source,
            trial.failed_elsewhere.unwrap_or(0)
        );
        out.push(trial);
        p.revive(&victim)?;
    }
    Ok(Config {
        name,
        trials: out,
        note: "3 hosts, 32 buckets; one probe source per bucket of the victim".into(),
    })
}

// ------------------------------------------------------------------ keepalived

/// keepalived (parent and VRRP child) in a host namespace.
struct Keepalived {
    dir: PathBuf,
    child: Option<Child>,
}

impl Keepalived {
    fn start(
        net: &ScenarioNet,
        i: usize,
        dir: &Path,
        advert: &str,
        version: u8,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let conf = dir.join("keepalived.conf");
        let v3 = if version == 3 {
            "  vrrp_version 3\n"
        } else {
            ""
        };
        std::fs::write(
            &conf,
            format!(
                "global_defs {{\n  router_id h{host}\n{v3}}}\n\
                 vrrp_instance VI_1 {{\n  state BACKUP\n  nopreempt\n  interface eth0\n  \
                 virtual_router_id {vrid}\n  priority {prio}\n  advert_int {advert}\n  \
                 virtual_ipaddress {{\n    {vip}/16 dev eth0\n  }}\n}}\n",
                host = i + 1,
                vrid = net.k,
                prio = 150 - 50 * i,
                vip = net.vip(),
            ),
        )?;
        // A boot starts with an empty /run: no pid files (the killed VRRP child
        // may still be an unreaped zombie, which keepalived takes for running).
        for f in ["keepalived.log", "keepalived.pid", "vrrp.pid"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        let log = std::fs::File::create(dir.join("keepalived.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &net.hosts[i].name])
            .arg("keepalived")
            .args(["-n", "-l", "-D", "-G", "-P", "-f"])
            .arg(&conf)
            .arg("-p")
            .arg(dir.join("keepalived.pid"))
            .arg("-r")
            .arg(dir.join("vrrp.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting keepalived (apt-get install keepalived)")?;
        Ok(Keepalived {
            dir: dir.to_path_buf(),
            child: Some(child),
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("keepalived.log")).unwrap_or_default()
    }

    /// SIGKILL both processes (the parent would restart a lone VRRP child).
    fn kill(&mut self) {
        let vrrp = std::fs::read_to_string(self.dir.join("vrrp.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(pid) = vrrp {
            // SAFETY: the VRRP child of the keepalived we started.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for Keepalived {
    fn drop(&mut self) {
        self.kill();
    }
}

fn keepalived(
    name: &'static str,
    advert: &str,
    version: u8,
    trials: usize,
) -> anyhow::Result<Config> {
    eprintln!("== {name}");
    let mut net = ScenarioNet::new(2, 8)?;
    let tmp = tempfile::tempdir()?;
    let accepted: Accepted = Arc::default();
    let vip = net.vip();
    let start_servers = |net: &ScenarioNet, i: usize| {
        Servers::start(
            &net.hosts[i],
            &format!("h{}", i + 1),
            vip,
            PORT,
            accepted.clone(),
        )
    };
    let mut servers: Vec<Option<Servers>> = Vec::new();
    let mut kas: Vec<Keepalived> = Vec::new();
    for i in 0..2 {
        servers.push(Some(start_servers(&net, i)?));
        kas.push(Keepalived::start(
            &net,
            i,
            &tmp.path().join(format!("h{}", i + 1)),
            advert,
            version,
        )?);
    }
    let client: Arc<NetnsClient> = Arc::new(net.client_side(PORT)?);
    let sources: Vec<Ipv4Addr> = client.sources().into_iter().take(4).collect();
    let master = |client: &Arc<NetnsClient>| -> Option<usize> {
        let r = client.connect_round(&sources[..1], Duration::from_millis(500));
        let h = r[0].answer()?;
        h.strip_prefix('h')?.parse::<usize>().ok().map(|n| n - 1)
    };
    let mut out = Vec::new();
    for t in 0..trials {
        let m = poll(Duration::from_secs(30), "a keepalived master", || {
            master(&client)
        })?;
        let backup = 1 - m;
        poll(
            Duration::from_secs(30),
            "the other host in BACKUP state",
            || {
                kas[backup]
                    .log()
                    .contains("Entering BACKUP STATE")
                    .then_some(())
            },
        )
        .with_context(|| format!("h{}'s keepalived log:\n{}", backup + 1, kas[backup].log()))?;
        let victim = format!("h{}", m + 1);
        let trial = measure(&client, &victim, &sources, &[], || {
            net.set_link(m, false)?;
            kas[m].kill();
            drop(servers[m].take());
            Ok(())
        })?;
        eprintln!(
            "  trial {:>2}: {victim} failover {:>7.1} ms, {:.1} failed probes per source",
            t + 1,
            trial.failover.as_secs_f64() * 1e3,
            trial.failed_per_source
        );
        out.push(trial);
        // Boot the victim again: a fresh namespace (the VIP a killed keepalived
        // leaves on the interface is gone), servers, keepalived as backup.
        net.reboot_host(m)?;
        servers[m] = Some(start_servers(&net, m)?);
        kas[m] = Keepalived::start(&net, m, &tmp.path().join(&victim), advert, version)?;
    }
    Ok(Config {
        name,
        trials: out,
        note: "2 hosts, active/backup, nopreempt; 4 probe sources".into(),
    })
}

// ------------------------------------------------------------------ reporting

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    // Nearest rank.
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn table(configs: &[Config]) -> String {
    let mut s = String::from(
        "| configuration | trials | failover p50 | p99 | max | failed probes per source per crash (mean) | failed connections on healthy hosts | setup |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for c in configs {
        let ms: Vec<f64> = c
            .trials
            .iter()
            .map(|t| t.failover.as_secs_f64() * 1e3)
            .collect();
        let failed: f64 = c.trials.iter().map(|t| t.failed_per_source).sum::<f64>()
            / c.trials.len().max(1) as f64;
        let elsewhere = if c.trials.iter().any(|t| t.failed_elsewhere.is_some()) {
            c.trials
                .iter()
                .filter_map(|t| t.failed_elsewhere)
                .sum::<usize>()
                .to_string()
        } else {
            "n/a (one host serves all)".into()
        };
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.1} | {} | {} |",
            c.name,
            ms.len(),
            pct(&ms, 0.5),
            pct(&ms, 0.99),
            pct(&ms, 1.0),
            failed,
            elsewhere,
            c.note
        );
    }
    s.push_str(
        "\nFailover: from the crash (link down, agent or keepalived SIGKILLed, servers stopped) to \
         every one of the victim's buckets accepting a new TCP connection on a surviving host, \
         probed every 10 ms per source (300 ms probe timeout). Percentiles by nearest rank: \
         with 20 trials p99 is the maximum.\n",
    );
    s
}

fn chart(configs: &[Config], out: &Path) -> anyhow::Result<()> {
    let mut summary = String::new();
    let mut tics = Vec::new();
    for (i, c) in configs.iter().enumerate() {
        let ms: Vec<f64> = c
            .trials
            .iter()
            .map(|t| t.failover.as_secs_f64() * 1e3)
            .collect();
        let _ = writeln!(summary, "{i},{:.1},{:.1}", pct(&ms, 0.5), pct(&ms, 0.99));
        tics.push(format!(
            "\"{}\" {i}",
            c.name.replace(" (", "\\n(").replace(", ", "\\n")
        ));
    }
    // The chart's inputs other than failover.csv are scratch files.
    let scratch = tempfile::tempdir()?;
    std::fs::write(scratch.path().join("summary.csv"), summary)?;
    let script = format!(
        "set terminal pngcairo size 1000,560 font 'sans,10'\n\
         set output '{png}'\n\
         set datafile separator ','\n\
         set title 'Host failover: crash to every bucket served elsewhere (client probes every 10 ms)'\n\
         set ylabel 'failover time (ms, log scale)'\n\
         set logscale y\n\
         set yrange [50:10000]\n\
         set grid ytics mytics\n\
         set xrange [-0.5:{max}.5]\n\
         set xtics noenhanced ({tics})\n\
         set bmargin 5\n\
         set key top left\n\
         plot '{csv}' using ($1 + ($2 - 9.5) * 0.02):3 with points pt 7 ps 0.7 lc rgb '#4477aa' title 'trial', \\\n\
              '{sum}' using 1:2 with points pt 5 ps 1.6 lc rgb '#228833' title 'p50', \\\n\
              '{sum}' using 1:3 with points pt 9 ps 1.6 lc rgb '#cc3311' title 'p99'\n",
        png = out.join("failover.png").display(),
        max = configs.len().saturating_sub(1),
        tics = tics.join(", "),
        csv = out.join("failover.csv").display(),
        sum = scratch.path().join("summary.csv").display(),
    );
    let script_path = scratch.path().join("failover.gnuplot");
    std::fs::write(&script_path, script)?;
    let st = Command::new("gnuplot")
        .arg(&script_path)
        .status()
        .context("running gnuplot (apt-get install gnuplot-nox)")?;
    if !st.success() {
        bail!("gnuplot failed: {st}");
    }
    Ok(())
}

//! Failure scenarios (issue 7), written against the
//! [`HostProvider`](vipshare_integration::scenario::HostProvider) interface and
//! run here on the network-namespace lab ([`NetnsProvider`]). Every scenario
//! judges the data plane from the client side: each connection must get an
//! answer, from the host that owns its bucket in `vipsharectl buckets --json`
//! (bucket computed with `vipshare_core::bucket::bucket_of`), and no connection
//! may be reset. What `dataplane.rs` already proves (predicted host for every
//! source, agent SIGKILL/SIGSTOP, one long-lived connection across a drain, an
//! agent restart without a gap) is not repeated.
//!
//! Needs root; build the binaries first (`cargo build --workspace --bins`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use vipshare_integration::scenario::{
    bucket_map, check_predicted, judge, members, members_via, parse_bucket_map, pick_sources, poll,
    sources_by_bucket, status, status_via, wait_converged, wait_leader, wait_rejoined, ClientSide,
    Ctl, DoubleWatch, HostProvider, LabOptions, LoadGen, LongLived, MapWatch, NetnsProvider,
};

type R = anyhow::Result<()>;

/// Damping's default `min_stable_ms`: a fenced member's heartbeats must be
/// steady this long before it is re-admitted.
const MIN_STABLE: Duration = Duration::from_secs(5);
/// The default controller promise L_c (611 ms) rounded up: no fence before it.
const PROMISE: Duration = Duration::from_millis(650);
/// Load: each source opens a new connection this often.
const EVERY: Duration = Duration::from_millis(100);
/// A probe may wait for one SYN retransmission (1 s) and then some.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How far the followed bucket map (`vipsharectl watch`, timestamped on
/// arrival) may lag the kernels on a loaded 2-core machine; exclusivity itself
/// is checked without slack by the double-answer watch.
const SLACK: Duration = Duration::from_millis(1000);
const CONVERGE: Duration = Duration::from_secs(30);

/// Home-bucket checks: a returning host gets its own buckets back. Strict after
/// a crash (failover keeps the home); after a drain or a restart (which drains)
/// the buckets' homes move with them, so undrain rebalances to *some* buckets:
/// reported, not failed (a known limitation, see the closing note).
fn homes_check(strict: bool, ok: bool, what: String) -> R {
    if ok {
        return Ok(());
    }
    ensure!(!strict, "{what}");
    eprintln!("NOTE (homes after drain): {what}");
    Ok(())
}

fn names<P: HostProvider>(p: &P) -> Vec<String> {
    p.hosts()
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn except<'a>(v: &'a [String], gone: &str) -> Vec<&'a str> {
    v.iter()
        .map(String::as_str)
        .filter(|h| *h != gone)
        .collect()
}

fn lab(o: LabOptions) -> NetnsProvider {
    NetnsProvider::start(o).expect("lab")
}

/// Runs `f` on the provider; on failure panics while the provider is alive, so
/// its drop prints the controller and agent logs.
fn run<P: HostProvider>(name: &str, p: &mut P, f: impl FnOnce(&mut P) -> R) {
    let t = Instant::now();
    let r = f(p);
    eprintln!("[{name}] finished in {:.1?}: {r:?}", t.elapsed());
    r.unwrap();
}

/// Waits until the load generator has finished at least `n` probes.
fn warm_up(load: &LoadGen, n: usize) -> R {
    poll(Duration::from_secs(10), "first probes", || {
        (load.count() >= n).then_some(())
    })
}

/// Lets the load run for `d` more (an observation window, not a synchronisation).
fn observe(d: Duration) {
    std::thread::sleep(d);
}

// ------------------------------------------------------------------ 1. steady state

/// With weights 100/200/100 on 64 buckets each member owns exactly its share
/// (16/32/16: the policy's floor = ceil here), and the client's answers split
/// accordingly: exactly as predicted by bucket_of + the map, and within
/// 3.5 binomial standard deviations of w/W per host (sources hash to buckets
/// independently, so a host's answer count over N sources is Binomial(N, its
/// bucket fraction); 3.5 sigma makes a false failure ~5e-4 per host for a
/// well-spread hash), plus its bucket fraction's own distance from w/W (at
/// most 1/B). Then 2 s of load moves nothing.
fn steady_state<P: HostProvider>(p: &mut P, weights: &[u32]) -> R {
    let hosts = names(p);
    let map = wait_converged(p, &refs(&hosts), CONVERGE)?;
    let total: u32 = weights.iter().sum();
    let b = p.bucket_count() as f64;
    let buckets: BTreeMap<&String, usize> = hosts
        .iter()
        .map(|h| (h, map.iter().filter(|o| *o == h).count()))
        .collect();
    for (h, w) in hosts.iter().zip(weights) {
        let share = b * *w as f64 / total as f64;
        let n = buckets[h] as f64;
        ensure!(
            n >= share.floor() && n <= share.ceil(),
            "{h} owns {n} buckets, share {share}"
        );
    }
    let sources = p.client().sources();
    let n = sources.len() as f64;
    let probes = p.client().connect_round(&sources, PROBE_TIMEOUT);
    let mut predicted: BTreeMap<&str, usize> = BTreeMap::new();
    let mut answered: BTreeMap<String, usize> = BTreeMap::new();
    let mut wrong = Vec::new();
    for pr in &probes {
        let want = map[p.bucket_of(pr.src) as usize].as_str();
        *predicted.entry(want).or_default() += 1;
        match pr.answer() {
            Some(h) => *answered.entry(h.to_string()).or_default() += 1,
            None => wrong.push(format!("{}: {:?}", pr.src, pr.outcome)),
        }
        if pr.answer() != Some(want) {
            wrong.push(format!("{}: {:?}, want {want}", pr.src, pr.outcome));
        }
    }
    ensure!(wrong.is_empty(), "wrong answers: {wrong:#?}");
    for (h, w) in hosts.iter().zip(weights) {
        let expect = *w as f64 / total as f64;
        let got = answered.get(h).copied().unwrap_or(0) as f64 / n;
        let bucket_frac = buckets[h] as f64 / b;
        let tol =
            3.5 * (bucket_frac * (1.0 - bucket_frac) / n).sqrt() + (bucket_frac - expect).abs();
        eprintln!(
            "[steady] {h}: weight {w}, {} buckets, {:.1}% of answers (expected {:.1}% +- {:.1})",
            buckets[h],
            got * 100.0,
            expect * 100.0,
            tol * 100.0
        );
        ensure!(
            (got - expect).abs() <= tol,
            "{h} answered {got:.3} of the connections, weight share {expect:.3}, tolerance {tol:.3}"
        );
        ensure!(
            answered.get(h) == predicted.get(h.as_str()),
            "{h}: {:?} answers, {:?} predicted",
            answered.get(h),
            predicted.get(h.as_str())
        );
    }
    // Steady: load for a while, nothing moves, every connection answered by its owner.
    let watch = MapWatch::start(p.ctl());
    let load = LoadGen::start(
        &p.client(),
        pick_sources(p, &map, &[], 2),
        EVERY,
        PROBE_TIMEOUT,
    );
    warm_up(&load, 100)?;
    observe(Duration::from_secs(2));
    let probes = load.finish();
    let history = watch.finish();
    ensure!(
        history.moved_from(&map).is_empty(),
        "buckets moved in steady state"
    );
    let report = judge(&probes, &history, |s| p.bucket_of(s), SLACK, |_, _| false);
    eprintln!("[steady] {}", report.summary());
    report.assert_clean("steady state");
    Ok(())
}

#[test]
fn steady_state_split_follows_the_weights() {
    let weights = [100, 200, 100];
    let mut p = lab(LabOptions {
        hosts: 3,
        weights: weights.to_vec(),
        sources: 500,
        buckets: 64,
        ..Default::default()
    });
    run("steady state", &mut p, |p| steady_state(p, &weights));
}

// ------------------------------------------------------------------ 2. crash and return

/// A host crashes (agent and server killed, link down) under load: only its
/// buckets move, to the others; only connections to it fail, and only until
/// its buckets are served elsewhere. It boots again: re-admitted no earlier
/// than the damping's min-stable time, and its home buckets come back (shares
/// are whole numbers: all of them), with no failed connection. Returns, per
/// bucket of the victim, the time from the crash to its first answer elsewhere.
fn crash_and_return<P: HostProvider>(
    p: &mut P,
    victim: &str,
    strict_homes: bool,
) -> anyhow::Result<Vec<Duration>> {
    let hosts = names(p);
    let m0 = wait_converged(p, &refs(&hosts), CONVERGE)?;
    let sources = pick_sources(p, &m0, &[], 2);
    let watch = MapWatch::start(p.ctl());
    let load = LoadGen::start(&p.client(), sources.clone(), EVERY, PROBE_TIMEOUT);
    warm_up(&load, sources.len())?;

    let crashed = Instant::now();
    p.crash(victim)?;
    let m1 = wait_converged(p, &except(&hosts, victim), CONVERGE)?;
    let failed_over = Instant::now();
    let ms = members(p)?;
    ensure!(ms[victim].state == "down", "{victim}: {:?}", ms[victim]);
    for (b, (was, now)) in m0.iter().zip(&m1).enumerate() {
        if was == victim {
            ensure!(now != victim, "bucket {b} still {victim}'s");
        } else {
            ensure!(now == was, "bucket {b} moved from {was} to {now}");
        }
    }

    let revived = Instant::now();
    p.revive(victim)?;
    let readmitted = poll(Duration::from_secs(30), "re-admission", || {
        let m = members(p).ok()?;
        (m.get(victim)?.state == "active").then(Instant::now)
    })?;
    let m2 = wait_converged(p, &refs(&hosts), CONVERGE)?;
    let back = Instant::now();
    observe(Duration::from_secs(1));
    let probes = load.finish();
    let history = watch.finish();

    let victim_buckets: BTreeSet<u32> = (0..m0.len() as u32)
        .filter(|&b| m0[b as usize] == victim)
        .collect();
    let report = judge(
        &probes,
        &history,
        |s| p.bucket_of(s),
        SLACK,
        |pr, b| victim_buckets.contains(&b) && pr.done >= crashed && pr.sent <= failed_over,
    );
    // The first answer from a new owner, per victim bucket: the earliest
    // answer, not the answer to the earliest probe (which waited for its SYN's
    // retransmission, 1 s after it was sent).
    let mut first_new: BTreeMap<u32, Duration> = BTreeMap::new();
    for pr in probes.iter().filter(|pr| pr.sent >= crashed) {
        let b = p.bucket_of(pr.src);
        if victim_buckets.contains(&b) && pr.answer().is_some_and(|h| h != victim) {
            let t = pr.done - crashed;
            first_new
                .entry(b)
                .and_modify(|f| *f = t.min(*f))
                .or_insert(t);
        }
    }
    eprintln!(
        "[crash] {victim} crashed: every bucket answered elsewhere after {:?} (map converged after {:?}); \
         revived, re-admitted after {:?}, home buckets back after {:?}; {}",
        first_new.values().max(),
        failed_over - crashed,
        readmitted - revived,
        back - revived,
        report.summary()
    );
    report.assert_clean("crash and return");
    ensure!(
        readmitted - revived >= MIN_STABLE,
        "{victim} re-admitted {:?} after it came back, before min_stable",
        readmitted - revived
    );
    let not_home: Vec<usize> = (0..m0.len()).filter(|&b| m2[b] != m0[b]).collect();
    homes_check(
        strict_homes,
        not_home.is_empty(),
        format!(
            "after {victim}'s return {} buckets are not with their owner before the crash: {not_home:?}\n{}",
            not_home.len(),
            history.changes(crashed).join("\n")
        ),
    )?;
    let silent: Vec<u32> = sources
        .iter()
        .map(|&s| p.bucket_of(s))
        .filter(|b| victim_buckets.contains(b) && !first_new.contains_key(b))
        .collect();
    ensure!(
        silent.is_empty(),
        "buckets {silent:?} of {victim} never answered elsewhere"
    );
    Ok(first_new.into_values().collect())
}

#[test]
fn host_crash_and_return() {
    let mut p = lab(LabOptions::default());
    run("crash and return", &mut p, |p| {
        let started = unix_ms();
        let m0 = wait_converged(p, &refs(&names(p)), CONVERGE)?;
        crash_and_return(p, "h2", true)?;
        // Then an operator's drain and undrain of h1, and the history of it all.
        p.ctl().run(&["drain", "h1"])?;
        wait_converged(p, &except(&names(p), "h1"), CONVERGE)?;
        p.ctl().run(&["undrain", "h1"])?;
        wait_converged(p, &refs(&names(p)), CONVERGE)?;
        history_tells_fence_drain_and_rebalance(p, &m0, started)
    });
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

fn history<P: HostProvider>(p: &P, args: &[&str]) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut all = vec!["history", "--json"];
    all.extend_from_slice(args);
    p.ctl()
        .run(&all)?
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("history line {l:?}")))
        .collect()
}

/// `vipsharectl history` after h2 crashed and returned and h1 was drained and
/// undrained: each step is there, in order, with its cause, proposer and the
/// buckets it moved; the filters keep only what they name.
fn history_tells_fence_drain_and_rebalance<P: HostProvider>(
    p: &P,
    m0: &[String],
    started: u64,
) -> R {
    let events = history(p, &[])?;
    let what = |e: &serde_json::Value| e["what"].as_str().unwrap_or("").to_string();
    let moves = |e: &serde_json::Value| -> Vec<(u64, String, String)> {
        e["moves"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                (
                    m["bucket"].as_u64().unwrap_or(u64::MAX),
                    m["from"].as_str().unwrap_or("?").to_string(),
                    m["to"].as_str().unwrap_or("?").to_string(),
                )
            })
            .collect()
    };
    let dump = || {
        events
            .iter()
            .map(|e| format!("#{} {} [{}] {:?}", e["index"], what(e), e["by"], moves(e)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let pos = |from: usize, f: &dyn Fn(&serde_json::Value) -> bool| {
        events.iter().skip(from).position(f).map(|i| i + from)
    };
    let homes_of = |h: &str| -> BTreeSet<u64> {
        (0..m0.len() as u64)
            .filter(|&b| m0[b as usize] == h)
            .collect()
    };
    // Times: proposers' clocks, within the test, in order.
    let times: Vec<u64> = events.iter().filter_map(|e| e["at_ms"].as_u64()).collect();
    ensure!(
        times.len() == events.len(),
        "events without at_ms:\n{}",
        dump()
    );
    ensure!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "times out of order:\n{}",
        dump()
    );

    let fence = pos(0, &|e| what(e).starts_with("h2 fenced"))
        .with_context(|| format!("no fence of h2:\n{}", dump()))?;
    let freed: BTreeSet<u64> = moves(&events[fence])
        .into_iter()
        .filter(|(_, f, t)| f == "h2" && t.is_empty())
        .map(|(b, ..)| b)
        .collect();
    ensure!(
        freed == homes_of("h2") && events[fence]["by"] == "leader",
        "the fence freed {freed:?}, h2 owned {:?}:\n{}",
        homes_of("h2"),
        dump()
    );
    ensure!(times[fence] >= started, "fence stamped before the test");
    ensure!(
        what(&events[fence]).contains("marked at controllers"),
        "the fence does not name the controllers that marked it:\n{}",
        dump()
    );
    let given = pos(fence + 1, &|e| {
        moves(e)
            .iter()
            .any(|(b, f, t)| freed.contains(b) && f.is_empty() && !t.is_empty())
    })
    .with_context(|| format!("the freed buckets never got owners:\n{}", dump()))?;
    let readmit = pos(given, &|e| what(e).starts_with("h2 re-admitted"))
        .with_context(|| format!("no re-admission of h2:\n{}", dump()))?;
    pos(readmit, &|e| moves(e).iter().any(|(_, _, t)| t == "h2"))
        .with_context(|| format!("nothing rebalanced to h2:\n{}", dump()))?;
    let drain = pos(readmit, &|e| what(e).starts_with("h1 drained"))
        .with_context(|| format!("no drain of h1:\n{}", dump()))?;
    ensure!(
        events[drain]["by"]
            .as_str()
            .is_some_and(|b| b.contains("admin")),
        "the drain is not the admin's:\n{}",
        dump()
    );
    let away: BTreeSet<u64> = events[drain..]
        .iter()
        .take_while(|e| !what(e).starts_with("h1 undrained"))
        .flat_map(&moves)
        .filter(|(_, f, _)| f == "h1")
        .map(|(b, ..)| b)
        .collect();
    ensure!(
        away == homes_of("h1"),
        "moved away from h1 after the drain {away:?}, it held {:?}:\n{}",
        homes_of("h1"),
        dump()
    );
    let undrain = pos(drain, &|e| what(e).starts_with("h1 undrained"))
        .with_context(|| format!("no undrain of h1:\n{}", dump()))?;
    pos(undrain, &|e| moves(e).iter().any(|(_, _, t)| t == "h1"))
        .with_context(|| format!("nothing rebalanced to h1:\n{}", dump()))?;

    // Filters.
    for e in history(p, &["--member", "h2"])? {
        let named = e["members"]
            .as_array()
            .is_some_and(|m| m.iter().any(|x| x == "h2"));
        ensure!(
            named || moves(&e).iter().any(|(_, f, t)| f == "h2" || t == "h2"),
            "--member h2 returned {e}"
        );
    }
    let b = *homes_of("h2").iter().next().context("h2 owned no bucket")?;
    let about_b = history(p, &["--bucket", &b.to_string()])?;
    ensure!(
        about_b.len() >= 3,
        "bucket {b}: freed, given, back: {about_b:?}"
    );
    for e in &about_b {
        ensure!(
            moves(e).iter().any(|(x, ..)| *x == b),
            "--bucket {b} returned {e}"
        );
    }
    ensure!(history(p, &["--limit", "2"])?.len() == 2, "--limit 2");
    eprintln!(
        "[history] {} events; {} about bucket {b}",
        events.len(),
        about_b.len()
    );
    Ok(())
}

// ------------------------------------------------------------------ 3. flapping host

/// Ten crashes of one host, each followed by a clean boot. `vipsharectl
/// cluster init` cannot set damping, so this uses the defaults (penalty 1000
/// per fence, suppress above 2500, min-stable 5 s): a crash only costs a fence
/// while the host is admitted, which takes 5 s of steady heartbeats after each
/// boot, so the first three crashes wait for re-admission (the third fence
/// suppresses it) and the remaining seven follow each other as fast as a boot
/// and a few heartbeats allow. The host must end suppressed and stay out while
/// healthy for longer than min-stable; connections in buckets the flapper did
/// not own at the time must all be answered; and (see `homes_check`)
/// no bucket that was not the flapper's may change owner at any sample.
fn flapping<P: HostProvider>(p: &mut P, flapper: &str, crashes: usize, strict_homes: bool) -> R {
    let hosts = names(p);
    let m0 = wait_converged(p, &refs(&hosts), CONVERGE)?;
    let home: usize = m0.iter().filter(|o| *o == flapper).count();
    let watch = MapWatch::start(p.ctl());
    let others = except(&hosts, flapper);
    let load = LoadGen::start(
        &p.client(),
        pick_sources(p, &m0, &others, 1),
        EVERY,
        PROBE_TIMEOUT,
    );
    warm_up(&load, 20)?;
    let started = Instant::now();
    let mut fences = 0;
    for i in 0..crashes {
        let before = members(p)?[flapper].clone();
        p.crash(flapper)?;
        if before.state == "active" {
            poll(Duration::from_secs(10), "the fence", || {
                let m = members(p).ok()?;
                (m[flapper].epoch > before.epoch).then_some(())
            })?;
            fences += 1;
        } else {
            // Not admitted: nothing to fence; its heartbeats just stop.
            poll(Duration::from_secs(5), "heartbeats to stop", || {
                (members(p).ok()?[flapper].last_ack_ms_ago > PROMISE.as_millis() as u64)
                    .then_some(())
            })?;
        }
        p.revive(flapper)?;
        let m = members(p)?[flapper].clone();
        eprintln!(
            "[flap] crash {} at +{:.1?}: {} (penalty {:.0}, epoch {}), booted again",
            i + 1,
            started.elapsed(),
            m.state,
            m.penalty,
            m.epoch
        );
        if m.state == "suppressed" {
            poll(Duration::from_secs(10), "heartbeats again", || {
                (members(p).ok()?[flapper].last_ack_ms_ago < 300).then_some(())
            })?;
        } else {
            poll(
                Duration::from_secs(30),
                "re-admission with its buckets",
                || {
                    let m = members(p).ok()?;
                    (m[flapper].state == "active" && m[flapper].buckets as usize == home)
                        .then_some(())
                },
            )?;
            wait_converged(p, &refs(&hosts), CONVERGE)?;
        }
    }
    let flapped = started.elapsed();
    // Suppressed, and it stays out although healthy for longer than min-stable.
    let hold = Instant::now();
    while hold.elapsed() < MIN_STABLE + Duration::from_secs(1) {
        let m = members(p)?[flapper].clone();
        ensure!(
            m.state == "suppressed" && m.buckets == 0,
            "{flapper} after {crashes} crashes: {m:?}"
        );
        ensure!(
            m.last_ack_ms_ago < 1000,
            "{flapper} not heartbeating: {m:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let end = members(p)?[flapper].clone();
    ensure!(end.returns_in_ms > 0, "{end:?}");
    let history = watch.finish();
    let probes = load.finish();
    let mut moved = Vec::new();
    for (t, m) in &history.samples {
        for (b, (now, was)) in m.iter().zip(&m0).enumerate() {
            if was != flapper && now != was {
                moved.push(format!(
                    "bucket {b}: {was} -> {now} at +{:?}",
                    t.saturating_duration_since(started)
                ));
            }
        }
    }
    homes_check(
        strict_homes,
        moved.is_empty(),
        format!(
            "others' buckets moved: {} times\nmap changes:\n{}",
            moved.len(),
            history.changes(started).join("\n")
        ),
    )?;
    // Only connections in a bucket the flapper owned at the time may fail
    let report = judge(
        &probes,
        &history,
        |s| p.bucket_of(s),
        SLACK,
        |pr, b| {
            let from = pr.sent.checked_sub(SLACK).unwrap_or(pr.sent);
            history
                .owners_between(b, from, pr.done + SLACK)
                .contains(flapper)
        },
    );
    eprintln!(
        "[flap] {crashes} crashes in {flapped:.1?}, {fences} fences; {flapper} ends {} (penalty {:.0}, back in {:.0} s); \
         {} map samples, other hosts' buckets moved {} times; {}",
        end.state,
        end.penalty,
        end.returns_in_ms as f64 / 1e3,
        history.samples.len(),
        moved.len(),
        report.summary()
    );
    report.assert_clean("connections to the other hosts");
    Ok(())
}

#[test]
fn flapping_host_ends_suppressed_and_moves_nobody_else() {
    let mut p = lab(LabOptions::default());
    run("flapping", &mut p, |p| flapping(p, "h3", 10, true));
}

// ------------------------------------------------------------------ 4. leader SIGKILL

/// The leader controller is SIGKILLed under load, a new one is elected, the
/// old one comes back: no connection fails, no bucket moves, no member is
/// fenced.
fn leader_killed<P: HostProvider>(p: &mut P) -> R {
    let hosts = names(p);
    let m0 = wait_converged(p, &refs(&hosts), CONVERGE)?;
    let epochs: Vec<u64> = members(p)?.values().map(|m| m.epoch).collect();
    let watch = MapWatch::start(p.ctl());
    let sources = pick_sources(p, &m0, &[], 2);
    let load = LoadGen::start(&p.client(), sources.clone(), EVERY, PROBE_TIMEOUT);
    warm_up(&load, sources.len())?;
    let old = wait_leader(p, Duration::from_secs(10))?;
    let killed = Instant::now();
    p.kill_controller(old)?;
    let new = poll(Duration::from_secs(15), "a new leader", || {
        let l = status(p).ok()?["leader_id"].as_u64()?;
        (l != 0 && l != old).then_some(l)
    })?;
    let elected = killed.elapsed();
    observe(Duration::from_secs(2));
    p.start_controller(old)?;
    wait_rejoined(p, old, Duration::from_secs(30))?;
    let rejoined = killed.elapsed();
    observe(Duration::from_secs(1));
    let probes = load.finish();
    let history = watch.finish();
    let report = judge(&probes, &history, |s| p.bucket_of(s), SLACK, |_, _| false);
    eprintln!(
        "[leader] killed leader {old}: {new} elected after {elected:?}, {old} rejoined after {rejoined:?}; {}",
        report.summary()
    );
    report.assert_clean("connections while the leader died");
    let moved = history.moved_from(&m0);
    ensure!(moved.is_empty(), "buckets moved: {moved:?}");
    let after: Vec<u64> = members(p)?.values().map(|m| m.epoch).collect();
    ensure!(
        after == epochs,
        "members fenced: epochs {epochs:?} -> {after:?}"
    );
    Ok(())
}

#[test]
fn leader_sigkill_under_load_fails_no_connection() {
    let mut p = lab(LabOptions::default());
    run("leader kill", &mut p, leader_killed);
}

// ------------------------------------------------------------------ 5. asymmetric partition

/// One host loses the leader only (its traffic to and from the leader's
/// address is dropped in the host). The followers still ack its heartbeats, so
/// its lease holds and no majority agrees to fence it: it keeps serving its
/// buckets, and no bucket is ever accepted by two hosts (UDP rounds from every
/// source, and the kernel sets sampled every 50 ms).
fn asymmetric_partition<P: HostProvider>(p: &mut P, host: &str) -> R {
    let hosts = names(p);
    let m0 = wait_converged(p, &refs(&hosts), CONVERGE)?;
    let mine: BTreeSet<u32> = (0..m0.len() as u32)
        .filter(|&b| m0[b as usize] == host)
        .collect();
    let leader = wait_leader(p, Duration::from_secs(10))?;
    let double = DoubleWatch::start(&p.client(), p.client().sources());
    let watch = MapWatch::start(p.ctl());
    let load = LoadGen::start(
        &p.client(),
        pick_sources(p, &m0, &[], 1),
        EVERY,
        PROBE_TIMEOUT,
    );
    warm_up(&load, 20)?;
    let mut overlaps = Vec::new();
    let mut gaps = Vec::new();
    let mut sample = |p: &P, phase: &str, at: Duration| {
        let sets: Vec<(String, BTreeSet<u32>)> = hosts
            .iter()
            .map(|h| (h.clone(), p.kernel_owned(h).unwrap_or_default()))
            .collect();
        for (i, (a, sa)) in sets.iter().enumerate() {
            for (b, sb) in &sets[i + 1..] {
                let both: Vec<&u32> = sa.intersection(sb).collect();
                if !both.is_empty() {
                    overlaps.push(format!("{phase} +{at:?}: {a} and {b} both hold {both:?}"));
                }
            }
        }
        let held = &sets.iter().find(|(h, _)| h == host).expect("host").1;
        if held != &mine {
            gaps.push(format!("{phase} +{at:?}: {host} holds {held:?}"));
        }
    };
    // The leader's own view of the host (reads answered by the leader alone).
    let mut at_leader = p.ctl();
    at_leader.controllers = vec![p.controller_address(leader)];
    let before = members_via(&at_leader)?[host].clone();
    let mut leader_silence = 0;
    let mut leader_view = Vec::new();
    p.partition_from(host, leader)?;
    let cut = Instant::now();
    // Long enough for several lease renewals and fence attempts (L_c = 611 ms,
    // the leader retries every 300 ms).
    let mut last_read = Instant::now();
    while cut.elapsed() < Duration::from_secs(4) {
        sample(p, "partitioned", cut.elapsed());
        if last_read.elapsed() > Duration::from_millis(300) {
            last_read = Instant::now();
            if let Ok(m) = members_via(&at_leader) {
                let m = &m[host];
                leader_silence = leader_silence.max(m.last_ack_ms_ago);
                if m.state != before.state || m.epoch != before.epoch {
                    leader_view.push(format!("+{:?}: {m:?}", cut.elapsed()));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    p.heal()?;
    let healed = Instant::now();
    while healed.elapsed() < Duration::from_secs(1) {
        sample(p, "healed", healed.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    let probes = load.finish();
    let history = watch.finish();
    let (doubles, rounds) = double.finish();
    let report = judge(&probes, &history, |s| p.bucket_of(s), SLACK, |_, _| false);
    let served_by_it = probes
        .iter()
        .filter(|pr| pr.sent >= cut && mine.contains(&p.bucket_of(pr.src)))
        .filter(|pr| pr.answer() == Some(host))
        .count();
    eprintln!(
        "[partition] {host} cut off from leader {leader} for 4 s: {rounds} UDP rounds, {} doubles, \
         {} kernel overlaps, {} gaps in its set; {served_by_it} connections to its buckets answered by it; \
         the leader heard nothing from it for up to {leader_silence} ms and did not fence it; {}",
        doubles.len(),
        overlaps.len(),
        gaps.len(),
        report.summary()
    );
    ensure!(doubles.is_empty(), "two hosts answered: {doubles:#?}");
    ensure!(overlaps.is_empty(), "kernel sets overlapped: {overlaps:#?}");
    ensure!(
        gaps.is_empty(),
        "{host}'s buckets not served by it: {gaps:#?}"
    );
    ensure!(served_by_it > 0, "no probe reached {host}'s buckets");
    ensure!(
        leader_view.is_empty(),
        "the leader changed {host}: {leader_view:#?}"
    );
    ensure!(
        leader_silence > PROMISE.as_millis() as u64,
        "the partition did not silence {host} at the leader ({leader_silence} ms)"
    );
    report.assert_clean("connections during the partition");
    let moved = history.moved_from(&m0);
    ensure!(moved.is_empty(), "buckets moved: {moved:?}");
    Ok(())
}

#[test]
fn host_cut_off_from_the_leader_only_keeps_its_buckets() {
    let mut p = lab(LabOptions::default());
    run("asymmetric partition", &mut p, |p| {
        asymmetric_partition(p, "h1")
    });
}

// ------------------------------------------------------------------ 6. planned drain

fn open_per_bucket<C: ClientSide>(
    client: &C,
    by_bucket: &BTreeMap<u32, Vec<Ipv4Addr>>,
    buckets: &BTreeSet<u32>,
) -> Vec<(u32, LongLived)> {
    buckets
        .iter()
        .filter_map(|b| Some((*b, *by_bucket.get(b)?.first()?)))
        .map(|(b, src)| (b, client.long_lived(src, Duration::from_millis(200))))
        .collect()
}

/// Waits until every connection has at least `more` answers beyond `base`.
fn wait_answers(conns: &[(u32, LongLived)], base: &[usize], more: usize) -> R {
    poll(
        Duration::from_secs(15),
        "answers on every connection",
        || {
            conns
                .iter()
                .zip(base)
                .all(|((_, c), n)| c.answers().len() >= n + more || c.ended())
                .then_some(())
        },
    )
}

fn close_all(conns: Vec<(u32, LongLived)>, want: impl Fn(u32) -> String) -> R {
    let mut bad = Vec::new();
    let n = conns.len();
    for (b, c) in conns {
        let src = c.src;
        match c.close() {
            Ok(a) if a.iter().all(|x| *x == want(b)) && a.len() >= 3 => {}
            Ok(a) => bad.push(format!(
                "{src} (bucket {b}): answers {a:?}, want {}",
                want(b)
            )),
            Err(e) => bad.push(format!("{src} (bucket {b}): {e}")),
        }
    }
    ensure!(
        bad.is_empty(),
        "{} of {n} long-lived connections: {bad:#?}",
        bad.len()
    );
    Ok(())
}

/// A planned drain with one long-lived connection in every bucket of the
/// drained host: its buckets move, every connection keeps talking to it until
/// closed. Then long-lived connections in those buckets on their new owners,
/// and an undrain: the buckets come home, those connections survive too.
fn drain_with_long_lived<P: HostProvider>(p: &mut P, host: &str) -> R {
    let hosts = names(p);
    let m0 = wait_converged(p, &refs(&hosts), CONVERGE)?;
    let mine: BTreeSet<u32> = (0..m0.len() as u32)
        .filter(|&b| m0[b as usize] == host)
        .collect();
    let by_bucket = sources_by_bucket(p);
    let client = p.client();
    let conns = open_per_bucket(&*client, &by_bucket, &mine);
    ensure!(
        conns.len() == mine.len(),
        "no client source in some of {host}'s buckets"
    );
    wait_answers(&conns, &vec![0; conns.len()], 2)?;
    let watch = MapWatch::start(p.ctl());
    let load = LoadGen::start(&client, pick_sources(p, &m0, &[], 1), EVERY, PROBE_TIMEOUT);
    warm_up(&load, 20)?;

    let drained = Instant::now();
    p.ctl().run(&["drain", host])?;
    let m1 = wait_converged(p, &except(&hosts, host), CONVERGE)?;
    let moved = drained.elapsed();
    ensure!(members(p)?[host].state == "draining");
    let base: Vec<usize> = conns.iter().map(|(_, c)| c.answers().len()).collect();
    wait_answers(&conns, &base, 3)?;
    close_all(conns, |_| host.to_string()).context("connections across the drain")?;

    // The same buckets, now on other hosts, with connections open across the undrain.
    let conns = open_per_bucket(&*client, &by_bucket, &mine);
    wait_answers(&conns, &vec![0; conns.len()], 2)?;
    let undrained = Instant::now();
    p.ctl().run(&["undrain", host])?;
    let m2 = wait_converged(p, &refs(&hosts), CONVERGE)?;
    let back = undrained.elapsed();
    let not_home = (0..m0.len()).filter(|&b| m2[b] != m0[b]).count();
    homes_check(
        false,
        not_home == 0,
        format!("after the undrain {not_home} buckets are not with their owner before the drain"),
    )?;
    let base: Vec<usize> = conns.iter().map(|(_, c)| c.answers().len()).collect();
    wait_answers(&conns, &base, 3)?;
    close_all(conns, |b| m1[b as usize].clone()).context("connections across the undrain")?;

    let probes = load.finish();
    let history = watch.finish();
    let report = judge(&probes, &history, |s| p.bucket_of(s), SLACK, |_, _| false);
    eprintln!(
        "[drain] {} long-lived connections kept across the drain of {host} ({moved:?}) and across \
         the undrain ({back:?}); {}",
        mine.len(),
        report.summary()
    );
    report.assert_clean("new connections during drain and undrain");
    Ok(())
}

#[test]
fn planned_drain_keeps_every_long_lived_connection() {
    // 600 sources: every one of the 64 buckets has one (with 200, about 3 are
    // empty on average).
    let mut p = lab(LabOptions {
        sources: 600,
        ..Default::default()
    });
    run("drain", &mut p, |p| drain_with_long_lived(p, "h1"));
}

// ------------------------------------------------------------------ 7. rolling restarts

/// Under load: every controller in turn (followers first, the leader last)
/// gets SIGTERM, is started again and rejoins (nothing moves); then every agent in turn gets SIGTERM (a planned
/// stop: it drains itself and exits 0), starts again and is undrained (its
/// home buckets come back). No connection fails.
fn rolling_restart<P: HostProvider>(p: &mut P) -> R {
    let hosts = names(p);
    let m0 = wait_converged(p, &refs(&hosts), CONVERGE)?;
    let watch = MapWatch::start(p.ctl());
    let sources = pick_sources(p, &m0, &[], 1);
    let load = LoadGen::start(&p.client(), sources.clone(), EVERY, PROBE_TIMEOUT);
    warm_up(&load, sources.len())?;
    let t = Instant::now();
    // Followers first, the leader last (the usual order for a raft group: one
    // election in all).
    let leader = wait_leader(p, Duration::from_secs(10))?;
    let mut order: Vec<u64> = p
        .controllers()
        .into_iter()
        .filter(|&c| c != leader)
        .collect();
    order.push(leader);
    for id in order {
        p.stop_controller(id)?;
        p.start_controller(id)?;
        wait_rejoined(p, id, Duration::from_secs(30))?;
        eprintln!(
            "[rolling] controller {id} restarted, rejoined at +{:.1?}",
            t.elapsed()
        );
    }
    let moved = watch.snapshot().moved_from(&m0);
    ensure!(
        moved.is_empty(),
        "controller restarts moved buckets: {moved:?}"
    );
    for h in &hosts {
        p.stop_agent(h)?;
        p.restart_agent(h)?;
        p.ctl().run(&["undrain", h])?;
        let m = wait_converged(p, &refs(&hosts), CONVERGE)?;
        let not_home = (0..m0.len()).filter(|&b| m[b] != m0[b]).count();
        homes_check(
            false,
            not_home == 0,
            format!("after {h}'s restart {not_home} buckets are not with their owner at the start"),
        )?;
        eprintln!(
            "[rolling] agent {h} restarted, home again at +{:.1?}",
            t.elapsed()
        );
    }
    let fenced: Vec<(String, u64)> = members(p)?
        .into_iter()
        .filter(|(_, m)| m.epoch != 1)
        .map(|(n, m)| (n, m.epoch))
        .collect();
    let probes = load.finish();
    let history = watch.finish();
    let report = judge(&probes, &history, |s| p.bucket_of(s), SLACK, |_, _| false);
    eprintln!(
        "[rolling] 3 controllers and {} agents restarted in {:.1?}; members fenced on the way: {fenced:?}; {}",
        hosts.len(),
        t.elapsed(),
        report.summary()
    );
    report.assert_clean("connections during the rolling restarts");
    Ok(())
}

#[test]
fn rolling_restart_of_controllers_then_agents_fails_no_connection() {
    let mut p = lab(LabOptions::default());
    run("rolling restart", &mut p, rolling_restart);
}

/// Found while writing the rolling restart: a controller's SIGTERM waits for
/// every client connection to close (tonic's graceful shutdown, no deadline).
/// A host that crashed leaves its agent's connections open on the controller
/// side (nothing will ever answer the GOAWAY), so a controller stopped while a
/// host is down should still exit promptly.
fn sigterm_while_a_host_is_down<P: HostProvider>(p: &mut P) -> R {
    let hosts = names(p);
    wait_converged(p, &refs(&hosts), CONVERGE)?;
    p.crash(&hosts[0])?;
    wait_converged(p, &except(&hosts, &hosts[0]), CONVERGE)?;
    let leader = wait_leader(p, Duration::from_secs(10))?;
    let follower = p
        .controllers()
        .into_iter()
        .find(|&c| c != leader)
        .expect("3 controllers");
    let r = p.stop_controller(follower);
    eprintln!(
        "[sigterm] controller {follower} stopped while {} is down: {r:?}",
        hosts[0]
    );
    r
}

#[test]
fn controller_exits_on_sigterm_while_a_host_is_down() {
    let mut p = lab(LabOptions {
        hosts: 2,
        ..Default::default()
    });
    run(
        "sigterm while a host is down",
        &mut p,
        sigterm_while_a_host_is_down,
    );
}

// ------------------------------------------------------------------ 8. intruder

/// Certificates from another CA, for the same cluster name and the same
/// identities (agent h1, admin "admin"); the intruder trusts the real CA (its
/// certificate is public), so only the controllers' check of the client
/// certificate stands in the way. From the client's network it tries every
/// agent call and admin mutations on every controller, and `vipsharectl`.
/// Every attempt must be refused and nothing change: map, members, answers.
fn intruder<P: HostProvider>(p: &mut P) -> R {
    use vipshare_proto::pki::{self, Role};
    use vipshare_proto::tls::{self, TlsFiles};
    use vipshare_proto::v1::admin_api_client::AdminApiClient;
    use vipshare_proto::v1::agent_api_client::AgentApiClient;
    use vipshare_proto::v1::{self as pb, mutate_request::Op};
    use vipshare_proto::PROTOCOL_VERSION;

    let hosts = names(p);
    let m0 = wait_converged(p, &refs(&hosts), CONVERGE)?;
    let members0 = members(p)?;
    let certs = p.certs_dir();
    let cluster = pki::ca_cluster(&certs.join("ca.crt"))?;
    let foreign = tempfile::tempdir()?;
    pki::init_ca(foreign.path(), &cluster, 30)?;
    pki::issue(foreign.path(), Role::Agent, "h1", &[], &[], 30)?;
    pki::issue(foreign.path(), Role::Admin, "admin", &[], &[], 30)?;
    let with_real_ca = |role, name| {
        let f = TlsFiles::in_dir(foreign.path(), role, name);
        TlsFiles {
            ca: certs.join("ca.crt"),
            ..f
        }
    };
    let agent = tls::client_config(&with_real_ca(Role::Agent, "h1"))?;
    let admin = tls::client_config(&with_real_ca(Role::Admin, "admin"))?;
    let rejected_before: Vec<usize> = p
        .controllers()
        .iter()
        .map(|id| {
            p.controller_log(*id)
                .matches("TLS connection rejected")
                .count()
        })
        .collect();
    let addresses: Vec<String> = p
        .controllers()
        .iter()
        .map(|id| p.controller_address(*id))
        .collect();
    let epoch = members0["h1"].epoch;
    let attempts: Vec<(String, Result<String, String>)> = p.client().run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let mut out = Vec::new();
            for a in &addresses {
                let uri = format!("https://{a}");
                let ch = match tls::connect_once(&uri, agent.clone()).await {
                    Ok(ch) => ch,
                    Err(e) => {
                        out.push((format!("{a} agent connect"), Err(e.to_string())));
                        continue;
                    }
                };
                let mut c = AgentApiClient::new(ch);
                let r = c
                    .heartbeat(pb::HeartbeatRequest {
                        protocol_version: PROTOCOL_VERSION,
                        assignment_index: None,
                        problems: Vec::new(),
                        member: "h1".into(),
                        member_epoch: epoch,
                        round: 1,
                    })
                    .await;
                out.push((
                    format!("{a} Heartbeat(h1)"),
                    r.map(|r| format!("{r:?}")).map_err(|s| s.to_string()),
                ));
                let r = match c
                    .watch_assignments(pb::WatchRequest {
                        protocol_version: PROTOCOL_VERSION,
                        member: "h1".into(),
                    })
                    .await
                {
                    Ok(s) => {
                        match tokio::time::timeout(Duration::from_secs(2), s.into_inner().message())
                            .await
                        {
                            Ok(Ok(Some(m))) => Ok(format!("{m:?}")),
                            Ok(Ok(None)) => Err("stream ended".into()),
                            Ok(Err(s)) => Err(s.to_string()),
                            Err(_) => Err("no assignment within 2 s".into()),
                        }
                    }
                    Err(s) => Err(s.to_string()),
                };
                out.push((format!("{a} WatchAssignments(h1)"), r));
                let r = c
                    .drain_self(pb::DrainSelfRequest {
                        protocol_version: PROTOCOL_VERSION,
                        member: "h1".into(),
                    })
                    .await;
                out.push((
                    format!("{a} DrainSelf(h1)"),
                    r.map(|r| format!("{r:?}")).map_err(|s| s.to_string()),
                ));
                let ch = match tls::connect_once(&uri, admin.clone()).await {
                    Ok(ch) => ch,
                    Err(e) => {
                        out.push((format!("{a} admin connect"), Err(e.to_string())));
                        continue;
                    }
                };
                let mut c = AdminApiClient::new(ch);
                for (what, op) in [
                    ("Drain(h1)", Op::Drain(pb::Drain { name: "h1".into() })),
                    (
                        "RemoveMember(h2)",
                        Op::RemoveMember(pb::RemoveMember { name: "h2".into() }),
                    ),
                    (
                        "AddMember(evil)",
                        Op::AddMember(pb::AddMember {
                            name: "evil".into(),
                            weight: 1000,
                        }),
                    ),
                ] {
                    let r = c
                        .mutate(pb::MutateRequest {
                            protocol_version: PROTOCOL_VERSION,
                            op: Some(op),
                        })
                        .await;
                    out.push((
                        format!("{a} Mutate {what}"),
                        r.map(|r| format!("{r:?}")).map_err(|s| s.to_string()),
                    ));
                }
                let r = c
                    .status(pb::StatusRequest {
                        protocol_version: PROTOCOL_VERSION,
                        local: true,
                    })
                    .await;
                out.push((
                    format!("{a} Status"),
                    r.map(|_| "status answered".to_string())
                        .map_err(|s| s.to_string()),
                ));
            }
            out
        })
    });
    // vipsharectl with the foreign admin certificate.
    let ctl_dir = tempfile::tempdir()?;
    std::fs::copy(certs.join("ca.crt"), ctl_dir.path().join("ca.crt"))?;
    for ext in ["crt", "key"] {
        std::fs::copy(
            foreign.path().join(format!("admin-admin.{ext}")),
            ctl_dir.path().join(format!("admin-admin.{ext}")),
        )?;
    }
    let mut ctl = p.ctl();
    ctl.tls_dir = ctl_dir.path().to_path_buf();
    let by_ctl = ctl.run(&["drain", "h1"]);

    let accepted: Vec<String> = attempts
        .iter()
        .filter_map(|(what, r)| r.as_ref().ok().map(|ok| format!("{what}: {ok}")))
        .collect();
    for (what, r) in &attempts {
        eprintln!(
            "[intruder] {what}: {}",
            r.as_ref().err().map_or("ACCEPTED", |e| e)
        );
    }
    ensure!(accepted.is_empty(), "the intruder got in: {accepted:#?}");
    ensure!(
        by_ctl.is_err(),
        "vipsharectl with a foreign certificate: {by_ctl:?}"
    );
    eprintln!("[intruder] vipsharectl drain h1: {}", by_ctl.unwrap_err());
    // Every controller logged the refused handshakes.
    for (i, id) in p.controllers().into_iter().enumerate() {
        let log = p.controller_log(id);
        let n = log.matches("TLS connection rejected").count();
        ensure!(
            n > rejected_before[i] && log.contains("unknown_ca"),
            "controller {id} logged no rejected handshake"
        );
    }
    // Nothing changed.
    ensure!(bucket_map(p)? == m0, "the bucket map changed");
    let members1 = members(p)?;
    let key = |m: &BTreeMap<String, vipshare_integration::scenario::MemberView>| {
        m.iter()
            .map(|(n, v)| (n.clone(), v.state.clone(), v.epoch, v.weight))
            .collect::<Vec<_>>()
    };
    ensure!(
        key(&members1) == key(&members0),
        "members changed: {members1:?}"
    );
    let wrong = check_predicted(p, &m0);
    ensure!(wrong.is_empty(), "answers changed: {wrong:#?}");
    Ok(())
}

#[test]
fn intruder_with_a_foreign_ca_is_refused_and_changes_nothing() {
    let mut p = lab(LabOptions {
        hosts: 2,
        ..Default::default()
    });
    run("intruder", &mut p, intruder);
}

// ------------------------------------------------------------------ 9. busy hosts

/// Failover goal with the CPUs oversubscribed (issue 13): p99 over the victims'
/// buckets of the time from a crash to the bucket's first answer elsewhere.
/// Printed, not asserted: measured 864 ms on the project's machine (debug
/// binaries), too close to hold on a slower CI machine.
const BUSY_FAILOVER_GOAL: Duration = Duration::from_secs(1);
/// What the test asserts: twice the goal. It fails on the regression it is
/// for (busy hosts lapsing or fencing late took 2.8-3.9 s) and leaves a
/// slower machine its margin.
const BUSY_FAILOVER_BOUND: Duration = Duration::from_secs(2);

/// The scenarios where busy hosts used to lapse, with the CPUs oversubscribed
/// twice by stress-ng for the whole run: steady state (nothing moves, every
/// connection answered by its owner, which a lapsing lease would break), then
/// two host crashes and returns (only the victim's buckets move; failover p99
/// printed against [`BUSY_FAILOVER_GOAL`], asserted within [`BUSY_FAILOVER_BOUND`]).
/// Ignored in the plain run (its load would disturb the scenarios running next
/// to it); `scripts/test.sh` runs it alone.
#[test]
#[ignore = "loads every CPU: run alone (scripts/test.sh does)"]
fn oversubscribed_cpus_steady_state_and_crashes() {
    // The instrument (servers, client, vipsharectl: threads and children of this
    // one) runs at the daemons' nice value, so that what fails is the product
    // starving, not the stand-in web servers the hog competes with.
    // SAFETY: setpriority on the calling thread.
    let raised = unsafe {
        libc::setpriority(
            libc::PRIO_PROCESS,
            0,
            vipshare_proto::priority::DEFAULT_NICE,
        )
    };
    assert_eq!(
        raised,
        0,
        "setpriority: {}",
        std::io::Error::last_os_error()
    );
    let hog = vipshare_integration::scenario::CpuHog::oversubscribe(2).expect("CPU load");
    let mut p = lab(LabOptions::default());
    run("busy hosts", &mut p, |p| {
        steady_state(p, &[100; 4])?;
        let mut times = crash_and_return(p, "h2", true)?;
        times.extend(crash_and_return(p, "h4", true)?);
        times.sort();
        let p99 = times[(times.len() * 99).div_ceil(100) - 1];
        eprintln!(
            "[busy] {} stress-ng workers: failover per bucket p50 {:?}, p99 {p99:?}, max {:?} \
             (n={}; goal {BUSY_FAILOVER_GOAL:?}{})",
            hog.workers,
            times[times.len() / 2],
            times[times.len() - 1],
            times.len(),
            if p99 <= BUSY_FAILOVER_GOAL {
                ", met"
            } else {
                ", NOT met"
            }
        );
        ensure!(
            p99 <= BUSY_FAILOVER_BOUND,
            "failover p99 {p99:?} with the CPUs oversubscribed, bound {BUSY_FAILOVER_BOUND:?}"
        );
        Ok(())
    });
}

// ------------------------------------------------------------------ 10. restart after a drain, a controller lagging

/// How long the restarted agent is watched while the controller still lags,
/// counted from its first heartbeat acked after the restart.
const LAGGING_WINDOW: Duration = Duration::from_secs(4);
/// Restarts of the drained host's agent while the controller lags: each one
/// more chance for stale grants to meet a lease (an agent without floors
/// installed them in 4 of 5 single restarts).
const RESTARTS: usize = 3;

/// What the controllers said at one moment (see the lagging-controller scenario).
struct Seen {
    at: Instant,
    lagging_applied: Option<u64>,
    fresh_ack_ms: Option<u64>,
    lagging_ack_ms: Option<u64>,
}

/// How long ago the first controller of `ctl` last acked `host`, in its own
/// view (`members --local`: no quorum read, so a cut-off controller answers).
fn local_ack_ms(ctl: &Ctl, host: &str) -> Option<u64> {
    let j = ctl.run(&["members", "--json", "--local"]).ok()?;
    let v: serde_json::Value = serde_json::from_str(&j).ok()?;
    v["members"]
        .as_array()?
        .iter()
        .find(|m| m["name"].as_str() == Some(host))?["last_ack_ms_ago"]
        .as_u64()
}

/// Controller `id`'s applied index in a `status --json` answer.
fn applied_of(s: &serde_json::Value, id: u64) -> Option<u64> {
    s["controllers"]
        .as_array()?
        .iter()
        .find(|c| c["id"].as_u64() == Some(id))?["applied_index"]
        .as_u64()
}

/// Issue 10: a host is drained while one controller lags (its traffic to and
/// from the other controllers is dropped, so its applied state still has the
/// host owning all its buckets, and it keeps streaming that to the host's
/// agent, which still reaches it). Once the buckets are released and
/// transferred, the host's agent is SIGKILLed and started at once, three
/// times, while the controller still lags: it never installs a bucket it
/// released, since the floors it persisted before confirming the releases
/// refuse the stale grants.
///
/// Left alone, a restarted agent gets the fresh assignment within
/// milliseconds of the stale one and before any lease (which needs an
/// up-to-date controller's ack, and that controller's stream shares the
/// connection and was opened first), so the floors would never be put to the
/// test. Hence the host starts cut off from the controllers that keep up
/// (connections refused): the agent takes the lagging controller's grants
/// (asserted from its log), and when one of the others comes back just after
/// refusing its assignment stream, that stream waits out its backoff while
/// the heartbeats get through: acks from it and from the lagging controller
/// make a lease while the newest grants the agent holds are the stale ones.
/// An agent without floors installs all of them then (for a millisecond or
/// two, until the fresh assignment arrives; whether the heartbeat or the
/// stream gets through first after the return is a race, which the heartbeat
/// won in 4 of 5 single restarts, hence three). The host is back in well under
/// the controllers' promise, so it is not fenced (asserted: a new epoch would
/// drop the stale grants for another reason).
///
/// Checked in the host's kernel: every element added to its set from the
/// transfer on (`nft monitor`, no sampling gap), and its set sampled every
/// 50 ms; from the client side: no source answered by two hosts (UDP rounds
/// from every source), every TCP probe answered by the bucket's owner, none
/// sent after the transfer by the drained host. The lag is checked, not
/// assumed: the lagging controller's applied index stays below the drain's
/// index throughout while the others apply the drain and the transfer, and
/// its own map still gives the host its buckets.
fn restart_after_drain_with_a_lagging_controller<P: HostProvider>(
    p: &mut P,
    host: &str,
    lag_rules: impl Fn(&P) -> String,
    agent_log: impl Fn(&P, &str) -> String,
) -> R {
    let hosts = names(p);
    let m0 = wait_converged(p, &refs(&hosts), CONVERGE)?;
    let mine: BTreeSet<u32> = (0..m0.len() as u32)
        .filter(|&b| m0[b as usize] == host)
        .collect();
    let leader = wait_leader(p, Duration::from_secs(10))?;
    // A follower, the last one: vipsharectl tries the controllers in order.
    let lagging = p
        .controllers()
        .into_iter()
        .filter(|&c| c != leader)
        .max()
        .context("no follower")?;
    // Reads through the controllers that keep up, and the lagging one's own view.
    let mut fresh = p.ctl();
    fresh.controllers = p
        .controllers()
        .into_iter()
        .filter(|&c| c != lagging)
        .map(|c| p.controller_address(c))
        .collect();
    let mut at_lagging = p.ctl();
    at_lagging.controllers = vec![p.controller_address(lagging)];
    let lagging_applied =
        || -> Option<u64> { status_via(&at_lagging, true).ok()?["applied_index"].as_u64() };

    let double = DoubleWatch::start(&p.client(), p.client().sources());
    let watch = MapWatch::start(fresh.clone());
    let sources = pick_sources(p, &m0, &[], 2);
    let load = LoadGen::start(&p.client(), sources.clone(), EVERY, PROBE_TIMEOUT);
    warm_up(&load, sources.len())?;

    let epoch_before = members_via(&fresh)?[host].epoch;
    let t0 = Instant::now();
    p.lag_controller(lagging)?;
    let lag_from = poll(
        Duration::from_secs(10),
        "the lagging controller's index",
        &lagging_applied,
    )?;
    let out = fresh.run(&["drain", host])?;
    let drain_index: u64 = out
        .trim()
        .strip_prefix("ok: applied at index ")
        .and_then(|i| i.parse().ok())
        .with_context(|| format!("drain said {out:?}"))?;
    let drained = Instant::now();
    // Released (withdrawn from the host's kernel, confirmed) and transferred,
    // as the controllers that keep up see it.
    poll(
        CONVERGE,
        "the drained host's buckets on other hosts",
        || {
            let m = parse_bucket_map(&fresh.run(&["buckets", "--json"]).ok()?).ok()?;
            let held = p.kernel_owned(host).unwrap_or_default();
            (mine
                .iter()
                .all(|&b| !m[b as usize].is_empty() && m[b as usize] != host)
                && held.is_disjoint(&mine))
            .then_some(m)
        },
    )?;
    let moved = Instant::now();
    // Every bucket added to the host's kernel set from now on.
    let kernel_watch = p.kernel_watch(host)?;
    let fresh_status = status_via(&fresh, false)?;
    let transfer_index = fresh_status["applied_index"].as_u64().context("applied")?;
    let lag_at_move = lagging_applied().context("the lagging controller's status")?;
    let stale_map = parse_bucket_map(&at_lagging.run(&["buckets", "--json", "--local"])?)?;
    let stale: BTreeSet<u32> = mine
        .iter()
        .copied()
        .filter(|&b| stale_map[b as usize] == host)
        .collect();
    ensure!(
        lag_at_move < drain_index && stale == mine,
        "controller {lagging} did not lag: applied index {lag_at_move} (drain at {drain_index}, \
         transfer applied by {transfer_index} elsewhere); its own map gives {host} {} of its {} \
         buckets; nothing below proves anything\nlag rules: {}",
        stale.len(),
        mine.len(),
        lag_rules(p)
    );

    // The restarts, while the controller still lags (see the doc above): each
    // with the host cut off from the controllers that keep up until its agent
    // holds the lagging controller's grants and `first_fresh` has refused its
    // assignment stream once; then `first_fresh` comes back (the stream waits
    // out its backoff while the heartbeats get through), and once the agent
    // has fresh grants every controller does. Each restart is one more chance
    // for stale grants to meet a lease.
    let fresh_ids: Vec<u64> = p
        .controllers()
        .into_iter()
        .filter(|&c| c != lagging)
        .collect();
    let first_fresh = fresh_ids[0];
    let count = |log: &str, what: &str| log.matches(what).count();
    let stale_taken = format!("assignment controller={lagging} ");
    let refused = format!("watch refused controller={first_fresh} ");
    let mut reinstalled: Vec<String> = Vec::new();
    let mut overlaps: Vec<String> = Vec::new();
    // The host's set on every call; every host's (overlaps) when `all`.
    let mut sample = |p: &P, phase: &str, all: bool| {
        let sets: Vec<(String, Option<BTreeSet<u32>>)> = hosts
            .iter()
            .filter(|h| all || *h == host)
            .map(|h| (h.clone(), p.kernel_owned(h)))
            .collect();
        let at = t0.elapsed();
        for (i, (a, sa)) in sets.iter().enumerate() {
            let sa = sa.clone().unwrap_or_default();
            if a == host {
                let back: Vec<&u32> = sa.intersection(&mine).collect();
                if !back.is_empty() {
                    reinstalled.push(format!("{phase} +{at:?}: {host}'s kernel holds {back:?}"));
                }
            }
            for (b, sb) in &sets[i + 1..] {
                let both: Vec<&u32> = sb
                    .as_ref()
                    .map(|sb| sa.intersection(sb).collect())
                    .unwrap_or_default();
                if !both.is_empty() {
                    overlaps.push(format!("{phase} +{at:?}: {a} and {b} both hold {both:?}"));
                }
            }
        }
    };
    // The controllers' side, read in the background so that the kernel
    // sampling keeps its 50 ms pace: the lagging controller's applied index,
    // and how long ago each side last acked the host.
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let observer = {
        let (fresh, at_lagging, host) = (fresh.clone(), at_lagging.clone(), host.to_string());
        let (stop, seen) = (stop.clone(), seen.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let lagging_applied = status_via(&at_lagging, true)
                    .ok()
                    .and_then(|s| s["applied_index"].as_u64());
                let fresh_ack_ms = members_via(&fresh).ok().map(|m| m[&host].last_ack_ms_ago);
                let lagging_ack_ms = local_ack_ms(&at_lagging, &host);
                seen.lock().unwrap().push(Seen {
                    at: Instant::now(),
                    lagging_applied,
                    fresh_ack_ms,
                    lagging_ack_ms,
                });
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let first_restart = Instant::now();
    let mut rounds: Vec<String> = Vec::new();
    let mut lagging_samples = 0usize;
    let mut next = Instant::now();
    let mut all_at = next;
    let mut heard_last = first_restart;
    let mut taken: Vec<String> = Vec::new();
    for round in 1..=RESTARTS {
        let starts_before = count(&agent_log(p, host), "agent started");
        for &c in &fresh_ids {
            p.refuse_from(host, c)?;
        }
        p.kill_agent(host)?;
        p.restart_agent(host)?;
        let restarted = Instant::now();
        // The restarted agent's log lines (its log file is appended to), once
        // it has started.
        let since_restart = |p: &P| -> Option<String> {
            let log = agent_log(p, host);
            (count(&log, "agent started") > starts_before)
                .then(|| {
                    log.rsplit_once("agent started")
                        .map(|(_, after)| after.to_string())
                })
                .flatten()
        };
        // Heard: a heartbeat acked after the restart by the lagging
        // controller and by the others.
        let acked_since = |ms: Option<u64>, at: Instant| {
            ms.is_some_and(|ms| Duration::from_millis(ms) < at - restarted)
        };
        let window = if round == RESTARTS {
            LAGGING_WINDOW
        } else {
            Duration::from_secs(1)
        };
        let (mut reopened, mut fresh_taken, mut heard) = (None, None, None::<Instant>);
        let (mut refusals_seen, mut took_stale) = (0, false);
        while heard.is_none_or(|h| h.elapsed() < window) {
            ensure!(
                restarted.elapsed() < Duration::from_secs(60),
                "restart {round} of {host}'s agent: no progress within 60 s (took the lagging \
                 controller's grants: {took_stale}, {refusals_seen} refused streams from \
                 {first_fresh}, reopened after {:?}, fresh grants taken after {:?}, heard after {:?})",
                reopened.map(|t: Instant| t - restarted),
                fresh_taken.map(|t: Instant| t - restarted),
                heard.map(|t| t - restarted),
            );
            // Every host's set (overlaps) every 200 ms.
            let all = Instant::now() >= all_at;
            if all {
                all_at += Duration::from_millis(200);
            }
            sample(p, &format!("restart {round}"), all);
            lagging_samples += 1;
            if fresh_taken.is_none() {
                if let Some(log) = since_restart(p) {
                    took_stale |= count(&log, &stale_taken) > 0;
                    let n = count(&log, &refused);
                    if reopened.is_none() && took_stale && n > refusals_seen {
                        p.heal_from(host, first_fresh)?;
                        reopened = Some(Instant::now());
                    }
                    refusals_seen = n;
                    let fresh_lines: usize = fresh_ids
                        .iter()
                        .map(|c| count(&log, &format!("assignment controller={c} ")))
                        .sum();
                    if reopened.is_some() && fresh_lines > 0 {
                        fresh_taken = Some(Instant::now());
                        p.heal()?;
                        taken = log
                            .lines()
                            .filter(|l| l.contains(" assignment controller="))
                            .take(4)
                            .map(str::to_string)
                            .collect();
                    }
                }
            }
            if let (Some(f), None) = (fresh_taken, heard) {
                heard = seen
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|s| {
                        s.at > f
                            && acked_since(s.fresh_ack_ms, s.at)
                            && acked_since(s.lagging_ack_ms, s.at)
                    })
                    .map(|s| s.at);
            }
            next += Duration::from_millis(50);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        let (reopened, fresh_taken, heard) = (
            reopened.expect("set"),
            fresh_taken.expect("set"),
            heard.expect("set"),
        );
        rounds.push(format!(
            "restart {round} at +{:?}: took the lagging controller's grants, {first_fresh} back \
             after {:?}, fresh grants {:?} later, heard by every controller after {:?}",
            restarted - t0,
            reopened - restarted,
            fresh_taken - reopened,
            heard - restarted
        ));
        heard_last = heard;
    }
    let lag_window = first_restart.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = observer.join();
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let lag_reads: Vec<u64> = seen.iter().filter_map(|s| s.lagging_applied).collect();
    let lag_max = lag_reads.iter().copied().max().unwrap_or(u64::MAX);
    // The lagging controller kept acking the last restarted agent.
    let lagging_acks = seen
        .iter()
        .filter(|s| s.at >= heard_last && s.lagging_ack_ms.is_some_and(|ms| ms < 1000))
        .count();
    let reads_after_heard = seen.iter().filter(|s| s.at >= heard_last).count();

    let rules = lag_rules(p);
    p.heal_controller(lagging)?;
    let healed = Instant::now();
    wait_rejoined(p, lagging, Duration::from_secs(30))?;
    let rejoined = healed.elapsed();
    let caught_up = applied_of(&status(p)?, lagging).unwrap_or(0);
    let after = Instant::now();
    while after.elapsed() < Duration::from_secs(1) {
        sample(p, "healed", true);
        std::thread::sleep(Duration::from_millis(50));
    }
    let end_set = p.kernel_owned(host).unwrap_or_default();
    let added = kernel_watch.finish();
    let added_back: Vec<String> = added
        .iter()
        .filter(|(_, b)| mine.contains(b))
        .map(|(t, b)| format!("bucket {b} at +{:?}", *t - t0))
        .collect();
    let epoch_after = members_via(&fresh)?[host].epoch;

    let probes = load.finish();
    let history = watch.finish();
    let (doubles, rounds_udp) = double.finish();
    let report = judge(&probes, &history, |s| p.bucket_of(s), SLACK, |_, _| false);
    // Client side, after the transfer: the drained host answers nothing, and
    // no source is answered by two hosts.
    let from_host: Vec<String> = probes
        .iter()
        .filter(|pr| pr.sent >= moved && pr.answer() == Some(host))
        .map(|pr| {
            format!(
                "{} (bucket {}) sent at +{:?}",
                pr.src,
                p.bucket_of(pr.src),
                pr.sent - t0
            )
        })
        .collect();
    let mut answerers: BTreeMap<Ipv4Addr, BTreeSet<String>> = BTreeMap::new();
    for pr in probes.iter().filter(|pr| pr.sent >= moved) {
        if let Some(h) = pr.answer() {
            answerers.entry(pr.src).or_default().insert(h.to_string());
        }
    }
    let two: Vec<String> = answerers
        .iter()
        .filter(|(_, hs)| hs.len() > 1)
        .map(|(s, hs)| format!("{s}: {hs:?}"))
        .collect();
    let mapped_back: Vec<String> = history
        .samples
        .iter()
        .filter(|(t, _)| *t >= moved)
        .flat_map(|(t, m)| {
            mine.iter()
                .filter(|&&b| m[b as usize] == host)
                .map(move |b| format!("bucket {b} at +{:?}", *t - t0))
        })
        .collect();
    let answered_mine_after = probes
        .iter()
        .filter(|pr| pr.sent >= first_restart && mine.contains(&p.bucket_of(pr.src)))
        .filter(|pr| pr.answer().is_some())
        .count();
    eprintln!(
        "[lagging] controller {lagging} cut off from the others (leader {leader}) at index {lag_from}; \
         drain of {host} at index {drain_index}, its {} buckets released and transferred after {:?} \
         (index {transfer_index} on the others); controller {lagging} stayed at {lag_at_move}..={lag_max} \
         ({} reads) with its map still giving {host} all of them; {host}'s agent SIGKILLed and \
         started {RESTARTS} times, each time cut off from the others at first:\n  {}\n\
         the lagging one acked the last one in {lagging_acks} of {reads_after_heard} reads since; \
         watched {lag_window:?} while lagging: {lagging_samples} kernel samples, {} with a \
         released bucket, {} overlaps in all; {} buckets added to its kernel set since the \
         transfer, {} of them released ones; healed: rejoined after {rejoined:?} at index \
         {caught_up}; client: {rounds_udp} UDP rounds, {} doubles; {answered_mine_after} \
         connections to the released buckets answered after the first restart, {} by {host}; {}",
        mine.len(),
        moved - drained,
        lag_reads.len(),
        rounds.join("\n  "),
        reinstalled.len(),
        overlaps.len(),
        added.len(),
        added_back.len(),
        doubles.len(),
        from_host.len(),
        report.summary()
    );
    eprintln!(
        "[lagging] the lag rules before the heal:\n{rules}\n[lagging] assignments {host}'s agent \
         took after the restart:\n{}",
        taken.join("\n")
    );
    ensure!(
        !lag_reads.is_empty() && lag_max < drain_index,
        "controller {lagging} did not lag during the restart: it applied up to {lag_max} \
         ({} reads), the drain was at {drain_index}; the test proves nothing then",
        lag_reads.len()
    );
    ensure!(
        epoch_after == epoch_before,
        "{host} was fenced (epoch {epoch_before} -> {epoch_after}): its agent dropped the stale \
         grants on the new epoch, so its floors were not what kept them out; the cut-off outlasted \
         the controllers' promise"
    );
    ensure!(
        lagging_acks > 0,
        "the lagging controller {lagging} did not ack the restarted agent of {host} during the \
         window ({reads_after_heard} reads): it may not have reached it"
    );
    ensure!(
        added_back.is_empty() && reinstalled.is_empty(),
        "{host} installed buckets it had released: added to its kernel set {added_back:#?}; \
         seen in it {reinstalled:#?}"
    );
    ensure!(overlaps.is_empty(), "kernel sets overlapped: {overlaps:#?}");
    ensure!(
        end_set.is_disjoint(&mine),
        "{host} holds {end_set:?} at the end"
    );
    ensure!(doubles.is_empty(), "two hosts answered: {doubles:#?}");
    ensure!(two.is_empty(), "sources answered by two hosts: {two:#?}");
    ensure!(
        from_host.is_empty(),
        "{host} answered after its buckets had moved: {from_host:#?}"
    );
    ensure!(
        mapped_back.is_empty(),
        "{host} was given buckets back: {mapped_back:?}"
    );
    ensure!(
        answered_mine_after > 0,
        "no probe to the released buckets was answered after the restart"
    );
    report.assert_clean("connections across the drain, the restart and the heal");
    Ok(())
}

#[test]
fn agent_restarted_after_a_drain_never_installs_a_released_bucket_from_a_lagging_controller() {
    // A 5 s lease (L_c about 5.2 s): the host's cut-off from the controllers
    // that keep up (about 2 s: 1 s to the first refused stream, 1 s until a
    // heartbeat gets through after the return) must not get it fenced, which
    // would make the agent drop the stale grants for another reason than its
    // floors.
    let mut p = lab(LabOptions {
        sources: 600,
        lease_ms: Some(5000),
        ..Default::default()
    });
    run("restart after a drain, lagging controller", &mut p, |p| {
        restart_after_drain_with_a_lagging_controller(
            p,
            "h2",
            NetnsProvider::lag_rules,
            NetnsProvider::agent_log,
        )
    });
}

// ------------------------------------------------------------------ 11. a host that cannot serve

/// The agent of `host` is restarted on a NIC that exists but is down (a
/// wrong `interface`): its heartbeats report it, so the leader gives it
/// nothing, its buckets move to the others (it can still withdraw them),
/// `members` names the problem and `status` exits 5; restarted on the right
/// NIC it takes its share back.
fn cannot_serve(p: &mut NetnsProvider, host: &str) -> R {
    let hosts = names(p);
    wait_converged(p, &refs(&hosts), CONVERGE)?;
    let i = hosts.iter().position(|h| h == host).context("host")?;
    // A veth whose peer is down: it exists, it has no carrier.
    let nic = [
        "link", "add", "spare0", "type", "veth", "peer", "name", "spare1",
    ];
    p.net.hosts[i].ip(&nic)?;
    let t = Instant::now();
    p.restart_agent_on(host, "spare0")?;
    let problems = poll(CONVERGE, &format!("{host} to report a problem"), || {
        let m = members(p).ok()?.remove(host)?;
        (!m.problems.is_empty()).then_some(m.problems)
    })?;
    ensure!(
        problems.iter().any(|p| p == "interface_down"),
        "{host} reports {problems:?}"
    );
    let reported = t.elapsed();
    let others = except(&hosts, host);
    wait_converged(p, &others, CONVERGE)?;
    let moved = t.elapsed();
    let m = members(p)?.remove(host).context("member")?;
    ensure!(m.buckets == 0, "{host} still owns {} buckets", m.buckets);
    let s = status(p)?;
    ensure!(
        s["health"]["exit_code"].as_u64() == Some(5),
        "status health {}",
        s["health"]
    );
    let kernel = p.kernel_owned(host).unwrap_or_default();
    ensure!(
        kernel.is_empty(),
        "{host}'s kernel still accepts {kernel:?}"
    );
    p.restart_agent_on(host, "eth0")?;
    wait_converged(p, &refs(&hosts), CONVERGE)?;
    let back = members(p)?.remove(host).context("member")?;
    ensure!(
        back.problems.is_empty(),
        "still reported: {:?}",
        back.problems
    );
    eprintln!(
        "[cannot serve] {host} on a down NIC: reported {problems:?} after {reported:.1?}, \
         its buckets on the others after {moved:.1?}, status exit 5; back on eth0 after {:.1?}",
        t.elapsed()
    );
    Ok(())
}

#[test]
fn a_host_that_cannot_serve_gets_no_bucket_and_is_reported() {
    let mut p = lab(LabOptions::default());
    run("cannot serve", &mut p, |p| cannot_serve(p, "h2"));
}

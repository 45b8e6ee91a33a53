//! `vipsharectl status` and `members`: what the cluster says about itself, and an
//! exit status scripts and monitoring can act on.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use vipshare_proto::v1::{self as pb};
use vipshare_proto::PROTOCOL_VERSION;

use crate::client::{Admin, NoAnswer};

/// The exit statuses of `status`, the first that applies in this order. 2 is
/// clap's usage error, 1 any other error (bad certificate, refused request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy = 0,
    /// No leader, or no quorum answered a linearizable read.
    NoLeader = 3,
    /// Buckets without an owner: their clients are not served.
    Unowned = 4,
    /// Members down, suppressed or evicted.
    UnhealthyMembers = 5,
}

impl Health {
    pub fn code(self) -> i32 {
        self as i32
    }

    fn reason(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::NoLeader => "no leader",
            Health::Unowned => "buckets without an owner",
            Health::UnhealthyMembers => {
                "members down, suppressed, evicted or reporting that they cannot serve"
            }
        }
    }
}

/// States of a member that is not serving although it should.
const UNHEALTHY_STATES: &[&str] = &["down", "suppressed", "evicted"];

pub fn health(main: &pb::StatusReply, members: &[pb::MemberInfo]) -> Health {
    if main.leader_id == 0 {
        Health::NoLeader
    } else if main.initialized && main.unowned_buckets > 0 {
        Health::Unowned
    } else if members
        .iter()
        .any(|m| UNHEALTHY_STATES.contains(&m.state.as_str()) || !m.problems.is_empty())
    {
        Health::UnhealthyMembers
    } else {
        Health::Healthy
    }
}

struct Snapshot {
    main: pb::StatusReply,
    /// Each controller's own view, for health.
    rows: Vec<(pb::ControllerInfo, Result<pb::StatusReply, String>)>,
    members: Vec<pb::MemberInfo>,
}

async fn snapshot(admin: &Admin) -> anyhow::Result<Snapshot> {
    let main = admin.status().await?;
    let mut rows = Vec::new();
    for c in &main.controllers {
        let local = match admin.connect_to(&c.address).await {
            Ok(mut cl) => cl
                .status(pb::StatusRequest {
                    protocol_version: PROTOCOL_VERSION,
                    local: true,
                })
                .await
                .map(|r| r.into_inner())
                .map_err(|s| s.message().to_string()),
            Err(e) => Err(format!("{e:#}")),
        };
        rows.push((c.clone(), local));
    }
    let members = if main.members > 0 {
        admin.members().await?.members
    } else {
        Vec::new()
    };
    Ok(Snapshot {
        main,
        rows,
        members,
    })
}

/// Prints the status and returns the exit status. With `wait`, retries until the
/// cluster is healthy or the time is up, then prints what it saw last.
pub async fn status(admin: &Admin, as_json: bool, wait: Option<Duration>) -> anyhow::Result<i32> {
    let deadline = wait.map(|w| Instant::now() + w);
    let snap = loop {
        let attempt = snapshot(admin).await;
        let healthy = matches!(&attempt, Ok(s) if health(&s.main, &s.members) == Health::Healthy);
        match deadline {
            Some(d) if !healthy && Instant::now() < d => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            _ => break attempt,
        }
    };
    let snap = match snap {
        Ok(s) => s,
        Err(e) if e.downcast_ref::<NoAnswer>().is_some() && !admin.local => {
            eprintln!("vipsharectl: {e:#}");
            eprintln!(
                "no quorum answered; `vipsharectl status --local` shows each controller's own view"
            );
            return Ok(Health::NoLeader.code());
        }
        Err(e) => return Err(e),
    };
    let h = health(&snap.main, &snap.members);
    if as_json {
        print_json(admin.local, &snap, h)?;
    } else {
        print_text(admin.local, &snap, h);
    }
    Ok(h.code())
}

fn print_json(local: bool, snap: &Snapshot, h: Health) -> anyhow::Result<()> {
    let main = &snap.main;
    let controllers: Vec<_> = snap
        .rows
        .iter()
        .map(|(c, l)| match l {
            Ok(s) => json!({"id": c.id, "address": c.address, "raft_role": c.role,
                "reachable": true, "role": s.role, "term": s.term, "leader_id": s.leader_id,
                "commit_index": s.commit_index, "applied_index": s.applied_index}),
            Err(e) => json!({"id": c.id, "address": c.address, "raft_role": c.role,
                "reachable": false, "error": e}),
        })
        .collect();
    let out = json!({
        "local": local,
        "answered_by": main.id,
        "health": {"exit_code": h.code(), "reason": h.reason()},
        "leader_id": main.leader_id,
        "term": main.term,
        "commit_index": main.commit_index,
        "applied_index": main.applied_index,
        "initialized": main.initialized,
        "members": main.members,
        "unowned_buckets": main.unowned_buckets,
        "revoked": main.revoked_serials,
        "settings": main.settings.as_ref().map(|s| json!({
            "vips": s.vips.iter().map(|v| json!({"address": v.address, "prefix_len": v.prefix_len, "mac": v.mac, "mode": mode_name(&v.mode)})).collect::<Vec<_>>(),
            "bucket_count": s.bucket_count, "bucket_function": s.bucket_function,
            "affinity": s.affinity, "seed": s.seed})),
        "controllers": controllers,
    });
    println!("{}", serde_json::to_string_pretty(&out).context("json")?);
    Ok(())
}

fn print_text(local: bool, snap: &Snapshot, h: Health) {
    let main = &snap.main;
    if local {
        println!(
            "LOCAL VIEW of controller {} (its own state, not a quorum read: may be stale)",
            main.id
        );
    }
    println!(
        "leader {}  term {}  commit {}  applied {}  health: {}",
        main.leader_id,
        main.term,
        main.commit_index,
        main.applied_index,
        h.reason()
    );
    if let Some(s) = &main.settings {
        let vips: Vec<_> = s
            .vips
            .iter()
            .map(|v| format!("{} ({})", v.address, mode_name(&v.mode)))
            .collect();
        println!(
            "VIPs {}  buckets {} ({}, {}, seed {:#x})  members {}  unowned {}",
            vips.join(","),
            s.bucket_count,
            s.bucket_function,
            s.affinity,
            s.seed,
            main.members,
            main.unowned_buckets
        );
    } else {
        println!("cluster not initialised: run `vipsharectl cluster init --vip ADDR`");
    }
    if !main.revoked_serials.is_empty() {
        println!("revoked certificates: {}", main.revoked_serials.join(", "));
    }
    println!(
        "{:<4} {:<22} {:<8} {:<14} {:>6} {:>9} {:>9}",
        "ID", "ADDRESS", "VOTER", "ROLE", "TERM", "COMMIT", "APPLIED"
    );
    for (c, l) in &snap.rows {
        match l {
            Ok(s) => println!(
                "{:<4} {:<22} {:<8} {:<14} {:>6} {:>9} {:>9}",
                c.id, c.address, c.role, s.role, s.term, s.commit_index, s.applied_index
            ),
            Err(e) => println!(
                "{:<4} {:<22} {:<8} unreachable: {e}",
                c.id, c.address, c.role
            ),
        }
    }
    if !snap.members.is_empty() {
        println!();
        print_members(&snap.members);
    }
}

/// A VIP's switch mode as the controller sent it; "" from controllers older
/// than switch modes, which serve every VIP as `multicast`.
fn mode_name(mode: &str) -> &str {
    if mode.is_empty() {
        "multicast"
    } else {
        mode
    }
}

/// `vipsharectl vip list`: each VIP with its prefix, MAC and switch mode.
pub async fn vips(admin: &Admin, as_json: bool) -> anyhow::Result<()> {
    let main = admin.status().await?;
    let vips = main.settings.map(|s| s.vips).unwrap_or_default();
    if as_json {
        let rows: Vec<_> = vips
            .iter()
            .map(|v| json!({"address": v.address, "prefix_len": v.prefix_len, "mac": v.mac, "mode": mode_name(&v.mode)}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"local": admin.local, "vips": rows}))?
        );
        return Ok(());
    }
    if admin.local {
        println!("LOCAL VIEW (not a quorum read: may be stale)");
    }
    println!("{:<40} {:>6}  {:<17}  MODE", "VIP", "PREFIX", "MAC");
    for v in &vips {
        println!(
            "{:<40} {:>6}  {:<17}  {}",
            v.address,
            v.prefix_len,
            v.mac,
            mode_name(&v.mode)
        );
    }
    Ok(())
}

pub async fn members(admin: &Admin, as_json: bool) -> anyhow::Result<()> {
    let r = admin.members().await?;
    if as_json {
        let rows: Vec<_> = r
            .members
            .iter()
            .map(|m| {
                json!({"name": m.name, "weight": m.weight, "state": m.state,
                "epoch": m.epoch, "buckets": m.buckets, "penalty": m.penalty,
                "returns_in_ms": m.returns_in_ms, "last_ack_ms_ago": m.last_ack_ms_ago,
                "problems": m.problems, "unhealthy_ms": m.unhealthy_ms})
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"local": admin.local, "members": rows}))?
        );
        return Ok(());
    }
    if admin.local {
        println!("LOCAL VIEW (not a quorum read: may be stale)");
    }
    print_members(&r.members);
    Ok(())
}

fn print_members(members: &[pb::MemberInfo]) {
    println!(
        "{:<20} {:<10} {:>6} {:>8} {:>6} {:>8} {:>10}  {:<10}  CANNOT SERVE",
        "MEMBER", "STATE", "WEIGHT", "BUCKETS", "EPOCH", "PENALTY", "LAST ACK", "RETURNS IN"
    );
    for m in members {
        let returns = if m.returns_in_ms > 0 {
            format!("{:.0} s", m.returns_in_ms as f64 / 1e3)
        } else {
            "-".into()
        };
        let problems = if m.problems.is_empty() {
            "-".into()
        } else {
            format!(
                "{} (for {:.0} s)",
                m.problems.join(", "),
                m.unhealthy_ms as f64 / 1e3
            )
        };
        println!(
            "{:<20} {:<10} {:>6} {:>8} {:>6} {:>8.0} {:>8} ms  {returns:<10}  {problems}",
            m.name, m.state, m.weight, m.buckets, m.epoch, m.penalty, m.last_ack_ms_ago
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(state: &str) -> pb::MemberInfo {
        pb::MemberInfo {
            name: "web-1".into(),
            state: state.into(),
            ..Default::default()
        }
    }

    #[test]
    fn health_takes_the_first_problem_in_order() {
        let ok = pb::StatusReply {
            leader_id: 1,
            initialized: true,
            ..Default::default()
        };
        assert_eq!(health(&ok, &[member("active")]), Health::Healthy);
        assert_eq!(health(&ok, &[member("draining")]), Health::Healthy);
        assert_eq!(
            health(&ok, &[member("suppressed")]),
            Health::UnhealthyMembers
        );
        let broken = pb::MemberInfo {
            problems: vec!["interface_missing".into()],
            ..member("active")
        };
        assert_eq!(health(&ok, &[broken]), Health::UnhealthyMembers);
        let unowned = pb::StatusReply {
            unowned_buckets: 3,
            ..ok.clone()
        };
        assert_eq!(health(&unowned, &[member("down")]), Health::Unowned);
        let leaderless = pb::StatusReply {
            leader_id: 0,
            ..unowned
        };
        assert_eq!(health(&leaderless, &[]), Health::NoLeader);
        assert_eq!(Health::NoLeader.code(), 3);
    }
}

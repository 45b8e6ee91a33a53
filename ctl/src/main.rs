//! `vipsharectl`: certificates and cluster operations.

mod bench;
mod certs;
mod client;

use std::io::IsTerminal;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::json;
use vipshare_proto::v1::{self as pb, mutate_request::Op};
use vipshare_proto::PROTOCOL_VERSION;

use client::{Admin, Connection};

#[derive(Parser)]
#[command(name = "vipsharectl", version, about = "Operate a vipshare cluster")]
struct Cli {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the cluster CA; issue, renew, show and revoke certificates.
    #[command(subcommand)]
    Certs(certs::CertsCmd),
    /// Leader, term and the health of every controller.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Members with state, weight and bucket counts.
    Members {
        #[arg(long)]
        json: bool,
    },
    /// The bucket map.
    Buckets {
        #[arg(long)]
        json: bool,
    },
    /// Which bucket a client address falls in, and who owns it.
    Which {
        address: std::net::IpAddr,
        /// Source port (affinity address_port only).
        #[arg(long)]
        port: Option<u16>,
        #[arg(long)]
        json: bool,
    },
    /// Cluster-wide settings.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    #[command(subcommand)]
    Vip(VipCmd),
    #[command(subcommand)]
    Member(MemberCmd),
    /// Stop giving new flows to a member; its buckets move away, connections kept.
    Drain {
        name: String,
    },
    Undrain {
        name: String,
    },
    /// Set a member's weight (1-1000).
    Weight {
        name: String,
        weight: u32,
    },
    /// Remove a member.
    Remove {
        name: String,
    },
    /// Add or remove controllers (raft voters) at run time.
    #[command(subcommand)]
    Controller(ControllerCmd),
    /// Commit-latency benchmark: no-op proposals against the leader.
    Bench(bench::BenchArgs),
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Initialise settings once: VIPs, bucket count and function.
    Init {
        #[arg(long = "vip", required = true)]
        vips: Vec<String>,
        #[arg(long, default_value_t = 256)]
        buckets: u32,
        /// jhash (nftables-compatible) or lowbits (FreeBSD ipfw masks).
        #[arg(long, default_value = "jhash")]
        bucket_fn: String,
        /// address, network24 or address_port.
        #[arg(long, default_value = "address")]
        affinity: String,
        /// jhash seed; the same on every host.
        #[arg(long, default_value_t = 0x5649_5053)]
        seed: u32,
        /// Agents heartbeat every controller this often.
        #[arg(long)]
        heartbeat_ms: Option<u64>,
        /// Lease length; host failover takes about this plus 25%.
        #[arg(long)]
        lease_ms: Option<u64>,
    },
}

#[derive(Subcommand)]
enum VipCmd {
    Add {
        address: String,
        #[arg(long, default_value_t = 0)]
        prefix: u32,
        /// Multicast MAC answered in ARP; derived from the address when omitted.
        #[arg(long, default_value = "")]
        mac: String,
    },
    Remove {
        address: String,
    },
}

#[derive(Subcommand)]
enum MemberCmd {
    Add {
        name: String,
        #[arg(long, default_value_t = 100)]
        weight: u32,
    },
}

#[derive(Subcommand)]
enum ControllerCmd {
    Add {
        #[arg(long)]
        id: u64,
        /// host:port the new controller listens on.
        #[arg(long)]
        address: String,
    },
    Remove {
        #[arg(long)]
        id: u64,
    },
}

fn lease_timing(heartbeat_ms: Option<u64>, lease_ms: Option<u64>) -> pb::LeaseTiming {
    let d = vipshare_core::lease::LeaseTiming::default();
    pb::LeaseTiming {
        heartbeat_ms: heartbeat_ms.unwrap_or(d.heartbeat_ms),
        lease_ms: lease_ms.unwrap_or(d.lease_ms),
        kernel_delay_ms: d.kernel_delay_ms,
        clock_rate_ppm: d.clock_rate_ppm,
        margin_ms: d.margin_ms,
    }
}

fn vip(address: String, prefix: u32, mac: String) -> pb::Vip {
    pb::Vip {
        address,
        prefix_len: prefix,
        mac,
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("vipsharectl: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let op = match cli.cmd {
        Cmd::Certs(c) => match certs::run(c)? {
            Some(op) => op,
            None => return Ok(()),
        },
        Cmd::Status { json } => return status(&Admin::new(&cli.conn)?, json).await,
        Cmd::Members { json } => return members(&Admin::new(&cli.conn)?, json).await,
        Cmd::Buckets { json } => return buckets(&Admin::new(&cli.conn)?, json).await,
        Cmd::Which {
            address,
            port,
            json,
        } => return which(&Admin::new(&cli.conn)?, address, port, json).await,
        Cmd::Bench(args) => return bench::run(&Admin::new(&cli.conn)?, args).await,
        Cmd::Cluster(ClusterCmd::Init {
            vips,
            buckets,
            bucket_fn,
            affinity,
            seed,
            heartbeat_ms,
            lease_ms,
        }) => Op::InitCluster(pb::InitCluster {
            settings: Some(pb::ClusterSettings {
                vips: vips.into_iter().map(|v| vip(v, 0, String::new())).collect(),
                bucket_count: buckets,
                bucket_function: bucket_fn,
                affinity,
                seed,
                lease: Some(lease_timing(heartbeat_ms, lease_ms)),
                damping: None,
            }),
        }),
        Cmd::Vip(VipCmd::Add {
            address,
            prefix,
            mac,
        }) => Op::AddVip(pb::AddVip {
            vip: Some(vip(address, prefix, mac)),
        }),
        Cmd::Vip(VipCmd::Remove { address }) => Op::RemoveVip(pb::RemoveVip { address }),
        Cmd::Member(MemberCmd::Add { name, weight }) => {
            Op::AddMember(pb::AddMember { name, weight })
        }
        Cmd::Drain { name } => Op::Drain(pb::Drain { name }),
        Cmd::Undrain { name } => Op::Undrain(pb::Undrain { name }),
        Cmd::Weight { name, weight } => Op::SetWeight(pb::SetWeight { name, weight }),
        Cmd::Remove { name } => Op::RemoveMember(pb::RemoveMember { name }),
        Cmd::Controller(ControllerCmd::Add { id, address }) => {
            Op::AddController(pb::AddController { id, address })
        }
        Cmd::Controller(ControllerCmd::Remove { id }) => {
            Op::RemoveController(pb::RemoveController { id })
        }
    };
    let admin = Admin::new(&cli.conn)?;
    let reply = mutate(&admin, op).await?;
    println!("ok: applied at index {}", reply.index);
    Ok(())
}

pub async fn mutate(admin: &Admin, op: Op) -> anyhow::Result<pb::MutateReply> {
    admin
        .on_leader(|mut c| {
            let op = op.clone();
            async move {
                c.mutate(pb::MutateRequest {
                    protocol_version: PROTOCOL_VERSION,
                    op: Some(op),
                })
                .await
            }
        })
        .await
}

async fn status(admin: &Admin, as_json: bool) -> anyhow::Result<()> {
    // The authoritative picture, through a linearizable read on any controller.
    let main = admin.status().await?;
    // Each controller's own view, for health.
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
    if as_json {
        let controllers: Vec<_> = rows
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
            "leader_id": main.leader_id,
            "term": main.term,
            "commit_index": main.commit_index,
            "applied_index": main.applied_index,
            "initialized": main.initialized,
            "members": main.members,
            "unowned_buckets": main.unowned_buckets,
            "revoked": main.revoked_serials,
            "settings": main.settings.as_ref().map(|s| json!({
                "vips": s.vips.iter().map(|v| json!({"address": v.address, "prefix_len": v.prefix_len, "mac": v.mac})).collect::<Vec<_>>(),
                "bucket_count": s.bucket_count, "bucket_function": s.bucket_function,
                "affinity": s.affinity, "seed": s.seed})),
            "controllers": controllers,
        });
        println!("{}", serde_json::to_string_pretty(&out).context("json")?);
        return Ok(());
    }
    println!(
        "leader {}  term {}  commit {}  applied {}",
        main.leader_id, main.term, main.commit_index, main.applied_index
    );
    if let Some(s) = &main.settings {
        let vips: Vec<_> = s.vips.iter().map(|v| v.address.as_str()).collect();
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
    for (c, l) in rows {
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
    if main.members > 0 {
        println!();
        members(admin, false).await?;
    }
    Ok(())
}

async fn members(admin: &Admin, as_json: bool) -> anyhow::Result<()> {
    let r = admin.members().await?;
    if as_json {
        let rows: Vec<_> = r
            .members
            .iter()
            .map(|m| {
                json!({"name": m.name, "weight": m.weight, "state": m.state,
                "epoch": m.epoch, "buckets": m.buckets, "penalty": m.penalty,
                "returns_in_ms": m.returns_in_ms, "last_ack_ms_ago": m.last_ack_ms_ago})
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"members": rows}))?
        );
        return Ok(());
    }
    println!(
        "{:<20} {:<10} {:>6} {:>8} {:>6} {:>8} {:>10}  RETURNS IN",
        "MEMBER", "STATE", "WEIGHT", "BUCKETS", "EPOCH", "PENALTY", "LAST ACK"
    );
    for m in r.members {
        let returns = if m.returns_in_ms > 0 {
            format!("{:.0} s", m.returns_in_ms as f64 / 1e3)
        } else {
            "-".into()
        };
        println!(
            "{:<20} {:<10} {:>6} {:>8} {:>6} {:>8.0} {:>8} ms  {returns}",
            m.name, m.state, m.weight, m.buckets, m.epoch, m.penalty, m.last_ack_ms_ago
        );
    }
    Ok(())
}

async fn buckets(admin: &Admin, as_json: bool) -> anyhow::Result<()> {
    let r = admin.buckets().await?;
    if as_json {
        let rows: Vec<_> = r
            .buckets
            .iter()
            .map(|b| json!({"bucket": b.bucket, "owner": b.owner, "epoch": b.epoch}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"buckets": rows}))?
        );
        return Ok(());
    }
    print!(
        "{}",
        bucket_map(&r.buckets, std::io::stdout().is_terminal())
    );
    Ok(())
}

/// One character per bucket, 64 per line (fits 80 columns): a letter per owner,
/// coloured on a terminal, '.' for unowned.
fn bucket_map(buckets: &[pb::BucketInfo], colour: bool) -> String {
    use std::fmt::Write;
    let mut owners: Vec<&str> = buckets
        .iter()
        .map(|b| b.owner.as_str())
        .filter(|o| !o.is_empty())
        .collect();
    owners.sort_unstable();
    owners.dedup();
    let paint = |i: usize, c: char| {
        if colour {
            format!("\x1b[{}m{c}\x1b[0m", 31 + (i % 6))
        } else {
            c.to_string()
        }
    };
    let mut out = String::new();
    for chunk in buckets.chunks(64) {
        let first = chunk.first().map_or(0, |b| b.bucket);
        let _ = write!(out, "{first:>5} ");
        for b in chunk {
            match owners.iter().position(|x| *x == b.owner) {
                Some(i) => out.push_str(&paint(i, (b'A' + (i % 26) as u8) as char)),
                None => out.push('.'),
            }
        }
        out.push('\n');
    }
    for (i, o) in owners.iter().enumerate() {
        let n = buckets.iter().filter(|b| b.owner == *o).count();
        let _ = writeln!(
            out,
            "  {} = {o} ({n})",
            paint(i, (b'A' + (i % 26) as u8) as char)
        );
    }
    out
}

async fn which(
    admin: &Admin,
    address: std::net::IpAddr,
    port: Option<u16>,
    as_json: bool,
) -> anyhow::Result<()> {
    let s = admin
        .status()
        .await?
        .settings
        .context("cluster not initialised: run `vipsharectl cluster init --vip ADDR`")?;
    let bucket = vipshare_core::bucket::bucket_of(
        s.bucket_function.parse()?,
        s.affinity.parse()?,
        s.bucket_count,
        s.seed,
        address,
        port,
    )?;
    let map = admin.buckets().await?;
    let b = map
        .buckets
        .iter()
        .find(|b| b.bucket == bucket)
        .context("bucket missing from the map")?;
    if as_json {
        println!(
            "{}",
            json!({"address": address.to_string(), "port": port, "bucket": bucket,
                "owner": b.owner, "epoch": b.epoch})
        );
    } else {
        let owner = if b.owner.is_empty() {
            "(unowned)"
        } else {
            &b.owner
        };
        println!(
            "{address} -> bucket {bucket} -> {owner} (epoch {})",
            b.epoch
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_map_fits_80_columns_and_names_owners() {
        let buckets: Vec<pb::BucketInfo> = (0..256)
            .map(|i| pb::BucketInfo {
                bucket: i,
                owner: if i % 5 == 0 {
                    String::new()
                } else {
                    format!("web-{}", i % 3)
                },
                epoch: 1,
            })
            .collect();
        let map = bucket_map(&buckets, false);
        assert!(map.lines().all(|l| l.chars().count() <= 80), "{map}");
        assert!(map.starts_with("    0 .BCAB."), "{map}");
        assert!(map.contains("  A = web-0 ("));
        let coloured = bucket_map(&buckets, true);
        assert!(coloured.contains("\x1b[31mA\x1b[0m"));
    }
}

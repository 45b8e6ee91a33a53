//! `vipsharectl`: certificates and cluster operations.

mod bench;
mod certs;
mod client;
mod history;
mod status;
mod watch;

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::json;
use vipshare_core::net::SwitchMode;
use vipshare_proto::v1::{self as pb, mutate_request::Op};
use vipshare_proto::PROTOCOL_VERSION;

use client::{Admin, Connection};

#[derive(Parser)]
#[command(
    name = "vipsharectl",
    version,
    about = "Operate a vipshare cluster",
    after_help = "Connection flags may be set in the environment: VIPSHARE_CONTROLLERS, \
                  VIPSHARE_TLS_DIR, VIPSHARE_USER."
)]
struct Cli {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    cmd: Cmd,
}

/// `--json` and `--local`, shared by the read commands.
#[derive(clap::Args, Debug, Clone, Copy)]
struct ReadFlags {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Ask one controller for its own state: works without quorum (a minority, or
    /// during an election), may be stale, and says so.
    #[arg(long)]
    local: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the cluster CA; issue, renew, show and revoke certificates.
    #[command(subcommand)]
    Certs(certs::CertsCmd),
    /// Leader, term, the health of every controller, and the members.
    #[command(
        after_help = "Exit status, the first that applies: 3 no leader or no quorum \
                            answered, 4 buckets without an owner, 5 members down, suppressed \
                            or evicted, 0 healthy. 1 is any other error, 2 a usage error."
    )]
    Status {
        #[command(flatten)]
        read: ReadFlags,
        /// Retry for up to this many seconds until the cluster is healthy (exit 0),
        /// e.g. after starting it; then print what was seen last.
        #[arg(long, value_name = "SECONDS")]
        wait: Option<u64>,
    },
    /// Members with state, weight, bucket counts, penalty and last acknowledgement.
    Members {
        #[command(flatten)]
        read: ReadFlags,
    },
    /// The bucket map: one character per bucket, a letter per owner.
    Buckets {
        #[command(flatten)]
        read: ReadFlags,
    },
    /// A live view of the cluster, like top: leader and term, members with
    /// state, buckets and last acknowledgement, the bucket map and the latest
    /// events, redrawn from the controller's stream. Not on a terminal (or with
    /// --lines): every move as it is applied, one line each. Moves to another
    /// controller when one goes away; stop with Ctrl-C.
    Watch {
        /// One JSON object per line: unix_ms, controller, applied_index, owners.
        #[arg(long)]
        json: bool,
        /// One line per move even on a terminal.
        #[arg(long)]
        lines: bool,
    },
    /// Ownership changes and their causes (fenced, drained by whom, rebalanced
    /// after a member returned...), oldest first; filter by member, bucket, time.
    History(history::HistoryArgs),
    /// Which bucket a client address falls in, and who owns it.
    Which {
        /// Client (source) address.
        address: std::net::IpAddr,
        /// Source port (affinity address_port only).
        #[arg(long)]
        port: Option<u16>,
        #[command(flatten)]
        read: ReadFlags,
    },
    /// Cluster-wide settings.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Add or remove virtual IP addresses.
    #[command(subcommand)]
    Vip(VipCmd),
    /// Add members (hosts running an agent) or reset their flap penalty.
    #[command(subcommand)]
    Member(MemberCmd),
    /// Stop giving new flows to a member; its buckets move away, connections kept.
    Drain {
        /// Member name.
        name: String,
    },
    /// Give a drained member buckets again.
    Undrain {
        /// Member name.
        name: String,
    },
    /// Set a member's weight (1-1000): its share of the buckets.
    Weight {
        /// Member name.
        name: String,
        /// Relative weight, 1-1000.
        weight: u32,
    },
    /// Remove a member; its buckets move to the others.
    Remove {
        /// Member name.
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
        /// A virtual IP address (repeatable); unicast only.
        #[arg(long = "vip", required = true)]
        vips: Vec<String>,
        /// Number of buckets the source addresses are hashed into.
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
    /// Add a virtual IP address (unicast; not multicast, broadcast, unspecified or loopback).
    Add {
        /// The address.
        address: String,
        /// Prefix length configured with it (default: a host address, /32 or /128).
        #[arg(long, default_value_t = 0)]
        prefix: u32,
        /// MAC answered in ARP/ND (multicast; in mode unicast a locally
        /// administered unicast MAC); derived from the address when omitted.
        #[arg(long, default_value = "")]
        mac: String,
        /// How switches deliver the VIP to every host: multicast (flooded
        /// multicast MAC), igmp (also group joins and multicast router
        /// advertisements, for IGMP/MLD-snooping switches) or unicast (a
        /// shared unicast MAC never used as a source, flooded as unknown
        /// unicast). See deploy/NETWORK.md.
        #[arg(long, default_value_t = SwitchMode::Multicast)]
        mode: SwitchMode,
    },
    /// List the VIPs with their prefix, MAC and switch mode.
    List {
        #[command(flatten)]
        read: ReadFlags,
    },
    /// Remove a virtual IP address.
    Remove {
        /// The address.
        address: String,
    },
}

#[derive(Subcommand)]
enum MemberCmd {
    /// Add a member; it gets buckets once its agent's first heartbeat is acknowledged.
    Add {
        /// Member name, the name in its agent certificate.
        name: String,
        /// Relative weight, 1-1000.
        #[arg(long, default_value_t = 100)]
        weight: u32,
    },
    /// Forget a member's flap penalty and suppression; it gets buckets again once
    /// its agent heartbeats steadily.
    Reset {
        /// Member name.
        name: String,
    },
}

#[derive(Subcommand)]
enum ControllerCmd {
    /// Add a controller as a learner, then a voter once it caught up.
    Add {
        /// Its raft id (the name in its certificate).
        #[arg(long)]
        id: u64,
        /// host:port the new controller listens on.
        #[arg(long)]
        address: String,
    },
    /// Remove a controller from the raft group.
    Remove {
        /// Its raft id.
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

fn vip(address: String, prefix: u32, mac: String, mode: SwitchMode) -> pb::Vip {
    pb::Vip {
        address,
        prefix_len: prefix,
        mac,
        mode: mode.to_string(),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("vipsharectl: {e:#}");
            std::process::exit(1);
        }
    }
}

fn admin(conn: &Connection, local: bool) -> anyhow::Result<Admin> {
    let mut a = Admin::new(conn)?;
    a.local = local;
    Ok(a)
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let op = match cli.cmd {
        Cmd::Certs(c) => match certs::run(c)? {
            Some(op) => op,
            None => return Ok(0),
        },
        Cmd::Status { read, wait } => {
            let a = admin(&cli.conn, read.local)?;
            return status::status(&a, read.json, wait.map(Duration::from_secs)).await;
        }
        Cmd::Vip(VipCmd::List { read }) => {
            status::vips(&admin(&cli.conn, read.local)?, read.json).await?;
            return Ok(0);
        }
        Cmd::Members { read } => {
            status::members(&admin(&cli.conn, read.local)?, read.json).await?;
            return Ok(0);
        }
        Cmd::Buckets { read } => {
            buckets(&admin(&cli.conn, read.local)?, read.json).await?;
            return Ok(0);
        }
        Cmd::History(args) => {
            history::run(&Admin::new(&cli.conn)?, args).await?;
            return Ok(0);
        }
        Cmd::Watch { json, lines } => {
            let admin = Admin::new(&cli.conn)?;
            if !json && !lines && std::io::stdout().is_terminal() {
                watch::screen(&admin).await?;
            } else {
                watch::run(&admin, json).await?;
            }
            return Ok(0);
        }
        Cmd::Which {
            address,
            port,
            read,
        } => {
            which(&admin(&cli.conn, read.local)?, address, port, read.json).await?;
            return Ok(0);
        }
        Cmd::Bench(args) => {
            bench::run(&Admin::new(&cli.conn)?, args).await?;
            return Ok(0);
        }
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
                vips: vips
                    .into_iter()
                    .map(|v| vip(v, 0, String::new(), SwitchMode::Multicast))
                    .collect(),
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
            mode,
        }) => Op::AddVip(pb::AddVip {
            vip: Some(vip(address, prefix, mac, mode)),
        }),
        Cmd::Vip(VipCmd::Remove { address }) => Op::RemoveVip(pb::RemoveVip { address }),
        Cmd::Member(MemberCmd::Add { name, weight }) => {
            Op::AddMember(pb::AddMember { name, weight })
        }
        Cmd::Member(MemberCmd::Reset { name }) => Op::ResetMember(pb::ResetMember { name }),
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
    Ok(0)
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
pub(crate) fn bucket_map(buckets: &[pb::BucketInfo], colour: bool) -> String {
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
    fn every_subcommand_and_flag_has_help() {
        use clap::CommandFactory;
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                let sub_path = format!("{path} {}", sub.get_name());
                if sub.get_name() != "help" && sub.get_about().is_none() {
                    missing.push(sub_path.clone());
                }
                walk(sub, &sub_path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "vipsharectl", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }

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

//! `vipsharectl bench`: commit latency and throughput of no-op proposals sent
//! straight to the leader. A measurement, not a test: it prints figures.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use vipshare_proto::v1::{self as pb, mutate_request::Op};
use vipshare_proto::PROTOCOL_VERSION;

use crate::client::{explain, Admin};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Number of proposals.
    #[arg(long, default_value_t = 2000)]
    proposals: usize,
    /// Proposals in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Payload bytes per proposal.
    #[arg(long, default_value_t = 64)]
    payload: usize,
}

pub async fn run(admin: &Admin, args: BenchArgs) -> anyhow::Result<()> {
    if args.concurrency == 0 || args.proposals == 0 {
        bail!("--proposals and --concurrency must be at least 1");
    }
    let st = admin.status().await?;
    let leader = st
        .controllers
        .iter()
        .find(|c| c.id == st.leader_id)
        .map(|c| c.address.clone())
        .context("no leader known; is a majority of controllers up?")?;
    let client = admin.connect_to(&leader).await?;
    let per_task = args.proposals.div_ceil(args.concurrency);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let mut c = client.clone();
        let payload = vec![0x5a; args.payload];
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_task);
            for _ in 0..per_task {
                let t = Instant::now();
                c.mutate(pb::MutateRequest {
                    protocol_version: PROTOCOL_VERSION,
                    op: Some(Op::Noop(pb::Noop {
                        payload: payload.clone(),
                    })),
                })
                .await?;
                lat.push(t.elapsed());
            }
            Ok::<_, tonic::Status>(lat)
        }));
    }
    let mut all: Vec<Duration> = Vec::new();
    for t in tasks {
        all.extend(
            t.await
                .context("bench task")?
                .map_err(|s| explain(s, &leader))?,
        );
    }
    let elapsed = started.elapsed();
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    println!(
        "proposals {}  concurrency {}  payload {} B  leader {}",
        all.len(),
        args.concurrency,
        args.payload,
        leader
    );
    println!(
        "commit latency p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        all[all.len() - 1].as_secs_f64() * 1e3
    );
    println!(
        "throughput {:.0} proposals/s over {:.2} s",
        all.len() as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    Ok(())
}

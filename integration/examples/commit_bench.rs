//! Commit latency and throughput of 3 controllers on loopback, real mTLS and fsync.
//!
//!     cargo build --release --workspace --bins
//!     VIPSHARE_PROFILE=release cargo run --release -p vipshare-integration --example commit_bench

use std::time::Duration;

use vipshare_integration::Lab;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut lab = Lab::new("127.0.30", 3)?;
    lab.start_founders(3)?;
    lab.wait_leader(Duration::from_secs(15)).await?;
    for (n, c) in [(2000, 1), (20000, 64)] {
        let out = lab.ctl(&[
            "bench",
            "--proposals",
            &n.to_string(),
            "--concurrency",
            &c.to_string(),
        ])?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        anyhow::ensure!(out.status.success(), "bench failed");
    }
    Ok(())
}

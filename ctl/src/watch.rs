//! `vipsharectl watch`: the bucket map live, from one controller's stream
//! (`WatchBuckets`); when that controller goes away, the next one's.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use vipshare_proto::v1 as pb;

use crate::client::Admin;

/// Pause after every controller failed once, before the next round.
const ROUND_PAUSE: Duration = Duration::from_millis(200);

pub async fn run(admin: &Admin, as_json: bool) -> anyhow::Result<()> {
    let mut last: Option<Vec<pb::BucketInfo>> = None;
    loop {
        for address in admin.addresses() {
            let mut stream = match admin.watch_buckets(address).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("watch: {e:#}");
                    continue;
                }
            };
            eprintln!("watch: following controller {address}");
            loop {
                match stream.message().await {
                    Ok(Some(m)) => {
                        print_change(address, &m, last.as_deref(), as_json)?;
                        last = Some(m.buckets);
                    }
                    Ok(None) => {
                        eprintln!("watch: controller {address} ended the stream");
                        break;
                    }
                    Err(s) => {
                        eprintln!("watch: controller {address}: {}", s.message());
                        break;
                    }
                }
            }
        }
        tokio::time::sleep(ROUND_PAUSE).await;
    }
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default()
}

fn print_change(
    address: &str,
    m: &pb::BucketsReply,
    before: Option<&[pb::BucketInfo]>,
    as_json: bool,
) -> anyhow::Result<()> {
    if as_json {
        let owners: Vec<&str> = m.buckets.iter().map(|b| b.owner.as_str()).collect();
        println!(
            "{}",
            serde_json::to_string(&json!({
                "unix_ms": unix_ms() as u64,
                "controller": address,
                "applied_index": m.applied_index,
                "owners": owners,
            }))?
        );
        return Ok(());
    }
    let moves = match before {
        Some(b) if b.len() == m.buckets.len() => moves(b, &m.buckets),
        _ => {
            let owned = m.buckets.iter().filter(|b| !b.owner.is_empty()).count();
            format!("{owned}/{} buckets owned", m.buckets.len())
        }
    };
    if !moves.is_empty() {
        println!("{} index {}: {moves}", unix_ms(), m.applied_index);
    }
    Ok(())
}

/// "3-5 h1 -> h2, 9 h1 -> -" : buckets whose owner changed, grouped by move,
/// consecutive buckets as ranges ("-" for no owner).
fn moves(before: &[pb::BucketInfo], after: &[pb::BucketInfo]) -> String {
    grouped(
        before
            .iter()
            .zip(after)
            .filter(|(b, a)| b.owner != a.owner)
            .map(|(b, a)| (a.bucket, b.owner.as_str(), a.owner.as_str())),
    )
    .join(", ")
}

/// Moves `(bucket, from, to)` grouped by (from, to), buckets as ranges.
pub fn grouped<'a>(moves: impl Iterator<Item = (u32, &'a str, &'a str)>) -> Vec<String> {
    let name = |o: &str| {
        if o.is_empty() {
            "-".to_string()
        } else {
            o.to_string()
        }
    };
    let mut by_move: BTreeMap<(String, String), Vec<u32>> = BTreeMap::new();
    for (bucket, from, to) in moves {
        by_move
            .entry((name(from), name(to)))
            .or_default()
            .push(bucket);
    }
    by_move
        .into_iter()
        .map(|((from, to), mut buckets)| {
            buckets.sort_unstable();
            format!("{} {from} -> {to}", ranges(&buckets))
        })
        .collect()
}

fn ranges(sorted: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(owners: &[&str]) -> Vec<pb::BucketInfo> {
        (0u32..)
            .zip(owners)
            .map(|(bucket, o)| pb::BucketInfo {
                bucket,
                owner: o.to_string(),
                epoch: 1,
            })
            .collect()
    }

    #[test]
    fn moves_are_grouped_and_ranged() {
        let before = map(&["h1", "h1", "h1", "h2", "h1", ""]);
        let after = map(&["h2", "h2", "h1", "h2", "h2", "h3"]);
        assert_eq!(moves(&before, &after), "5 - -> h3, 0-1,4 h1 -> h2");
        assert_eq!(moves(&before, &before), "");
    }
}

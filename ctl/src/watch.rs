//! `vipsharectl watch`: the bucket map live, from one controller's stream
//! (`WatchBuckets`); when that controller goes away, the next one's.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use vipshare_proto::v1 as pb;

use crate::client::Admin;

/// Pause after every controller failed once, before the next round.
const ROUND_PAUSE: Duration = Duration::from_millis(200);

type Open<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<tonic::Streaming<T>>> + 'a>>;

/// Follows one controller's stream, then the next one's when it ends or
/// fails, round after round: `item` gets each message with the latest note
/// (what went wrong last, or whom it follows); `echo` also prints the notes
/// to stderr.
async fn follow<T>(
    admin: &Admin,
    open: impl for<'a> Fn(&'a Admin, &'a str) -> Open<'a, T>,
    echo: bool,
    mut item: impl FnMut(&str, T, &str) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut note = String::new();
    let say = |text: String, note: &mut String| {
        if echo {
            eprintln!("watch: {text}");
        }
        *note = text;
    };
    loop {
        for address in admin.addresses() {
            let mut stream = match open(admin, address).await {
                Ok(s) => s,
                Err(e) => {
                    say(format!("{e:#}"), &mut note);
                    continue;
                }
            };
            say(format!("following controller {address}"), &mut note);
            loop {
                match stream.message().await {
                    Ok(Some(m)) => item(address, m, &note)?,
                    Ok(None) => {
                        say(format!("controller {address} ended the stream"), &mut note);
                        break;
                    }
                    Err(s) => {
                        say(format!("controller {address}: {}", s.message()), &mut note);
                        break;
                    }
                }
            }
        }
        tokio::time::sleep(ROUND_PAUSE).await;
    }
}

fn open_buckets<'a>(a: &'a Admin, address: &'a str) -> Open<'a, pb::BucketsReply> {
    Box::pin(a.watch_buckets(address))
}

fn open_watch<'a>(a: &'a Admin, address: &'a str) -> Open<'a, pb::WatchReply> {
    Box::pin(a.watch(address))
}

/// One line per change of the bucket map (`--lines`, or `--json` maps).
pub async fn run(admin: &Admin, as_json: bool) -> anyhow::Result<()> {
    let mut last: Option<Vec<pb::BucketInfo>> = None;
    follow(
        admin,
        open_buckets,
        true,
        |address, m: pb::BucketsReply, _| {
            print_change(address, &m, last.as_deref(), as_json)?;
            last = Some(m.buckets);
            Ok(())
        },
    )
    .await
}

/// The full-screen view: redrawn on every picture the controller sends.
pub async fn screen(admin: &Admin) -> anyhow::Result<()> {
    follow(
        admin,
        open_watch,
        false,
        |address, w: pb::WatchReply, note| {
            print!("\x1b[H\x1b[2J{}", render(address, &w, note));
            use std::io::Write;
            std::io::stdout().flush()?;
            Ok(())
        },
    )
    .await
}

/// One picture of the cluster as `address` sees it.
pub fn render(address: &str, w: &pb::WatchReply, note: &str) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let now = crate::history::clock(unix_ms());
    if let Some(s) = &w.status {
        let leader = match s.leader_id {
            0 => "none".to_string(),
            id => id.to_string(),
        };
        let _ = writeln!(
            out,
            "controller {address} (id {}, {})   leader {leader}   term {}   applied {}",
            s.id, s.role, s.term, s.applied_index
        );
        let _ = writeln!(
            out,
            "{} members   {} unowned buckets   {} controllers   {now}",
            s.members,
            s.unowned_buckets,
            s.controllers.len()
        );
    }
    if !note.is_empty() {
        let _ = writeln!(out, "(earlier: {note})");
    }
    if let Some(m) = &w.members {
        let _ = writeln!(
            out,
            "\n{:<16} {:<11} {:>6} {:>7} {:>6} {:>8} {:>9}",
            "MEMBER", "STATE", "WEIGHT", "BUCKETS", "EPOCH", "PENALTY", "LAST ACK"
        );
        for m in &m.members {
            let ack = match m.last_ack_ms_ago {
                u64::MAX => "-".to_string(),
                ms if ms >= 10_000 => format!("{} s", ms / 1000),
                ms => format!("{ms} ms"),
            };
            let _ = writeln!(
                out,
                "{:<16} {:<11} {:>6} {:>7} {:>6} {:>8.0} {:>9}",
                m.name, m.state, m.weight, m.buckets, m.epoch, m.penalty, ack
            );
        }
    }
    if let Some(b) = &w.buckets {
        let _ = write!(out, "\n{}", crate::bucket_map(&b.buckets, true));
    }
    if !w.recent.is_empty() {
        let _ = writeln!(out, "\nlatest events");
        let runs = runs(&w.recent);
        for run in &runs[runs.len().saturating_sub(SHOWN_EVENTS)..] {
            let (first, last) = (run[0], run[run.len() - 1]);
            let index = if run.len() == 1 {
                format!("#{}", first.index)
            } else {
                format!("#{}-{}", first.index, last.index)
            };
            let moves = grouped(
                run.iter()
                    .flat_map(|e| &e.moves)
                    .map(|m| (m.bucket, m.from.as_str(), m.to.as_str())),
            );
            let _ = writeln!(
                out,
                "{}  {index}  {}  [{}]{}",
                crate::history::clock(first.at_ms),
                first.what,
                first.by,
                if moves.is_empty() {
                    String::new()
                } else {
                    format!("\n      {}", moves.join(", "))
                }
            );
        }
    }
    out
}

/// Event groups shown, newest last.
const SHOWN_EVENTS: usize = 8;

/// Consecutive events with the same cause and proposer, as one line (a drain
/// hands over bucket after bucket, one entry each).
fn runs(events: &[pb::HistoryEvent]) -> Vec<Vec<&pb::HistoryEvent>> {
    let mut out: Vec<Vec<&pb::HistoryEvent>> = Vec::new();
    for e in events {
        match out.last_mut() {
            Some(run) if run[0].what == e.what && run[0].by == e.by => run.push(e),
            _ => out.push(vec![e]),
        }
    }
    out
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
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
                "unix_ms": unix_ms(),
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
    fn the_screen_shows_leader_members_map_and_events() {
        let w = pb::WatchReply {
            status: Some(pb::StatusReply {
                id: 1,
                leader_id: 2,
                term: 7,
                role: "follower".into(),
                applied_index: 99,
                members: 2,
                ..Default::default()
            }),
            members: Some(pb::MembersReply {
                members: vec![pb::MemberInfo {
                    name: "web-1".into(),
                    state: "active".into(),
                    weight: 100,
                    buckets: 3,
                    epoch: 2,
                    last_ack_ms_ago: 42,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            buckets: Some(pb::BucketsReply {
                buckets: map(&["web-1", "web-1", "web-1", ""]),
                ..Default::default()
            }),
            recent: vec![pb::HistoryEvent {
                index: 98,
                at_ms: 1_780_000_000_123,
                by: "vipshare://prod/admin/alice".into(),
                what: "web-2 drained: its buckets move away".into(),
                moves: vec![pb::BucketMove {
                    bucket: 3,
                    from: "web-2".into(),
                    to: String::new(),
                }],
                ..Default::default()
            }],
        };
        let s = render("c1:7001", &w, "");
        for want in [
            "controller c1:7001 (id 1, follower)",
            "leader 2",
            "term 7",
            "web-1            active         100       3      2        0     42 ms",
            "2026-05-28 20:26:40.123Z  #98  web-2 drained",
            "3 web-2 -> -",
        ] {
            assert!(s.contains(want), "{want:?} not in\n{s}");
        }
    }

    #[test]
    fn moves_are_grouped_and_ranged() {
        let before = map(&["h1", "h1", "h1", "h2", "h1", ""]);
        let after = map(&["h2", "h2", "h1", "h2", "h2", "h3"]);
        assert_eq!(moves(&before, &after), "5 - -> h3, 0-1,4 h1 -> h2");
        assert_eq!(moves(&before, &before), "");
    }
}

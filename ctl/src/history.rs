//! `vipsharectl history`: ownership changes and their causes, from the
//! replicated history (every controller holds the same one).

use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::json;
use vipshare_proto::v1 as pb;

use crate::client::Admin;

#[derive(Debug, Clone, clap::Args)]
pub struct HistoryArgs {
    /// Only events about this member (named, or a bucket moved from or to it).
    #[arg(long)]
    member: Option<String>,
    /// Only events that moved this bucket.
    #[arg(long)]
    bucket: Option<u32>,
    /// Only events of the last DURATION (e.g. 90s, 15m, 2h, 1d).
    #[arg(long, value_name = "DURATION")]
    since: Option<String>,
    /// Only the newest N matching events.
    #[arg(long, value_name = "N")]
    limit: Option<u32>,
    /// One JSON object per event.
    #[arg(long)]
    json: bool,
    /// Ask one controller for its own copy: works without quorum, may be stale.
    #[arg(long)]
    local: bool,
}

pub async fn run(admin: &Admin, a: HistoryArgs) -> anyhow::Result<()> {
    let now_ms = crate::watch::unix_ms();
    let since_ms = match &a.since {
        Some(s) => now_ms.saturating_sub(parse_duration(s)?.as_millis() as u64),
        None => 0,
    };
    let r = admin
        .history(pb::HistoryRequest {
            protocol_version: vipshare_proto::PROTOCOL_VERSION,
            local: a.local,
            member: a.member.unwrap_or_default(),
            bucket: a.bucket,
            since_ms,
            until_ms: 0,
            limit: a.limit.unwrap_or(0),
        })
        .await?;
    for e in &r.events {
        if a.json {
            let moves: Vec<_> = e
                .moves
                .iter()
                .map(|m| json!({"bucket": m.bucket, "from": m.from, "to": m.to}))
                .collect();
            println!(
                "{}",
                serde_json::to_string(&json!({
                    "index": e.index, "at_ms": e.at_ms, "by": e.by, "what": e.what,
                    "members": e.members, "moves": moves,
                }))?
            );
            continue;
        }
        println!("{}  #{}  {}  [{}]", clock(e.at_ms), e.index, e.what, e.by);
        let moves = crate::watch::grouped(
            e.moves
                .iter()
                .map(|m| (m.bucket, m.from.as_str(), m.to.as_str())),
        );
        for m in moves {
            println!("    {m}");
        }
    }
    if !a.json && r.events.is_empty() {
        eprintln!("no matching events ({} kept)", r.kept);
    }
    Ok(())
}

/// "90s", "15m", "2h", "1d", or plain seconds.
fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .with_context(|| format!("--since {s:?}: expected a number and a unit, e.g. 15m"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => bail!("--since {s:?}: unknown unit {unit:?} (s, m, h or d)"),
    };
    Ok(Duration::from_secs(secs))
}

/// UTC wall-clock time of `ms` since the epoch, to the millisecond.
pub(crate) fn clock(ms: u64) -> String {
    match time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        ),
        Err(_) => format!("{ms} ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_clock() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert!(parse_duration("5w")
            .unwrap_err()
            .to_string()
            .contains("unknown unit"));
        assert!(parse_duration("m").is_err());
        assert_eq!(clock(1_780_000_000_123), "2026-05-28 20:26:40.123Z");
    }
}

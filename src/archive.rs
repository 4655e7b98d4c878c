//! Retention of campaigns: a finished campaign (every accepted job ended, none parked or
//! held) with no outcome for `campaigns.retention` is archived, by whichever daemon sees it
//! first. Its counters and link clicks become one JSON field of `{prefix}campaigns:archive`
//! (what `paloma stats --campaign`, `GET /api/v1/campaigns/{c}` and the report read back),
//! and its keys — counters, links, variants, touches, domains, timeline, guard baseline,
//! unique-count HyperLogLogs — are deleted; it leaves `{prefix}campaigns` and
//! `{prefix}campaigns:active`. A job of it that comes later starts new counters; archiving
//! it again adds them to the old ones.
//!
//! Keys: reads `campaigns:active` (the last outcome of each campaign), `stats:{c}`,
//! `links:{c}`, `parked:{c}`, `held:{c}`, `campaign_states`; `archive.lua` writes
//! `campaigns:archive` and deletes the campaign's keys.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::watch;

use crate::queue::{now_ms, Keys};
use crate::store::RedisConn;

/// Campaigns looked at per round.
const BATCH: usize = 100;

/// Whether a campaign whose counters are `stats` is finished: every accepted job ended.
pub fn finished(stats: &BTreeMap<String, i64>) -> bool {
    let g = |k: &str| stats.get(k).copied().unwrap_or(0);
    let ended = g("delivered") + g("bounced") + g("failed") + g("suppressed") + g("dead");
    ended >= g("accepted")
}

/// Every campaign in `{prefix}campaigns` gets a last outcome if it has none (written before
/// `campaigns:active` existed): its retention counts from now.
pub async fn adopt(conn: &mut RedisConn, keys: &Keys) -> redis::RedisResult<()> {
    let all: Vec<String> = redis::cmd("SMEMBERS")
        .arg(&keys.campaigns)
        .query_async(conn)
        .await?;
    let now = now_ms();
    for chunk in all.chunks(1000) {
        let mut c = redis::cmd("ZADD");
        c.arg(&keys.campaigns_active).arg("NX");
        for n in chunk {
            c.arg(now).arg(n);
        }
        c.query_async::<()>(conn).await?;
    }
    Ok(())
}

/// One round: archives the finished campaigns idle past `retention` (at most [`BATCH`]);
/// returns how many. An idle campaign that is not finished (jobs waiting, parked, held or
/// paused) is looked at again one retention later.
pub async fn round(
    conn: &mut RedisConn,
    keys: &Keys,
    retention: Duration,
) -> redis::RedisResult<usize> {
    let now = now_ms();
    let cutoff = now - retention.as_millis() as i64;
    let idle: Vec<String> = redis::cmd("ZRANGEBYSCORE")
        .arg(&keys.campaigns_active)
        .arg("-inf")
        .arg(cutoff)
        .arg("LIMIT")
        .arg(0)
        .arg(BATCH)
        .query_async(conn)
        .await?;
    if idle.is_empty() {
        return Ok(0);
    }
    let mut p = redis::pipe();
    for c in &idle {
        p.cmd("HGETALL").arg(keys.stats(c));
        p.cmd("HKEYS").arg(keys.links(c));
        p.cmd("ZCARD").arg(keys.parked(c));
        p.cmd("ZCARD").arg(keys.held(c));
        p.cmd("HGET").arg(&keys.campaign_states).arg(c);
    }
    type Look = (BTreeMap<String, i64>, Vec<String>, i64, i64, Option<String>);
    let replies: Vec<redis::Value> = p.query_async(conn).await?;
    let mut looks: Vec<Look> = Vec::with_capacity(idle.len());
    for r in replies.chunks(5) {
        let get = |i: usize| r.get(i).cloned().unwrap_or(redis::Value::Nil);
        looks.push((
            redis::from_redis_value(get(0)).unwrap_or_default(),
            redis::from_redis_value(get(1)).unwrap_or_default(),
            redis::from_redis_value(get(2)).unwrap_or(0),
            redis::from_redis_value(get(3)).unwrap_or(0),
            redis::from_redis_value(get(4)).unwrap_or(None),
        ));
    }
    let script = redis::Script::new(include_str!("archive.lua"));
    let mut archived = 0;
    let mut later = Vec::new();
    for (c, (stats, links, parked, held, state)) in idle.iter().zip(looks) {
        if !finished(&stats) || parked > 0 || held > 0 || state.as_deref() == Some("paused") {
            later.push(c);
            continue;
        }
        let mut inv = script.key(&keys.campaigns);
        inv.key(&keys.campaigns_active)
            .key(&keys.campaigns_archive)
            .key(keys.stats(c))
            .key(keys.links(c))
            .key(keys.variants(c))
            .key(keys.touches(c))
            .key(keys.domains(c))
            .key(keys.timeline(c))
            .key(keys.guard_base(c))
            .key(keys.unique("o", c))
            .key(keys.unique("c", c));
        for l in links.iter().filter(|l| !l.ends_with(":unique")) {
            inv.key(keys.unique_link(c, l));
        }
        let n: i64 = inv.arg(c).arg(cutoff).arg(now).invoke_async(conn).await?;
        archived += n as usize;
    }
    if !later.is_empty() {
        let mut z = redis::cmd("ZADD");
        z.arg(&keys.campaigns_active).arg("XX");
        for c in later {
            z.arg(now).arg(c);
        }
        z.query_async::<()>(conn).await?;
    }
    Ok(archived)
}

/// An archived campaign's counters and link clicks.
pub type Archived = (BTreeMap<String, i64>, BTreeMap<String, i64>);

/// The `(stats, links)` of an archive entry.
pub fn parse(raw: &str) -> Option<Archived> {
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(default)]
        stats: BTreeMap<String, f64>,
        #[serde(default)]
        links: BTreeMap<String, f64>,
    }
    let e: Entry = serde_json::from_str(raw).ok()?;
    let ints = |m: BTreeMap<String, f64>| m.into_iter().map(|(k, v)| (k, v as i64)).collect();
    Some((ints(e.stats), ints(e.links)))
}

/// Archives every `retention / 4` (at most every minute, at least every 250 ms) until
/// `stop`.
pub async fn run(
    mut conn: RedisConn,
    keys: Keys,
    retention: Duration,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    stop: watch::Receiver<bool>,
) {
    if let Err(e) = adopt(&mut conn, &keys).await {
        metrics.redis_errors.inc();
        tracing::debug!(error = %e, "adopting campaigns for retention failed; they wait for an outcome");
    }
    let every = (retention / 4).clamp(Duration::from_millis(250), Duration::from_secs(60));
    let mut ticker = crate::ticker::Ticker::new(every, stop);
    while ticker.tick().await {
        match round(&mut conn, &keys, retention).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(campaigns = n, "finished campaigns archived"),
            Err(e) => {
                metrics.redis_errors.inc();
                tracing::debug!(error = %e, "archiving campaigns failed; next round");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_campaign_is_finished_when_every_accepted_job_ended() {
        let m = |kv: &[(&str, i64)]| {
            kv.iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect::<BTreeMap<_, _>>()
        };
        assert!(finished(&m(&[
            ("accepted", 3),
            ("delivered", 2),
            ("dead", 1)
        ])));
        assert!(!finished(&m(&[
            ("accepted", 3),
            ("delivered", 2),
            ("deferred", 4)
        ])));
        assert!(finished(&m(&[])));
        let (s, l) =
            parse(r#"{"stats":{"delivered":3,"accepted":3},"links":{},"archived_at":1}"#).unwrap();
        assert_eq!((s["delivered"], l.len()), (3, 0));
    }
}

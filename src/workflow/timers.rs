//! Timers of negative rules (`not_opened`, `not_clicked`): members of `{prefix}timers`,
//! scored by due time (ms). A member is the JSON array `[rule, id, to, campaign]`: everything
//! the action needs, and computable from any later event of the same message, so a
//! cancellation is one ZREM.
//!
//! A cancellation is also remembered for a while in `{prefix}timers:cancelled` (score: until
//! when): when two daemons split the events, or a crashed daemon's batch is reclaimed, the
//! `delivered` that arms a timer can be handled after the open that cancels it, and must not
//! arm it then.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::Script;
use serde_json::Map;
use tokio::sync::watch;

use super::{Done, Engine, Firing, TimerOp};
use crate::queue::events::rfc3339_ms;
use crate::queue::now_ms;
use crate::queue::Keys;
use crate::store::RedisConn;

/// Timers leased per round.
const ROUND: usize = 256;
/// A leased timer not acted on by then (its daemon died) fires again.
const LEASE: Duration = Duration::from_secs(60);

pub fn member(rule: &str, id: &str, to: &str, campaign: &str) -> String {
    serde_json::to_string(&[rule, id, to, campaign]).expect("strings serialize")
}

/// `(rule, id, to, campaign)` of a member.
pub fn parse_member(m: &str) -> Option<[String; 4]> {
    serde_json::from_str(m).ok()
}

/// Arms and cancels timers in order. KEYS: timers, cancelled; ARGV[1]: now (ms), ARGV[2]:
/// until when a cancellation is remembered, then (score or '-' to cancel, member) pairs.
/// Answers 1 per timer armed or cancelled, 0 per no-op.
static UPDATE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/update_timers.lua")));

pub(super) async fn update(
    conn: &mut RedisConn,
    keys: &Keys,
    ops: &[TimerOp],
    remember: Duration,
) -> redis::RedisResult<Vec<i64>> {
    let now = now_ms();
    let mut inv = UPDATE.key(&keys.timers);
    inv.key(&keys.timers_cancelled)
        .arg(now)
        .arg(now + remember.as_millis() as i64);
    for op in ops {
        match op {
            TimerOp::Arm { due, member, .. } => inv.arg(*due).arg(member),
            TimerOp::Cancel { member, .. } => inv.arg("-").arg(member),
        };
    }
    inv.invoke_async(conn).await
}

/// Fires due timers every 250 ms until `stop` turns true.
pub(super) async fn run(engine: Arc<Engine>, mut conn: RedisConn, mut stop: watch::Receiver<bool>) {
    loop {
        let horizon = now_ms().min(engine.watermark.load(std::sync::atomic::Ordering::Relaxed));
        if horizon > 0 && !fire_due(&engine, &mut conn, horizon, &mut stop).await {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Acts on the timers due by `horizon`; false when shutdown came first.
async fn fire_due(
    engine: &Engine,
    conn: &mut RedisConn,
    horizon: i64,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    loop {
        let members = match super::lease_due(conn, &engine.keys.timers, horizon, ROUND, LEASE).await
        {
            Ok(m) => m,
            Err(e) => {
                engine.metrics.redis_errors.inc();
                tracing::warn!(error = %e, "leasing due workflow timers failed; will retry");
                return true;
            }
        };
        if members.is_empty() {
            return true;
        }
        let now = now_ms();
        let firings: Vec<Firing> = members
            .iter()
            .filter_map(|m| firing(engine, m, now))
            .collect();
        let mut done = Done::default();
        let mut backoff = crate::retry::Backoff::writes();
        loop {
            match engine.act(conn, &firings, &mut done).await {
                Ok(()) => break,
                Err(e) => {
                    engine.metrics.redis_errors.inc();
                    tracing::warn!(error = %e, timers = firings.len(), "acting on due workflow timers failed; retrying");
                }
            }
            tokio::select! {
                // Leased, not removed: they fire again once the lease ends.
                _ = stop.changed() => return false,
                _ = tokio::time::sleep(backoff.fail()) => {}
            }
        }
        for f in &firings {
            engine.count(&engine.rules.0[f.rule].name, "timer", "fired");
        }
        let removed: redis::RedisResult<()> = redis::cmd("ZREM")
            .arg(&engine.keys.timers)
            .arg(&members)
            .query_async(conn)
            .await;
        if let Err(e) = removed {
            // They fire again after the lease: a follow-up is still sent once (its marker),
            // a webhook may go out twice.
            engine.metrics.redis_errors.inc();
            tracing::warn!(error = %e, "removing fired workflow timers failed");
        }
        if members.len() < ROUND {
            return true;
        }
    }
}

/// The firing of one due timer; None (and a log line) when it cannot be read or its rule is
/// gone from the config, in which case it is simply removed.
fn firing(engine: &Engine, member: &str, now: i64) -> Option<Firing> {
    let Some([rule, id, to, campaign]) = parse_member(member) else {
        tracing::warn!(member, "unreadable workflow timer; removed");
        return None;
    };
    let Some((index, r)) = engine
        .rules
        .by_name(&rule)
        .filter(|(_, r)| r.trigger.negative())
    else {
        tracing::info!(workflow = %rule, id = %id, "timer of a workflow no longer configured; removed");
        return None;
    };
    let mut body = Map::new();
    body.insert("type".into(), r.trigger.as_str().into());
    body.insert("id".into(), id.clone().into());
    body.insert("campaign".into(), campaign.clone().into());
    body.insert("to".into(), to.clone().into());
    body.insert("at".into(), rfc3339_ms(now).into());
    Some(Firing {
        rule: index,
        id,
        campaign,
        to,
        body,
    })
}

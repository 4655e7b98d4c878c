//! The delayed set: retries and `send_at` jobs wait in `{prefix}scheduled` (score = due
//! time in ms) and are moved back into the sends stream when due, by a Lua script, so the
//! move is atomic and any number of daemons can run it.
//!
//! A member is `{attempt}|{first_at ms}|{job JSON}`; the attempt may carry the egress source
//! of the last attempt, `{attempt}@{source}`.

use std::sync::Arc;
use std::time::Duration;

use redis::Script;
use tokio::sync::watch;

use super::idem::Idem;
use super::{now_ms, Keys};
use crate::metrics::Metrics;
use crate::store::RedisConn;

/// Moves the due members it is given back to the sends stream (see the script).
const MOVE_DUE: &str = include_str!("scripts/move_due.lua");

/// Most jobs moved per round.
const ROUND: usize = 500;

/// One round: the due members (up to [`ROUND`]), then one script that moves each one still
/// there (another daemon may have moved it meanwhile) and sets its job id in progress under
/// its new entry. Returns how many it moved.
async fn move_due(
    conn: &mut RedisConn,
    script: &Script,
    keys: &Keys,
    ttl: u64,
) -> redis::RedisResult<u64> {
    let due: Vec<Vec<u8>> = redis::cmd("ZRANGEBYSCORE")
        .arg(&keys.scheduled)
        .arg("-inf")
        .arg(now_ms())
        .arg("LIMIT")
        .arg(0)
        .arg(ROUND)
        .query_async(conn)
        .await?;
    if due.is_empty() {
        return Ok(0);
    }
    let mut inv = script.key(&keys.scheduled);
    inv.key(&keys.sends).arg(Idem::IN_PROGRESS).arg(ttl);
    for m in &due {
        let id = job_id(m);
        // A member without a readable id still moves (the intake dead-letters it); its key
        // slot names a record the script does not touch.
        inv.key(keys.idem(id.as_deref().unwrap_or("")))
            .arg(m.as_slice())
            .arg(if id.is_some() { "1" } else { "0" });
    }
    inv.invoke_async(conn).await
}

/// The job id of a member `attempt|first_at|job`, if its job is a JSON object with a string id.
fn job_id(member: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Id {
        id: Option<String>,
    }
    let mut parts = member.splitn(3, |&b| b == b'|');
    let job = parts.nth(2)?;
    serde_json::from_slice::<Id>(job).ok()?.id
}

/// A delayed-set member; `source`: the egress source of the attempt (named sources only),
/// kept with the attempt count as `{attempt}@{source}`.
pub fn member(attempt: u32, source: Option<&str>, first_at: i64, job: &[u8]) -> String {
    let mut m = match source.filter(|s| !s.is_empty()) {
        Some(s) => format!("{attempt}@{s}|{first_at}|"),
        None => format!("{attempt}|{first_at}|"),
    };
    m.push_str(&String::from_utf8_lossy(job));
    m
}

/// Moves due jobs every `tick` until `stop` turns true.
pub async fn run(
    mut conn: RedisConn,
    keys: Keys,
    idem_ttl: Duration,
    tick: Duration,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let script = Script::new(MOVE_DUE);
    let ttl = idem_ttl.as_secs().max(1);
    loop {
        loop {
            match move_due(&mut conn, &script, &keys, ttl).await {
                Ok(n) => {
                    metrics.scheduled_moved.inc_by(n);
                    if n < ROUND as u64 {
                        break;
                    }
                }
                Err(e) => {
                    metrics.redis_errors.inc();
                    tracing::warn!(error = %e, "moving due jobs failed; will retry");
                    break;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = stop.changed() => return,
        }
    }
}

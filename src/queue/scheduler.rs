//! The delayed set: retries and `send_at` jobs wait in `{prefix}scheduled` (score = due
//! time in ms) and are moved back into the sends stream when due, by a Lua script, so the
//! move is atomic and any number of daemons can run it.
//!
//! A member is `{attempt}|{first_at ms}|{job JSON}`; the attempt field may carry the egress
//! source of the last attempt and why the job waits: `{attempt}[@{source}][#{why}]`, `why`
//! one letter of [`Why`] (what `paloma queue` shows). The move back to the stream drops the
//! reason: it means something only while the job waits.

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

/// Why a job waits in the delayed set: the one letter after `#` in its member's attempt
/// field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Why {
    /// A `send_at` in the future (intake).
    Scheduled,
    /// The next attempt after a deferral.
    Retry,
    /// Over its destination's rate (shaping).
    Shaping,
    /// Its site, or every source that could send to it, is suspended.
    Suspended,
    /// Every source of its pool is at its warm-up cap.
    Warmup,
}

impl Why {
    pub const ALL: [Why; 5] = [
        Why::Scheduled,
        Why::Retry,
        Why::Shaping,
        Why::Suspended,
        Why::Warmup,
    ];

    pub fn letter(self) -> char {
        match self {
            Why::Scheduled => 's',
            Why::Retry => 'r',
            Why::Shaping => 'p',
            Why::Suspended => 'u',
            Why::Warmup => 'w',
        }
    }

    pub fn from_letter(s: &str) -> Option<Why> {
        Why::ALL.into_iter().find(|w| {
            let mut b = [0u8; 4];
            w.letter().encode_utf8(&mut b) == s
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Why::Scheduled => "scheduled",
            Why::Retry => "retry",
            Why::Shaping => "shaping",
            Why::Suspended => "suspended",
            Why::Warmup => "warmup",
        }
    }
}

/// The attempt field of a member or stream entry, `{attempt}[@{source}][#{why}]`: the
/// attempt count (0 when unreadable), the source as written, and why it waits (None when
/// absent or unknown: members written before reasons were).
pub fn attempt_field(text: &str) -> (u32, Option<&str>, Option<Why>) {
    let (rest, why) = match text.rsplit_once('#') {
        Some((rest, w)) => (rest, Why::from_letter(w)),
        None => (text, None),
    };
    let (n, source) = match rest.split_once('@') {
        Some((n, s)) => (n, Some(s)),
        None => (rest, None),
    };
    (n.parse().unwrap_or(0), source, why)
}

/// A delayed-set member; `source`: the egress source of the attempt (named sources only),
/// kept with the attempt count as `{attempt}@{source}`; `why`: why it waits, `#{letter}`.
pub fn member(
    attempt: u32,
    source: Option<&str>,
    why: Option<Why>,
    first_at: i64,
    job: &[u8],
) -> String {
    use std::fmt::Write;
    let mut m = String::with_capacity(job.len() + 40);
    let _ = write!(m, "{attempt}");
    if let Some(s) = source.filter(|s| !s.is_empty()) {
        m.push('@');
        m.push_str(s);
    }
    if let Some(w) = why {
        m.push('#');
        m.push(w.letter());
    }
    let _ = write!(m, "|{first_at}|");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attempt_field_carries_source_and_reason() {
        let m = member(2, Some("ip-a"), Some(Why::Shaping), 17, br#"{"id":"x"}"#);
        assert_eq!(m, r#"2@ip-a#p|17|{"id":"x"}"#);
        assert_eq!(
            attempt_field("2@ip-a#p"),
            (2, Some("ip-a"), Some(Why::Shaping))
        );
        assert_eq!(attempt_field("0#s"), (0, None, Some(Why::Scheduled)));
        assert_eq!(attempt_field("3@b"), (3, Some("b"), None));
        assert_eq!(attempt_field("4"), (4, None, None), "older members");
        assert_eq!(attempt_field("1#z").2, None, "an unknown reason is none");
        for w in Why::ALL {
            let m = member(0, None, Some(w), 0, b"{}");
            let field = m.split('|').next().unwrap();
            assert_eq!(attempt_field(field), (0, None, Some(w)));
        }
        assert_eq!(member(1, None, None, 5, b"{}"), "1|5|{}");
        assert_eq!(job_id(br#"1#r|5|{"id":"j"}"#).as_deref(), Some("j"));
    }
}

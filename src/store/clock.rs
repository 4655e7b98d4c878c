//! The fleet's clock is the Redis server's. Due times (the delayed set's scores, `send_at`,
//! retries, workflow timers and webhook retries) are written by one daemon and compared by
//! another; with each daemon's own clock, a host a few minutes off sends `send_at` jobs
//! early or late and holds retries back. The stream's entry ids (a job's `first_at`) and the
//! shared rates' GCRA already come from the server's clock, so every time paloma compares
//! is taken from it: this host's clock plus the server's offset from it, measured with
//! `TIME` at start and every few seconds after.
//!
//! The offset is one per process, not a handle: every daemon of a process talks to the same
//! Redis (tests that run several share one server, or servers on one host, offset 0), and
//! `now_ms()` is called from places (event times, the recorder) that have no handle to pass.
//! Every new connection (`store::connect`) measures it, so the CLI's due times (`campaign
//! resume` releasing parked jobs) follow the server's clock too.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use super::RedisConn;

/// The Redis server's clock minus this host's, in ms.
static OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// Milliseconds since the epoch by this host's own clock.
fn local_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Milliseconds since the epoch by the Redis server's clock (as last measured).
pub fn now_ms() -> i64 {
    local_ms() + OFFSET_MS.load(Ordering::Relaxed)
}

/// The server's offset now in ms (for logs and tests).
pub fn offset_ms() -> i64 {
    OFFSET_MS.load(Ordering::Relaxed)
}

/// Measures the offset with one `TIME`, taking the local time halfway through the round
/// trip, and keeps it. Returns it.
pub async fn sync(conn: &mut RedisConn) -> redis::RedisResult<i64> {
    let before = local_ms();
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(conn).await?;
    let after = local_ms();
    let server = secs * 1000 + micros / 1000;
    let offset = server - (before + after) / 2;
    let old = OFFSET_MS.swap(offset, Ordering::Relaxed);
    if (offset - old).abs() > 1000 {
        tracing::info!(
            offset_ms = offset,
            "this host's clock differs from the Redis server's; due times follow the server's"
        );
    }
    Ok(offset)
}

/// Measures the offset again every `every` until `stop` (a host's clock drifts or is
/// stepped by NTP while the daemon runs).
pub async fn watch(
    mut conn: RedisConn,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if let Err(e) = sync(&mut conn).await {
            tracing::debug!(error = %e, "reading the Redis server's TIME failed");
        }
    }
}

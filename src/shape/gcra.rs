//! The rate shared by every daemon: a GCRA with reservations whose state is one key per
//! domain or site in Redis, advanced by a script on the server's clock.

use std::time::Duration;

use super::MAX_WAIT;
use crate::store::RedisConn;

/// GCRA with reservations, in Redis, on the server's clock (the one clock of the fleet).
/// KEYS[1]: the theoretical arrival time (TAT); KEYS[2]: when the next job sent back may
/// return; both µs. ARGV: emission interval, burst tolerance, longest reservation (µs).
/// Returns {1, wait}: a slot is reserved `wait` µs from now; {0, wait}: none within the
/// longest reservation, come back in `wait` µs (one interval after the previous job sent
/// back by any daemon, so that returns are paced for the fleet, not per daemon).
/// A TAT further ahead than any reservation can take it, by more than a second of slack
/// (the server's clock stepped back, or a daemon with a slower rate for the same key), is
/// pulled back to the last slot a reservation may take, and the return horizon, as far
/// off, is dropped; a value that is not a number counts as none.
const GCRA: &str = include_str!("scripts/gcra.lua");

/// After a failed call, the daemon's own limiter is used this long before Redis is asked
/// again (a Redis that hangs would otherwise cost every admission its timeout).
const SHARED_PAUSE: Duration = Duration::from_secs(5);
/// The longest a reservation may take before the daemon's own limiter is used instead.
const SHARED_TIMEOUT: Duration = Duration::from_millis(500);

pub(super) struct SharedRate {
    conn: RedisConn,
    script: redis::Script,
    /// `{prefix}rate:{pattern}:` and `{prefix}rate-back:{pattern}:`, then the domain or site.
    tat_prefix: String,
    back_prefix: String,
    interval_us: u64,
    tolerance_us: u64,
    /// Until when (Unix ms) Redis is not asked, after a failure.
    paused_until: std::sync::atomic::AtomicU64,
    /// When a failure was last logged (Unix ms), to log once a minute at most.
    last_warned: std::sync::atomic::AtomicU64,
}

pub(super) enum Reservation {
    /// A slot, this far off.
    In(Duration),
    /// None within [`MAX_WAIT`]: back to the delayed set for this long.
    No(Duration),
}

pub(super) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl SharedRate {
    /// `prefixes`: the keys' prefixes (TAT, return horizon) for this rule; `interval_us`
    /// between two messages, `tolerance_us` of burst.
    pub(super) fn new(
        conn: RedisConn,
        prefixes: (String, String),
        interval_us: u64,
        tolerance_us: u64,
    ) -> SharedRate {
        let (tat_prefix, back_prefix) = prefixes;
        SharedRate {
            conn,
            script: redis::Script::new(GCRA),
            tat_prefix,
            back_prefix,
            interval_us,
            tolerance_us,
            paused_until: std::sync::atomic::AtomicU64::new(0),
            last_warned: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub(super) fn paused(&self) -> bool {
        unix_ms() < self.paused_until.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(super) async fn reserve(&self, key: &str) -> Result<Reservation, String> {
        let mut script = self.script.prepare_invoke();
        script
            .key(format!("{}{key}", self.tat_prefix))
            .key(format!("{}{key}", self.back_prefix))
            .arg(self.interval_us)
            .arg(self.tolerance_us)
            .arg(MAX_WAIT.as_micros() as u64);
        let mut conn = self.conn.clone();
        let (ok, wait): (i64, i64) =
            match tokio::time::timeout(SHARED_TIMEOUT, script.invoke_async(&mut conn)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err(format!("no answer within {SHARED_TIMEOUT:?}")),
            };
        let wait = Duration::from_micros(wait.max(0) as u64);
        Ok(if ok == 1 {
            Reservation::In(wait)
        } else {
            Reservation::No(wait)
        })
    }

    /// A failed call: Redis is left alone for [`SHARED_PAUSE`]; logged once a minute.
    pub(super) fn failed(&self, error: &str) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = unix_ms();
        self.paused_until
            .store(now + SHARED_PAUSE.as_millis() as u64, Relaxed);
        let last = self.last_warned.load(Relaxed);
        if now >= last + 60_000
            && self
                .last_warned
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            tracing::warn!(%error, "shared rate: Redis refused or did not answer; this daemon's own limiter applies meanwhile");
        }
    }
}

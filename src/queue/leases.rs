//! Leases on the stream entries this daemon holds.
//!
//! XAUTOCLAIM takes any entry idle longer than `claim_idle`, including one this daemon read
//! a while ago and is still working on (waiting for a connection to a slow server, say).
//! To keep a live daemon's entries from being reclaimed and sent twice, the entries it holds
//! are renewed (`XCLAIM … JUSTID`, which resets their idle time) every third of
//! `claim_idle`. An entry stops being renewed when its outcome is written, or when the
//! daemon dies, and only then can another daemon reclaim it. Renewal (`held.lua`) touches
//! only entries this consumer still holds: a daemon that wakes from a freeze longer than
//! `claim_idle` does not take back what another daemon reclaimed meanwhile.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::Keys;
use crate::metrics::Metrics;
use crate::store::RedisConn;

pub struct Leases {
    held: Mutex<HashSet<String>>,
    keys: Keys,
    group: String,
    consumer: String,
    claim_idle: Duration,
}

impl Leases {
    pub fn new(keys: Keys, group: String, consumer: String, claim_idle: Duration) -> Self {
        Leases {
            held: Mutex::new(HashSet::new()),
            keys,
            group,
            consumer,
            claim_idle,
        }
    }

    pub fn hold<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        if let Ok(mut h) = self.held.lock() {
            h.extend(ids.into_iter().map(str::to_string));
        }
    }

    pub fn release<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        if let Ok(mut h) = self.held.lock() {
            for id in ids {
                h.remove(id);
            }
        }
    }

    /// Stops renewing one entry (abandoned at shutdown: another daemon will reclaim it).
    pub fn drop_one(&self, id: &str) {
        self.release([id]);
    }

    /// Renews every entry held now, on `conn`; an entry another daemon took meanwhile is let
    /// go. The intake also calls it right before it reclaims: after an outage longer than
    /// `claim_idle` (a Redis failover) this daemon's own leases have lapsed, and the
    /// reclaim would take its in-flight entries back into this same consumer and send them
    /// again while their first outcome is on its way (`reclaim.lua` fences other
    /// consumers, not this one).
    pub async fn renew_now(&self, conn: &mut RedisConn) -> redis::RedisResult<()> {
        let ids = self.snapshot();
        for chunk in ids.chunks(500) {
            let flags = held(
                conn,
                &self.keys.sends,
                &self.group,
                &self.consumer,
                chunk,
                true,
            )
            .await?;
            let lost: Vec<&str> = chunk
                .iter()
                .zip(&flags)
                .filter(|(_, h)| !**h)
                .map(|(id, _)| id.as_str())
                .collect();
            if !lost.is_empty() {
                tracing::warn!(entries = lost.len(), "entries this daemon held were taken by another (it was stopped longer than intake.claim_idle); not renewed");
                self.release(lost);
            }
        }
        Ok(())
    }

    fn snapshot(&self) -> Vec<String> {
        self.held
            .lock()
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// Renews the held entries every `claim_idle / 3` until `stop`.
pub async fn renew(
    leases: Arc<Leases>,
    mut conn: RedisConn,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let every = (leases.claim_idle / 3).max(Duration::from_millis(100));
    let mut wait = every;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        wait = every;
        if let Err(e) = leases.renew_now(&mut conn).await {
            metrics.redis_errors.inc();
            tracing::warn!(error = %e, "renewing leases failed; trying again in a second");
            wait = every.min(Duration::from_secs(1));
        }
    }
}

pub const HELD: &str = include_str!("scripts/held.lua");

/// Which of `ids` (entries of `stream`) `consumer` of `group` still holds, one flag per id;
/// with `renew`, the held ones get their idle time reset. One script call.
pub async fn held(
    conn: &mut RedisConn,
    stream: &str,
    group: &str,
    consumer: &str,
    ids: &[impl redis::ToRedisArgs],
    renew: bool,
) -> redis::RedisResult<Vec<bool>> {
    static SCRIPT: std::sync::LazyLock<redis::Script> =
        std::sync::LazyLock::new(|| redis::Script::new(HELD));
    let flags: Vec<u8> = SCRIPT
        .key(stream)
        .arg(group)
        .arg(consumer)
        .arg(if renew { "renew" } else { "check" })
        .arg(ids)
        .invoke_async(conn)
        .await?;
    Ok(flags.into_iter().map(|f| f == 1).collect())
}

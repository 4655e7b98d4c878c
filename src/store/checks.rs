//! What paloma needs of the Redis server, checked at start and every few seconds after:
//!
//! - **version ≥ 7.0**: the idempotency claim is `SET … NX GET`; on 6.x it fails and the
//!   intake would retry for ever. Refused.
//! - **no eviction** (`maxmemory-policy noeviction`): an evicting Redis may drop the sends
//!   stream, idempotency records (jobs sent twice) or the suppression list (mail to people
//!   who opted out). Refused unless `redis.allow_eviction`; `/readyz` reports it.
//! - **persistence** (AOF, or RDB snapshots): without it a restart loses the delayed set,
//!   the suppression list and the events. Warned.
//!
//! Each result is the gauge `paloma_redis_check{check}` (1 passed, 0 failed). In a Redis
//! Cluster the server commands go to one node and are not checked.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;

use super::RedisConn;

/// What one look at the server found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFacts {
    pub version: String,
    pub eviction_policy: String,
    /// AOF on, or RDB snapshots configured; None when CONFIG is not allowed and AOF is off.
    pub persistence: Option<bool>,
}

/// Problems, worst first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    TooOld(String),
    Evicts(String),
    NoPersistence,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::TooOld(v) => write!(f, "Redis {v} is older than 7.0, which paloma needs (SET … NX GET): upgrade Redis"),
            Finding::Evicts(p) => write!(f, "Redis maxmemory-policy is {p}: it may evict the sends stream, idempotency records or the suppression list; set `maxmemory-policy noeviction` (or redis.allow_eviction = true to run anyway)"),
            Finding::NoPersistence => write!(f, "Redis has neither AOF nor RDB snapshots: a restart loses the delayed set, the suppression list and the events; enable `appendonly yes`"),
        }
    }
}

impl ServerFacts {
    pub fn findings(&self) -> Vec<Finding> {
        let mut out = Vec::new();
        let major = self
            .version
            .split('.')
            .next()
            .and_then(|m| m.parse::<u32>().ok())
            .unwrap_or(0);
        if major < 7 {
            out.push(Finding::TooOld(self.version.clone()));
        }
        if self.eviction_policy != "noeviction" {
            out.push(Finding::Evicts(self.eviction_policy.clone()));
        }
        if self.persistence == Some(false) {
            out.push(Finding::NoPersistence);
        }
        out
    }
}

fn info_field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.lines().find_map(|l| {
        l.strip_prefix(key)
            .and_then(|r| r.strip_prefix(':'))
            .map(str::trim)
    })
}

/// Reads version, eviction policy and persistence; None in a cluster.
pub async fn facts(conn: &mut RedisConn) -> redis::RedisResult<Option<ServerFacts>> {
    if matches!(conn, RedisConn::Cluster(_)) {
        return Ok(None);
    }
    let info: String = redis::cmd("INFO").query_async(conn).await?;
    let version = info_field(&info, "redis_version")
        .unwrap_or("0")
        .to_string();
    let eviction_policy = info_field(&info, "maxmemory_policy")
        .unwrap_or("unknown")
        .to_string();
    let aof = info_field(&info, "aof_enabled") == Some("1");
    let persistence = if aof {
        Some(true)
    } else {
        // `save ""` is no snapshots. CONFIG may be renamed or denied on managed services.
        let save: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("save")
            .query_async(conn)
            .await;
        save.ok()
            .map(|kv| kv.get(1).is_some_and(|v| !v.trim().is_empty()))
    };
    Ok(Some(ServerFacts {
        version,
        eviction_policy,
        persistence,
    }))
}

/// The latest verdict, shared with `/readyz`: 0 fine, 1 warned, 2 not ready.
#[derive(Default)]
pub struct Health {
    state: AtomicU8,
    reason: std::sync::Mutex<String>,
}

impl Health {
    /// None when ready; else why not.
    pub fn not_ready(&self) -> Option<String> {
        (self.state.load(Ordering::Relaxed) == 2)
            .then(|| self.reason.lock().map(|r| r.clone()).unwrap_or_default())
    }

    /// A warning to show beside "ready".
    pub fn warning(&self) -> Option<String> {
        (self.state.load(Ordering::Relaxed) == 1)
            .then(|| self.reason.lock().map(|r| r.clone()).unwrap_or_default())
    }

    fn set(&self, state: u8, reason: String) {
        if let Ok(mut r) = self.reason.lock() {
            *r = reason;
        }
        self.state.store(state, Ordering::Relaxed);
    }
}

/// Judges `facts`: sets the gauges and `health`; Err(message) when paloma must not run.
pub fn judge(
    facts: &ServerFacts,
    allow_eviction: bool,
    metrics: &Metrics,
    health: &Health,
) -> Result<(), String> {
    let findings = facts.findings();
    let has = |f: fn(&Finding) -> bool| findings.iter().any(f);
    let gauge = |check: &str, ok: bool| {
        metrics
            .redis_check
            .with_label_values(&[check])
            .set(i64::from(ok));
    };
    gauge("version", !has(|f| matches!(f, Finding::TooOld(_))));
    gauge("eviction", !has(|f| matches!(f, Finding::Evicts(_))));
    gauge("persistence", !has(|f| matches!(f, Finding::NoPersistence)));
    let fatal = findings.iter().find(|f| match f {
        Finding::TooOld(_) => true,
        Finding::Evicts(_) => !allow_eviction,
        Finding::NoPersistence => false,
    });
    match (fatal, findings.first()) {
        (Some(f), _) => {
            health.set(2, f.to_string());
            Err(f.to_string())
        }
        (None, Some(w)) => {
            health.set(1, w.to_string());
            Ok(())
        }
        (None, None) => {
            health.set(0, String::new());
            Ok(())
        }
    }
}

/// Checks again every `every` until `stop`; a change is logged once.
pub async fn watch(
    mut conn: RedisConn,
    allow_eviction: bool,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut last: Option<Vec<Finding>> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let Ok(Some(f)) = facts(&mut conn).await else {
            continue;
        };
        let findings = f.findings();
        if last.as_ref() != Some(&findings) {
            for w in &findings {
                tracing::warn!("{w}");
            }
            last = Some(findings);
        }
        let _ = judge(&f, allow_eviction, &metrics, &health);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(version: &str, policy: &str, persistence: Option<bool>) -> ServerFacts {
        ServerFacts {
            version: version.into(),
            eviction_policy: policy.into(),
            persistence,
        }
    }

    #[test]
    fn findings_name_what_to_change() {
        assert!(f("7.0.15", "noeviction", Some(true)).findings().is_empty());
        assert_eq!(
            f("6.2.14", "noeviction", Some(true)).findings(),
            [Finding::TooOld("6.2.14".into())]
        );
        let e = f("7.2.4", "allkeys-lru", None).findings();
        assert_eq!(e, [Finding::Evicts("allkeys-lru".into())]);
        assert!(e[0].to_string().contains("maxmemory-policy noeviction"));
        assert_eq!(
            f("8.0.0", "noeviction", Some(false)).findings(),
            [Finding::NoPersistence]
        );
    }

    #[test]
    fn old_versions_are_refused_even_when_eviction_is_allowed() {
        let m = Metrics::new();
        let h = Health::default();
        assert!(judge(&f("6.2.0", "noeviction", Some(true)), true, &m, &h).is_err());
        assert!(h.not_ready().unwrap().contains("7.0"));
        assert!(judge(&f("7.0.0", "volatile-lru", Some(true)), true, &m, &h).is_ok());
        assert!(h.warning().unwrap().contains("volatile-lru"));
        assert!(judge(&f("7.0.0", "volatile-lru", Some(true)), false, &m, &h).is_err());
        assert!(judge(&f("7.0.0", "noeviction", Some(false)), false, &m, &h).is_ok());
        assert!(h.not_ready().is_none() && h.warning().is_some());
    }
}

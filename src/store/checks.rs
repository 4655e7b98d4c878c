//! What paloma needs of the Redis server, checked at start and every few seconds after:
//!
//! - **version ≥ 7.0**: the idempotency claim is `SET … NX GET`; on 6.x it fails and the
//!   intake would retry for ever. Refused.
//! - **no eviction** (`maxmemory-policy noeviction`): an evicting Redis may drop the sends
//!   stream, idempotency records (jobs sent twice) or the suppression list (mail to people
//!   who opted out). Refused unless `redis.allow_eviction`; `/readyz` reports it.
//! - **persistence** (AOF, or RDB snapshots): without it a restart loses the delayed set,
//!   the suppression list and the events. Warned.
//! - **memory** (every second, [`watch_memory`]): `used_memory`, plus a reserve for each
//!   job accepted but not yet ended, against `redis.high_water` × `maxmemory`. Above it new
//!   jobs are refused (`POST /api/v1/sends` 503 with `Retry-After`, `paloma enqueue`
//!   stops), so that the rest of `maxmemory` still holds the outcomes of the jobs already
//!   accepted and recipients' opt-outs; a full Redis (OOM) would refuse those alike.
//!   `/readyz` says so (still ready: tracking, opt-outs and deliveries go on), and
//!   `paloma_redis_memory_ratio` is `used_memory / maxmemory`. No `maxmemory`: no limit.
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

/// Bytes held back per job accepted but not yet ended, for what its end writes: its
/// terminal event, idempotency record, return-path key, recipient hash and more, less the
/// sends entry it frees (measured about 250 B net, README "Sizing Redis"), with a margin.
pub const RESERVE_PER_JOB: u64 = 1024;

/// Whether Redis refused `e` because it is full (`maxmemory` reached, `noeviction`): an
/// OOM reply, also inside an aborted MULTI/EXEC.
pub fn is_full(e: &redis::RedisError) -> bool {
    e.code() == Some("OOM")
        || e.clone()
            .into_server_errors()
            .is_some_and(|errs| errs.iter().any(|(_, s)| s.code() == "OOM"))
}

/// One look at Redis's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// `used_memory`.
    pub used: u64,
    /// `maxmemory`; 0 is no limit.
    pub max: u64,
    /// Jobs accepted and not yet ended: the sends stream and the delayed set.
    pub backlog: u64,
}

impl Memory {
    /// `used / max`; 0 without a limit.
    pub fn ratio(&self) -> f64 {
        if self.max == 0 {
            return 0.0;
        }
        self.used as f64 / self.max as f64
    }

    /// Why new jobs are refused, if they are: `used`, the reserve for the backlog and
    /// `extra` bytes (written since the look) reach `high_water` of `max`.
    pub fn refusal(&self, high_water: f64, extra: u64) -> Option<String> {
        if self.max == 0 {
            return None;
        }
        let reserve = self.backlog.saturating_mul(RESERVE_PER_JOB);
        let committed = self.used.saturating_add(reserve).saturating_add(extra);
        let mark = (self.max as f64 * high_water) as u64;
        let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
        (committed >= mark).then(|| {
            format!(
                "Redis memory is above the high-water mark: {:.1} MB used of maxmemory {:.1} MB, plus {:.1} MB kept for the outcomes of {} accepted jobs not yet done, reaches redis.high_water = {} ({:.1} MB); new jobs are refused until the daemons have delivered more (or raise maxmemory)",
                mb(self.used),
                mb(self.max),
                mb(reserve.saturating_add(extra)),
                self.backlog,
                high_water,
                mb(mark),
            )
        })
    }
}

/// Looks at memory and backlog (one pipelined round trip); None in a cluster, where INFO
/// would answer for one node of several.
pub async fn memory(
    conn: &mut RedisConn,
    sends: &str,
    scheduled: &str,
) -> redis::RedisResult<Option<Memory>> {
    if matches!(conn, RedisConn::Cluster(_)) {
        return Ok(None);
    }
    let (info, queued, delayed): (String, u64, u64) = redis::pipe()
        .cmd("INFO")
        .arg("memory")
        .cmd("XLEN")
        .arg(sends)
        .cmd("ZCARD")
        .arg(scheduled)
        .query_async(conn)
        .await?;
    let num = |k: &str| {
        info_field(&info, k)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(Some(Memory {
        used: num("used_memory"),
        max: num("maxmemory"),
        backlog: queued + delayed,
    }))
}

/// The latest verdict, shared with `/readyz`: 0 fine, 1 warned, 2 not ready. Also the
/// latest look at memory, which the API reads before each batch (no round trip).
#[derive(Default)]
pub struct Health {
    state: AtomicU8,
    reason: std::sync::Mutex<String>,
    /// The last look and `redis.high_water`.
    memory: std::sync::Mutex<Option<(Memory, f64)>>,
    /// Bytes (and reserves) this process has accepted since that look.
    accepted: std::sync::atomic::AtomicU64,
    /// Why writes cannot be acknowledged for want of replicas (`store::replication`).
    replication: std::sync::Mutex<Option<String>>,
}

impl Health {
    /// None when ready; else why not.
    pub fn not_ready(&self) -> Option<String> {
        if self.state.load(Ordering::Relaxed) == 2 {
            return Some(self.reason.lock().map(|r| r.clone()).unwrap_or_default());
        }
        self.replication.lock().ok().and_then(|r| r.clone())
    }

    /// Sets (or clears) why writes are not acknowledged.
    pub fn set_replication(&self, why: Option<String>) {
        if let Ok(mut r) = self.replication.lock() {
            *r = why;
        }
    }

    /// A warning to show beside "ready".
    pub fn warning(&self) -> Option<String> {
        (self.state.load(Ordering::Relaxed) == 1)
            .then(|| self.reason.lock().map(|r| r.clone()).unwrap_or_default())
    }

    /// Why new jobs are refused, if Redis memory is above the high-water mark (as of the
    /// last look, plus what this process accepted since).
    pub fn memory_refusal(&self) -> Option<String> {
        let m = *self.memory.lock().ok()?;
        let (m, high_water) = m?;
        m.refusal(high_water, self.accepted.load(Ordering::Relaxed))
    }

    /// `jobs` of `bytes` were written to the sends stream: counted until the next look.
    pub fn note_accepted(&self, jobs: u64, bytes: u64) {
        let add = bytes.saturating_add(jobs.saturating_mul(RESERVE_PER_JOB));
        self.accepted.fetch_add(add, Ordering::Relaxed);
    }

    fn set_memory(&self, m: Memory, high_water: f64) {
        if let Ok(mut g) = self.memory.lock() {
            *g = Some((m, high_water));
            self.accepted.store(0, Ordering::Relaxed);
        }
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

/// Looks at Redis memory every `every` until `stop`: the gauges, `health`, and a log line
/// when new jobs start or stop being refused.
#[allow(clippy::too_many_arguments)]
pub async fn watch_memory(
    mut conn: RedisConn,
    sends: String,
    scheduled: String,
    high_water: f64,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut refusing = false;
    loop {
        let m = match memory(&mut conn, &sends, &scheduled).await {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "looking at Redis memory failed; next round");
                tokio::select! {
                    _ = tokio::time::sleep(every) => continue,
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        };
        health.set_memory(m, high_water);
        metrics.capacity.redis_memory_ratio.set(m.ratio());
        let refusal = m.refusal(high_water, 0);
        metrics
            .redis_check
            .with_label_values(&["memory"])
            .set(i64::from(refusal.is_none()));
        match (&refusal, refusing) {
            (Some(why), false) => tracing::warn!("{why}"),
            (None, true) => tracing::info!(
                used = m.used,
                maxmemory = m.max,
                "Redis memory is below the high-water mark again: new jobs are taken"
            ),
            _ => {}
        }
        refusing = refusal.is_some();
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
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
    fn memory_above_the_mark_refuses_counting_the_backlog_and_no_limit_never_does() {
        let mb = 1024 * 1024;
        let m = |used, max, backlog| Memory { used, max, backlog };
        assert!(m(90 * mb, 0, 1_000_000).refusal(0.8, 0).is_none());
        assert!(m(70 * mb, 100 * mb, 0).refusal(0.8, 0).is_none());
        let why = m(81 * mb, 100 * mb, 0).refusal(0.8, 0).unwrap();
        assert!(why.contains("high-water") && why.contains("redis.high_water = 0.8"));
        // 10,000 jobs waiting hold back their outcomes' reserve.
        assert!(m(70 * mb, 100 * mb, 10_240).refusal(0.8, 0).is_some());
        assert!(m(70 * mb, 100 * mb, 0).refusal(0.8, 10 * mb).is_some());
        let h = Health::default();
        assert!(h.memory_refusal().is_none(), "no look yet: no refusal");
        h.set_memory(m(70 * mb, 100 * mb, 0), 0.8);
        assert!(h.memory_refusal().is_none());
        h.note_accepted(5_000, 6 * mb);
        assert!(
            h.memory_refusal().is_some(),
            "what this process accepted counts"
        );
        h.set_memory(m(70 * mb, 100 * mb, 0), 0.8);
        assert!(h.memory_refusal().is_none(), "until the next look");
        assert_eq!(m(25 * mb, 100 * mb, 0).ratio(), 0.25);
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

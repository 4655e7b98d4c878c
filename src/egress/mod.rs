//! Egress: which local address and EHLO name each message leaves from (mx mode).
//!
//! A [`Source`] is an address bound before connect and the name it speaks as; a pool is a
//! weighted set of sources. Each job leaves from one source of its pool (`[delivery] pool`,
//! or the job's `pool`): a retry keeps the source it had when that source can still send
//! (a receiver's greylisting then sees the same address), otherwise the pool's choice is a
//! smooth weighted round-robin per destination site (nginx's: every source gets its share
//! spread evenly, not in runs). A source suspended for the site, or at its warm-up cap for
//! the day ([`warmup`]), is skipped; when none can send, the job waits — until the
//! suspension ends, or until the next UTC day when every source is at its cap.
//!
//! Without `[[sources]]` there is one implicit source: no bound address, `[sender] helo`,
//! and an empty name, so every key it qualifies stays what it was before sources existed.
//!
//! Files: this one (sources, pools, the choice), [`warmup`] (daily caps counted in Redis for
//! the fleet), [`status`] (what `paloma sources` and `GET /api/v1/sources` show).

pub mod status;
pub mod warmup;

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{Settings, IMPLICIT_POOL};
use crate::store::keys::Keys;
use crate::store::RedisConn;
use warmup::{Plan, Take};

/// One UTC day in ms.
pub const DAY_MS: i64 = 86_400_000;

/// The UTC day (days since the epoch) of a time in ms.
pub fn day_of(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS)
}

/// Cap on the per-site round-robin states a pool keeps (a campaign over millions of
/// domains keeps memory flat; a forgotten state starts again evenly).
const MAX_SITES: usize = 50_000;

/// An egress source.
#[derive(Debug)]
pub struct Source {
    /// Empty for the implicit source.
    pub name: String,
    /// Bound before connect; None: the kernel picks.
    pub bind: Option<IpAddr>,
    /// The EHLO name.
    pub helo: String,
    /// The warm-up plan, if any.
    pub plan: Option<Plan>,
    /// Messages sent since the last flush to `sent:{source}:{day}`.
    sent: AtomicU64,
}

impl Source {
    /// `key` (a site or a domain) as this source's shaping and suspension key: the same key
    /// for the implicit source, `{name}/{key}` for a named one (a receiver counts per
    /// sending address).
    pub fn qualify<'a>(&self, key: &'a str) -> Cow<'a, str> {
        if self.name.is_empty() {
            Cow::Borrowed(key)
        } else {
            Cow::Owned(format!("{}/{key}", self.name))
        }
    }

    /// One more message sent through this source.
    pub fn count_sent(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
    }

    /// Its name for metric labels (`-` for the implicit source).
    pub fn label(&self) -> &str {
        if self.name.is_empty() {
            "-"
        } else {
            &self.name
        }
    }
}

struct Pool {
    members: Vec<(Arc<Source>, i64)>,
    /// Smooth weighted round-robin state per site: each member's current weight.
    rr: Mutex<HashMap<String, Vec<i64>>>,
}

/// Why a job cannot leave now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Every source of the pool that could send is suspended for the site: for this long.
    Suspended(Duration),
    /// Every source of the pool is at its warm-up cap: until the given time (ms, the next
    /// UTC day), no attempt counted.
    Warmup(i64),
    /// The warm-up counters could not be read (Redis): a short wait.
    Unknown(Duration),
}

/// The pool's answer for one job.
#[derive(Debug)]
pub enum Pick {
    Go(Arc<Source>),
    Wait(Wait),
    /// The job names a pool there is not.
    NoPool(String),
}

/// Sources and pools, built once from the config.
pub struct Egress {
    sources: Vec<Arc<Source>>,
    pools: HashMap<String, Pool>,
    default_pool: String,
    budget: warmup::Budget,
    redis: Option<(RedisConn, Keys)>,
}

impl Egress {
    /// From `[[sources]]`, `[[pools]]` and `[delivery] pool`; `redis` counts warm-up caps
    /// and sent messages for the fleet (None: each daemon alone, as in unit tests).
    pub fn new(settings: &Settings, redis: Option<RedisConn>) -> Egress {
        let keys = Keys::new(&settings.redis.prefix);
        let mut sources: Vec<Arc<Source>> = settings
            .sources
            .iter()
            .map(|s| {
                Arc::new(Source {
                    name: s.name.clone(),
                    bind: s.address.parse().ok(),
                    helo: s.helo.clone(),
                    plan: s.warmup.as_ref().and_then(Plan::of),
                    sent: AtomicU64::new(0),
                })
            })
            .collect();
        let mut pools = HashMap::new();
        let default_pool;
        if sources.is_empty() {
            sources.push(Arc::new(Source {
                name: String::new(),
                bind: None,
                helo: settings.sender.helo.clone(),
                plan: None,
                sent: AtomicU64::new(0),
            }));
            default_pool = String::new();
            pools.insert(String::new(), Pool::of(vec![(sources[0].clone(), 1)]));
        } else {
            default_pool = settings.default_pool().unwrap_or(IMPLICIT_POOL).to_string();
            let find = |n: &str| sources.iter().find(|s| s.name == n).cloned();
            if settings.pools.is_empty() {
                let all = sources.iter().map(|s| (s.clone(), 1)).collect();
                pools.insert(IMPLICIT_POOL.to_string(), Pool::of(all));
            }
            for p in &settings.pools {
                let members = p
                    .sources
                    .iter()
                    .filter_map(|m| Some((find(&m.source)?, i64::from(m.weight))))
                    .collect();
                pools.insert(p.name.clone(), Pool::of(members));
            }
        }
        let budget = warmup::Budget::new(&sources);
        Egress {
            sources,
            pools,
            default_pool,
            budget,
            redis: redis.map(|c| (c, keys)),
        }
    }

    /// Whether sources were configured (else the implicit one serves everything).
    pub fn configured(&self) -> bool {
        !self.sources[0].name.is_empty()
    }

    pub fn sources(&self) -> &[Arc<Source>] {
        &self.sources
    }

    /// The source a job for `site` leaves from: `pool` (None: the default), `sticky` the
    /// source of its previous attempt, `suspended` how long a source is still suspended
    /// for the site. `now`: unix ms by Redis's clock.
    pub async fn pick(
        &self,
        pool: Option<&str>,
        site: &str,
        sticky: Option<&str>,
        now: i64,
        suspended: impl Fn(&Source) -> Option<Duration>,
    ) -> Pick {
        let name = pool.unwrap_or(&self.default_pool);
        let Some(p) = self.pools.get(name) else {
            return Pick::NoPool(name.to_string());
        };
        if !self.configured() {
            // The implicit source: no choice, no cap.
            return match suspended(&p.members[0].0) {
                Some(d) => Pick::Wait(Wait::Suspended(d)),
                None => Pick::Go(p.members[0].0.clone()),
            };
        }
        let day = day_of(now);
        let mut eligible: Vec<bool> = Vec::with_capacity(p.members.len());
        let mut soonest: Option<Duration> = None;
        for (src, weight) in &p.members {
            let s = suspended(src);
            if let Some(d) = s {
                soonest = Some(soonest.map_or(d, |m| m.min(d)));
            }
            eligible.push(*weight > 0 && s.is_none());
        }
        // Sticky: a retry goes out where it went before, if that source can still send.
        if let Some(i) = sticky.and_then(|s| p.members.iter().position(|(m, _)| m.name == s)) {
            if eligible[i] {
                match self.take(&p.members[i].0, day).await {
                    Take::Yes => return Pick::Go(p.members[i].0.clone()),
                    Take::Unknown | Take::No => eligible[i] = false,
                }
            }
        }
        let mut unknown = false;
        while let Some(i) = p.next(site, &eligible) {
            match self.take(&p.members[i].0, day).await {
                Take::Yes => return Pick::Go(p.members[i].0.clone()),
                Take::No => eligible[i] = false,
                Take::Unknown => {
                    unknown = true;
                    eligible[i] = false;
                }
            }
        }
        if let Some(d) = soonest {
            return Pick::Wait(Wait::Suspended(d));
        }
        if unknown {
            return Pick::Wait(Wait::Unknown(Duration::from_secs(5)));
        }
        Pick::Wait(Wait::Warmup((day + 1) * DAY_MS))
    }

    async fn take(&self, src: &Source, day: i64) -> Take {
        match &src.plan {
            None => Take::Yes,
            Some(plan) => self.budget.take(src, plan, day, self.redis.as_ref()).await,
        }
    }

    /// Gives back the warm-up message `pick` took for a job that did not go out after all
    /// (over its rate, its campaign paused, not renderable).
    pub fn unspend(&self, src: &Source) {
        if src.plan.is_some() {
            self.budget
                .unspend(src, day_of(crate::store::clock::now_ms()));
        }
    }

    /// The pools jobs may name (for a dead letter's reason).
    pub fn pool_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.pools.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// A job's pool as a metric label: a known pool's name (an unknown one never gets here).
    pub fn pool_label<'a>(&'a self, pool: Option<&'a str>) -> &'a str {
        let p = pool.unwrap_or(&self.default_pool);
        if p.is_empty() {
            "-"
        } else {
            p
        }
    }

    /// Every second until `stop`: the messages each source sent, added to its day's
    /// counter in Redis (one pipeline for all sources), for `paloma sources`; and each
    /// warming source's cap of the day in `paloma_source_warmup_cap`.
    pub async fn flush_sent(
        self: Arc<Self>,
        metrics: Arc<crate::metrics::Metrics>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let Some((conn, keys)) = self.redis.clone() else {
            return;
        };
        let mut conn = conn;
        let mut ticker = crate::ticker::Ticker::new(Duration::from_secs(1), stop);
        loop {
            let running = ticker.tick().await;
            let day = day_of(crate::store::clock::now_ms());
            for s in &self.sources {
                if let Some(plan) = &s.plan {
                    match plan.cap(day) {
                        Some(cap) => metrics
                            .source_cap
                            .with_label_values(&[s.name.as_str()])
                            .set(cap as i64),
                        None => {
                            let _ = metrics.source_cap.remove_label_values(&[s.name.as_str()]);
                        }
                    }
                }
            }
            self.flush_once(&mut conn, &keys).await;
            if !running {
                break;
            }
        }
        // Claimed warm-up messages this daemon did not use go back to the fleet.
        self.budget
            .give_back(&mut conn, &keys, day_of(crate::store::clock::now_ms()))
            .await;
    }

    async fn flush_once(&self, conn: &mut RedisConn, keys: &Keys) {
        let day = day_of(crate::store::clock::now_ms());
        let mut pipe = redis::pipe();
        let mut taken = Vec::new();
        for s in self.sources.iter().filter(|s| !s.name.is_empty()) {
            let n = s.sent.swap(0, Ordering::Relaxed);
            if n > 0 {
                let key = keys.source_sent(&s.name, day);
                pipe.cmd("INCRBY").arg(&key).arg(n).ignore();
                pipe.cmd("EXPIRE").arg(&key).arg(8 * 86_400).ignore();
                taken.push((s, n));
            }
        }
        if taken.is_empty() {
            return;
        }
        if let Err(e) = pipe.query_async::<()>(conn).await {
            tracing::debug!(error = %e, "counting sent messages per source failed; next round");
            for (s, n) in taken {
                s.sent.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

impl Pool {
    fn of(members: Vec<(Arc<Source>, i64)>) -> Pool {
        Pool {
            members,
            rr: Mutex::new(HashMap::new()),
        }
    }

    /// The next member for `site` among the eligible ones (smooth weighted round-robin:
    /// each gains its weight, the highest is chosen and loses the total).
    fn next(&self, site: &str, eligible: &[bool]) -> Option<usize> {
        let total: i64 = self
            .members
            .iter()
            .zip(eligible)
            .filter(|(_, e)| **e)
            .map(|((_, w), _)| *w)
            .sum();
        if total == 0 {
            return None;
        }
        let mut rr = self.rr.lock().unwrap_or_else(|e| e.into_inner());
        if rr.len() >= MAX_SITES && !rr.contains_key(site) {
            rr.clear();
        }
        let current = rr
            .entry(site.to_string())
            .or_insert_with(|| vec![0; self.members.len()]);
        let mut best: Option<usize> = None;
        for (i, ((_, w), e)) in self.members.iter().zip(eligible).enumerate() {
            if !*e {
                continue;
            }
            current[i] += *w;
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        current[b] -= total;
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(extra: &str) -> Settings {
        Settings::from_toml(
            &format!(
                "[sender]\nfrom = \"a@b.test\"\nhelo = \"h.test\"\n[tracking]\nsecret = \"0123456789abcdef0\"\n[delivery]\nmode = \"mx\"\n{extra}"
            ),
            Vec::new(),
        )
        .unwrap()
    }

    const TWO: &str = "pool = \"m\"\n[[sources]]\nname = \"ip1\"\naddress = \"127.0.0.2\"\nhelo = \"one.test\"\n[[sources]]\nname = \"ip2\"\naddress = \"127.0.0.3\"\nhelo = \"two.test\"\n[[pools]]\nname = \"m\"\nsources = [{ source = \"ip1\", weight = 1 }, { source = \"ip2\", weight = 3 }]\n";

    async fn names(e: &Egress, n: usize, site: &str) -> Vec<String> {
        let mut out = Vec::new();
        for _ in 0..n {
            match e.pick(None, site, None, 0, |_| None).await {
                Pick::Go(s) => out.push(s.name.clone()),
                other => panic!("{other:?}"),
            }
        }
        out
    }

    #[tokio::test]
    async fn weights_split_traffic_evenly_spread_per_site() {
        let e = Egress::new(&settings(TWO), None);
        let got = names(&e, 8, "mx.a.test").await;
        // Smooth: the light source is spread out, never two in a row.
        assert_eq!(got.iter().filter(|n| *n == "ip1").count(), 2, "{got:?}");
        assert!(got.windows(2).all(|w| !(w[0] == "ip1" && w[1] == "ip1")));
        // Each site has its own round: another site starts afresh.
        assert_eq!(
            names(&e, 4, "mx.b.test").await,
            names(&e, 4, "mx.c.test").await
        );
    }

    #[tokio::test]
    async fn sticky_suspended_and_unknown_pools() {
        let e = Egress::new(&settings(TWO), None);
        let pick = |sticky: Option<&'static str>, down: Option<&'static str>| {
            let e = &e;
            async move {
                e.pick(None, "s", sticky, 0, |s| {
                    (Some(s.name.as_str()) == down).then(|| Duration::from_secs(9))
                })
                .await
            }
        };
        for _ in 0..5 {
            assert!(matches!(pick(Some("ip1"), None).await, Pick::Go(s) if s.name == "ip1"));
        }
        // The sticky source is suspended: the other one takes the retry.
        assert!(matches!(pick(Some("ip1"), Some("ip1")).await, Pick::Go(s) if s.name == "ip2"));
        assert!(matches!(
            e.pick(Some("nope"), "s", None, 0, |_| None).await,
            Pick::NoPool(p) if p == "nope"
        ));
        assert!(matches!(
            e.pick(None, "s", None, 0, |_| Some(Duration::from_secs(3))).await,
            Pick::Wait(Wait::Suspended(d)) if d == Duration::from_secs(3)
        ));
    }

    #[tokio::test]
    async fn no_sources_is_the_implicit_one() {
        let e = Egress::new(&settings(""), None);
        assert!(!e.configured());
        match e.pick(None, "s", None, 0, |_| None).await {
            Pick::Go(s) => {
                assert_eq!(
                    (s.name.as_str(), s.bind, s.helo.as_str()),
                    ("", None, "h.test")
                );
                assert_eq!(s.qualify("mx.a.test"), "mx.a.test");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            e.pick(Some("m"), "s", None, 0, |_| None).await,
            Pick::NoPool(_)
        ));
    }

    #[tokio::test]
    async fn a_source_at_its_cap_is_skipped_and_a_cold_pool_waits_for_the_next_day() {
        let cfg = "pool = \"mixed\"\n[[sources]]\nname = \"cold\"\naddress = \"127.0.0.2\"\nhelo = \"one.test\"\nwarmup = { start = \"2026-12-07\", daily = [3, 6] }\n[[sources]]\nname = \"warm\"\naddress = \"127.0.0.3\"\nhelo = \"two.test\"\n[[pools]]\nname = \"mixed\"\nsources = [{ source = \"cold\", weight = 3 }, { source = \"warm\", weight = 1 }]\n[[pools]]\nname = \"new\"\nsources = [{ source = \"cold\" }]\n";
        let e = Egress::new(&settings(cfg), None);
        let day1 = chrono::NaiveDate::from_ymd_opt(2026, 12, 7)
            .unwrap()
            .and_hms_opt(10, 0, 0)
            .unwrap()
            .and_utc()
            .timestamp_millis();
        let mut cold = 0;
        for _ in 0..40 {
            match e.pick(None, "s", None, day1, |_| None).await {
                Pick::Go(s) if s.name == "cold" => cold += 1,
                Pick::Go(_) => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(cold, 3, "day 1 allows 3");
        let next_day = (day_of(day1) + 1) * DAY_MS;
        assert!(matches!(
            e.pick(Some("new"), "s", None, day1, |_| None).await,
            Pick::Wait(Wait::Warmup(t)) if t == next_day
        ));
        // A taken message given back is taken again; day 2 allows 6.
        let day2 = day1 + DAY_MS;
        let mut n = 0;
        while let Pick::Go(s) = e.pick(Some("new"), "s", None, day2, |_| None).await {
            if n == 0 {
                e.budget.unspend(&s, day_of(day2));
                e.budget.unspend(&s, day_of(day2));
            }
            n += 1;
        }
        assert_eq!(n, 8, "6 and the 2 given back");
    }
}

//! Traffic shaping per destination: which rule a recipient domain falls under (by domain, or
//! by the suffix of its MX hosts), how fast it may be sent to (governor, keyed by domain or
//! site), how many sessions its site may open, and how throttling replies suspend a site.
//!
//! Rates given in `[[domains]]` are kept in Redis by default (`delivery.shared_rates`): a
//! GCRA whose state is one key per domain or site, advanced by a script, so every daemon
//! sharing the prefix draws from the same budget. Each admission reserves the next slot if
//! it comes within [`MAX_WAIT`] (the job waits for it in memory) or says when to come back.
//! If Redis does not answer, the daemon's own limiter (governor) takes over until it does.
//!
//! A job over its domain's rate waits in memory only briefly (up to [`MAX_WAIT`], for at most
//! a second's worth of that domain's traffic); the rest is put back in the delayed set at the
//! time its slot comes, so a slow domain never holds workers that other domains need and
//! memory stays flat however large its backlog.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::{BackoffRule, DeliveryMode, DomainRule, Rate, Settings};
use crate::deliver::{Limits, SiteLimits};
use crate::outcome::{enhanced_status, Outcome};
use crate::store::keys::Keys;
use crate::store::RedisConn;

pub mod throttle;
pub use throttle::Throttles;

/// The longest a job waits in memory for its rate slot.
pub const MAX_WAIT: Duration = Duration::from_secs(1);

/// Starting points for the large mailbox providers: they limit concurrent connections per
/// sending IP and publish no fixed message rate, so these cap sessions and messages per
/// session. A `[[domains]]` rule for the same domain replaces them.
const PROVIDERS: &[(&str, usize, u32)] = &[
    ("gmail.com", 20, 100),
    ("googlemail.com", 20, 100),
    (".google.com", 20, 100),
    ("yahoo.com", 10, 20),
    ("ymail.com", 10, 20),
    ("aol.com", 10, 20),
    (".yahoodns.net", 10, 20),
    ("outlook.com", 10, 100),
    ("hotmail.com", 10, 100),
    ("live.com", 10, 100),
    ("msn.com", 10, 100),
    (".protection.outlook.com", 10, 100),
    ("icloud.com", 10, 50),
    ("me.com", 10, 50),
    ("mac.com", 10, 50),
];

/// Replies that mean "you are sending too fast" (Gmail 4.7.28, Yahoo TS01/TS02, Microsoft
/// "try again later", generic 421).
const THROTTLE_WORDS: &[&str] = &[
    "try again later",
    "too many",
    "rate limit",
    "throttl",
    "temporarily deferred",
    "4.7.28",
    "ts01",
    "ts02",
    "ts03",
];

pub struct RuleState {
    /// The `match` pattern, also the metrics label.
    pub name: String,
    pub connections: usize,
    pub messages_per_connection: u32,
    rate: Option<Rate>,
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    keys: Mutex<HashMap<String, KeyState>>,
    /// Admissions so far, to prune the limiter's keys every few thousand.
    admits: std::sync::atomic::AtomicU64,
    /// The rate in Redis, shared by every daemon; None: this daemon's limiter only.
    shared: Option<SharedRate>,
}

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

struct SharedRate {
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

enum Reservation {
    /// A slot, this far off.
    In(Duration),
    /// None within [`MAX_WAIT`]: back to the delayed set for this long.
    No(Duration),
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl SharedRate {
    fn paused(&self) -> bool {
        unix_ms() < self.paused_until.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn reserve(&self, key: &str) -> Result<Reservation, String> {
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
    fn failed(&self, error: &str) {
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

/// A job of one key waiting in memory for its slot; counted until dropped.
struct Waiting<'a> {
    rule: &'a RuleState,
    key: &'a str,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(ks) = self
            .rule
            .keys
            .lock()
            .expect("shaper lock")
            .get_mut(self.key)
        {
            ks.waiting = ks.waiting.saturating_sub(1);
        }
    }
}

#[derive(Clone, Copy)]
struct KeyState {
    waiting: usize,
    /// The next free slot for a job put back in the delayed set.
    horizon: Instant,
}

/// How a destination reacts to a throttling reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaction {
    /// No sessions for this long.
    Suspend(Duration),
    /// At most this rate for this long.
    Slow(Rate, Duration),
}

/// What to do with a job now.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    Go,
    /// Back to the delayed set, due after this long.
    Later(Duration),
}

impl RuleState {
    pub fn new(
        name: &str,
        rate: Option<Rate>,
        connections: usize,
        messages_per_connection: u32,
    ) -> Self {
        Self::with_redis(name, rate, connections, messages_per_connection, None)
    }

    /// `redis`: where the rate is shared (connection, key names); only used with a rate.
    pub fn with_redis(
        name: &str,
        rate: Option<Rate>,
        connections: usize,
        messages_per_connection: u32,
        redis: Option<(RedisConn, &Keys)>,
    ) -> Self {
        // Bursts of up to one second's worth: 60 messages at 10/s take at least 5 s.
        let burst = |r: Rate| {
            ((r.count as f64) * Duration::from_secs(1).as_secs_f64() / r.per.as_secs_f64())
                .clamp(1.0, 1e6) as u32
        };
        let shared = rate.zip(redis).map(|(r, (conn, keys))| {
            let interval_us = (r.per.as_micros() as u64 / r.count as u64).max(1);
            let (tat_prefix, back_prefix) = keys.rate(name);
            SharedRate {
                conn,
                script: redis::Script::new(GCRA),
                tat_prefix,
                back_prefix,
                interval_us,
                tolerance_us: interval_us * (burst(r) as u64 - 1),
                paused_until: std::sync::atomic::AtomicU64::new(0),
                last_warned: std::sync::atomic::AtomicU64::new(0),
            }
        });
        let limiter = rate.map(|r| {
            let per_cell = r.per / r.count;
            let burst = burst(r);
            let quota = Quota::with_period(per_cell.max(Duration::from_nanos(1)))
                .expect("non-zero period")
                .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
            RateLimiter::keyed(quota)
        });
        RuleState {
            name: name.to_string(),
            connections: connections.max(1),
            messages_per_connection: messages_per_connection.max(1),
            rate,
            limiter,
            keys: Mutex::new(HashMap::new()),
            admits: std::sync::atomic::AtomicU64::new(0),
            shared,
        }
    }

    pub fn rate(&self) -> Option<Rate> {
        self.rate
    }

    /// Waits for `key`'s rate slot if it is close, else says when to come back.
    pub async fn admit(&self, key: &str) -> Admission {
        let (Some(limiter), Some(rate)) = (&self.limiter, self.rate) else {
            return Admission::Go;
        };
        // Keys whose state has fully decayed are dropped now and then, so one state per
        // recipient domain ever seen does not pile up over a long run.
        if self
            .admits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % 4096
            == 4095
            && limiter.len() > 10_000
        {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        let per_second = (rate.count as f64 / rate.per.as_secs_f64()).max(1.0) as usize;
        if let Some(shared) = self.shared.as_ref().filter(|s| !s.paused()) {
            // At most a second's worth of this key waits in this daemon's memory.
            let Some(waiting) = self.wait_slot(key, per_second) else {
                return self.later(key, rate, MAX_WAIT);
            };
            match shared.reserve(key).await {
                Ok(Reservation::In(wait)) => {
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    drop(waiting);
                    return Admission::Go;
                }
                // Redis paced it for the fleet already.
                Ok(Reservation::No(wait)) => return Admission::Later(wait.max(MAX_WAIT)),
                Err(e) => shared.failed(&e),
            }
        }
        let key_owned = key.to_string();
        let wait = match limiter.check_key(&key_owned) {
            Ok(()) => return Admission::Go,
            Err(not_until) => not_until.wait_time_from(DefaultClock::default().now()),
        };
        if wait > MAX_WAIT {
            return self.later(key, rate, wait);
        }
        let Some(waiting) = self.wait_slot(key, per_second) else {
            return self.later(key, rate, wait);
        };
        limiter.until_key_ready(&key_owned).await;
        drop(waiting);
        Admission::Go
    }

    /// `f` on the state of `key` (created if new), under the lock; states with nothing
    /// waiting and no future slot are dropped once there are many.
    fn with_key<R>(&self, key: &str, f: impl FnOnce(&mut KeyState, Instant) -> R) -> R {
        let now = Instant::now();
        let mut keys = self.keys.lock().expect("shaper lock");
        if keys.len() > 100_000 {
            keys.retain(|_, k| k.waiting > 0 || k.horizon > now);
        }
        let ks = keys.entry(key.to_string()).or_insert(KeyState {
            waiting: 0,
            horizon: now,
        });
        f(ks, now)
    }

    /// Counts one more job of `key` waiting in memory, unless `cap` already are.
    fn wait_slot<'a>(&'a self, key: &'a str, cap: usize) -> Option<Waiting<'a>> {
        let counted = self.with_key(key, |ks, _| {
            if ks.waiting >= cap {
                return false;
            }
            ks.waiting += 1;
            true
        });
        // Built only when counted: dropping one uncounts it.
        if counted {
            Some(Waiting { rule: self, key })
        } else {
            None
        }
    }

    /// Back to the delayed set: no sooner than `wait` (and [`MAX_WAIT`]), and spread one
    /// interval apart from the others put back for this key, so they do not all return at
    /// once.
    fn later(&self, key: &str, rate: Rate, wait: Duration) -> Admission {
        self.with_key(key, |ks, now| {
            let slot = ks.horizon.max(now + wait.max(MAX_WAIT));
            ks.horizon = slot + rate.per / rate.count;
            Admission::Later(slot - now)
        })
    }
}

/// Per-domain rules and throttling reactions.
pub struct Shaper {
    rules: Vec<(String, Arc<RuleState>)>,
    default: Arc<RuleState>,
    backoff: Vec<BackoffRule>,
    builtin_suspend: Option<Duration>,
    /// What throttling replies did to each site.
    pub throttles: Throttles,
}

/// Whether a job may be sent now.
#[derive(Debug, PartialEq, Eq)]
pub enum Gate {
    Go,
    /// Its site is suspended after a throttling reply: back to the delayed set for this long.
    Suspended(Duration),
    /// Over its rule's rate (or the site's lowered rate): back for this long.
    Paced(Duration),
}

impl Limits for Shaper {
    fn limits(&self, domain: &str, hosts: &[&str]) -> SiteLimits {
        let rule = self.rule_for(domain, hosts);
        SiteLimits {
            connections: rule.connections,
            messages_per_connection: rule.messages_per_connection,
        }
    }
}

impl Shaper {
    /// Rules with each daemon's own rate limiters (tests, benches, `shared_rates = false`).
    pub fn new(settings: &Settings) -> Self {
        Self::with_redis(settings, None)
    }

    /// `redis`: the connection through which `[[domains]]` rates are shared, when
    /// `delivery.shared_rates` is on.
    pub fn with_redis(settings: &Settings, redis: Option<RedisConn>) -> Self {
        let d = &settings.delivery;
        let redis = redis.filter(|_| d.shared_rates);
        let keys = Keys::new(&settings.redis.prefix);
        let mut default = RuleState::new("*", None, d.connections, d.messages_per_connection);
        let mut rules: Vec<(String, Arc<RuleState>)> = Vec::new();
        let mut add = |r: &DomainRule| {
            let state = RuleState::with_redis(
                &r.pattern,
                r.rate,
                r.connections.unwrap_or(d.connections),
                r.messages_per_connection
                    .unwrap_or(d.messages_per_connection),
                redis.clone().map(|c| (c, &keys)),
            );
            if r.pattern == "*" {
                default = state;
            } else {
                rules.push((r.pattern.to_ascii_lowercase(), Arc::new(state)));
            }
        };
        for r in &settings.domains {
            add(r);
        }
        if d.mode == DeliveryMode::Mx {
            for (pattern, connections, mpc) in PROVIDERS {
                if !settings
                    .domains
                    .iter()
                    .any(|r| r.pattern.eq_ignore_ascii_case(pattern))
                {
                    rules.push((
                        pattern.to_string(),
                        Arc::new(RuleState::new(pattern, None, *connections, *mpc)),
                    ));
                }
            }
        }
        Shaper {
            rules,
            default: Arc::new(default),
            backoff: settings.backoff.clone(),
            builtin_suspend: (d.mode == DeliveryMode::Mx).then(|| d.throttle_suspend.get()),
            throttles: Throttles::default(),
        }
    }

    /// Whether a job for `domain` may go to the site `site` (MX hosts `hosts`) now, and the
    /// rule it falls under. Checked in this order: the site's suspension; a rate the site was
    /// slowed to (this daemon's own, so a job it sends back takes no slot of a shared rate);
    /// the rule's rate, counted per site when the rule matched by MX host, else per domain.
    pub async fn gate(&self, domain: &str, site: &str, hosts: &[&str]) -> (Arc<RuleState>, Gate) {
        let (rule, by_mx) = self.rule_and_key(domain, hosts);
        let now = Instant::now();
        if let Some(wait) = self.throttles.suspended_for(site, now) {
            return (rule, Gate::Suspended(wait));
        }
        if let Some(slowed) = self.throttles.slowed(site, now) {
            if let Admission::Later(wait) = slowed.admit(site).await {
                return (rule, Gate::Paced(wait));
            }
        }
        let key = if by_mx { site } else { domain };
        match rule.admit(key).await {
            Admission::Later(wait) => (rule, Gate::Paced(wait)),
            Admission::Go => (rule, Gate::Go),
        }
    }

    /// Applies what a reply says about the site (a suspension or a lowered rate); returns
    /// the reaction when it newly throttles the site (for the metric and the log line).
    pub fn react(&self, site: &str, outcome: &Outcome) -> Option<Reaction> {
        let reaction = self.backoff_for(outcome)?;
        let now = Instant::now();
        let fresh = match &reaction {
            Reaction::Suspend(pause) => {
                let fresh = self.throttles.suspended_for(site, now).is_none();
                self.throttles.suspend(site, now + *pause);
                fresh
            }
            Reaction::Slow(rate, period) => {
                let fresh = self.throttles.slowed(site, now).is_none();
                self.throttles.slow(site, *rate, now + *period, now);
                fresh
            }
        };
        fresh.then_some(reaction)
    }

    /// The rule for a domain whose MX hosts are `mx_hosts`. `example.com` matches that
    /// domain and its subdomains; `.example.com` also matches domains whose MX hosts are
    /// under example.com; `*` is the default.
    pub fn rule_for(&self, domain: &str, mx_hosts: &[&str]) -> Arc<RuleState> {
        self.rule_and_key(domain, mx_hosts).0
    }

    /// The rule, and whether it matched by MX host (its rate is then counted per site rather
    /// than per domain).
    pub fn rule_and_key(&self, domain: &str, mx_hosts: &[&str]) -> (Arc<RuleState>, bool) {
        let under = |name: &str, pattern: &str| {
            let p = pattern.trim_start_matches('.');
            name == p
                || (name.len() > p.len()
                    && name.ends_with(p)
                    && name.as_bytes()[name.len() - p.len() - 1] == b'.')
        };
        for (pattern, rule) in &self.rules {
            if under(domain, pattern) {
                return (rule.clone(), false);
            }
        }
        // Only suffix patterns (".google.com") look at the MX hosts: a plain domain pattern
        // is about that domain, not about every domain it hosts mail for.
        for (pattern, rule) in self.rules.iter().filter(|(p, _)| p.starts_with('.')) {
            if mx_hosts.iter().any(|h| under(h, pattern)) {
                return (rule.clone(), true);
            }
        }
        (self.default.clone(), false)
    }

    /// How a site reacts to this outcome, if it says to slow down.
    pub fn backoff_for(&self, outcome: &Outcome) -> Option<Reaction> {
        let Outcome::Deferred { response } = outcome else {
            return None;
        };
        let code = response
            .get(..3)
            .filter(|c| c.bytes().all(|b| b.is_ascii_digit()));
        let enhanced = enhanced_status(response);
        let text = response.to_ascii_lowercase();
        for r in &self.backoff {
            let code_ok = r
                .code
                .as_deref()
                .is_none_or(|c| code.is_some_and(|have| have.starts_with(c)));
            let enh_ok = r
                .enhanced
                .as_deref()
                .is_none_or(|e| enhanced.starts_with(e));
            let text_ok = r
                .text
                .as_deref()
                .is_none_or(|t| text.contains(&t.to_ascii_lowercase()));
            if code_ok && enh_ok && text_ok {
                return match (r.suspend, r.slow_to, r.slow_for) {
                    (Some(d), _, _) => Some(Reaction::Suspend(d.get())),
                    (None, Some(rate), Some(d)) => Some(Reaction::Slow(rate, d.get())),
                    _ => None,
                };
            }
        }
        let throttled = code == Some("421") || THROTTLE_WORDS.iter().any(|w| text.contains(w));
        self.builtin_suspend
            .filter(|_| throttled)
            .map(Reaction::Suspend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(extra: &str) -> Settings {
        Settings::from_toml(
            &format!(
                "[sender]\nfrom = \"a@b.test\"\nhelo = \"h\"\n[tracking]\nsecret = \"0123456789abcdef0\"\n[delivery]\nmode = \"mx\"\nthrottle_suspend = \"7s\"\n{extra}"
            ),
            Vec::new(),
        )
        .unwrap()
    }

    #[test]
    fn rules_match_domains_subdomains_and_mx_suffixes() {
        let s = Shaper::new(&settings("[[domains]]\nmatch = \"example.com\"\nconnections = 3\n[[domains]]\nmatch = \".mx.test\"\nconnections = 4\n[[domains]]\nmatch = \"*\"\nconnections = 9\n"));
        assert_eq!(s.rule_for("example.com", &[]).connections, 3);
        assert_eq!(s.rule_for("eu.example.com", &[]).connections, 3);
        assert_eq!(s.rule_for("notexample.com", &[]).connections, 9);
        let (r, by_mx) = s.rule_and_key("corp.test", &["a.mx.test"]);
        assert_eq!((r.connections, by_mx), (4, true));
        assert_eq!(
            s.rule_for("gmail.com", &[]).connections,
            20,
            "provider default"
        );
        assert_eq!(
            s.rule_for("acme.test", &["aspmx.l.google.com"]).name,
            ".google.com"
        );
    }

    #[test]
    fn throttling_replies_suspend_or_slow_down() {
        let s = Shaper::new(&settings(
            "[[backoff]]\nenhanced = \"4.7.1\"\ntext = \"blocked\"\nsuspend = \"1h\"\n[[backoff]]\ncode = \"452\"\nslow_to = \"1/s\"\nslow_for = \"10m\"\n",
        ));
        let d = |r: &str| s.backoff_for(&Outcome::Deferred { response: r.into() });
        let sus = |secs| Some(Reaction::Suspend(Duration::from_secs(secs)));
        assert_eq!(d("421 4.7.0 Try again later"), sus(7));
        assert_eq!(
            d("451 4.7.28 Our system has detected an unusual rate"),
            sus(7)
        );
        assert_eq!(d("450 4.7.1 Client host blocked for now"), sus(3600));
        assert_eq!(
            d("452 4.5.3 Too much mail"),
            Some(Reaction::Slow(
                "1/s".parse().unwrap(),
                Duration::from_secs(600)
            ))
        );
        assert_eq!(d("450 4.2.1 Mailbox busy"), None);
        assert_eq!(
            s.backoff_for(&Outcome::bounce(550, "550 5.1.1 no".into())),
            None
        );
    }

    #[tokio::test]
    async fn limiter_keys_of_past_domains_are_pruned() {
        let r = RuleState::new("*", Some("1000000/s".parse().unwrap()), 10, 100);
        for i in 0..12_000 {
            assert_eq!(r.admit(&format!("d{i}.test")).await, Admission::Go);
        }
        let limiter = r.limiter.as_ref().unwrap();
        assert!(limiter.len() >= 12_000);
        // Past the burst window every one of those keys is back to a fresh state.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        for _ in 0..4096 {
            r.admit("busy.test").await;
        }
        assert!(limiter.len() < 100, "{} keys left", limiter.len());
    }

    #[tokio::test]
    async fn over_rate_jobs_wait_briefly_then_are_spread_out() {
        let r = RuleState::new("t", Some("10/s".parse().unwrap()), 1, 1);
        let t = Instant::now();
        let results = futures::future::join_all((0..40).map(|_| r.admit("d.test"))).await;
        let go = results.iter().filter(|a| **a == Admission::Go).count();
        let mut later: Vec<Duration> = results
            .iter()
            .filter_map(|a| match a {
                Admission::Later(d) => Some(*d),
                Admission::Go => None,
            })
            .collect();
        later.sort();
        assert_eq!(go, 20, "a burst of 10 and 10 short waits");
        // The waiters took the next second's worth of slots.
        assert!(
            t.elapsed() >= Duration::from_millis(900),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(later.len(), 20);
        // Jobs put back are spread at the rate, not all due at once.
        for w in later.windows(2) {
            assert!(w[1] >= w[0] + Duration::from_millis(90), "{later:?}");
        }
    }
}

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
//!
//! Files: this one (the [`Shaper`]: rules per destination, admission, reactions to
//! throttling replies), [`rules`] (matching a domain or its MX hosts to a rule; the built-in
//! provider table), [`limiter`] (a rule's limiters and in-memory waits), [`gcra`] (the rate
//! shared in Redis) and [`throttle`] (suspended and slowed sites). Which replies mean
//! "too fast" is [`crate::outcome::is_throttling`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{BackoffRule, DeliveryMode, DomainRule, Rate, Settings, Trigger};
use crate::deliver::{Limits, SiteLimits};
use crate::egress::Source;
use crate::outcome::{enhanced_status, Outcome};
use crate::store::keys::Keys;
use crate::store::RedisConn;

mod gcra;
mod limiter;
mod rules;
pub mod throttle;

pub use limiter::{Admission, RuleState};
pub use throttle::Throttles;

/// The longest a job waits in memory for its rate slot.
pub const MAX_WAIT: Duration = Duration::from_secs(1);

/// How a destination reacts to a throttling reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaction {
    /// No sessions for this long.
    Suspend(Duration),
    /// At most this rate for this long.
    Slow(Rate, Duration),
    /// At most this many sessions at once for this long (and a lowered rate, if given).
    Cap(usize, Option<Rate>, Duration),
}

/// Per-domain rules and throttling reactions.
pub struct Shaper {
    rules: Vec<(String, Arc<RuleState>)>,
    default: Arc<RuleState>,
    backoff: Vec<BackoffRule>,
    builtin_suspend: Option<Duration>,
    /// What throttling replies did to each site.
    pub throttles: Throttles,
    /// Where the fleet's throttling state is kept: operators' domain suspensions are read
    /// from it whatever `shared_rates` says…
    redis: Option<RedisConn>,
    /// …and suspensions, lowered rates and trigger windows are shared through it with
    /// `delivery.shared_rates`.
    shared: bool,
    keys: Keys,
    /// The domain suspensions in force, as last read: `domain` or `{source}/{domain}` →
    /// until. Replaced whole at each read, so a lifted suspension goes within a round.
    domains: std::sync::RwLock<std::collections::HashMap<String, Instant>>,
    /// Trigger windows counted here when Redis is not shared (or does not answer).
    trigger_counts: std::sync::Mutex<
        std::collections::HashMap<(usize, String), std::collections::VecDeque<Instant>>,
    >,
}

/// Adds one reply time to a `[[backoff]]` trigger's window and answers how many it holds,
/// starting the count again once it reaches the threshold.
/// KEYS[1] the window; ARGV: now (ms), the period (ms), the threshold, a random tag.
const TRIGGER: &str = r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]))
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[1] .. ':' .. ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[3]) then redis.call('DEL', KEYS[1]) end
return n
"#;

/// How often each daemon reads the suspensions the fleet shares.
pub const SHARED_SUSPENSIONS_EVERY: Duration = Duration::from_millis(500);

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
        let all = redis.clone();
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
            for (pattern, connections, mpc) in rules::PROVIDERS {
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
            throttles: match &redis {
                Some(c) => Throttles::shared(c.clone(), keys.clone()),
                None => Throttles::default(),
            },
            shared: redis.is_some(),
            redis: all,
            keys,
            domains: Default::default(),
            trigger_counts: Default::default(),
        }
    }

    /// Whether a job for `domain` may go to the site `site` (MX hosts `hosts`) now, and the
    /// rule it falls under. Checked in this order: the site's suspension; a rate the site was
    /// slowed to (this daemon's own, so a job it sends back takes no slot of a shared rate);
    /// the rule's rate, counted per site when the rule matched by MX host, else per domain.
    ///
    /// Every key is the source's (see [`Source::qualify`]): a receiver counts, slows and
    /// suspends per sending address, so each source has its own rate, suspension and slowed
    /// rate at each destination.
    pub async fn gate(
        &self,
        domain: &str,
        site: &str,
        hosts: &[&str],
        source: &Source,
    ) -> (Arc<RuleState>, Gate) {
        let (rule, by_mx) = self.rule_and_key(domain, hosts);
        let now = Instant::now();
        let site = source.qualify(site);
        if let Some(wait) = self.throttles.suspended_for(&site, now) {
            return (rule, Gate::Suspended(wait));
        }
        if let Some(slowed) = self.throttles.slowed(&site, now) {
            if let Admission::Later(wait) = slowed.admit(&site).await {
                return (rule, Gate::Paced(wait));
            }
        }
        let key = if by_mx { site } else { source.qualify(domain) };
        match rule.admit(&key).await {
            Admission::Later(wait) => (rule, Gate::Paced(wait)),
            Admission::Go => (rule, Gate::Go),
        }
    }

    /// How long `source` may not send to `site` for a recipient at `domain`: the source's
    /// suspension at the site (a throttling reply), or an operator's suspension of the
    /// domain for every source or for this one.
    pub fn suspended_for(&self, source: &Source, site: &str, domain: &str) -> Option<Duration> {
        let now = Instant::now();
        let by_site = self.throttles.suspended_for(&source.qualify(site), now);
        let by_operator = {
            let domains = self.domains.read().unwrap_or_else(|e| e.into_inner());
            if domains.is_empty() {
                None
            } else {
                let all = domains.get(domain).copied();
                let one = (!source.name.is_empty())
                    .then(|| domains.get(source.qualify(domain).as_ref()).copied())
                    .flatten();
                all.max(one).filter(|t| *t > now).map(|t| t - now)
            }
        };
        by_site.max(by_operator)
    }

    /// Applies what a reply says about the site (a suspension or a lowered rate); returns
    /// the reaction when it newly throttles the site (for the metric and the log line).
    /// `site` is the source's key for the site ([`Source::qualify`]).
    /// A `[[backoff]]` rule with a `trigger` acts only on its Nth matching reply within the
    /// period.
    pub async fn react(&self, site: &str, outcome: &Outcome) -> Option<Reaction> {
        let (reaction, trigger) = self.backoff_rule(outcome)?;
        if let Some((rule, t)) = trigger {
            if !self.triggered(rule, site, t).await {
                return None;
            }
        }
        let now = Instant::now();
        let fresh = match &reaction {
            Reaction::Suspend(pause) => {
                let fresh = self.throttles.suspended_for(site, now).is_none();
                self.throttles.suspend(site, now + *pause);
                self.share_suspension(site, *pause);
                fresh
            }
            Reaction::Slow(rate, period) => {
                let fresh = self.throttles.slowed(site, now).is_none();
                self.throttles.slow(site, *rate, now + *period, now);
                self.share_slow_down(site, *rate, *period);
                fresh
            }
            Reaction::Cap(sessions, rate, period) => {
                let fresh = self.throttles.capped(site, now).is_none();
                self.throttles.cap(site, *sessions, now + *period, now);
                self.share_lowered(site, &format!("c{sessions}"), *period);
                if let Some(rate) = rate {
                    self.throttles.slow(site, *rate, now + *period, now);
                    self.share_slow_down(site, *rate, *period);
                }
                fresh
            }
        };
        fresh.then_some(reaction)
    }

    /// Tells the fleet: `{prefix}suspended_sites` gets the site until now + `pause` on the
    /// server's clock (a later suspension already there is kept).
    fn share_suspension(&self, site: &str, pause: Duration) {
        self.share(&self.keys.suspended_sites, site.to_string(), pause);
    }

    /// Tells the fleet that the site is slowed to `rate` for `period`: every daemon then
    /// applies the same rate, drawn from one budget in Redis.
    fn share_slow_down(&self, site: &str, rate: Rate, period: Duration) {
        self.share_lowered(
            site,
            &format!("{}|{}", rate.count, rate.per.as_millis()),
            period,
        );
    }

    /// `{site}|{what}` in `{prefix}slowed_sites` until now + `period`: a lowered rate
    /// (`{count}|{per ms}`) or session cap (`c{n}`) every daemon applies.
    fn share_lowered(&self, site: &str, what: &str, period: Duration) {
        self.share(&self.keys.slowed_sites, format!("{site}|{what}"), period);
    }

    /// `ZADD key GT (now + period) member`, by a task of its own, so the worker that heard
    /// the reply does not wait on Redis; a throttling reply is rare, this is no per-message
    /// write. Nothing without `shared_rates`.
    fn share(&self, key: &str, member: String, period: Duration) {
        let Some(conn) = self.redis.as_ref().filter(|_| self.shared) else {
            return;
        };
        let until = crate::queue::now_ms() + period.as_millis() as i64;
        let (mut conn, key) = (conn.clone(), key.to_string());
        tokio::spawn(async move {
            let r: redis::RedisResult<()> = redis::cmd("ZADD")
                .arg(&key)
                .arg("GT")
                .arg(until)
                .arg(&member)
                .query_async(&mut conn)
                .await;
            if let Err(e) = r {
                tracing::warn!(error = %e, key, member, "sharing a throttling reaction failed; the other daemons learn it from their own replies");
            }
        });
    }

    /// Applies the suspensions the fleet shares, every [`SHARED_SUSPENSIONS_EVERY`] until
    /// `stop`: one round trip that drops the ended ones and reads the rest, so every daemon
    /// sending to a site stops within about a second of the first one's throttling reply.
    /// The same round trip reads the operators' domain suspensions.
    pub async fn follow_shared(self: Arc<Self>, stop: tokio::sync::watch::Receiver<bool>) {
        if self.redis.is_none() {
            return;
        }
        let mut ticker = crate::ticker::Ticker::new(SHARED_SUSPENSIONS_EVERY, stop);
        while ticker.tick().await {
            if let Err(e) = self.read_shared().await {
                tracing::debug!(error = %e, "reading the fleet's suspensions failed; next round")
            }
        }
    }

    /// One read of the fleet's suspensions (the daemon makes one before its intake starts,
    /// so a suspension in force is never missed by a daemon just started).
    pub async fn read_shared(&self) -> redis::RedisResult<()> {
        let Some(mut conn) = self.redis.clone() else {
            return Ok(());
        };
        let k = &self.keys;
        let mut keys: Vec<&str> = Vec::with_capacity(3);
        if self.shared {
            keys.push(&k.suspended_sites);
            keys.push(&k.slowed_sites);
        }
        keys.push(&k.suspended_domains);
        let now = crate::queue::now_ms();
        let mut p = redis::pipe();
        for key in &keys {
            p.cmd("ZREMRANGEBYSCORE")
                .arg(key)
                .arg("-inf")
                .arg(now)
                .ignore();
            p.cmd("ZRANGEBYSCORE")
                .arg(key)
                .arg(format!("({now}"))
                .arg("+inf")
                .arg("WITHSCORES");
        }
        let mut lists: Vec<Vec<(String, i64)>> = p.query_async(&mut conn).await?;
        let at = Instant::now();
        let left = |until: i64| at + Duration::from_millis((until - now).max(0) as u64);
        let domains = lists.pop().unwrap_or_default();
        *self.domains.write().unwrap_or_else(|e| e.into_inner()) = domains
            .into_iter()
            .map(|(d, until)| (d, left(until)))
            .collect();
        if lists.len() == 2 {
            for (member, until) in lists.pop().unwrap_or_default() {
                // `{site}|c{sessions}`: a session cap.
                if let Some((site, n)) = member.rsplit_once("|c") {
                    if let Ok(n) = n.parse::<usize>() {
                        self.throttles.cap(site, n, left(until), at);
                        continue;
                    }
                }
                // `{site}|{count}|{per ms}`.
                let mut parts = member.rsplitn(3, '|');
                let per = parts.next().and_then(|p| p.parse::<u64>().ok());
                let count = parts.next().and_then(|c| c.parse::<u32>().ok());
                if let (Some(per), Some(count), Some(site)) = (per, count, parts.next()) {
                    if count > 0 && per > 0 {
                        let rate = Rate {
                            count,
                            per: Duration::from_millis(per),
                        };
                        self.throttles.slow(site, rate, left(until), at);
                    }
                }
            }
            for (site, until) in lists.pop().unwrap_or_default() {
                self.throttles.suspend(&site, left(until));
            }
        }
        Ok(())
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
        for (pattern, rule) in &self.rules {
            if rules::under(domain, pattern) {
                return (rule.clone(), false);
            }
        }
        // Only suffix patterns (".google.com") look at the MX hosts: a plain domain pattern
        // is about that domain, not about every domain it hosts mail for.
        for (pattern, rule) in self.rules.iter().filter(|(p, _)| p.starts_with('.')) {
            if mx_hosts.iter().any(|h| rules::under(h, pattern)) {
                return (rule.clone(), true);
            }
        }
        (self.default.clone(), false)
    }

    /// How a site reacts to this outcome, if it says to slow down (whatever a trigger
    /// says: see [`Shaper::react`]).
    pub fn backoff_for(&self, outcome: &Outcome) -> Option<Reaction> {
        self.backoff_rule(outcome).map(|(r, _)| r)
    }

    /// The reaction, and the trigger of the `[[backoff]]` rule that gave it (its index and
    /// threshold), if it has one.
    fn backoff_rule(&self, outcome: &Outcome) -> Option<(Reaction, Option<(usize, Trigger)>)> {
        let Outcome::Deferred { response } = outcome else {
            return None;
        };
        let code = response
            .get(..3)
            .filter(|c| c.bytes().all(|b| b.is_ascii_digit()));
        let enhanced = enhanced_status(response);
        let text = response.to_ascii_lowercase();
        for (i, r) in self.backoff.iter().enumerate() {
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
                let reaction = match (r.suspend, r.slow_to, r.slow_for) {
                    (Some(d), _, _) => Reaction::Suspend(d.get()),
                    (None, rate, Some(d)) if r.connections.is_some() => {
                        Reaction::Cap(r.connections.unwrap_or(1), rate, d.get())
                    }
                    (None, Some(rate), Some(d)) => Reaction::Slow(rate, d.get()),
                    _ => return None,
                };
                return Some((reaction, r.trigger.map(|t| (i, t))));
            }
        }
        self.builtin_suspend
            .filter(|_| crate::outcome::is_throttling(response))
            .map(|d| (Reaction::Suspend(d), None))
    }

    /// Counts one more reply matching rule `rule` from `site`; true once there have been
    /// `trigger.count` within `trigger.within` (the count then starts again). Counted in
    /// Redis for the fleet (a sorted set of reply times per rule and site; a throttling
    /// reply is rare, this is no per-message round trip); by this daemon alone when Redis
    /// is not shared or does not answer.
    async fn triggered(&self, rule: usize, site: &str, trigger: Trigger) -> bool {
        if let Some(conn) = self.redis.as_ref().filter(|_| self.shared) {
            let key = self.keys.backoff_window(rule, site);
            let now = crate::queue::now_ms();
            let r: redis::RedisResult<u32> = redis::Script::new(TRIGGER)
                .key(&key)
                .arg(now)
                .arg(trigger.within.as_millis() as u64)
                .arg(trigger.count)
                .arg(rand::random::<u32>())
                .invoke_async(&mut conn.clone())
                .await;
            match r {
                Ok(n) => return n >= trigger.count,
                Err(e) => {
                    tracing::debug!(error = %e, "counting a backoff trigger in Redis failed; counting here")
                }
            }
        }
        let now = Instant::now();
        let mut counts = self
            .trigger_counts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if counts.len() > 10_000 {
            counts.retain(|_, v| {
                v.back()
                    .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(86_400))
            });
        }
        let seen = counts.entry((rule, site.to_string())).or_default();
        seen.push_back(now);
        while seen
            .front()
            .is_some_and(|t| now.duration_since(*t) > trigger.within)
        {
            seen.pop_front();
        }
        if seen.len() as u32 >= trigger.count {
            seen.clear();
            return true;
        }
        false
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
        let capped = Shaper::new(&settings(
            "[[backoff]]\ntext = \"S3150\"\nconnections = 2\nslow_for = \"20m\"\n",
        ));
        assert_eq!(
            capped.backoff_for(&Outcome::Deferred {
                response: "451 4.7.650 S3150 temporarily rate limited".into()
            }),
            Some(Reaction::Cap(2, None, Duration::from_secs(1200)))
        );
        assert_eq!(
            s.backoff_for(&Outcome::bounce(550, "550 5.1.1 no".into())),
            None
        );
    }

    #[tokio::test]
    async fn a_trigger_acts_on_its_nth_reply_per_site_and_counts_again_after() {
        let s = Shaper::new(&settings(
            "[[backoff]]\ncode = \"421\"\ntrigger = \"3/10m\"\nsuspend = \"1h\"\n",
        ));
        let reply = Outcome::Deferred {
            response: "421 4.7.0 Try again later".into(),
        };
        assert_eq!(s.react("a", &reply).await, None);
        assert_eq!(s.react("b", &reply).await, None, "counted per site");
        assert_eq!(s.react("a", &reply).await, None);
        assert_eq!(
            s.react("a", &reply).await,
            Some(Reaction::Suspend(Duration::from_secs(3600)))
        );
        assert!(s.throttles.suspended_for("a", Instant::now()).is_some());
        assert!(s.throttles.suspended_for("b", Instant::now()).is_none());
        // The count starts again: one more reply does not act by itself.
        assert_eq!(s.react("a", &reply).await, None);
        let e = Settings::from_toml(
            "[sender]\nfrom = \"a@b.test\"\nhelo = \"h\"\n[tracking]\nsecret = \"0123456789abcdef0\"\n[[backoff]]\ncode = \"421\"\ntrigger = \"3 per 10m\"\nsuspend = \"1h\"\n",
            Vec::new(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("3/10m"), "{e}");
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

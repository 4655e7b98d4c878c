//! A rule's limiters: the shared rate in Redis ([`super::gcra`]) or the daemon's own
//! (governor, keyed by domain or site), and the jobs waiting in memory for their slot.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::gcra::{Reservation, SharedRate};
use super::MAX_WAIT;
use crate::config::Rate;
use crate::store::keys::Keys;
use crate::store::RedisConn;

/// A `[[domains]]` rule (or a provider default, or `*`) with its limiters.
pub struct RuleState {
    /// The `match` pattern, also the metrics label.
    pub name: String,
    pub connections: usize,
    pub messages_per_connection: u32,
    rate: Option<Rate>,
    pub(super) limiter: Option<DefaultKeyedRateLimiter<String>>,
    keys: Mutex<HashMap<String, KeyState>>,
    /// Admissions so far, to prune the limiter's keys every few thousand.
    admits: std::sync::atomic::AtomicU64,
    /// The rate in Redis, shared by every daemon; None: this daemon's limiter only.
    shared: Option<SharedRate>,
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
            SharedRate::new(
                conn,
                keys.rate(name),
                interval_us,
                interval_us * (burst(r) as u64 - 1),
            )
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

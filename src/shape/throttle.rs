//! What throttling replies did to each site: a suspension (no sessions until an instant) or a
//! lowered rate (its own limiter until an instant). Kept by site key, apart from the sites
//! themselves, so a suspension outlives the routes and sessions of the site it names, and
//! only while it is in force: an entry goes when nothing in it applies any more.
//!
//! Every method takes `now`, so the logic is tested on an injected clock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::RuleState;
use crate::config::Rate;
use crate::store::keys::Keys;
use crate::store::RedisConn;

#[derive(Default)]
struct State {
    suspended_until: Option<Instant>,
    /// A lowered rate after a throttling reply, until the instant given.
    slowed: Option<(Instant, Arc<RuleState>)>,
    /// A lowered session cap (the sessions allowed, a permit each), until the instant given.
    capped: Option<(Instant, usize, Arc<tokio::sync::Semaphore>)>,
}

impl State {
    fn expire(&mut self, now: Instant) -> bool {
        if self.suspended_until.is_some_and(|t| t <= now) {
            self.suspended_until = None;
        }
        if self.slowed.as_ref().is_some_and(|(t, _)| *t <= now) {
            self.slowed = None;
        }
        if self.capped.as_ref().is_some_and(|(t, _, _)| *t <= now) {
            self.capped = None;
        }
        self.suspended_until.is_none() && self.slowed.is_none() && self.capped.is_none()
    }
}

/// Throttling state of every site, by site key.
#[derive(Default)]
pub struct Throttles {
    sites: Mutex<HashMap<String, State>>,
    /// Where a lowered rate is one budget for the fleet (`rate:slowed:{site}`, a GCRA).
    redis: Option<(RedisConn, Keys)>,
}

impl Throttles {
    /// Lowered rates drawn from one budget in Redis, shared by every daemon.
    pub fn shared(conn: RedisConn, keys: Keys) -> Throttles {
        Throttles {
            sites: Mutex::default(),
            redis: Some((conn, keys)),
        }
    }

    /// Suspends the site (no sessions) until `until`; a later suspension extends it.
    pub fn suspend(&self, site: &str, until: Instant) {
        let mut sites = self.sites.lock().expect("throttles lock");
        let s = sites.entry(site.to_string()).or_default();
        if s.suspended_until.is_none_or(|t| t < until) {
            s.suspended_until = Some(until);
        }
    }

    /// How long the site stays suspended, if it is.
    pub fn suspended_for(&self, site: &str, now: Instant) -> Option<Duration> {
        let mut sites = self.sites.lock().expect("throttles lock");
        let s = sites.get_mut(site)?;
        match s.suspended_until {
            Some(t) if t > now => Some(t - now),
            _ => {
                if s.expire(now) {
                    sites.remove(site);
                }
                None
            }
        }
    }

    /// Sends to this site at most at `rate` until `until`.
    pub fn slow(&self, site: &str, rate: Rate, until: Instant, now: Instant) {
        let mut sites = self.sites.lock().expect("throttles lock");
        let s = sites.entry(site.to_string()).or_default();
        // Another throttling reply while slowed to the same rate extends the period but keeps
        // the limiter: a new one would start with a fresh burst each time.
        if let Some((t, r)) = s.slowed.as_mut() {
            if *t > now && r.rate() == Some(rate) {
                *t = (*t).max(until);
                return;
            }
        }
        // The slowed rule's limiter is keyed by the site (`admit(site)`), so in Redis its
        // state is `rate:slowed:{site}`.
        let state = RuleState::with_redis(
            "slowed",
            Some(rate),
            1,
            1,
            self.redis.as_ref().map(|(c, k)| (c.clone(), k)),
        );
        s.slowed = Some((until, Arc::new(state)));
    }

    /// The lowered rate in force, if any.
    pub fn slowed(&self, site: &str, now: Instant) -> Option<Arc<RuleState>> {
        let mut sites = self.sites.lock().expect("throttles lock");
        let s = sites.get_mut(site)?;
        match &s.slowed {
            Some((t, r)) if *t > now => Some(r.clone()),
            _ => {
                if s.expire(now) {
                    sites.remove(site);
                }
                None
            }
        }
    }

    /// At most `sessions` sessions to this site at once until `until` (the same cap again
    /// extends it and keeps its permits).
    pub fn cap(&self, site: &str, sessions: usize, until: Instant, now: Instant) {
        let mut sites = self.sites.lock().expect("throttles lock");
        let s = sites.entry(site.to_string()).or_default();
        if let Some((t, n, _)) = s.capped.as_mut() {
            if *t > now && *n == sessions {
                *t = (*t).max(until);
                return;
            }
        }
        let permits = Arc::new(tokio::sync::Semaphore::new(sessions.max(1)));
        s.capped = Some((until, sessions, permits));
    }

    /// The lowered session cap in force, if any: a send holds one of its permits.
    pub fn capped(&self, site: &str, now: Instant) -> Option<Arc<tokio::sync::Semaphore>> {
        let mut sites = self.sites.lock().expect("throttles lock");
        let s = sites.get_mut(site)?;
        match &s.capped {
            Some((t, _, p)) if *t > now => Some(p.clone()),
            _ => {
                if s.expire(now) {
                    sites.remove(site);
                }
                None
            }
        }
    }

    /// Sites suspended right now (for the gauge); forgets what has expired.
    pub fn suspended(&self, now: Instant) -> usize {
        let mut sites = self.sites.lock().expect("throttles lock");
        sites.retain(|_, s| !s.expire(now));
        sites
            .values()
            .filter(|s| s.suspended_until.is_some())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_throttling_reply_extends_the_slow_down_without_a_fresh_burst() {
        let t = Throttles::default();
        let rate: Rate = "2/s".parse().unwrap();
        let now = Instant::now();
        t.slow("mx.test", rate, now + Duration::from_secs(10), now);
        let first = t.slowed("mx.test", now).expect("slowed");
        t.slow("mx.test", rate, now + Duration::from_secs(20), now);
        let second = t.slowed("mx.test", now).expect("still slowed");
        assert!(
            Arc::ptr_eq(&first, &second),
            "the same limiter, its burst spent"
        );
        // Past the first period, the extension holds.
        assert!(t.slowed("mx.test", now + Duration::from_secs(15)).is_some());
        // A different rate replaces it.
        t.slow(
            "mx.test",
            "1/s".parse().unwrap(),
            now + Duration::from_secs(5),
            now,
        );
        let third = t.slowed("mx.test", now).expect("slowed");
        assert!(!Arc::ptr_eq(&second, &third));
        assert_eq!(third.rate(), Some("1/s".parse().unwrap()));
        assert!(t.slowed("mx.test", now + Duration::from_secs(5)).is_none());
        assert!(
            t.sites.lock().unwrap().is_empty(),
            "nothing kept once expired"
        );
    }

    #[test]
    fn a_lowered_session_cap_holds_its_permits_until_it_ends() {
        let t = Throttles::default();
        let now = Instant::now();
        t.cap("mx.test", 2, now + Duration::from_secs(10), now);
        let p = t.capped("mx.test", now).expect("capped");
        assert_eq!(p.available_permits(), 2);
        let held = p.clone().try_acquire_owned().unwrap();
        // The same cap again extends it and keeps the permit held.
        t.cap("mx.test", 2, now + Duration::from_secs(20), now);
        let q = t
            .capped("mx.test", now + Duration::from_secs(15))
            .expect("extended");
        assert!(Arc::ptr_eq(&p, &q));
        assert_eq!(q.available_permits(), 1);
        drop(held);
        assert!(t.capped("mx.test", now + Duration::from_secs(20)).is_none());
        assert!(t.sites.lock().unwrap().is_empty());
    }

    #[test]
    fn a_suspension_ends_on_time_and_is_then_forgotten() {
        let t = Throttles::default();
        let now = Instant::now();
        t.suspend("a", now + Duration::from_secs(30));
        t.suspend("a", now + Duration::from_secs(10)); // an earlier end never shortens it
        t.suspend("b", now + Duration::from_secs(5));
        assert_eq!(t.suspended(now), 2);
        assert_eq!(
            t.suspended_for("a", now + Duration::from_secs(20)),
            Some(Duration::from_secs(10))
        );
        assert_eq!(t.suspended(now + Duration::from_secs(6)), 1);
        assert_eq!(t.suspended_for("a", now + Duration::from_secs(30)), None);
        assert_eq!(t.suspended(now + Duration::from_secs(30)), 0);
        assert!(t.sites.lock().unwrap().is_empty());
    }
}

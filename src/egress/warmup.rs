//! Warm-up: a new address earns a receiver's trust by volume that grows day by day. A
//! source with a plan sends at most its day's cap, counted per UTC day in Redis
//! (`warmup:{source}:{day}`) so every daemon sharing the source shares the cap.
//!
//! Counting each message in Redis would be a round trip per message. Instead each daemon
//! claims a few messages at a time (a fiftieth of the day's cap, 1 to 50) with a script that
//! never lets the claims pass the cap, and spends them locally; what it has not spent when it
//! stops goes back. So the fleet never sends more than the cap, and while the daemons run
//! it may send up to one claim per daemon less.

use std::collections::HashMap;
use std::sync::Mutex;

use redis::Script;

use super::Source;
use crate::config::WarmupRule;
use crate::store::keys::Keys;
use crate::store::RedisConn;

/// Claims up to ARGV[2] of the day's cap ARGV[1] from KEYS[1]; answers how many it got.
const CLAIM: &str = r#"
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local n = math.min(tonumber(ARGV[2]), tonumber(ARGV[1]) - used)
if n <= 0 then return 0 end
redis.call('INCRBY', KEYS[1], n)
redis.call('EXPIRE', KEYS[1], 691200)
return n
"#;

/// A source's warm-up plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Day 1, in days since the epoch (UTC).
    pub start_day: i64,
    /// Messages allowed on day 1, 2, …
    pub daily: Vec<u64>,
}

impl Plan {
    /// From a validated `warmup` (None if its date cannot be read: validation refused it).
    pub fn of(rule: &WarmupRule) -> Option<Plan> {
        Some(Plan {
            start_day: rule.start_day().ok()?,
            daily: rule.daily.clone(),
        })
    }

    /// Which day of the plan `day` is (1 = the first; 0 or less: not started).
    pub fn day_number(&self, day: i64) -> i64 {
        day - self.start_day + 1
    }

    /// The cap on UTC day `day`: 0 before the start, `daily[n-1]` on day n, None (no cap)
    /// after the last day.
    pub fn cap(&self, day: i64) -> Option<u64> {
        let n = self.day_number(day);
        if n < 1 {
            Some(0)
        } else {
            self.daily.get((n - 1) as usize).copied()
        }
    }
}

/// Whether a message may go out through a source today.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    Yes,
    /// At its cap for the day.
    No,
    /// Redis did not answer: not known.
    Unknown,
}

#[derive(Debug, Default)]
struct Allowance {
    day: i64,
    /// Claimed from the fleet's count and not spent yet.
    left: u64,
    /// The fleet's count is at the cap for `day`.
    exhausted: bool,
    /// Without Redis (tests): the day's count kept here.
    used_alone: u64,
}

/// Each warming source's claimed allowance.
pub struct Budget {
    local: HashMap<String, Mutex<Allowance>>,
    /// One claim at a time per source, so a burst of jobs makes one round trip.
    claiming: HashMap<String, tokio::sync::Mutex<()>>,
    script: Script,
}

impl Budget {
    pub fn new(sources: &[std::sync::Arc<Source>]) -> Budget {
        let warming = sources.iter().filter(|s| s.plan.is_some());
        Budget {
            local: warming
                .clone()
                .map(|s| (s.name.clone(), Mutex::new(Allowance::default())))
                .collect(),
            claiming: warming
                .map(|s| (s.name.clone(), tokio::sync::Mutex::new(())))
                .collect(),
            script: Script::new(CLAIM),
        }
    }

    /// One message of `src`'s allowance for UTC day `day`.
    pub async fn take(
        &self,
        src: &Source,
        plan: &Plan,
        day: i64,
        redis: Option<&(RedisConn, Keys)>,
    ) -> Take {
        let Some(cap) = plan.cap(day) else {
            return Take::Yes;
        };
        if cap == 0 {
            return Take::No;
        }
        let (Some(local), Some(claiming)) =
            (self.local.get(&src.name), self.claiming.get(&src.name))
        else {
            return Take::Yes;
        };
        if let Some(t) = spend(local, day) {
            return t;
        }
        let _one = claiming.lock().await;
        // Another task may have claimed meanwhile.
        if let Some(t) = spend(local, day) {
            return t;
        }
        let want = (cap / 50).clamp(1, 50);
        let got = match redis {
            Some((conn, keys)) => {
                let mut conn = conn.clone();
                let r: redis::RedisResult<u64> = self
                    .script
                    .key(keys.warmup(&src.name, day))
                    .arg(cap)
                    .arg(want)
                    .invoke_async(&mut conn)
                    .await;
                match r {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!(error = %e, source = %src.name, "claiming warm-up allowance failed");
                        return Take::Unknown;
                    }
                }
            }
            None => {
                let mut a = local.lock().unwrap_or_else(|e| e.into_inner());
                let n = want.min(cap.saturating_sub(a.used_alone));
                a.used_alone += n;
                n
            }
        };
        let mut a = local.lock().unwrap_or_else(|e| e.into_inner());
        if a.day != day {
            *a = Allowance {
                day,
                ..Default::default()
            };
        }
        if got == 0 {
            a.exhausted = true;
            return Take::No;
        }
        a.left += got - 1;
        Take::Yes
    }

    /// One message back to `src`'s local allowance for `day` (taken and not sent).
    pub fn unspend(&self, src: &Source, day: i64) {
        if let Some(local) = self.local.get(&src.name) {
            let mut a = local.lock().unwrap_or_else(|e| e.into_inner());
            if a.day == day {
                a.left += 1;
            }
        }
    }

    /// Gives what this daemon claimed for `day` and did not send back to the fleet's count
    /// (at shutdown).
    pub async fn give_back(&self, conn: &mut RedisConn, keys: &Keys, day: i64) {
        let mut pipe = redis::pipe();
        let mut any = false;
        for (name, local) in &self.local {
            let mut a = local.lock().unwrap_or_else(|e| e.into_inner());
            if a.day == day && a.left > 0 {
                pipe.cmd("DECRBY")
                    .arg(keys.warmup(name, day))
                    .arg(a.left)
                    .ignore();
                a.left = 0;
                any = true;
            }
        }
        if any {
            if let Err(e) = pipe.query_async::<()>(conn).await {
                tracing::warn!(error = %e, "returning unused warm-up allowance failed; the fleet may send a few less today");
            }
        }
    }
}

/// Spends one message of the local allowance: Some(Yes) spent, Some(No) the day is at its
/// cap, None a claim is needed.
fn spend(local: &Mutex<Allowance>, day: i64) -> Option<Take> {
    let mut a = local.lock().unwrap_or_else(|e| e.into_inner());
    if a.day != day {
        *a = Allowance {
            day,
            used_alone: 0,
            ..Default::default()
        };
    }
    if a.left > 0 {
        a.left -= 1;
        return Some(Take::Yes);
    }
    a.exhausted.then_some(Take::No)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_by_day_of_the_plan() {
        let p = Plan {
            start_day: 100,
            daily: vec![200, 500, 1000],
        };
        assert_eq!(p.cap(99), Some(0), "before the start: nothing");
        assert_eq!(p.cap(100), Some(200));
        assert_eq!(p.cap(102), Some(1000));
        assert_eq!(p.cap(103), None, "after the last day: no cap");
        assert_eq!(p.day_number(101), 2);
    }
}

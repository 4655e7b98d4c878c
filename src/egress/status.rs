//! What `paloma sources` and `GET /api/v1/sources` show of each source: its address and
//! name, its pools, its warm-up day and cap, what it sent today and what the fleet claimed
//! of its cap, and the sites it is suspended for.

use serde::Serialize;

use super::warmup::Plan;
use super::{day_of, DAY_MS};
use crate::config::{Settings, IMPLICIT_POOL};
use crate::store::keys::Keys;
use crate::store::RedisConn;

fn rfc3339_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The configured sources, as the status reads them (built once from the config).
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    sources: Vec<Entry>,
}

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    address: String,
    helo: String,
    pools: Vec<String>,
    plan: Option<(String, Plan)>,
}

/// One source's state.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SourceStatus {
    pub name: String,
    /// The bound local address.
    pub address: String,
    /// Its EHLO name.
    pub helo: String,
    /// The pools it belongs to.
    pub pools: Vec<String>,
    /// Messages sent through it this UTC day (by every daemon; counted each second).
    pub sent_today: u64,
    /// Its warm-up, if it has a plan.
    pub warmup: Option<WarmupStatus>,
    /// Sites it is suspended for after a throttling reply (or an operator's suspension).
    pub suspended: Vec<Suspension>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WarmupStatus {
    /// Day 1 (`YYYY-MM-DD`).
    pub start: String,
    /// Which day of the plan today is (0 or less: not started; past `days`: done).
    pub day: i64,
    /// Days in the plan.
    pub days: usize,
    /// Today's cap; null once the plan is over (no cap).
    pub cap: Option<u64>,
    /// Messages of today's cap the fleet has claimed (each daemon claims a few at a time).
    pub claimed_today: u64,
    /// When today's cap renews (RFC 3339, the next UTC midnight).
    pub resets_at: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Suspension {
    /// The destination site (its MX host names).
    pub site: String,
    /// Until when (RFC 3339).
    pub until: String,
}

impl Catalog {
    pub fn new(settings: &Settings) -> Catalog {
        let sources = settings
            .sources
            .iter()
            .map(|s| {
                let mut pools: Vec<String> = settings
                    .pools
                    .iter()
                    .filter(|p| p.sources.iter().any(|m| m.source == s.name))
                    .map(|p| p.name.clone())
                    .collect();
                if settings.pools.is_empty() {
                    pools.push(IMPLICIT_POOL.to_string());
                }
                Entry {
                    name: s.name.clone(),
                    address: s.address.clone(),
                    helo: s.helo.clone(),
                    pools,
                    plan: s
                        .warmup
                        .as_ref()
                        .and_then(|w| Some((w.start.clone(), Plan::of(w)?))),
                }
            })
            .collect();
        Catalog { sources }
    }

    /// Whether a source of this name is configured.
    pub fn has(&self, name: &str) -> bool {
        self.sources.iter().any(|s| s.name == name)
    }

    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// Every source's state at `now` (ms), in one round trip.
    pub async fn status(
        &self,
        conn: &mut RedisConn,
        keys: &Keys,
        now: i64,
    ) -> redis::RedisResult<Vec<SourceStatus>> {
        let day = day_of(now);
        let mut pipe = redis::pipe();
        for s in &self.sources {
            pipe.cmd("GET").arg(keys.source_sent(&s.name, day));
            pipe.cmd("GET").arg(keys.warmup(&s.name, day));
        }
        pipe.cmd("ZRANGEBYSCORE")
            .arg(&keys.suspended_sites)
            .arg(format!("({now}"))
            .arg("+inf")
            .arg("WITHSCORES");
        let mut values: Vec<redis::Value> = pipe.query_async(conn).await?;
        let suspended: Vec<(String, i64)> = match values.pop() {
            Some(v) => redis::from_redis_value(v)?,
            None => Vec::new(),
        };
        let count = |v: &redis::Value| -> u64 {
            redis::from_redis_value::<Option<u64>>(v.clone())
                .ok()
                .flatten()
                .unwrap_or(0)
        };
        Ok(self
            .sources
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let prefix = format!("{}/", s.name);
                SourceStatus {
                    name: s.name.clone(),
                    address: s.address.clone(),
                    helo: s.helo.clone(),
                    pools: s.pools.clone(),
                    sent_today: count(&values[2 * i]),
                    warmup: s.plan.as_ref().map(|(start, plan)| WarmupStatus {
                        start: start.clone(),
                        day: plan.day_number(day),
                        days: plan.daily.len(),
                        cap: plan.cap(day),
                        claimed_today: count(&values[2 * i + 1]),
                        resets_at: rfc3339_ms((day + 1) * DAY_MS),
                    }),
                    suspended: suspended
                        .iter()
                        .filter_map(|(m, until)| {
                            Some(Suspension {
                                site: m.strip_prefix(&prefix)?.to_string(),
                                until: rfc3339_ms(*until),
                            })
                        })
                        .collect(),
                }
            })
            .collect())
    }
}

/// The status as text, one block per source (`paloma sources`).
pub fn text(list: &[SourceStatus]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if list.is_empty() {
        out.push_str("no [[sources]] configured: mail leaves from the address the kernel picks, as [sender] helo\n");
    }
    for s in list {
        let _ = writeln!(
            out,
            "{}  {}  helo {}  pools {}",
            s.name,
            s.address,
            s.helo,
            s.pools.join(",")
        );
        let _ = write!(out, "  sent today {}", s.sent_today);
        match &s.warmup {
            Some(w) if w.day < 1 => {
                let _ = write!(
                    out,
                    "  warm-up starts {} (sends nothing until then)",
                    w.start
                );
            }
            Some(w) => match w.cap {
                Some(cap) => {
                    let _ = write!(
                        out,
                        "  warm-up day {} of {}: cap {cap}, claimed {}, renews {}",
                        w.day, w.days, w.claimed_today, w.resets_at
                    );
                }
                None => {
                    let _ = write!(
                        out,
                        "  warm-up done ({} days from {}): no cap",
                        w.days, w.start
                    );
                }
            },
            None => out.push_str("  no warm-up"),
        }
        out.push('\n');
        for x in &s.suspended {
            let _ = writeln!(out, "  suspended for {} until {}", x.site, x.until);
        }
    }
    out
}

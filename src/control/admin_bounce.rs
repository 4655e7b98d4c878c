//! `paloma bounce` and `POST /api/v1/bounces`: an operator ends every waiting job of a
//! destination (the recipient's domain, exactly: not its subdomains) or of a campaign as
//! `bounced`, class `admin` (KumoMTA's admin bounce).
//!
//! - **Waiting jobs**: the delayed set, and the parked and held sets (of the campaign; of
//!   every campaign for a domain), are read a page at a time; each matching member is ended
//!   by one script (`scripts/admin_bounce.lua`) that removes it and, only if it was still
//!   there, writes its `bounced` event, marks its job id done and counts it. A daemon moving
//!   the same member to the sends stream at the same time (`move_due.lua`) removes it first
//!   or finds it gone: the job is sent or bounced, never both, and bounced once.
//! - **A directive** (`--for 10m`): `{prefix}admin_bounces` field `domain:{d}` or
//!   `campaign:{c}` → until (ms, the Redis server's clock). Each daemon keeps a copy
//!   ([`Directives`], refreshed every [`REFRESH`]) and its workers end a matching job the same
//!   way before routing it, with no Redis round trip per message.
//!
//! An admin bounce says nothing of the address: it is never suppressed for it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use super::queue::{kept_sets, scan_set, Waiting};
use crate::outcome::Outcome;
use crate::queue::events::{rfc3339_ms, Event, EventKind};
use crate::queue::idem::Idem;
use crate::queue::{now_ms, Keys};
use crate::store::replication::{AckError, Acks};
use crate::store::RedisConn;

/// How often each daemon re-reads the directives.
pub const REFRESH: Duration = Duration::from_secs(1);

/// Members ended per script call.
const BATCH: usize = 100;

/// Per-domain fields a campaign's hash holds at most (as the recorder's).
const MAX_DOMAIN_FIELDS: usize = 600;

/// What an operator bounces: a destination (a recipient domain) or a campaign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Domain(String),
    Campaign(String),
}

impl Target {
    /// A recipient domain, lower-cased, without a trailing dot.
    pub fn domain(d: &str) -> Result<Target, String> {
        let d = d.trim().trim_end_matches('.').to_ascii_lowercase();
        let bad = |c: char| c.is_whitespace() || c.is_control() || matches!(c, '@' | ':' | '/');
        if d.is_empty() || d.len() > 253 || d.contains(bad) || d.starts_with('.') {
            return Err(format!(
                "domain {d:?} is not a domain name (the part after @ of the recipients)"
            ));
        }
        Ok(Target::Domain(d))
    }

    /// A campaign id paloma accepts.
    pub fn campaign(c: &str) -> Result<Target, String> {
        crate::job::CampaignId::parse(c.to_string())
            .map(|c| Target::Campaign(c.as_str().to_string()))
            .map_err(|e| format!("campaign {c:?}: {e}"))
    }

    /// `domain` or `campaign`.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Domain(_) => "domain",
            Target::Campaign(_) => "campaign",
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Target::Domain(n) | Target::Campaign(n) => n,
        }
    }

    /// Its field in `admin_bounces`.
    pub fn field(&self) -> String {
        format!("{}:{}", self.kind(), self.name())
    }

    /// What the bounce's reply text names: `paloma bounce --domain d`.
    pub fn command(&self) -> String {
        format!("paloma bounce --{} {}", self.kind(), self.name())
    }

    /// Whether a waiting job is one of it.
    pub fn matches(&self, w: &Waiting) -> bool {
        match self {
            Target::Domain(d) => w.domain == *d,
            Target::Campaign(c) => w.campaign == *c,
        }
    }
}

/// A directive in force.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct Directive {
    /// `domain` or `campaign`.
    pub kind: String,
    pub target: String,
    /// Until when new jobs of it are bounced (RFC 3339).
    pub until: String,
}

/// What a bounce did (or, as a dry run, would do).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct Bounced {
    /// `domain` or `campaign`.
    pub kind: String,
    pub target: String,
    /// False for a dry run: the jobs were only counted.
    pub applied: bool,
    /// Jobs ended (or that would be) from the delayed set.
    pub delayed: u64,
    /// From paused campaigns' parked jobs.
    pub parked: u64,
    /// From experiments' held jobs.
    pub held: u64,
    pub total: u64,
    /// Until when new jobs of it are bounced too (`for`), if a directive was set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
}

/// The sets where jobs of `target` may wait, with where they count: the delayed set, then
/// the campaign's parked and held sets (a domain: every campaign's).
async fn sets(
    conn: &mut RedisConn,
    keys: &Keys,
    target: &Target,
    also: &[String],
) -> redis::RedisResult<Vec<(String, &'static str)>> {
    let mut out = vec![(keys.scheduled.clone(), "delayed")];
    let campaigns = match target {
        Target::Campaign(c) => std::iter::once(c.clone()).collect(),
        Target::Domain(_) => {
            let mut all: std::collections::BTreeSet<String> = also.iter().cloned().collect();
            let named: Vec<String> = redis::cmd("SMEMBERS")
                .arg(&keys.campaigns)
                .query_async(conn)
                .await?;
            all.extend(named);
            let states: Vec<String> = redis::cmd("HKEYS")
                .arg(&keys.campaign_states)
                .query_async(conn)
                .await?;
            all.extend(states);
            all
        }
    };
    for (_, set, reason) in kept_sets(conn, keys, &campaigns).await? {
        out.push((set, if reason == "held" { "held" } else { "parked" }));
    }
    Ok(out)
}

fn add(b: &mut Bounced, place: &str, n: u64) {
    match place {
        "delayed" => b.delayed += n,
        "parked" => b.parked += n,
        _ => b.held += n,
    }
    b.total += n;
}

/// Counts the waiting jobs of `target` (a dry run); `also`: campaigns that may hold jobs
/// without an outcome yet (the configured experiments).
pub async fn count(
    conn: &mut RedisConn,
    keys: &Keys,
    target: &Target,
    also: &[String],
) -> redis::RedisResult<Bounced> {
    let mut b = Bounced {
        kind: target.kind().into(),
        target: target.name().into(),
        ..Default::default()
    };
    for (set, place) in sets(conn, keys, target, also).await? {
        let mut n = 0;
        scan_set(conn, &set, |page| {
            n += page
                .iter()
                .filter(|m| Waiting::parse(m).is_some_and(|w| target.matches(&w)))
                .count() as u64;
        })
        .await?;
        add(&mut b, place, n);
    }
    Ok(b)
}

/// Ends every waiting job of `target` as bounced (class `admin`) and, with `lasting`, sets
/// a directive so new ones are too until then. `idem_ttl`: how long an ended job's id is
/// kept (`intake.idempotency_ttl`). Acknowledged as `acks` says.
#[allow(clippy::too_many_arguments)]
pub async fn bounce(
    conn: &mut RedisConn,
    keys: &Keys,
    acks: &Acks,
    path: &'static str,
    target: &Target,
    also: &[String],
    lasting: Option<Duration>,
    idem_ttl: Duration,
) -> Result<Bounced, AckError> {
    let mut b = Bounced {
        kind: target.kind().into(),
        target: target.name().into(),
        applied: true,
        ..Default::default()
    };
    // The directive first: a job that leaves a set while the sweep runs is caught by the
    // workers once they have it.
    if let Some(d) = lasting {
        let until = now_ms() + d.as_millis() as i64;
        redis::cmd("HSET")
            .arg(&keys.admin_bounces)
            .arg(target.field())
            .arg(until)
            .query_async::<()>(conn)
            .await?;
        b.until = Some(rfc3339_ms(until));
    }
    let script = redis::Script::new(include_str!("scripts/admin_bounce.lua"));
    let reply = Outcome::admin_bounce(&target.command());
    let mut done = String::new();
    Idem::Done.encode(&mut done);
    for (set, place) in sets(conn, keys, target, also).await? {
        // A page at a time, its matches ended before the next page is read (ZSCAN still
        // returns every member that stays in the set throughout).
        let mut cursor = 0u64;
        loop {
            let (next, items): (u64, Vec<Vec<u8>>) = redis::cmd("ZSCAN")
                .arg(&set)
                .arg(cursor)
                .arg("COUNT")
                .arg(super::queue::PAGE)
                .query_async(conn)
                .await?;
            let found: Vec<(Vec<u8>, Waiting)> = items
                .into_iter()
                .step_by(2)
                .filter_map(|m| {
                    let w = Waiting::parse(&m).filter(|w| target.matches(w))?;
                    Some((m, w))
                })
                .collect();
            for chunk in found.chunks(BATCH) {
                let n = end(conn, keys, &script, &set, chunk, &reply, &done, idem_ttl).await?;
                add(&mut b, place, n);
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    forget_expired(conn, keys).await?;
    acks.barrier(conn, path).await?;
    Ok(b)
}

/// Ends one batch of members of `set` (see the script); returns how many it ended.
#[allow(clippy::too_many_arguments)]
async fn end(
    conn: &mut RedisConn,
    keys: &Keys,
    script: &redis::Script,
    set: &str,
    members: &[(Vec<u8>, Waiting)],
    reply: &Outcome,
    done: &str,
    idem_ttl: Duration,
) -> redis::RedisResult<u64> {
    let Outcome::Bounced(bounce) = reply else {
        return Ok(0);
    };
    let mut inv = script.key(set);
    inv.key(&keys.events)
        .key(&keys.campaigns)
        .key(&keys.campaigns_active)
        .arg(keys.events_max_len)
        .arg(idem_ttl.as_secs().max(1))
        .arg(now_ms())
        .arg(MAX_DOMAIN_FIELDS)
        .arg(done);
    for (m, w) in members {
        let id = w.id.as_deref().unwrap_or("");
        let campaign = stat_campaign(&w.campaign);
        let mut ev = Event::new(EventKind::Bounced, id, &w.campaign, &w.to);
        ev.code = Some(bounce.code);
        ev.enhanced = Some(&bounce.enhanced);
        ev.class = Some(bounce.class.as_str());
        ev.response = Some(&bounce.response);
        inv.key(keys.idem(id))
            .key(keys.stats(&campaign))
            .key(keys.domains(&campaign))
            .arg(m.as_slice())
            .arg(ev.to_json())
            .arg(&campaign)
            .arg(&w.domain)
            .arg(if w.attempt == 0 { "1" } else { "0" })
            .arg(if id.is_empty() { "0" } else { "1" });
    }
    inv.invoke_async(conn).await
}

/// The campaign a job is counted under (as the recorder counts a dead one's): its own when
/// valid, else `(none)` / `(invalid)`.
fn stat_campaign(c: &str) -> String {
    if c.is_empty() {
        "(none)".into()
    } else if crate::job::CampaignId::parse(c.to_string()).is_err() {
        "(invalid)".into()
    } else {
        c.to_string()
    }
}

/// Lifts the directive of `target`; whether there was one.
pub async fn lift(
    conn: &mut RedisConn,
    keys: &Keys,
    acks: &Acks,
    path: &'static str,
    target: &Target,
) -> Result<bool, AckError> {
    let n: u64 = redis::cmd("HDEL")
        .arg(&keys.admin_bounces)
        .arg(target.field())
        .query_async(conn)
        .await?;
    acks.barrier(conn, path).await?;
    Ok(n > 0)
}

/// Deletes the directives that have run out.
async fn forget_expired(conn: &mut RedisConn, keys: &Keys) -> redis::RedisResult<()> {
    let all: HashMap<String, i64> = redis::cmd("HGETALL")
        .arg(&keys.admin_bounces)
        .query_async(conn)
        .await?;
    let now = now_ms();
    let gone: Vec<&String> = all
        .iter()
        .filter(|(_, &u)| u <= now)
        .map(|(f, _)| f)
        .collect();
    if !gone.is_empty() {
        redis::cmd("HDEL")
            .arg(&keys.admin_bounces)
            .arg(&gone)
            .query_async::<()>(conn)
            .await?;
    }
    Ok(())
}

/// The directives in force at `now`, by kind and target.
pub async fn list(
    conn: &mut RedisConn,
    keys: &Keys,
    now: i64,
) -> redis::RedisResult<Vec<Directive>> {
    let all: HashMap<String, i64> = redis::cmd("HGETALL")
        .arg(&keys.admin_bounces)
        .query_async(conn)
        .await?;
    let mut out: Vec<Directive> = all
        .into_iter()
        .filter(|(_, u)| *u > now)
        .filter_map(|(f, u)| {
            let (kind, target) = f.split_once(':')?;
            Some(Directive {
                kind: kind.into(),
                target: target.into(),
                until: rfc3339_ms(u),
            })
        })
        .collect();
    out.sort_by(|a, b| (&a.kind, &a.target).cmp(&(&b.kind, &b.target)));
    Ok(out)
}

/// This daemon's copy of the directives: field → until (ms).
#[derive(Default)]
pub struct Directives {
    map: RwLock<HashMap<String, i64>>,
}

impl Directives {
    /// The bounce of a new job of `campaign` to `domain` at `now`, if a directive says so.
    pub fn bounce(&self, campaign: &str, domain: &str, now: i64) -> Option<Outcome> {
        let map = self.map.read().expect("directives lock");
        if map.is_empty() {
            return None;
        }
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        [Target::Campaign(campaign.into()), Target::Domain(domain)]
            .into_iter()
            .find(|t| map.get(&t.field()).is_some_and(|&until| until > now))
            .map(|t| Outcome::admin_bounce(&t.command()))
    }

    /// Re-reads the directives (one small hash); returns how many are in force.
    pub async fn refresh(&self, conn: &mut RedisConn, keys: &Keys) -> redis::RedisResult<usize> {
        let mut all: HashMap<String, i64> = redis::cmd("HGETALL")
            .arg(&keys.admin_bounces)
            .query_async(conn)
            .await?;
        let now = now_ms();
        all.retain(|_, until| *until > now);
        let n = all.len();
        *self.map.write().expect("directives lock") = all;
        Ok(n)
    }

    /// Refreshes every [`REFRESH`] until `stop` turns true.
    pub async fn watch(
        self: Arc<Self>,
        mut conn: RedisConn,
        keys: Keys,
        metrics: Arc<crate::metrics::Metrics>,
        stop: watch::Receiver<bool>,
    ) {
        let mut ticker = crate::ticker::Ticker::new(REFRESH, stop);
        while ticker.tick().await {
            match self.refresh(&mut conn, &keys).await {
                Ok(n) => metrics.bounce_directives.set(n as i64),
                Err(e) => {
                    metrics.redis_errors.inc();
                    tracing::debug!(error = %e, "reading bounce directives failed; keeping the last ones");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_checked_and_matched_exactly() {
        assert_eq!(
            Target::domain(" Example.COM. ").unwrap(),
            Target::Domain("example.com".into())
        );
        assert!(Target::domain("a@b.test").is_err());
        assert!(Target::domain("").is_err());
        assert!(Target::campaign("bad campaign!").is_err());
        let t = Target::domain("b.test").unwrap();
        assert_eq!(t.field(), "domain:b.test");
        assert_eq!(t.command(), "paloma bounce --domain b.test");
        let w = |to: &str| {
            Waiting::parse(format!(r#"0|1|{{"campaign":"c","to":"{to}"}}"#).as_bytes()).unwrap()
        };
        assert!(t.matches(&w("x@B.test")));
        assert!(!t.matches(&w("x@mx.b.test")), "not a subdomain");
        assert!(Target::campaign("c").unwrap().matches(&w("x@y.test")));
    }

    #[test]
    fn directives_bounce_until_they_run_out() {
        let d = Directives::default();
        assert_eq!(d.bounce("c", "b.test", 0), None);
        d.map.write().unwrap().extend([
            ("domain:b.test".to_string(), 100),
            ("campaign:c".to_string(), 50),
        ]);
        let Some(Outcome::Bounced(b)) = d.bounce("x", "B.test", 99) else {
            panic!()
        };
        assert_eq!(b.class.as_str(), "admin");
        assert!(b.response.contains("--domain b.test"), "{}", b.response);
        assert!(d.bounce("c", "other.test", 10).is_some());
        assert_eq!(d.bounce("c", "other.test", 50), None, "ran out");
        assert_eq!(d.bounce("x", "b.test", 100), None);
    }
}

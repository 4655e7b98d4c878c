//! `paloma queue` and `GET /api/v1/queue`: what waits, by campaign and by destination, and
//! why.
//!
//! Jobs wait in three places (see [`crate::pipeline`]): the delayed set, whose members say
//! why they wait ([`Why`], the `#x` of their attempt field); a paused campaign's parked set
//! (`paused`); an experiment's held set (`held`). The sends stream's entries are `ready`
//! (read by no daemon yet, or in progress). Members written before reasons were show as
//! `scheduled` when the job has a `send_at`, `retry` when it was attempted, else `waiting`.
//!
//! Every set is read a page at a time (`ZSCAN`) and only counted: memory stays flat however
//! many jobs wait. The destination is the recipient's domain (the site its MX hosts make is
//! not known without DNS); past [`MAX_DESTINATIONS`] distinct domains, the rest are counted
//! together as `(other)`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::queue::scheduler::{attempt_field, Why};
use crate::queue::{now_ms, Keys};
use crate::store::RedisConn;

/// Destinations shown when no limit is given.
pub const DEFAULT_TOP: usize = 20;
/// Distinct destinations counted one by one; the rest count as `(other)`.
pub const MAX_DESTINATIONS: usize = 10_000;
/// Members read per `ZSCAN` (and campaigns per pipeline).
pub const PAGE: usize = 1000;

/// Why a job waits, as shown: the delayed set's reasons, `waiting` (an older member without
/// one), `paused`, `held`.
pub const REASONS: [&str; 8] = [
    "scheduled",
    "retry",
    "shaping",
    "suspended",
    "warmup",
    "waiting",
    "paused",
    "held",
];

/// What `paloma queue --json` and `GET /api/v1/queue` answer.
#[derive(Debug, Clone, Default, serde::Serialize, utoipa::ToSchema)]
pub struct QueueView {
    /// Entries of the sends stream not yet finished: read by no daemon yet, or in progress.
    pub ready: i64,
    /// Of those, read by a daemon and being worked on.
    pub in_progress: i64,
    /// Jobs waiting: in the delayed set, parked or held.
    pub waiting: u64,
    /// Waiting jobs per reason (scheduled, retry, shaping, suspended, warmup, waiting,
    /// paused, held); reasons with none are left out.
    pub reasons: BTreeMap<String, u64>,
    /// Per campaign, most waiting first.
    pub campaigns: Vec<Group>,
    /// Per destination (the recipient's domain), most waiting first, the top `limit`.
    pub destinations: Vec<Group>,
    /// Destinations left out past `limit`, and the jobs waiting for them.
    pub destinations_omitted: u64,
    pub destinations_omitted_jobs: u64,
    /// When the first job of the delayed set is due (RFC 3339), if any waits there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub earliest_due: Option<String>,
    /// Operator's bounce directives in force (`paloma bounce --for`).
    pub directives: Vec<super::admin_bounce::Directive>,
}

/// The waiting jobs of one campaign or destination.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct Group {
    pub name: String,
    pub waiting: u64,
    /// Per reason; reasons with none are left out.
    pub reasons: BTreeMap<String, u64>,
}

/// What a waiting member says of its job.
#[derive(Debug, Clone, PartialEq)]
pub struct Waiting {
    pub id: Option<String>,
    pub campaign: String,
    pub to: String,
    /// The recipient's domain, lower-cased (empty when the address has none).
    pub domain: String,
    pub attempt: u32,
    /// Why it waits; None for a member written before reasons were.
    pub why: Option<Why>,
    pub send_at: bool,
}

impl Waiting {
    /// Reads a member `{attempt}|{first_at}|{job}`; None when it is not one.
    pub fn parse(member: &[u8]) -> Option<Waiting> {
        #[derive(serde::Deserialize)]
        struct Head {
            id: Option<serde_json::Value>,
            campaign: Option<serde_json::Value>,
            to: Option<serde_json::Value>,
            send_at: Option<serde_json::Value>,
        }
        let mut parts = member.splitn(3, |&b| b == b'|');
        let field = std::str::from_utf8(parts.next()?).ok()?;
        parts.next()?;
        let head: Head = serde_json::from_slice(parts.next()?).ok()?;
        let text = |v: Option<serde_json::Value>| match v {
            Some(serde_json::Value::String(s)) => Some(s),
            _ => None,
        };
        let (attempt, _, why) = attempt_field(field);
        let to = text(head.to).unwrap_or_default().trim().to_string();
        let domain = to
            .rsplit_once('@')
            .map(|(_, d)| d.trim_end_matches('>').to_ascii_lowercase())
            .unwrap_or_default();
        Some(Waiting {
            id: text(head.id),
            campaign: text(head.campaign).unwrap_or_default(),
            to,
            domain,
            attempt,
            why,
            send_at: head.send_at.is_some_and(|v| !v.is_null()),
        })
    }

    /// Why it waits in the delayed set, as shown.
    pub fn reason(&self) -> &'static str {
        match self.why {
            Some(w) => w.as_str(),
            None if self.attempt > 0 => Why::Retry.as_str(),
            None if self.send_at => Why::Scheduled.as_str(),
            None => "waiting",
        }
    }
}

#[derive(Default)]
struct Counts {
    total: u64,
    reasons: BTreeMap<&'static str, u64>,
}

impl Counts {
    fn add(&mut self, reason: &'static str, n: u64) {
        self.total += n;
        *self.reasons.entry(reason).or_default() += n;
    }

    fn group(name: String, c: Counts) -> Group {
        Group {
            name,
            waiting: c.total,
            reasons: c
                .reasons
                .into_iter()
                .map(|(r, n)| (r.to_string(), n))
                .collect(),
        }
    }
}

/// The counts, as members are read.
#[derive(Default)]
pub struct Tally {
    all: Counts,
    campaigns: HashMap<String, Counts>,
    domains: HashMap<String, Counts>,
    other: Counts,
}

impl Tally {
    /// Counts one waiting job.
    pub fn add(&mut self, campaign: &str, domain: &str, reason: &'static str) {
        self.all.add(reason, 1);
        let name = if campaign.is_empty() {
            "(none)"
        } else {
            campaign
        };
        match self.campaigns.get_mut(name) {
            Some(c) => c.add(reason, 1),
            None => {
                let mut c = Counts::default();
                c.add(reason, 1);
                self.campaigns.insert(name.to_string(), c);
            }
        }
        let domain = if domain.is_empty() { "(none)" } else { domain };
        if let Some(c) = self.domains.get_mut(domain) {
            c.add(reason, 1);
        } else if self.domains.len() < MAX_DESTINATIONS {
            let mut c = Counts::default();
            c.add(reason, 1);
            self.domains.insert(domain.to_string(), c);
        } else {
            self.other.add(reason, 1);
        }
    }

    /// Counts a member of a set whose reason is the set's (`paused`, `held`), or the
    /// member's own (`None`: the delayed set).
    pub fn add_member(&mut self, member: &[u8], set_reason: Option<&'static str>) {
        match Waiting::parse(member) {
            Some(w) => self.add(&w.campaign, &w.domain, set_reason.unwrap_or(w.reason())),
            None => self.add("", "", set_reason.unwrap_or("waiting")),
        }
    }

    /// The campaigns seen so far.
    pub fn campaign_names(&self) -> impl Iterator<Item = &str> {
        self.campaigns.keys().map(String::as_str)
    }

    /// The view: campaigns and the top `top` destinations, most waiting first (then by name).
    pub fn view(self, top: usize) -> QueueView {
        fn sorted(m: HashMap<String, Counts>) -> Vec<Group> {
            let mut v: Vec<Group> = m.into_iter().map(|(n, c)| Counts::group(n, c)).collect();
            v.sort_by(|a, b| b.waiting.cmp(&a.waiting).then_with(|| a.name.cmp(&b.name)));
            v
        }
        let mut destinations = sorted(self.domains);
        if self.other.total > 0 {
            destinations.push(Counts::group("(other)".into(), self.other));
        }
        let rest = destinations.split_off(top.min(destinations.len()));
        QueueView {
            waiting: self.all.total,
            reasons: self
                .all
                .reasons
                .into_iter()
                .map(|(r, n)| (r.to_string(), n))
                .collect(),
            campaigns: sorted(self.campaigns),
            destinations,
            destinations_omitted: rest.len() as u64,
            destinations_omitted_jobs: rest.iter().map(|g| g.waiting).sum(),
            ..Default::default()
        }
    }
}

/// Calls `each` with every page of members of the sorted set `key` (`ZSCAN`; a member
/// moved during the scan may be seen twice or not at all, as `ZSCAN` promises).
pub async fn scan_set(
    conn: &mut RedisConn,
    key: &str,
    mut each: impl FnMut(&[Vec<u8>]),
) -> redis::RedisResult<()> {
    let mut cursor = 0u64;
    loop {
        let (next, items): (u64, Vec<Vec<u8>>) = redis::cmd("ZSCAN")
            .arg(key)
            .arg(cursor)
            .arg("COUNT")
            .arg(PAGE)
            .query_async(conn)
            .await?;
        // Member, score pairs: only the members.
        let members: Vec<Vec<u8>> = items.into_iter().step_by(2).collect();
        each(&members);
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// Every campaign that may have parked or held jobs: those with an outcome (`campaigns`),
/// with a state (`campaign_states`), seen in the delayed set, and `also` (the configured
/// experiments).
async fn campaigns(
    conn: &mut RedisConn,
    keys: &Keys,
    seen: impl Iterator<Item = &str>,
    also: &[String],
) -> redis::RedisResult<BTreeSet<String>> {
    let mut all: BTreeSet<String> = seen.map(str::to_string).collect();
    all.extend(also.iter().cloned());
    let mut cursor = 0u64;
    loop {
        let (next, names): (u64, Vec<String>) = redis::cmd("SSCAN")
            .arg(&keys.campaigns)
            .arg(cursor)
            .arg("COUNT")
            .arg(PAGE)
            .query_async(conn)
            .await?;
        all.extend(names);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let states: Vec<String> = redis::cmd("HKEYS")
        .arg(&keys.campaign_states)
        .query_async(conn)
        .await?;
    all.extend(states);
    Ok(all)
}

/// The parked and held sets that hold jobs, with their reason, of `campaigns`.
pub async fn kept_sets(
    conn: &mut RedisConn,
    keys: &Keys,
    campaigns: &BTreeSet<String>,
) -> redis::RedisResult<Vec<(String, String, &'static str)>> {
    let names: Vec<&String> = campaigns.iter().collect();
    let mut out = Vec::new();
    for chunk in names.chunks(PAGE / 2) {
        let mut p = redis::pipe();
        for c in chunk {
            p.cmd("ZCARD").arg(keys.parked(c));
            p.cmd("ZCARD").arg(keys.held(c));
        }
        let n: Vec<u64> = p.query_async(conn).await?;
        for (c, pair) in chunk.iter().zip(n.chunks(2)) {
            if pair.first().copied().unwrap_or(0) > 0 {
                out.push((c.to_string(), keys.parked(c), "paused"));
            }
            if pair.get(1).copied().unwrap_or(0) > 0 {
                out.push((c.to_string(), keys.held(c), "held"));
            }
        }
    }
    Ok(out)
}

/// Reads what waits (see the module's text); `top`: destinations shown; `also`: campaigns
/// that may hold jobs without any outcome yet (the configured experiments).
pub async fn view(
    conn: &mut RedisConn,
    keys: &Keys,
    group: &str,
    also: &[String],
    top: usize,
) -> redis::RedisResult<QueueView> {
    let mut tally = Tally::default();
    scan_set(conn, &keys.scheduled, |page| {
        for m in page {
            tally.add_member(m, None);
        }
    })
    .await?;
    let campaigns = campaigns(conn, keys, tally.campaign_names(), also).await?;
    for (_, set, reason) in kept_sets(conn, keys, &campaigns).await? {
        scan_set(conn, &set, |page| {
            for m in page {
                tally.add_member(m, Some(reason));
            }
        })
        .await?;
    }
    let mut v = tally.view(top);
    let (ready, first): (i64, Vec<(String, f64)>) = redis::pipe()
        .cmd("XLEN")
        .arg(&keys.sends)
        .cmd("ZRANGE")
        .arg(&keys.scheduled)
        .arg(0)
        .arg(0)
        .arg("WITHSCORES")
        .query_async(conn)
        .await?;
    v.ready = ready;
    v.earliest_due = first
        .first()
        .map(|(_, due)| crate::queue::events::rfc3339_ms(*due as i64));
    // No group yet (no daemon ever ran): nothing in progress.
    v.in_progress = match redis::cmd("XPENDING")
        .arg(&keys.sends)
        .arg(group)
        .query_async::<redis::Value>(conn)
        .await
    {
        Ok(redis::Value::Array(a)) => a
            .first()
            .and_then(|v| redis::from_redis_value::<i64>(v.clone()).ok())
            .unwrap_or(0),
        _ => 0,
    };
    v.directives = super::admin_bounce::list(conn, keys, now_ms()).await?;
    Ok(v)
}

/// The text `paloma queue` prints.
pub fn render(v: &QueueView, top: usize) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ready: {} in the sends stream ({} in progress)",
        v.ready, v.in_progress
    );
    let _ = write!(out, "waiting: {}", v.waiting);
    if let Some(due) = &v.earliest_due {
        let _ = write!(out, " (first due {due})");
    }
    out.push('\n');
    let line = |reasons: &BTreeMap<String, u64>| {
        REASONS
            .iter()
            .filter_map(|r| reasons.get(*r).map(|n| format!("{r} {n}")))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if v.waiting > 0 {
        let _ = writeln!(out, "  why: {}", line(&v.reasons));
    }
    let table = |out: &mut String, title: &str, rows: &[Group]| {
        if rows.is_empty() {
            return;
        }
        let _ = writeln!(out, "\n{title:<32} {:>9}  why", "waiting");
        for g in rows {
            let _ = writeln!(out, "{:<32} {:>9}  {}", g.name, g.waiting, line(&g.reasons));
        }
    };
    table(&mut out, "campaign", &v.campaigns);
    table(&mut out, "destination (recipient domain)", &v.destinations);
    if v.destinations_omitted > 0 {
        let _ = writeln!(
            out,
            "… and {} more destinations with {} jobs (--limit to show more than {top})",
            v.destinations_omitted, v.destinations_omitted_jobs
        );
    }
    if !v.directives.is_empty() {
        let _ = writeln!(out, "\nbounce directives (paloma bounce --for):");
        for d in &v.directives {
            let _ = writeln!(out, "  {} {} until {}", d.kind, d.target, d.until);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(field: &str, json: &str) -> Vec<u8> {
        format!("{field}|1|{json}").into_bytes()
    }

    #[test]
    fn a_member_says_its_campaign_domain_and_why() {
        let w = Waiting::parse(&member(
            "0#s",
            r#"{"id":"a","campaign":"spring","to":"Ann@Example.COM","send_at":"2030-01-01T00:00:00Z"}"#,
        ))
        .unwrap();
        assert_eq!(
            (
                w.id.as_deref(),
                w.campaign.as_str(),
                w.domain.as_str(),
                w.reason()
            ),
            (Some("a"), "spring", "example.com", "scheduled")
        );
        // Older members: by what the job says.
        let r = |field, json| Waiting::parse(&member(field, json)).unwrap().reason();
        assert_eq!(r("2@ip-a", r#"{"campaign":"c"}"#), "retry");
        assert_eq!(r("0", r#"{"send_at":"2030-01-01T00:00:00Z"}"#), "scheduled");
        assert_eq!(r("0", r#"{"campaign":"c"}"#), "waiting");
        assert_eq!(r("0@ip-b#w", r#"{}"#), "warmup");
        assert_eq!(Waiting::parse(b"garbage"), None);
        assert_eq!(Waiting::parse(b"1|2|not json"), None);
    }

    #[test]
    fn the_tally_counts_by_reason_campaign_and_destination() {
        let mut t = Tally::default();
        for i in 0..5 {
            t.add_member(
                &member(
                    "0#s",
                    &format!(r#"{{"campaign":"spring","to":"u{i}@a.test"}}"#),
                ),
                None,
            );
        }
        t.add_member(
            &member("1#r", r#"{"campaign":"spring","to":"x@b.test"}"#),
            None,
        );
        t.add_member(
            &member("0", r#"{"campaign":"autumn","to":"y@B.test"}"#),
            Some("paused"),
        );
        t.add_member(b"junk", None);
        let v = t.view(2);
        assert_eq!(v.waiting, 8);
        assert_eq!(v.reasons["scheduled"], 5);
        assert_eq!(v.reasons["retry"], 1);
        assert_eq!(v.reasons["paused"], 1);
        assert_eq!(v.reasons["waiting"], 1);
        assert_eq!(v.campaigns[0].name, "spring");
        assert_eq!(v.campaigns[0].waiting, 6);
        assert_eq!(v.campaigns[0].reasons["retry"], 1);
        assert_eq!(
            v.destinations
                .iter()
                .map(|g| (g.name.as_str(), g.waiting))
                .collect::<Vec<_>>(),
            [("a.test", 5), ("b.test", 2)]
        );
        assert_eq!(
            (v.destinations_omitted, v.destinations_omitted_jobs),
            (1, 1)
        );
        let text = render(&v, 2);
        assert!(
            text.contains("scheduled 5, retry 1, waiting 1, paused 1"),
            "{text}"
        );
        assert!(text.contains("1 more destinations with 1 jobs"), "{text}");
    }

    #[test]
    fn destinations_past_the_bound_count_as_other() {
        let mut t = Tally::default();
        for i in 0..MAX_DESTINATIONS + 3 {
            t.add("c", &format!("d{i}.test"), "retry");
        }
        let v = t.view(usize::MAX);
        assert_eq!(v.destinations.len(), MAX_DESTINATIONS + 1);
        let other = v.destinations.iter().find(|g| g.name == "(other)").unwrap();
        assert_eq!(other.waiting, 3);
    }
}

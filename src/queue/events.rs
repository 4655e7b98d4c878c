//! Events on `{prefix}events`: one JSON object per entry, field `event`; their kinds
//! ([`EventKind`]) are the one vocabulary of the recorder's stats, the workflow triggers and
//! the metrics.

use serde::Serialize;

/// The `type` of an event. The first six end a job (exactly one per job); the tracking
/// server writes the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    #[default]
    Delivered,
    Bounced,
    Failed,
    Suppressed,
    Dead,
    /// Not terminal: the job was put back for another attempt.
    Deferred,
    Opened,
    Clicked,
    Unsubscribed,
    /// A DSN after the message was accepted (late bounce or delay); not terminal.
    Returned,
    /// A feedback-loop (ARF) report; not terminal.
    Complained,
    /// A conversion (an order, a sign-up) attributed to the job (`POST /api/v1/conversions`);
    /// not terminal.
    Converted,
}

impl EventKind {
    pub const ALL: [EventKind; 12] = [
        EventKind::Delivered,
        EventKind::Bounced,
        EventKind::Failed,
        EventKind::Suppressed,
        EventKind::Dead,
        EventKind::Deferred,
        EventKind::Opened,
        EventKind::Clicked,
        EventKind::Unsubscribed,
        EventKind::Returned,
        EventKind::Complained,
        EventKind::Converted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Delivered => "delivered",
            EventKind::Bounced => "bounced",
            EventKind::Failed => "failed",
            EventKind::Suppressed => "suppressed",
            EventKind::Dead => "dead",
            EventKind::Deferred => "deferred",
            EventKind::Opened => "opened",
            EventKind::Clicked => "clicked",
            EventKind::Unsubscribed => "unsubscribed",
            EventKind::Returned => "returned",
            EventKind::Complained => "complained",
            EventKind::Converted => "converted",
        }
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event as written to the stream. Optional fields appear only on the types that carry
/// them (the event contract is in README "Events").
#[derive(Debug, Clone, Serialize, Default)]
pub struct Event<'a> {
    #[serde(rename = "type")]
    pub kind: EventKind,
    pub id: &'a str,
    pub campaign: &'a str,
    pub to: &'a str,
    /// The experiment variant the job went out as, if it is in one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<&'a str>,
    pub at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enhanced: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine: Option<bool>,
    /// `returned`: the DSN's status (enhanced code), diagnostic, reporting MTA, action.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diagnostic: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reporting_mta: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub permanent: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<&'a str>,
    /// `complained`: the ARF Feedback-Type and who reported it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feedback_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<&'a str>,
    /// `converted`: the conversion's id (the shop's order), its kind, value and currency.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order: Option<&'a str>,
    #[serde(rename = "kind", skip_serializing_if = "Option::is_none")]
    pub conversion_kind: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub currency: Option<&'a str>,
}

/// RFC 3339 UTC with milliseconds: `2026-11-22T18:50:11.123Z`.
pub fn rfc3339_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl<'a> Event<'a> {
    pub fn new(kind: EventKind, id: &'a str, campaign: &'a str, to: &'a str) -> Self {
        Event {
            kind,
            id,
            campaign,
            to,
            at: rfc3339_ms(super::now_ms()),
            ..Default::default()
        }
    }

    /// An event of the job `ident` names (its variant included).
    pub fn of(kind: EventKind, ident: &'a crate::job::JobIdentity) -> Self {
        let mut ev = Event::new(kind, &ident.id, &ident.campaign, &ident.to);
        ev.variant = ident.variant.as_deref();
        ev
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("events serialize")
    }
}

/// Retention of `{prefix}events` (`[events]`), and the lag of every consumer group.
///
/// Every second or two (a quarter of `max_age` when that is shorter) any daemon trims the
/// stream to `max_len` entries and `max_age`, in one script (`scripts/trim_events.lua`),
/// never past the oldest entry the workflow group (`workflow_group`,
/// `{redis.group}-workflows`, whenever it exists: also on daemons that run no workflows
/// themselves) still needs: the older of its oldest pending entry and its last-delivered
/// one. A workflow engine that stops reading for hours then costs memory
/// (which the high-water mark of [`crate::store::checks`] turns into back-pressure on new
/// jobs), not follow-ups and `not_*` timers. While the group holds the trim back,
/// `paloma_events_held` (entries past `max_len`) and `paloma_events_held_seconds` (the
/// oldest entry's age past `max_age`) say so, and a warning is logged at most once a
/// minute. Writes keep only the far larger `hard_max_len` by themselves (`XADD … MAXLEN
/// ~`); what that bound drops before the group read it is counted in
/// `paloma_events_lost_total` and logged as an error.
///
/// The same round sets `paloma_stream_lag{group}` for every group on `{prefix}sends` and
/// `{prefix}events` (`XINFO GROUPS`: entries not yet delivered to the group).
pub async fn retain(
    mut conn: crate::store::RedisConn,
    keys: super::Keys,
    settings: crate::config::EventSettings,
    workflow_group: String,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    use std::time::{Duration, Instant};
    let max_age = settings.max_age.get();
    let every = (max_age / 4).clamp(Duration::from_millis(200), Duration::from_secs(2));
    let script = redis::Script::new(include_str!("scripts/trim_events.lua"));
    let group = workflow_group;
    let mut ticker = crate::ticker::Ticker::new(every, stop);
    let mut last_warned: Option<Instant> = None;
    // Unread entries gone in the current gap (reset once the group is past it), so that
    // each is counted once by this daemon.
    let mut lost_seen = 0i64;
    let mut lags = Lags::default();
    let mut more = false;
    loop {
        if !more {
            if !ticker.tick().await {
                return;
            }
            lags.refresh(&mut conn, &keys, &metrics).await;
        }
        let now = super::now_ms();
        let cutoff = (now - max_age.as_millis() as i64).max(0);
        let r: redis::RedisResult<(i64, i64, String, i64, i64)> = script
            .key(&keys.events)
            .arg(format!("{cutoff}-0"))
            .arg(settings.max_len)
            .arg(&group)
            .arg(TRIM_CHUNK)
            .invoke_async(&mut conn)
            .await;
        let (_removed, held, first, lost, again) = match r {
            Ok(r) => r,
            Err(e) => {
                metrics.redis_errors.inc();
                tracing::debug!(error = %e, "trimming the events stream failed; next round");
                more = false;
                continue;
            }
        };
        more = again == 1;
        let first_ms = (!first.is_empty()).then(|| super::Entry::id_millis(&first));
        let held_ms = first_ms.map_or(0, |f| (cutoff - f).max(0));
        metrics.capacity.events_held.set(held);
        metrics.capacity.events_held_seconds.set(held_ms / 1000);
        if held > 0 || held_ms > 0 {
            if last_warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                last_warned = Some(Instant::now());
                tracing::warn!(
                    group = %group,
                    over_max_len = held,
                    past_max_age_s = held_ms / 1000,
                    "the events stream is kept past its retention because the workflow engine has not read it yet: is it running? (if workflows are no longer used anywhere, remove its group: XGROUP DESTROY {{prefix}}events {{group}})"
                );
            }
        } else {
            last_warned = None;
        }
        if lost > lost_seen {
            metrics
                .capacity
                .events_lost
                .inc_by((lost - lost_seen) as u64);
            tracing::error!(
                group = %group,
                lost = lost - lost_seen,
                hard_max_len = settings.hard_max_len(),
                "events the workflow engine had not read were trimmed by events.hard_max_len: their follow-ups, webhooks and timers are lost"
            );
        }
        lost_seen = lost;
    }
}

/// Entries removed for the length bound in one script call, at most.
const TRIM_CHUNK: u64 = 10_000;

/// The groups last seen on the two streams, so a removed group's series goes too.
#[derive(Default)]
struct Lags {
    seen: std::collections::HashSet<String>,
}

impl Lags {
    async fn refresh(
        &mut self,
        conn: &mut crate::store::RedisConn,
        keys: &super::Keys,
        metrics: &crate::metrics::Metrics,
    ) {
        let mut now = std::collections::HashMap::<String, i64>::new();
        for stream in [&keys.sends, &keys.events] {
            match stream_lags(conn, stream).await {
                Ok(lags) => {
                    for (g, lag) in lags {
                        *now.entry(g).or_default() += lag;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, stream = %stream, "reading the consumer groups failed");
                    return;
                }
            }
        }
        for (g, lag) in &now {
            metrics
                .capacity
                .stream_lag
                .with_label_values(&[g])
                .set(*lag);
        }
        for g in self.seen.iter().filter(|g| !now.contains_key(*g)) {
            let _ = metrics.capacity.stream_lag.remove_label_values(&[g]);
        }
        self.seen = now.into_keys().collect();
    }
}

/// Each group of `stream` and how many entries it has not been delivered yet: Redis's
/// `lag`, or, where Redis cannot tell it (entries deleted in between), entries added minus
/// entries read.
async fn stream_lags(
    conn: &mut crate::store::RedisConn,
    stream: &str,
) -> redis::RedisResult<Vec<(String, i64)>> {
    use redis::Value;
    type Info = Vec<std::collections::HashMap<String, Value>>;
    let groups: Info = match redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await
    {
        Ok(g) => g,
        // No stream yet: no groups.
        Err(e) if e.code() == Some("ERR") && e.to_string().contains("no such key") => {
            return Ok(Vec::new())
        }
        Err(e) => return Err(e),
    };
    let int = |v: Option<&Value>| match v {
        Some(Value::Int(n)) => Some(*n),
        _ => None,
    };
    let text = |v: Option<&Value>| match v {
        Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
        Some(Value::SimpleString(s)) => s.clone(),
        _ => String::new(),
    };
    let mut added: Option<i64> = None;
    let mut out = Vec::with_capacity(groups.len());
    for g in &groups {
        let lag = match int(g.get("lag")) {
            Some(l) => l,
            None => {
                let Some(read) = int(g.get("entries-read")) else {
                    continue;
                };
                if added.is_none() {
                    let info: std::collections::HashMap<String, Value> = redis::cmd("XINFO")
                        .arg("STREAM")
                        .arg(stream)
                        .query_async(conn)
                        .await?;
                    added = int(info.get("entries-added"));
                }
                match added {
                    Some(a) => (a - read).max(0),
                    None => continue,
                }
            }
        };
        out.push((text(g.get("name")), lag));
    }
    Ok(out)
}

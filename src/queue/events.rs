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
}

impl EventKind {
    pub const ALL: [EventKind; 11] = [
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

/// Age retention of `{prefix}events` (`[events] max_age`): every `max_age / 4` (between 1 s
/// and a minute) entries older than `max_age` are trimmed (exact `XTRIM MINID`; the length
/// bound is kept by `MAXLEN ~` on every write). Any daemon may do it; trimming twice is
/// harmless.
pub async fn retain(
    mut conn: crate::store::RedisConn,
    keys: super::Keys,
    max_age: std::time::Duration,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let every = (max_age / 4).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(60),
    );
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let min = super::now_ms() - max_age.as_millis() as i64;
        if min <= 0 {
            continue;
        }
        let r: redis::RedisResult<i64> = redis::cmd("XTRIM")
            .arg(&keys.events)
            .arg("MINID")
            .arg(format!("{min}-0"))
            .query_async(&mut conn)
            .await;
        if let Err(e) = r {
            metrics.redis_errors.inc();
            tracing::debug!(error = %e, "trimming old events failed; next round");
        }
    }
}

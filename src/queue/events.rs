//! Events on `{prefix}events`: one JSON object per entry, field `event`.

use serde::Serialize;

/// An event as written to the stream. Optional fields appear only on the types that carry
/// them (see DESIGN.md).
#[derive(Debug, Clone, Serialize, Default)]
pub struct Event<'a> {
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub id: &'a str,
    pub campaign: &'a str,
    pub to: &'a str,
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
}

/// RFC 3339 UTC with milliseconds: `2026-11-22T18:50:11.123Z`.
pub fn rfc3339_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl<'a> Event<'a> {
    pub fn new(kind: &'a str, id: &'a str, campaign: &'a str, to: &'a str) -> Self {
        Event {
            kind,
            id,
            campaign,
            to,
            at: rfc3339_ms(super::now_ms()),
            ..Default::default()
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("events serialize")
    }
}

/// Is this event type one that ends a job?
pub fn is_terminal(kind: &str) -> bool {
    matches!(
        kind,
        "delivered" | "bounced" | "failed" | "suppressed" | "dead"
    )
}

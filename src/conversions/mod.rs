//! Conversions and ROI: what the shop reports back (`POST /api/v1/conversions`), attributed
//! to the message that brought it, counted once per order, and summed per campaign.
//!
//! A conversion names its person by click id (`click`, what a tracked redirect appended to
//! the shop's URL with `[tracking] click_param`, see [`crate::track::clickid`]) or by
//! address (`to`); [`attribution`] decides which message, if any, it counts for. Its `id`
//! (the shop's order id) is the idempotency key: the first post of an id is recorded, with
//! its answer kept under `conv:{id}` for `conversions.id_retention`; a retry gets that answer
//! back (`"duplicate": true`) and counts nothing.
//!
//! Money is integer minor units per currency ([`money`]): no amount is ever a float in
//! Redis. An attributed conversion adds to its campaign's `convs:{campaign}` hash (count,
//! revenue per currency, the same per link, variant, kind and touch), its people
//! HyperLogLogs, and writes a `converted` event; an unattributed one is only remembered.
//!
//! Per request: one pipeline reads the last human clicks of the addresses posted, and one
//! script (`scripts/record.lua`) records every conversion, acknowledged as the API's other
//! writes (`redis.ack_replicas`).
//!
//! Keys: reads `r:{address}` (`last_human_click`); writes `conv:{id}`, `convs:{campaign}`,
//! `uniq:p:{campaign}[:{variant}]`, `events`, and for a campaign with a `metric = "revenue"`
//! experiment `convx:{campaign}` (each message's revenue, each variant's log sums). [`figures`] reads them back for the stats.

pub mod attribution;
pub mod figures;
pub mod money;
mod record;

use serde_json::value::RawValue;

use crate::config::Settings;
use crate::track::clickid::{ClickIds, MAX_CLICK_ID_LEN};

pub use self::money::Currency;
pub use self::record::{Outcome, Recorded};

/// How far in the future a conversion's `at` may be (the shop's clock ahead of ours).
pub const MAX_FUTURE_MS: i64 = 5 * 60 * 1000;
/// Longest conversion id (order id).
pub const MAX_ID_LEN: usize = 200;
/// The kind of a conversion posted without one.
pub const DEFAULT_KIND: &str = "purchase";

/// What recording conversions needs: the click ids' keys and `[conversions]`.
pub struct Conversions {
    pub click_ids: ClickIds,
    /// `conversions.window`, in seconds.
    pub window: i64,
    pub max_items: usize,
    /// `conversions.id_retention`, in seconds.
    pub retention: u64,
    /// Campaigns with a `metric = "revenue"` experiment, and its currency.
    pub revenue_experiments: std::collections::HashMap<String, Currency>,
}

impl Conversions {
    pub fn new(settings: &Settings) -> Conversions {
        let c = &settings.conversions;
        Conversions {
            click_ids: ClickIds::of(&settings.tracking),
            window: c.window.get().as_secs() as i64,
            max_items: c.max_items,
            retention: c.id_retention.get().as_secs().max(1),
            revenue_experiments: settings
                .experiments
                .iter()
                .filter(|x| x.metric == crate::config::ExperimentMetric::Revenue)
                .filter_map(|x| {
                    let c = Currency::parse(x.currency.as_deref()?).ok()?;
                    Some((x.campaign.clone(), c))
                })
                .collect(),
        }
    }
}

/// One posted conversion, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Posted {
    pub id: String,
    pub click: Option<String>,
    /// Lower-cased.
    pub to: Option<String>,
    pub kind: String,
    /// The value, in minor units of its currency.
    pub money: Option<(Currency, i64)>,
    /// Unix ms.
    pub at: i64,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw<'a> {
    id: Option<String>,
    click: Option<String>,
    to: Option<String>,
    #[serde(borrow)]
    value: Option<&'a RawValue>,
    currency: Option<String>,
    kind: Option<String>,
    at: Option<String>,
}

/// A refused conversion: its id when it could be read, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub id: Option<String>,
    pub error: String,
}

/// The conversions of a body: a JSON object, or a JSON array of them, each as its own text.
pub fn split(body: &[u8]) -> Result<Vec<&str>, String> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let text = std::str::from_utf8(body).map_err(|e| format!("the body is not UTF-8 ({e})"))?;
    let t = text.trim();
    if t.starts_with('[') {
        let items: Vec<&RawValue> = serde_json::from_str(t)
            .map_err(|e| format!("malformed JSON ({e}): send a conversion or an array of them"))?;
        return Ok(items.into_iter().map(RawValue::get).collect());
    }
    if t.starts_with('{') {
        let one: &RawValue = serde_json::from_str(t)
            .map_err(|e| format!("malformed JSON ({e}): send a conversion or an array of them"))?;
        return Ok(vec![one.get()]);
    }
    Err("send a JSON object (a conversion) or an array of them".into())
}

/// Checks one conversion's text at `now` (Unix ms); `retention` is
/// `conversions.id_retention` in ms (an older `at` is refused: a retry of it could no longer
/// be told from a new order).
pub fn check(text: &str, now: i64, retention: i64) -> Result<Posted, Refused> {
    let raw: Raw = serde_json::from_str(text).map_err(|e| Refused {
        id: serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|v| v.get("id")?.as_str().map(str::to_string)),
        error: format!("malformed conversion: {e}"),
    })?;
    let id = raw.id.clone().unwrap_or_default();
    let refuse = |error: String| Refused {
        id: (!id.is_empty()).then(|| id.clone()),
        error,
    };
    if id.is_empty() {
        return Err(refuse(
            "missing field `id` (the order's id, the idempotency key)".into(),
        ));
    }
    if id.len() > MAX_ID_LEN || id.chars().any(char::is_control) {
        return Err(refuse(format!(
            "`id` must be 1-{MAX_ID_LEN} bytes without control characters"
        )));
    }
    let click = raw.click.filter(|c| !c.is_empty());
    if click.as_ref().is_some_and(|c| c.len() > MAX_CLICK_ID_LEN) {
        return Err(refuse("`click` is too long to be a click id".into()));
    }
    let to = match raw.to.filter(|t| !t.is_empty()) {
        None => None,
        Some(t) => Some(
            crate::job::Recipient::parse(&t)
                .map(|r| crate::values::address_key(r.as_str()))
                .map_err(|e| refuse(format!("`to`: {e}")))?,
        ),
    };
    if click.is_none() && to.is_none() {
        return Err(refuse(
            "give `click` (the click id) or `to` (the address) to attribute the conversion".into(),
        ));
    }
    let kind = raw.kind.unwrap_or_else(|| DEFAULT_KIND.to_string());
    if kind.is_empty()
        || kind.len() > 32
        || !kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        return Err(refuse(format!(
            "`kind` {kind:?} must be 1-32 of a-z 0-9 _ - (such as purchase, signup, support_request)"
        )));
    }
    let value = raw.value.map(RawValue::get).filter(|v| *v != "null");
    let money = match (value, raw.currency.as_deref()) {
        (None, None) if kind == DEFAULT_KIND => {
            return Err(refuse("a purchase needs `value` and `currency`".into()))
        }
        (None, None) => None,
        (Some(_), None) => {
            return Err(refuse(
                "`value` needs `currency` (ISO 4217, such as EUR)".into(),
            ))
        }
        (None, Some(_)) => return Err(refuse("`currency` without `value`".into())),
        (Some(v), Some(c)) => {
            let c = Currency::parse(c).map_err(|e| refuse(e.to_string()))?;
            let minor = c.parse_amount(v).map_err(|e| refuse(e.to_string()))?;
            Some((c, minor))
        }
    };
    let at = match raw.at.as_deref() {
        None | Some("") => now,
        Some(a) => {
            let t = chrono::DateTime::parse_from_rfc3339(a)
                .map_err(|e| refuse(format!("`at` {a:?} is not RFC 3339 ({e})")))?
                .timestamp_millis();
            if t > now + MAX_FUTURE_MS {
                return Err(refuse(format!(
                    "`at` {a} is more than {} minutes in the future",
                    MAX_FUTURE_MS / 60_000
                )));
            }
            if t < now - retention {
                return Err(refuse(format!(
                    "`at` {a} is older than conversions.id_retention: a retry of it could no longer be recognised"
                )));
            }
            t
        }
    };
    Ok(Posted {
        id,
        click,
        to,
        kind,
        money,
        at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_795_000_000_000;
    const KEEP: i64 = 30 * 86_400_000;

    fn check(text: &str, now: i64) -> Result<Posted, Refused> {
        super::check(text, now, KEEP)
    }

    #[test]
    fn bodies_are_one_conversion_or_an_array() {
        assert_eq!(split(br#" {"id":"a"} "#).unwrap(), vec![r#"{"id":"a"}"#]);
        assert_eq!(
            split(br#"[{"id":"a"}, {"id":"b"}]"#).unwrap(),
            vec![r#"{"id":"a"}"#, r#"{"id":"b"}"#]
        );
        for bad in [&b"hello"[..], b"[{", b"\xff", b"", b"1"] {
            assert!(split(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn conversions_are_checked_item_by_item() {
        let ok = check(
            r#"{"id":"order-1","to":"Ann@Example.com","value":59.90,"currency":"eur","at":"2026-11-18T10:00:00+01:00"}"#,
            NOW,
        )
        .unwrap();
        assert_eq!(ok.to.as_deref(), Some("ann@example.com"));
        assert_eq!(ok.kind, "purchase");
        assert_eq!(ok.money, Some((Currency::parse("EUR").unwrap(), 5990)));
        assert_eq!(ok.at, 1_794_992_400_000);
        let s = check(
            r#"{"id":"t-1","click":"0.abc","kind":"support_request"}"#,
            NOW,
        )
        .unwrap();
        assert_eq!((s.money, s.at), (None, NOW));
        let s = check(
            r#"{"id":"t-2","to":"a@b.co","kind":"signup","value":null}"#,
            NOW,
        )
        .unwrap();
        assert_eq!(s.money, None);
        let refused = |t: &str| check(t, NOW).unwrap_err();
        let cases = [
            (
                r#"{"to":"a@b.co","value":1,"currency":"EUR"}"#,
                "missing field `id`",
            ),
            (r#"{"id":"x","value":1,"currency":"EUR"}"#, "give `click`"),
            (
                r#"{"id":"x","to":"not an address","value":1,"currency":"EUR"}"#,
                "`to`",
            ),
            (r#"{"id":"x","to":"a@b.co"}"#, "needs `value`"),
            (r#"{"id":"x","to":"a@b.co","value":1}"#, "needs `currency`"),
            (
                r#"{"id":"x","to":"a@b.co","value":1,"currency":"EURO"}"#,
                "ISO 4217",
            ),
            (
                r#"{"id":"x","to":"a@b.co","value":-1,"currency":"EUR"}"#,
                "negative",
            ),
            (
                r#"{"id":"x","to":"a@b.co","value":1e308,"currency":"EUR"}"#,
                "plain decimal",
            ),
            (
                r#"{"id":"x","to":"a@b.co","value":"NaN","currency":"EUR"}"#,
                "plain decimal",
            ),
            (
                r#"{"id":"x","to":"a@b.co","value":1.5,"currency":"JPY"}"#,
                "more decimals",
            ),
            (
                r#"{"id":"x","to":"a@b.co","value":1,"currency":"EUR","kind":"Big Sale"}"#,
                "`kind`",
            ),
            (
                r#"{"id":"x","to":"a@b.co","value":1,"currency":"EUR","at":"tomorrow"}"#,
                "RFC 3339",
            ),
            (
                r#"{"id":"x","to":"a@b.co","value":1,"currency":"EUR","at":"2099-01-01T00:00:00Z"}"#,
                "future",
            ),
            (
                r#"{"id":"x","to":"a@b.co","value":1,"currency":"EUR","amount":2}"#,
                "unknown field",
            ),
            (
                r#"{"id":"a\u0001b","to":"a@b.co","value":1,"currency":"EUR"}"#,
                "control",
            ),
        ];
        for (text, why) in cases {
            let r = refused(text);
            assert!(r.error.contains(why), "{text}: {}", r.error);
        }
        assert_eq!(
            refused(r#"{"id":"x","to":"a@b.co"}"#).id.as_deref(),
            Some("x")
        );
        assert_eq!(refused(r#"{"id":"y","to":5}"#).id.as_deref(), Some("y"));
        // A few minutes ahead is clock difference, not the future.
        assert!(check(
            r#"{"id":"x","to":"a@b.co","value":1,"currency":"EUR","at":"2026-11-18T12:34:00Z"}"#,
            1_795_005_000_000
        )
        .is_ok());
    }
}

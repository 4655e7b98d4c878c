//! A campaign's conversion figures, read back from `convs:{campaign}` (see
//! [`crate::store::keys`]), and its cost: what `paloma stats`, `GET /api/v1/campaigns/{c}`
//! and the report show under `conversions`.
//!
//! Amounts are kept in minor units and shown in major units (59.9 for 5990 cents): the
//! nearest double to the exact decimal, which JSON prints as that decimal. ROI is
//! `(revenue − cost) / cost` per currency, only where a cost in that currency is set.

use std::collections::BTreeMap;

use super::money::{roi, Currency};
use crate::queue::Keys;
use crate::store::replication::{AckError, Acks};
use crate::store::RedisConn;

/// Conversions of one slice of a campaign (a link, a variant, a kind, a touch level).
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct Slice {
    pub count: i64,
    /// People who converted (variants and touch levels; a person counts once).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub people: Option<i64>,
    /// Revenue by currency, in major units.
    pub revenue: BTreeMap<String, f64>,
}

/// A campaign's conversions.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct Figures {
    /// Conversions attributed (each order once).
    pub count: i64,
    /// People who converted (counted once each, approximately past a few thousand: a
    /// HyperLogLog).
    pub people: i64,
    /// Revenue by currency, in major units.
    pub revenue: BTreeMap<String, f64>,
    /// What the campaign cost, by currency (`PUT /api/v1/campaigns/{c}/cost`).
    pub cost: BTreeMap<String, f64>,
    /// `(revenue − cost) / cost`, for each currency a cost is set in.
    pub roi: BTreeMap<String, f64>,
    /// Per named link.
    pub link: BTreeMap<String, Slice>,
    /// Per experiment variant.
    pub variant: BTreeMap<String, Slice>,
    /// Per kind (purchase, signup, …).
    pub kind: BTreeMap<String, Slice>,
    /// Per touch level (the message's touch bucket).
    pub touch: BTreeMap<String, Slice>,
    /// Revenue and cost in minor units (exact integers), by currency: for sums elsewhere.
    #[serde(skip)]
    pub revenue_minor: BTreeMap<String, i64>,
}

fn major(cur: &str, minor: i64) -> f64 {
    Currency::parse(cur).map_or(minor as f64, |c| c.major(minor))
}

impl Figures {
    /// From the fields of `convs:{campaign}`.
    pub fn from_hash(h: &BTreeMap<String, i64>) -> Figures {
        let mut f = Figures::default();
        let mut cost_minor: BTreeMap<String, i64> = BTreeMap::new();
        for (k, &v) in h {
            match k.as_str() {
                "count" => f.count = v,
                "people" => f.people = v,
                _ => {}
            }
            if let Some(cur) = k.strip_prefix("rev:") {
                f.revenue_minor.insert(cur.to_string(), v);
                f.revenue.insert(cur.to_string(), major(cur, v));
                continue;
            }
            if let Some(cur) = k.strip_prefix("cost:") {
                cost_minor.insert(cur.to_string(), v);
                f.cost.insert(cur.to_string(), major(cur, v));
                continue;
            }
            let Some((dim, rest)) = k.split_once(':') else {
                continue;
            };
            let map = match dim {
                "link" => &mut f.link,
                "variant" => &mut f.variant,
                "kind" => &mut f.kind,
                "touch" => &mut f.touch,
                _ => continue,
            };
            // The name may hold ':' itself: the field is read from its end.
            if let Some(name) = rest.strip_suffix(":count") {
                map.entry(name.to_string()).or_default().count = v;
            } else if let Some(name) = rest.strip_suffix(":people") {
                map.entry(name.to_string()).or_default().people = Some(v);
            } else if let Some((name, cur)) = rest.rsplit_once(":rev:") {
                map.entry(name.to_string())
                    .or_default()
                    .revenue
                    .insert(cur.to_string(), major(cur, v));
            }
        }
        for (cur, cost) in &cost_minor {
            let revenue = f.revenue_minor.get(cur).copied().unwrap_or(0);
            if let Some(r) = roi(revenue, *cost) {
                f.roi.insert(cur.clone(), r);
            }
        }
        f
    }
}

/// Sets what `campaign` cost in `currency` (minor units; 0 removes that currency's cost),
/// acknowledged as the API's writes are. Costs in other currencies are kept.
pub async fn set_cost(
    conn: &mut RedisConn,
    keys: &Keys,
    acks: &Acks,
    campaign: &str,
    currency: Currency,
    minor: i64,
) -> Result<(), AckError> {
    let key = keys.conversions(campaign);
    let field = format!("cost:{currency}");
    let mut p = redis::pipe();
    if minor == 0 {
        p.cmd("HDEL").arg(&key).arg(&field).ignore();
    } else {
        p.cmd("HSET").arg(&key).arg(&field).arg(minor).ignore();
    }
    acks.write::<()>(conn, &p, false, "campaign_cost").await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_read_back_with_roi_per_currency() {
        let h: BTreeMap<String, i64> = [
            ("count", 5),
            ("people", 4),
            ("rev:EUR", 17970),
            ("rev:JPY", 1200),
            ("cost:EUR", 12000),
            ("cost:USD", 5000),
            ("link:pricing:count", 3),
            ("link:pricing:rev:EUR", 11980),
            ("link:a:b:count", 1),
            ("variant:B:count", 2),
            ("variant:B:people", 2),
            ("variant:B:rev:EUR", 5990),
            ("kind:purchase:count", 4),
            ("kind:support_request:count", 1),
            ("touch:1:count", 5),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let f = Figures::from_hash(&h);
        assert_eq!((f.count, f.people), (5, 4));
        assert_eq!(f.revenue["EUR"], 179.7);
        assert_eq!(f.revenue["JPY"], 1200.0);
        assert_eq!(f.cost["EUR"], 120.0);
        assert_eq!(f.roi["EUR"], (17970.0 - 12000.0) / 12000.0);
        assert!(!f.roi.contains_key("JPY"), "no cost in JPY");
        assert_eq!(f.roi["USD"], -1.0, "a cost and no revenue");
        assert_eq!(f.link["pricing"].count, 3);
        assert_eq!(f.link["pricing"].revenue["EUR"], 119.8);
        assert_eq!(f.link["a:b"].count, 1);
        assert_eq!(f.variant["B"].people, Some(2));
        assert_eq!(f.kind["support_request"].count, 1);
        assert_eq!(f.touch["1"].count, 5);
        let json = serde_json::to_value(&f).unwrap();
        assert_eq!(json["revenue"]["EUR"].to_string(), "179.7");
        assert!(json.get("revenue_minor").is_none());
    }
}

//! What paloma knows of its campaigns and recipients, read from Redis: the counters of
//! `paloma stats`, the rows of `paloma campaign list`, a recipient's record. The command
//! line and the HTTP API (`src/api/`) answer from the same functions, so they never differ.

use std::collections::BTreeMap;

use crate::control::State;
use crate::queue::Keys;
use crate::store::RedisConn;

/// Counters of one campaign.
#[derive(Debug, Default, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct CampaignStats {
    pub campaign: String,
    /// Jobs with at least one outcome and none terminal yet (awaiting a retry).
    pub queued: i64,
    pub accepted: i64,
    pub delivered: i64,
    pub deferred: i64,
    pub bounced: i64,
    pub failed: i64,
    pub suppressed: i64,
    pub dead: i64,
    /// Opens and clicks by people (machine hits in `*_machine`), total and unique per send.
    pub opened: i64,
    pub unique_opened: i64,
    pub clicked: i64,
    pub unique_clicked: i64,
    pub opened_machine: i64,
    pub clicked_machine: i64,
    pub unsubscribed: i64,
    /// Late bounces (DSNs after acceptance), by bounce class; delay notices apart.
    pub returned: i64,
    pub returned_by_class: BTreeMap<String, i64>,
    pub returned_delayed: i64,
    /// Feedback-loop complaints, and their rate: complaints / delivered (Gmail and Yahoo
    /// want it under 0.3%).
    pub complained: i64,
    pub complaint_rate: f64,
    /// Clicks per named link: `[link, total, unique]`.
    #[schema(value_type = Vec<Vec<serde_json::Value>>)]
    pub links: Vec<(String, i64, i64)>,
    /// In an experiment: counters per variant (`delivered`, `bounced`, …, `unique_opened`,
    /// `unique_clicked`, `opened_machine`, `clicked_machine`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub variants: BTreeMap<String, BTreeMap<String, i64>>,
    /// In an experiment: `started_at`, and once decided `winner`, `how`, `decided_at` and
    /// `result` (the figures of the decision).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub experiment: Option<serde_json::Value>,
    /// Conversions attributed to the campaign (`POST /api/v1/conversions`): count, people,
    /// revenue, cost and ROI by currency, and the same per link, variant, kind and touch.
    pub conversions: crate::conversions::figures::Figures,
}

/// `paloma stats --json`.
#[derive(Debug, Default, serde::Serialize, utoipa::ToSchema)]
pub struct Overview {
    /// Entries in the sends stream not yet finished (all campaigns).
    pub stream_waiting: i64,
    /// Of those, read by a daemon and in progress.
    pub stream_pending: i64,
    /// Jobs in the delayed set (retries and send_at).
    pub scheduled: i64,
    pub campaigns: Vec<CampaignStats>,
}

/// One campaign's state and counts (`paloma campaign list --json`, `GET /api/v1/campaigns`).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct CampaignRow {
    pub state: State,
    /// Jobs kept aside while paused.
    pub parked: i64,
    #[serde(flatten)]
    pub stats: CampaignStats,
}

/// The counters of `campaign`, or of every campaign that has an outcome, in one pipeline.
pub async fn overview(
    conn: &mut RedisConn,
    keys: &Keys,
    group: &str,
    campaign: Option<&str>,
) -> redis::RedisResult<Overview> {
    let names: Vec<String> = match campaign {
        Some(c) => vec![c.to_string()],
        None => {
            let mut v: Vec<String> = redis::cmd("SMEMBERS")
                .arg(&keys.campaigns)
                .query_async(conn)
                .await?;
            v.sort();
            v
        }
    };
    overview_of(conn, keys, group, names).await
}

/// The largest page of campaigns the API and the report answer with.
pub const MAX_PAGE: usize = 1000;

/// One page of campaigns in name order: at most `limit` (1..=[`MAX_PAGE`]) names after
/// `after`, with their counters, and the cursor of the next page when there is one. Only
/// the page's campaigns are read, so an answer stays small however many campaigns there are.
pub async fn overview_page(
    conn: &mut RedisConn,
    keys: &Keys,
    group: &str,
    after: Option<&str>,
    limit: usize,
) -> redis::RedisResult<(Overview, Option<String>)> {
    let mut all: Vec<String> = redis::cmd("SMEMBERS")
        .arg(&keys.campaigns)
        .query_async(conn)
        .await?;
    all.sort_unstable();
    let (names, next) = page_of(all, after, limit);
    Ok((overview_of(conn, keys, group, names).await?, next))
}

/// The names of one page from all of them (sorted), and the next page's cursor.
fn page_of(all: Vec<String>, after: Option<&str>, limit: usize) -> (Vec<String>, Option<String>) {
    let limit = limit.clamp(1, MAX_PAGE);
    let start = after.map_or(0, |a| all.partition_point(|n| n.as_str() <= a));
    let names: Vec<String> = all.into_iter().skip(start).take(limit + 1).collect();
    if names.len() > limit {
        let mut names = names;
        names.truncate(limit);
        let next = names.last().cloned();
        (names, next)
    } else {
        (names, None)
    }
}

async fn overview_of(
    conn: &mut RedisConn,
    keys: &Keys,
    group: &str,
    names: Vec<String>,
) -> redis::RedisResult<Overview> {
    // One transaction: an archive between reading a campaign's counters and its archive
    // entry would count them twice.
    let mut p = redis::pipe();
    p.atomic();
    for n in &names {
        p.cmd("HGETALL").arg(keys.stats(n));
        p.cmd("HGETALL").arg(keys.links(n));
        p.cmd("HGETALL").arg(keys.variants(n));
        p.cmd("HGETALL").arg(keys.experiment(n));
        p.cmd("HGET").arg(&keys.campaigns_archive).arg(n);
        p.cmd("HGETALL").arg(keys.conversions(n));
    }
    p.cmd("XLEN").arg(&keys.sends);
    p.cmd("ZCARD").arg(&keys.scheduled);
    let mut replies: Vec<redis::Value> = p.query_async(conn).await?;
    let scheduled: i64 =
        redis::from_redis_value(replies.pop().unwrap_or(redis::Value::Nil)).unwrap_or(0);
    let stream_waiting: i64 =
        redis::from_redis_value(replies.pop().unwrap_or(redis::Value::Nil)).unwrap_or(0);
    let pending: redis::RedisResult<redis::Value> = redis::cmd("XPENDING")
        .arg(&keys.sends)
        .arg(group)
        .query_async(conn)
        .await;
    let stream_pending = match pending {
        Ok(redis::Value::Array(a)) => a
            .first()
            .and_then(|v| redis::from_redis_value::<i64>(v.clone()).ok())
            .unwrap_or(0),
        _ => 0,
    };
    let mut campaigns = Vec::new();
    let mut replies = replies.into_iter();
    for name in names {
        let h: BTreeMap<String, i64> =
            redis::from_redis_value(replies.next().unwrap_or(redis::Value::Nil))
                .unwrap_or_default();
        let l: BTreeMap<String, i64> =
            redis::from_redis_value(replies.next().unwrap_or(redis::Value::Nil))
                .unwrap_or_default();
        let v: BTreeMap<String, i64> =
            redis::from_redis_value(replies.next().unwrap_or(redis::Value::Nil))
                .unwrap_or_default();
        let x: BTreeMap<String, String> =
            redis::from_redis_value(replies.next().unwrap_or(redis::Value::Nil))
                .unwrap_or_default();
        let archived: Option<String> =
            redis::from_redis_value(replies.next().unwrap_or(redis::Value::Nil)).unwrap_or(None);
        let conv: BTreeMap<String, i64> =
            redis::from_redis_value(replies.next().unwrap_or(redis::Value::Nil))
                .unwrap_or_default();
        // An archived campaign's counters, plus what it has done since (if anything).
        let (mut h, mut l) = (h, l);
        if let Some((ah, al)) = archived.as_deref().and_then(crate::archive::parse) {
            for (k, v) in ah {
                *h.entry(k).or_default() += v;
            }
            for (k, v) in al {
                *l.entry(k).or_default() += v;
            }
        }
        let mut c = campaign_stats(name, &h, &l);
        c.variants = per_variant(&v);
        c.experiment = experiment_state(&x);
        c.conversions = crate::conversions::figures::Figures::from_hash(&conv);
        campaigns.push(c);
    }
    Ok(Overview {
        stream_waiting,
        stream_pending,
        scheduled,
        campaigns,
    })
}

/// One campaign's figures from its `stats:` and `links:` hashes.
fn campaign_stats(
    campaign: String,
    h: &BTreeMap<String, i64>,
    l: &BTreeMap<String, i64>,
) -> CampaignStats {
    let links = l
        .iter()
        .filter(|(k, _)| !k.ends_with(":unique"))
        .map(|(k, v)| {
            (
                k.clone(),
                *v,
                l.get(&format!("{k}:unique")).copied().unwrap_or(0),
            )
        })
        .collect();
    let g = |k: &str| h.get(k).copied().unwrap_or(0);
    let terminal = g("delivered") + g("bounced") + g("failed") + g("suppressed") + g("dead");
    CampaignStats {
        queued: (g("accepted") - terminal).max(0),
        accepted: g("accepted"),
        delivered: g("delivered"),
        deferred: g("deferred"),
        bounced: g("bounced"),
        failed: g("failed"),
        suppressed: g("suppressed"),
        dead: g("dead"),
        opened: g("opened"),
        unique_opened: g("unique_opened"),
        clicked: g("clicked"),
        unique_clicked: g("unique_clicked"),
        opened_machine: g("opened_machine"),
        clicked_machine: g("clicked_machine"),
        unsubscribed: g("unsubscribed"),
        returned: g("returned"),
        returned_by_class: h
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("returned_").map(|c| (c.to_string(), *v)))
            .filter(|(c, _)| c != "delayed" && c != "hard")
            .collect(),
        returned_delayed: g("returned_delayed"),
        complained: g("complained"),
        complaint_rate: if g("delivered") > 0 {
            g("complained") as f64 / g("delivered") as f64
        } else {
            0.0
        },
        links,
        campaign,
        variants: BTreeMap::new(),
        experiment: None,
        conversions: Default::default(),
    }
}

/// `{variant}:{outcome}` counters, by variant.
fn per_variant(v: &BTreeMap<String, i64>) -> BTreeMap<String, BTreeMap<String, i64>> {
    let mut out: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for (k, n) in v {
        if let Some((variant, field)) = k.split_once(':') {
            out.entry(variant.to_string())
                .or_default()
                .insert(field.to_string(), *n);
        }
    }
    out
}

/// An experiment's hash as JSON: times in RFC 3339, the decision's figures parsed.
pub fn experiment_state(x: &BTreeMap<String, String>) -> Option<serde_json::Value> {
    if x.is_empty() {
        return None;
    }
    let time = |k: &str| {
        x.get(k)
            .and_then(|t| t.parse::<i64>().ok())
            .map(crate::queue::events::rfc3339_ms)
    };
    let mut o = serde_json::Map::new();
    if let Some(t) = time("started") {
        o.insert("started_at".into(), t.into());
    }
    for k in ["winner", "how"] {
        if let Some(v) = x.get(k) {
            o.insert(k.into(), v.clone().into());
        }
    }
    if let Some(t) = time("decided_at") {
        o.insert("decided_at".into(), t.into());
    }
    if let Some(r) = x
        .get("result")
        .and_then(|r| serde_json::from_str::<serde_json::Value>(r).ok())
    {
        o.insert("result".into(), r);
    }
    Some(serde_json::Value::Object(o))
}

/// Every campaign with its state and parked jobs, besides the counters of `o`.
pub async fn campaign_rows(
    conn: &mut RedisConn,
    keys: &Keys,
    o: Overview,
) -> redis::RedisResult<Vec<CampaignRow>> {
    if o.campaigns.is_empty() {
        return Ok(Vec::new());
    }
    // The states of these campaigns only (HMGET), not every state ever set.
    let mut p = redis::pipe();
    p.cmd("HMGET").arg(&keys.campaign_states);
    for c in &o.campaigns {
        p.arg(&c.campaign);
    }
    for c in &o.campaigns {
        p.cmd("ZCARD").arg(keys.parked(&c.campaign));
    }
    let mut replies: Vec<redis::Value> = p.query_async(conn).await?;
    let parked = replies.split_off(1.min(replies.len()));
    let states: Vec<Option<String>> = replies
        .pop()
        .and_then(|v| redis::from_redis_value(v).ok())
        .unwrap_or_default();
    Ok(o.campaigns
        .into_iter()
        .enumerate()
        .map(|(i, s)| CampaignRow {
            state: states
                .get(i)
                .and_then(|x| x.as_deref())
                .map_or(State::Active, State::parse),
            parked: parked
                .get(i)
                .and_then(|v| redis::from_redis_value(v.clone()).ok())
                .unwrap_or(0),
            stats: s,
        })
        .collect())
}

/// Whether `campaign` was ever seen (has an outcome, a state set by an operator, or an
/// archive entry).
pub async fn known(conn: &mut RedisConn, keys: &Keys, campaign: &str) -> redis::RedisResult<bool> {
    let (member, state, archived): (bool, bool, bool) = redis::pipe()
        .cmd("SISMEMBER")
        .arg(&keys.campaigns)
        .arg(campaign)
        .cmd("HEXISTS")
        .arg(&keys.campaign_states)
        .arg(campaign)
        .cmd("HEXISTS")
        .arg(&keys.campaigns_archive)
        .arg(campaign)
        .query_async(conn)
        .await?;
    Ok(member || state || archived)
}

/// One level of contact pressure (`paloma stats --touches`): the sends that were their
/// recipient's `bucket`-th marketing message of the year, and what came of them.
#[derive(Debug, Clone, Default, serde::Serialize, utoipa::ToSchema)]
pub struct TouchRow {
    pub bucket: String,
    /// Messages delivered (each a recipient reached by one campaign).
    pub recipients: i64,
    pub bounced: i64,
    /// People's unique opens and clicks (machine hits never count).
    pub opened: i64,
    pub clicked: i64,
    pub unsubscribed: i64,
    pub complained: i64,
    /// Of `recipients`.
    pub open_rate: f64,
    pub click_rate: f64,
    pub unsubscribe_rate: f64,
    pub complaint_rate: f64,
    /// Conversions attributed to messages of this touch level, and per delivered.
    pub conversions: i64,
    pub conversion_rate: f64,
    /// People who converted (once per campaign each).
    pub converted: i64,
    /// Their revenue by currency (major units), and per delivered message.
    pub revenue: BTreeMap<String, f64>,
    pub revenue_per_delivered: BTreeMap<String, f64>,
}

/// The contact-pressure curve of `campaign`, or of every campaign summed.
pub async fn touches(
    conn: &mut RedisConn,
    keys: &Keys,
    campaign: Option<&str>,
) -> redis::RedisResult<Vec<TouchRow>> {
    let names: Vec<String> = match campaign {
        Some(c) => vec![c.to_string()],
        None => {
            redis::cmd("SMEMBERS")
                .arg(&keys.campaigns)
                .query_async(conn)
                .await?
        }
    };
    let mut sum: BTreeMap<String, i64> = BTreeMap::new();
    for chunk in names.chunks(500) {
        let mut p = redis::pipe();
        for n in chunk {
            p.cmd("HGETALL").arg(keys.touches(n));
            p.cmd("HGETALL").arg(keys.conversions(n));
        }
        let all: Vec<BTreeMap<String, i64>> = p.query_async(conn).await?;
        for h in all {
            // `{bucket}:{outcome}` of the touches and `touch:{bucket}:…` of the conversions
            // never share a name.
            for (k, v) in h {
                *sum.entry(k).or_default() += v;
            }
        }
    }
    Ok(touch_rows(&sum))
}

/// The rows of [`crate::policy::touches::BUCKETS`] from `{bucket}:{what}` counters.
fn touch_rows(sum: &BTreeMap<String, i64>) -> Vec<TouchRow> {
    crate::policy::touches::BUCKETS
        .iter()
        .map(|b| {
            let g = |what: &str| sum.get(&format!("{b}:{what}")).copied().unwrap_or(0);
            let recipients = g("delivered");
            let rate = |n: i64| {
                if recipients > 0 {
                    n as f64 / recipients as f64
                } else {
                    0.0
                }
            };
            // Revenue of the touch level, by currency (`touch:{b}:rev:{CUR}`, minor units).
            let prefix = format!("touch:{b}:rev:");
            let revenue: BTreeMap<String, f64> = sum
                .iter()
                .filter_map(|(k, v)| {
                    let cur = k.strip_prefix(&prefix)?;
                    let c = crate::conversions::Currency::parse(cur).ok()?;
                    Some((cur.to_string(), c.major(*v)))
                })
                .collect();
            let conversions = sum.get(&format!("touch:{b}:count")).copied().unwrap_or(0);
            TouchRow {
                conversions,
                converted: sum.get(&format!("touch:{b}:people")).copied().unwrap_or(0),
                conversion_rate: rate(conversions),
                revenue_per_delivered: revenue
                    .iter()
                    .map(|(c, v)| {
                        let per = if recipients > 0 {
                            v / recipients as f64
                        } else {
                            0.0
                        };
                        (c.clone(), per)
                    })
                    .collect(),
                revenue,
                bucket: b.to_string(),
                recipients,
                bounced: g("bounced"),
                opened: g("unique_opened"),
                clicked: g("unique_clicked"),
                unsubscribed: g("unsubscribed"),
                complained: g("complained"),
                open_rate: rate(g("unique_opened")),
                click_rate: rate(g("unique_clicked")),
                unsubscribe_rate: rate(g("unsubscribed")),
                complaint_rate: rate(g("complained")),
            }
        })
        .collect()
}

/// What is known about one recipient: engagement, suppression, recent sends.
pub async fn recipient(
    conn: &mut RedisConn,
    keys: &Keys,
    addr: &str,
) -> redis::RedisResult<BTreeMap<String, String>> {
    let field = crate::policy::suppression::field(addr);
    let (mut info, suppressed): (BTreeMap<String, String>, Option<String>) = redis::pipe()
        .cmd("HGETALL")
        .arg(keys.recipient(&field))
        .cmd("HGET")
        .arg(&keys.suppressed)
        .arg(&field)
        .query_async(conn)
        .await?;
    // The person's last click on a marketing message, what conversions by address
    // attribute to: readable rather than its stored form.
    if let Some(c) = info
        .get("last_human_click")
        .and_then(|v| crate::track::clickid::LastClick::decode(v))
    {
        let mut text = format!(
            "{} job {} of {}",
            crate::queue::events::rfc3339_ms(c.at * 1000),
            c.job,
            c.campaign
        );
        if !c.link.is_empty() {
            text.push_str(&format!(", link {}", c.link));
        }
        if !c.variant.is_empty() {
            text.push_str(&format!(", variant {}", c.variant));
        }
        info.insert("last_human_click".into(), text);
    }
    for k in ["last_open", "last_click"] {
        if let Some(t) = info.get(k).and_then(|v| v.parse::<i64>().ok()) {
            info.insert(k.into(), crate::queue::events::rfc3339_ms(t * 1000));
        }
    }
    if let Some(sends) = info.remove("s") {
        let times: Vec<String> = sends
            .split(',')
            .filter_map(|t| t.parse::<i64>().ok())
            .map(|t| crate::queue::events::rfc3339_ms(t * 1000))
            .collect();
        info.insert("recent_sends".into(), times.join(" "));
    }
    info.insert(
        "suppressed".into(),
        suppressed.unwrap_or_else(|| "no".into()),
    );
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_follow_the_name_order_and_say_where_the_next_begins() {
        let all: Vec<String> = ["a", "b", "c", "d", "e"].map(String::from).to_vec();
        assert_eq!(
            page_of(all.clone(), None, 2),
            (vec!["a".into(), "b".into()], Some("b".into()))
        );
        assert_eq!(
            page_of(all.clone(), Some("b"), 2),
            (vec!["c".into(), "d".into()], Some("d".into()))
        );
        assert_eq!(page_of(all.clone(), Some("d"), 2), (vec!["e".into()], None));
        // A cursor that is no longer a campaign still finds its place.
        assert_eq!(page_of(all.clone(), Some("bb"), 1).0, vec!["c".to_string()]);
        assert_eq!(page_of(all, Some("z"), 2), (vec![], None));
    }

    #[test]
    fn the_touch_curve_has_every_bucket_and_rates_of_recipients() {
        let sum: BTreeMap<String, i64> = [
            ("1:delivered", 200),
            ("1:unique_clicked", 30),
            ("4-6:delivered", 50),
            ("4-6:unsubscribed", 5),
            ("4-6:complained", 1),
            ("touch:1:count", 10),
            ("touch:1:rev:EUR", 50000),
            ("touch:1:rev:JPY", 3000),
            ("count", 10),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let rows = touch_rows(&sum);
        assert_eq!(rows.len(), 6);
        assert_eq!((rows[0].conversions, rows[0].conversion_rate), (10, 0.05));
        assert_eq!(rows[0].revenue["EUR"], 500.0);
        assert_eq!(rows[0].revenue_per_delivered["EUR"], 2.5);
        assert_eq!(rows[0].revenue_per_delivered["JPY"], 15.0);
        assert!(rows[3].revenue.is_empty());
        assert_eq!((rows[0].recipients, rows[0].click_rate), (200, 0.15));
        assert_eq!(rows[3].bucket, "4-6");
        assert_eq!(
            (rows[3].unsubscribe_rate, rows[3].complaint_rate),
            (0.1, 0.02)
        );
        assert_eq!(rows[5].recipients, 0);
    }

    #[test]
    fn counters_add_up_and_links_pair_with_their_unique_counts() {
        let h: BTreeMap<String, i64> = [
            ("accepted", 10),
            ("delivered", 6),
            ("bounced", 1),
            ("suppressed", 1),
            ("complained", 3),
            ("returned", 2),
            ("returned_hard", 1),
            ("returned_invalid_recipient", 2),
            ("returned_delayed", 1),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let l: BTreeMap<String, i64> = [("pricing", 4), ("pricing:unique", 2)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let s = campaign_stats("spring".into(), &h, &l);
        assert_eq!(s.queued, 2);
        assert_eq!(s.complaint_rate, 0.5);
        assert_eq!(s.links, vec![("pricing".to_string(), 4, 2)]);
        assert_eq!(
            s.returned_by_class.keys().collect::<Vec<_>>(),
            vec!["invalid_recipient"]
        );
    }
}

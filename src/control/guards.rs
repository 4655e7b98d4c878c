//! Guards: each daemon, every [`GUARD_EVERY`], reads the counters of the campaigns with
//! recent outcomes and pauses one whose hard-bounce or complaint rate passes its
//! `[[guards]]` rule (past `min_sent`, counting only what came since its last resume). The
//! pause is written once, by a script ([`trip.lua`](scripts/trip.lua)), whichever daemon
//! sees it first, with a `campaign_paused` event that names the reason.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{Campaigns, State};
use crate::queue::{now_ms, Keys};
use crate::store::RedisConn;

/// How often each daemon checks the guards.
pub const GUARD_EVERY: Duration = Duration::from_secs(2);

/// At start, the guards judge the campaigns that had an outcome within this.
pub const ACTIVE_WINDOW: Duration = Duration::from_secs(15 * 60);

/// The counters a guard reads, in this order.
const GUARD_FIELDS: [&str; 5] = [
    "delivered",
    "bounced",
    "bounced_hard",
    "returned_hard",
    "complained",
];

/// What a guard found wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct Trip {
    pub reason: &'static str,
    pub bounce_rate: f64,
    pub complaint_rate: f64,
    pub attempted: i64,
    pub delivered: i64,
}

/// Judges one campaign's counters (`now` and `base`, the counters at its last resume, in
/// [`GUARD_FIELDS`] order) against a guard.
pub fn judge(g: &crate::config::GuardRule, now: &[i64; 5], base: &[i64; 5]) -> Option<Trip> {
    let d = |i: usize| (now[i] - base[i]).max(0);
    let delivered = d(0);
    let attempted = delivered + d(1);
    if attempted < g.min_sent as i64 || attempted == 0 {
        return None;
    }
    let bounce_rate = (d(2) + d(3)) as f64 / attempted as f64;
    let complaint_rate = if delivered > 0 {
        d(4) as f64 / delivered as f64
    } else {
        0.0
    };
    let trip = |reason| Trip {
        reason,
        bounce_rate,
        complaint_rate,
        attempted,
        delivered,
    };
    if g.bounce_rate.is_some_and(|r| bounce_rate > r.0) {
        return Some(trip("bounce_rate"));
    }
    if g.complaint_rate.is_some_and(|r| complaint_rate > r.0) {
        return Some(trip("complaint_rate"));
    }
    None
}

/// Checks every guard every [`GUARD_EVERY`] until `stop`: a campaign whose figures since its
/// last resume break one is paused (once, however many daemons see it) and gets a
/// `campaign_paused` event. Resuming is a person's decision: `paloma campaign resume` takes a
/// new baseline, so the guard judges what is sent after it.
pub async fn guard(
    rules: Vec<crate::config::GuardRule>,
    campaigns: Arc<Campaigns>,
    mut conn: RedisConn,
    keys: Keys,
    metrics: Arc<crate::metrics::Metrics>,
    stop: watch::Receiver<bool>,
) {
    if rules.is_empty() {
        return;
    }
    let trip_script = redis::Script::new(include_str!("scripts/trip.lua"));
    let mut ticker = crate::ticker::Ticker::new(GUARD_EVERY, stop);
    // Campaigns with an outcome since `from` are judged: at start those of the last
    // ACTIVE_WINDOW, then those since the last round (less a slack for batches written
    // late). A campaign whose counters did not move keeps its verdict.
    let mut from = now_ms() - ACTIVE_WINDOW.as_millis() as i64;
    while ticker.tick().await {
        let round = now_ms();
        match check_guards(
            &rules,
            &campaigns,
            &mut conn,
            &keys,
            &metrics,
            &trip_script,
            from,
        )
        .await
        {
            Ok(()) => from = round - GUARD_SLACK.as_millis() as i64,
            Err(e) => {
                metrics.redis_errors.inc();
                tracing::debug!(error = %e, "checking guards failed; next round");
            }
        }
    }
}

/// How far before the last round the next one looks: an outcome batch stamped before it
/// and written after it is still judged.
const GUARD_SLACK: Duration = Duration::from_secs(5);

async fn check_guards(
    rules: &[crate::config::GuardRule],
    campaigns: &Campaigns,
    conn: &mut RedisConn,
    keys: &Keys,
    metrics: &crate::metrics::Metrics,
    trip_script: &redis::Script,
    since: i64,
) -> redis::RedisResult<()> {
    // Only campaigns with an outcome since `since` (`campaigns:active`): one that sends
    // nothing has nothing to pause, and its next outcome brings it back within a round.
    let all: Vec<String> = redis::cmd("ZRANGEBYSCORE")
        .arg(&keys.campaigns_active)
        .arg(since)
        .arg("+inf")
        .query_async(conn)
        .await?;
    let names: Vec<String> = all
        .into_iter()
        .filter(|c| campaigns.state(c) == State::Active)
        .filter(|c| rules.iter().any(|g| g.campaign == "*" || g.campaign == *c))
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    let mut p = redis::pipe();
    for c in &names {
        p.cmd("HMGET").arg(keys.stats(c)).arg(&GUARD_FIELDS[..]);
        p.cmd("HMGET")
            .arg(keys.guard_base(c))
            .arg(&GUARD_FIELDS[..]);
    }
    let replies: Vec<Vec<Option<i64>>> = p.query_async(conn).await?;
    let arr = |v: &[Option<i64>]| {
        let mut a = [0i64; 5];
        for (i, x) in v.iter().take(5).enumerate() {
            a[i] = x.unwrap_or(0);
        }
        a
    };
    for (c, pair) in names.iter().zip(replies.chunks(2)) {
        let (now, base) = (arr(&pair[0]), arr(pair.get(1).map_or(&[][..], |v| v)));
        let Some(t) = rules
            .iter()
            .filter(|g| g.campaign == "*" || g.campaign == *c)
            .find_map(|g| judge(g, &now, &base))
        else {
            continue;
        };
        let event = serde_json::json!({
            "type": "campaign_paused",
            "campaign": c,
            "reason": t.reason,
            "bounce_rate": (t.bounce_rate * 1e4).round() / 1e4,
            "complaint_rate": (t.complaint_rate * 1e6).round() / 1e6,
            "attempted": t.attempted,
            "delivered": t.delivered,
            "at": crate::queue::events::rfc3339_ms(now_ms()),
        });
        let tripped: i64 = trip_script
            .key(&keys.campaign_states)
            .key(&keys.events)
            .key(&keys.campaign_states_version)
            .arg(c)
            .arg(event.to_string())
            .arg(keys.events_max_len)
            .invoke_async(conn)
            .await?;
        if tripped == 1 {
            metrics.guard_trips.with_label_values(&[t.reason]).inc();
            tracing::warn!(campaign = %c, reason = t.reason, bounce_rate = t.bounce_rate, complaint_rate = t.complaint_rate, attempted = t.attempted, "guard tripped: campaign paused (paloma campaign resume to go on)");
        }
    }
    Ok(())
}

/// Takes the campaign's counters now as its guards' baseline (at resume).
pub async fn rebase(conn: &mut RedisConn, keys: &Keys, campaign: &str) -> redis::RedisResult<()> {
    let now: Vec<Option<i64>> = redis::cmd("HMGET")
        .arg(keys.stats(campaign))
        .arg(&GUARD_FIELDS[..])
        .query_async(conn)
        .await?;
    let mut c = redis::cmd("HSET");
    c.arg(keys.guard_base(campaign));
    for (f, v) in GUARD_FIELDS.iter().zip(now) {
        c.arg(*f).arg(v.unwrap_or(0));
    }
    c.query_async(conn).await
}

#[cfg(test)]
mod guard_tests {
    use super::*;
    use crate::config::{GuardRule, Percent};

    fn g() -> GuardRule {
        GuardRule {
            campaign: "*".into(),
            bounce_rate: Some(Percent(0.05)),
            complaint_rate: Some(Percent(0.003)),
            min_sent: 500,
        }
    }

    #[test]
    fn a_guard_judges_only_past_min_sent_and_since_the_last_resume() {
        // 499 attempted, all hard bounces: too few to judge.
        assert_eq!(judge(&g(), &[0, 499, 499, 0, 0], &[0; 5]), None);
        // 1000 attempted, 60 hard (6%): tripped on bounces.
        let t = judge(&g(), &[940, 60, 50, 10, 0], &[0; 5]).unwrap();
        assert_eq!(t.reason, "bounce_rate");
        assert!((t.bounce_rate - 0.06).abs() < 1e-9);
        // Soft bounces do not count: 60 bounced, 10 hard.
        assert_eq!(judge(&g(), &[940, 60, 10, 0, 0], &[0; 5]), None);
        // Complaints: 4 of 1000 delivered (0.4%) > 0.3%.
        assert_eq!(
            judge(&g(), &[1000, 0, 0, 0, 4], &[0; 5]).unwrap().reason,
            "complaint_rate"
        );
        // After a resume, only what came since counts.
        assert_eq!(
            judge(&g(), &[1200, 60, 60, 0, 0], &[1000, 60, 60, 0, 0]),
            None
        );
    }
}

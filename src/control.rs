//! Campaign control: pause, resume, cancel, across every daemon.
//!
//! A campaign's state is a field of `{prefix}campaign_states` (`paused` or `cancelled`;
//! absent: active), written by `paloma campaign …`. Each daemon keeps a copy, refreshed
//! every [`REFRESH`], so the per-job check costs no Redis round trip and a pause takes effect
//! within about a second everywhere.
//!
//! - A job of a **paused** campaign that reaches the intake (from the stream or the delayed
//!   set) or a worker before its SMTP transaction is *parked*: acknowledged and kept in
//!   `{prefix}parked:{campaign}` (a sorted set, score: when it was parked), with nothing
//!   sent, failed or expired. Resuming moves every parked job to the delayed set, due now,
//!   with its age (`delivery.max_age`) shifted by the time it spent parked: a job's age
//!   counts only while its campaign is active.
//! - A job of a **cancelled** campaign ends with a `suppressed` event, reason `cancelled`.
//!   Cancelling releases the parked jobs and brings the campaign's delayed jobs forward, so
//!   every job not yet sent ends that way promptly, wherever it waited.
//!
//! A daemon whose copy still said `paused` may park a job just after a resume or cancel;
//! each daemon, on seeing a campaign leave `paused`, releases its parked set again, so such a
//! job waits at most one refresh.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::queue::{now_ms, Keys};
use crate::store::replication::{AckError, Acks};
use crate::store::RedisConn;

/// How often each daemon re-reads the campaign states.
pub const REFRESH: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Active,
    Paused,
    Cancelled,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Active => "active",
            State::Paused => "paused",
            State::Cancelled => "cancelled",
        }
    }

    /// A field of `campaign_states` (anything else: active).
    pub fn parse(s: &str) -> State {
        match s {
            "paused" => State::Paused,
            "cancelled" => State::Cancelled,
            _ => State::Active,
        }
    }
}

/// This daemon's copy of the campaign states.
#[derive(Default)]
pub struct Campaigns {
    states: RwLock<HashMap<String, State>>,
    /// The `campaign_states:v` of the copy, and refreshes since the last full read: the
    /// hash is read again only when the counter moved (or every [`FULL_READ_EVERY`]
    /// refreshes, for a writer that does not bump it), so a refresh costs one GET however
    /// many campaigns are paused or cancelled.
    seen: std::sync::Mutex<(Option<(i64, i64)>, u32)>,
}

/// A full read of the states every this many refreshes (a minute), whatever the counter
/// and the count say (a writer that bumps neither: an older paloma turning a pause into a
/// cancel).
pub const FULL_READ_EVERY: u32 = 120;

impl Campaigns {
    pub fn state(&self, campaign: &str) -> State {
        let states = self.states.read().expect("states lock");
        if states.is_empty() {
            return State::Active;
        }
        states.get(campaign).copied().unwrap_or(State::Active)
    }

    /// How many campaigns are in `state` (not counting active ones).
    pub fn count(&self, state: State) -> usize {
        let states = self.states.read().expect("states lock");
        states.values().filter(|s| **s == state).count()
    }

    /// Re-reads the states when they changed (one GET of the counter; the HGETALL only
    /// after a change); returns the campaigns that were paused and no longer are.
    pub async fn refresh(
        &self,
        conn: &mut RedisConn,
        keys: &Keys,
    ) -> redis::RedisResult<Vec<String>> {
        // The counter, and the number of states (which an older writer changes too).
        let (version, len): (Option<i64>, i64) = redis::pipe()
            .cmd("GET")
            .arg(&keys.campaign_states_version)
            .cmd("HLEN")
            .arg(&keys.campaign_states)
            .query_async(conn)
            .await?;
        let now = (version.unwrap_or(0), len);
        {
            let mut seen = self.seen.lock().expect("seen lock");
            if seen.0 == Some(now) && seen.1 < FULL_READ_EVERY {
                seen.1 += 1;
                return Ok(Vec::new());
            }
        }
        let all: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(&keys.campaign_states)
            .query_async(conn)
            .await?;
        // The counter read before the hash: a change in between is read again next time.
        *self.seen.lock().expect("seen lock") = (Some(now), 0);
        let next: HashMap<String, State> = all
            .into_iter()
            .map(|(c, s)| (c, State::parse(&s)))
            .filter(|(_, s)| *s != State::Active)
            .collect();
        let mut states = self.states.write().expect("states lock");
        let unpaused = states
            .iter()
            .filter(|(c, s)| **s == State::Paused && next.get(*c) != Some(&State::Paused))
            .map(|(c, _)| c.clone())
            .collect();
        *states = next;
        Ok(unpaused)
    }

    /// Refreshes every [`REFRESH`] until `stop` turns true.
    pub async fn watch(
        self: Arc<Self>,
        mut conn: RedisConn,
        keys: Keys,
        metrics: Arc<crate::metrics::Metrics>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    match self.refresh(&mut conn, &keys).await {
                        // Jobs this daemon parked while its copy still said paused (the
                        // resume or cancel came between two refreshes) are released by this
                        // daemon itself, once it knows: none stays parked for ever.
                        Ok(unpaused) => {
                            for st in [State::Paused, State::Cancelled] {
                                metrics
                                    .campaigns_held
                                    .with_label_values(&[st.as_str()])
                                    .set(self.count(st) as i64);
                            }
                            for c in unpaused {
                                if let Err(e) = release(&mut conn, &keys, &c).await {
                                    metrics.redis_errors.inc();
                                    tracing::warn!(error = %e, campaign = %c, "releasing parked jobs failed");
                                }
                            }
                        }
                        Err(e) => {
                            metrics.redis_errors.inc();
                            tracing::debug!(error = %e, "reading campaign states failed; keeping the last ones");
                        }
                    }
                }
                _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
            }
        }
    }
}

/// What a pause, resume or cancel did.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Changed {
    pub campaign: String,
    /// The campaign's state now.
    pub state: State,
    /// Parked jobs sent on (resume) or brought forward to end (cancel).
    pub released: u64,
    /// Delayed jobs brought forward to end now (cancel).
    pub brought_forward: u64,
}

/// Pauses `campaign`: within about two refreshes no daemon starts another message of it.
/// Acknowledged as `acks` says (the state confirmed by the replicas).
pub async fn pause(
    conn: &mut RedisConn,
    keys: &Keys,
    acks: &Acks,
    path: &'static str,
    campaign: &str,
) -> Result<Changed, AckError> {
    set(conn, keys, campaign, State::Paused).await?;
    acks.barrier(conn, path).await?;
    Ok(Changed {
        campaign: campaign.to_string(),
        state: State::Paused,
        released: 0,
        brought_forward: 0,
    })
}

/// Resumes `campaign` (also undoes a cancel for jobs not yet ended): guards take a new
/// baseline and the parked jobs go out, paced by shaping as usual.
pub async fn resume(
    conn: &mut RedisConn,
    keys: &Keys,
    acks: &Acks,
    path: &'static str,
    campaign: &str,
) -> Result<Changed, AckError> {
    rebase(conn, keys, campaign).await?;
    set(conn, keys, campaign, State::Active).await?;
    let released = release(conn, keys, campaign).await?;
    acks.barrier(conn, path).await?;
    Ok(Changed {
        campaign: campaign.to_string(),
        state: State::Active,
        released,
        brought_forward: 0,
    })
}

/// Cancels `campaign`: every job of it not yet sent ends as suppressed (`cancelled`) as the
/// daemons reach it; parked and delayed jobs are brought forward so that happens now.
pub async fn cancel(
    conn: &mut RedisConn,
    keys: &Keys,
    acks: &Acks,
    path: &'static str,
    campaign: &str,
) -> Result<Changed, AckError> {
    set(conn, keys, campaign, State::Cancelled).await?;
    let released = release(conn, keys, campaign).await?;
    let brought_forward = bring_forward(conn, keys, campaign).await?;
    acks.barrier(conn, path).await?;
    Ok(Changed {
        campaign: campaign.to_string(),
        state: State::Cancelled,
        released,
        brought_forward,
    })
}

/// Sets a campaign's state.
pub async fn set(
    conn: &mut RedisConn,
    keys: &Keys,
    campaign: &str,
    state: State,
) -> redis::RedisResult<()> {
    let mut p = redis::pipe();
    p.atomic();
    if state == State::Active {
        p.cmd("HDEL").arg(&keys.campaign_states).arg(campaign);
    } else {
        p.cmd("HSET")
            .arg(&keys.campaign_states)
            .arg(campaign)
            .arg(state.as_str());
    }
    p.ignore();
    // Daemons re-read the states when this moves.
    p.cmd("INCR").arg(&keys.campaign_states_version).ignore();
    p.query_async(conn).await
}

/// Moves every parked job of `campaign` to the delayed set, due now, its age shifted by
/// the time it was parked. Returns how many.
pub async fn release(conn: &mut RedisConn, keys: &Keys, campaign: &str) -> redis::RedisResult<u64> {
    release_set(conn, &keys.parked(campaign), &keys.scheduled).await
}

/// Moves every member of the set `from` (parked or held jobs, scored by when they were put
/// there) to the delayed set `scheduled`, due now, each job's age start shifted by the time
/// it waited. Returns how many.
pub async fn release_set(
    conn: &mut RedisConn,
    from: &str,
    scheduled: &str,
) -> redis::RedisResult<u64> {
    let script = redis::Script::new(include_str!("control/release.lua"));
    let mut moved = 0;
    loop {
        let n: u64 = script
            .key(from)
            .key(scheduled)
            .arg(now_ms())
            .arg(1000)
            .invoke_async(conn)
            .await?;
        moved += n;
        if n < 1000 {
            return Ok(moved);
        }
    }
}

/// Brings every job of `campaign` waiting in the delayed set forward to now (so that a
/// cancelled campaign's retries end at once, not when they were due). Returns how many.
pub async fn bring_forward(
    conn: &mut RedisConn,
    keys: &Keys,
    campaign: &str,
) -> redis::RedisResult<u64> {
    let mut cursor = 0u64;
    let mut moved = 0;
    let now = now_ms();
    loop {
        let (next, items): (u64, Vec<Vec<u8>>) = redis::cmd("ZSCAN")
            .arg(&keys.scheduled)
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        // Member, score pairs: only members are looked at.
        let mut p = redis::pipe();
        let mut batch = 0;
        for m in items.iter().step_by(2) {
            if member_campaign(m).as_deref() == Some(campaign) {
                p.cmd("ZADD")
                    .arg(&keys.scheduled)
                    .arg("XX")
                    .arg(now)
                    .arg(m.as_slice())
                    .ignore();
                batch += 1;
            }
        }
        // A page without a job of the campaign: nothing to send (an empty pipeline is an
        // error, "empty command", that would fail the whole cancel).
        if batch > 0 {
            p.query_async::<()>(conn).await?;
            moved += batch;
        }
        if next == 0 {
            return Ok(moved);
        }
        cursor = next;
    }
}

/// The campaign of a delayed-set member `attempt|first_at|job`.
fn member_campaign(member: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct C {
        campaign: Option<String>,
    }
    let job = member.splitn(3, |&b| b == b'|').nth(2)?;
    serde_json::from_slice::<C>(job).ok()?.campaign
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_read_back_and_unknown_ones_are_active() {
        let c = Campaigns::default();
        assert_eq!(c.state("x"), State::Active);
        c.states
            .write()
            .unwrap()
            .insert("spring".into(), State::parse("paused"));
        assert_eq!(c.state("spring"), State::Paused);
        assert_eq!(c.state("autumn"), State::Active);
        assert_eq!(State::parse("cancelled"), State::Cancelled);
        assert_eq!(State::parse("nonsense"), State::Active);
        assert_eq!(
            member_campaign(br#"2|17|{"id":"a","campaign":"spring"}"#).as_deref(),
            Some("spring")
        );
        assert_eq!(member_campaign(b"garbage"), None);
    }
}

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
    mut stop: watch::Receiver<bool>,
) {
    if rules.is_empty() {
        return;
    }
    let trip_script = redis::Script::new(include_str!("control/trip.lua"));
    let mut tick = tokio::time::interval(GUARD_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Campaigns with an outcome since `from` are judged: at start those of the last
    // ACTIVE_WINDOW, then those since the last round (less a slack for batches written
    // late). A campaign whose counters did not move keeps its verdict.
    let mut from = now_ms() - ACTIVE_WINDOW.as_millis() as i64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
        }
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

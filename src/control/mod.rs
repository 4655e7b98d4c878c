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
//!
//! The automatic guards that pause a campaign whose bounce or complaint rate goes wrong are
//! [`guards`]; both write states through [`set`].

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;

pub mod admin_bounce;
pub mod domains;
pub mod guards;
pub mod queue;

pub use guards::{guard, ACTIVE_WINDOW, GUARD_EVERY};

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
        stop: watch::Receiver<bool>,
    ) {
        let mut ticker = crate::ticker::Ticker::new(REFRESH, stop);
        while ticker.tick().await {
            match self.refresh(&mut conn, &keys).await {
                // Jobs this daemon parked while its copy still said paused (the resume or
                // cancel came between two refreshes) are released by this daemon itself,
                // once it knows: none stays parked for ever.
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
    guards::rebase(conn, keys, campaign).await?;
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
    let script = redis::Script::new(include_str!("scripts/release.lua"));
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
    bring_forward_where(conn, keys, now_ms(), |job| {
        job_campaign(job).as_deref() == Some(campaign)
    })
    .await
}

/// Brings every job in the delayed set whose JSON `wanted` accepts forward to `due` (ms),
/// a page of the set at a time (memory stays flat). Returns how many.
pub async fn bring_forward_where(
    conn: &mut RedisConn,
    keys: &Keys,
    due: i64,
    wanted: impl Fn(&[u8]) -> bool,
) -> redis::RedisResult<u64> {
    let mut cursor = 0u64;
    let mut moved = 0;
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
            let job = m.splitn(3, |&b| b == b'|').nth(2).unwrap_or_default();
            if wanted(job) {
                p.cmd("ZADD")
                    .arg(&keys.scheduled)
                    .arg("XX")
                    .arg(due)
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
/// The campaign of a job's JSON.
fn job_campaign(job: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct C {
        campaign: Option<String>,
    }
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
            job_campaign(br#"{"id":"a","campaign":"spring"}"#).as_deref(),
            Some("spring")
        );
        assert_eq!(job_campaign(b"garbage"), None);
    }
}

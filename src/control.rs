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

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::queue::{now_ms, Keys};
use crate::store::RedisConn;

/// How often each daemon re-reads the campaign states.
pub const REFRESH: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
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

    fn parse(s: &str) -> State {
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
}

impl Campaigns {
    pub fn state(&self, campaign: &str) -> State {
        let states = self.states.read().expect("states lock");
        if states.is_empty() {
            return State::Active;
        }
        states.get(campaign).copied().unwrap_or(State::Active)
    }

    /// Re-reads every state (one HGETALL).
    pub async fn refresh(&self, conn: &mut RedisConn, keys: &Keys) -> redis::RedisResult<()> {
        let all: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(&keys.campaign_states)
            .query_async(conn)
            .await?;
        let next: HashMap<String, State> = all
            .into_iter()
            .map(|(c, s)| (c, State::parse(&s)))
            .filter(|(_, s)| *s != State::Active)
            .collect();
        *self.states.write().expect("states lock") = next;
        Ok(())
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
                    if let Err(e) = self.refresh(&mut conn, &keys).await {
                        metrics.redis_errors.inc();
                        tracing::debug!(error = %e, "reading campaign states failed; keeping the last ones");
                    }
                }
                _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
            }
        }
    }
}

/// Sets a campaign's state.
pub async fn set(
    conn: &mut RedisConn,
    keys: &Keys,
    campaign: &str,
    state: State,
) -> redis::RedisResult<()> {
    let mut c = match state {
        State::Active => redis::cmd("HDEL"),
        _ => redis::cmd("HSET"),
    };
    c.arg(&keys.campaign_states).arg(campaign);
    if state != State::Active {
        c.arg(state.as_str());
    }
    c.query_async(conn).await
}

/// Moves every parked job of `campaign` to the delayed set, due now, its age shifted by
/// the time it was parked. Returns how many.
pub async fn release(conn: &mut RedisConn, keys: &Keys, campaign: &str) -> redis::RedisResult<u64> {
    let script = redis::Script::new(include_str!("control/release.lua"));
    let mut moved = 0;
    loop {
        let n: u64 = script
            .key(keys.parked(campaign))
            .key(&keys.scheduled)
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
        for m in items.iter().step_by(2) {
            if member_campaign(m).as_deref() == Some(campaign) {
                p.cmd("ZADD")
                    .arg(&keys.scheduled)
                    .arg("XX")
                    .arg(now)
                    .arg(m.as_slice())
                    .ignore();
                moved += 1;
            }
        }
        p.query_async::<()>(conn).await?;
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

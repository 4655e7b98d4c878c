//! Where a job goes next: the one place that decides it. Each way a job can leave a
//! daemon's hands is a named constructor of the [`Record`] the recorder writes (event,
//! idempotency state, delayed set, dead letter, suppression, stats, ack), so a reader sees
//! every possible next state here and nowhere else. Pure: `now` is passed in, so the
//! decisions are tested without Redis or a clock.

use std::time::Duration;

use crate::config::DeliverySettings;
use crate::job::{Job, JobError, JobIdentity};
use crate::outcome::Outcome;
use crate::queue::events::{rfc3339_ms, Event, EventKind};
use crate::queue::idem::Idem;
use crate::queue::scheduler::{self, Why};
use crate::queue::Entry;
use crate::workflow::KeepJobs;

/// A job going back to the delayed set.
#[derive(Debug)]
pub struct Schedule {
    /// When it is due (unix ms).
    pub due: i64,
    /// The member of the delayed set (see [`crate::queue::scheduler::member`]).
    pub member: String,
    /// The campaign it is counted under, should it die there.
    pub campaign: String,
}

/// Everything one job's outcome writes.
#[derive(Debug, Default)]
pub struct Record {
    /// Stream entry to acknowledge and delete.
    pub ack: Option<String>,
    /// Event JSON for `{prefix}events`.
    pub event: Option<String>,
    /// Job id whose idempotency record is set to this state (`Done` or `Scheduled`), or
    /// deleted (None).
    pub idem: Option<(String, Option<Idem<'static>>)>,
    /// For the delayed set.
    pub schedule: Option<Schedule>,
    /// `(job as received, error)` for `{prefix}dead`.
    pub dead: Option<(Vec<u8>, String)>,
    /// `(address, reason)` to add to the suppression list (kept if already there).
    pub suppress: Option<(String, &'static str)>,
    /// `(campaign, outcome)` for stats and metrics; `first` counts the job as accepted.
    pub stat: Option<(String, EventKind)>,
    pub first: bool,
    /// One more counter of `stat`'s campaign (`bounced_hard`, which guards read).
    pub stat_extra: Option<&'static str>,
    /// A job kept aside: a paused campaign's (see [`crate::control`]) or one held until
    /// its experiment's decision (see [`crate::experiment`]).
    pub park: Option<Park>,
    /// The experiment variant of `stat`'s job: its outcome is counted for the variant too.
    pub variant: Option<String>,
    /// The touch bucket of `stat`'s job (a marketing job): its outcome is counted for the
    /// bucket too.
    pub touch: Option<&'static str>,
    /// A marketing message delivered to this address: one more for this month's counter.
    pub touched: Option<String>,
    /// The recipient's domain, for `stat`'s outcome per domain (the campaign report).
    pub domain: Option<String>,
    /// `(key, value, ttl secs)` to SET with the outcome (a delivered job's JSON, kept for
    /// workflow follow-ups).
    pub store: Option<(String, Vec<u8>, u64)>,
}

/// A job kept aside in a sorted set (score: when), as a delayed-set member.
#[derive(Debug, Clone, PartialEq)]
pub struct Park {
    pub campaign: String,
    pub at: i64,
    pub member: String,
    /// Held for an experiment (`held:{c}`), not parked for a pause (`parked:{c}`).
    pub held: bool,
}

/// When a deferred job is tried again, and when it gives up (`[delivery]`).
#[derive(Debug, Clone)]
pub struct Retry {
    intervals: Vec<Duration>,
    max_age: Duration,
}

impl Retry {
    pub fn new(d: &DeliverySettings) -> Self {
        Retry {
            intervals: d.retry_intervals.iter().map(|i| i.get()).collect(),
            max_age: d.max_age.get(),
        }
    }

    /// The due time (ms) of attempt `attempt` (1 for the first retry) after a deferral at
    /// `now`, with `jitter` (a factor, ±10% in use) so a burst of deferrals does not come
    /// back as one burst; None when it would fall past `max_age` since `first_at`.
    pub fn next(&self, attempt: u32, first_at: i64, now: i64, jitter: f64) -> Option<i64> {
        let i = (attempt as usize)
            .saturating_sub(1)
            .min(self.intervals.len() - 1);
        let due = now + (self.intervals[i].as_secs_f64() * jitter * 1000.0) as i64;
        (due.saturating_sub(first_at) <= self.max_age.as_millis() as i64).then_some(due)
    }
}

/// The campaign a dead job is counted under: its own when it is a valid campaign id, else
/// `(none)` / `(invalid)` — a stream of bad jobs with random campaigns must not grow the
/// metrics and the campaigns set without bound.
pub fn stat_campaign(c: &str) -> String {
    if c.is_empty() {
        "(none)".into()
    } else if crate::job::CampaignId::parse(c.to_string()).is_err() {
        "(invalid)".into()
    } else {
        c.to_string()
    }
}

/// A job's terminal record: event, idempotency `Done`, stats.
fn ended(entry: &Entry, ident: &JobIdentity, kind: EventKind, event: String) -> Record {
    Record {
        ack: Some(entry.id.clone()),
        event: Some(event),
        idem: Some((ident.id.clone(), Some(Idem::Done))),
        stat: Some((ident.campaign.clone(), kind)),
        first: entry.attempt == 0,
        variant: ident.variant.clone(),
        touch: ident.touch,
        domain: domain_of(&ident.to),
        ..Default::default()
    }
}

/// The lower-cased domain of an address, for the per-domain counters.
fn domain_of(to: &str) -> Option<String> {
    to.rsplit_once('@')
        .map(|(_, d)| d.to_ascii_lowercase())
        .filter(|d| !d.is_empty())
}

impl Record {
    /// Only the acknowledgement: a duplicate job id, or an entry deleted while pending.
    pub fn ack_only(entry_id: String) -> Record {
        Record {
            ack: Some(entry_id),
            ..Default::default()
        }
    }

    /// Ends without being sent: the suppression list, a frequency cap.
    pub fn suppressed(entry: &Entry, job: &Job, reason: &str) -> Record {
        let ident = job.identity();
        let mut ev = Event::of(EventKind::Suppressed, &ident);
        ev.reason = Some(reason);
        let event = ev.to_json();
        ended(entry, &ident, EventKind::Suppressed, event)
    }

    /// A dead letter: invalid, unrenderable, or a paloma bug. `claimed`: its id was claimed
    /// (the record is then deleted, so the job may be fixed and enqueued again).
    pub fn dead(entry: &Entry, err: &JobError, ident: &JobIdentity, claimed: bool) -> Record {
        let error = err.to_string();
        let mut ev = Event::of(EventKind::Dead, ident);
        ev.error = Some(&error);
        let event = ev.to_json();
        Record {
            ack: Some(entry.id.clone()),
            event: Some(event),
            idem: claimed.then(|| (ident.id.clone(), None)),
            dead: Some((entry.job.clone(), error)),
            stat: Some((stat_campaign(&ident.campaign), EventKind::Dead)),
            first: entry.attempt == 0,
            ..Default::default()
        }
    }

    /// Back to the delayed set until `due` without an attempt (its `send_at`, a rate, a
    /// suspended site): no event, the attempt count unchanged. `first_at`: where its age
    /// counts from (`max_age`); `why`: kept with it for `paloma queue`.
    pub fn later(entry: &Entry, ident: &JobIdentity, due: i64, first_at: i64, why: Why) -> Record {
        Record {
            ack: Some(entry.id.clone()),
            schedule: Some(Schedule {
                due,
                member: scheduler::member(
                    entry.attempt,
                    entry.source.as_deref(),
                    Some(why),
                    first_at,
                    &entry.job,
                ),
                campaign: stat_campaign(&ident.campaign),
            }),
            idem: Some((ident.id.clone(), Some(Idem::Scheduled))),
            ..Default::default()
        }
    }

    /// Kept aside while its campaign is paused (see [`crate::control`]): acknowledged,
    /// parked with its attempt count and age start, nothing sent and no event.
    pub fn parked(entry: &Entry, ident: &JobIdentity, now: i64) -> Record {
        Self::kept(entry, ident, now, false)
    }

    /// Held until its experiment is decided (see [`crate::experiment`]): as parked, in the
    /// experiment's own set.
    pub fn held(entry: &Entry, ident: &JobIdentity, now: i64) -> Record {
        Self::kept(entry, ident, now, true)
    }

    fn kept(entry: &Entry, ident: &JobIdentity, now: i64, held: bool) -> Record {
        Record {
            ack: Some(entry.id.clone()),
            park: Some(Park {
                campaign: ident.campaign.clone(),
                at: now,
                member: scheduler::member(
                    entry.attempt,
                    entry.source.as_deref(),
                    None,
                    entry.first_at,
                    &entry.job,
                ),
                held,
            }),
            idem: Some((ident.id.clone(), Some(Idem::Scheduled))),
            ..Default::default()
        }
    }

    /// The record of a delivery attempt: delivered or bounced (ends the job; a hard bounce
    /// suppresses the address), deferred (back to the delayed set for the next retry) or,
    /// past `max_age`, failed. `keep`: whether the job is kept for workflow follow-ups.
    /// `source`: the egress source it went out through (a retry prefers it).
    #[allow(clippy::too_many_arguments)]
    pub fn attempted(
        entry: &Entry,
        ident: &JobIdentity,
        source: Option<&str>,
        outcome: Outcome,
        retry: &Retry,
        keep: &KeepJobs,
        now: i64,
        jitter: f64,
    ) -> Record {
        let (id, campaign, to) = (
            ident.id.as_str(),
            ident.campaign.as_str(),
            ident.to.as_str(),
        );
        match outcome {
            Outcome::Delivered { response } => {
                let mut ev = Event::of(EventKind::Delivered, ident);
                ev.response = Some(&response);
                let mut record = ended(entry, ident, EventKind::Delivered, ev.to_json());
                record.store = keep.store(EventKind::Delivered, id, campaign, &entry.job);
                record.touched = ident.touch.map(|_| to.to_string());
                record
            }
            Outcome::Bounced(b) => {
                let mut ev = Event::of(EventKind::Bounced, ident);
                ev.code = Some(b.code);
                ev.enhanced = Some(&b.enhanced);
                ev.class = Some(b.class.as_str());
                ev.response = Some(&b.response);
                let mut record = ended(entry, ident, EventKind::Bounced, ev.to_json());
                record.store = keep.store(EventKind::Bounced, id, campaign, &entry.job);
                if b.class.is_hard() {
                    record.suppress = Some((to.to_string(), "bounced"));
                    record.stat_extra = Some("bounced_hard");
                }
                record
            }
            Outcome::Deferred { response } => {
                let attempt = entry.attempt.saturating_add(1);
                let Some(retry_at) = retry.next(attempt, entry.first_at, now, jitter) else {
                    let mut ev = Event::of(EventKind::Failed, ident);
                    ev.attempt = Some(attempt);
                    ev.response = Some(&response);
                    return ended(entry, ident, EventKind::Failed, ev.to_json());
                };
                let mut ev = Event::of(EventKind::Deferred, ident);
                ev.attempt = Some(attempt);
                ev.retry_at = Some(rfc3339_ms(retry_at));
                ev.response = Some(&response);
                Record {
                    ack: Some(entry.id.clone()),
                    event: Some(ev.to_json()),
                    idem: Some((id.to_string(), Some(Idem::Scheduled))),
                    schedule: Some(Schedule {
                        due: retry_at,
                        member: scheduler::member(
                            attempt,
                            source,
                            Some(Why::Retry),
                            entry.first_at,
                            &entry.job,
                        ),
                        campaign: stat_campaign(campaign),
                    }),
                    stat: Some((campaign.to_string(), EventKind::Deferred)),
                    first: entry.attempt == 0,
                    variant: ident.variant.clone(),
                    touch: ident.touch,
                    domain: domain_of(to),
                    ..Default::default()
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(attempt: u32, first_at: i64) -> Entry {
        Entry {
            id: "1-0".into(),
            job: br#"{"id":"j"}"#.to_vec(),
            attempt,
            first_at,
            source: None,
        }
    }

    fn ident() -> JobIdentity {
        JobIdentity {
            id: "j".into(),
            campaign: "spring".into(),
            to: "a@b.test".into(),
            variant: None,
            touch: None,
        }
    }

    fn retry() -> Retry {
        Retry::new(&DeliverySettings {
            retry_intervals: vec!["1m".parse().unwrap(), "10m".parse().unwrap()],
            max_age: "1h".parse().unwrap(),
            ..Default::default()
        })
    }

    fn deferred() -> Outcome {
        Outcome::Deferred {
            response: "451 later".into(),
        }
    }

    #[test]
    fn a_deferral_goes_back_for_the_next_interval_and_the_last_interval_repeats() {
        let keep = KeepJobs::default();
        let r = Record::attempted(
            &entry(0, 0),
            &ident(),
            None,
            deferred(),
            &retry(),
            &keep,
            0,
            1.0,
        );
        let s = r.schedule.expect("scheduled");
        assert_eq!(s.due, 60_000);
        assert!(
            s.member.starts_with("1#r|0|"),
            "attempt counted, age kept, waiting for a retry"
        );
        assert_eq!(r.stat, Some(("spring".into(), EventKind::Deferred)));
        assert_eq!(r.idem, Some(("j".into(), Some(Idem::Scheduled))));
        assert!(r.first);
        let r = Record::attempted(
            &entry(5, 0),
            &ident(),
            None,
            deferred(),
            &retry(),
            &keep,
            0,
            1.0,
        );
        assert_eq!(r.schedule.expect("scheduled").due, 600_000);
        assert!(!r.first, "a retry is not counted as accepted again");
    }

    #[test]
    fn a_deferral_past_max_age_fails_the_job() {
        let keep = KeepJobs::default();
        let now = 3_500_000; // the 10 minutes more would end past the hour
        let r = Record::attempted(
            &entry(3, 0),
            &ident(),
            None,
            deferred(),
            &retry(),
            &keep,
            now,
            1.0,
        );
        assert!(r.schedule.is_none());
        assert_eq!(r.stat, Some(("spring".into(), EventKind::Failed)));
        assert_eq!(r.idem, Some(("j".into(), Some(Idem::Done))));
        assert!(r.event.unwrap().contains(r#""type":"failed""#));
    }

    #[test]
    fn only_a_hard_bounce_suppresses() {
        let keep = KeepJobs::default();
        let hard = Outcome::bounce(550, "550 5.1.1 no such user".into());
        let r = Record::attempted(&entry(0, 0), &ident(), None, hard, &retry(), &keep, 0, 1.0);
        assert_eq!(r.suppress, Some(("a@b.test".into(), "bounced")));
        let soft = Outcome::bounce(552, "552 5.2.2 mailbox full".into());
        let r = Record::attempted(&entry(0, 0), &ident(), None, soft, &retry(), &keep, 0, 1.0);
        assert_eq!(r.suppress, None);
        assert_eq!(r.stat, Some(("spring".into(), EventKind::Bounced)));
    }

    #[test]
    fn dead_jobs_are_counted_under_a_bounded_campaign() {
        let mut id = ident();
        id.campaign = "bad campaign!".into();
        let r = Record::dead(&entry(0, 0), &JobError::Internal("x".into()), &id, true);
        assert_eq!(r.stat, Some(("(invalid)".into(), EventKind::Dead)));
        assert_eq!(
            r.idem,
            Some(("j".into(), None)),
            "deleted: may be enqueued again"
        );
        id.campaign.clear();
        let r = Record::dead(&entry(0, 0), &JobError::Internal("x".into()), &id, false);
        assert_eq!(r.stat, Some(("(none)".into(), EventKind::Dead)));
        assert_eq!(r.idem, None, "never claimed: nothing to delete");
    }

    #[test]
    fn a_parked_job_keeps_its_attempt_and_age_and_writes_no_event() {
        let r = Record::parked(&entry(3, 11), &ident(), 500);
        assert!(r.event.is_none() && r.stat.is_none() && r.schedule.is_none());
        let park = r.park.unwrap();
        assert_eq!(
            (park.campaign.as_str(), park.at, park.held),
            ("spring", 500, false)
        );
        assert!(park.member.starts_with("3|11|"));
        assert!(
            Record::held(&entry(0, 11), &ident(), 500)
                .park
                .unwrap()
                .held
        );
        assert_eq!(r.idem, Some(("j".into(), Some(Idem::Scheduled))));
    }

    #[test]
    fn waiting_keeps_the_attempt_and_writes_no_event() {
        let r = Record::later(&entry(2, 7), &ident(), 99, 7, Why::Shaping);
        assert!(r.event.is_none() && r.stat.is_none());
        let s = r.schedule.unwrap();
        assert_eq!((s.due, s.member.starts_with("2#p|7|")), (99, true));
    }
}

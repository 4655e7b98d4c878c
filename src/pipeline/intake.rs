//! Stage 1: from the sends stream to the workers. Reads (or reclaims) a batch, validates each
//! job, claims its id and looks up its recipient's suppression in one round trip per batch,
//! then decides what may go now: duplicates are acked, suppressed and capped recipients end
//! here, `send_at` jobs wait in the delayed set, the rest go to a worker.

use std::sync::Arc;

use tokio::sync::{watch, Semaphore};

use super::Stages;
use crate::control::State;
use crate::experiment::Assign;
use crate::job::{Job, JobError};
use crate::pipeline::recorder::Record;
use crate::policy::caps::Reserved;
use crate::policy::suppression;
use crate::queue::scheduler::Why;
use crate::queue::sends::{Claim, Claimed, SendsReader};
use crate::queue::{now_ms, Entry};
use crate::retry::Backoff;

/// Runs until `stop` turns true (or the future is dropped: an entry read but not handed to a
/// worker stays pending in Redis and is reclaimed, never lost).
pub async fn run(
    intake: &mut SendsReader,
    stages: Arc<Stages>,
    permits: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut entries = Vec::with_capacity(intake.stream.batch());
    let mut gone = Vec::new();
    let mut backoff = Backoff::reads();
    let also: Vec<(&str, &str)> = stages
        .also_prune
        .iter()
        .map(|(s, g)| (s.as_str(), g.as_str()))
        .collect();
    while !*stop.borrow() {
        entries.clear();
        gone.clear();
        let mut reclaimed = 0;
        if intake.stream.reclaim_due() {
            if let Err(e) = intake
                .reclaim(&stages.leases, &mut entries, &mut gone)
                .await
            {
                tracing::warn!(error = %e, "reclaiming pending jobs failed");
            }
            reclaimed = entries.len();
            stages.metrics.jobs_reclaimed.inc_by(reclaimed as u64);
            match intake.prune_consumers(&also).await {
                Ok(0) => {}
                Ok(n) => {
                    stages.metrics.consumers_removed.inc_by(n as u64);
                    tracing::info!(count = n, "removed consumers of stopped daemons");
                }
                Err(e) => tracing::debug!(error = %e, "pruning consumers failed; next round"),
            }
            if reclaimed > 0 {
                tracing::info!(
                    count = reclaimed,
                    "reclaimed pending jobs from a stopped consumer"
                );
            }
        }
        if reclaimed == 0 {
            if let Err(e) = intake.read(&mut entries, &mut gone).await {
                stages.metrics.redis_errors.inc();
                tracing::warn!(error = %e, "reading the sends stream failed; retrying");
                tokio::time::sleep(backoff.fail()).await;
                continue;
            }
            backoff.reset();
        }
        stages.leases.hold(
            entries
                .iter()
                .map(|e| e.id.as_str())
                .chain(gone.iter().map(String::as_str)),
        );
        for id in gone.drain(..) {
            stages.recorder.send(Record::ack_only(id)).await;
        }
        if entries.is_empty() {
            continue;
        }
        stages.metrics.jobs_read.inc_by(entries.len() as u64);
        if let Some(last) = entries.last() {
            let lag = (now_ms() - Entry::id_millis(&last.id)).max(0) as f64 / 1000.0;
            stages.metrics.queue_lag.set(lag);
        }
        dispatch(intake, &stages, &permits, std::mem::take(&mut entries)).await;
    }
    Ok(())
}

/// Retries a Redis call until it answers (the intake cannot go on without it), counting
/// each failure.
async fn until_ok<T, F, Fut>(stages: &Stages, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = redis::RedisResult<T>>,
{
    let mut backoff = Backoff::writes();
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                stages.metrics.redis_errors.inc();
                tracing::warn!(error = %e, "{what} failed; retrying");
                tokio::time::sleep(backoff.fail()).await;
            }
        }
    }
}

/// How often Redis may refuse a batch's writes (answer with an error, as against not
/// answering) before the batch's jobs are dead-lettered with the reason: a key of the wrong
/// type that another tool wrote fails the same way every time, and retrying it for ever
/// would hold the batch, its consumer and every job behind it.
const REFUSALS: u32 = 5;

/// [`until_ok`] with a bound on refusals ([`REFUSALS`]); outages are still waited out.
async fn until_ok_or_refused<T, F, Fut>(stages: &Stages, what: &str, mut f: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = redis::RedisResult<T>>,
{
    let mut refusals = 0;
    let mut backoff = Backoff::writes();
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                stages.metrics.redis_errors.inc();
                if crate::store::is_refusal(&e) {
                    refusals += 1;
                    if refusals >= REFUSALS {
                        tracing::warn!(error = %e, "{what} refused {refusals} times; dead-lettering the batch");
                        return Err(format!("{what} refused by Redis: {e}"));
                    }
                }
                tracing::warn!(error = %e, "{what} failed; retrying");
                tokio::time::sleep(backoff.fail()).await;
            }
        }
    }
}

/// Validates and claims a batch, then hands each job that may go now to a worker.
async fn dispatch(
    intake: &mut SendsReader,
    stages: &Arc<Stages>,
    permits: &Arc<Semaphore>,
    entries: Vec<Entry>,
) {
    let mut valid: Vec<(Entry, Job)> = Vec::with_capacity(entries.len());
    for e in entries {
        match Job::parse(&e.job, stages.max_job_bytes) {
            Ok(job) => valid.push((e, job)),
            Err((err, ident)) => {
                stages
                    .recorder
                    .send(Record::dead(&e, &err, &ident, false))
                    .await
            }
        }
    }
    let ids: Vec<(&str, &str, &str)> = valid
        .iter()
        .map(|(e, j)| (j.id.as_str(), e.id.as_str(), j.to.as_str()))
        .collect();
    let mut backoff = Backoff::writes();
    let claims = loop {
        match intake.claim(&ids).await {
            Ok(c) => break c,
            Err(e) => {
                stages.metrics.redis_errors.inc();
                tracing::warn!(error = %e, "claiming job ids failed; retrying");
                tokio::time::sleep(backoff.fail()).await;
            }
        }
    };
    drop(ids);
    let now = now_ms();
    let mut ready = Vec::with_capacity(valid.len());
    for ((entry, mut job), claimed) in valid.into_iter().zip(claims) {
        let Claimed {
            claim,
            suppressed,
            previous,
        } = claimed;
        if claim == Claim::Duplicate {
            stages.metrics.jobs_duplicate.inc();
            tracing::debug!(id = job.id.as_str(), "duplicate job id; skipped");
            stages.recorder.send(Record::ack_only(entry.id)).await;
            continue;
        }
        match stages.campaigns.state(job.campaign.as_str()) {
            State::Active => {}
            State::Cancelled => {
                let record = Record::suppressed(&entry, &job, "cancelled");
                stages.recorder.send(record).await;
                continue;
            }
            State::Paused => {
                stages.metrics.jobs_parked.inc();
                let record = Record::parked(&entry, &job.identity(), now);
                stages.recorder.send(record).await;
                continue;
            }
        }
        if let Some(reason) = suppressed.filter(|r| suppression::blocks(r, job.transactional)) {
            let reason = if suppression::REASONS.contains(&reason.as_str()) {
                reason.as_str()
            } else {
                "manual"
            };
            stages
                .recorder
                .send(Record::suppressed(&entry, &job, reason))
                .await;
            continue;
        }
        if let Some(at) = job.send_at.filter(|&t| t > now + 250) {
            // The job's age (max_age) counts from its send time, not from the enqueue.
            let record = Record::later(
                &entry,
                &job.identity(),
                at,
                entry.first_at.max(at),
                Why::Scheduled,
            );
            stages.recorder.send(record).await;
            continue;
        }
        if !job.transactional {
            job.touch = Some(previous.saturating_add(1));
        }
        match stages
            .experiments
            .assign(job.campaign.as_str(), job.to.as_str(), entry.attempt)
        {
            None => {}
            Some(Assign::Send(variant)) => variant.apply(&mut job),
            Some(Assign::Hold) => {
                let record = Record::held(&entry, &job.identity(), now);
                stages.recorder.send(record).await;
                continue;
            }
        }
        ready.push((entry, job));
    }
    let ready = apply_caps(stages, ready).await;
    if let Some(rp) = &stages.return_paths {
        write_return_paths(stages, rp, &ready).await;
    }
    for (entry, job) in ready {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closes");
        tokio::spawn(super::worker::work(stages.clone(), entry, job, permit));
    }
}

/// With VERP on, each job about to be sent is matched to its token for
/// `bounces.token_ttl` (with its variant and touch, so that a late bounce or a complaint is
/// counted where the job belongs): written before anything is sent, one round trip per batch.
async fn write_return_paths(
    stages: &Stages,
    rp: &crate::bounces::ReturnPaths,
    ready: &[(Entry, Job)],
) {
    if ready.is_empty() {
        return;
    }
    let mut p = redis::pipe();
    for (_, j) in ready {
        let v = crate::bounces::TokenJob {
            id: j.id.as_str().to_string(),
            campaign: j.campaign.as_str().to_string(),
            to: j.to.as_str().to_string(),
            variant: j.variant.clone(),
            touch: j
                .touch
                .map(|t| crate::policy::touches::bucket(t).to_string()),
        };
        p.cmd("SET")
            .arg(stages.keys.return_path(&rp.key(j.id.as_str())))
            .arg(serde_json::to_string(&v).unwrap_or_default())
            .arg("EX")
            .arg(rp.ttl_secs)
            .ignore();
    }
    until_ok(stages, "writing return-path tokens", || {
        let mut redis = stages.redis.clone();
        let p = &p;
        async move { p.query_async::<()>(&mut redis).await }
    })
    .await
}

/// Frequency caps: reserves each marketing job's slot; a recipient over a cap gets a
/// `suppressed` event (reason `frequency_cap`) instead of the message.
async fn apply_caps(stages: &Stages, ready: Vec<(Entry, Job)>) -> Vec<(Entry, Job)> {
    let Some(caps) = &stages.caps else {
        return ready;
    };
    let marketing: Vec<(&str, &str)> = ready
        .iter()
        .filter(|(_, j)| !j.transactional)
        .map(|(_, j)| (j.to.as_str(), j.id.as_str()))
        .collect();
    let allowed = until_ok_or_refused(stages, "checking frequency caps", || {
        let mut redis = stages.redis.clone();
        let marketing = &marketing;
        async move { caps.reserve(&mut redis, &stages.keys, marketing).await }
    })
    .await;
    let n = marketing.len();
    drop(marketing);
    let mut allowed = match allowed {
        Ok(a) => a.into_iter(),
        Err(reason) => (0..n)
            .map(|_| Reserved::Refused(reason.clone()))
            .collect::<Vec<_>>()
            .into_iter(),
    };
    let mut out = Vec::with_capacity(ready.len());
    for (entry, job) in ready {
        if job.transactional {
            out.push((entry, job));
            continue;
        }
        let record = match allowed.next().unwrap_or(Reserved::Go) {
            Reserved::Go => {
                out.push((entry, job));
                continue;
            }
            Reserved::Capped => Record::suppressed(&entry, &job, "frequency_cap"),
            Reserved::Refused(reason) => {
                Record::dead(&entry, &JobError::Store(reason), &job.identity(), true)
            }
        };
        stages.recorder.send(record).await;
    }
    out
}

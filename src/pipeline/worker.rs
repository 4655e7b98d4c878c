//! Stage 2: one job's attempt, in order: an operator's bounce directive → route → shape →
//! render → send → react, then the
//! record [`super::next`] decides, to the recorder.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use futures::FutureExt;
use rand::Rng;
use tokio::sync::OwnedSemaphorePermit;

use super::Stages;
use crate::control::State;
use crate::deliver::{AttemptFlags, Route};
use crate::egress::{Pick, Source, Wait};
use crate::job::{Job, JobError, JobIdentity};
use crate::outcome::Outcome;
use crate::pipeline::recorder::Record;
use crate::queue::scheduler::Why;
use crate::queue::{now_ms, Entry};
use crate::shape::{Gate, Reaction};

/// One job, holding one worker permit until its record is queued.
pub async fn work(stages: Arc<Stages>, entry: Entry, mut job: Job, _permit: OwnedSemaphorePermit) {
    let m = &stages.metrics;
    if *stages.stop.borrow() {
        // Shutdown came before this job started: leave it to be reclaimed.
        stages.leases.drop_one(&entry.id);
        return;
    }
    m.in_flight.inc();
    let ident = job.identity();
    // A bug anywhere in routing, shaping, rendering or SMTP must not leave the job without
    // an outcome (unacked, its lease renewed for ever): a panic becomes a dead letter.
    // The longest one job may hold this worker: a tarpit domain (slow DNS, many slow MX
    // addresses) must not hold every worker. Past it the attempt is deferred.
    // Once the body has started to go out, the attempt runs on to its reply (bounded by
    // the data timeouts): cutting it would defer a message the receiver may have.
    let limit = stages.attempt_timeout;
    let flags = Arc::new(AttemptFlags::default());
    let run =
        flags.scope(AssertUnwindSafe(attempt(&stages, &entry, &mut job, &ident)).catch_unwind());
    tokio::pin!(run);
    let attempt = tokio::select! {
        r = &mut run => r,
        _ = tokio::time::sleep(limit) => if flags.committed() {
            run.await
        } else {
            let outcome = Outcome::Deferred {
                response: format!("attempt took longer than delivery.attempt_timeout ({limit:?})"),
            };
            Ok(Some(record(&stages, &entry, &ident, "*", None, outcome)))
        },
    };
    if flags.reply_lost() {
        m.replies_lost.inc();
    }
    match attempt {
        Ok(Some(record)) => stages.recorder.send(record).await,
        Ok(None) => stages.leases.drop_one(&entry.id),
        Err(_) => {
            tracing::error!(id = %ident.id, "internal error (panic) while delivering; job dead-lettered");
            let err = JobError::Internal("panic while delivering (a paloma bug)".into());
            stages
                .recorder
                .send(Record::dead(&entry, &err, &ident, true))
                .await;
        }
    }
    m.in_flight.dec();
}

/// A job whose JSON and template sources together are larger than this is rendered and
/// signed on a blocking thread (the newsletter's are about 3 KB).
pub const BLOCKING_RENDER_BYTES: usize = 64 * 1024;

/// The record of one job's attempt; None when shutdown came before anything was sent.
async fn attempt(
    stages: &Arc<Stages>,
    entry: &Entry,
    job: &mut Job,
    ident: &JobIdentity,
) -> Option<Record> {
    let m = &stages.metrics;
    // An operator's bounce directive (`paloma bounce --for`) ends the job before anything.
    if let Some(outcome) = stages
        .admin_bounces
        .bounce(&ident.campaign, job.to.domain(), now_ms())
    {
        return Some(record(stages, entry, ident, "*", None, outcome));
    }
    // Route: null MX, NXDOMAIN (bounce) or a DNS failure (defer) need no session.
    let domain = job.to.domain().to_string();
    let dest = match stages.deliverer.route(&domain).await {
        Route::Dest(dest) => dest,
        Route::Final(outcome) => return Some(record(stages, entry, ident, "*", None, outcome)),
    };
    let key = dest.key();
    let hosts: Vec<&str> = dest.hosts().iter().map(String::as_str).collect();
    // Egress: the source of the job's pool it leaves from (sticky for a retry), skipping
    // sources suspended for this site or at their warm-up cap.
    let now = now_ms();
    let picked = stages
        .egress
        .pick(
            job.pool.as_deref(),
            key,
            entry.source.as_deref(),
            now,
            |src| stages.shaper.suspended_for(src, key, &domain),
        )
        .await;
    let source = match picked {
        Pick::Go(source) => source,
        Pick::NoPool(pool) => {
            let err = JobError::Invalid {
                field: "pool",
                reason: format!(
                    "names no pool {pool:?}: the pools are {}",
                    stages.egress.pool_names().join(", ")
                ),
            };
            return Some(Record::dead(entry, &err, ident, true));
        }
        Pick::Wait(Wait::Warmup(until)) => {
            // Not an attempt, and the wait does not count towards max_age.
            m.warmup_delays
                .with_label_values(&[stages.egress.pool_label(job.pool.as_deref())])
                .inc();
            let first_at = entry.first_at + (until - now).max(0);
            return Some(Record::later(entry, ident, until, first_at, Why::Warmup));
        }
        // Counted (and shown by `paloma queue`) as suspended, as the metric has it, also
        // when the warm-up counters could not be read (a short wait).
        Pick::Wait(Wait::Suspended(wait) | Wait::Unknown(wait)) => {
            let rule = stages.shaper.rule_for(&domain, &hosts);
            m.suspended_delays
                .with_label_values(&[rule.name.as_str()])
                .inc();
            let due = now + wait.as_millis() as i64;
            return Some(Record::later(
                entry,
                ident,
                due,
                entry.first_at,
                Why::Suspended,
            ));
        }
    };
    let site = match stages.deliverer.site(&dest, &source) {
        Ok(site) => site,
        Err(outcome) => {
            return Some(record(stages, entry, ident, "*", Some(&source), outcome));
        }
    };
    // Shape.
    let (rule, gate) = stages.shaper.gate(&domain, key, &hosts, &source).await;
    let wait = match gate {
        Gate::Go => None,
        Gate::Suspended(wait) => {
            m.suspended_delays
                .with_label_values(&[rule.name.as_str()])
                .inc();
            Some((wait, Why::Suspended))
        }
        Gate::Paced(wait) => {
            m.shaping_delays
                .with_label_values(&[rule.name.as_str()])
                .inc();
            Some((wait, Why::Shaping))
        }
    };
    if let Some((wait, why)) = wait {
        stages.egress.unspend(&source);
        let due = now_ms() + wait.as_millis() as i64;
        return Some(Record::later(entry, ident, due, entry.first_at, why));
    }
    // The campaign may have been paused or cancelled since the intake looked.
    match stages.campaigns.state(&ident.campaign) {
        State::Active => {}
        State::Paused => {
            stages.egress.unspend(&source);
            m.jobs_parked.inc();
            return Some(Record::parked(entry, ident, now_ms()));
        }
        State::Cancelled => {
            stages.egress.unspend(&source);
            return Some(Record::suppressed(entry, job, "cancelled"));
        }
    }
    // Render.
    let t0 = Instant::now();
    let size = entry.job.len() + stages.renderer.templates().size(job.template.as_str());
    let (message, rendered) = if size > BLOCKING_RENDER_BYTES {
        // A large message takes milliseconds to render, hash and sign: on a blocking thread,
        // so that the runtime's few threads keep every other session and request moving.
        let st = stages.clone();
        let mut owned = job.clone();
        let done = tokio::task::spawn_blocking(move || {
            let (mut message, mut scratch) = (Vec::with_capacity(size * 2), Vec::new());
            let r = st.renderer.render(&mut owned, &mut message, &mut scratch);
            (owned, message, r)
        })
        .await;
        match done {
            Ok((owned, message, r)) => {
                *job = owned;
                m.renders_blocking.inc();
                (message, r)
            }
            // A panic there is a panic here: the worker dead-letters the job.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    } else {
        let (mut message, mut scratch) = (Vec::with_capacity(16 * 1024), Vec::new());
        let r = stages.renderer.render(job, &mut message, &mut scratch);
        (message, r)
    };
    if let Err(e) = rendered {
        stages.egress.unspend(&source);
        return Some(Record::dead(entry, &e, ident, true));
    }
    m.render_seconds.observe(t0.elapsed().as_secs_f64());
    // The envelope sender: the job's VERP return path when `[bounces]` is on.
    let verp = stages
        .return_paths
        .as_ref()
        .map(|rp| rp.address(job.id.as_str()));
    let mail_from = verp
        .as_deref()
        .unwrap_or_else(|| stages.renderer.mail_from(job));
    let envelope = match crate::deliver::smtp::envelope(mail_from, job.to.as_str()) {
        Ok(e) => e,
        Err(e) => {
            let err = JobError::Invalid {
                field: "to",
                reason: e.to_string(),
            };
            stages.egress.unspend(&source);
            return Some(Record::dead(entry, &err, ident, true));
        }
    };
    // Send: under the site's lowered session cap, if a throttling reply set one.
    let t1 = Instant::now();
    let mut stop = stages.stop.clone();
    let capped = stages
        .shaper
        .throttles
        .capped(&source.qualify(&site.key), Instant::now());
    let _session = match capped {
        Some(permits) => tokio::select! {
            p = permits.acquire_owned() => p.ok(),
            _ = stop.wait_for(|s| *s) => {
                stages.egress.unspend(&source);
                return None;
            }
        },
        None => None,
    };
    let Some(outcome) = site.send(&envelope, &message, &mut stop).await else {
        stages.egress.unspend(&source);
        return None;
    };
    source.count_sent();
    m.source_messages
        .with_label_values(&[source.label(), outcome.label()])
        .inc();
    m.smtp_seconds
        .with_label_values(&[outcome.label()])
        .observe(t1.elapsed().as_secs_f64());
    // React.
    match stages
        .shaper
        .react(&source.qualify(&site.key), &outcome)
        .await
    {
        Some(Reaction::Suspend(pause)) => {
            m.suspensions.with_label_values(&[rule.name.as_str()]).inc();
            tracing::info!(site = %site.key, source = source.label(), pause = ?pause, reply = %outcome.text(), "throttled: suspending the destination");
        }
        Some(Reaction::Cap(sessions, rate, period)) => {
            m.suspensions.with_label_values(&[rule.name.as_str()]).inc();
            tracing::info!(site = %site.key, source = source.label(), sessions, rate = ?rate, period = ?period, reply = %outcome.text(), "throttled: lowering the destination's session cap");
        }
        Some(Reaction::Slow(rate, period)) => {
            m.suspensions.with_label_values(&[rule.name.as_str()]).inc();
            tracing::info!(site = %site.key, source = source.label(), rate = ?rate, period = ?period, reply = %outcome.text(), "throttled: lowering the destination's rate");
        }
        None => {}
    }
    Some(record(
        stages,
        entry,
        ident,
        &rule.name,
        Some(&source),
        outcome,
    ))
}

/// Counts the attempt's outcome for its rule and asks [`super::next`] for the record.
fn record(
    stages: &Stages,
    entry: &Entry,
    ident: &JobIdentity,
    rule: &str,
    source: Option<&Source>,
    outcome: Outcome,
) -> Record {
    let m = &stages.metrics;
    m.destination
        .with_label_values(&[rule, outcome.label()])
        .inc();
    if let Outcome::Bounced(b) = &outcome {
        m.bounces.with_label_values(&[b.class.as_str()]).inc();
    }
    let jitter = rand::thread_rng().gen_range(0.9..1.1);
    Record::attempted(
        entry,
        ident,
        source.map(|s| s.name.as_str()),
        outcome,
        &stages.retry,
        &stages.keep,
        now_ms(),
        jitter,
    )
}

//! The daemon: intake → (render → deliver) workers → recorder, plus the scheduler, the
//! metrics/health endpoint, and shutdown.
//!
//! Flow of one job: the intake reads a batch of stream entries, validates each job, claims
//! its id, and hands it to a worker (a task holding one of `intake.workers` permits, so
//! memory stays flat however long the stream is). The worker renders the message and
//! delivers it; its outcome goes to the recorder, which writes the event, the idempotency
//! record and the stream ack in one transaction.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::FutureExt;
use rand::Rng;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::config::Settings;
use crate::deliver::{Deliverer, Outcome, Route};
use crate::job::{Job, JobError, JobIdentity};
use crate::metrics::Metrics;
use crate::policy::caps::Caps;
use crate::policy::suppression;
use crate::queue::events::{rfc3339_ms, Event};
use crate::queue::intake::{Claim, Intake};
use crate::queue::leases::{self, Leases};
use crate::queue::recorder::{IdemState, Record, Recorder, RecorderHandle};
use crate::queue::{now_ms, scheduler, Entry, Keys};
use crate::render::{DkimKeys, Renderer, Templates};
use crate::shape::{Admission, Reaction, Shaper};
use crate::store::{connect, redis_target, RedisConn};

/// Everything a worker needs, shared.
pub struct Shared {
    pub settings: Settings,
    pub renderer: Renderer,
    pub deliverer: Deliverer,
    pub recorder: RecorderHandle,
    pub metrics: Arc<Metrics>,
    pub ready: AtomicBool,
    pub leases: Arc<Leases>,
    pub shaper: Arc<Shaper>,
    pub caps: Option<Caps>,
    pub redis: RedisConn,
    pub keys: Keys,
    /// Open SMTP sessions (for the gauge).
    pub sessions: Arc<AtomicI64>,
    /// Turns true when shutdown begins.
    pub stop: watch::Receiver<bool>,
    /// Which finished jobs are kept for workflow follow-ups.
    pub workflow_jobs: crate::workflow::KeepJobs,
    /// What the last check of the Redis server found (for `/readyz`).
    pub redis_health: Arc<crate::store::checks::Health>,
}

fn consumer_name(settings: &Settings) -> String {
    settings.redis.consumer.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "paloma".into());
        format!(
            "{host}-{}-{:04x}",
            std::process::id(),
            rand::thread_rng().gen::<u16>()
        )
    })
}

/// Runs the daemon until `shutdown` completes, then drains: stops reading, lets in-flight
/// jobs finish (for up to 8 s), writes their outcomes and closes SMTP sessions.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let templates = Templates::load(&settings.templates.dir, settings.templates.strict)?;
    let dkim = DkimKeys::load(&settings.dkim)?;
    let renderer = Renderer::new(&settings, templates, dkim).map_err(anyhow::Error::msg)?;
    let metrics = Arc::new(Metrics::new());
    let keys = Keys::new(&settings.redis.prefix).retaining(&settings.events);

    let client = redis_target(&settings).await?;
    let block = settings.intake.block.get();
    let conn = crate::store::connect_when_serving(
        &client,
        Duration::from_secs(10),
        &keys.sends,
        Duration::from_secs(60),
    )
    .await?;
    let reader = connect(&client, block + Duration::from_secs(5)).await?;
    let redis_health = Arc::new(crate::store::checks::Health::default());
    {
        let mut c = conn.clone();
        match crate::store::checks::facts(&mut c).await {
            Ok(Some(f)) => {
                for w in f.findings() {
                    tracing::warn!("{w}");
                }
                crate::store::checks::judge(
                    &f,
                    settings.redis.allow_eviction,
                    &metrics,
                    &redis_health,
                )
                .map_err(anyhow::Error::msg)?;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "could not check the Redis server (INFO)"),
        }
    }
    let shaper = Arc::new(Shaper::with_redis(&settings, Some(conn.clone())));
    let sessions = Arc::new(AtomicI64::new(0));
    let deliverer = Deliverer::new(&settings, shaper.clone(), sessions.clone()).await?;
    let consumer = consumer_name(&settings);
    let mut intake = Intake::new(
        reader,
        conn.clone(),
        keys.clone(),
        settings.redis.group.clone(),
        consumer.clone(),
        settings.intake.batch,
        block,
        settings.intake.claim_idle.get(),
        settings.intake.idempotency_ttl.get(),
    );
    intake
        .ensure_group()
        .await
        .context("creating the consumer group")?;

    let leases = Arc::new(Leases::new(
        keys.clone(),
        settings.redis.group.clone(),
        consumer.clone(),
        settings.intake.claim_idle.get(),
    ));
    let (recorder, handle) = Recorder::new(
        conn.clone(),
        keys.clone(),
        settings.redis.group.clone(),
        settings.intake.idempotency_ttl.get(),
        settings.intake.event_batch,
        metrics.clone(),
        leases.clone(),
    );
    let recorder_task = tokio::spawn(recorder.run());
    // `stop`: shutdown has begun (intake, scheduler and waiting workers stop);
    // `exit`: the drain is over (lease renewal and the ops endpoint stop).
    let (stop_tx, stop_rx) = watch::channel(false);
    let (exit_tx, exit_rx) = watch::channel(false);
    let scheduler_task = tokio::spawn(scheduler::run(
        conn.clone(),
        keys.clone(),
        settings.intake.idempotency_ttl.get(),
        Duration::from_millis(250),
        metrics.clone(),
        stop_rx.clone(),
    ));
    tokio::spawn(crate::queue::events::retain(
        conn.clone(),
        keys.clone(),
        settings.events.max_age.get(),
        metrics.clone(),
        stop_rx.clone(),
    ));
    let renew_task = tokio::spawn(leases::renew(
        leases.clone(),
        conn.clone(),
        metrics.clone(),
        exit_rx.clone(),
    ));
    // Started before the intake: its consumer group must exist before the first outcome.
    let workflow_task = crate::workflow::start(
        &settings,
        renderer.templates(),
        &client,
        conn.clone(),
        &consumer,
        metrics.clone(),
        stop_rx.clone(),
    )
    .await?;
    let workflow_jobs = crate::workflow::KeepJobs::new(&settings);

    let workers = settings.intake.workers;
    let caps = Caps::new(&settings.caps);
    let shared = Arc::new(Shared {
        settings,
        renderer,
        deliverer,
        recorder: handle,
        metrics: metrics.clone(),
        ready: AtomicBool::new(false),
        leases,
        shaper,
        caps,
        redis: conn.clone(),
        keys: keys.clone(),
        sessions,
        stop: stop_rx.clone(),
        workflow_jobs,
        redis_health: redis_health.clone(),
    });
    tokio::spawn(crate::store::checks::watch(
        conn.clone(),
        shared.settings.redis.allow_eviction,
        metrics.clone(),
        redis_health,
        Duration::from_secs(5),
        stop_rx.clone(),
    ));
    // Housekeeping of SMTP sessions and mx routes, every 5 s until shutdown begins (it
    // then lets go of `shared`, whose recorder handle the drain waits for).
    {
        let shared = shared.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => shared.deliverer.reap(),
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
        });
    }
    let http_task = match shared.settings.metrics.listen {
        Some(addr) => {
            Some(crate::http::serve_ops(addr, shared.clone(), conn.clone(), exit_rx.clone()).await?)
        }
        None => None,
    };
    let track_task = match shared.settings.tracking.listen {
        Some(addr) => {
            let t = &shared.settings.tracking;
            let detector = crate::track::machine::Detector::new(
                t.scanner_networks.as_deref(),
                t.scanner_networks_file.as_deref(),
                t.machine_window.get(),
                t.trust_forwarded,
            )
            .map_err(|e| anyhow::anyhow!(e))?;
            let state = crate::track::server::TrackState {
                detector,
                signer: shared.renderer.signer().clone(),
                redis: conn.clone(),
                keys: keys.clone(),
                metrics: metrics.clone(),
                repeat_window: t.repeat_window.get(),
                limits: crate::listener::Limits {
                    name: "tracking",
                    max_connections: t.max_connections,
                    header_timeout: t.header_timeout.get(),
                },
            };
            Some(crate::track::server::serve(addr, state, exit_rx.clone()).await?)
        }
        None => None,
    };
    tracing::info!(
        consumer = %consumer,
        mode = ?shared.settings.delivery.mode,
        workers,
        templates = shared.renderer.templates().names().count(),
        "paloma running"
    );
    shared.ready.store(true, Ordering::Relaxed);

    let permits = Arc::new(Semaphore::new(workers));
    tokio::pin!(shutdown);
    let intake_loop = intake_loop(
        &mut intake,
        shared.clone(),
        permits.clone(),
        stop_rx.clone(),
    );
    tokio::select! {
        r = intake_loop => r?,
        _ = &mut shutdown => {}
    }
    // The intake loop is dropped here at an await point; an entry it had read but not handed
    // to a worker stays pending in Redis and is reclaimed, never lost.
    let _ = stop_tx.send(true);
    shared.ready.store(false, Ordering::Relaxed);
    tracing::info!(
        in_flight = workers - permits.available_permits(),
        "shutting down: intake stopped, finishing SMTP sessions in progress"
    );
    let drain =
        tokio::time::timeout(Duration::from_secs(8), permits.acquire_many(workers as u32)).await;
    if drain.is_err() {
        tracing::warn!(
            in_flight = workers - permits.available_permits(),
            "sessions did not finish in time; their jobs stay pending in Redis and will be reclaimed"
        );
    }
    shared.deliverer.close().await;
    // Drop our recorder handles: the recorder writes what it holds and stops once the
    // workers' handles are gone too.
    drop(intake);
    drop(shared);
    let _ = tokio::time::timeout(Duration::from_secs(1), recorder_task).await;
    let _ = exit_tx.send(true);
    let _ = scheduler_task.await;
    if let Some(t) = workflow_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let _ = renew_task.await;
    if let Some(t) = http_task {
        let _ = tokio::time::timeout(Duration::from_secs(1), t).await;
    }
    if let Some(t) = track_task {
        let _ = tokio::time::timeout(Duration::from_secs(3), t).await;
    }
    tracing::info!("stopped");
    Ok(())
}

async fn intake_loop(
    intake: &mut Intake,
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let claim_every = (shared.settings.intake.claim_idle.get() / 4)
        .clamp(Duration::from_millis(500), Duration::from_secs(60));
    // Reclaim right away: a restarted daemon picks up what a killed one left.
    let mut last_claim = Instant::now() - claim_every;
    let mut entries = Vec::with_capacity(shared.settings.intake.batch);
    let mut gone = Vec::new();
    let mut backoff = Duration::from_millis(100);
    while !*stop.borrow() {
        entries.clear();
        gone.clear();
        let mut reclaimed = 0;
        if last_claim.elapsed() >= claim_every {
            last_claim = Instant::now();
            if let Err(e) = intake.reclaim(&mut entries, &mut gone).await {
                tracing::warn!(error = %e, "reclaiming pending jobs failed");
            }
            reclaimed = entries.len();
            shared.metrics.jobs_reclaimed.inc_by(reclaimed as u64);
            let workflows = format!("{}-workflows", shared.settings.redis.group);
            match intake
                .prune_consumers(&[(shared.keys.events.as_str(), workflows.as_str())])
                .await
            {
                Ok(0) => {}
                Ok(n) => {
                    shared.metrics.consumers_removed.inc_by(n as u64);
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
                shared.metrics.redis_errors.inc();
                tracing::warn!(error = %e, "reading the sends stream failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            backoff = Duration::from_millis(100);
        }
        shared.leases.hold(
            entries
                .iter()
                .map(|e| e.id.as_str())
                .chain(gone.iter().map(String::as_str)),
        );
        for id in gone.drain(..) {
            shared
                .recorder
                .send(Record {
                    ack: Some(id),
                    ..Default::default()
                })
                .await;
        }
        if entries.is_empty() {
            continue;
        }
        shared.metrics.jobs_read.inc_by(entries.len() as u64);
        if let Some(last) = entries.last() {
            let lag = (now_ms() - Entry::id_millis(&last.id)).max(0) as f64 / 1000.0;
            shared.metrics.queue_lag.set(lag);
        }
        dispatch(intake, &shared, &permits, std::mem::take(&mut entries)).await?;
    }
    Ok(())
}

/// Validates and claims a batch, then hands each job to a worker.
async fn dispatch(
    intake: &mut Intake,
    shared: &Arc<Shared>,
    permits: &Arc<Semaphore>,
    entries: Vec<Entry>,
) -> anyhow::Result<()> {
    let max = shared.settings.intake.max_job_bytes;
    let mut valid: Vec<(Entry, Job)> = Vec::with_capacity(entries.len());
    for e in entries {
        match Job::parse(&e.job, max) {
            Ok(job) => valid.push((e, job)),
            Err((err, ident)) => {
                shared
                    .recorder
                    .send(dead_record(&e, &err, &ident, false))
                    .await
            }
        }
    }
    let ids: Vec<(&str, &str, &str)> = valid
        .iter()
        .map(|(e, j)| (j.id.as_str(), e.id.as_str(), j.to.as_str()))
        .collect();
    let claims = loop {
        match intake.claim(&ids).await {
            Ok(c) => break c,
            Err(e) => {
                shared.metrics.redis_errors.inc();
                tracing::warn!(error = %e, "claiming job ids failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    drop(ids);
    let now = now_ms();
    let mut ready = Vec::with_capacity(valid.len());
    for ((entry, job), (claim, suppressed)) in valid.into_iter().zip(claims) {
        if claim == Claim::Duplicate {
            shared.metrics.jobs_duplicate.inc();
            tracing::debug!(id = job.id.as_str(), "duplicate job id; skipped");
            shared
                .recorder
                .send(Record {
                    ack: Some(entry.id),
                    ..Default::default()
                })
                .await;
            continue;
        }
        if let Some(reason) = suppressed.filter(|r| suppression::blocks(r, job.transactional)) {
            let reason = if suppression::REASONS.contains(&reason.as_str()) {
                reason
            } else {
                "manual".into()
            };
            shared
                .recorder
                .send(suppressed_record(&entry, &job, &reason))
                .await;
            continue;
        }
        if let Some(at) = job.send_at.filter(|&t| t > now + 250) {
            // The job's age (max_age) counts from its send time, not from the enqueue.
            let member = scheduler::member(entry.attempt, entry.first_at.max(at), &entry.job);
            shared
                .recorder
                .send(Record {
                    ack: Some(entry.id),
                    schedule: Some((at, member)),
                    idem: Some((job.id.as_str().to_string(), Some(IdemState::Scheduled))),
                    ..Default::default()
                })
                .await;
            continue;
        }
        ready.push((entry, job));
    }
    let ready = apply_caps(shared, ready).await;
    for (entry, job) in ready {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closes");
        tokio::spawn(work(shared.clone(), entry, job, permit));
    }
    Ok(())
}

/// Frequency caps: reserves each marketing job's slot; a recipient over a cap gets a
/// `suppressed` event (reason `frequency_cap`) instead of the message.
async fn apply_caps(shared: &Arc<Shared>, ready: Vec<(Entry, Job)>) -> Vec<(Entry, Job)> {
    let Some(caps) = &shared.caps else {
        return ready;
    };
    let marketing: Vec<(&str, &str)> = ready
        .iter()
        .filter(|(_, j)| !j.transactional)
        .map(|(_, j)| (j.to.as_str(), j.id.as_str()))
        .collect();
    let mut redis = shared.redis.clone();
    let allowed = loop {
        match caps.reserve(&mut redis, &shared.keys, &marketing).await {
            Ok(a) => break a,
            Err(e) => {
                shared.metrics.redis_errors.inc();
                tracing::warn!(error = %e, "checking frequency caps failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    drop(marketing);
    let mut allowed = allowed.into_iter();
    let mut out = Vec::with_capacity(ready.len());
    for (entry, job) in ready {
        if job.transactional || allowed.next().unwrap_or(true) {
            out.push((entry, job));
            continue;
        }
        shared
            .recorder
            .send(suppressed_record(&entry, &job, "frequency_cap"))
            .await;
    }
    out
}

/// A job that ends without being sent: suppression list or frequency cap.
fn suppressed_record(entry: &Entry, job: &Job, reason: &str) -> Record {
    let (id, campaign, to) = (job.id.as_str(), job.campaign.as_str(), job.to.as_str());
    let mut ev = Event::new("suppressed", id, campaign, to);
    ev.reason = Some(reason);
    Record {
        ack: Some(entry.id.clone()),
        event: Some(ev.to_json()),
        idem: Some((id.to_string(), Some(IdemState::Done))),
        stat: Some((campaign.to_string(), "suppressed")),
        first: entry.attempt == 0,
        ..Default::default()
    }
}

fn dead_record(entry: &Entry, err: &JobError, ident: &JobIdentity, claimed: bool) -> Record {
    let error = err.to_string();
    let mut ev = Event::new("dead", &ident.id, &ident.campaign, &ident.to);
    ev.error = Some(&error);
    let event = ev.to_json();
    Record {
        ack: Some(entry.id.clone()),
        event: Some(event),
        // A dead job may be fixed and enqueued again under the same id.
        idem: claimed.then(|| (ident.id.clone(), None)),
        dead: Some((entry.job.clone(), error)),
        stat: Some((stat_campaign(&ident.campaign), "dead")),
        first: entry.attempt == 0,
        ..Default::default()
    }
}

/// The campaign a dead job is counted under: its own when it is a valid campaign id,
/// else `(none)` / `(invalid)` — a stream of bad jobs with random campaigns must not grow
/// the metrics and the campaigns set without bound.
fn stat_campaign(c: &str) -> String {
    if c.is_empty() {
        "(none)".into()
    } else if crate::job::CampaignId::parse(c.to_string()).is_err() {
        "(invalid)".into()
    } else {
        c.to_string()
    }
}

/// One job: route, shape, render, deliver, record.
async fn work(shared: Arc<Shared>, entry: Entry, mut job: Job, _permit: OwnedSemaphorePermit) {
    let m = &shared.metrics;
    if *shared.stop.borrow() {
        // Shutdown came before this job started: leave it to be reclaimed.
        shared.leases.drop_one(&entry.id);
        return;
    }
    m.in_flight.inc();
    let ident = JobIdentity {
        id: job.id.as_str().to_string(),
        campaign: job.campaign.as_str().to_string(),
        to: job.to.as_str().to_string(),
    };
    // A bug anywhere in routing, shaping, rendering or SMTP must not leave the job without
    // an outcome (unacked, its lease renewed for ever): a panic becomes a dead letter.
    // The longest one job may hold this worker: a tarpit domain (slow DNS, many slow MX
    // addresses) must not hold every worker. Past it the attempt is deferred.
    let limit = shared.settings.delivery.attempt_timeout.get();
    let attempt = tokio::time::timeout(
        limit,
        AssertUnwindSafe(deliver_job(&shared, &entry, &mut job, &ident)).catch_unwind(),
    )
    .await
    .unwrap_or_else(|_| {
        Ok(Some(outcome_record(
            &shared,
            &entry,
            &ident,
            "*",
            Outcome::Deferred {
                response: format!("attempt took longer than delivery.attempt_timeout ({limit:?})"),
            },
        )))
    });
    match attempt {
        Ok(Some(record)) => shared.recorder.send(record).await,
        Ok(None) => shared.leases.drop_one(&entry.id),
        Err(_) => {
            tracing::error!(id = %ident.id, "internal error (panic) while delivering; job dead-lettered");
            let err = JobError::Internal("panic while delivering (a paloma bug)".into());
            shared
                .recorder
                .send(dead_record(&entry, &err, &ident, true))
                .await;
        }
    }
    m.in_flight.dec();
}

/// The record of one job's attempt; None when shutdown came before anything was sent.
async fn deliver_job(
    shared: &Shared,
    entry: &Entry,
    job: &mut Job,
    ident: &JobIdentity,
) -> Option<Record> {
    let m = &shared.metrics;
    let domain = job.to.domain().to_string();
    let site = match shared.deliverer.route(&domain).await {
        Route::Site(site) => site,
        // Null MX, NXDOMAIN (bounce) or a DNS failure (defer): no session needed.
        Route::Final(outcome) => return Some(outcome_record(shared, entry, ident, "*", outcome)),
    };
    let hosts: Vec<&str> = site.key.split(',').collect();
    let (rule, by_mx) = shared.shaper.rule_and_key(&domain, &hosts);
    if let Some(wait) = site.suspended_for() {
        m.suspended_delays
            .with_label_values(&[rule.name.as_str()])
            .inc();
        return Some(put_back(entry, ident, wait));
    }
    let key = if by_mx {
        site.key.as_str()
    } else {
        domain.as_str()
    };
    // A rate lowered by a throttling reply applies to the whole site; checked first, as it
    // is this daemon's own: a job it sends back then takes no slot of the shared rate.
    if let Some(slowed) = site.slowed() {
        if let Admission::Later(wait) = slowed.admit(&site.key).await {
            m.shaping_delays
                .with_label_values(&[rule.name.as_str()])
                .inc();
            return Some(put_back(entry, ident, wait));
        }
    }
    if let Admission::Later(wait) = rule.admit(key).await {
        m.shaping_delays
            .with_label_values(&[rule.name.as_str()])
            .inc();
        return Some(put_back(entry, ident, wait));
    }

    let t0 = Instant::now();
    let mut message = Vec::with_capacity(16 * 1024);
    let mut scratch = Vec::new();
    if let Err(e) = shared.renderer.render(job, &mut message, &mut scratch) {
        return Some(dead_record(entry, &e, ident, true));
    }
    m.render_seconds.observe(t0.elapsed().as_secs_f64());
    drop(scratch);
    let envelope =
        match crate::deliver::smtp::envelope(shared.renderer.mail_from(job), job.to.as_str()) {
            Ok(e) => e,
            Err(reason) => {
                let err = JobError::Invalid {
                    field: "to",
                    reason,
                };
                return Some(dead_record(entry, &err, ident, true));
            }
        };
    let t1 = Instant::now();
    let mut stop = shared.stop.clone();
    let outcome = site.send(&envelope, &message, &mut stop).await?;
    let label = match &outcome {
        Outcome::Delivered { .. } => "delivered",
        Outcome::Deferred { .. } => "deferred",
        Outcome::Bounced(_) => "bounced",
    };
    m.smtp_seconds
        .with_label_values(&[label])
        .observe(t1.elapsed().as_secs_f64());
    match shared.shaper.backoff_for(&outcome) {
        Some(Reaction::Suspend(pause)) => {
            if site.suspended_for().is_none() {
                m.suspensions.with_label_values(&[rule.name.as_str()]).inc();
                tracing::info!(site = %site.key, pause = ?pause, reply = %outcome_text(&outcome), "throttled: suspending the destination");
            }
            site.suspend(Instant::now() + pause);
        }
        Some(Reaction::Slow(rate, period)) => {
            if site.slowed().is_none() {
                m.suspensions.with_label_values(&[rule.name.as_str()]).inc();
                tracing::info!(site = %site.key, rate = ?rate, period = ?period, reply = %outcome_text(&outcome), "throttled: lowering the destination's rate");
            }
            site.slow(rate, Instant::now() + period);
        }
        None => {}
    }
    Some(outcome_record(shared, entry, ident, &rule.name, outcome))
}

fn outcome_text(o: &Outcome) -> &str {
    match o {
        Outcome::Delivered { response } | Outcome::Deferred { response } => response,
        Outcome::Bounced(b) => &b.response,
    }
}

/// Back to the delayed set without a delivery attempt (rate or suspension): no event, the
/// attempt count unchanged.
fn put_back(entry: &Entry, ident: &JobIdentity, wait: Duration) -> Record {
    let due = now_ms() + wait.as_millis() as i64;
    Record {
        ack: Some(entry.id.clone()),
        schedule: Some((
            due,
            scheduler::member(entry.attempt, entry.first_at, &entry.job),
        )),
        idem: Some((ident.id.clone(), Some(IdemState::Scheduled))),
        ..Default::default()
    }
}

fn outcome_record(
    shared: &Shared,
    entry: &Entry,
    ident: &JobIdentity,
    rule: &str,
    outcome: Outcome,
) -> Record {
    let (id, campaign, to) = (
        ident.id.as_str(),
        ident.campaign.as_str(),
        ident.to.as_str(),
    );
    let first = entry.attempt == 0;
    let done = |kind: &'static str, event: String| Record {
        ack: Some(entry.id.clone()),
        event: Some(event),
        idem: Some((id.to_string(), Some(IdemState::Done))),
        stat: Some((campaign.to_string(), kind)),
        first,
        ..Default::default()
    };
    let label = match &outcome {
        Outcome::Delivered { .. } => "delivered",
        Outcome::Deferred { .. } => "deferred",
        Outcome::Bounced(_) => "bounced",
    };
    shared
        .metrics
        .destination
        .with_label_values(&[rule, label])
        .inc();
    match outcome {
        Outcome::Delivered { response } => {
            let mut ev = Event::new("delivered", id, campaign, to);
            ev.response = Some(&response);
            let mut record = done("delivered", ev.to_json());
            record.store = shared
                .workflow_jobs
                .store("delivered", id, campaign, &entry.job);
            record
        }
        Outcome::Bounced(b) => {
            shared
                .metrics
                .bounces
                .with_label_values(&[b.class.as_str()])
                .inc();
            let mut ev = Event::new("bounced", id, campaign, to);
            ev.code = Some(b.code);
            ev.enhanced = Some(&b.enhanced);
            ev.class = Some(b.class.as_str());
            ev.response = Some(&b.response);
            let mut record = done("bounced", ev.to_json());
            record.store = shared
                .workflow_jobs
                .store("bounced", id, campaign, &entry.job);
            if b.class.is_hard() {
                record.suppress = Some((to.to_string(), "bounced"));
            }
            record
        }
        Outcome::Deferred { response } => {
            let d = &shared.settings.delivery;
            let attempt = entry.attempt.saturating_add(1);
            let base =
                d.retry_intervals[(attempt as usize - 1).min(d.retry_intervals.len() - 1)].get();
            // ±10% jitter so a burst of deferrals does not come back as one burst.
            let jitter = rand::thread_rng().gen_range(0.9..1.1);
            let retry_at = now_ms() + (base.as_secs_f64() * jitter * 1000.0) as i64;
            if retry_at.saturating_sub(entry.first_at) > d.max_age.get().as_millis() as i64 {
                let mut ev = Event::new("failed", id, campaign, to);
                ev.attempt = Some(attempt);
                ev.response = Some(&response);
                return done("failed", ev.to_json());
            }
            let mut ev = Event::new("deferred", id, campaign, to);
            ev.attempt = Some(attempt);
            ev.retry_at = Some(rfc3339_ms(retry_at));
            ev.response = Some(&response);
            Record {
                ack: Some(entry.id.clone()),
                event: Some(ev.to_json()),
                idem: Some((id.to_string(), Some(IdemState::Scheduled))),
                schedule: Some((
                    retry_at,
                    scheduler::member(attempt, entry.first_at, &entry.job),
                )),
                stat: Some((campaign.to_string(), "deferred")),
                first,
                ..Default::default()
            }
        }
    }
}

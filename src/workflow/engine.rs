//! The workflow engine: reads `{prefix}events` through its own consumer group, acts on what
//! the rules plan (follow-up sends, webhooks, timers), and fires due timers up to the
//! consumer's watermark.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use anyhow::Context as _;
use redis::{Script, Value};
use serde_json::Map;
use tokio::sync::watch;

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::queue::consumer::{bytes, StreamConsumer, StreamEntry};
use crate::queue::{now_ms, Keys};
use crate::render::Templates;
use crate::retry::Backoff;
use crate::store::RedisConn;

use super::rules::*;
use super::{timers, webhook};

/// Adds follow-up jobs. KEYS: suppressed hash, sends stream, then each job's once-only
/// marker; ARGV[1]: marker TTL (s), then (lower-cased address, job JSON) pairs. Per job:
/// 2 suppressed, 1 added, 0 already sent for this rule.
static FOLLOW_UP: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/follow_up.lua")));

/// Leases due members of a sorted set: those scored up to `horizon` get the score
/// `now + lease` and are returned, so another daemon leaves them alone for that long.
static LEASE_DUE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/lease_due.lua")));

pub(crate) async fn lease_due(
    conn: &mut RedisConn,
    key: &str,
    horizon: i64,
    limit: usize,
    lease: Duration,
) -> redis::RedisResult<Vec<String>> {
    LEASE_DUE
        .key(key)
        .arg(horizon)
        .arg(limit)
        .arg(now_ms() + lease.as_millis() as i64)
        .invoke_async(conn)
        .await
}

/// Which parts of acting on a batch are done, so a retry after a Redis error does not
/// repeat them.
#[derive(Debug, Default)]
pub(super) struct Done {
    pub(super) timers: bool,
    pub(super) webhooks: bool,
    pub(super) sends: bool,
}

pub struct Engine {
    pub(super) rules: Rules,
    pub(super) keys: Keys,
    pub(super) metrics: Arc<Metrics>,
    /// The engine's group on the events stream (`{redis.group}-workflows`).
    pub(super) group: String,
    /// How long a follow-up's once-only marker lives.
    pub(super) marker_ttl: u64,
    /// How long a cancelled timer is remembered: longer than an unacknowledged `delivered`
    /// can wait to be reclaimed and handled again.
    pub(super) tombstone: Duration,
    /// Events up to this time (ms) have been read by the group; timers fire up to here.
    pub(super) watermark: AtomicI64,
}

impl Engine {
    pub fn new(
        settings: &Settings,
        templates: &Templates,
        consumer: String,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<(Engine, StreamConsumer)> {
        let rules = Rules::from_settings(settings)?;
        for r in &rules.0 {
            if let Action::Send { template, .. } = &r.action {
                if !templates.contains(template) {
                    anyhow::bail!(
                        "workflow {}: send.template {template:?} is not a folder of templates.dir",
                        r.name
                    );
                }
            }
        }
        let claim_idle = settings.intake.claim_idle.get();
        let keys = Keys::new(&settings.redis.prefix).retaining(&settings.events);
        let group = format!("{}-workflows", settings.redis.group);
        let stream = StreamConsumer::new(
            keys.events.clone(),
            group.clone(),
            consumer,
            settings.intake.batch,
            settings.intake.block.get(),
            claim_idle,
        );
        Ok((
            Engine {
                rules,
                keys,
                metrics,
                group,
                marker_ttl: settings.intake.idempotency_ttl.get().as_secs().max(1),
                tombstone: claim_idle * 2 + Duration::from_secs(60),
                watermark: AtomicI64::new(0),
            },
            stream,
        ))
    }

    pub(super) fn count(&self, rule: &str, action: &str, result: &str) {
        self.metrics
            .workflow_actions
            .with_label_values(&[rule, action, result])
            .inc();
    }

    /// Reads and acts on events until `stop` turns true.
    async fn consume(
        self: Arc<Self>,
        mut stream: StreamConsumer,
        mut reader: RedisConn,
        mut conn: RedisConn,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut backoff = Backoff::reads();
        let mut batch = Vec::with_capacity(stream.batch());
        let mut gone = Vec::new();
        while !*stop.borrow() {
            batch.clear();
            gone.clear();
            if stream.reclaim_due() {
                if let Err(e) = stream.reclaim(&mut conn, &mut batch, &mut gone).await {
                    self.metrics.redis_errors.inc();
                    tracing::warn!(error = %e, "reclaiming pending events failed");
                }
                if !batch.is_empty() {
                    tracing::info!(
                        count = batch.len(),
                        "workflows: reclaimed pending events from a stopped consumer"
                    );
                }
            }
            let mut read_at = None;
            if batch.is_empty() && gone.is_empty() {
                let started = now_ms();
                let read = tokio::select! {
                    r = stream.read(&mut reader, &mut conn, &mut batch, &mut gone) => r,
                    // A read cut short leaves its entries pending: reclaimed, not lost.
                    _ = stop.changed() => return,
                };
                if let Err(e) = read {
                    self.metrics.redis_errors.inc();
                    tracing::warn!(error = %e, "reading the events stream failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.fail()) => {}
                        _ = stop.changed() => return,
                    }
                    continue;
                }
                backoff.reset();
                read_at = Some(started);
            }
            // Entries deleted from the stream while pending: nothing to act on, only to ack.
            batch.extend(gone.drain(..).map(|id| EventEntry { id, event: None }));
            if !batch.is_empty() && !self.handle(&mut conn, &batch, &mut stop).await {
                return;
            }
            // A short read means the group had nothing older left to hand out; a full one,
            // that it has handed out everything up to its last entry.
            if let Some(started) = read_at {
                let mark = if batch.len() < stream.batch() {
                    started
                } else {
                    batch
                        .last()
                        .map(|e| crate::queue::Entry::id_millis(&e.id))
                        .unwrap_or(0)
                };
                self.watermark.fetch_max(mark, Ordering::Relaxed);
            }
        }
    }

    /// Acts on a batch and acknowledges it, retrying Redis errors until it is done; false
    /// when shutdown came first (the batch stays pending and will be reclaimed).
    async fn handle(
        &self,
        conn: &mut RedisConn,
        batch: &[EventEntry],
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        let now = now_ms();
        let mut plan = Plan::default();
        for EventEntry { id, event: ev } in batch {
            let ok = match ev {
                Some(ev) => self.rules.plan(ev, now, &mut plan),
                None => true,
            };
            if !ok {
                tracing::warn!(entry = %id, "workflows: malformed event in the events stream; skipped");
            }
        }
        let ids: Vec<&str> = batch.iter().map(|e| e.id.as_str()).collect();
        let mut done = Done::default();
        let mut backoff = Backoff::writes();
        loop {
            match self.apply(conn, &plan, &mut done, &ids).await {
                Ok(()) => return true,
                Err(e) => {
                    self.metrics.redis_errors.inc();
                    tracing::warn!(error = %e, events = ids.len(), "workflows: acting on events failed; retrying");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.fail()) => {}
                _ = stop.changed() => return false,
            }
        }
    }

    async fn apply(
        &self,
        conn: &mut RedisConn,
        plan: &Plan,
        done: &mut Done,
        ids: &[&str],
    ) -> redis::RedisResult<()> {
        if !done.timers && !plan.timers.is_empty() {
            let results = timers::update(conn, &self.keys, &plan.timers, self.tombstone).await?;
            for (op, changed) in plan.timers.iter().zip(results) {
                let (rule, what) = match op {
                    TimerOp::Arm { rule, .. } => (*rule, "armed"),
                    TimerOp::Cancel { rule, .. } => (*rule, "cancelled"),
                };
                if changed == 1 {
                    self.count(&self.rules.0[rule].name, "timer", what);
                }
            }
        }
        done.timers = true;
        self.act(conn, &plan.firings, done).await?;
        if !ids.is_empty() {
            redis::cmd("XACK")
                .arg(&self.keys.events)
                .arg(&self.group)
                .arg(ids)
                .query_async::<()>(conn)
                .await?;
        }
        Ok(())
    }

    /// Performs the actions of `firings`: queues webhooks, adds follow-up jobs.
    pub(super) async fn act(
        &self,
        conn: &mut RedisConn,
        firings: &[Firing],
        done: &mut Done,
    ) -> redis::RedisResult<()> {
        let now = now_ms();
        if !done.webhooks {
            let mut p = redis::pipe();
            let mut queued = Vec::new();
            for f in firings {
                let rule = &self.rules.0[f.rule];
                let Action::Webhook(url) = &rule.action else {
                    continue;
                };
                let mut body = f.body.clone();
                body.insert("workflow".into(), rule.name.clone().into());
                let w = webhook::Pending {
                    url: url.clone(),
                    body: serde_json::Value::Object(body).to_string(),
                    attempt: 0,
                    workflow: rule.name.clone(),
                };
                webhook::enqueue(&mut p, &self.keys, now + rule.delay.as_millis() as i64, &w);
                queued.push(rule.name.as_str());
            }
            if !queued.is_empty() {
                p.query_async::<()>(conn).await?;
                for name in queued {
                    self.count(name, "webhook", "queued");
                }
            }
            done.webhooks = true;
        }
        if !done.sends {
            self.send_follow_ups(conn, firings, now).await?;
            done.sends = true;
        }
        Ok(())
    }

    async fn send_follow_ups(
        &self,
        conn: &mut RedisConn,
        firings: &[Firing],
        now: i64,
    ) -> redis::RedisResult<()> {
        let mut sends: Vec<(&Firing, &Rule, String)> = Vec::new();
        for f in firings {
            let rule = &self.rules.0[f.rule];
            if !matches!(rule.action, Action::Send { .. }) {
                continue;
            }
            let id = format!("wf:{}:{}", rule.name, f.id);
            if id.len() > MAX_ID {
                tracing::warn!(workflow = %rule.name, id = %f.id, "follow-up not sent: its id wf:{{rule}}:{{id}} would exceed {MAX_ID} characters");
                self.count(&rule.name, "send", "error");
                continue;
            }
            sends.push((f, rule, id));
        }
        if sends.is_empty() {
            return Ok(());
        }
        let mut get = redis::pipe();
        for (f, _, _) in &sends {
            get.cmd("GET").arg(self.keys.kept_job(&f.id));
        }
        let stored: Vec<Option<Vec<u8>>> = get.query_async(conn).await?;
        let mut inv = FOLLOW_UP.key(&self.keys.suppressed);
        inv.key(&self.keys.sends).arg(self.marker_ttl);
        let mut added: Vec<&str> = Vec::new();
        for ((f, rule, id), stored) in sends.iter().zip(stored) {
            let Action::Send { template, campaign } = &rule.action else {
                continue;
            };
            let campaign = campaign.as_deref().unwrap_or(&f.campaign);
            let send_at = (!rule.delay.is_zero()).then(|| now + rule.delay.as_millis() as i64);
            let job = match stored {
                Some(s) => follow_up_job(&s, id, campaign, template, send_at),
                None => Err("the original job's data is no longer kept".into()),
            };
            match job {
                Ok(job) => {
                    inv.key(self.keys.marker(id))
                        .arg(crate::policy::suppression::field(&f.to))
                        .arg(job);
                    added.push(rule.name.as_str());
                }
                Err(e) => {
                    tracing::info!(workflow = %rule.name, id = %f.id, reason = %e, "follow-up not sent");
                    self.count(&rule.name, "send", "no_data");
                }
            }
        }
        if added.is_empty() {
            return Ok(());
        }
        let results: Vec<i64> = inv.invoke_async(conn).await?;
        for (name, r) in added.into_iter().zip(results) {
            let result = match r {
                1 => "enqueued",
                2 => "suppressed",
                _ => "duplicate",
            };
            self.count(name, "send", result);
        }
        Ok(())
    }
}

/// Starts the workflow engine, when rules are configured: the event consumer (on a Redis
/// connection of its own, for its blocking reads), the timer loop and, when
/// `webhooks.secret` is set, the webhook worker. The consumer group exists when this returns,
/// so every event written from then on is seen. The task ends after `stop` turns true.
pub async fn start(
    settings: &Settings,
    templates: &Templates,
    client: &crate::store::RedisTarget,
    mut conn: RedisConn,
    consumer: &str,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    if settings.workflows.is_empty() {
        return Ok(None);
    }
    let (engine, stream) = Engine::new(settings, templates, consumer.to_string(), metrics.clone())?;
    let reader =
        crate::store::connect(client, settings.intake.block.get() + Duration::from_secs(5)).await?;
    stream
        .ensure_group(&mut conn, "$")
        .await
        .context("creating the workflows consumer group")?;
    let worker = match &settings.webhooks.secret {
        Some(_) => Some(
            webhook::Worker::new(&settings.webhooks, engine.keys.clone(), metrics)
                .context("building the webhook client")?,
        ),
        None => None,
    };
    tracing::info!(
        rules = engine.rules.0.len(),
        group = %engine.group,
        "workflows running"
    );
    let engine = Arc::new(engine);
    let consume = tokio::spawn(
        engine
            .clone()
            .consume(stream, reader, conn.clone(), stop.clone()),
    );
    let timers = tokio::spawn(timers::run(engine, conn.clone(), stop.clone()));
    let hooks = worker.map(|w| tokio::spawn(w.run(conn, stop)));
    Ok(Some(tokio::spawn(async move {
        let _ = consume.await;
        let _ = timers.await;
        if let Some(h) = hooks {
            let _ = h.await;
        }
    })))
}

/// One entry of the events stream: its `event` field as a JSON object. An entry without a
/// readable event gets None: acknowledged and skipped, with a log line.
pub struct EventEntry {
    pub id: String,
    pub event: Option<Map<String, serde_json::Value>>,
}

impl StreamEntry for EventEntry {
    fn from_fields(id: String, fields: &[Value]) -> Self {
        let event = fields
            .chunks(2)
            .find(|kv| kv.first().and_then(bytes) == Some(b"event".as_slice()))
            .and_then(|kv| kv.get(1).and_then(bytes))
            .and_then(|b| serde_json::from_slice(b).ok());
        if event.is_none() {
            tracing::warn!(entry = %id, "workflows: events stream entry without a JSON `event` object; skipped");
        }
        EventEntry { id, event }
    }
}

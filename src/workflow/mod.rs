//! Workflows (`[[workflows]]`): rules that turn events into actions, a follow-up send or a
//! webhook.
//!
//! The engine reads `{prefix}events` through a consumer group of its own
//! (`{redis.group}-workflows`), shared by every daemon so each event is handled once, and
//! acknowledges a batch only after acting on it; entries a stopped daemon left pending are
//! reclaimed after `intake.claim_idle`. The group is created at the end of the stream: rules
//! act on events written from the first start with workflows on, not on a backlog of old
//! ones (a new `delivered` rule must not fire for every mail ever sent).
//!
//! - **Positive rules** (`delivered`, `opened`, `clicked` [one named `link`],
//!   `unsubscribed`, `bounced`) act when their event is read, after `delay` if set.
//! - **Negative rules** (`not_opened`, `not_clicked` `within` a window): a `delivered` event
//!   arms a durable timer, a member of the sorted set `{prefix}timers` scored by its due time;
//!   the first qualifying event removes it by name (ZREM of a member computed from the event,
//!   not a scan). An open cancels `not_opened`; a click cancels `not_clicked` (of the named link
//!   if set) and also `not_opened` (a click proves the mail was opened with images off); an
//!   unsubscribe or a bounce cancels both. Due timers are leased by a Lua script, acted on,
//!   then removed, so a daemon dying in between leaves them to fire again, not lost.
//! - Events with `machine: true` (image proxies, link scanners) neither fire nor cancel a rule
//!   unless it says `machine = true`.
//!
//! Actions:
//!
//! - **Follow-up send**: a new job on `{prefix}sends` to the same recipient, with the original
//!   job's `to`, `to_name`, `data`, `from` and `reply_to`, template `send.template`, campaign
//!   `send.campaign` (default: the original campaign), and id `wf:{rule}:{original id}`. The
//!   daemon keeps each delivered job it may need in `{prefix}wfjob:{id}` (only for campaigns a
//!   send rule matches, for the longest `within` + `delay` plus 7 days). A Lua script adds the
//!   job only if the recipient is not in `{prefix}suppressed` (for any reason) and
//!   `SET {prefix}wf:{rule}:{id} NX` succeeds: once per send and rule, however often a link is
//!   clicked. A rule never fires for its own follow-ups (its name in the id's `wf:` chain), so
//!   rules cannot loop.
//! - **Webhook**: see [`webhook`]; queued in `{prefix}webhooks` and POSTed by any daemon.
//!
//! Timers fire only up to the point the event consumer has read (its watermark), so a daemon
//! catching up on a backlog does not send "you did not open" to someone whose open is still
//! unread in the stream.

pub mod client;
pub mod timers;
pub mod webhook;

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use anyhow::Context as _;
use redis::{Script, Value};
use serde_json::Map;
use tokio::sync::watch;

use crate::config::{Settings, WorkflowRule};
use crate::metrics::Metrics;
use crate::queue::consumer::{bytes, Backoff, StreamConsumer, StreamEntry};
use crate::queue::events::{rfc3339_ms, EventKind};
use crate::queue::{now_ms, Keys};
use crate::render::Templates;
use crate::store::RedisConn;

/// How long a delivered job's data is kept beyond the longest window + delay of the rules
/// that may send a follow-up for it.
pub const KEEP_JOB_EXTRA: Duration = Duration::from_secs(7 * 86400);
/// Longest job id (the job contract's limit); a follow-up id beyond it is not sent.
const MAX_ID: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Delivered,
    Opened,
    Clicked,
    Unsubscribed,
    Bounced,
    Returned,
    Complained,
    /// A guard paused a campaign (an event of no job: webhooks only).
    CampaignPaused,
    NotOpened,
    NotClicked,
}

impl Trigger {
    pub fn parse(s: &str) -> Option<Trigger> {
        Some(match s {
            "delivered" => Trigger::Delivered,
            "opened" => Trigger::Opened,
            "clicked" => Trigger::Clicked,
            "unsubscribed" => Trigger::Unsubscribed,
            "bounced" => Trigger::Bounced,
            "returned" => Trigger::Returned,
            "complained" => Trigger::Complained,
            "campaign_paused" => Trigger::CampaignPaused,
            "not_opened" => Trigger::NotOpened,
            "not_clicked" => Trigger::NotClicked,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Delivered => "delivered",
            Trigger::Opened => "opened",
            Trigger::Clicked => "clicked",
            Trigger::Unsubscribed => "unsubscribed",
            Trigger::Bounced => "bounced",
            Trigger::Returned => "returned",
            Trigger::Complained => "complained",
            Trigger::CampaignPaused => "campaign_paused",
            Trigger::NotOpened => "not_opened",
            Trigger::NotClicked => "not_clicked",
        }
    }

    pub fn negative(self) -> bool {
        matches!(self, Trigger::NotOpened | Trigger::NotClicked)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send {
        template: String,
        campaign: Option<String>,
    },
    Webhook(String),
}

/// One `[[workflows]]` rule, checked.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub campaign: Option<String>,
    pub trigger: Trigger,
    pub link: Option<String>,
    pub within: Duration,
    pub delay: Duration,
    pub machine: bool,
    pub action: Action,
}

impl Rule {
    pub fn from_config(w: &WorkflowRule) -> Result<Rule, String> {
        let trigger = Trigger::parse(&w.on).ok_or_else(|| format!("unknown on = {:?}", w.on))?;
        let action = match (&w.send, &w.webhook) {
            (Some(s), None) => Action::Send {
                template: s.template.clone(),
                campaign: s.campaign.clone(),
            },
            (None, Some(url)) => Action::Webhook(url.clone()),
            _ => return Err("set exactly one of send or webhook".into()),
        };
        Ok(Rule {
            name: w.name.clone(),
            campaign: w.campaign.clone(),
            trigger,
            link: w.link.clone(),
            within: w.within.map(|d| d.get()).unwrap_or_default(),
            delay: w.delay.map(|d| d.get()).unwrap_or_default(),
            machine: w.machine,
            action,
        })
    }

    fn concerns(&self, ev: &EventView) -> bool {
        self.campaign.as_deref().is_none_or(|c| c == ev.campaign)
    }

    /// A machine's open or click counts only for rules that ask for them.
    fn counts(&self, ev: &EventView) -> bool {
        !ev.machine || self.machine
    }

    fn link_matches(&self, ev: &EventView) -> bool {
        self.link.as_deref().is_none_or(|l| ev.link == Some(l))
    }

    /// Is `id` a follow-up this rule made (directly or further down a chain of rules)?
    /// Follow-up ids are `wf:{rule}:{id}`, and rule names contain no `:`.
    pub fn made(&self, id: &str) -> bool {
        let mut rest = id;
        while let Some(r) = rest.strip_prefix("wf:") {
            let Some((name, tail)) = r.split_once(':') else {
                return false;
            };
            if name == self.name {
                return true;
            }
            rest = tail;
        }
        false
    }

    /// Does this event fire the (positive) rule?
    pub fn fires_on(&self, ev: &EventView) -> bool {
        !self.trigger.negative()
            && ev.kind == self.trigger.as_str()
            && self.concerns(ev)
            && self.counts(ev)
            && (self.trigger != Trigger::Clicked || self.link_matches(ev))
            && !self.made(ev.id)
    }

    /// Does this event arm the (negative) rule's timer?
    pub fn arms_on(&self, ev: &EventView) -> bool {
        self.trigger.negative() && ev.kind == "delivered" && self.concerns(ev) && !self.made(ev.id)
    }

    /// Does this event cancel the (negative) rule's timer for its message?
    pub fn cancels_on(&self, ev: &EventView) -> bool {
        if !self.trigger.negative() || !self.concerns(ev) {
            return false;
        }
        match ev.kind {
            "unsubscribed" | "bounced" | "returned" | "complained" => true,
            "opened" => self.trigger == Trigger::NotOpened && self.counts(ev),
            "clicked" => {
                self.counts(ev) && (self.trigger == Trigger::NotOpened || self.link_matches(ev))
            }
            _ => false,
        }
    }
}

/// The fields of an event that rules look at.
#[derive(Debug, Clone, Copy)]
pub struct EventView<'a> {
    pub kind: &'a str,
    pub id: &'a str,
    pub campaign: &'a str,
    pub to: &'a str,
    pub at_ms: Option<i64>,
    pub link: Option<&'a str>,
    pub machine: bool,
}

impl<'a> EventView<'a> {
    /// None when a common field is missing or not a string.
    pub fn of(ev: &'a Map<String, serde_json::Value>) -> Option<Self> {
        let s = |k: &str| ev.get(k).and_then(|v| v.as_str());
        let kind = s("type")?;
        // A campaign's own events (a guard's pause) belong to no job.
        let of_campaign = kind == "campaign_paused";
        let job = |k: &str| match s(k) {
            Some(v) if !v.is_empty() => Some(v),
            _ if of_campaign => Some(""),
            _ => None,
        };
        Some(EventView {
            kind,
            id: job("id")?,
            campaign: s("campaign")?,
            to: job("to")?,
            at_ms: s("at")
                .and_then(|a| chrono::DateTime::parse_from_rfc3339(a).ok())
                .map(|t| t.timestamp_millis()),
            link: s("link"),
            machine: ev.get("machine").and_then(|v| v.as_bool()).unwrap_or(false),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimerOp {
    Arm {
        due: i64,
        member: String,
        rule: usize,
    },
    Cancel {
        member: String,
        rule: usize,
    },
}

/// One rule acting for one message.
#[derive(Debug, Clone)]
pub struct Firing {
    pub rule: usize,
    pub id: String,
    pub campaign: String,
    pub to: String,
    /// The event (the webhook body, with `workflow` added).
    pub body: Map<String, serde_json::Value>,
}

/// What a batch of events asks for.
#[derive(Debug, Default)]
pub struct Plan {
    pub timers: Vec<TimerOp>,
    pub firings: Vec<Firing>,
}

/// The configured rules.
#[derive(Debug, Clone)]
pub struct Rules(pub Vec<Rule>);

impl Rules {
    pub fn from_settings(settings: &Settings) -> Result<Rules, String> {
        settings
            .workflows
            .iter()
            .map(|w| Rule::from_config(w).map_err(|e| format!("workflow {}: {e}", w.name)))
            .collect::<Result<_, _>>()
            .map(Rules)
    }

    /// Adds what one event asks for to `plan`; false when the event is malformed.
    pub fn plan(&self, ev: &Map<String, serde_json::Value>, now: i64, plan: &mut Plan) -> bool {
        let Some(v) = EventView::of(ev) else {
            return false;
        };
        for (i, r) in self.0.iter().enumerate() {
            if r.fires_on(&v) {
                plan.firings.push(Firing {
                    rule: i,
                    id: v.id.to_string(),
                    campaign: v.campaign.to_string(),
                    to: v.to.to_string(),
                    body: ev.clone(),
                });
            }
            if r.arms_on(&v) {
                let from = v.at_ms.unwrap_or(now);
                plan.timers.push(TimerOp::Arm {
                    due: from.saturating_add(r.within.as_millis() as i64),
                    member: timers::member(&r.name, v.id, v.to, v.campaign),
                    rule: i,
                });
            }
            if r.cancels_on(&v) {
                plan.timers.push(TimerOp::Cancel {
                    member: timers::member(&r.name, v.id, v.to, v.campaign),
                    rule: i,
                });
            }
        }
        true
    }

    pub fn by_name(&self, name: &str) -> Option<(usize, &Rule)> {
        self.0.iter().enumerate().find(|(_, r)| r.name == name)
    }
}

/// Which finished jobs the daemon keeps for follow-up sends (`{prefix}wfjob:{id}`): nothing
/// unless a send rule may need it, so a campaign without one pays nothing per message.
#[derive(Debug, Clone, Default)]
pub struct KeepJobs {
    delivered: Scope,
    bounced: Scope,
    ttl_secs: u64,
    keys: Option<Keys>,
}

#[derive(Debug, Clone, Default)]
struct Scope {
    all: bool,
    campaigns: HashSet<String>,
}

impl Scope {
    fn add(&mut self, campaign: Option<&str>) {
        match campaign {
            None => self.all = true,
            Some(c) => {
                self.campaigns.insert(c.to_string());
            }
        }
    }

    fn has(&self, campaign: &str) -> bool {
        self.all || (!self.campaigns.is_empty() && self.campaigns.contains(campaign))
    }
}

impl KeepJobs {
    pub fn new(settings: &Settings) -> KeepJobs {
        let mut keep = KeepJobs {
            keys: Some(Keys::new(&settings.redis.prefix)),
            ..Default::default()
        };
        let mut longest = Duration::ZERO;
        for w in settings.workflows.iter().filter(|w| w.send.is_some()) {
            // A bounce ends a job without a delivery; every other trigger follows one.
            if EventKind::parse(&w.on) == Some(EventKind::Bounced) {
                keep.bounced.add(w.campaign.as_deref());
            } else {
                keep.delivered.add(w.campaign.as_deref());
            }
            let span = w.within.map(|d| d.get()).unwrap_or_default()
                + w.delay.map(|d| d.get()).unwrap_or_default();
            longest = longest.max(span);
        }
        keep.ttl_secs = (longest + KEEP_JOB_EXTRA).as_secs();
        keep
    }

    /// `(key, job, ttl secs)` to store with a job's outcome (`delivered` or `bounced`), when a
    /// rule may send a follow-up for it.
    pub fn store(
        &self,
        outcome: EventKind,
        id: &str,
        campaign: &str,
        job: &[u8],
    ) -> Option<(String, Vec<u8>, u64)> {
        let scope = match outcome {
            EventKind::Delivered => &self.delivered,
            EventKind::Bounced => &self.bounced,
            _ => return None,
        };
        let keys = self.keys.as_ref()?;
        scope
            .has(campaign)
            .then(|| (keys.kept_job(id), job.to_vec(), self.ttl_secs))
    }
}

/// The follow-up job: the original's recipient, display name, data and sender overrides,
/// with the rule's template and campaign. Errors when the stored job is unreadable.
pub fn follow_up_job(
    stored: &[u8],
    id: &str,
    campaign: &str,
    template: &str,
    send_at: Option<i64>,
) -> Result<String, String> {
    let orig: Map<String, serde_json::Value> =
        serde_json::from_slice(stored).map_err(|e| format!("stored job unreadable: {e}"))?;
    let mut job = Map::new();
    job.insert("id".into(), id.into());
    job.insert("campaign".into(), campaign.into());
    job.insert("template".into(), template.into());
    for k in ["to", "to_name", "data", "from", "reply_to"] {
        if let Some(v) = orig.get(k).filter(|v| !v.is_null()) {
            job.insert(k.into(), v.clone());
        }
    }
    if !job.contains_key("to") {
        return Err("stored job has no recipient".into());
    }
    if let Some(t) = send_at {
        job.insert("send_at".into(), rfc3339_ms(t).into());
    }
    Ok(serde_json::Value::Object(job).to_string())
}

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
struct Done {
    timers: bool,
    webhooks: bool,
    sends: bool,
}

pub struct Engine {
    rules: Rules,
    keys: Keys,
    metrics: Arc<Metrics>,
    /// The engine's group on the events stream (`{redis.group}-workflows`).
    group: String,
    /// How long a follow-up's once-only marker lives.
    marker_ttl: u64,
    /// How long a cancelled timer is remembered: longer than an unacknowledged `delivered`
    /// can wait to be reclaimed and handled again.
    tombstone: Duration,
    /// Events up to this time (ms) have been read by the group; timers fire up to here.
    watermark: AtomicI64,
}

impl Engine {
    pub fn new(
        settings: &Settings,
        templates: &Templates,
        consumer: String,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<(Engine, StreamConsumer)> {
        let rules = Rules::from_settings(settings).map_err(anyhow::Error::msg)?;
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

    fn count(&self, rule: &str, action: &str, result: &str) {
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
        let mut backoff = Backoff::default();
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
        let mut delay = Duration::from_millis(50);
        loop {
            match self.apply(conn, &plan, &mut done, &ids).await {
                Ok(()) => return true,
                Err(e) => {
                    self.metrics.redis_errors.inc();
                    tracing::warn!(error = %e, events = ids.len(), "workflows: acting on events failed; retrying");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return false,
            }
            delay = (delay * 2).min(Duration::from_secs(2));
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
    async fn act(
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
                .map_err(anyhow::Error::msg)?,
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

#[cfg(test)]
mod tests;

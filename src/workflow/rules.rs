//! The rule model: what a `[[workflows]]` rule triggers on, what it does, which events and
//! timers it matches, and the follow-up job it makes; pure, without Redis.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::Map;

use super::timers;
use crate::config::{Settings, WorkflowRule};
use crate::queue::events::{rfc3339_ms, EventKind};
use crate::queue::Keys;

/// How long a delivered job's data is kept beyond the longest window + delay of the rules
/// that may send a follow-up for it.
pub const KEEP_JOB_EXTRA: Duration = Duration::from_secs(7 * 86400);
/// Longest job id (the job contract's limit); a follow-up id beyond it is not sent.
pub(super) const MAX_ID: usize = 200;

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
    /// A conversion attributed to the job (`POST /api/v1/conversions`), of `kind` if set.
    Converted,
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
            "converted" => Trigger::Converted,
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
            Trigger::Converted => "converted",
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
    /// `converted` rules: only conversions of this kind.
    pub kind: Option<String>,
    pub action: Action,
}

/// Why a `[[workflows]]` rule could not become a [`Rule`] (config validation refuses these
/// first; this is the engine's own check).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("workflow {rule}: unknown on = {on:?}")]
    UnknownTrigger { rule: String, on: String },
    #[error("workflow {rule}: set exactly one of send or webhook")]
    Action { rule: String },
}

impl Rule {
    pub fn from_config(w: &WorkflowRule) -> Result<Rule, RuleError> {
        let trigger = Trigger::parse(&w.on).ok_or_else(|| RuleError::UnknownTrigger {
            rule: w.name.clone(),
            on: w.on.clone(),
        })?;
        let action = match (&w.send, &w.webhook) {
            (Some(s), None) => Action::Send {
                template: s.template.clone(),
                campaign: s.campaign.clone(),
            },
            (None, Some(url)) => Action::Webhook(url.clone()),
            _ => {
                return Err(RuleError::Action {
                    rule: w.name.clone(),
                })
            }
        };
        Ok(Rule {
            name: w.name.clone(),
            campaign: w.campaign.clone(),
            trigger,
            link: w.link.clone(),
            within: w.within.map(|d| d.get()).unwrap_or_default(),
            delay: w.delay.map(|d| d.get()).unwrap_or_default(),
            machine: w.machine,
            kind: w.kind.clone(),
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
            && (self.trigger != Trigger::Converted
                || self.kind.is_none()
                || self.kind.as_deref() == ev.conversion_kind)
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
            // A purchase ends the wait for an open or a click: the person bought.
            "converted" => ev.conversion_kind == Some("purchase"),
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
    /// `converted` events: the conversion's kind.
    pub conversion_kind: Option<&'a str>,
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
            conversion_kind: if kind == "converted" { s("kind") } else { None },
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
    pub fn from_settings(settings: &Settings) -> Result<Rules, RuleError> {
        settings
            .workflows
            .iter()
            .map(Rule::from_config)
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

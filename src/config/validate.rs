//! The checks of a parsed config, one per section, in the order a config file is usually
//! read; the first refusal stops the start with a [`ConfigError::Key`] that names the key and
//! says what to change.

use std::time::Duration;

use super::secrets::{weak_secret, MAKE_SECRET};
use super::{
    ApiSettings, BackoffRule, BounceSettings, CapRule, ConfigError, ConversionSettings,
    DeliveryMode, DeliverySettings, EventSettings, ExperimentRule, GuardRule, IntakeSettings,
    ProviderSettings, RedisSettings, Settings, TlsMode, TrackingSettings, WebhookSettings,
    WorkflowRule,
};
use crate::values::{valid_variant_name, webhook_url, CampaignId, Networks, SendGridKey};

type Checked = Result<(), ConfigError>;

/// Refuses `key` with `reason` (which names the key, as every message here does).
fn bad(key: impl Into<String>, reason: impl Into<String>) -> Checked {
    Err(ConfigError::key(key, reason))
}

impl Settings {
    pub(super) fn validate(&self) -> Checked {
        guards(&self.guards)?;
        experiments(&self.experiments)?;
        self.api.validate(&self.tracking)?;
        self.providers.validate()?;
        self.bounces.validate()?;
        self.intake.validate()?;
        self.tracking.validate()?;
        self.conversions.validate()?;
        self.events.validate()?;
        self.redis.validate()?;
        self.delivery.validate()?;
        egress(self)?;
        backoff(&self.backoff)?;
        caps(&self.caps)?;
        workflows(&self.workflows)?;
        self.webhooks.validate(&self.workflows)
    }
}

fn guards(guards: &[GuardRule]) -> Checked {
    for (i, g) in guards.iter().enumerate() {
        let key = format!("guards[{i}]");
        if g.campaign != "*" {
            if let Err(e) = CampaignId::parse(g.campaign.clone()) {
                return bad(format!("{key}.campaign"), format!("{key}.campaign: {e}"));
            }
        }
        if g.bounce_rate.is_none() && g.complaint_rate.is_none() {
            return bad(&key, format!("{key} needs bounce_rate or complaint_rate"));
        }
    }
    Ok(())
}

fn experiments(rules: &[ExperimentRule]) -> Checked {
    for (i, x) in rules.iter().enumerate() {
        if let Err(e) = experiment(x, &rules[..i]) {
            return bad(
                format!("experiments[{i}]"),
                format!("experiments[{i}] ({}): {e}", x.campaign),
            );
        }
    }
    Ok(())
}

/// The checks of one `[[experiments]]` rule; `earlier` are the rules before it (a campaign
/// has one experiment at a time).
fn experiment(x: &ExperimentRule, earlier: &[ExperimentRule]) -> Result<(), String> {
    CampaignId::parse(x.campaign.clone()).map_err(|e| format!("campaign: {e}"))?;
    if earlier.iter().any(|e| e.campaign == x.campaign) {
        return Err("a campaign has one experiment at a time".into());
    }
    if !(2..=8).contains(&x.variants.len()) {
        return Err("an experiment has 2 to 8 variants".into());
    }
    for (i, v) in x.variants.iter().enumerate() {
        if !valid_variant_name(&v.name) {
            return Err(format!(
                "variant name {:?}: 1-32 of A-Z a-z 0-9 - _",
                v.name
            ));
        }
        if x.variants[..i].iter().any(|o| o.name == v.name) {
            return Err(format!("two variants are named {:?}", v.name));
        }
        if let Some(s) = &v.subject {
            if s.trim().is_empty() || s.chars().any(|c| c.is_control()) {
                return Err(format!(
                    "variant {:?}: subject must be one line of text",
                    v.name
                ));
            }
        }
    }
    if !x.variants.iter().any(|v| v.name == x.fallback) {
        return Err(format!(
            "fallback {:?} is not one of the variants",
            x.fallback
        ));
    }
    if x.test_share.0 <= 0.0 {
        return Err("test_share must be above 0%".into());
    }
    if !(0.5..1.0).contains(&x.confidence.0) {
        return Err("confidence must be at least 50% and below 100%".into());
    }
    if x.decide_after.get().is_zero() {
        return Err("decide_after must be above zero".into());
    }
    match (x.metric, x.currency.as_deref()) {
        (super::ExperimentMetric::Revenue, None) => {
            return Err("metric = \"revenue\" needs currency (such as \"EUR\")".into())
        }
        (super::ExperimentMetric::Revenue, Some(c)) => {
            let ok = c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase());
            if !ok {
                return Err(format!(
                    "currency {c:?} is not an ISO 4217 code such as EUR"
                ));
            }
        }
        (_, Some(_)) => return Err("currency applies to metric = \"revenue\" only".into()),
        (_, None) => {}
    }
    Ok(())
}

impl ApiSettings {
    /// `tracking`: its secret must differ from the API's tokens.
    fn validate(&self, tracking: &TrackingSettings) -> Checked {
        if self.listen.is_some() {
            if self.token.is_empty() {
                return bad("api.token", format!("api.token must be set with api.listen: every API request carries it as `Authorization: Bearer …`; {MAKE_SECRET} (PALOMA_API__TOKEN)"));
            }
            if let Some(why) = weak_secret(self.token.expose()) {
                return bad("api.token", format!("api.token is refused because {why}: anyone could enqueue mail and cancel campaigns with it; {MAKE_SECRET} (PALOMA_API__TOKEN)"));
            }
            if self.token.expose() == tracking.secret.expose() {
                return bad(
                    "api.token",
                    "api.token must differ from tracking.secret (a leaked API token must not sign links)",
                );
            }
            if let Some(r) = &self.report_token {
                if let Some(why) = weak_secret(r.expose()) {
                    return bad("api.report_token", format!("api.report_token is refused because {why}; {MAKE_SECRET} (PALOMA_API__REPORT_TOKEN)"));
                }
                if r.expose() == self.token.expose() || r.expose() == tracking.secret.expose() {
                    return bad(
                        "api.report_token",
                        "api.report_token must differ from api.token and tracking.secret",
                    );
                }
            }
        }
        if self.max_body_bytes < 1024
            || self.max_jobs == 0
            || self.max_connections == 0
            || self.timeout.get().is_zero()
        {
            return bad("api", "api.max_body_bytes must be at least 1024, and api.max_jobs, max_connections and timeout above zero");
        }
        Ok(())
    }
}

impl ProviderSettings {
    fn validate(&self) -> Checked {
        if let Some(k) = &self.sendgrid_public_key {
            if let Err(e) = SendGridKey::parse(k) {
                return bad("providers.sendgrid_public_key", e.to_string());
            }
        }
        Ok(())
    }
}

impl BounceSettings {
    fn validate(&self) -> Checked {
        if let Some(d) = &self.domain {
            let ok = !d.is_empty()
                && d.len() <= 200
                && d.split('.').all(|l| {
                    !l.is_empty() && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
                });
            if !ok {
                return bad(
                    "bounces.domain",
                    format!("bounces.domain {d:?} is not a domain name"),
                );
            }
        }
        if self.listen.is_some() && self.domain.is_none() {
            return bad(
                "bounces.domain",
                "bounces.listen needs bounces.domain (the domain it takes reports for)",
            );
        }
        if self.max_connections == 0 || self.max_message_bytes < 1024 {
            return bad("bounces", "bounces.max_connections must be above zero and bounces.max_message_bytes at least 1024");
        }
        if self.timeout.get().is_zero()
            || self.session_timeout.get().is_zero()
            || self.data_timeout.get().is_zero()
        {
            return bad(
                "bounces",
                "bounces.timeout, session_timeout and data_timeout must be above zero",
            );
        }
        Ok(())
    }
}

impl IntakeSettings {
    fn validate(&self) -> Checked {
        if self.workers == 0 || self.batch == 0 || self.event_batch == 0 {
            return bad(
                "intake",
                "intake.workers, intake.batch and intake.event_batch must be above zero",
            );
        }
        if self.claim_idle.get() < Duration::from_secs(1) {
            return bad("intake.claim_idle", "intake.claim_idle must be at least 1s: daemons reclaim each other's jobs idle that long");
        }
        Ok(())
    }
}

impl TrackingSettings {
    fn validate(&self) -> Checked {
        if self.secret.is_empty() {
            return bad("tracking.secret", format!("tracking.secret must be set: it signs every tracking and unsubscribe link; {MAKE_SECRET} (PALOMA_TRACKING__SECRET)"));
        }
        if let Some(why) = weak_secret(self.secret.expose()) {
            return bad("tracking.secret", format!("tracking.secret is refused because {why}: anyone could forge unsubscribe links and redirects from your tracking domain with it; {MAKE_SECRET} (PALOMA_TRACKING__SECRET)"));
        }
        for (kid, old) in &self.old_secrets {
            if let Some(why) = weak_secret(old.expose()) {
                return bad(format!("tracking.old_secrets.{kid}"), format!("tracking.old_secrets.{kid} is refused because {why}: tokens signed with it would still be accepted; remove it"));
            }
        }
        if self.repeat_window.get().is_zero()
            || self.max_connections == 0
            || self.header_timeout.get().is_zero()
        {
            return bad(
                "tracking",
                "tracking.repeat_window, max_connections and header_timeout must be above zero",
            );
        }
        if self.request_timeout.get().is_zero() {
            return bad(
                "tracking.request_timeout",
                "tracking.request_timeout must be above zero",
            );
        }
        if !self.base_url.starts_with("http://") && !self.base_url.starts_with("https://") {
            return bad(
                "tracking.base_url",
                format!(
                    "tracking.base_url {:?} must start with http:// or https://",
                    self.base_url
                ),
            );
        }
        if let Some(p) = &self.click_param {
            // Appended to URLs as is: a name that needs no escaping anywhere.
            if p.is_empty()
                || p.len() > 32
                || !p
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            {
                return bad(
                    "tracking.click_param",
                    format!("tracking.click_param {p:?} must be 1-32 of A-Z a-z 0-9 - _ ."),
                );
            }
        }
        for n in self.scanner_networks.iter().flatten() {
            if let Err(e) = Networks::parse_cidr(n) {
                return bad(
                    "tracking.scanner_networks",
                    format!("tracking.scanner_networks: {e}"),
                );
            }
        }
        Ok(())
    }
}

impl ConversionSettings {
    fn validate(&self) -> Checked {
        if self.window.get().is_zero() || self.id_retention.get().is_zero() {
            return bad(
                "conversions.window",
                "conversions.window and id_retention must be above zero",
            );
        }
        if self.id_retention.get() < self.window.get() {
            return bad(
                "conversions.id_retention",
                "conversions.id_retention must be at least conversions.window (an order retried within the window must be recognised)",
            );
        }
        if !(1..=100_000).contains(&self.max_items) {
            return bad(
                "conversions.max_items",
                "conversions.max_items must be 1 to 100000",
            );
        }
        Ok(())
    }
}

impl EventSettings {
    fn validate(&self) -> Checked {
        if self.max_len == 0 || self.max_age.get().is_zero() {
            return bad(
                "events",
                "events.max_len and events.max_age must be above zero",
            );
        }
        if self.hard_max_len() < self.max_len {
            return bad("events.hard_max_len", format!(
                "events.hard_max_len ({}) is below events.max_len ({}): raise it, or leave it out (default 10 × max_len)",
                self.hard_max_len(),
                self.max_len
            ));
        }
        Ok(())
    }
}

impl RedisSettings {
    fn validate(&self) -> Checked {
        let hw = self.high_water;
        if !(hw > 0.0 && hw < 1.0) {
            return bad("redis.high_water", format!(
                "redis.high_water = {hw} is not a share of maxmemory between 0 and 1 (exclusive): set e.g. 0.8 to refuse new jobs above 80% of maxmemory"
            ));
        }
        if !self.sentinels.is_empty() && !self.cluster_nodes.is_empty() {
            return bad("redis.sentinels", "redis.sentinels and redis.cluster_nodes are both set: a Redis Cluster fails over on its own; keep one of them");
        }
        if !self.sentinels.is_empty() && self.service_name.trim().is_empty() {
            return bad("redis.service_name", "redis.sentinels is set with an empty redis.service_name: set the name the Sentinels monitor (`sentinel monitor <name> …`)");
        }
        let t = self.ack_timeout.get();
        if t.is_zero() || t > Duration::from_secs(5) {
            return bad("redis.ack_timeout", format!(
                "redis.ack_timeout = {t:?} must be above zero and at most 5s (an answer waits for it; paloma's Redis connections give up after 10 s): set e.g. \"1s\""
            ));
        }
        Ok(())
    }
}

impl DeliverySettings {
    fn validate(&self) -> Checked {
        if self.retry_intervals.is_empty() {
            return bad(
                "delivery.retry_intervals",
                "delivery.retry_intervals must not be empty",
            );
        }
        if self.connections == 0 {
            return bad(
                "delivery.connections",
                "delivery.connections must be above zero",
            );
        }
        if self.username.is_some() && self.tls == TlsMode::Opportunistic {
            return bad("delivery.tls", "delivery.username is set with delivery.tls = \"opportunistic\", which does not verify the relay's certificate: an attacker on the path would get the password. Set delivery.tls = \"required\" (add delivery.tls_ca_file for a private CA), or tls = \"none\" for a trusted local relay");
        }
        if self.username.is_some() && self.password.is_none() {
            return bad(
                "delivery.password",
                "delivery.username is set without delivery.password (PALOMA_DELIVERY__PASSWORD)",
            );
        }
        for (key, list) in [
            ("prohibited_hosts", &self.prohibited_hosts),
            ("allowed_hosts", &self.allowed_hosts),
        ] {
            for n in list {
                if let Err(e) = Networks::parse_cidr(n) {
                    return bad(format!("delivery.{key}"), format!("delivery.{key}: {e}"));
                }
            }
        }
        let stages = [
            ("connect_timeout", self.connect_timeout),
            ("greeting_timeout", self.greeting_timeout),
            ("command_timeout", self.command_timeout),
            ("data_timeout", self.data_timeout),
            ("data_block_timeout", self.data_block_timeout),
            ("data_done_timeout", self.data_done_timeout),
        ];
        if let Some((name, _)) = stages
            .iter()
            .chain(self.timeout.as_ref().map(|t| ("timeout", *t)).iter())
            .find(|(_, t)| t.get().is_zero())
        {
            return bad(
                format!("delivery.{name}"),
                format!("delivery.{name} must be above zero"),
            );
        }
        if self.mx_max_hosts == 0
            || self.mx_max_addresses == 0
            || self.attempt_timeout.get().is_zero()
        {
            return bad(
                "delivery",
                "delivery.mx_max_hosts, mx_max_addresses and attempt_timeout must be above zero",
            );
        }
        if self.mode == DeliveryMode::Relay && self.relay.is_empty() {
            return bad("delivery.relay", "delivery.relay must be set in relay mode");
        }
        Ok(())
    }
}

fn backoff(rules: &[BackoffRule]) -> Checked {
    for (i, b) in rules.iter().enumerate() {
        let lowered = b.slow_to.is_some() || b.connections.is_some();
        if b.suspend.is_some() == lowered || lowered != b.slow_for.is_some() {
            return bad(
                format!("backoff[{i}]"),
                format!(
                    "backoff[{i}]: set either suspend, or slow_to and/or connections with slow_for"
                ),
            );
        }
        if b.connections == Some(0) {
            return bad(
                format!("backoff[{i}].connections"),
                format!(
                    "backoff[{i}].connections must be above zero (to stop sending, use suspend)"
                ),
            );
        }
    }
    Ok(())
}

fn caps(rules: &[CapRule]) -> Checked {
    for (i, c) in rules.iter().enumerate() {
        if c.max == 0 || c.per.get().is_zero() {
            return bad(
                format!("caps[{i}]"),
                format!("caps[{i}]: max and per must be above zero"),
            );
        }
    }
    Ok(())
}

/// The events a workflow rule can start on.
const ON: [&str; 11] = [
    "delivered",
    "opened",
    "clicked",
    "unsubscribed",
    "bounced",
    "returned",
    "complained",
    "campaign_paused",
    "not_opened",
    "not_clicked",
    "converted",
];

fn workflows(rules: &[WorkflowRule]) -> Checked {
    for (i, w) in rules.iter().enumerate() {
        let refused = |why: String| {
            bad(
                format!("workflows[{i}]"),
                format!("workflows[{i}] ({}): {why}", w.name),
            )
        };
        if !ON.contains(&w.on.as_str()) {
            return refused(format!("on = {:?} is not one of {ON:?}", w.on));
        }
        if w.send.is_some() == w.webhook.is_some() {
            return refused("set exactly one of send or webhook".into());
        }
        if w.on.starts_with("not_") && w.within.is_none() {
            return refused(format!("{} needs within", w.on));
        }
        if let Err(e) = workflow(w, &rules[..i]) {
            return refused(e);
        }
    }
    Ok(())
}

/// The checks of one `[[workflows]]` rule beyond `on` and the send/webhook choice; `earlier`
/// are the rules before it (names must be unique: they key timers, metrics and follow-up ids).
fn workflow(w: &WorkflowRule, earlier: &[WorkflowRule]) -> Result<(), String> {
    // The name goes into follow-up job ids (`wf:{name}:{id}`) and Redis keys, so it is kept
    // to characters that need no quoting anywhere and cannot be confused with a separator.
    if w.name.is_empty()
        || w.name.len() > 64
        || !w
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("name must be 1-64 of A-Z a-z 0-9 - _ .".into());
    }
    if earlier.iter().any(|e| e.name == w.name) {
        return Err("another rule has the same name".into());
    }
    if let Some(c) = &w.campaign {
        CampaignId::parse(c.clone()).map_err(|e| format!("campaign: {e}"))?;
    }
    if w.link.is_some() && !matches!(w.on.as_str(), "clicked" | "not_clicked") {
        return Err(format!(
            "link applies to clicked and not_clicked, not {}",
            w.on
        ));
    }
    if let Some(k) = &w.kind {
        if w.on != "converted" {
            return Err(format!("kind applies to converted, not {}", w.on));
        }
        if k.is_empty()
            || k.len() > 32
            || !k
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return Err(format!("kind {k:?} must be 1-32 of a-z 0-9 _ -"));
        }
    }
    if w.within.is_some() && !w.on.starts_with("not_") {
        return Err(format!(
            "within applies to not_opened and not_clicked, not {}",
            w.on
        ));
    }
    if let Some(send) = &w.send {
        if matches!(
            w.on.as_str(),
            "unsubscribed" | "complained" | "returned" | "campaign_paused"
        ) {
            return Err(format!("a send on {} would never go out (the address is suppressed or undeliverable); use a webhook", w.on));
        }
        if send.template.is_empty()
            || !send
                .template
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "send.template {:?} is not a template name",
                send.template
            ));
        }
        if let Some(c) = &send.campaign {
            CampaignId::parse(c.clone()).map_err(|e| format!("send.campaign: {e}"))?;
        }
    }
    if let Some(url) = &w.webhook {
        webhook_url(url).map_err(|e| format!("webhook: {e}"))?;
    }
    Ok(())
}

impl WebhookSettings {
    /// `workflows`: a webhook rule needs the signing secret.
    fn validate(&self, workflows: &[WorkflowRule]) -> Checked {
        if workflows.iter().any(|r| r.webhook.is_some()) && self.secret.is_none() {
            return bad("webhooks.secret", format!("webhooks.secret must be set when a workflow has a webhook: receivers check X-Paloma-Signature with it; {MAKE_SECRET} (PALOMA_WEBHOOKS__SECRET)"));
        }
        if let Some(why) = self.secret.as_ref().and_then(|s| weak_secret(s.expose())) {
            return bad("webhooks.secret", format!("webhooks.secret is refused because {why}: anyone could sign webhooks your receivers trust; {MAKE_SECRET} (PALOMA_WEBHOOKS__SECRET)"));
        }
        if self.retry_intervals.is_empty()
            || self.max_attempts == 0
            || self.concurrency == 0
            || self.timeout.get().is_zero()
        {
            return bad("webhooks", "webhooks.retry_intervals must not be empty; webhooks.max_attempts, concurrency and timeout must be above zero");
        }
        Ok(())
    }
}

/// `[[sources]]`, `[[pools]]` and `[delivery] pool`: every name is usable in keys, every
/// address is an IP address, every pool names known sources with some weight, warm-up plans
/// only ramp up.
fn egress(s: &Settings) -> Checked {
    use crate::values::valid_egress_name;
    if !s.sources.is_empty() && s.delivery.mode != DeliveryMode::Mx {
        return bad(
            "sources",
            "[[sources]] are for delivery.mode = \"mx\" (in relay mode the relay sends from its own addresses): remove them or set mode = \"mx\"",
        );
    }
    if s.sources.is_empty() && (!s.pools.is_empty() || s.delivery.pool.is_some()) {
        return bad(
            "pools",
            "[[pools]] and delivery.pool need [[sources]] to pick from: add [[sources]] (name, address, helo)",
        );
    }
    for (i, src) in s.sources.iter().enumerate() {
        let key = format!("sources[{i}]");
        if !valid_egress_name(&src.name) {
            return bad(
                format!("{key}.name"),
                format!("{key}.name {:?}: 1-64 of A-Z a-z 0-9 . _ -", src.name),
            );
        }
        if s.sources[..i].iter().any(|o| o.name == src.name) {
            return bad(
                format!("{key}.name"),
                format!(
                    "{key}.name {:?} is given twice: each source has a name of its own",
                    src.name
                ),
            );
        }
        match src.address.parse::<std::net::IpAddr>() {
            Ok(ip) if !ip.is_unspecified() && !ip.is_multicast() => {}
            _ => {
                return bad(
                    format!("{key}.address"),
                    format!(
                        "{key}.address {:?} ({}): give one IPv4 or IPv6 address of this host, such as \"203.0.113.10\"",
                        src.address, src.name
                    ),
                )
            }
        }
        let helo_ok = !src.helo.is_empty()
            && src.helo.len() <= 253
            && src
                .helo
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'));
        if !helo_ok {
            return bad(
                format!("{key}.helo"),
                format!(
                    "{key}.helo {:?} ({}): the host name the address's PTR gives, such as \"mta1.shop.example\"",
                    src.helo, src.name
                ),
            );
        }
        if let Some(w) = &src.warmup {
            let wkey = format!("{key}.warmup");
            if let Err(e) = w.start_day() {
                return bad(format!("{wkey}.start"), format!("{wkey}.start: {e}"));
            }
            if w.daily.is_empty() {
                return bad(
                    format!("{wkey}.daily"),
                    format!("{wkey}.daily is empty: give the messages allowed on day 1, 2, …"),
                );
            }
            if w.daily[0] == 0 {
                return bad(
                    format!("{wkey}.daily"),
                    format!("{wkey}.daily starts at 0: day 1 must allow some messages"),
                );
            }
            if let Some(d) = w.daily.windows(2).position(|p| p[1] < p[0]) {
                return bad(
                    format!("{wkey}.daily"),
                    format!(
                        "{wkey}.daily is out of order: day {} allows {} after {} on day {}; a warm-up only ramps up",
                        d + 2,
                        w.daily[d + 1],
                        w.daily[d],
                        d + 1
                    ),
                );
            }
        }
    }
    for (i, p) in s.pools.iter().enumerate() {
        let key = format!("pools[{i}]");
        if !valid_egress_name(&p.name) {
            return bad(
                format!("{key}.name"),
                format!("{key}.name {:?}: 1-64 of A-Z a-z 0-9 . _ -", p.name),
            );
        }
        if s.pools[..i].iter().any(|o| o.name == p.name) {
            return bad(
                format!("{key}.name"),
                format!("{key}.name {:?} is given twice", p.name),
            );
        }
        if p.sources.is_empty() {
            return bad(
                format!("{key}.sources"),
                format!(
                    "{key}.sources ({}) is empty: list {{ source = \"…\", weight = 1 }}",
                    p.name
                ),
            );
        }
        for (j, m) in p.sources.iter().enumerate() {
            if !s.sources.iter().any(|src| src.name == m.source) {
                let known: Vec<&str> = s.sources.iter().map(|s| s.name.as_str()).collect();
                return bad(
                    format!("{key}.sources[{j}].source"),
                    format!(
                        "{key}.sources[{j}] ({}) names no source {:?}: the [[sources]] are {}",
                        p.name,
                        m.source,
                        known.join(", ")
                    ),
                );
            }
            if p.sources[..j].iter().any(|o| o.source == m.source) {
                return bad(
                    format!("{key}.sources[{j}].source"),
                    format!(
                        "{key}.sources ({}) lists {:?} twice: give it one weight",
                        p.name, m.source
                    ),
                );
            }
        }
        if p.sources.iter().all(|m| m.weight == 0) {
            return bad(
                format!("{key}.sources"),
                format!("{key}.sources ({}): every weight is 0, so the pool could send nothing; give one source a weight above 0", p.name),
            );
        }
    }
    if let Some(pool) = &s.delivery.pool {
        if !s.pool_names().any(|n| n == pool) {
            return bad(
                "delivery.pool",
                format!(
                    "delivery.pool {pool:?} names no pool: the pools are {}",
                    s.pool_names().collect::<Vec<_>>().join(", ")
                ),
            );
        }
    } else if s.pools.len() > 1 {
        return bad(
            "delivery.pool",
            format!(
                "delivery.pool is not set and there are {} pools: name the default one ({})",
                s.pools.len(),
                s.pool_names().collect::<Vec<_>>().join(", ")
            ),
        );
    }
    Ok(())
}

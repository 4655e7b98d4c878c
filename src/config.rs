//! Settings: one tree, one struct per component, read from TOML and overridden by
//! `PALOMA_SECTION__KEY` environment variables.
//!
//! Durations and rates are written with their unit (`"30s"`, `"10/s"`) and parsed here,
//! once, into typed values; nothing downstream re-parses a string.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::values::{valid_variant_name, webhook_url, CampaignId, Networks, RedisUrl, SendGridKey};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole configuration, as `paloma run --config FILE` reads it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub redis: RedisSettings,
    #[serde(default)]
    pub templates: TemplateSettings,
    pub sender: SenderSettings,
    #[serde(default)]
    pub delivery: DeliverySettings,
    #[serde(default)]
    pub intake: IntakeSettings,
    #[serde(default)]
    pub domains: Vec<DomainRule>,
    /// Replies that suspend a destination (`[[backoff]]`).
    #[serde(default)]
    pub backoff: Vec<BackoffRule>,
    #[serde(default)]
    pub dkim: Vec<DkimSettings>,
    #[serde(default)]
    pub tracking: TrackingSettings,
    #[serde(default)]
    pub metrics: MetricsSettings,
    /// Frequency caps (`[[caps]]`): contact pressure per recipient across campaigns.
    #[serde(default)]
    pub caps: Vec<CapRule>,
    /// Workflow rules (see `[[workflows]]` in config/paloma.toml). Parsed and validated here;
    /// executed by the workflow engine.
    #[serde(default)]
    pub workflows: Vec<WorkflowRule>,
    /// Delivery of workflow webhooks: signing key, retries, timeout.
    #[serde(default)]
    pub webhooks: WebhookSettings,
    /// Retention of `{prefix}events`.
    #[serde(default)]
    pub events: EventSettings,
    /// Retention of finished campaigns' keys (`[campaigns]`).
    #[serde(default)]
    pub campaigns: CampaignSettings,
    /// Late bounces and complaints: VERP return paths and the inbound SMTP listener.
    #[serde(default)]
    pub bounces: BounceSettings,
    /// Bounces and complaints from sending providers' webhooks (on the tracking server).
    #[serde(default)]
    pub providers: ProviderSettings,
    /// Rules that pause a campaign when its bounce or complaint rate goes wrong.
    #[serde(default)]
    pub guards: Vec<GuardRule>,
    /// The HTTP API for campaign systems (off unless `listen` is set).
    #[serde(default)]
    pub api: ApiSettings,
    /// A/B tests of a campaign's template or subject, with a winner picked automatically.
    #[serde(default)]
    pub experiments: Vec<ExperimentRule>,
}

/// `[[experiments]]`: a share of a campaign's recipients is split evenly across the variants;
/// after `decide_after` the variant with the best rate of people's (not machines') unique
/// clicks (or opens) per delivered message wins, if it beats the runner-up at `confidence`,
/// else `fallback`; the rest of the campaign then goes out with the winner.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentRule {
    pub campaign: String,
    pub variants: Vec<VariantRule>,
    /// Of the campaign's recipients, in the test (split evenly across the variants).
    pub test_share: Percent,
    /// From the first job of the campaign seen, how long the test runs.
    pub decide_after: Dur,
    #[serde(default)]
    pub metric: ExperimentMetric,
    #[serde(default = "default_confidence")]
    pub confidence: Percent,
    /// The variant sent to the rest when no variant wins at `confidence`.
    pub fallback: String,
}

/// One variant: another template, another subject (Handlebars, on the job's template), or
/// neither (the job as it is: a control).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantRule {
    pub name: String,
    pub template: Option<String>,
    pub subject: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExperimentMetric {
    /// Unique human clicks per delivered message.
    #[default]
    Clicks,
    /// Unique human opens per delivered message.
    Opens,
}

impl ExperimentMetric {
    pub fn as_str(self) -> &'static str {
        match self {
            ExperimentMetric::Clicks => "clicks",
            ExperimentMetric::Opens => "opens",
        }
    }
}

fn default_confidence() -> Percent {
    Percent(0.95)
}

/// `[api]`: `/api/v1/…` behind a bearer token, on its own listener or, when `listen` is
/// `metrics.listen`, on the metrics one.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSettings {
    pub listen: Option<SocketAddr>,
    /// `Authorization: Bearer …`; required with `listen` (better: `PALOMA_API__TOKEN`).
    pub token: Secret,
    /// A read-only token that opens the report pages (`/campaigns`) and nothing else.
    pub report_token: Option<Secret>,
    /// Largest request body (bytes); larger ones get 413.
    pub max_body_bytes: usize,
    /// Jobs in one `POST /api/v1/sends`.
    pub max_jobs: usize,
    /// A request (its body included) must arrive within this.
    pub timeout: Dur,
    /// Connections served at once (see tracking.max_connections).
    pub max_connections: usize,
    /// The report's session cookie gets `Secure` (sent over HTTPS only). Unset: when
    /// `tracking.base_url` is https.
    pub secure_cookie: Option<bool>,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            listen: None,
            token: Secret::default(),
            report_token: None,
            max_body_bytes: 16 * 1024 * 1024,
            max_jobs: 50_000,
            timeout: "30s".parse().expect("valid default"),
            max_connections: 64,
            secure_cookie: None,
        }
    }
}

/// `[campaigns]`: a finished campaign (every job ended, none parked or held) with no
/// outcome for `retention` is archived: its counters and link clicks become one field of
/// `{prefix}campaigns:archive`, and its per-campaign keys (timeline, domains, touches,
/// variants, unique-count HyperLogLogs) are deleted.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CampaignSettings {
    pub retention: Dur,
}

impl Default for CampaignSettings {
    fn default() -> Self {
        Self {
            retention: "90d".parse().expect("valid default"),
        }
    }
}

/// `[providers]`: webhooks of the services paloma may relay through, each verified as the
/// provider documents it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderSettings {
    /// SendGrid's Event Webhook verification key (base64 of the P-256 public key, as its
    /// settings page shows it). Set: `POST /webhooks/sendgrid` takes signed events, and each
    /// message carries `X-SMTPAPI` unique args naming its job.
    pub sendgrid_public_key: Option<String>,
    /// A signed request older (or newer) than this is refused: a replay.
    pub max_skew: Dur,
    /// Amazon SES through SNS: the topics whose notifications are taken (`POST
    /// /webhooks/ses`); empty: off. A message from any other topic is refused.
    pub ses_topics: Vec<String>,
    /// Where SNS signing certificates may come from. Unset: `https://sns.{region}.amazonaws.com/…pem`,
    /// as AWS documents; tests point it at a local server.
    pub sns_cert_prefix: Option<String>,
}

impl Default for ProviderSettings {
    fn default() -> Self {
        Self {
            sendgrid_public_key: None,
            max_skew: "10m".parse().expect("valid default"),
            ses_topics: Vec::new(),
            sns_cert_prefix: None,
        }
    }
}

/// `[bounces]`: with `domain` set, each message's envelope sender is `b-{token}@domain`
/// (the token names the job, signed with `tracking.secret`), and `listen` takes in the
/// DSNs and feedback reports sent there.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BounceSettings {
    pub domain: Option<String>,
    pub listen: Option<SocketAddr>,
    /// More recipient addresses the listener accepts (e.g. the one registered with a
    /// feedback loop).
    pub accept: Vec<String>,
    /// How long a return-path token can be matched to its job (a Redis key per job).
    pub token_ttl: Dur,
    /// Largest message taken in (bytes); larger ones get 552.
    pub max_message_bytes: usize,
    /// Sessions at once; past it the oldest one not recording a report is closed (421) to
    /// make room for a new one.
    pub max_connections: usize,
    /// The longest wait for a client's next command or data line.
    pub timeout: Dur,
    /// The longest one session may last, however busy (then 421 and closed).
    pub session_timeout: Dur,
    /// The longest DATA may last, from 354 to the final dot (then 421 and closed).
    pub data_timeout: Dur,
    /// Message data held across all sessions beyond 64 KB each (bytes); a message that
    /// would need more is read to its end, not kept, and answered 452 (the sender retries).
    pub max_data_bytes: usize,
}

impl Default for BounceSettings {
    fn default() -> Self {
        Self {
            domain: None,
            listen: None,
            accept: Vec::new(),
            token_ttl: "30d".parse().expect("valid default"),
            max_message_bytes: 10 * 1024 * 1024,
            max_connections: 256,
            timeout: "30s".parse().expect("valid default"),
            session_timeout: "5m".parse().expect("valid default"),
            data_timeout: "2m".parse().expect("valid default"),
            max_data_bytes: 64 * 1024 * 1024,
        }
    }
}

/// How long `{prefix}events` keeps what it holds (`[events]`): at most `max_len` entries
/// and none older than `max_age`, trimmed every second or two by any daemon, but never past
/// an event the workflow engine has not read yet (see [`crate::queue::events::retain`]).
/// Counters in `stats:*` are not affected.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventSettings {
    pub max_len: u64,
    pub max_age: Dur,
    /// The bound every write keeps by itself (`XADD … MAXLEN ~`), workflows or not: the
    /// last resort against a workflow engine that never reads again. Default 10 × `max_len`.
    pub hard_max_len: Option<u64>,
}

impl EventSettings {
    /// `hard_max_len`, or its default.
    pub fn hard_max_len(&self) -> u64 {
        self.hard_max_len.unwrap_or(self.max_len.saturating_mul(10))
    }
}

impl Default for EventSettings {
    fn default() -> Self {
        Self {
            max_len: 1_000_000,
            max_age: "7d".parse().expect("valid default"),
            hard_max_len: None,
        }
    }
}

/// `Debug` shows the URLs without their passwords ([`RedisUrl`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    /// `redis://host:port/db`.
    pub url: RedisUrl,
    /// Redis Cluster seed nodes; when set, `url` is ignored.
    pub cluster_nodes: Vec<RedisUrl>,
    /// Every key and stream lives under this prefix.
    pub prefix: String,
    /// Consumer group shared by every daemon reading `{prefix}sends`.
    pub group: String,
    /// This daemon's consumer name; default: hostname, pid and a random suffix.
    pub consumer: Option<String>,
    /// Start even when Redis evicts keys (`maxmemory-policy` other than `noeviction`):
    /// evictions can drop the sends stream, idempotency records or the suppression list.
    pub allow_eviction: bool,
    /// Share of Redis's `maxmemory` above which new jobs are refused (`POST /api/v1/sends`
    /// answers 503, `paloma enqueue` stops), so that what is left still holds the outcomes
    /// of the jobs already accepted and recipients' opt-outs.
    pub high_water: f64,
    /// Replicas that must confirm a write before paloma acknowledges it to the outside
    /// (`WAIT`): an API 2xx, an unsubscribe, the bounce listener's 250, a CLI's exit 0.
    /// Unset: 1 when the primary has a connected replica at start, else 0.
    pub ack_replicas: Option<u32>,
    /// How long such a write waits for them before the answer is a refusal (503, 451, a
    /// non-zero exit).
    pub ack_timeout: Dur,
    /// Redis Sentinel addresses (`redis://host:port`); when set, the primary of
    /// `service_name` is found through them and followed across failovers, and `url` gives
    /// only the primary's credentials and database.
    pub sentinels: Vec<RedisUrl>,
    /// The name the Sentinels monitor the primary under.
    pub service_name: String,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: RedisUrl::from("redis://127.0.0.1:6379/"),
            cluster_nodes: Vec::new(),
            prefix: "paloma:".into(),
            group: "paloma".into(),
            consumer: None,
            allow_eviction: false,
            high_water: 0.8,
            ack_replicas: None,
            ack_timeout: Dur(Duration::from_secs(1)),
            sentinels: Vec::new(),
            service_name: "mymaster".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TemplateSettings {
    pub dir: PathBuf,
    /// Missing variables are render errors (dead-letter) instead of empty strings.
    pub strict: bool,
}

impl Default for TemplateSettings {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("templates"),
            strict: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SenderSettings {
    /// Default `From`, `Name <addr>` or `addr`.
    pub from: String,
    /// EHLO name.
    pub helo: String,
    /// Default `Reply-To`.
    #[serde(default)]
    pub reply_to: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryMode {
    Relay,
    Mx,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    None,
    Opportunistic,
    Required,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliverySettings {
    pub mode: DeliveryMode,
    /// Relay (smarthost) `host:port`, relay mode.
    pub relay: String,
    /// SMTP AUTH user for the relay (password from `password` or `PALOMA_DELIVERY__PASSWORD`).
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// Port on the MX hosts, mx mode.
    pub mx_port: u16,
    /// Resolver override, mx mode (`ip:port`); empty = system resolver.
    pub nameservers: Vec<String>,
    pub tls: TlsMode,
    /// PEM file of CA certificates trusted besides the public roots (a relay with a private CA).
    pub tls_ca_file: Option<PathBuf>,
    /// mx mode: destinations never connected to (CIDR); an MX host there bounces as a bad
    /// destination. Default: loopback, link-local (cloud metadata at 169.254.169.254) and
    /// "this host".
    pub prohibited_hosts: Vec<String>,
    /// mx mode: destinations connected to although `prohibited_hosts` covers them (CIDR),
    /// e.g. `["10.20.0.0/16"]` for internal mail servers reached through MX records.
    pub allowed_hosts: Vec<String>,
    /// mx mode: MX hosts tried per attempt (in preference order), and addresses over all.
    pub mx_max_hosts: usize,
    pub mx_max_addresses: usize,
    /// The longest one job may hold a worker (DNS, waiting for a session, every address
    /// tried, the transaction); past it the attempt is deferred.
    pub attempt_timeout: Dur,
    pub retry_intervals: Vec<Dur>,
    /// Give up (event `failed`) once a job is this old.
    pub max_age: Dur,
    /// Concurrent SMTP sessions (relay mode: to the relay; mx mode: the default per domain).
    pub connections: usize,
    /// Messages sent over one connection before it is closed and replaced.
    pub messages_per_connection: u32,
    /// Idle connections are closed after this long.
    pub idle_timeout: Dur,
    /// Per-stage SMTP timeouts (RFC 5321 §4.5.3.2; Postfix's `smtp_*_timeout`): TCP
    /// connect; the greeting, EHLO, STARTTLS and AUTH; MAIL and RCPT; DATA's 354; each
    /// write of the body; the reply after the final dot.
    pub connect_timeout: Dur,
    pub greeting_timeout: Dur,
    pub command_timeout: Dur,
    pub data_timeout: Dur,
    pub data_block_timeout: Dur,
    pub data_done_timeout: Dur,
    /// The former single timeout, kept for existing configs: when set, it caps every stage
    /// before the message is sent (connect, greeting, commands, DATA), never the body or
    /// the final reply.
    pub timeout: Option<Dur>,
    /// Largest rendered message (bytes).
    pub max_message_bytes: usize,
    /// mx mode: how long a site is suspended after a 421 or a "slow down" reply, when no
    /// `[[backoff]]` rule matches first.
    pub throttle_suspend: Dur,
    /// `[[domains]]` rates are held in Redis (GCRA under `{prefix}rate:`), so they bound the
    /// whole fleet of daemons sharing the prefix; false: each daemon keeps its own.
    pub shared_rates: bool,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            mode: DeliveryMode::Relay,
            relay: "127.0.0.1:2525".into(),
            username: None,
            password: None,
            mx_port: 25,
            nameservers: Vec::new(),
            tls: TlsMode::Opportunistic,
            tls_ca_file: None,
            prohibited_hosts: [
                "127.0.0.0/8",
                "::1/128",
                "169.254.0.0/16",
                "fe80::/10",
                "0.0.0.0/8",
                "::/128",
                // Private networks (RFC 1918, CGNAT, ULA): a recipient's DNS must not
                // point paloma at internal mail servers (allowed_hosts lets some in).
                "10.0.0.0/8",
                "172.16.0.0/12",
                "192.168.0.0/16",
                "100.64.0.0/10",
                "fc00::/7",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            allowed_hosts: Vec::new(),
            mx_max_hosts: 5,
            mx_max_addresses: 5,
            attempt_timeout: "3m".parse().expect("valid default"),
            retry_intervals: ["5m", "10m", "30m", "1h", "2h", "4h"]
                .iter()
                .map(|s| s.parse().expect("valid default"))
                .collect(),
            max_age: "5d".parse().expect("valid default"),
            connections: 32,
            messages_per_connection: 1000,
            idle_timeout: "30s".parse().expect("valid default"),
            connect_timeout: "30s".parse().expect("valid default"),
            greeting_timeout: "5m".parse().expect("valid default"),
            command_timeout: "5m".parse().expect("valid default"),
            data_timeout: "2m".parse().expect("valid default"),
            data_block_timeout: "3m".parse().expect("valid default"),
            data_done_timeout: "10m".parse().expect("valid default"),
            timeout: None,
            max_message_bytes: 10 * 1024 * 1024,
            throttle_suspend: "5m".parse().expect("valid default"),
            shared_rates: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IntakeSettings {
    /// Entries read per XREADGROUP.
    pub batch: usize,
    /// How long one blocking read waits for new entries.
    pub block: Dur,
    /// An entry pending this long with a consumer that stopped is reclaimed by another daemon
    /// (or by its own restart). Live daemons renew the entries they hold every third of it,
    /// so it need not cover a slow transaction; consumers with nothing pending and idle this
    /// long are removed from the group.
    pub claim_idle: Dur,
    /// Largest accepted job (bytes of JSON).
    pub max_job_bytes: usize,
    /// How long the idempotency record of a finished job is kept.
    pub idempotency_ttl: Dur,
    /// Jobs rendered or in SMTP at once (bounded: memory stays flat whatever waits in Redis).
    pub workers: usize,
    /// Events and acks are written per batch of at most this many outcomes.
    pub event_batch: usize,
}

impl Default for IntakeSettings {
    fn default() -> Self {
        Self {
            batch: 256,
            block: "1s".parse().expect("valid default"),
            claim_idle: "20s".parse().expect("valid default"),
            max_job_bytes: 256 * 1024,
            idempotency_ttl: "30d".parse().expect("valid default"),
            workers: 64,
            event_batch: 512,
        }
    }
}

/// Per-domain shaping (`[[domains]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainRule {
    /// A recipient domain (`gmail.com`), a suffix (`.example`), or `*` for the default.
    #[serde(rename = "match")]
    pub pattern: String,
    pub rate: Option<Rate>,
    pub connections: Option<usize>,
    pub messages_per_connection: Option<u32>,
}

/// At most `max` marketing messages per recipient in any window of `per` (transactional
/// jobs are exempt and not counted).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapRule {
    pub max: u32,
    pub per: Dur,
}

/// A guard (`[[guards]]`): pauses a campaign by itself when its figures go wrong. Rates are
/// strings like `"5%"` or `"0.3%"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardRule {
    /// One campaign, or `"*"` (every campaign).
    pub campaign: String,
    /// Hard bounces (synchronous and late) / attempted (delivered + bounced).
    pub bounce_rate: Option<Percent>,
    /// Complaints / delivered.
    pub complaint_rate: Option<Percent>,
    /// Attempted messages (since the last resume) before the guard judges.
    #[serde(default = "default_min_sent")]
    pub min_sent: u64,
}

fn default_min_sent() -> u64 {
    500
}

/// A share written `"5%"` (or `"0.3%"`), as a fraction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percent(pub f64);

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let v = s
            .trim()
            .strip_suffix('%')
            .and_then(|n| n.trim().parse::<f64>().ok())
            .filter(|v| (0.0..=100.0).contains(v))
            .ok_or_else(|| {
                serde::de::Error::custom(format!("{s:?} is not a percentage like \"5%\""))
            })?;
        Ok(Percent(v / 100.0))
    }
}

/// A reply pattern that suspends the destination it came from (`[[backoff]]`). Every field
/// given must match: `code` is a prefix of the reply code (`"421"`, `"45"`), `enhanced` a
/// prefix of the enhanced status (`"4.7."`), `text` a case-insensitive substring.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackoffRule {
    pub code: Option<String>,
    pub enhanced: Option<String>,
    pub text: Option<String>,
    /// Stop sending to the destination for this long…
    pub suspend: Option<Dur>,
    /// …or send to it at most at this rate for `slow_for`.
    pub slow_to: Option<Rate>,
    pub slow_for: Option<Dur>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimSettings {
    pub domain: String,
    pub selector: String,
    /// PKCS#8 (or PKCS#1 RSA) PEM file.
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrackingSettings {
    /// What links in mail point at (no trailing slash needed).
    pub base_url: String,
    pub listen: Option<SocketAddr>,
    /// HMAC key for tracking tokens. Keep it secret; rotate with `old_secrets`.
    pub secret: Secret,
    /// Earlier secrets, still accepted for mail already sent: `{ "1" = "…" }`, key id → secret.
    pub old_secrets: HashMap<String, Secret>,
    /// Key id of `secret`, written into new tokens.
    pub key_id: String,
    /// Add the open pixel and rewrite links.
    pub enabled: bool,
    /// Opens and clicks this soon after sending count as machine hits (security gateways
    /// fetch while the message is delivered). "0s" (the default) turns the rule off.
    pub machine_window: Dur,
    /// Address ranges whose hits are machine hits (CIDR). Unset: a built-in list of
    /// mail-security scanners and image proxies; `[]` turns the rule off.
    pub scanner_networks: Option<Vec<String>>,
    /// More ranges, one per line or CSV with the range first (Apple's Private Relay egress
    /// list, which Mail Privacy Protection fetches through, has this format).
    pub scanner_networks_file: Option<PathBuf>,
    /// Behind a reverse proxy: take the client address from the last `X-Forwarded-For` entry.
    pub trust_forwarded: bool,
    /// A repeat of the same pixel or link of the same message within this window is
    /// answered but not recorded (no event, no count): a person does not click one link a
    /// thousand times a minute, and a replayed link must not grow Redis.
    pub repeat_window: Dur,
    /// Connections served at once; past it the oldest idle or unfinished one is closed to
    /// make room. Never more than a third of the process's descriptor limit.
    pub max_connections: usize,
    /// A client must send its request headers within this, and an idle keep-alive
    /// connection is closed after it.
    pub header_timeout: Dur,
    /// A client must send its whole request, head and body, within this (counted from when
    /// the connection is ready for it): a body trickled a byte at a time holds no slot
    /// longer. At the cap a request still arriving is closed to make room, as an idle one.
    pub request_timeout: Dur,
}

impl Default for TrackingSettings {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:8080".into(),
            listen: None,
            secret: Secret::default(),
            old_secrets: HashMap::new(),
            key_id: "0".into(),
            enabled: true,
            machine_window: Dur(Duration::ZERO),
            scanner_networks: None,
            scanner_networks_file: None,
            trust_forwarded: false,
            repeat_window: "1h".parse().expect("valid default"),
            max_connections: 1024,
            header_timeout: "10s".parse().expect("valid default"),
            request_timeout: "20s".parse().expect("valid default"),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// `GET /metrics`, `/healthz`, `/readyz`.
    pub listen: Option<SocketAddr>,
    /// A campaign's series (`paloma_messages_total{campaign}`, engagement, links,
    /// complaints, experiments) are removed once none has moved for this long, so
    /// `/metrics` stays bounded however many campaigns are sent. Unset: 6 hours.
    pub campaign_idle: Option<Dur>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowRule {
    pub name: String,
    pub campaign: Option<String>,
    pub on: String,
    pub link: Option<String>,
    pub within: Option<Dur>,
    pub delay: Option<Dur>,
    #[serde(default)]
    pub machine: bool,
    pub send: Option<WorkflowSend>,
    pub webhook: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowSend {
    pub template: String,
    pub campaign: Option<String>,
}

/// How workflow webhooks are delivered (`[webhooks]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookSettings {
    /// HMAC-SHA256 key of `X-Paloma-Signature`, shared with the receivers. Required (≥ 16
    /// characters) when a workflow has a webhook. Deliberately not the tracking secret: a
    /// receiver holding that could forge click and unsubscribe tokens.
    pub secret: Option<Secret>,
    /// Wait before each retry of a failed POST; the last one repeats.
    pub retry_intervals: Vec<Dur>,
    /// POSTs tried (the first included) before the webhook goes to `{prefix}dead`.
    pub max_attempts: u32,
    /// Connect + request + response-head timeout of one POST.
    pub timeout: Dur,
    /// POSTs in flight at once per daemon.
    pub concurrency: usize,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            secret: None,
            retry_intervals: ["1s", "5s", "30s", "2m", "10m", "1h"]
                .iter()
                .map(|s| s.parse().expect("valid default"))
                .collect(),
            max_attempts: 12,
            timeout: "10s".parse().expect("valid default"),
            concurrency: 8,
        }
    }
}

/// A secret value (HMAC keys, passwords, tokens). Its `Debug` never shows it, so a logged
/// or printed `Settings` carries no secret; `expose()` is the one way to read it.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "[redacted]"
        })
    }
}

/// How to make a good secret, for the messages that refuse a weak one.
pub const MAKE_SECRET: &str = "make one with `openssl rand -hex 32` (or `head -c 32 /dev/urandom | base64`) and set it in the file or, better, in the environment";

/// Why `s` is too weak to sign links or guard an API, if it is: shorter than 16 characters,
/// a placeholder copied from an example (the shipped config's, "change-me", "secret", …),
/// or so repetitive that it is guessed in a few tries (fewer than 6 distinct characters).
pub fn weak_secret(s: &str) -> Option<&'static str> {
    let lower = s.trim().to_ascii_lowercase();
    let squashed: String = lower
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    const PLACEHOLDERS: [&str; 12] = [
        "changemetoalongrandomstring",
        "changeme",
        "replaceme",
        "yoursecret",
        "mysecret",
        "secret",
        "password",
        "example",
        "notsecret",
        "insecure",
        "placeholder",
        "todo",
    ];
    let distinct = {
        let mut seen: Vec<char> = s.chars().collect();
        seen.sort_unstable();
        seen.dedup();
        seen.len()
    };
    if s.len() < 16 {
        Some("it is shorter than 16 characters")
    } else if PLACEHOLDERS.iter().any(|p| {
        !squashed.is_empty()
            && squashed.len().is_multiple_of(p.len())
            && squashed == p.repeat(squashed.len() / p.len())
    }) || ["changeme", "replaceme", "yoursecret", "placeholder"]
        .iter()
        .any(|p| squashed.starts_with(p))
    {
        Some("it is a placeholder from an example, known to everyone")
    } else if distinct < 6 {
        Some("it has fewer than 6 distinct characters")
    } else {
        None
    }
}

/// A duration written with its unit: `500ms`, `2s`, `5m`, `1h`, `3d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Dur {
    pub fn get(self) -> Duration {
        self.0
    }
}

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(|| format!("duration {s:?} has no unit (ms, s, m, h, d)"))?;
        let (num, unit) = s.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("duration {s:?}: {num:?} is not a number"))?;
        let secs = match unit.trim() {
            "ms" => n / 1000.0,
            "s" => n,
            "m" | "min" => n * 60.0,
            "h" => n * 3600.0,
            "d" => n * 86400.0,
            "w" => n * 7.0 * 86400.0,
            u => return Err(format!("duration {s:?}: unknown unit {u:?}")),
        };
        if !secs.is_finite() || secs < 0.0 {
            return Err(format!("duration {s:?} out of range"));
        }
        // Finite and positive, it can still be past what a Duration holds (from_secs_f64
        // would panic on it).
        Duration::try_from_secs_f64(secs)
            .map(Dur)
            .map_err(|_| format!("duration {s:?} out of range"))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// A rate written as `count/unit`: `10/s`, `500/min`, `20000/h`, `100000/d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (n, unit) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| format!("rate {s:?} must look like \"10/s\""))?;
        let count: u32 = n
            .trim()
            .replace('_', "")
            .parse()
            .map_err(|_| format!("rate {s:?}: {n:?} is not a whole number"))?;
        if count == 0 {
            return Err(format!("rate {s:?} must be above zero"));
        }
        let per = match unit.trim() {
            "s" | "sec" => Duration::from_secs(1),
            "m" | "min" => Duration::from_secs(60),
            "h" | "hr" | "hour" => Duration::from_secs(3600),
            "d" | "day" => Duration::from_secs(86400),
            u => return Err(format!("rate {s:?}: unknown unit {u:?} (s, min, h, d)")),
        };
        Ok(Rate { count, per })
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Settings {
    /// Reads `path`, applies `PALOMA_SECTION__KEY` overrides from the process environment,
    /// and validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, std::env::vars())
    }

    /// Parses TOML text with the given environment overrides.
    pub fn from_toml(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut root: toml::Table = toml::from_str(text).map_err(|e| {
            // The parser quotes the offending line, which may be a secret's.
            let msg = e.to_string();
            let secrets: Vec<String> = text
                .lines()
                .filter_map(|l| l.split_once('='))
                .filter(|(k, _)| is_secret_key(k.trim()))
                .map(|(_, v)| v.trim().trim_matches('"').to_string())
                .collect();
            ConfigError::Invalid(scrub(msg, &secrets))
        })?;
        apply_env(&mut root, env)?;
        let mut secrets = Vec::new();
        collect_secrets(&toml::Value::Table(root.clone()), false, &mut secrets);
        let settings: Settings = toml::Value::Table(root)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(scrub(e.to_string(), &secrets)))?;
        settings.validate().map_err(|e| match e {
            ConfigError::Invalid(m) => ConfigError::Invalid(scrub(m, &secrets)),
            other => other,
        })?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        for (i, g) in self.guards.iter().enumerate() {
            if g.campaign != "*" {
                CampaignId::parse(g.campaign.clone())
                    .map_err(|e| ConfigError::Invalid(format!("guards[{i}].campaign: {e}")))?;
            }
            if g.bounce_rate.is_none() && g.complaint_rate.is_none() {
                return bad(format!("guards[{i}] needs bounce_rate or complaint_rate"));
            }
        }
        for (i, x) in self.experiments.iter().enumerate() {
            validate_experiment(x, &self.experiments[..i]).map_err(|e| {
                ConfigError::Invalid(format!("experiments[{i}] ({}): {e}", x.campaign))
            })?;
        }
        let a = &self.api;
        if a.listen.is_some() {
            if a.token.is_empty() {
                return bad(format!("api.token must be set with api.listen: every API request carries it as `Authorization: Bearer …`; {MAKE_SECRET} (PALOMA_API__TOKEN)"));
            }
            if let Some(why) = weak_secret(a.token.expose()) {
                return bad(format!("api.token is refused because {why}: anyone could enqueue mail and cancel campaigns with it; {MAKE_SECRET} (PALOMA_API__TOKEN)"));
            }
            if a.token.expose() == self.tracking.secret.expose() {
                return bad("api.token must differ from tracking.secret (a leaked API token must not sign links)".into());
            }
            if let Some(r) = &a.report_token {
                if let Some(why) = weak_secret(r.expose()) {
                    return bad(format!("api.report_token is refused because {why}; {MAKE_SECRET} (PALOMA_API__REPORT_TOKEN)"));
                }
                if r.expose() == a.token.expose() || r.expose() == self.tracking.secret.expose() {
                    return bad(
                        "api.report_token must differ from api.token and tracking.secret".into(),
                    );
                }
            }
        }
        if a.max_body_bytes < 1024
            || a.max_jobs == 0
            || a.max_connections == 0
            || a.timeout.get().is_zero()
        {
            return bad("api.max_body_bytes must be at least 1024, and api.max_jobs, max_connections and timeout above zero".into());
        }
        if let Some(k) = &self.providers.sendgrid_public_key {
            SendGridKey::parse(k).map_err(ConfigError::Invalid)?;
        }
        let b = &self.bounces;
        if let Some(d) = &b.domain {
            let ok = !d.is_empty()
                && d.len() <= 200
                && d.split('.').all(|l| {
                    !l.is_empty() && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
                });
            if !ok {
                return bad(format!("bounces.domain {d:?} is not a domain name"));
            }
        }
        if b.listen.is_some() && b.domain.is_none() {
            return bad(
                "bounces.listen needs bounces.domain (the domain it takes reports for)".into(),
            );
        }
        if b.max_connections == 0 || b.max_message_bytes < 1024 {
            return bad("bounces.max_connections must be above zero and bounces.max_message_bytes at least 1024".into());
        }
        if b.timeout.get().is_zero()
            || b.session_timeout.get().is_zero()
            || b.data_timeout.get().is_zero()
        {
            return bad(
                "bounces.timeout, session_timeout and data_timeout must be above zero".into(),
            );
        }
        if self.delivery.retry_intervals.is_empty() {
            return bad("delivery.retry_intervals must not be empty".into());
        }
        if self.delivery.connections == 0
            || self.intake.workers == 0
            || self.intake.batch == 0
            || self.intake.event_batch == 0
        {
            return bad(
                "delivery.connections, intake.workers, intake.batch and intake.event_batch must be above zero".into(),
            );
        }
        if self.intake.claim_idle.get() < Duration::from_secs(1) {
            return bad("intake.claim_idle must be at least 1s: daemons reclaim each other's jobs idle that long".into());
        }
        if self.tracking.secret.is_empty() {
            return bad(format!("tracking.secret must be set: it signs every tracking and unsubscribe link; {MAKE_SECRET} (PALOMA_TRACKING__SECRET)"));
        }
        if let Some(why) = weak_secret(self.tracking.secret.expose()) {
            return bad(format!("tracking.secret is refused because {why}: anyone could forge unsubscribe links and redirects from your tracking domain with it; {MAKE_SECRET} (PALOMA_TRACKING__SECRET)"));
        }
        for (kid, old) in &self.tracking.old_secrets {
            if let Some(why) = weak_secret(old.expose()) {
                return bad(format!("tracking.old_secrets.{kid} is refused because {why}: tokens signed with it would still be accepted; remove it"));
            }
        }
        if self.tracking.repeat_window.get().is_zero()
            || self.tracking.max_connections == 0
            || self.tracking.header_timeout.get().is_zero()
        {
            return bad(
                "tracking.repeat_window, max_connections and header_timeout must be above zero"
                    .into(),
            );
        }
        if self.tracking.request_timeout.get().is_zero() {
            return bad("tracking.request_timeout must be above zero".into());
        }
        if self.events.max_len == 0 || self.events.max_age.get().is_zero() {
            return bad("events.max_len and events.max_age must be above zero".into());
        }
        if self.events.hard_max_len() < self.events.max_len {
            return bad(format!(
                "events.hard_max_len ({}) is below events.max_len ({}): raise it, or leave it out (default 10 × max_len)",
                self.events.hard_max_len(),
                self.events.max_len
            ));
        }
        let hw = self.redis.high_water;
        if !(hw > 0.0 && hw < 1.0) {
            return bad(format!(
                "redis.high_water = {hw} is not a share of maxmemory between 0 and 1 (exclusive): set e.g. 0.8 to refuse new jobs above 80% of maxmemory"
            ));
        }
        let r = &self.redis;
        if !r.sentinels.is_empty() && !r.cluster_nodes.is_empty() {
            return bad("redis.sentinels and redis.cluster_nodes are both set: a Redis Cluster fails over on its own; keep one of them".into());
        }
        if !r.sentinels.is_empty() && r.service_name.trim().is_empty() {
            return bad("redis.sentinels is set with an empty redis.service_name: set the name the Sentinels monitor (`sentinel monitor <name> …`)".into());
        }
        if r.ack_timeout.get().is_zero() || r.ack_timeout.get() > Duration::from_secs(5) {
            return bad(format!(
                "redis.ack_timeout = {:?} must be above zero and at most 5s (an answer waits for it; paloma's Redis connections give up after 10 s): set e.g. \"1s\"",
                r.ack_timeout.get()
            ));
        }
        let d = &self.delivery;
        if d.username.is_some() && d.tls == TlsMode::Opportunistic {
            return bad("delivery.username is set with delivery.tls = \"opportunistic\", which does not verify the relay's certificate: an attacker on the path would get the password. Set delivery.tls = \"required\" (add delivery.tls_ca_file for a private CA), or tls = \"none\" for a trusted local relay".into());
        }
        if d.username.is_some() && d.password.is_none() {
            return bad(
                "delivery.username is set without delivery.password (PALOMA_DELIVERY__PASSWORD)"
                    .into(),
            );
        }
        for (key, list) in [
            ("prohibited_hosts", &d.prohibited_hosts),
            ("allowed_hosts", &d.allowed_hosts),
        ] {
            for n in list {
                if let Err(e) = Networks::parse_cidr(n) {
                    return bad(format!("delivery.{key}: {e}"));
                }
            }
        }
        let stages = [
            ("connect_timeout", d.connect_timeout),
            ("greeting_timeout", d.greeting_timeout),
            ("command_timeout", d.command_timeout),
            ("data_timeout", d.data_timeout),
            ("data_block_timeout", d.data_block_timeout),
            ("data_done_timeout", d.data_done_timeout),
        ];
        if let Some((name, _)) = stages
            .iter()
            .chain(d.timeout.as_ref().map(|t| ("timeout", *t)).iter())
            .find(|(_, t)| t.get().is_zero())
        {
            return bad(format!("delivery.{name} must be above zero"));
        }
        if d.mx_max_hosts == 0 || d.mx_max_addresses == 0 || d.attempt_timeout.get().is_zero() {
            return bad(
                "delivery.mx_max_hosts, mx_max_addresses and attempt_timeout must be above zero"
                    .into(),
            );
        }
        if !self.tracking.base_url.starts_with("http://")
            && !self.tracking.base_url.starts_with("https://")
        {
            return bad(format!(
                "tracking.base_url {:?} must start with http:// or https://",
                self.tracking.base_url
            ));
        }
        for n in self.tracking.scanner_networks.iter().flatten() {
            if let Err(e) = Networks::parse_cidr(n) {
                return bad(format!("tracking.scanner_networks: {e}"));
            }
        }
        if self.delivery.mode == DeliveryMode::Relay && self.delivery.relay.is_empty() {
            return bad("delivery.relay must be set in relay mode".into());
        }
        for (i, b) in self.backoff.iter().enumerate() {
            let slow = b.slow_to.is_some() && b.slow_for.is_some();
            if b.suspend.is_some() == slow || b.slow_to.is_some() != b.slow_for.is_some() {
                return bad(format!(
                    "backoff[{i}]: set either suspend, or slow_to and slow_for"
                ));
            }
        }
        for (i, c) in self.caps.iter().enumerate() {
            if c.max == 0 || c.per.get().is_zero() {
                return bad(format!("caps[{i}]: max and per must be above zero"));
            }
        }
        for (i, w) in self.workflows.iter().enumerate() {
            const ON: [&str; 10] = [
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
            ];
            if !ON.contains(&w.on.as_str()) {
                return bad(format!(
                    "workflows[{i}] ({}): on = {:?} is not one of {ON:?}",
                    w.name, w.on
                ));
            }
            if w.send.is_some() == w.webhook.is_some() {
                return bad(format!(
                    "workflows[{i}] ({}): set exactly one of send or webhook",
                    w.name
                ));
            }
            if w.on.starts_with("not_") && w.within.is_none() {
                return bad(format!(
                    "workflows[{i}] ({}): {} needs within",
                    w.name, w.on
                ));
            }
            if let Err(e) = validate_workflow(w, &self.workflows[..i]) {
                return bad(format!("workflows[{i}] ({}): {e}", w.name));
            }
        }
        let w = &self.webhooks;
        if self.workflows.iter().any(|r| r.webhook.is_some()) && w.secret.is_none() {
            return bad(format!("webhooks.secret must be set when a workflow has a webhook: receivers check X-Paloma-Signature with it; {MAKE_SECRET} (PALOMA_WEBHOOKS__SECRET)"));
        }
        if let Some(why) = w.secret.as_ref().and_then(|s| weak_secret(s.expose())) {
            return bad(format!("webhooks.secret is refused because {why}: anyone could sign webhooks your receivers trust; {MAKE_SECRET} (PALOMA_WEBHOOKS__SECRET)"));
        }
        if w.retry_intervals.is_empty()
            || w.max_attempts == 0
            || w.concurrency == 0
            || w.timeout.get().is_zero()
        {
            return bad("webhooks.retry_intervals must not be empty; webhooks.max_attempts, concurrency and timeout must be above zero".into());
        }
        Ok(())
    }
}

/// The checks of one `[[workflows]]` rule beyond `on` and the send/webhook choice; `earlier`
/// are the rules before it (names must be unique: they key timers, metrics and follow-up ids).
fn validate_experiment(x: &ExperimentRule, earlier: &[ExperimentRule]) -> Result<(), String> {
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
    Ok(())
}

fn validate_workflow(w: &WorkflowRule, earlier: &[WorkflowRule]) -> Result<(), String> {
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

/// Keys whose values are secrets: never echoed in an error, and read from the environment
/// as strings whatever they look like (a numeric password is still a password).
fn is_secret_key(key: &str) -> bool {
    let k = key.trim_matches('"').to_ascii_lowercase();
    matches!(k.as_str(), "secret" | "password" | "token" | "old_secrets")
        || k.ends_with("_secret")
        || k.ends_with("_password")
        || k.ends_with("_token")
}

/// Every secret value in the tree (and every Redis URL, which may carry a password).
fn collect_secrets(v: &toml::Value, under_secret: bool, out: &mut Vec<String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                if k == "url" || k == "cluster_nodes" || k == "sentinels" {
                    // Only the password part of a Redis URL (`redis://:pass@host`).
                    let urls: Vec<&str> = match v {
                        toml::Value::String(u) => vec![u.as_str()],
                        toml::Value::Array(a) => a.iter().filter_map(|u| u.as_str()).collect(),
                        _ => Vec::new(),
                    };
                    for u in urls {
                        if let Some((cred, _)) =
                            u.split_once("://").and_then(|(_, r)| r.rsplit_once('@'))
                        {
                            let pass = cred.rsplit_once(':').map_or(cred, |(_, p)| p);
                            out.push(pass.to_string());
                        }
                    }
                    continue;
                }
                collect_secrets(v, under_secret || is_secret_key(k), out);
            }
        }
        toml::Value::Array(a) => {
            for v in a {
                collect_secrets(v, under_secret, out);
            }
        }
        other if under_secret => {
            let s = match other {
                toml::Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            out.push(s);
        }
        _ => {}
    }
}

/// `msg` with every secret value in it replaced.
fn scrub(mut msg: String, secrets: &[String]) -> String {
    for s in secrets {
        // Very short values would blank out ordinary words; they are refused as weak anyway.
        if s.len() >= 3 && msg.contains(s.as_str()) {
            msg = msg.replace(s.as_str(), "[redacted]");
        }
    }
    msg
}

/// `PALOMA_DELIVERY__RELAY=host:port` sets `[delivery] relay`. Values are read as TOML when
/// they parse as such (numbers, booleans, arrays), else as plain strings.
fn apply_env(
    root: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("PALOMA_") else {
            continue;
        };
        let Some((section, key)) = rest.split_once("__") else {
            continue;
        };
        let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
        let parsed = if is_secret_key(&key) && key != "old_secrets" {
            toml::Value::String(value)
        } else {
            toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or(toml::Value::String(value))
        };
        let entry = root
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match entry {
            toml::Value::Table(t) => {
                t.insert(key, parsed);
            }
            _ => {
                return Err(ConfigError::Invalid(format!(
                    "{name}: [{section}] is not a table section"
                )))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[sender]
from = "Shop <news@shop.example>"
helo = "mta.shop.example"
[tracking]
secret = "0123456789abcdef0123"
"#;

    #[test]
    fn durations_and_rates_parse_with_units() {
        assert_eq!("2s".parse::<Dur>().unwrap().0, Duration::from_secs(2));
        assert_eq!("5m".parse::<Dur>().unwrap().0, Duration::from_secs(300));
        assert_eq!("3d".parse::<Dur>().unwrap().0, Duration::from_secs(259200));
        assert_eq!(
            "250ms".parse::<Dur>().unwrap().0,
            Duration::from_millis(250)
        );
        assert!("5".parse::<Dur>().is_err());
        assert!("5y".parse::<Dur>().is_err());
        let r: Rate = "500/min".parse().unwrap();
        assert_eq!((r.count, r.per), (500, Duration::from_secs(60)));
        assert!("0/s".parse::<Rate>().is_err());
        assert!("10".parse::<Rate>().is_err());
    }

    #[test]
    fn env_overrides_file() {
        let env = vec![
            (
                "PALOMA_DELIVERY__RELAY".to_string(),
                "10.0.0.1:25".to_string(),
            ),
            ("PALOMA_INTAKE__BATCH".to_string(), "64".to_string()),
            ("PALOMA_REDIS__PREFIX".to_string(), "x:".to_string()),
            ("HOME".to_string(), "/root".to_string()),
        ];
        let s = Settings::from_toml(MIN, env).unwrap();
        assert_eq!(s.delivery.relay, "10.0.0.1:25");
        assert_eq!(s.intake.batch, 64);
        assert_eq!(s.redis.prefix, "x:");
    }

    #[test]
    fn high_water_is_a_share_and_the_hard_bound_not_below_max_len() {
        let with = |k: &str, v: &str| {
            Settings::from_toml(MIN, vec![(k.to_string(), v.to_string())])
                .map_err(|e| e.to_string())
        };
        let s = with("PALOMA_REDIS__HIGH_WATER", "0.9").unwrap();
        assert_eq!(s.redis.high_water, 0.9);
        assert_eq!(s.events.hard_max_len(), 10_000_000);
        for bad in ["0", "1", "1.5", "-0.2"] {
            let e = with("PALOMA_REDIS__HIGH_WATER", bad).unwrap_err();
            assert!(e.contains("redis.high_water") && e.contains("0.8"), "{e}");
        }
        let e = with("PALOMA_EVENTS__HARD_MAX_LEN", "10").unwrap_err();
        assert!(e.contains("events.hard_max_len"), "{e}");
    }

    #[test]
    fn replicas_and_sentinels_are_checked_and_their_urls_hidden() {
        let with = |extra: &str| {
            let text = format!("{MIN}[redis]\n{extra}\n");
            Settings::from_toml(&text, Vec::<(String, String)>::new()).map_err(|e| e.to_string())
        };
        let s = with("sentinels = [\"redis://:pw-5f0c2e9a7d41@10.0.0.1:26379\"]\nservice_name = \"paloma\"\nack_replicas = 2\nack_timeout = \"250ms\"").unwrap();
        assert_eq!(s.redis.ack_replicas, Some(2));
        assert_eq!(s.redis.ack_timeout.get(), Duration::from_millis(250));
        assert!(!format!("{:?}", s.redis).contains("pw-5f0c2e9a7d41"));
        assert_eq!(with("").unwrap().redis.ack_replicas, None, "found at start");
        let e = with("sentinels = [\"redis://a:26379\"]\ncluster_nodes = [\"redis://b:7000\"]")
            .unwrap_err();
        assert!(
            e.contains("redis.sentinels") && e.contains("cluster_nodes"),
            "{e}"
        );
        let e = with("sentinels = [\"redis://a:26379\"]\nservice_name = \" \"").unwrap_err();
        assert!(e.contains("redis.service_name"), "{e}");
        for bad in ["0s", "6s"] {
            let e = with(&format!("ack_timeout = \"{bad}\"")).unwrap_err();
            assert!(e.contains("redis.ack_timeout"), "{e}");
        }
    }

    #[test]
    fn weak_and_example_secrets_are_refused_with_advice() {
        for weak in [
            "change-me-to-a-long-random-string",
            "CHANGE_ME_PLEASE_1234567",
            "changeme-changeme-changeme",
            "aaaaaaaaaaaaaaaaaaaaaaaa",
            "abababababababababababab",
            "short",
            "secret-secret-secret",
            "password",
            "your-secret-here-0000000",
        ] {
            let text = MIN.replace("0123456789abcdef0123", weak);
            let e = Settings::from_toml(&text, vec![]).unwrap_err().to_string();
            assert!(
                e.contains("tracking.secret") && e.contains("openssl rand"),
                "{weak}: {e}"
            );
            assert!(!e.contains(weak), "the secret is echoed: {e}");
        }
        assert!(weak_secret("9f2c41d07be85a3366e1c0f4d2b7a9e8").is_none());
        assert!(weak_secret("test-secret-0123456789abcdef").is_none());
        let hook = format!("{MIN}\n[webhooks]\nsecret = \"change-me-to-a-long-random-string\"\n");
        let e = Settings::from_toml(&hook, vec![]).unwrap_err().to_string();
        assert!(e.contains("webhooks.secret"), "{e}");
    }

    #[test]
    fn experiments_are_checked_with_what_to_change() {
        let x = |body: &str| {
            let text = format!(
                "{MIN}\n[[experiments]]\ncampaign = \"spring\"\ntest_share = \"20%\"\ndecide_after = \"4h\"\n{body}"
            );
            Settings::from_toml(&text, vec![])
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let two = "variants = [{ name = \"a\" }, { name = \"b\", subject = \"Hi\" }]\n";
        assert!(x(&format!("{two}fallback = \"a\"")).is_ok());
        let e = x(&format!("{two}fallback = \"z\"")).unwrap_err();
        assert!(
            e.contains("fallback \"z\" is not one of the variants"),
            "{e}"
        );
        let e = x("variants = [{ name = \"a\" }]\nfallback = \"a\"").unwrap_err();
        assert!(e.contains("2 to 8 variants"), "{e}");
        let e = x("variants = [{ name = \"a\" }, { name = \"a\" }]\nfallback = \"a\"").unwrap_err();
        assert!(e.contains("two variants are named"), "{e}");
        let e = x(&format!("{two}fallback = \"a\"\nconfidence = \"100%\"")).unwrap_err();
        assert!(e.contains("confidence"), "{e}");
        let e = x(&format!("{two}fallback = \"a\"\nmetric = \"revenue\"")).unwrap_err();
        assert!(e.contains("revenue") || e.contains("metric"), "{e}");
    }

    #[test]
    fn the_api_needs_a_strong_token_of_its_own() {
        let api = format!("{MIN}\n[api]\nlisten = \"127.0.0.1:0\"\n");
        let e = Settings::from_toml(&api, vec![]).unwrap_err().to_string();
        assert!(
            e.contains("api.token") && e.contains("PALOMA_API__TOKEN"),
            "{e}"
        );
        let weak = format!("{api}token = \"change-me-to-a-long-random-string\"\n");
        let e = Settings::from_toml(&weak, vec![]).unwrap_err().to_string();
        assert!(e.contains("api.token is refused"), "{e}");
        assert!(!e.contains("change-me-to"), "{e}");
        let same = format!("{api}token = \"0123456789abcdef0123\"\n");
        let e = Settings::from_toml(&same, vec![]).unwrap_err().to_string();
        assert!(e.contains("differ"), "{e}");
        let env = vec![(
            "PALOMA_API__TOKEN".to_string(),
            "4f1d9c2be7a05836d1e4".to_string(),
        )];
        let s = Settings::from_toml(&api, env).unwrap();
        assert_eq!(s.api.token.expose(), "4f1d9c2be7a05836d1e4");
        assert!(!format!("{s:?}").contains("4f1d9c2be7a05836d1e4"));
    }

    #[test]
    fn secrets_never_appear_in_errors_or_debug_output() {
        // A numeric password from the environment is a string, not a type error that
        // would print it back.
        let env = vec![
            ("PALOMA_DELIVERY__USERNAME".to_string(), "u".to_string()),
            (
                "PALOMA_DELIVERY__PASSWORD".to_string(),
                "918273645".to_string(),
            ),
            ("PALOMA_DELIVERY__TLS".to_string(), "none".to_string()),
        ];
        let s = Settings::from_toml(MIN, env).unwrap();
        assert_eq!(s.delivery.password.as_ref().unwrap().expose(), "918273645");
        let debug = format!("{s:?}");
        assert!(!debug.contains("918273645"), "{debug}");
        assert!(!debug.contains("0123456789abcdef0123"), "{debug}");
        // A secret of the wrong type in the file, and a bad value next to one.
        let text = format!("{MIN}\n[webhooks]\nsecret = 123456789012345678\n");
        let e = Settings::from_toml(&text, vec![]).unwrap_err().to_string();
        assert!(!e.contains("123456789012345678"), "{e}");
        let text = MIN.replace(
            "[tracking]",
            "[tracking]\nold_secrets = { \"1\" = 99887766554433 }",
        );
        let e = Settings::from_toml(&text, vec![]).unwrap_err().to_string();
        assert!(!e.contains("99887766554433"), "{e}");
        let text = format!("{MIN}\n[redis]\nurl = \"redis://:hunter2-pass@h:6379/\"\nprefix = 7\n");
        let e = Settings::from_toml(&text, vec![]).unwrap_err().to_string();
        assert!(!e.contains("hunter2-pass"), "{e}");
        let s = Settings::from_toml(
            &format!("{MIN}\n[redis]\nurl = \"redis://:hunter2-pass@h:6379/\"\n"),
            vec![],
        )
        .unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn credentials_need_a_verified_session_or_an_explicit_none() {
        let with = |tls: &str| {
            Settings::from_toml(
                &format!("{MIN}\n[delivery]\nusername = \"u\"\npassword = \"p4ss-word-long\"\ntls = \"{tls}\"\n"),
                vec![],
            )
        };
        let e = with("opportunistic").unwrap_err().to_string();
        assert!(e.contains("delivery.tls") && e.contains("required"), "{e}");
        assert!(with("required").is_ok());
        assert!(with("none").is_ok());
        // The default is opportunistic: a username alone is refused too.
        let e = Settings::from_toml(
            &format!("{MIN}\n[delivery]\nusername = \"u\"\npassword = \"p4ss-word-long\"\n"),
            vec![],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("opportunistic"), "{e}");
    }

    #[test]
    fn unknown_keys_and_missing_secret_are_errors() {
        let e = Settings::from_toml(&format!("{MIN}\n[delivery]\nrelai = \"x\"\n"), vec![])
            .unwrap_err();
        assert!(e.to_string().contains("relai"), "{e}");
        let e = Settings::from_toml("[sender]\nfrom=\"a@b.c\"\nhelo=\"h\"\n", vec![]).unwrap_err();
        assert!(e.to_string().contains("tracking.secret"), "{e}");
    }

    #[test]
    fn a_duration_too_long_for_a_duration_is_an_error_not_a_panic() {
        let e = "99999999999999999999999d".parse::<Dur>().unwrap_err();
        assert!(e.contains("out of range"), "{e}");
    }
}

#[cfg(test)]
mod shipped_config {
    #[test]
    fn the_documented_example_config_parses_once_given_a_real_secret() {
        let text = include_str!("../config/paloma.toml");
        // Its placeholder secret is refused, with advice on making one.
        let e = super::Settings::from_toml(text, Vec::new())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tracking.secret") && e.contains("openssl rand"),
            "{e}"
        );
        assert!(
            !e.contains("change-me"),
            "the refused value is not echoed: {e}"
        );
        let env = vec![(
            "PALOMA_TRACKING__SECRET".to_string(),
            "9f2c41d07be85a3366e1c0f4d2b7a9e8".to_string(),
        )];
        let s = super::Settings::from_toml(text, env).unwrap();
        assert_eq!(s.redis.prefix, "paloma:");
        assert_eq!(s.delivery.retry_intervals.len(), 6);
    }
}

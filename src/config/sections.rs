//! One struct per config section, with its defaults and what each key means.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{Dur, Percent, Rate, Secret};
use crate::values::RedisUrl;

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
    /// `metric = "revenue"`: the currency whose revenue is compared (ISO 4217; required
    /// then, as revenues in different currencies are never added).
    pub currency: Option<String>,
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
    /// People converting (`POST /api/v1/conversions`) per delivered message.
    Conversions,
    /// Revenue per delivered message (in the rule's `currency`), compared on log(1 + revenue).
    Revenue,
}

impl ExperimentMetric {
    pub fn as_str(self) -> &'static str {
        match self {
            ExperimentMetric::Clicks => "clicks",
            ExperimentMetric::Opens => "opens",
            ExperimentMetric::Conversions => "conversions",
            ExperimentMetric::Revenue => "revenue",
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
    /// PEM file of CA certificates trusted besides the public roots (a relay with a private
    /// CA; in mx mode also MTA-STS policy hosts and the MX hosts of an enforced policy).
    pub tls_ca_file: Option<PathBuf>,
    /// mx mode: MTA-STS (RFC 8461). A recipient domain's `enforce` policy limits delivery to
    /// the MX hosts it names, over verified STARTTLS (failures defer); `testing` is counted.
    pub mta_sts: bool,
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
    /// mx mode with `[[sources]]`: the pool a job leaves from unless its `pool` field names
    /// another (default: the only pool, or every source when no `[[pools]]` is given).
    pub pool: Option<String>,
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
            mta_sts: true,
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
            pool: None,
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
    /// …or send to it at most at this rate for `slow_for`…
    pub slow_to: Option<Rate>,
    pub slow_for: Option<Dur>,
    /// …or (and) open at most this many sessions to it at once for `slow_for`.
    pub connections: Option<usize>,
    /// Act only after this many matching replies from the destination (per source and
    /// site, counted for the fleet) within the period: `"3/10m"`. Absent: the first one.
    pub trigger: Option<super::Trigger>,
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
    /// Set: each tracked redirect appends `{click_param}=<click id>` to its target URL, a
    /// sealed id of the click (its message, time, and whether a person or a machine made
    /// it) that the shop posts back with a conversion (`POST /api/v1/conversions`).
    pub click_param: Option<String>,
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
            click_param: None,
        }
    }
}

/// `[conversions]`: what `POST /api/v1/conversions` attributes, and how much it takes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConversionSettings {
    /// A conversion is attributed to a person's click at most this long before it: by
    /// click id, that click; by address, the person's last human click.
    pub window: Dur,
    /// Conversions in one request; more are refused whole (413).
    pub max_items: usize,
    /// How long a conversion's `id` is remembered: a retry of the same order within it is
    /// answered as before and never counted twice; a conversion whose `at` is older is
    /// refused (its retry could no longer be recognised).
    pub id_retention: Dur,
}

impl Default for ConversionSettings {
    fn default() -> Self {
        Self {
            window: "7d".parse().expect("valid default"),
            max_items: 1000,
            id_retention: "30d".parse().expect("valid default"),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// `GET /metrics`, `/healthz`, `/readyz`.
    pub listen: Option<SocketAddr>,
    /// A campaign's series (`paloma_messages_total{campaign}`, engagement, links,
    /// complaints, experiments, conversions, revenue) are removed once none has moved for this long, so
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
    /// `on = "converted"` only: fire for conversions of this kind (`purchase`, `signup`…).
    pub kind: Option<String>,
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

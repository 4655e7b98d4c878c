//! Prometheus metrics. One registry per daemon (no process globals), so tests can run
//! several daemons in one process. Labels are low-cardinality: campaign and outcome, never
//! a recipient.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The `result` label values of `paloma_mta_sts_total` (see `deliver::mta_sts`).
pub const MTA_STS_RESULTS: &[&str] = &[
    "none",
    "enforce",
    "testing",
    "mx_mismatch",
    "testing_mx_mismatch",
    "fetch_failed",
    "tls_failed",
    "testing_tls_failed",
];

pub struct Metrics {
    pub registry: Registry,
    pub jobs_read: IntCounter,
    pub jobs_reclaimed: IntCounter,
    pub jobs_duplicate: IntCounter,
    /// Terminal and deferred outcomes by campaign: delivered, deferred, bounced, failed,
    /// suppressed, dead.
    pub messages: IntCounterVec,
    pub bounces: IntCounterVec,
    pub queue_lag: prometheus::Gauge,
    pub render_seconds: Histogram,
    pub smtp_seconds: HistogramVec,
    pub in_flight: IntGauge,
    pub event_batch: Histogram,
    pub redis_errors: IntCounter,
    pub scheduled_moved: IntCounter,
    /// Outcomes by destination rule (`[[domains]]` match, `*` for the rest).
    pub destination: IntCounterVec,
    /// Jobs put back in the delayed set to keep a destination's rate.
    pub shaping_delays: IntCounterVec,
    /// Jobs put back because their destination was suspended.
    pub suspended_delays: IntCounterVec,
    /// Sites suspended after a throttling reply.
    pub suspensions: IntCounterVec,
    /// Attempts by egress source and outcome (`-`: the implicit source).
    pub source_messages: IntCounterVec,
    /// Jobs put back until the next UTC day: every source of their pool at its warm-up cap.
    pub warmup_delays: IntCounterVec,
    /// Today's warm-up cap of each warming source (absent once the plan is over).
    pub source_cap: IntGaugeVec,
    pub sessions_open: IntGauge,
    /// MTA-STS results in mx mode ([`MTA_STS_RESULTS`]).
    pub mta_sts: IntCounterVec,
    /// Messages sent whole whose final reply never came (connection closed or
    /// `data_done_timeout`): deferred, and the receiver may have them.
    pub replies_lost: IntCounter,
    /// Outcomes not written because their stream entry had been reclaimed by another
    /// daemon (this one was stopped longer than `claim_idle`): that daemon ends the job.
    pub outcomes_fenced: IntCounter,
    pub sites_suspended: IntGauge,
    /// Operators' bounce directives in force, as this daemon's copy has them.
    pub bounce_directives: IntGauge,
    /// Tracking endpoint requests by kind (open, click, unsubscribe) and result.
    pub tracking_requests: IntCounterVec,
    pub tracking_events_dropped: IntCounter,
    /// Open and click events dead-lettered: one of their keys holds another type, or Redis
    /// kept refusing their batch.
    pub tracking_events_dead: IntCounter,
    /// Messages rendered and signed on a blocking thread (large ones).
    pub renders_blocking: IntCounter,
    pub machine_hits: IntCounterVec,
    /// Opens and clicks recorded, by campaign, type and human/machine.
    pub engagement: IntCounterVec,
    /// Sends opened / clicked at least once by a person, by campaign.
    pub engagement_unique: IntCounterVec,
    /// Human clicks per named link (names come from templates: bounded).
    pub link_clicks: IntCounterVec,
    /// Workflow actions by rule (config names: bounded), action (send, webhook, timer) and
    /// result.
    pub workflow_actions: IntCounterVec,
    /// Open connections per public HTTP listener (tracking, metrics).
    pub http_connections: IntGaugeVec,
    /// Connections closed to make room at the cap (`evicted`), refused (`all_busy`), or past
    /// the listener's whole-request deadline (`request_timeout`).
    pub http_refused: IntCounterVec,
    /// Checks of the Redis server (version, eviction, persistence): 1 passed, 0 failed.
    pub redis_check: IntGaugeVec,
    /// Consumers removed from a group (stopped daemons, nothing pending).
    pub consumers_removed: IntCounter,
    /// Jobs kept aside because their campaign is paused.
    pub jobs_parked: IntCounter,
    /// Campaigns paused by a guard, by reason.
    pub guard_trips: IntCounterVec,
    /// Messages the bounce listener took in, by what they were.
    pub reports: IntCounterVec,
    /// `returned` events by bounce class.
    pub returned: IntCounterVec,
    /// `complained` events by campaign.
    pub complaints: IntCounterVec,
    /// Bounce-listener sessions closed by a limit, by reason.
    pub bounce_sessions_closed: IntCounterVec,
    /// Campaigns this daemon's copy of the states holds as paused or cancelled.
    pub campaigns_held: IntGaugeVec,
    /// Outcomes of jobs in an experiment, by campaign, variant (config names) and outcome.
    pub experiment_messages: IntCounterVec,
    /// Experiments decided, by how: auto (significant), fallback, manual.
    pub experiment_decisions: IntCounterVec,
    /// API requests by route (the route's pattern: bounded) and status code.
    pub api_requests: IntCounterVec,
    /// Jobs posted to `POST /api/v1/sends`, accepted or refused.
    pub api_jobs: IntCounterVec,
    /// Conversions attributed (counted once per order id), by campaign and kind.
    pub conversions: IntCounterVec,
    /// Revenue of attributed conversions, in major units, by campaign and currency.
    pub revenue: prometheus::CounterVec,
    /// Conversions recorded but attributed to no campaign, by reason (no_click,
    /// outside_window, unknown_click, machine_click, transactional).
    pub conversions_unattributed: IntCounterVec,
    /// What Redis holds against what it may: stream lags, retention, memory.
    pub capacity: Capacity,
    pub replication: Replication,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let jobs_read = counter("paloma_jobs_read_total", "Jobs read from the sends stream.");
        let jobs_reclaimed = counter(
            "paloma_jobs_reclaimed_total",
            "Pending jobs reclaimed from a consumer that stopped.",
        );
        let jobs_duplicate = counter(
            "paloma_jobs_duplicate_total",
            "Jobs skipped because their id was already sent or is in progress.",
        );
        let redis_errors = counter(
            "paloma_redis_errors_total",
            "Failed Redis round trips (retried).",
        );
        let scheduled_moved = counter(
            "paloma_scheduled_moved_total",
            "Delayed jobs (retries, send_at) moved back to the sends stream.",
        );
        let messages = IntCounterVec::new(
            Opts::new(
                "paloma_messages_total",
                "Job outcomes by campaign and outcome.",
            ),
            &["campaign", "outcome"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(messages.clone()))
            .expect("unique metric");
        let bounces = IntCounterVec::new(
            Opts::new("paloma_bounces_total", "Bounces by class."),
            &["class"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(bounces.clone()))
            .expect("unique metric");
        let queue_lag = prometheus::Gauge::new(
            "paloma_queue_lag_seconds",
            "Age of the newest job read, at the time it was read.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(queue_lag.clone()))
            .expect("unique metric");
        let buckets = vec![
            0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
            0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        let render_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "paloma_render_seconds",
                "Render + MIME + DKIM time per message.",
            )
            .buckets(buckets.clone()),
        )
        .expect("valid metric");
        registry
            .register(Box::new(render_seconds.clone()))
            .expect("unique metric");
        let smtp_seconds = HistogramVec::new(
            HistogramOpts::new(
                "paloma_smtp_seconds",
                "SMTP transaction time per message, by result.",
            )
            .buckets(buckets),
            &["result"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(smtp_seconds.clone()))
            .expect("unique metric");
        let in_flight = IntGauge::new("paloma_in_flight", "Jobs being rendered or delivered.")
            .expect("valid metric");
        registry
            .register(Box::new(in_flight.clone()))
            .expect("unique metric");
        let event_batch = Histogram::with_opts(
            HistogramOpts::new(
                "paloma_event_batch_size",
                "Outcomes written per Redis transaction.",
            )
            .buckets(vec![1.0, 4.0, 16.0, 64.0, 256.0, 1024.0]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(event_batch.clone()))
            .expect("unique metric");
        let vec = |name: &str, help: &str, labels: &[&str]| {
            let v = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(v.clone()))
                .expect("unique metric");
            v
        };
        let destination = vec(
            "paloma_destination_messages_total",
            "Delivery outcomes by destination rule.",
            &["rule", "outcome"],
        );
        let shaping_delays = vec(
            "paloma_shaping_delays_total",
            "Jobs put back in the delayed set to keep their destination's rate.",
            &["rule"],
        );
        let suspended_delays = vec(
            "paloma_suspended_delays_total",
            "Jobs put back in the delayed set because their destination is suspended.",
            &["rule"],
        );
        let suspensions = vec(
            "paloma_suspensions_total",
            "Destinations suspended after a throttling reply.",
            &["rule"],
        );
        let source_messages = vec(
            "paloma_source_messages_total",
            "Delivery attempts by egress source ([[sources]]; - without sources) and outcome.",
            &["source", "outcome"],
        );
        let warmup_delays = vec(
            "paloma_warmup_delays_total",
            "Jobs put back until the next UTC day because every source of their pool was at its warm-up cap.",
            &["pool"],
        );
        let source_cap = IntGaugeVec::new(
            prometheus::Opts::new(
                "paloma_source_warmup_cap",
                "Today's warm-up cap of each warming egress source (0 before its start; absent once its plan is over).",
            ),
            &["source"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(source_cap.clone()))
            .expect("unique metric");
        let mta_sts = vec(
            "paloma_mta_sts_total",
            "MTA-STS in mx mode, by result: per route resolution none (no policy, or mode none), enforce, testing, mx_mismatch (enforce, no MX host listed: deferred), testing_mx_mismatch (testing, no MX host listed: delivered), fetch_failed (a TXT record but no policy fetched); per session tls_failed (enforce: no STARTTLS or a certificate not valid for the MX host: deferred).",
            &["result"],
        );
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let replies_lost = counter(
            "paloma_smtp_replies_lost_total",
            "Messages sent whole whose final reply never came (connection closed, or no reply within delivery.data_done_timeout): deferred; the receiver may have them.",
        );
        let outcomes_fenced = counter(
            "paloma_outcomes_fenced_total",
            "Outcomes dropped because another daemon had reclaimed their job while this one was stopped longer than intake.claim_idle (that daemon ends the job).",
        );
        let sessions_open = gauge(
            "paloma_smtp_sessions_open",
            "SMTP sessions open (busy and idle).",
        );
        let sites_suspended = gauge(
            "paloma_sites_suspended",
            "Destinations suspended right now.",
        );
        let bounce_directives = gauge(
            "paloma_bounce_directives",
            "Operators' bounce directives in force (paloma bounce --for), as this daemon's copy has them.",
        );
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            let _ = registry.register(Box::new(pc));
        }
        let tracking_requests = IntCounterVec::new(
            Opts::new(
                "paloma_tracking_requests_total",
                "Tracking requests by kind (open, click, unsubscribe) and result.",
            ),
            &["kind", "result"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(tracking_requests.clone()))
            .expect("unique metric");
        let engagement = vec(
            "paloma_engagement_total",
            "Opens and clicks recorded, by campaign, type and who (human or machine).",
            &["campaign", "type", "who"],
        );
        let engagement_unique = vec(
            "paloma_engagement_unique_total",
            "Sends opened or clicked at least once by a person, by campaign.",
            &["campaign", "type"],
        );
        let link_clicks = vec(
            "paloma_link_clicks_total",
            "Clicks by people on named links (data-paloma-link), by campaign.",
            &["campaign", "link"],
        );
        let machine_hits = vec(
            "paloma_machine_hits_total",
            "Opens and clicks judged machine-made, by the first rule that matched (agent, network, window, burst).",
            &["reason"],
        );
        let tracking_events_dropped = counter(
            "paloma_tracking_events_dropped_total",
            "Open and click events dropped because Redis fell behind.",
        );
        let renders_blocking = counter(
            "paloma_renders_blocking_total",
            "Messages rendered and DKIM-signed on a blocking thread because they are large.",
        );
        let tracking_events_dead = counter(
            "paloma_tracking_events_dead_total",
            "Open and click events put in the dead letters: a key of theirs holds another type, or Redis kept refusing their batch.",
        );
        let conversions = vec(
            "paloma_conversions_total",
            "Conversions attributed to a campaign (each order once), by campaign and kind.",
            &["campaign", "kind"],
        );
        let revenue = prometheus::CounterVec::new(
            Opts::new(
                "paloma_revenue_total",
                "Revenue of attributed conversions in major units (59.90 EUR adds 59.9), by campaign and currency.",
            ),
            &["campaign", "currency"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(revenue.clone()))
            .expect("unique metric");
        let conversions_unattributed = vec(
            "paloma_conversions_unattributed_total",
            "Conversions recorded but attributed to no campaign, by reason.",
            &["reason"],
        );
        let workflow_actions = vec(
            "paloma_workflow_actions_total",
            "Workflow actions by rule, action (send, webhook, timer) and result.",
            &["rule", "action", "result"],
        );
        let http_connections = IntGaugeVec::new(
            Opts::new(
                "paloma_http_connections",
                "Open connections per public HTTP listener.",
            ),
            &["listener"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(http_connections.clone()))
            .expect("unique metric");
        let http_refused = vec(
            "paloma_http_connections_closed_total",
            "Connections closed by a public listener: evicted (at the cap, the oldest idle or unfinished one, to make room), all_busy (refused at the cap) or request_timeout (a whole request, head and body, not in within the listener's request_timeout).",
            &["listener", "reason"],
        );
        let redis_check = IntGaugeVec::new(
            Opts::new(
                "paloma_redis_check",
                "Checks of the Redis server at start and every few seconds: version (>= 7.0), eviction (maxmemory-policy noeviction), persistence (AOF or RDB snapshots), memory (below redis.high_water of maxmemory, every second); 1 passed, 0 failed.",
            ),
            &["check"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(redis_check.clone()))
            .expect("unique metric");
        let consumers_removed = counter(
            "paloma_consumers_removed_total",
            "Consumers of stopped daemons (nothing pending, idle past intake.claim_idle) removed from the consumer groups.",
        );
        let reports = vec(
            "paloma_reports_total",
            "Messages to the bounce domain by kind: returned (a failed DSN), delayed (a delay DSN), complained (an ARF report), auto_reply (ignored), duplicate (already recorded), unmatched (no job of ours), forged (a token with a wrong MAC), other (nothing to act on).",
            &["kind"],
        );
        let returned = vec(
            "paloma_returned_total",
            "Late bounces (DSNs after acceptance, permanent or not) by bounce class.",
            &["class"],
        );
        let complaints = vec(
            "paloma_complaints_total",
            "Feedback-loop complaints by campaign.",
            &["campaign"],
        );
        let bounce_sessions_closed = vec(
            "paloma_bounce_sessions_closed_total",
            "Bounce-listener sessions closed by a limit: evicted (the oldest not recording, to make room at bounces.max_connections), all_busy (refused: every session recording), idle_timeout, data_timeout, session_timeout.",
            &["reason"],
        );
        let jobs_parked = counter(
            "paloma_jobs_parked_total",
            "Jobs kept aside (parked) because their campaign is paused; they go out on resume.",
        );
        let guard_trips = vec(
            "paloma_guard_trips_total",
            "Campaigns paused by a guard ([[guards]]), by reason: bounce_rate or complaint_rate.",
            &["reason"],
        );
        let campaigns_held = IntGaugeVec::new(
            Opts::new(
                "paloma_campaigns_held",
                "Campaigns this daemon currently sees paused or cancelled (its copy of the states, refreshed every 500 ms).",
            ),
            &["state"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(campaigns_held.clone()))
            .expect("unique metric");
        let experiment_messages = vec(
            "paloma_experiment_messages_total",
            "Outcomes of jobs in an experiment by campaign, variant and outcome.",
            &["campaign", "variant", "outcome"],
        );
        let experiment_decisions = vec(
            "paloma_experiment_decisions_total",
            "Experiments decided by this daemon, by how: auto (a significant winner), fallback (none was), manual (paloma experiment pick).",
            &["how"],
        );
        let api_requests = vec(
            "paloma_api_requests_total",
            "HTTP API requests by route pattern and status code.",
            &["route", "status"],
        );
        let api_jobs = vec(
            "paloma_api_jobs_total",
            "Jobs posted to POST /api/v1/sends, by result: accepted (written to the sends stream) or refused.",
            &["result"],
        );
        let capacity = Capacity::new(&registry);
        let replication = Replication::new(&registry);
        let m = Metrics {
            capacity,
            replication,
            experiment_messages,
            experiment_decisions,
            campaigns_held,
            api_requests,
            api_jobs,
            guard_trips,
            jobs_parked,
            reports,
            returned,
            complaints,
            bounce_sessions_closed,
            http_connections,
            http_refused,
            redis_check,
            consumers_removed,
            registry,
            jobs_read,
            jobs_reclaimed,
            jobs_duplicate,
            messages,
            bounces,
            queue_lag,
            render_seconds,
            smtp_seconds,
            in_flight,
            event_batch,
            redis_errors,
            scheduled_moved,
            destination,
            shaping_delays,
            suspended_delays,
            suspensions,
            source_messages,
            warmup_delays,
            source_cap,
            mta_sts,
            sessions_open,
            replies_lost,
            outcomes_fenced,
            sites_suspended,
            bounce_directives,
            tracking_requests,
            tracking_events_dropped,
            tracking_events_dead,
            renders_blocking,
            machine_hits,
            engagement,
            engagement_unique,
            link_clicks,
            workflow_actions,
            conversions,
            revenue,
            conversions_unattributed,
        };
        m.prime();
        m
    }

    /// Every series of a bounded label set, at zero: a dashboard shows 0, not "no data",
    /// for what has not happened yet, and a rate over a counter's first increment is right.
    fn prime(&self) {
        for c in crate::outcome::BounceClass::ALL {
            self.bounces.with_label_values(&[c.as_str()]);
            self.returned.with_label_values(&[c.as_str()]);
        }
        for r in ["bounce_rate", "complaint_rate"] {
            self.guard_trips.with_label_values(&[r]);
        }
        for k in [
            "returned",
            "delayed",
            "complained",
            "auto_reply",
            "duplicate",
            "unmatched",
            "forged",
            "other",
        ] {
            self.reports.with_label_values(&[k]);
        }
        for r in [
            "no_click",
            "outside_window",
            "unknown_click",
            "machine_click",
            "transactional",
        ] {
            self.conversions_unattributed.with_label_values(&[r]);
        }
        for r in ["agent", "network", "window", "burst"] {
            self.machine_hits.with_label_values(&[r]);
        }
        for r in ["accepted", "refused"] {
            self.api_jobs.with_label_values(&[r]);
        }
        for r in MTA_STS_RESULTS {
            self.mta_sts.with_label_values(&[r]);
        }
        for h in ["auto", "fallback", "manual"] {
            self.experiment_decisions.with_label_values(&[h]);
        }
        for s in ["paused", "cancelled"] {
            self.campaigns_held.with_label_values(&[s]);
        }
        for l in ["tracking", "metrics", "api"] {
            self.http_connections.with_label_values(&[l]);
            for r in ["evicted", "all_busy", "request_timeout"] {
                self.http_refused.with_label_values(&[l, r]);
            }
        }
    }

    /// The egress series of each source (`-` without sources) and pool, at zero.
    pub fn prime_egress<'a>(
        &self,
        sources: impl Iterator<Item = &'a str>,
        pools: impl Iterator<Item = &'a str>,
    ) {
        for s in sources {
            for o in ["delivered", "deferred", "bounced"] {
                self.source_messages.with_label_values(&[s, o]);
            }
        }
        for p in pools {
            self.warmup_delays.with_label_values(&[p]);
        }
    }

    /// The shaping series of each configured `[[domains]]` rule (and the default `*`), at
    /// zero.
    pub fn prime_rules<'a>(&self, patterns: impl Iterator<Item = &'a str>) {
        for p in patterns.chain(std::iter::once("*")) {
            let p = p.to_ascii_lowercase();
            self.shaping_delays.with_label_values(&[p.as_str()]);
            self.suspended_delays.with_label_values(&[p.as_str()]);
            self.suspensions.with_label_values(&[p.as_str()]);
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// How full Redis is and how far behind its readers are: consumer-group lag, the events
/// retention held back for the workflow engine, memory against `maxmemory`.
pub struct Capacity {
    /// Entries of `{prefix}sends` / `{prefix}events` not yet delivered to each group.
    pub stream_lag: IntGaugeVec,
    /// Events kept past `[events] max_len` because the workflow group has not read them.
    pub events_held: IntGauge,
    /// How far past `[events] max_age` the oldest event is kept for the workflow group.
    pub events_held_seconds: IntGauge,
    /// Events trimmed by `[events] hard_max_len` before the workflow group read them.
    pub events_lost: IntCounter,
    /// Redis `used_memory` / `maxmemory` (0 without a limit).
    pub redis_memory_ratio: prometheus::Gauge,
}

impl Capacity {
    fn new(registry: &Registry) -> Capacity {
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
            r.register(Box::new(m.clone())).expect("unique metric");
            m
        }
        Capacity {
            stream_lag: reg(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "paloma_stream_lag",
                        "Entries of the sends and events streams not yet delivered to each consumer group (XINFO GROUPS lag), refreshed every second or two.",
                    ),
                    &["group"],
                )
                .expect("valid metric"),
            ),
            events_held: reg(
                registry,
                IntGauge::new(
                    "paloma_events_held",
                    "Events kept past events.max_len because the workflow engine has not read them yet (0: retention as configured).",
                )
                .expect("valid metric"),
            ),
            events_held_seconds: reg(
                registry,
                IntGauge::new(
                    "paloma_events_held_seconds",
                    "How far past events.max_age the oldest event is kept because the workflow engine has not read it yet.",
                )
                .expect("valid metric"),
            ),
            events_lost: reg(
                registry,
                IntCounter::new(
                    "paloma_events_lost_total",
                    "Events trimmed by events.hard_max_len before the workflow engine read them (their follow-ups, webhooks and timers are lost), as seen by this daemon.",
                )
                .expect("valid metric"),
            ),
            redis_memory_ratio: reg(
                registry,
                prometheus::Gauge::new(
                    "paloma_redis_memory_ratio",
                    "Redis used_memory / maxmemory, checked every second (0 when Redis has no maxmemory); above redis.high_water new jobs are refused.",
                )
                .expect("valid metric"),
            ),
        }
    }
}

/// Whether what paloma acknowledges is on a replica too (`redis.ack_replicas`).
pub struct Replication {
    /// Acknowledgements refused because the replicas did not confirm the write in
    /// `redis.ack_timeout`, by where the answer was due.
    pub ack_timeouts: IntCounterVec,
    /// Replicas the primary reports online (INFO replication), checked every few seconds.
    pub replicas: IntGauge,
    /// The largest replica lag the primary reports, in seconds since its last ack.
    pub lag_seconds: IntGauge,
}

impl Replication {
    fn new(registry: &Registry) -> Replication {
        let ack_timeouts = IntCounterVec::new(
            Opts::new(
                "paloma_ack_timeouts_total",
                "Writes paloma did not acknowledge (503, 451, a CLI error) because redis.ack_replicas replicas did not confirm them within redis.ack_timeout, by path.",
            ),
            &["path"],
        )
        .expect("valid metric");
        let replicas = IntGauge::new(
            "paloma_redis_replicas",
            "Replicas the Redis primary reports online (INFO replication), checked every few seconds.",
        )
        .expect("valid metric");
        let lag_seconds = IntGauge::new(
            "paloma_redis_replica_lag_seconds",
            "The largest lag the Redis primary reports for its replicas (seconds since a replica last confirmed), checked every few seconds.",
        )
        .expect("valid metric");
        for m in [
            Box::new(ack_timeouts.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(replicas.clone()),
            Box::new(lag_seconds.clone()),
        ] {
            registry.register(m).expect("unique metric");
        }
        Replication {
            ack_timeouts,
            replicas,
            lag_seconds,
        }
    }
}

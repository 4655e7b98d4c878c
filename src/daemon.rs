//! The daemon's wiring: [`App::build`] makes every component from its own settings, connects
//! to Redis and binds every listener (so a caller may ask for port 0 and read the bound
//! address back); [`App::run`] starts the background loops and the pipeline
//! ([`crate::pipeline`]) and, once `shutdown` completes, drains: stops reading, lets
//! in-flight jobs finish (for up to 8 s), writes their outcomes and closes SMTP sessions.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rand::Rng;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::config::Settings;
use crate::deliver::Deliverer;
use crate::metrics::Metrics;
use crate::pipeline::next::Retry;
use crate::pipeline::recorder::Recorder;
use crate::pipeline::Stages;
use crate::policy::caps::Caps;
use crate::queue::leases::{self, Leases};
use crate::queue::sends::SendsReader;
use crate::queue::{scheduler, Keys};
use crate::render::{DkimKeys, Renderer, Templates};
use crate::shape::Shaper;
use crate::store::checks::Health;
use crate::store::replication::Acks;
use crate::store::{connect, redis_target, RedisConn, RedisTarget};

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

/// A daemon, built and bound, not yet running.
pub struct App {
    settings: Settings,
    renderer: Renderer,
    metrics: Arc<Metrics>,
    keys: Keys,
    client: RedisTarget,
    conn: RedisConn,
    health: Arc<Health>,
    acks: Arc<Acks>,
    shaper: Arc<Shaper>,
    deliverer: Deliverer,
    sessions: Arc<AtomicI64>,
    intake: SendsReader,
    consumer: String,
    metrics_listener: Option<TcpListener>,
    tracking_listener: Option<TcpListener>,
    bounce_listener: Option<TcpListener>,
    /// None also when the API shares the metrics listener.
    api_listener: Option<TcpListener>,
}

async fn bind(key: &str, addr: Option<SocketAddr>) -> anyhow::Result<Option<TcpListener>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let l = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("{key} {addr}: {e}"))?;
    Ok(Some(l))
}

impl App {
    /// Loads templates and keys, connects to Redis (waiting up to a minute for it to
    /// serve), checks the server, creates the sends consumer group and binds the listeners.
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        let templates = Templates::load(&settings.templates.dir, settings.templates.strict)?;
        let dkim = DkimKeys::load(&settings.dkim)?;
        let renderer = Renderer::new(&settings, templates, dkim)?;
        let metrics = Arc::new(Metrics::new());
        metrics.prime_rules(settings.domains.iter().map(|d| d.pattern.as_str()));
        let keys = Keys::new(&settings.redis.prefix).retaining(&settings.events);

        let client = redis_target(&settings).await?;
        let i = &settings.intake;
        let conn = crate::store::connect_when_serving(
            &client,
            Duration::from_secs(10),
            &keys.sends,
            Duration::from_secs(60),
        )
        .await?;
        let reader = connect(&client, i.block.get() + Duration::from_secs(5)).await?;
        let health = Arc::new(Health::default());
        match crate::store::checks::facts(&mut conn.clone()).await {
            Ok(Some(f)) => {
                for w in f.findings() {
                    tracing::warn!("{w}");
                }
                crate::store::checks::judge(&f, settings.redis.allow_eviction, &metrics, &health)
                    .map_err(anyhow::Error::msg)?;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "could not check the Redis server (INFO)"),
        }
        let acks = Arc::new(
            Acks::start(
                Some(&client),
                &mut conn.clone(),
                &settings.redis,
                metrics.clone(),
                Some(health.clone()),
            )
            .await?,
        );
        let shaper = Arc::new(Shaper::with_redis(&settings, Some(conn.clone())));
        let sessions = Arc::new(AtomicI64::new(0));
        let deliverer = Deliverer::new(
            &settings.delivery,
            &settings.sender.helo,
            shaper.clone(),
            sessions.clone(),
            crate::deliver::mta_sts::Shared {
                redis: Some(conn.clone()),
                key_prefix: keys.mta_sts.clone(),
                results: metrics.mta_sts.clone(),
            },
        )
        .await?;
        let consumer = consumer_name(&settings);
        let mut intake = SendsReader::new(
            reader,
            conn.clone(),
            keys.clone(),
            &settings.redis.group,
            &consumer,
            i,
        );
        intake
            .ensure_group()
            .await
            .context("creating the consumer group")?;
        let metrics_listener = bind("metrics.listen", settings.metrics.listen).await?;
        let tracking_listener = bind("tracking.listen", settings.tracking.listen).await?;
        let bounce_listener = bind("bounces.listen", settings.bounces.listen).await?;
        let api_listener = match settings.api.listen {
            Some(a) if Some(a) == settings.metrics.listen => None,
            a => bind("api.listen", a).await?,
        };
        Ok(App {
            settings,
            renderer,
            metrics,
            keys,
            client,
            conn,
            health,
            acks,
            shaper,
            deliverer,
            sessions,
            intake,
            consumer,
            metrics_listener,
            tracking_listener,
            bounce_listener,
            api_listener,
        })
    }

    /// Where the API listens, if it does (the metrics address when it shares that one).
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.settings.api.listen?;
        match &self.api_listener {
            Some(l) => l.local_addr().ok(),
            None => self.metrics_addr(),
        }
    }

    /// Where the bounce listener listens, if it does.
    pub fn bounces_addr(&self) -> Option<SocketAddr> {
        self.bounce_listener.as_ref()?.local_addr().ok()
    }

    /// Where the metrics endpoint listens, if it does.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref()?.local_addr().ok()
    }

    /// Where the tracking server listens, if it does.
    pub fn tracking_addr(&self) -> Option<SocketAddr> {
        self.tracking_listener.as_ref()?.local_addr().ok()
    }

    /// Runs until `shutdown` completes, then drains.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let App {
            settings,
            renderer,
            metrics,
            keys,
            client,
            conn,
            health,
            acks,
            shaper,
            deliverer,
            sessions,
            mut intake,
            consumer,
            metrics_listener,
            tracking_listener,
            bounce_listener,
            api_listener,
        } = self;
        let i = &settings.intake;
        let group = settings.redis.group.clone();
        let leases = Arc::new(Leases::new(
            keys.clone(),
            group.clone(),
            consumer.clone(),
            i.claim_idle.get(),
        ));
        // Its own connection: the fenced write WATCHes a key (see pipeline::recorder).
        let recorder_conn = connect(&client, Duration::from_secs(10)).await?;
        let (recorder, handle) = Recorder::new(
            recorder_conn,
            keys.clone(),
            group.clone(),
            consumer.clone(),
            i.idempotency_ttl.get(),
            i.event_batch,
            metrics.clone(),
            leases.clone(),
        );
        let recorder_task = tokio::spawn(recorder.run());
        // `stop`: shutdown has begun (intake, scheduler and waiting workers stop);
        // `exit`: the drain is over (lease renewal and the listeners stop).
        let (stop_tx, stop_rx) = watch::channel(false);
        let (exit_tx, exit_rx) = watch::channel(false);
        let scheduler_task = tokio::spawn(scheduler::run(
            conn.clone(),
            keys.clone(),
            i.idempotency_ttl.get(),
            Duration::from_millis(250),
            metrics.clone(),
            stop_rx.clone(),
        ));
        // Events the workflow group has not read are never trimmed, whether this daemon
        // runs workflows or not (a delivery-only daemon of a fleet protects them too).
        let workflow_group = format!("{}-workflows", settings.redis.group);
        tokio::spawn(crate::queue::events::retain(
            conn.clone(),
            keys.clone(),
            settings.events.clone(),
            workflow_group,
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
        tokio::spawn(crate::store::checks::watch_memory(
            conn.clone(),
            keys.sends.clone(),
            keys.scheduled.clone(),
            settings.redis.high_water,
            metrics.clone(),
            health.clone(),
            Duration::from_secs(1),
            stop_rx.clone(),
        ));
        tokio::spawn(crate::store::clock::watch(
            conn.clone(),
            Duration::from_secs(5),
            stop_rx.clone(),
        ));
        tokio::spawn(crate::store::replication::watch(
            conn.clone(),
            acks.clone(),
            settings.redis.prefix.clone(),
            Duration::from_secs(2),
            stop_rx.clone(),
        ));
        tokio::spawn(crate::store::checks::watch(
            conn.clone(),
            settings.redis.allow_eviction,
            metrics.clone(),
            health.clone(),
            Duration::from_secs(5),
            stop_rx.clone(),
        ));

        // Campaign states before the first job: a paused campaign stays paused across a
        // restart.
        let campaigns = Arc::new(crate::control::Campaigns::default());
        if let Err(e) = campaigns.refresh(&mut conn.clone(), &keys).await.map(drop) {
            tracing::warn!(error = %e, "reading campaign states failed; retrying in the background");
        }
        tokio::spawn(campaigns.clone().watch(
            conn.clone(),
            keys.clone(),
            metrics.clone(),
            stop_rx.clone(),
        ));
        // Bounce directives too: a job of a bounced destination is not sent after a restart.
        let admin_bounces = Arc::new(crate::control::admin_bounce::Directives::default());
        if let Err(e) = admin_bounces.refresh(&mut conn.clone(), &keys).await {
            tracing::warn!(error = %e, "reading bounce directives failed; retrying in the background");
        }
        tokio::spawn(admin_bounces.clone().watch(
            conn.clone(),
            keys.clone(),
            metrics.clone(),
            stop_rx.clone(),
        ));
        tokio::spawn(crate::archive::run(
            conn.clone(),
            keys.clone(),
            settings.campaigns.retention.get(),
            metrics.clone(),
            stop_rx.clone(),
        ));
        tokio::spawn(crate::labels::reap(
            metrics.clone(),
            settings
                .metrics
                .campaign_idle
                .map_or(crate::labels::DEFAULT_IDLE, |d| d.get()),
            stop_rx.clone(),
        ));
        tokio::spawn(crate::control::guard(
            settings.guards.clone(),
            campaigns.clone(),
            conn.clone(),
            keys.clone(),
            metrics.clone(),
            stop_rx.clone(),
        ));
        // Decisions already made, before the first job: a restart never holds a job whose
        // experiment has a winner.
        let experiments = Arc::new(crate::experiment::Experiments::new(&settings.experiments));
        if let Err(e) = experiments.load(&mut conn.clone(), &keys).await {
            tracing::warn!(error = %e, "reading experiment decisions failed; retrying in the background");
        }
        tokio::spawn(experiments.clone().watch(
            conn.clone(),
            keys.clone(),
            metrics.clone(),
            stop_rx.clone(),
        ));
        let workers = i.workers;
        let ready = Arc::new(AtomicBool::new(false));
        let signer = renderer.signer().clone();
        let templates = renderer.templates().names().count();
        if let Err(e) = shaper.read_shared().await {
            tracing::warn!(error = %e, "reading the fleet's suspensions failed; retrying in the background");
        }
        tokio::spawn(shaper.clone().follow_shared(stop_rx.clone()));
        let egress = Arc::new(crate::egress::Egress::new(&settings, Some(conn.clone())));
        metrics.prime_egress(
            egress.sources().iter().map(|s| s.label()),
            egress
                .pool_names()
                .into_iter()
                .map(|p| egress.pool_label(Some(p))),
        );
        let egress_task = tokio::spawn(egress.clone().flush_sent(metrics.clone(), stop_rx.clone()));
        let stages = Arc::new(Stages {
            renderer,
            deliverer,
            shaper: shaper.clone(),
            egress,
            caps: Caps::new(&settings.caps),
            recorder: handle,
            leases,
            metrics: metrics.clone(),
            redis: conn.clone(),
            keys: keys.clone(),
            keep: crate::workflow::KeepJobs::new(&settings),
            retry: Retry::new(&settings.delivery),
            attempt_timeout: settings.delivery.attempt_timeout.get(),
            max_job_bytes: i.max_job_bytes,
            also_prune: vec![(keys.events.clone(), format!("{group}-workflows"))],
            return_paths: crate::bounces::ReturnPaths::new(&settings),
            campaigns: campaigns.clone(),
            admin_bounces,
            experiments,
            stop: stop_rx.clone(),
        });
        // Housekeeping of SMTP sessions and mx routes, every 5 s until shutdown begins (it
        // then lets go of `stages`, whose recorder handle the drain waits for).
        {
            let stages = stages.clone();
            let mut ticker = crate::ticker::Ticker::new(Duration::from_secs(5), stop_rx.clone());
            tokio::spawn(async move {
                while ticker.tick().await {
                    stages.deliverer.reap();
                }
            });
        }
        let api = settings.api.listen.map(|_| {
            Arc::new(
                crate::api::Api::new(&settings, conn.clone(), keys.clone(), metrics.clone())
                    .with_health(health.clone())
                    .with_acks(acks.clone()),
            )
        });
        // The API listener's site: the API's routes and the report pages, each with its own
        // state, under the API's refusals and request counts.
        let site = api.as_ref().map(|a| {
            let pages = Arc::new(crate::pages::Pages::new(
                conn.clone(),
                keys.clone(),
                &settings,
            ));
            crate::api::finish(
                crate::api::routes(a.clone()).merge(crate::pages::router(pages)),
                a.clone(),
            )
        });
        let (api_task, shared_api) = match (api_listener, &api, site) {
            (Some(listener), Some(api), Some(site)) => (
                Some(crate::api::serve(
                    listener,
                    site,
                    api,
                    settings.api.max_connections,
                    exit_rx.clone(),
                )),
                None,
            ),
            // On the metrics listener when both are configured on one address.
            (None, _, site) => (None, site),
            _ => (None, None),
        };
        let http_task = metrics_listener.map(|listener| {
            let ops = crate::http::Ops {
                metrics: metrics.clone(),
                sessions: sessions.clone(),
                shaper: shaper.clone(),
                ready: ready.clone(),
                redis: conn.clone(),
                sends: keys.sends.clone(),
                health: health.clone(),
            };
            // A request to the API shares its deadline (see api::serve).
            let request_timeout = crate::api::request_timeout(settings.api.timeout.get());
            crate::http::serve_ops(listener, ops, shared_api, request_timeout, exit_rx.clone())
        });
        let p = &settings.providers;
        let sendgrid = p
            .sendgrid_public_key
            .as_deref()
            .map(|k| crate::bounces::providers::SendGrid::new(k, p.max_skew.get()))
            .transpose()?;
        let ses = (!p.ses_topics.is_empty())
            .then(|| crate::bounces::ses::Ses::new(p.ses_topics.clone(), p.sns_cert_prefix.clone()))
            .transpose()
            .context("building the SES certificate client")?;
        let track_task = match tracking_listener {
            Some(listener) => {
                let t = &settings.tracking;
                let detector = crate::track::machine::Detector::new(
                    t.scanner_networks.as_deref(),
                    t.scanner_networks_file.as_deref(),
                    t.machine_window.get(),
                    t.trust_forwarded,
                )?;
                let state = crate::track::server::TrackState {
                    detector,
                    signer,
                    redis: conn.clone(),
                    keys: keys.clone(),
                    metrics: metrics.clone(),
                    repeat_window: t.repeat_window.get(),
                    limits: crate::listener::Limits {
                        name: "tracking",
                        max_connections: t.max_connections,
                        header_timeout: t.header_timeout.get(),
                        request_timeout: t.request_timeout.get(),
                    },
                    webhooks: crate::bounces::webhooks::Webhooks {
                        redis: conn.clone(),
                        keys: keys.clone(),
                        metrics: metrics.clone(),
                        acks: acks.clone(),
                        sendgrid,
                        ses,
                    }
                    .routes(),
                    acks: acks.clone(),
                    click_param: t.click_param.clone(),
                    click_ids: Arc::new(crate::track::clickid::ClickIds::of(t)),
                };
                Some(crate::track::server::serve(
                    listener,
                    state,
                    exit_rx.clone(),
                ))
            }
            None => None,
        };
        let bounce_task = match (bounce_listener, crate::bounces::ReturnPaths::new(&settings)) {
            (Some(listener), Some(paths)) => {
                let b = &settings.bounces;
                let state = crate::bounces::server::BounceState {
                    rules: crate::bounces::server::Rules {
                        paths,
                        accept: b.accept.iter().map(|a| a.to_ascii_lowercase()).collect(),
                        hostname: settings.sender.helo.clone(),
                        max_bytes: b.max_message_bytes,
                        timeout: b.timeout.get(),
                        session_timeout: b.session_timeout.get(),
                        data_timeout: b.data_timeout.get(),
                    },
                    redis: conn.clone(),
                    keys: keys.clone(),
                    metrics: metrics.clone(),
                    acks: acks.clone(),
                    max_connections: b.max_connections,
                    max_data_bytes: b.max_data_bytes,
                };
                Some(crate::bounces::server::serve(
                    listener,
                    state,
                    exit_rx.clone(),
                ))
            }
            _ => None,
        };
        tracing::info!(
            consumer = %consumer,
            mode = ?settings.delivery.mode,
            workers,
            templates,
            "paloma running"
        );
        ready.store(true, Ordering::Relaxed);

        let permits = Arc::new(Semaphore::new(workers));
        tokio::pin!(shutdown);
        let intake_loop = crate::pipeline::intake::run(
            &mut intake,
            stages.clone(),
            permits.clone(),
            stop_rx.clone(),
        );
        tokio::select! {
            r = intake_loop => r?,
            _ = &mut shutdown => {}
        }
        // The intake loop is dropped here at an await point; an entry it had read but not
        // handed to a worker stays pending in Redis and is reclaimed, never lost.
        let _ = stop_tx.send(true);
        ready.store(false, Ordering::Relaxed);
        tracing::info!(
            in_flight = workers - permits.available_permits(),
            "shutting down: intake stopped, finishing SMTP sessions in progress"
        );
        let drain =
            tokio::time::timeout(Duration::from_secs(8), permits.acquire_many(workers as u32))
                .await;
        if drain.is_err() {
            tracing::warn!(
                in_flight = workers - permits.available_permits(),
                "sessions did not finish in time; their jobs stay pending in Redis and will be reclaimed"
            );
        }
        stages.deliverer.close().await;
        // Drop our recorder handles: the recorder writes what it holds and stops once the
        // workers' handles are gone too.
        drop(intake);
        drop(stages);
        let _ = tokio::time::timeout(Duration::from_secs(1), recorder_task).await;
        // Sent counts and unused warm-up claims go back to the fleet.
        let _ = tokio::time::timeout(Duration::from_secs(2), egress_task).await;
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
        if let Some(t) = bounce_task {
            let _ = tokio::time::timeout(Duration::from_secs(1), t).await;
        }
        if let Some(t) = api_task {
            let _ = tokio::time::timeout(Duration::from_secs(3), t).await;
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Builds and runs a daemon until `shutdown` completes.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    App::build(settings).await?.run(shutdown).await
}

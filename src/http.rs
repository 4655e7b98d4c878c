//! The operations endpoint: `GET /metrics` (Prometheus text), `/healthz` (the process
//! answers), `/readyz` (intake running and Redis reachable; warnings, such as Redis memory
//! above the high-water mark, beside "ready").

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::shape::Shaper;
use crate::store::checks::Health;
use crate::store::RedisConn;

/// What the endpoint reads.
#[derive(Clone)]
pub struct Ops {
    pub metrics: Arc<Metrics>,
    /// SMTP sessions open.
    pub sessions: Arc<AtomicI64>,
    /// For the number of suspended sites.
    pub shaper: Arc<Shaper>,
    /// True while the intake runs (not starting, not draining).
    pub ready: Arc<AtomicBool>,
    pub redis: RedisConn,
    /// The sends stream's key, asked on each `/readyz`.
    pub sends: String,
    /// What the last check of the Redis server found.
    pub health: Arc<Health>,
}

/// Serves on `listener` until `stop` turns true, with `extra` routes beside (the API, when
/// it shares this listener); a whole request must arrive within `request_timeout`.
pub fn serve_ops(
    listener: tokio::net::TcpListener,
    ops: Ops,
    extra: Option<Router>,
    request_timeout: Duration,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let registry = ops.metrics.clone();
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics endpoint listening");
    }
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(ops);
    let app = match extra {
        Some(api) => app.merge(api),
        None => app,
    };
    let limits = crate::listener::Limits {
        name: "metrics",
        max_connections: 64,
        header_timeout: Duration::from_secs(10),
        request_timeout,
    };
    tokio::spawn(crate::listener::serve(
        listener,
        app,
        limits,
        registry,
        stop,
        Duration::from_secs(1),
    ))
}

async fn metrics(State(ops): State<Ops>) -> impl IntoResponse {
    let m = &ops.metrics;
    m.sessions_open.set(ops.sessions.load(Ordering::Relaxed));
    m.sites_suspended
        .set(ops.shaper.throttles.suspended(std::time::Instant::now()) as i64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        m.render(),
    )
}

async fn readyz(State(mut ops): State<Ops>) -> impl IntoResponse {
    if !ops.ready.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: starting or draining\n".to_string(),
        );
    }
    // A keyed command, so that in a cluster it asks the node serving paloma's slot (a PING
    // would go to every primary, and any unrelated one being down would fail it).
    let sends = ops.sends.clone();
    let ping = tokio::time::timeout(
        Duration::from_secs(1),
        redis::cmd("EXISTS")
            .arg(sends)
            .query_async::<i64>(&mut ops.redis),
    )
    .await;
    if !matches!(ping, Ok(Ok(_))) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: Redis unreachable\n".to_string(),
        );
    }
    let health = &ops.health;
    if let Some(why) = health.not_ready() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        );
    }
    // Above the memory high-water mark new jobs are refused, but this daemon stays ready:
    // its deliveries free memory, and clicks and opt-outs must still reach it.
    let warnings: Vec<String> = health
        .warning()
        .into_iter()
        .chain(health.memory_refusal())
        .collect();
    match warnings.is_empty() {
        true => (StatusCode::OK, "ready\n".to_string()),
        false => (
            StatusCode::OK,
            format!("ready (warning: {})\n", warnings.join("; ")),
        ),
    }
}

//! The operations endpoint: `GET /metrics` (Prometheus text), `/healthz` (the process
//! answers), `/readyz` (intake running and Redis reachable).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;

use crate::daemon::Shared;
use crate::store::RedisConn;

#[derive(Clone)]
struct Ops {
    shared: Arc<Shared>,
    redis: RedisConn,
}

pub async fn serve_ops(
    addr: SocketAddr,
    shared: Arc<Shared>,
    redis: RedisConn,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let registry = shared.metrics.clone();
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Ops { shared, redis });
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("metrics.listen {addr}: {e}"))?;
    tracing::info!(%addr, "metrics endpoint listening");
    let limits = crate::listener::Limits {
        name: "metrics",
        max_connections: 64,
        header_timeout: Duration::from_secs(10),
    };
    Ok(tokio::spawn(crate::listener::serve(
        listener,
        app,
        limits,
        registry,
        stop,
        Duration::from_secs(1),
    )))
}

async fn metrics(State(ops): State<Ops>) -> impl IntoResponse {
    let m = &ops.shared.metrics;
    m.sessions_open
        .set(ops.shared.sessions.load(Ordering::Relaxed));
    m.sites_suspended
        .set(ops.shared.deliverer.suspended_sites() as i64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        ops.shared.metrics.render(),
    )
}

async fn readyz(State(mut ops): State<Ops>) -> impl IntoResponse {
    if !ops.shared.ready.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: starting or draining\n".to_string(),
        );
    }
    // A keyed command, so that in a cluster it asks the node serving paloma's slot (a PING
    // would go to every primary, and any unrelated one being down would fail it).
    let sends = ops.shared.keys.sends.clone();
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
    let health = &ops.shared.redis_health;
    if let Some(why) = health.not_ready() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        );
    }
    match health.warning() {
        Some(w) => (StatusCode::OK, format!("ready (warning: {w})\n")),
        None => (StatusCode::OK, "ready\n".to_string()),
    }
}

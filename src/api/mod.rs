//! The HTTP API for campaign systems that speak HTTP rather than Redis (`[api]`):
//!
//! - `POST /api/v1/sends`: jobs in, validated exactly as the intake validates them
//!   ([`sends`]);
//! - `GET /api/v1/campaigns[/{c}]`, `POST /api/v1/campaigns/{c}/pause|resume|cancel`,
//!   `GET /api/v1/recipients/{address}`, `PUT|DELETE /api/v1/suppressions/{address}`
//!   ([`manage`]): what `paloma stats`, `paloma campaign` and `paloma suppress` do;
//! - `GET /api/v1/sources` ([`egress`]): what `paloma sources` shows;
//!   `POST /api/v1/domains/{domain}/suspend|resume`, `GET /api/v1/domains/suspended`: what
//!   `paloma domain` does;
//! - `GET /api/v1/queue`, `POST|GET|DELETE /api/v1/bounces` ([`operator`]): what `paloma queue`
//!   and `paloma bounce` do;
//! - `POST /api/v1/conversions`, `PUT /api/v1/campaigns/{c}/cost` ([`conversions`]): what
//!   the shop reports back, and what a campaign cost;
//! - `GET /api/v1/openapi.json`: the OpenAPI document, derived from the handlers ([`doc`]);
//! - the report pages, `/campaigns` ([`crate::pages`]).
//!
//! Every route but the document needs `Authorization: Bearer {api.token}`, compared in
//! constant time. Every refusal is a JSON `{"error": "…"}` with a 4xx status; no answer
//! or log line carries the token. The listener has the limits of [`crate::listener`]; a
//! request body must arrive within `api.timeout` and stay under `api.max_body_bytes`, and
//! at most two bodies of `POST /sends` are held at once, so memory stays bounded whatever
//! the clients send.

pub mod conversions;
pub mod doc;
pub mod egress;
pub mod manage;
pub mod operator;
pub mod sends;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use sha2::{Digest, Sha256};
use tokio::sync::{watch, Semaphore};

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::queue::Keys;
use crate::store::RedisConn;

/// What the API's handlers share.
pub struct Api {
    pub redis: RedisConn,
    pub keys: Keys,
    pub group: String,
    pub metrics: Arc<Metrics>,
    /// The intake's limit on one job (`intake.max_job_bytes`).
    pub max_job_bytes: usize,
    pub max_body_bytes: usize,
    pub max_jobs: usize,
    pub timeout: Duration,
    /// SHA-256 of the token: what a presented token's hash is compared with.
    token_hash: [u8; 32],
    /// Bodies of `POST /sends` held at once.
    pub(crate) bodies: Semaphore,
    /// The daemon's last look at Redis: new jobs are refused above the memory high-water
    /// mark.
    pub health: Arc<crate::store::checks::Health>,
    /// What a write waits for before it is acknowledged (`redis.ack_replicas`).
    pub acks: Arc<crate::store::replication::Acks>,
    /// The egress sources, for `GET /api/v1/sources`.
    pub sources: crate::egress::status::Catalog,
    /// The configured experiments' campaigns (their held jobs, for the queue and bounces).
    pub experiment_campaigns: Vec<String>,
    /// How long an ended job's id is kept (`intake.idempotency_ttl`).
    pub idem_ttl: Duration,
    /// Click ids and `[conversions]`, for `POST /api/v1/conversions`.
    pub conversions: crate::conversions::Conversions,
}

impl Api {
    pub fn new(settings: &Settings, redis: RedisConn, keys: Keys, metrics: Arc<Metrics>) -> Api {
        let a = &settings.api;
        Api {
            redis,
            keys,
            group: settings.redis.group.clone(),
            max_job_bytes: settings.intake.max_job_bytes,
            max_body_bytes: a.max_body_bytes,
            max_jobs: a.max_jobs,
            timeout: a.timeout.get(),
            token_hash: Sha256::digest(a.token.expose().as_bytes()).into(),
            bodies: Semaphore::new(2),
            health: Arc::default(),
            acks: Arc::new(crate::store::replication::Acks::none(metrics.clone())),
            sources: crate::egress::status::Catalog::new(settings),
            experiment_campaigns: settings
                .experiments
                .iter()
                .map(|e| e.campaign.clone())
                .collect(),
            idem_ttl: settings.intake.idempotency_ttl.get(),
            conversions: crate::conversions::Conversions::new(settings),
            metrics,
        }
    }

    /// With what a write waits for before it is acknowledged.
    pub fn with_acks(mut self, acks: Arc<crate::store::replication::Acks>) -> Api {
        self.acks = acks;
        self
    }

    /// With the daemon's checks of the Redis server (memory above the high-water mark).
    pub fn with_health(mut self, health: Arc<crate::store::checks::Health>) -> Api {
        self.health = health;
        self
    }

    /// Whether `presented` is the token. Both sides are hashed first, so neither the time
    /// taken nor an early exit on length tells anything about the token.
    fn authorized(&self, presented: &[u8]) -> bool {
        let h = Sha256::digest(presented);
        aws_lc_rs::constant_time::verify_slices_are_equal(&h, &self.token_hash).is_ok()
    }
}

/// A refusal: a status and a sentence, answered as `{"error": "…"}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Seconds for `Retry-After`, on a refusal that passes by itself.
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    /// A 503 to retry after `seconds`.
    pub fn retry_later(message: impl Into<String>, seconds: u32) -> ApiError {
        let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message);
        e.retry_after = Some(seconds);
        e
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    /// A write not acknowledged: Redis failed, or the replicas did not confirm it in time
    /// (503 with `Retry-After`).
    pub fn ack(e: crate::store::replication::AckError) -> ApiError {
        match e {
            crate::store::replication::AckError::Redis(e) => ApiError::redis(e),
            unconfirmed => ApiError::retry_later(unconfirmed.to_string(), ACK_RETRY_AFTER),
        }
    }

    /// Redis failed: the request may be retried; the error itself stays in the log.
    pub fn redis(e: redis::RedisError) -> ApiError {
        tracing::warn!(error = %e, "API request: Redis failed");
        if crate::store::checks::is_full(&e) {
            // Answering, but full (maxmemory, noeviction): not "unavailable".
            return ApiError::retry_later(
                "Redis is full (maxmemory reached); nothing was changed, retry later",
                MEMORY_RETRY_AFTER,
            );
        }
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Redis is unavailable; nothing was changed, retry later",
        )
    }
}

/// `Retry-After` (seconds) when Redis memory is above the high-water mark or full: about
/// the time the daemons take to deliver a batch's worth.
pub const MEMORY_RETRY_AFTER: u32 = 30;

pub use crate::store::replication::RETRY_AFTER as ACK_RETRY_AFTER;

/// The body of every refusal.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"paloma\""),
            );
        }
        r
    }
}

/// The API's own routes (`/api/v1/…`), with their state; the daemon composes them with the
/// report pages and [`finish`]es the site.
pub fn routes(api: Arc<Api>) -> Router {
    let guarded = Router::new()
        .route("/api/v1/sends", post(sends::post_sends))
        .route("/api/v1/campaigns", get(manage::list_campaigns))
        .route("/api/v1/campaigns/{campaign}", get(manage::get_campaign))
        .route("/api/v1/campaigns/{campaign}/pause", post(manage::pause))
        .route("/api/v1/campaigns/{campaign}/resume", post(manage::resume))
        .route("/api/v1/campaigns/{campaign}/cancel", post(manage::cancel))
        .route(
            "/api/v1/campaigns/{campaign}/cost",
            put(conversions::put_cost),
        )
        .route("/api/v1/conversions", post(conversions::post_conversions))
        .route("/api/v1/recipients/{address}", get(manage::recipient))
        .route("/api/v1/sources", get(egress::list_sources))
        .route("/api/v1/domains/suspended", get(egress::suspended_domains))
        .route(
            "/api/v1/domains/{domain}/suspend",
            post(egress::suspend_domain),
        )
        .route(
            "/api/v1/domains/{domain}/resume",
            post(egress::resume_domain),
        )
        .route("/api/v1/queue", get(operator::get_queue))
        .route(
            "/api/v1/bounces",
            post(operator::post_bounces)
                .get(operator::list_bounces)
                .delete(operator::lift_bounce),
        )
        .route(
            "/api/v1/suppressions/{address}",
            put(manage::suppress).delete(manage::unsuppress),
        )
        .route_layer(axum::middleware::from_fn_with_state(api.clone(), auth));
    Router::new()
        .route("/api/v1/openapi.json", get(doc::openapi))
        .merge(guarded)
        .with_state(api)
}

/// The API listener's site around `routes` (the API's and the report pages'): JSON refusals
/// for unknown routes and methods, and every request counted by route pattern and status.
pub fn finish(routes: Router, api: Arc<Api>) -> Router {
    routes
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no such route; see /api/v1/openapi.json",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "this route does not take that method; see /api/v1/openapi.json",
            )
        })
        .layer(axum::middleware::from_fn_with_state(api, count))
}

/// Refuses a request without the right bearer token.
async fn auth(State(api): State<Arc<Api>>, req: Request, next: Next) -> Response {
    let presented = crate::listener::bearer(req.headers());
    match presented {
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing `Authorization: Bearer <api.token>`",
        )
        .into_response(),
        Some(t) if !api.authorized(t.as_bytes()) => {
            ApiError::new(StatusCode::UNAUTHORIZED, "wrong API token").into_response()
        }
        Some(_) => next.run(req).await,
    }
}

/// Counts each request by route pattern (bounded: never the path itself) and status.
async fn count(State(api): State<Arc<Api>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "other".to_string());
    let r = next.run(req).await;
    api.metrics
        .api_requests
        .with_label_values(&[route.as_str(), r.status().as_str()])
        .inc();
    r
}

/// The API's listeners take a request's head within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a listener serving the API gives a whole request, head and body: the head's
/// time, then `api.timeout` for the body, so that a slow body of `POST /api/v1/sends` still
/// gets its 408 from the handler (whose timer starts when it begins to read) before the
/// listener closes the connection.
pub fn request_timeout(timeout: Duration) -> Duration {
    HEADER_TIMEOUT + timeout
}

/// Serves `site` (see [`finish`]) on the API's own `listener` until `stop` turns true.
pub fn serve(
    listener: tokio::net::TcpListener,
    site: Router,
    api: &Api,
    max_connections: usize,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "API listening");
    }
    let registry = api.metrics.clone();
    let limits = crate::listener::Limits {
        name: "api",
        max_connections,
        header_timeout: HEADER_TIMEOUT,
        request_timeout: request_timeout(api.timeout),
    };
    tokio::spawn(crate::listener::serve(
        listener,
        site,
        limits,
        registry,
        stop,
        Duration::from_secs(2),
    ))
}

//! `GET /api/v1/sources`: what `paloma sources` shows, as JSON; and operators'
//! suspensions of recipient domains (`paloma domain …`): `POST
//! /api/v1/domains/{domain}/suspend|resume`, `GET /api/v1/domains/suspended`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;

use super::manage::Seg;
use super::{Api, ApiError, ErrorBody};
use crate::control::domains::{self, DomainSuspension, Resumed};
use crate::egress::status::SourceStatus;

/// Every egress source (empty without `[[sources]]`).
#[derive(Serialize, utoipa::ToSchema)]
pub struct SourceList {
    pub sources: Vec<SourceStatus>,
}

/// Each egress source: address, EHLO name, pools, warm-up day and cap, sent today, the
/// sites it is suspended for.
#[utoipa::path(get, path = "/api/v1/sources", tag = "egress",
    responses(
        (status = 200, body = SourceList),
        (status = 401, body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_sources(State(api): State<Arc<Api>>) -> Result<Json<SourceList>, ApiError> {
    let mut conn = api.redis.clone();
    let now = crate::store::clock::now_ms();
    let sources = api
        .sources
        .status(&mut conn, &api.keys, now)
        .await
        .map_err(ApiError::redis)?;
    Ok(Json(SourceList { sources }))
}

/// `POST /api/v1/domains/{domain}/suspend`.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SuspendBody {
    /// How long: "30m", "1h", "2d".
    #[serde(rename = "for")]
    pub duration: String,
    /// Only this egress source; absent: every source.
    pub source: Option<String>,
}

/// `POST /api/v1/domains/{domain}/resume` (the body may be empty).
#[derive(serde::Deserialize, utoipa::ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct ResumeBody {
    /// Only this egress source's suspension; absent: every suspension of the domain.
    pub source: Option<String>,
}

/// The domain suspensions in force.
#[derive(Serialize, utoipa::ToSchema)]
pub struct SuspendedList {
    pub suspended: Vec<DomainSuspension>,
}

fn domain_segment(d: &str) -> Result<String, ApiError> {
    domains::domain_name(d).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{d:?} is not a domain name"),
        )
    })
}

fn known_source(api: &Api, source: Option<&str>) -> Result<(), ApiError> {
    match source {
        Some(s) if !api.sources.has(s) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("source {s:?} names no [[sources]] entry"),
        )),
        _ => Ok(()),
    }
}

/// A small JSON body; None when it is empty.
fn json_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    example: &str,
) -> Result<Option<T>, ApiError> {
    let body = body.map_err(|e| {
        ApiError::new(
            e.status(),
            "the body could not be read (it is at most a small JSON object)",
        )
    })?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON ({e}): send {example}")))
}

/// Suspend a recipient domain (every source, or one) on every daemon for a while.
#[utoipa::path(post, path = "/api/v1/domains/{domain}/suspend", tag = "egress",
    params(("domain" = String, Path, description = "Recipient domain")),
    request_body(content = SuspendBody, content_type = "application/json"),
    responses(
        (status = 200, body = DomainSuspension),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 422, description = "Not a domain name, a bad duration or an unknown source", body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn suspend_domain(
    State(api): State<Arc<Api>>,
    Seg(domain): Seg,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<DomainSuspension>, ApiError> {
    let domain = domain_segment(&domain)?;
    let example = r#"{"for": "1h", "source": "ip1"} (source optional)"#;
    let b: SuspendBody = json_body(body, example)?
        .ok_or_else(|| ApiError::bad_request(format!("send {example}")))?;
    known_source(&api, b.source.as_deref())?;
    let d: crate::config::Dur = b.duration.parse().map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("for {:?}: {e} (such as \"30m\" or \"1h\")", b.duration),
        )
    })?;
    if d.get().is_zero() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "for must be above zero",
        ));
    }
    let mut conn = api.redis.clone();
    let s = domains::suspend(
        &mut conn,
        &api.keys,
        &api.acks,
        "api_domains",
        &domain,
        b.source.as_deref(),
        d.get().as_millis() as i64,
    )
    .await
    .map_err(ApiError::ack)?;
    tracing::info!(domain = %s.domain, source = ?s.source, until = %s.until, "domain suspended through the API");
    Ok(Json(s))
}

/// Lift a domain's suspensions (or one source's) and send its waiting jobs now.
#[utoipa::path(post, path = "/api/v1/domains/{domain}/resume", tag = "egress",
    params(("domain" = String, Path, description = "Recipient domain")),
    request_body(content = Option<ResumeBody>, content_type = "application/json"),
    responses(
        (status = 200, body = Resumed),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 422, description = "Not a domain name or an unknown source", body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn resume_domain(
    State(api): State<Arc<Api>>,
    Seg(domain): Seg,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Resumed>, ApiError> {
    let domain = domain_segment(&domain)?;
    let b: ResumeBody = json_body(body, r#"{"source": "ip1"} or nothing"#)?.unwrap_or_default();
    known_source(&api, b.source.as_deref())?;
    let mut conn = api.redis.clone();
    let r = domains::resume(
        &mut conn,
        &api.keys,
        &api.acks,
        "api_domains",
        &domain,
        b.source.as_deref(),
    )
    .await
    .map_err(ApiError::ack)?;
    Ok(Json(r))
}

/// The domain suspensions in force.
#[utoipa::path(get, path = "/api/v1/domains/suspended", tag = "egress",
    responses((status = 200, body = SuspendedList), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn suspended_domains(
    State(api): State<Arc<Api>>,
) -> Result<Json<SuspendedList>, ApiError> {
    let mut conn = api.redis.clone();
    let suspended = domains::list(&mut conn, &api.keys)
        .await
        .map_err(ApiError::redis)?;
    Ok(Json(SuspendedList { suspended }))
}

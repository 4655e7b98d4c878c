//! Operator controls over HTTP: `GET /api/v1/queue` (what `paloma queue --json` prints) and
//! `POST /api/v1/bounces` (`paloma bounce … --yes`), from the same functions
//! ([`crate::control::queue`], [`crate::control::admin_bounce`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;

use super::{Api, ApiError, ErrorBody};
use crate::config::Dur;
use crate::control::admin_bounce::{self, Bounced, Directive, Target};
use crate::control::queue::{self, QueueView, DEFAULT_TOP};

/// What waits: ready in the sends stream, and waiting (delayed, parked, held) by reason,
/// by campaign and by destination (the recipient's domain), with the bounce directives in
/// force.
#[utoipa::path(get, path = "/api/v1/queue", tag = "operator",
    params(("limit" = Option<usize>, Query, description = "Destinations shown, most waiting first (default 20)")),
    responses(
        (status = 200, body = QueueView),
        (status = 401, body = ErrorBody),
        (status = 422, description = "limit is not a number", body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_queue(
    State(api): State<Arc<Api>>,
    q: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> Result<Json<QueueView>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(format!("bad query: {}", e.body_text())))?;
    let top = match q.get("limit") {
        None => DEFAULT_TOP,
        Some(l) => l.parse::<usize>().map_err(|_| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "limit must be a whole number",
            )
        })?,
    };
    let mut conn = api.redis.clone();
    let v = queue::view(
        &mut conn,
        &api.keys,
        &api.group,
        &api.experiment_campaigns,
        top,
    )
    .await
    .map_err(ApiError::redis)?;
    Ok(Json(v))
}

/// The body of `POST /api/v1/bounces`: a domain or a campaign (one of them).
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BounceBody {
    /// The recipients' domain (exactly: not its subdomains).
    pub domain: Option<String>,
    pub campaign: Option<String>,
    /// Also bounce new jobs of it for this long (`10m`, `2h`).
    #[serde(rename = "for")]
    pub lasting: Option<String>,
}

/// End every waiting job of a domain or a campaign as `bounced`, class `admin` (never
/// suppressing the address); with `for`, new jobs of it too until then.
#[utoipa::path(post, path = "/api/v1/bounces", tag = "operator",
    request_body(content = BounceBody, content_type = "application/json"),
    responses(
        (status = 200, body = Bounced),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 422, description = "Neither or both of domain and campaign, or a bad value", body = ErrorBody),
        (status = 503, description = "Redis failed, or the replicas did not confirm (Retry-After)", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn post_bounces(
    State(api): State<Arc<Api>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Bounced>, ApiError> {
    let (target, b) = target(body)?;
    let unprocessable = |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m);
    let lasting = b
        .lasting
        .as_deref()
        .map(|f| f.parse::<Dur>().map(Dur::get))
        .transpose()
        .map_err(|e| unprocessable(format!("for: {e}")))?;
    let mut conn = api.redis.clone();
    let done = admin_bounce::bounce(
        &mut conn,
        &api.keys,
        &api.acks,
        "api_bounces",
        &target,
        &api.experiment_campaigns,
        lasting,
        api.idem_ttl,
    )
    .await
    .map_err(ApiError::ack)?;
    tracing::info!(kind = target.kind(), target = target.name(), bounced = done.total, until = ?done.until, "admin bounce through the API");
    Ok(Json(done))
}

/// The domain or campaign a body names (exactly one), and the body.
fn target(body: Result<Bytes, BytesRejection>) -> Result<(Target, BounceBody), ApiError> {
    let body = body.map_err(|e| {
        ApiError::new(
            e.status(),
            "the body could not be read (it is a small JSON object)",
        )
    })?;
    let b: BounceBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "malformed JSON ({e}): send {{\"domain\": \"example.com\"}} or {{\"campaign\": \"spring\"}}, optionally with \"for\": \"10m\""
        ))
    })?;
    let unprocessable = |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m);
    let target = match (&b.domain, &b.campaign) {
        (Some(d), None) => Target::domain(d),
        (None, Some(c)) => Target::campaign(c),
        _ => {
            return Err(unprocessable(
                "name exactly one of \"domain\" and \"campaign\"".into(),
            ))
        }
    }
    .map_err(unprocessable)?;
    Ok((target, b))
}

/// The bounce directives in force.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct DirectiveList {
    pub directives: Vec<Directive>,
}

/// The bounce directives in force (`paloma bounce --list`).
#[utoipa::path(get, path = "/api/v1/bounces", tag = "operator",
    responses(
        (status = 200, body = DirectiveList),
        (status = 401, body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_bounces(State(api): State<Arc<Api>>) -> Result<Json<DirectiveList>, ApiError> {
    let mut conn = api.redis.clone();
    let directives = admin_bounce::list(&mut conn, &api.keys, crate::store::clock::now_ms())
        .await
        .map_err(ApiError::redis)?;
    Ok(Json(DirectiveList { directives }))
}

/// Whether a directive was lifted.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Lifted {
    pub kind: String,
    pub target: String,
    /// False when there was no directive for it.
    pub lifted: bool,
}

/// Lift the directive of a domain or campaign (`paloma bounce --cancel`): its new jobs are
/// sent again. Body: `{"domain": "D"}` or `{"campaign": "C"}`.
#[utoipa::path(delete, path = "/api/v1/bounces", tag = "operator",
    request_body(content = BounceBody, content_type = "application/json"),
    responses(
        (status = 200, body = Lifted),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 422, description = "Neither or both of domain and campaign", body = ErrorBody),
        (status = 503, description = "Redis failed, or the replicas did not confirm (Retry-After)", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn lift_bounce(
    State(api): State<Arc<Api>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Lifted>, ApiError> {
    let (target, _) = target(body)?;
    let mut conn = api.redis.clone();
    let lifted = admin_bounce::lift(&mut conn, &api.keys, &api.acks, "api_bounces", &target)
        .await
        .map_err(ApiError::ack)?;
    Ok(Json(Lifted {
        kind: target.kind().into(),
        target: target.name().into(),
        lifted,
    }))
}

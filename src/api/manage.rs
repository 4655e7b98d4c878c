//! Campaigns, recipients and suppressions over HTTP: the answers of `paloma stats --json`,
//! `paloma campaign …` and `paloma suppress …`, from the same functions ([`crate::stats`],
//! [`crate::control`], [`crate::policy::suppression`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;

use super::{Api, ApiError, ErrorBody};
use crate::control::{self, Changed};
use crate::job::{CampaignId, Recipient};
use crate::policy::suppression::{self, REASONS};
use crate::stats::{self, CampaignRow};

/// `GET /api/v1/campaigns`: the queue's figures and every campaign.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct CampaignList {
    /// Entries in the sends stream not yet finished (all campaigns).
    pub stream_waiting: i64,
    /// Of those, read by a daemon and in progress.
    pub stream_pending: i64,
    /// Jobs in the delayed set (retries and send_at).
    pub scheduled: i64,
    /// One page of campaigns, in name order.
    pub campaigns: Vec<CampaignRow>,
    /// The cursor of the next page (`?after=` it), absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// Campaigns in one answer when `limit` is not given.
pub const DEFAULT_PAGE: usize = 100;

/// `?limit=&after=` of a list of campaigns: (after, limit), refused as JSON when invalid.
pub fn page_query(q: &BTreeMap<String, String>) -> Result<(Option<String>, usize), ApiError> {
    let limit = match q.get("limit") {
        None => DEFAULT_PAGE,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=stats::MAX_PAGE).contains(&n) => n,
            _ => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("limit must be 1-{}", stats::MAX_PAGE),
                ))
            }
        },
    };
    Ok((q.get("after").cloned(), limit))
}

/// The one path parameter of a route, refused as JSON (not axum's plain text) when it
/// cannot be read.
pub struct Seg(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Seg {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(s)| Seg(s))
            .map_err(|e| ApiError::new(e.status(), format!("bad path: {}", e.body_text())))
    }
}

/// A campaign to change: a name paloma accepts, else 422.
pub(super) fn campaign_id(c: String) -> Result<String, ApiError> {
    CampaignId::parse(c)
        .map(|c| c.as_str().to_string())
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("campaign: {e}")))
}

/// A campaign to read: a name paloma accepts, or one kept from before names were narrowed
/// (see [`CampaignId::readable`]); else 422.
fn readable_campaign(c: String) -> Result<String, ApiError> {
    if CampaignId::readable(&c) {
        Ok(c)
    } else {
        campaign_id(c)
    }
}

fn address(a: &str) -> Result<String, ApiError> {
    Recipient::parse(a)
        .map(|r| r.as_str().to_string())
        .map_err(|e| ApiError::bad_request(format!("address: {e}")))
}

/// The campaigns with their state and counts, a page at a time in name order: follow
/// `next` (`?after={next}`) until it is absent.
#[utoipa::path(get, path = "/api/v1/campaigns", tag = "campaigns",
    params(
        ("limit" = Option<usize>, Query, description = "Campaigns in the page, 1-1000 (default 100)"),
        ("after" = Option<String>, Query, description = "The `next` of the previous page: campaigns whose names sort after it")),
    responses(
        (status = 200, body = CampaignList),
        (status = 401, body = ErrorBody),
        (status = 422, description = "limit out of range", body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_campaigns(
    State(api): State<Arc<Api>>,
    q: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> Result<Json<CampaignList>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(format!("bad query: {}", e.body_text())))?;
    let (after, limit) = page_query(&q)?;
    let mut conn = api.redis.clone();
    let (o, next) = stats::overview_page(&mut conn, &api.keys, &api.group, after.as_deref(), limit)
        .await
        .map_err(ApiError::redis)?;
    let (stream_waiting, stream_pending, scheduled) =
        (o.stream_waiting, o.stream_pending, o.scheduled);
    let campaigns = stats::campaign_rows(&mut conn, &api.keys, o)
        .await
        .map_err(ApiError::redis)?;
    Ok(Json(CampaignList {
        stream_waiting,
        stream_pending,
        scheduled,
        campaigns,
        next,
    }))
}

/// One campaign's state and counts.
#[utoipa::path(get, path = "/api/v1/campaigns/{campaign}", tag = "campaigns",
    params(("campaign" = String, Path, description = "Campaign id")),
    responses(
        (status = 200, body = CampaignRow),
        (status = 401, body = ErrorBody),
        (status = 404, description = "No job of it was seen and no state was set", body = ErrorBody),
        (status = 422, description = "Not a campaign name", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_campaign(
    State(api): State<Arc<Api>>,
    Seg(campaign): Seg,
) -> Result<Json<CampaignRow>, ApiError> {
    let c = readable_campaign(campaign)?;
    let mut conn = api.redis.clone();
    if !stats::known(&mut conn, &api.keys, &c)
        .await
        .map_err(ApiError::redis)?
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no campaign {c:?} is known"),
        ));
    }
    let o = stats::overview(&mut conn, &api.keys, &api.group, Some(&c))
        .await
        .map_err(ApiError::redis)?;
    let row = stats::campaign_rows(&mut conn, &api.keys, o)
        .await
        .map_err(ApiError::redis)?
        .pop()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no such campaign"))?;
    Ok(Json(row))
}

/// Pause a campaign: within about a second no daemon starts another message of it.
#[utoipa::path(post, path = "/api/v1/campaigns/{campaign}/pause", tag = "campaigns",
    params(("campaign" = String, Path, description = "Campaign id")),
    responses((status = 200, body = Changed), (status = 401, body = ErrorBody), (status = 422, description = "Not a campaign name", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn pause(
    State(api): State<Arc<Api>>,
    Seg(campaign): Seg,
) -> Result<Json<Changed>, ApiError> {
    let c = campaign_id(campaign)?;
    let mut conn = api.redis.clone();
    let done = control::pause(&mut conn, &api.keys, &api.acks, "api_campaigns", &c)
        .await
        .map_err(ApiError::ack)?;
    tracing::info!(campaign = %c, "paused through the API");
    Ok(Json(done))
}

/// Resume a paused (or cancelled) campaign: its parked jobs go out, paced as usual.
#[utoipa::path(post, path = "/api/v1/campaigns/{campaign}/resume", tag = "campaigns",
    params(("campaign" = String, Path, description = "Campaign id")),
    responses((status = 200, body = Changed), (status = 401, body = ErrorBody), (status = 422, description = "Not a campaign name", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn resume(
    State(api): State<Arc<Api>>,
    Seg(campaign): Seg,
) -> Result<Json<Changed>, ApiError> {
    let c = campaign_id(campaign)?;
    let mut conn = api.redis.clone();
    let done = control::resume(&mut conn, &api.keys, &api.acks, "api_campaigns", &c)
        .await
        .map_err(ApiError::ack)?;
    tracing::info!(campaign = %c, released = done.released, "resumed through the API");
    Ok(Json(done))
}

/// Cancel a campaign: every job of it not yet sent ends `suppressed` (`cancelled`).
#[utoipa::path(post, path = "/api/v1/campaigns/{campaign}/cancel", tag = "campaigns",
    params(("campaign" = String, Path, description = "Campaign id")),
    responses((status = 200, body = Changed), (status = 401, body = ErrorBody), (status = 422, description = "Not a campaign name", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn cancel(
    State(api): State<Arc<Api>>,
    Seg(campaign): Seg,
) -> Result<Json<Changed>, ApiError> {
    let c = campaign_id(campaign)?;
    let mut conn = api.redis.clone();
    let done = control::cancel(&mut conn, &api.keys, &api.acks, "api_campaigns", &c)
        .await
        .map_err(ApiError::ack)?;
    tracing::info!(campaign = %c, "cancelled through the API");
    Ok(Json(done))
}

/// What is known of one recipient (`paloma stats --recipient`).
#[utoipa::path(get, path = "/api/v1/recipients/{address}", tag = "recipients",
    params(("address" = String, Path, description = "Email address")),
    responses(
        (status = 200, body = BTreeMap<String, String>),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn recipient(
    State(api): State<Arc<Api>>,
    Seg(addr): Seg,
) -> Result<Json<BTreeMap<String, String>>, ApiError> {
    let a = address(&addr)?;
    let mut conn = api.redis.clone();
    let info = stats::recipient(&mut conn, &api.keys, &a)
        .await
        .map_err(ApiError::redis)?;
    Ok(Json(info))
}

/// The body of `PUT /api/v1/suppressions/{address}` (optional).
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SuppressBody {
    /// unsubscribed, bounced, complained or manual (the default).
    pub reason: Option<String>,
}

/// A suppression as it now stands.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Suppression {
    pub address: String,
    /// The reason it is suppressed for; absent when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// DELETE: whether it was on the list.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub removed: Option<bool>,
}

/// Suppress an address.
#[utoipa::path(put, path = "/api/v1/suppressions/{address}", tag = "suppressions",
    params(("address" = String, Path, description = "Email address")),
    request_body(content = Option<SuppressBody>, content_type = "application/json"),
    responses((status = 200, body = Suppression), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn suppress(
    State(api): State<Arc<Api>>,
    Seg(addr): Seg,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Suppression>, ApiError> {
    let a = address(&addr)?;
    let body = body.map_err(|e| {
        ApiError::new(
            e.status(),
            "the body could not be read (it is at most a small JSON object)",
        )
    })?;
    let reason = if body.iter().all(u8::is_ascii_whitespace) {
        "manual".to_string()
    } else {
        let b: SuppressBody = serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!(
                "malformed JSON ({e}): send {{\"reason\": \"manual\"}} or nothing"
            ))
        })?;
        b.reason.unwrap_or_else(|| "manual".into())
    };
    if !REASONS.contains(&reason.as_str()) {
        return Err(ApiError::bad_request(format!(
            "reason must be one of {REASONS:?}"
        )));
    }
    let mut conn = api.redis.clone();
    suppression::add(
        &mut conn,
        &api.keys,
        &api.acks,
        "api_suppressions",
        std::slice::from_ref(&a),
        &reason,
    )
    .await
    .map_err(ApiError::ack)?;
    Ok(Json(Suppression {
        address: a,
        reason: Some(reason),
        removed: None,
    }))
}

/// Take an address off the suppression list. A recipient's own opt-out outlives the
/// removal of another reason: the answer then still shows `unsubscribed`.
#[utoipa::path(delete, path = "/api/v1/suppressions/{address}", tag = "suppressions",
    params(("address" = String, Path, description = "Email address")),
    responses((status = 200, body = Suppression), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn unsuppress(
    State(api): State<Arc<Api>>,
    Seg(addr): Seg,
) -> Result<Json<Suppression>, ApiError> {
    let a = address(&addr)?;
    let mut conn = api.redis.clone();
    let (removed, kept) = suppression::remove(
        &mut conn,
        &api.keys,
        &api.acks,
        "api_suppressions",
        std::slice::from_ref(&a),
    )
    .await
    .map_err(ApiError::ack)?;
    Ok(Json(Suppression {
        address: a,
        reason: (kept > 0).then(|| "unsubscribed".to_string()),
        removed: Some(removed > 0 || kept > 0),
    }))
}

//! `GET /api/v1/sources`: what `paloma sources` shows, as JSON.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use super::{Api, ApiError, ErrorBody};
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

//! `POST /api/v1/conversions`: the shop reports orders, sign-ups and the like, each
//! attributed to the message whose click brought it (see [`crate::conversions`]);
//! `PUT /api/v1/campaigns/{c}/cost`: what a campaign cost, for its ROI.
//!
//! Each conversion is checked on its own and refused with the reason (as `POST /sends`
//! refuses a job); the valid ones are recorded in one script call, acknowledged as the
//! API's other writes are (`redis.ack_replicas`: 503 with `Retry-After` when the replicas
//! do not confirm; a retry is safe, the order ids are idempotency keys).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{Map, Value};

use super::manage::Seg;
use super::{Api, ApiError, ErrorBody};
use crate::conversions::{self, Currency, Outcome};

/// The answer to `POST /api/v1/conversions`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ConversionsAnswer {
    /// Conversions recorded now or before (a retried id), attributed or not.
    pub accepted: usize,
    /// Refused: malformed, or not recorded.
    pub refused: usize,
    /// Recorded now and attributed to a campaign.
    pub attributed: usize,
    /// Recorded now, attributed to none.
    pub unattributed: usize,
    /// Ids recorded before: answered as then, counted nothing.
    pub duplicates: usize,
    /// One per posted conversion, in order: `index`, `accepted`, and either `error` or
    /// the conversion's `id`, `status` (`attributed` with `by`, `campaign`, `job`,
    /// `variant`, `link`, `touch`; or `unattributed` with `reason` and `why`), `kind`,
    /// `value`, `currency`, `at`, `duplicate`.
    #[schema(value_type = Vec<Object>)]
    pub results: Vec<Value>,
}

/// Report conversions (an order, a sign-up, a support request), by click id or address.
#[utoipa::path(
    post,
    path = "/api/v1/conversions",
    tag = "conversions",
    request_body(
        description = "A conversion, or an array of them: `{\"id\": \"order-1042\", \"click\": \"<click id>\" | \"to\": \"address\", \"value\": 59.90, \"currency\": \"EUR\", \"kind\": \"purchase\", \"at\": \"RFC 3339\"}`",
        content((serde_json::Value = "application/json"))
    ),
    responses(
        (status = 200, description = "Every valid conversion was recorded (or had been: a retried id); `results` says how each was attributed or why it was refused", body = ConversionsAnswer),
        (status = 400, description = "Not JSON, or no conversion", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 408, description = "The body did not arrive within api.timeout", body = ErrorBody),
        (status = 413, description = "Body over api.max_body_bytes, or more than conversions.max_items conversions", body = ErrorBody),
        (status = 422, description = "No conversion was valid; nothing was written", body = ConversionsAnswer),
        (status = 503, description = "Redis unavailable or full, or the replicas did not confirm (with Retry-After): retry, the ids make it safe", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn post_conversions(
    State(api): State<Arc<Api>>,
    req: Request,
) -> Result<Response, ApiError> {
    let body = super::sends::bounded_body(&api, req).await?;
    let texts = conversions::split(&body).map_err(ApiError::bad_request)?;
    let conv = &api.conversions;
    if texts.is_empty() {
        return Err(ApiError::bad_request("no conversion in the body"));
    }
    if texts.len() > conv.max_items {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} conversions in one request; the limit is {} (conversions.max_items): split the batch",
                texts.len(),
                conv.max_items
            ),
        ));
    }
    let now = crate::queue::now_ms();
    let checked: Vec<Result<conversions::Posted, conversions::Refused>> = texts
        .iter()
        .map(|t| conversions::check(t, now, conv.retention as i64 * 1000))
        .collect();
    let valid: Vec<conversions::Posted> = checked.iter().filter_map(|c| c.clone().ok()).collect();
    let mut results: Vec<Value> = Vec::with_capacity(checked.len());
    let mut refused = checked.iter().filter(|c| c.is_err()).count();
    if valid.is_empty() {
        for (index, c) in checked.into_iter().enumerate() {
            if let Err(r) = c {
                results.push(refusal(index, r.id, r.error));
            }
        }
        let answer = ConversionsAnswer {
            accepted: 0,
            refused,
            attributed: 0,
            unattributed: 0,
            duplicates: 0,
            results,
        };
        return Ok((StatusCode::UNPROCESSABLE_ENTITY, Json(answer)).into_response());
    }
    if let Some(why) = api.health.memory_refusal() {
        return Err(ApiError::retry_later(why, super::MEMORY_RETRY_AFTER));
    }
    let mut conn = api.redis.clone();
    let recorded = conv
        .record(&mut conn, &api.keys, &api.acks, &api.metrics, &valid)
        .await
        .map_err(ApiError::ack)?;
    let mut outcomes = recorded.outcomes.into_iter();
    let mut accepted = 0;
    for (index, c) in checked.into_iter().enumerate() {
        let r = match c {
            Err(r) => refusal(index, r.id, r.error),
            Ok(p) => match outcomes.next() {
                Some(Outcome::New(m)) => {
                    accepted += 1;
                    recorded_answer(index, m, false)
                }
                Some(Outcome::Duplicate(m)) => {
                    accepted += 1;
                    recorded_answer(index, m, true)
                }
                Some(Outcome::Failed(why)) => {
                    refused += 1;
                    refusal(index, Some(p.id), format!("not recorded: {why}"))
                }
                None => {
                    refused += 1;
                    refusal(index, Some(p.id), "not recorded".into())
                }
            },
        };
        results.push(r);
    }
    let answer = ConversionsAnswer {
        accepted,
        refused,
        attributed: recorded.attributed,
        unattributed: recorded.unattributed,
        duplicates: recorded.duplicates,
        results,
    };
    Ok(Json(answer).into_response())
}

fn refusal(index: usize, id: Option<String>, error: String) -> Value {
    let mut m = Map::new();
    m.insert("index".into(), index.into());
    m.insert("accepted".into(), false.into());
    if let Some(id) = id {
        m.insert("id".into(), id.into());
    }
    m.insert("error".into(), error.into());
    Value::Object(m)
}

fn recorded_answer(index: usize, answer: Map<String, Value>, duplicate: bool) -> Value {
    let mut m = Map::new();
    m.insert("index".into(), index.into());
    m.insert("accepted".into(), true.into());
    m.extend(answer);
    m.insert("duplicate".into(), duplicate.into());
    Value::Object(m)
}

/// The answer to `PUT /api/v1/campaigns/{c}/cost`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct CostSet {
    pub campaign: String,
    pub amount: f64,
    pub currency: String,
}

/// Set what a campaign cost in a currency (its ROI in that currency follows).
#[utoipa::path(put, path = "/api/v1/campaigns/{campaign}/cost", tag = "campaigns",
    params(("campaign" = String, Path, description = "Campaign id")),
    request_body(description = "`{\"amount\": 1200, \"currency\": \"EUR\"}`", content((serde_json::Value = "application/json"))),
    responses(
        (status = 200, body = CostSet),
        (status = 400, description = "Not JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 422, description = "Not a campaign name, an amount or a currency", body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn put_cost(
    State(api): State<Arc<Api>>,
    Seg(campaign): Seg,
    body: axum::body::Bytes,
) -> Result<Json<CostSet>, ApiError> {
    let campaign = super::manage::campaign_id(campaign)?;
    let unprocessable = |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m);
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body<'a> {
        #[serde(borrow)]
        amount: &'a serde_json::value::RawValue,
        currency: &'a str,
    }
    let b: Body = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "malformed body ({e}): send {{\"amount\": 1200, \"currency\": \"EUR\"}}"
        ))
    })?;
    let currency = Currency::parse(b.currency).map_err(|e| unprocessable(e.to_string()))?;
    let minor = currency
        .parse_amount(b.amount.get())
        .map_err(|e| unprocessable(e.to_string()))?;
    let mut conn = api.redis.clone();
    conversions::figures::set_cost(&mut conn, &api.keys, &api.acks, &campaign, currency, minor)
        .await
        .map_err(ApiError::ack)?;
    Ok(Json(CostSet {
        campaign,
        amount: currency.major(minor),
        currency: currency.to_string(),
    }))
}

//! `POST /api/v1/sends`: a JSON array of jobs, or JSON lines (one job per line), in the
//! stream's own format. Each job is checked by [`Job::parse`], exactly as the intake checks
//! an entry of `{prefix}sends`, with the intake's size limit; a job id given twice in one
//! request is refused the second time (the stream would skip it without an event).
//!
//! The valid jobs are written with one MULTI/EXEC of XADDs, as they were sent (so the
//! stream holds the caller's bytes): either every accepted job is in the stream or, if Redis
//! fails, none is and the answer is 503. With `?all_or_nothing=true` one refused job refuses
//! the whole request (422, nothing written). Above the memory high-water mark
//! ([`crate::store::checks`]) the request is refused with 503 and `Retry-After`, nothing
//! written. With `redis.ack_replicas`, a 2xx also means the replicas confirmed the jobs; when
//! they did not in time the answer is 503 with `Retry-After`, and the jobs may be in the
//! stream all the same: a retry with the same job ids is delivered once (the ids are the
//! intake's idempotency keys).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde_json::value::RawValue;

use super::{Api, ApiError, ErrorBody};
use crate::job::Job;

/// What became of one posted job.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct JobResult {
    /// Its place in the request, from 0.
    pub index: usize,
    pub accepted: bool,
    /// The job's `id`, when it could be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The sends stream's entry id, when accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry: Option<String>,
    /// Why it was refused (the text the intake would dead-letter it with).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The answer to `POST /api/v1/sends`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct SendsAnswer {
    pub accepted: usize,
    pub refused: usize,
    /// One per posted job, in order.
    pub results: Vec<JobResult>,
}

/// Enqueue jobs.
#[utoipa::path(
    post,
    path = "/api/v1/sends",
    tag = "sends",
    params(("all_or_nothing" = Option<bool>, Query, description = "Refuse the whole request if any job is invalid")),
    request_body(
        description = "A JSON array of jobs, or JSON lines (one job per line), in the sends stream's format",
        content(
            (Vec<serde_json::Value> = "application/json"),
            (String = "application/x-ndjson")
        )
    ),
    responses(
        (status = 200, description = "Every valid job was written to the sends stream; `results` says which were refused", body = SendsAnswer),
        (status = 400, description = "Not JSON, or no job", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 408, description = "The body did not arrive within api.timeout", body = ErrorBody),
        (status = 413, description = "Body over api.max_body_bytes, or more than api.max_jobs jobs", body = ErrorBody),
        (status = 422, description = "No job was valid (or one was not, with all_or_nothing); nothing was written", body = SendsAnswer),
        (status = 503, description = "Redis unavailable, full, or its memory above redis.high_water (then with Retry-After); nothing was written", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn post_sends(State(api): State<Arc<Api>>, req: Request) -> Result<Response, ApiError> {
    let all_or_nothing = req.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|kv| kv == "all_or_nothing=true" || kv == "all_or_nothing=1")
    });
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > api.max_body_bytes as u64 {
            return Err(too_large(api.max_body_bytes));
        }
    }
    // Bounded memory: only a few bodies are read and parsed at once; the others wait (within
    // the same timeout as the body itself).
    let _permit = tokio::time::timeout(api.timeout, api.bodies.acquire())
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many bodies being read at once; retry",
            )
        })?
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down"))?;
    let body = read_body(req.into_body(), api.max_body_bytes, api.timeout).await?;
    // Parsing and checking 50,000 jobs takes a CPU for a while: on one of the runtime's few
    // threads it would hold up every other request and the delivery pipeline meanwhile.
    let (max_jobs, max_job_bytes) = (api.max_jobs, api.max_job_bytes);
    let mut parsed = if body.len() > BLOCKING_BODY_BYTES {
        tokio::task::spawn_blocking(move || Parsed::of(body, max_jobs, max_job_bytes))
            .await
            .map_err(|_| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "parsing the body failed")
            })??
    } else {
        Parsed::of(body, max_jobs, max_job_bytes)?
    };
    let mut results = std::mem::take(&mut parsed.results);
    let valid = std::mem::take(&mut parsed.valid);
    let jobs: Vec<&str> = parsed.jobs().collect();
    let refused = results.iter().filter(|r| !r.accepted).count();
    let m = &api.metrics.api_jobs;
    if valid.is_empty() || (all_or_nothing && refused > 0) {
        m.with_label_values(&["refused"]).inc_by(jobs.len() as u64);
        for r in results.iter_mut().filter(|r| r.accepted) {
            r.accepted = false;
            r.error = Some(
                "not written: another job of this request was refused (all_or_nothing)".into(),
            );
        }
        let answer = SendsAnswer {
            accepted: 0,
            refused: results.len(),
            results,
        };
        return Ok((StatusCode::UNPROCESSABLE_ENTITY, Json(answer)).into_response());
    }
    // The daemon's last look at Redis memory: no round trip per request.
    if let Some(why) = api.health.memory_refusal() {
        m.with_label_values(&["refused"]).inc_by(jobs.len() as u64);
        return Err(ApiError::retry_later(why, super::MEMORY_RETRY_AFTER));
    }
    // One transaction, then WAIT for the replicas (`redis.ack_replicas`): a 2xx means the
    // jobs survive the loss of the primary.
    let mut p = redis::pipe();
    for &i in &valid {
        p.cmd("XADD")
            .arg(&api.keys.sends)
            .arg("*")
            .arg("job")
            .arg(jobs[i]);
    }
    let mut conn = api.redis.clone();
    let entries: Vec<String> = match api.acks.write(&mut conn, &p, true, "api_sends").await {
        Ok(e) => e,
        Err(e) => {
            m.with_label_values(&["refused"]).inc_by(jobs.len() as u64);
            return Err(ApiError::ack(e));
        }
    };
    for (&i, entry) in valid.iter().zip(entries) {
        results[i].entry = Some(entry);
    }
    let bytes: usize = valid.iter().map(|&i| jobs[i].len()).sum();
    api.health.note_accepted(valid.len() as u64, bytes as u64);
    m.with_label_values(&["accepted"])
        .inc_by(valid.len() as u64);
    m.with_label_values(&["refused"]).inc_by(refused as u64);
    let answer = SendsAnswer {
        accepted: valid.len(),
        refused,
        results,
    };
    if answer.results.len() > BLOCKING_ANSWER_JOBS {
        let json = tokio::task::spawn_blocking(move || serde_json::to_vec(&answer))
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "writing the answer failed",
                )
            })?;
        return Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response());
    }
    Ok(Json(answer).into_response())
}

/// A request's body for the API's other posts (conversions): within `api.max_body_bytes`
/// and `api.timeout`, with at most two bodies read at once, as for `POST /sends`.
pub(super) async fn bounded_body(api: &Api, req: Request) -> Result<Vec<u8>, ApiError> {
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > api.max_body_bytes as u64 {
            return Err(too_large(api.max_body_bytes));
        }
    }
    let _permit = tokio::time::timeout(api.timeout, api.bodies.acquire())
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many bodies being read at once; retry",
            )
        })?
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down"))?;
    read_body(req.into_body(), api.max_body_bytes, api.timeout).await
}

/// A body larger than this is parsed and checked on a blocking thread (about 1,000 jobs of
/// the newsletter's size; checking them takes about a millisecond in a release build).
pub const BLOCKING_BODY_BYTES: usize = 256 * 1024;
/// An answer of more results than this is serialized on a blocking thread.
const BLOCKING_ANSWER_JOBS: usize = 1_000;

/// A body split into its jobs, each checked.
struct Parsed {
    body: String,
    /// Each job's text as a byte range of `body`.
    spans: Vec<std::ops::Range<usize>>,
    results: Vec<JobResult>,
    valid: Vec<usize>,
}

impl Parsed {
    fn of(body: Vec<u8>, max_jobs: usize, max_job_bytes: usize) -> Result<Parsed, ApiError> {
        let body = String::from_utf8(body).map_err(|e| {
            ApiError::bad_request(format!("the body is not UTF-8 ({})", e.utf8_error()))
        })?;
        let base = body.as_ptr() as usize;
        let (spans, (results, valid)) = {
            let jobs = split(body.as_bytes())?;
            if jobs.is_empty() {
                return Err(ApiError::bad_request("no jobs in the body"));
            }
            if jobs.len() > max_jobs {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "{} jobs in one request; the limit is {max_jobs} (api.max_jobs): split the batch",
                        jobs.len(),
                    ),
                ));
            }
            let spans: Vec<_> = jobs
                .iter()
                .map(|j| {
                    let start = j.as_ptr() as usize - base;
                    start..start + j.len()
                })
                .collect();
            (spans, check(&jobs, max_job_bytes))
        };
        Ok(Parsed {
            body,
            spans,
            results,
            valid,
        })
    }

    fn jobs(&self) -> impl Iterator<Item = &str> {
        // Cut from this body at str boundaries: slicing checks no more than that.
        self.spans.iter().map(|r| &self.body[r.clone()])
    }
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the body is over {limit} bytes (api.max_body_bytes): split the batch"),
    )
}

/// The body, up to `limit` bytes, arrived within `timeout`. Past the limit the rest is read
/// and dropped for a moment (at most another `limit` bytes, one second), so that the client,
/// still sending, reads the 413 rather than a connection reset.
async fn read_body(
    body: Body,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<Vec<u8>, ApiError> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let read = async {
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|_| ApiError::bad_request("the request body could not be read"))?;
            if buf.len() + chunk.len() > limit {
                let mut dropped = 0usize;
                let drain = async {
                    while let Some(Ok(c)) = stream.next().await {
                        dropped += c.len();
                        if dropped > limit {
                            break;
                        }
                    }
                };
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drain).await;
                return Err(too_large(limit));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(())
    };
    tokio::time::timeout(timeout, read).await.map_err(|_| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "the body did not arrive within api.timeout",
        )
    })??;
    Ok(buf)
}

/// The jobs of a body: the elements of a JSON array (each as its own text), or the
/// non-blank lines of JSON lines.
fn split(body: &[u8]) -> Result<Vec<&str>, ApiError> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let text = std::str::from_utf8(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not UTF-8 ({e})")))?;
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let items: Vec<&RawValue> = serde_json::from_str(trimmed).map_err(|e| {
            ApiError::bad_request(format!(
                "malformed JSON ({e}): send a JSON array of jobs or one job per line"
            ))
        })?;
        return Ok(items.into_iter().map(RawValue::get).collect());
    }
    if !trimmed.is_empty() && !trimmed.starts_with('{') {
        return Err(ApiError::bad_request(
            "malformed body: send a JSON array of jobs or one job (a JSON object) per line",
        ));
    }
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect())
}

/// Each job's result, and the indexes of the valid ones.
fn check(jobs: &[&str], max_job_bytes: usize) -> (Vec<JobResult>, Vec<usize>) {
    let mut results = Vec::with_capacity(jobs.len());
    let mut valid = Vec::with_capacity(jobs.len());
    let mut seen: HashMap<String, usize> = HashMap::with_capacity(jobs.len());
    for (index, raw) in jobs.iter().enumerate() {
        match Job::parse(raw.as_bytes(), max_job_bytes) {
            Ok(job) => {
                let id = job.id.as_str().to_string();
                if let Some(first) = seen.get(&id) {
                    results.push(JobResult {
                        index,
                        accepted: false,
                        error: Some(format!("duplicate id: job {first} of this request has it")),
                        id: Some(id),
                        entry: None,
                    });
                    continue;
                }
                seen.insert(id.clone(), index);
                valid.push(index);
                results.push(JobResult {
                    index,
                    accepted: true,
                    id: Some(id),
                    entry: None,
                    error: None,
                });
            }
            Err((e, ident)) => results.push(JobResult {
                index,
                accepted: false,
                id: (!ident.id.is_empty()).then_some(ident.id),
                entry: None,
                error: Some(e.to_string()),
            }),
        }
    }
    (results, valid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str =
        r#"{"id":"a-1","campaign":"spring","template":"newsletter","to":"ana@example.com"}"#;

    #[test]
    fn arrays_and_json_lines_split_into_the_callers_own_text() {
        let arr = format!("[{GOOD}, {GOOD}]");
        assert_eq!(split(arr.as_bytes()).unwrap(), vec![GOOD, GOOD]);
        let lines = format!("\n{GOOD}\r\n\n{GOOD}\n");
        assert_eq!(split(lines.as_bytes()).unwrap(), vec![GOOD, GOOD]);
        assert!(split(b"[{\"id\":").is_err());
        assert!(split(b"hello").is_err());
        assert!(split(b"\xff\xfe").is_err());
        assert!(split(b"  ").unwrap().is_empty());
    }

    #[test]
    fn each_job_is_checked_as_the_intake_checks_it_and_ids_are_unique() {
        let bad_to = GOOD.replace("ana@example.com", "ana@@example.com");
        let no_campaign = r#"{"id":"a-3","template":"newsletter","to":"b@example.com"}"#;
        let jobs = vec![GOOD, bad_to.as_str(), no_campaign, GOOD, "{not json"];
        let (r, valid) = check(&jobs, 256 * 1024);
        assert_eq!(valid, vec![0]);
        assert!(r[0].accepted);
        assert!(
            r[1].error.as_deref().unwrap().contains("`to`"),
            "{:?}",
            r[1]
        );
        assert_eq!(r[2].error.as_deref(), Some("missing field `campaign`"));
        assert!(r[3].error.as_deref().unwrap().contains("duplicate id"));
        assert!(r[4].error.as_deref().unwrap().contains("malformed JSON"));
        let (r, valid) = check(&[GOOD], 10);
        assert!(valid.is_empty() && r[0].error.as_deref().unwrap().contains("oversize"));
    }
}

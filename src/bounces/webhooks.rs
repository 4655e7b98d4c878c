//! The providers' webhooks, served on the tracking listener: SendGrid's Event Webhook
//! (`POST /webhooks/sendgrid`) and Amazon SES through SNS (`POST /webhooks/ses`), each
//! verified as [`super::providers`] and [`super::ses`] say, then recorded as paloma's own
//! reports are ([`super::record`]), once per event, confirmed by the replicas. A webhook is
//! routed only when configured: otherwise the tracking server's 404, answered without
//! reading the body.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;

use crate::metrics::Metrics;
use crate::queue::Keys;
use crate::store::replication::{AckError, Acks};
use crate::store::RedisConn;

/// The largest provider webhook body taken (SendGrid batches events up to about 1 MB).
const MAX_WEBHOOK_BODY: usize = 4 << 20;
/// How long a provider event's once-only marker is kept (providers retry for hours).
const WEBHOOK_MARKER_TTL: u64 = 7 * 86400;

/// What the webhooks need from the daemon.
pub struct Webhooks {
    pub redis: RedisConn,
    pub keys: Keys,
    pub metrics: Arc<Metrics>,
    /// What a provider's report waits for before its 200 (`redis.ack_replicas`).
    pub acks: Arc<Acks>,
    /// SendGrid's event webhook (`[providers] sendgrid_public_key`), if configured.
    pub sendgrid: Option<super::providers::SendGrid>,
    /// Amazon SES through SNS (`[providers] ses_topics`), if configured.
    pub ses: Option<super::ses::Ses>,
}

impl Webhooks {
    /// The configured webhooks' routes, with their state; None when no provider is set.
    /// A provider sends events in batches: a larger body limit for its route alone.
    pub fn routes(self) -> Option<Router> {
        let (sendgrid, ses) = (self.sendgrid.is_some(), self.ses.is_some());
        if !(sendgrid || ses) {
            return None;
        }
        let mut r = Router::new();
        if sendgrid {
            r = r.route(
                "/webhooks/sendgrid",
                post(sendgrid_hook).layer(DefaultBodyLimit::max(MAX_WEBHOOK_BODY)),
            );
        }
        if ses {
            r = r.route(
                "/webhooks/ses",
                post(ses_hook).layer(DefaultBodyLimit::max(MAX_WEBHOOK_BODY)),
            );
        }
        Some(r.with_state(Arc::new(self)))
    }

    /// Counted beside the tracking requests (`paloma_tracking_requests_total{kind,result}`).
    fn count(&self, kind: &str, result: &str) {
        self.metrics
            .tracking_requests
            .with_label_values(&[kind, result])
            .inc();
    }
}

/// SendGrid's Event Webhook: verified (signature, timestamp), then each bounce, drop and
/// spam report recorded against the job its unique args name, once per event. 200 once
/// written; 401 unsigned or forged; 400 not JSON; 503 when Redis fails (SendGrid retries).
async fn sendgrid_hook(
    State(app): State<Arc<Webhooks>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(sg) = &app.sendgrid else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let now = chrono::Utc::now().timestamp();
    use super::providers::{self, Refused};
    if let Err(why) = sg.verify(h(providers::SIGNATURE), h(providers::TIMESTAMP), &body, now) {
        let result = match why {
            Refused::Unsigned => "unsigned",
            Refused::BadSignature => "forged",
            Refused::Stale => "stale",
        };
        app.count("sendgrid", result);
        return (StatusCode::UNAUTHORIZED, "signature refused\n").into_response();
    }
    let items = match providers::sendgrid_events(&body) {
        Ok(i) => i,
        Err(e) => {
            app.count("sendgrid", "malformed");
            return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response();
        }
    };
    if let Err(r) = record_items(&app, "sg", &items).await {
        return r;
    }
    app.count("sendgrid", "ok");
    (StatusCode::OK, "ok\n").into_response()
}

/// Records provider events (each once, by `{source}:{event id}`) in one pipeline, confirmed
/// by the replicas (`redis.ack_replicas`); Err(503 with `Retry-After`) when Redis fails or
/// the replicas do not confirm in time (the provider retries).
async fn record_items(
    app: &Webhooks,
    source: &str,
    items: &[super::providers::Item],
) -> Result<(), Response> {
    use super::record::{record, Report};
    let mut redis = app.redis.clone();
    let reports: Vec<Report<'_>> = items
        .iter()
        .map(|it| Report {
            marker: app
                .keys
                .report_seen(&format!("{source}:{}", it.event_id), it.finding.what),
            job: &it.job,
            finding: &it.finding,
        })
        .collect();
    let written = record(
        &mut redis,
        &app.keys,
        &app.acks,
        "webhooks",
        WEBHOOK_MARKER_TTL,
        &reports,
    )
    .await;
    match written {
        Ok(recorded) => {
            for (it, new) in items.iter().zip(recorded) {
                match new {
                    true => it.finding.count(&app.metrics, &it.job.campaign),
                    false => app.metrics.reports.with_label_values(&["duplicate"]).inc(),
                }
            }
            Ok(())
        }
        Err(e) => {
            if matches!(e, AckError::Redis(_)) {
                app.metrics.redis_errors.inc();
            }
            tracing::warn!(error = %e, source, "recording provider events failed; the provider will retry");
            Err(crate::listener::retry_later(
                (StatusCode::SERVICE_UNAVAILABLE, "try again later\n").into_response(),
            ))
        }
    }
}

/// Amazon SES notifications through SNS: verified (topic, certificate URL, signature),
/// then a subscription is confirmed, or a Bounce / Complaint recorded against the job its
/// original headers name. 200 once done; 401 refused; 502 when a confirmation fails.
async fn ses_hook(State(app): State<Arc<Webhooks>>, body: Bytes) -> Response {
    let Some(ses) = &app.ses else {
        return StatusCode::NOT_FOUND.into_response();
    };
    use super::ses::Refused;
    let m = match ses.verify(&body).await {
        Ok(m) => m,
        Err(why) => {
            let result = match why {
                Refused::Malformed => "malformed",
                Refused::Topic => "topic",
                Refused::CertUrl => "cert_url",
                Refused::Cert => "cert",
                Refused::BadSignature => "forged",
                Refused::Version => "signature_version",
            };
            app.count("ses", result);
            if why == Refused::Version {
                tracing::warn!("an SNS message with SignatureVersion 1 (SHA1) was refused: set the topic's SignatureVersion to 2");
            }
            return (StatusCode::UNAUTHORIZED, "signature refused\n").into_response();
        }
    };
    match m.kind.as_str() {
        "SubscriptionConfirmation" => {
            if !ses.confirm(&m).await {
                app.count("ses", "confirm_failed");
                return (StatusCode::BAD_GATEWAY, "could not confirm\n").into_response();
            }
            tracing::info!(topic = %m.topic_arn, "SNS subscription confirmed");
            app.count("ses", "subscribed");
        }
        "Notification" => {
            let items = super::ses::ses_events(&m);
            if let Err(r) = record_items(&app, "ses", &items).await {
                return r;
            }
            app.count("ses", "ok");
        }
        _ => app.count("ses", "ignored"),
    }
    (StatusCode::OK, "ok\n").into_response()
}

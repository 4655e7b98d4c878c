//! Webhooks: signed JSON POSTs with durable retries.
//!
//! A webhook waiting to go out is a member of the sorted set `{prefix}webhooks` (score = the
//! time of its next try, ms), a JSON [`Pending`]. Any daemon's worker leases the due ones —
//! their score moves a lease ahead, so a daemon that dies mid-POST leaves them to be tried
//! again, not lost — POSTs them, then in one MULTI/EXEC removes each and either forgets it
//! (2xx), puts it back with the next backoff, or after `webhooks.max_attempts` writes it to
//! `{prefix}dead` (fields `webhook` = the body, `url`, `error`, `workflow`). Delivery is at
//! least once; receivers recognise a repeat by the body's `type`, `id`, `at` and `workflow`.
//!
//! Each POST carries `X-Paloma-Timestamp` (unix seconds) and `X-Paloma-Signature:
//! sha256=<hex HMAC-SHA256(webhooks.secret, "{timestamp}.{body}")>`: the receiver recomputes
//! it over the raw body and rejects stale timestamps, so a captured request cannot be replayed
//! later or altered.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hmac::{Hmac, Mac};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::sync::watch;

use super::client;
use crate::config::WebhookSettings;
use crate::metrics::Metrics;
use crate::queue::now_ms;
use crate::queue::Keys;
use crate::store::RedisConn;

/// One webhook in `{prefix}webhooks`. Field order is fixed, so the same event and rule give
/// the same member (an event handled twice is queued once while it waits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub url: String,
    /// The JSON body, exactly as signed and sent.
    pub body: String,
    /// POSTs already tried.
    pub attempt: u32,
    pub workflow: String,
}

/// `sha256=` + hex HMAC-SHA256 of `"{timestamp}.{body}"`.
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Queues a webhook (ZADD NX: one already waiting is left as it is).
pub fn enqueue(p: &mut redis::Pipeline, keys: &Keys, due_ms: i64, w: &Pending) {
    let member = serde_json::to_string(w).expect("webhooks serialize");
    p.cmd("ZADD")
        .arg(&keys.webhooks)
        .arg("NX")
        .arg(due_ms)
        .arg(member)
        .ignore();
}

/// How one leased webhook ended this time.
enum Attempt {
    Delivered,
    Failed(String),
    /// Not a webhook this version can read: dead-lettered at once.
    Malformed(String),
}

pub struct Worker {
    keys: Keys,
    secret: Vec<u8>,
    intervals: Vec<Duration>,
    max_attempts: u32,
    timeout: Duration,
    concurrency: usize,
    http: reqwest::Client,
    metrics: Arc<Metrics>,
}

impl Worker {
    pub fn new(
        settings: &WebhookSettings,
        keys: Keys,
        metrics: Arc<Metrics>,
    ) -> Result<Worker, reqwest::Error> {
        Ok(Worker {
            keys,
            secret: settings
                .secret
                .as_ref()
                .map(|s| s.expose().as_bytes().to_vec())
                .unwrap_or_default(),
            intervals: settings.retry_intervals.iter().map(|d| d.get()).collect(),
            max_attempts: settings.max_attempts.max(1),
            timeout: settings.timeout.get(),
            concurrency: settings.concurrency.max(1),
            http: client::client(settings.timeout.get())?,
            metrics,
        })
    }

    /// Delivers due webhooks until `stop` turns true. A POST cut short by shutdown stays
    /// leased and is tried again (by any daemon) once the lease runs out.
    pub async fn run(self, mut conn: RedisConn, mut stop: watch::Receiver<bool>) {
        // One round is at most `concurrency` POSTs, each bounded by `timeout`: the lease
        // outlasts it with room for the Redis round trips.
        let lease = self.timeout + Duration::from_secs(30);
        let limit = self.concurrency;
        loop {
            if *stop.borrow() {
                return;
            }
            let leased =
                super::lease_due(&mut conn, &self.keys.webhooks, now_ms(), limit, lease).await;
            let members = match leased {
                Ok(m) => m,
                Err(e) => {
                    self.metrics.redis_errors.inc();
                    tracing::warn!(error = %e, "leasing due webhooks failed; will retry");
                    Vec::new()
                }
            };
            let full = members.len() >= limit;
            if !members.is_empty() {
                let this = &self;
                let round = futures::stream::iter(members)
                    .map(|m| async move {
                        let r = this.deliver(&m).await;
                        (m, r)
                    })
                    .buffer_unordered(self.concurrency)
                    .collect::<Vec<_>>();
                tokio::select! {
                    results = round => self.settle(&mut conn, results).await,
                    _ = stop.changed() => return,
                }
                if full {
                    continue;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = stop.changed() => return,
            }
        }
    }

    async fn deliver(&self, member: &str) -> Attempt {
        let w: Pending = match serde_json::from_str(member) {
            Ok(w) => w,
            Err(e) => return Attempt::Malformed(format!("unreadable webhook entry: {e}")),
        };
        let target = match crate::values::webhook_url(&w.url) {
            Ok(t) => t,
            Err(e) => return Attempt::Malformed(e.to_string()),
        };
        let ts = chrono::Utc::now().timestamp();
        let sig = signature(&self.secret, ts, w.body.as_bytes());
        let ts = ts.to_string();
        let attempt = (w.attempt + 1).to_string();
        let headers = [
            ("Content-Type", "application/json"),
            ("X-Paloma-Timestamp", ts.as_str()),
            ("X-Paloma-Signature", sig.as_str()),
            ("X-Paloma-Attempt", attempt.as_str()),
        ];
        match client::post(&self.http, target, &headers, w.body.into_bytes()).await {
            Ok(s) if (200..300).contains(&s) => Attempt::Delivered,
            Ok(s) => Attempt::Failed(format!("HTTP status {s}")),
            Err(e) => Attempt::Failed(e),
        }
    }

    /// Writes the results of one round in one transaction; when that fails the webhooks stay
    /// leased and come back when the lease ends (a delivered one may then go out twice).
    async fn settle(&self, conn: &mut RedisConn, results: Vec<(String, Attempt)>) {
        let k = &self.keys;
        let mut p = redis::pipe();
        p.atomic();
        let mut counts: Vec<(String, &'static str)> = Vec::with_capacity(results.len());
        for (member, result) in &results {
            p.cmd("ZREM").arg(&k.webhooks).arg(member).ignore();
            let parsed: Option<Pending> = serde_json::from_str(member).ok();
            let workflow = parsed
                .as_ref()
                .map(|w| w.workflow.clone())
                .unwrap_or_default();
            let outcome = match result {
                Attempt::Delivered => "delivered",
                Attempt::Failed(error) => match &parsed {
                    Some(w) if w.attempt + 1 < self.max_attempts => {
                        let mut next = w.clone();
                        next.attempt += 1;
                        let due = now_ms() + self.backoff(w.attempt).as_millis() as i64;
                        tracing::debug!(url = without_query(&w.url), attempt = next.attempt, error = %error, "webhook failed; will retry");
                        enqueue(&mut p, k, due, &next);
                        "retry"
                    }
                    _ => {
                        self.dead(&mut p, member, parsed.as_ref(), error);
                        "dead"
                    }
                },
                Attempt::Malformed(error) => {
                    self.dead(&mut p, member, parsed.as_ref(), error);
                    "dead"
                }
            };
            counts.push((workflow, outcome));
        }
        match p.query_async::<()>(conn).await {
            Ok(()) => {
                for (workflow, outcome) in counts {
                    self.metrics
                        .workflow_actions
                        .with_label_values(&[workflow.as_str(), "webhook", outcome])
                        .inc();
                }
            }
            Err(e) => {
                self.metrics.redis_errors.inc();
                tracing::warn!(error = %e, webhooks = results.len(), "recording webhook results failed; they will be tried again when their lease ends");
            }
        }
    }

    fn dead(&self, p: &mut redis::Pipeline, member: &str, w: Option<&Pending>, error: &str) {
        let (body, url, workflow) = match w {
            Some(w) => (w.body.as_str(), w.url.as_str(), w.workflow.as_str()),
            None => (member, "", ""),
        };
        tracing::warn!(
            url = without_query(url),
            workflow,
            error,
            "webhook gave up; moved to the dead letters"
        );
        p.cmd("XADD")
            .arg(&self.keys.dead)
            .arg("*")
            .arg("webhook")
            .arg(body)
            .arg("url")
            .arg(url)
            .arg("error")
            .arg(error)
            .arg("workflow")
            .arg(workflow)
            .ignore();
    }

    /// The wait after the `attempt`-th failure (0-based), ±10% so a receiver coming back is
    /// not hit by every queued webhook in the same instant.
    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.intervals[(attempt as usize).min(self.intervals.len() - 1)];
        base.mul_f64(rand::thread_rng().gen_range(0.9..1.1))
    }
}

/// A webhook URL for the log: its query string may carry a token.
fn without_query(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_over_timestamp_dot_body() {
        // The composition, against a direct HMAC of the same bytes…
        let body = br#"{"type":"clicked","id":"a"}"#;
        let mut mac = Hmac::<Sha256>::new_from_slice(b"k").unwrap();
        mac.update(b"1700000000.");
        mac.update(body);
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            signature(b"k", 1_700_000_000, body),
            format!("sha256={hex}")
        );
        // …and a fixed vector (computed with `printf '1700000000.{}' | openssl dgst -sha256 -hmac
        // test-webhook-secret-0123`), so a change of format cannot go unnoticed.
        assert_eq!(
            signature(b"test-webhook-secret-0123", 1_700_000_000, b"{}"),
            "sha256=55ee72d9502c82bcd348050fb2945e550a3ce60ebd4eff8706cf795928ee738e"
        );
        assert_ne!(
            signature(b"k", 1_700_000_001, body),
            signature(b"k", 1_700_000_000, body)
        );
    }

    #[test]
    fn pending_members_are_deterministic() {
        let w = Pending {
            url: "http://127.0.0.1:1/h".into(),
            body: "{}".into(),
            attempt: 0,
            workflow: "r".into(),
        };
        let a = serde_json::to_string(&w).unwrap();
        assert_eq!(
            a,
            r#"{"url":"http://127.0.0.1:1/h","body":"{}","attempt":0,"workflow":"r"}"#
        );
        assert_eq!(serde_json::from_str::<Pending>(&a).unwrap(), w);
    }
}

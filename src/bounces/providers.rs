//! Bounces and complaints from the services paloma may relay through, as webhooks on the
//! tracking server, each verified as the provider documents it; nothing unsigned is acted on.
//!
//! SendGrid's Event Webhook (`POST /webhooks/sendgrid`): the request carries
//! `X-Twilio-Email-Event-Webhook-Signature` (base64 of an ECDSA P-256 / SHA-256 signature,
//! DER) over the `X-Twilio-Email-Event-Webhook-Timestamp` value followed by the raw body,
//! verified with the key from SendGrid's settings (`[providers] sendgrid_public_key`);
//! a timestamp further than `max_skew` from now is a replay. The body is a JSON array of
//! events; paloma acts on `bounce` (and `blocked`), `dropped` and `spamreport`, tied to the
//! job by the unique args it put in each message's `X-SMTPAPI` header.

use std::time::Duration;

use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};
use base64::Engine as _;

use super::record::Finding;
use super::TokenJob;
use crate::values::{SendGridKey, SendGridKeyError};

pub const SIGNATURE: &str = "x-twilio-email-event-webhook-signature";
pub const TIMESTAMP: &str = "x-twilio-email-event-webhook-timestamp";

/// Verifies SendGrid's signed event webhooks.
#[derive(Clone)]
pub struct SendGrid {
    point: Vec<u8>,
    max_skew: Duration,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    Unsigned,
    BadSignature,
    Stale,
}

impl SendGrid {
    /// `key`: base64 of the DER public key (SubjectPublicKeyInfo), as SendGrid shows it.
    pub fn new(key: &str, max_skew: Duration) -> Result<SendGrid, SendGridKeyError> {
        Ok(SendGrid {
            point: SendGridKey::parse(key)?.point,
            max_skew,
        })
    }

    /// Checks a request's signature and timestamp (`now`: unix seconds).
    pub fn verify(
        &self,
        signature: Option<&str>,
        timestamp: Option<&str>,
        body: &[u8],
        now: i64,
    ) -> Result<(), Refused> {
        let (Some(sig), Some(ts)) = (signature, timestamp) else {
            return Err(Refused::Unsigned);
        };
        let sig = base64::engine::general_purpose::STANDARD
            .decode(sig.trim())
            .map_err(|_| Refused::BadSignature)?;
        let mut signed = Vec::with_capacity(ts.len() + body.len());
        signed.extend_from_slice(ts.as_bytes());
        signed.extend_from_slice(body);
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &self.point)
            .verify(&signed, &sig)
            .map_err(|_| Refused::BadSignature)?;
        let t: i64 = ts.trim().parse().map_err(|_| Refused::BadSignature)?;
        if (now - t).unsigned_abs() > self.max_skew.as_secs() {
            return Err(Refused::Stale);
        }
        Ok(())
    }
}

/// What one SendGrid event says, with the job it names and a marker name unique to it.
pub struct Item {
    pub job: TokenJob,
    pub finding: Finding,
    pub event_id: String,
}

/// A verified SendGrid body that is not a JSON array of events (answered 400).
#[derive(Debug, thiserror::Error)]
#[error("not a JSON array of events: {0}")]
pub struct MalformedEvents(#[from] serde_json::Error);

/// The events paloma acts on, from a verified body; Err when it is not a JSON array.
pub fn sendgrid_events(body: &[u8]) -> Result<Vec<Item>, MalformedEvents> {
    let events: Vec<serde_json::Value> = serde_json::from_slice(body)?;
    let mut out = Vec::new();
    for e in events {
        let s = |k: &str| e.get(k).and_then(|v| v.as_str()).unwrap_or_default();
        let (id, campaign, to) = (s("paloma_id"), s("paloma_campaign"), s("email"));
        if id.is_empty() || campaign.is_empty() || to.is_empty() {
            continue;
        }
        let reason = s("reason").chars().take(500).collect::<String>();
        let status = s("status").to_string();
        let finding = match s("event") {
            "bounce" | "dropped" => {
                let blocked = s("type") == "blocked";
                let status = if status.is_empty() {
                    "5.0.0".to_string()
                } else {
                    status
                };
                let permanent = !blocked && status.starts_with('5');
                let to = Some(to.to_string());
                Finding::returned(status, reason, "sendgrid".into(), false, permanent, to)
            }
            "spamreport" => {
                Finding::complained("abuse".into(), "sendgrid".into(), Some(to.to_string()))
            }
            _ => continue,
        };
        let event_id = match s("sg_event_id") {
            "" => format!("{id}:{}", s("event")),
            v => v.to_string(),
        };
        out.push(Item {
            job: TokenJob::named(id, campaign, to, s("paloma_variant"), s("paloma_touch")),
            finding,
            event_id,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::BounceClass;
    use crate::queue::events::EventKind;

    /// SendGrid's documented example events, with the unique args paloma sets.
    const EVENTS: &str = r#"[
      {"email":"example@test.com","timestamp":1513299569,"smtp-id":"<14c5d75ce93.dfd.64b469@ismtpd-555>","event":"bounce","category":"cat facts","sg_event_id":"6g4ZI7SA-xmRDv57GoPIPw==","sg_message_id":"14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0","reason":"500 unknown recipient","status":"5.0.0","type":"bounce","paloma_id":"j-1","paloma_campaign":"spring"},
      {"email":"example@test.com","timestamp":1513299569,"event":"spamreport","sg_event_id":"37nvH5QBz858KGVYCM4uOA==","sg_message_id":"14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0","paloma_id":"j-2","paloma_campaign":"spring"},
      {"email":"example@test.com","timestamp":1513299569,"event":"delivered","sg_event_id":"x","paloma_id":"j-3","paloma_campaign":"spring"},
      {"email":"example@test.com","timestamp":1513299569,"event":"bounce","sg_event_id":"no-args"}
    ]"#;

    #[test]
    fn bounces_and_spam_reports_are_taken_the_rest_ignored() {
        let items = sendgrid_events(EVENTS.as_bytes()).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].job.id, "j-1");
        assert_eq!(items[0].finding.kind, EventKind::Returned);
        assert!(items[0].finding.permanent);
        assert_eq!(items[0].finding.class, Some(BounceClass::InvalidRecipient));
        assert_eq!(items[1].finding.kind, EventKind::Complained);
        assert!(sendgrid_events(b"{}").is_err());
    }

    #[test]
    fn a_key_that_is_not_p256_is_refused_at_start() {
        assert!(SendGrid::new("not base64!", Duration::from_secs(600)).is_err());
        assert!(SendGrid::new("AAAA", Duration::from_secs(600)).is_err());
    }
}

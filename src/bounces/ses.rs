//! Amazon SES bounce and complaint notifications through SNS (`POST /webhooks/ses`),
//! verified as AWS documents it: the message's `SigningCertURL` must be an HTTPS URL of an
//! SNS host (`sns.{region}.amazonaws.com`, ending in `.pem`); the certificate fetched from
//! it (cached) checks the `Signature` over the canonical string of the message's fields
//! (SignatureVersion 2: RSA with SHA-256). Only topics listed in `[providers] ses_topics` are
//! taken. A `SubscriptionConfirmation` is confirmed by fetching its `SubscribeURL` (same
//! host rule). A `Notification` of type Bounce or Complaint names its job by the original
//! message's `X-Paloma-Id` / `X-Paloma-Campaign` headers (enable "include original headers"
//! in SES's notification settings).

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde::Deserialize;

use super::providers::Item;
use super::record::Finding;
use super::TokenJob;

/// An SNS message as POSTed.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SnsMessage {
    #[serde(rename = "Type")]
    pub kind: String,
    pub message_id: String,
    pub topic_arn: String,
    #[serde(default)]
    pub subject: Option<String>,
    pub message: String,
    pub timestamp: String,
    pub signature_version: String,
    pub signature: String,
    #[serde(rename = "SigningCertURL")]
    pub signing_cert_url: String,
    #[serde(rename = "SubscribeURL", default)]
    pub subscribe_url: Option<String>,
    #[serde(default)]
    pub token: Option<String>,
}

impl SnsMessage {
    /// The string SNS signs: `Name\nvalue\n` for each signed field, in AWS's order.
    pub fn string_to_sign(&self) -> Option<String> {
        let mut s = String::with_capacity(self.message.len() + 256);
        let mut add = |k: &str, v: &str| {
            s.push_str(k);
            s.push('\n');
            s.push_str(v);
            s.push('\n');
        };
        match self.kind.as_str() {
            "Notification" => {
                add("Message", &self.message);
                add("MessageId", &self.message_id);
                if let Some(subj) = &self.subject {
                    add("Subject", subj);
                }
                add("Timestamp", &self.timestamp);
                add("TopicArn", &self.topic_arn);
                add("Type", &self.kind);
            }
            "SubscriptionConfirmation" | "UnsubscribeConfirmation" => {
                add("Message", &self.message);
                add("MessageId", &self.message_id);
                add("SubscribeURL", self.subscribe_url.as_deref()?);
                add("Timestamp", &self.timestamp);
                add("Token", self.token.as_deref()?);
                add("TopicArn", &self.topic_arn);
                add("Type", &self.kind);
            }
            _ => return None,
        }
        Some(s)
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    Malformed,
    Topic,
    CertUrl,
    Cert,
    BadSignature,
    Version,
}

/// Checks SNS messages for the configured topics.
pub struct Ses {
    topics: Vec<String>,
    cert_prefix: Option<String>,
    /// Certificates by URL (a handful: one per region and key rotation).
    certs: Mutex<HashMap<String, Vec<u8>>>,
    http: reqwest::Client,
}

impl Ses {
    pub fn new(topics: Vec<String>, cert_prefix: Option<String>) -> Result<Ses, reqwest::Error> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(std::time::Duration::from_secs(10))
            .build()?;
        Ok(Ses {
            topics,
            cert_prefix,
            certs: Mutex::new(HashMap::new()),
            http,
        })
    }

    /// Whether `url` is one SNS would send from: `https://sns.{region}.amazonaws.com/….pem`
    /// (or under the configured prefix).
    pub fn trusted_url(&self, url: &str, pem: bool) -> bool {
        if let Some(p) = &self.cert_prefix {
            return url.starts_with(p.as_str()) && (!pem || url.ends_with(".pem"));
        }
        let Some(rest) = url.strip_prefix("https://") else {
            return false;
        };
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let region_ok = host
            .strip_prefix("sns.")
            .and_then(|h| h.strip_suffix(".amazonaws.com"))
            .is_some_and(|r| {
                !r.is_empty() && r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        region_ok && (!pem || path.ends_with(".pem"))
    }

    async fn cert(&self, url: &str) -> Result<Vec<u8>, Refused> {
        if let Some(c) = self.certs.lock().expect("certs lock").get(url) {
            return Ok(c.clone());
        }
        let pem = self
            .http
            .get(url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|_| Refused::Cert)?
            .bytes()
            .await
            .map_err(|_| Refused::Cert)?;
        let der = CertificateDer::from_pem_slice(&pem).map_err(|_| Refused::Cert)?;
        let der = der.as_ref().to_vec();
        let mut certs = self.certs.lock().expect("certs lock");
        if certs.len() >= 32 {
            certs.clear();
        }
        certs.insert(url.to_string(), der.clone());
        Ok(der)
    }

    /// Parses and verifies a POSTed body.
    pub async fn verify(&self, body: &[u8]) -> Result<SnsMessage, Refused> {
        let m: SnsMessage = serde_json::from_slice(body).map_err(|_| Refused::Malformed)?;
        if !self.topics.contains(&m.topic_arn) {
            return Err(Refused::Topic);
        }
        if m.signature_version != "2" {
            return Err(Refused::Version);
        }
        if !self.trusted_url(&m.signing_cert_url, true) {
            return Err(Refused::CertUrl);
        }
        let signed = m.string_to_sign().ok_or(Refused::Malformed)?;
        let sig = base64::engine::general_purpose::STANDARD
            .decode(m.signature.trim())
            .map_err(|_| Refused::BadSignature)?;
        let der = self.cert(&m.signing_cert_url).await?;
        let der = CertificateDer::from(der.as_slice());
        let cert = webpki::EndEntityCert::try_from(&der).map_err(|_| Refused::Cert)?;
        cert.verify_signature(
            webpki::ring::RSA_PKCS1_2048_8192_SHA256,
            signed.as_bytes(),
            &sig,
        )
        .map_err(|_| Refused::BadSignature)?;
        Ok(m)
    }

    /// Confirms a subscription (GET its SubscribeURL); false when the URL is not SNS's or
    /// the request fails.
    pub async fn confirm(&self, m: &SnsMessage) -> bool {
        let Some(url) = m.subscribe_url.as_deref() else {
            return false;
        };
        if !self.trusted_url(url, false) {
            return false;
        }
        matches!(self.http.get(url).send().await, Ok(r) if r.status().is_success())
    }
}

/// The bounces and complaints of one verified SES notification.
pub fn ses_events(m: &SnsMessage) -> Vec<Item> {
    let Ok(n) = serde_json::from_str::<serde_json::Value>(&m.message) else {
        return Vec::new();
    };
    let header = |name: &str| -> Option<String> {
        n["mail"]["headers"]
            .as_array()?
            .iter()
            .find(|h| {
                h["name"]
                    .as_str()
                    .is_some_and(|k| k.eq_ignore_ascii_case(name))
            })
            .and_then(|h| h["value"].as_str())
            .map(|v| v.trim().to_string())
    };
    let (Some(id), Some(campaign)) = (header("X-Paloma-Id"), header("X-Paloma-Campaign")) else {
        return Vec::new();
    };
    let variant = header("X-Paloma-Variant").unwrap_or_default();
    let touch = header("X-Paloma-Touch").unwrap_or_default();
    let job = |to: &str| TokenJob::named(&id, &campaign, to, &variant, &touch);
    let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    let mut out = Vec::new();
    match n["notificationType"].as_str().unwrap_or_default() {
        "Bounce" => {
            let b = &n["bounce"];
            let permanent = b["bounceType"] == "Permanent";
            let mta = s(&b["reportingMTA"])
                .trim_start_matches("dsn;")
                .trim()
                .to_string();
            for r in b["bouncedRecipients"].as_array().into_iter().flatten() {
                let to = s(&r["emailAddress"]);
                if to.is_empty() {
                    continue;
                }
                let status = match s(&r["status"]) {
                    st if st.is_empty() => if permanent { "5.0.0" } else { "4.0.0" }.to_string(),
                    st => st,
                };
                let diagnostic = s(&r["diagnosticCode"])
                    .trim_start_matches("smtp;")
                    .trim()
                    .chars()
                    .take(500)
                    .collect::<String>();
                out.push(Item {
                    finding: Finding::returned(
                        status.clone(),
                        diagnostic,
                        mta.clone(),
                        false,
                        permanent && status.starts_with('5'),
                        Some(to.clone()),
                    ),
                    event_id: format!("{}:{to}", m.message_id),
                    job: job(&to),
                });
            }
        }
        "Complaint" => {
            let c = &n["complaint"];
            let feedback = match s(&c["complaintFeedbackType"]) {
                f if f.is_empty() => "abuse".to_string(),
                f => f,
            };
            let source = match s(&c["userAgent"]) {
                u if u.is_empty() => "amazonses".to_string(),
                u => u,
            };
            for r in c["complainedRecipients"].as_array().into_iter().flatten() {
                let to = s(&r["emailAddress"]);
                if to.is_empty() {
                    continue;
                }
                out.push(Item {
                    finding: Finding::complained(
                        feedback.clone(),
                        source.clone(),
                        Some(to.clone()),
                    ),
                    event_id: format!("{}:{to}", m.message_id),
                    job: job(&to),
                });
            }
        }
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sns_hosts_may_serve_certificates() {
        let s = Ses::new(vec![], None).unwrap();
        assert!(s.trusted_url(
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem",
            true
        ));
        for bad in [
            "http://sns.us-east-1.amazonaws.com/x.pem",
            "https://sns.us-east-1.amazonaws.com.evil.test/x.pem",
            "https://evil.test/sns.us-east-1.amazonaws.com/x.pem",
            "https://sns..amazonaws.com/x.pem",
            "https://sns.us-east-1.amazonaws.com/x.txt",
            "https://user@sns.us-east-1.amazonaws.com/x.pem",
        ] {
            assert!(!s.trusted_url(bad, true), "{bad}");
        }
    }

    #[test]
    fn the_canonical_string_follows_aws_order() {
        let m: SnsMessage = serde_json::from_str(
            r#"{"Type":"Notification","MessageId":"m","TopicArn":"t","Message":"hi","Timestamp":"ts","SignatureVersion":"2","Signature":"","SigningCertURL":""}"#,
        )
        .unwrap();
        assert_eq!(
            m.string_to_sign().unwrap(),
            "Message\nhi\nMessageId\nm\nTimestamp\nts\nTopicArn\nt\nType\nNotification\n"
        );
    }
}

//! DKIM signing with mail-auth: one key per sender domain, RSA-SHA256 or Ed25519.

use std::collections::HashMap;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{DkimSigner, Done};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer};

use crate::config::DkimSettings;

/// The headers every signature covers (those present in the message).
pub const SIGNED_HEADERS: [&str; 11] = [
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "Reply-To",
    "Feedback-ID",
    "MIME-Version",
    "Content-Type",
];

#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    #[error("dkim key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("dkim signing failed: {0}")]
    Sign(String),
}

enum Key {
    Rsa(Box<DkimSigner<RsaKey<Sha256>, Done>>),
    Ed(Box<DkimSigner<Ed25519Key, Done>>),
}

/// Signers by sender domain.
#[derive(Default)]
pub struct DkimKeys {
    by_domain: HashMap<String, Key>,
}

impl DkimKeys {
    pub fn load(settings: &[DkimSettings]) -> Result<Self, DkimError> {
        let mut by_domain = HashMap::new();
        for s in settings {
            let pem = std::fs::read_to_string(&s.key).map_err(|e| DkimError::Key {
                path: s.key.display().to_string(),
                reason: e.to_string(),
            })?;
            let key = Self::signer_from_pem(&pem, &s.domain, &s.selector).map_err(|reason| {
                DkimError::Key {
                    path: s.key.display().to_string(),
                    reason,
                }
            })?;
            by_domain.insert(s.domain.to_ascii_lowercase(), key);
        }
        Ok(DkimKeys { by_domain })
    }

    fn signer_from_pem(pem: &str, domain: &str, selector: &str) -> Result<Key, String> {
        let (label, der) = pem_decode(pem)?;
        let headers = SIGNED_HEADERS;
        match label.as_str() {
            "RSA PRIVATE KEY" => {
                let k = RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs1(
                    PrivatePkcs1KeyDer::from(der),
                ))
                .map_err(|e| e.to_string())?;
                Ok(Key::Rsa(Box::new(
                    DkimSigner::from_key(k)
                        .domain(domain)
                        .selector(selector)
                        .headers(headers),
                )))
            }
            "PRIVATE KEY" => {
                if let Ok(k) = Ed25519Key::from_pkcs8_maybe_unchecked_der(&der) {
                    return Ok(Key::Ed(Box::new(
                        DkimSigner::from_key(k)
                            .domain(domain)
                            .selector(selector)
                            .headers(headers),
                    )));
                }
                let k = RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs8(
                    PrivatePkcs8KeyDer::from(der),
                ))
                .map_err(|e| format!("neither Ed25519 nor RSA PKCS#8: {e}"))?;
                Ok(Key::Rsa(Box::new(
                    DkimSigner::from_key(k)
                        .domain(domain)
                        .selector(selector)
                        .headers(headers),
                )))
            }
            other => Err(format!(
                "unsupported PEM block {other:?} (want PRIVATE KEY or RSA PRIVATE KEY)"
            )),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_domain.is_empty()
    }

    /// Signs `message` if a key exists for `domain`, writing the `DKIM-Signature` header
    /// followed by the message into `out`. Returns false (and writes nothing) without a key.
    pub fn sign_into(
        &self,
        domain: &str,
        message: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<bool, DkimError> {
        let Some(key) = self.by_domain.get(domain) else {
            return Ok(false);
        };
        let sig = match key {
            Key::Rsa(s) => s.sign(message),
            Key::Ed(s) => s.sign(message),
        }
        .map_err(|e| DkimError::Sign(e.to_string()))?;
        let header = sig.to_header();
        out.reserve(header.len() + message.len());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(message);
        Ok(true)
    }
}

fn pem_decode(pem: &str) -> Result<(String, Vec<u8>), String> {
    let begin = pem.find("-----BEGIN ").ok_or("no PEM BEGIN line")?;
    let rest = &pem[begin + 11..];
    let label_end = rest.find("-----").ok_or("bad PEM BEGIN line")?;
    let label = rest[..label_end].to_string();
    let body_start = label_end + 5;
    let end = rest.find("-----END ").ok_or("no PEM END line")?;
    let b64: String = rest[body_start..end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let der = B64.decode(b64).map_err(|e| format!("PEM base64: {e}"))?;
    Ok((label, der))
}

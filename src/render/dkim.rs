//! DKIM signing with mail-auth: one key per sender domain, RSA-SHA256 or Ed25519.

use std::collections::HashMap;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use mail_auth::common::crypto::{Algorithm, CryptoError, Ed25519Key, Sha256, SigningKey};
use mail_auth::common::headers::{HeaderWriter, Writable};
use mail_auth::dkim::{DkimSigner, Done};

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

/// RSA-SHA256 (RSASSA-PKCS1-v1_5) with AWS-LC. mail-auth's own RSA key uses ring, whose
/// modular exponentiation has no AVX-512 IFMA path; AWS-LC carries OpenSSL's, and on CPUs
/// that have it (Ice Lake and later, Zen 4) a 2048-bit signature costs about a third of
/// ring's (benches/render.rs, `dkim` group). Elsewhere the two are within 10%.
struct RsaSha256 {
    pair: RsaKeyPair,
    rng: SystemRandom,
}

impl SigningKey for RsaSha256 {
    type Hasher = Sha256;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        // The canonicalized header block: a few hundred bytes.
        let mut data = Vec::with_capacity(1024);
        input.write(&mut data);
        let mut signature = vec![0; self.pair.public_modulus_len()];
        self.pair
            .sign(&RSA_PKCS1_SHA256, &self.rng, &data, &mut signature)
            .map_err(|e| mail_auth::Error::Crypto(CryptoError::Library(e.to_string())))?;
        Ok(signature)
    }

    fn algorithm(&self) -> Algorithm {
        Algorithm::RsaSha256
    }
}

impl RsaSha256 {
    /// AWS-LC accepts 2048- to 8192-bit keys (RFC 8301 allows 1024, but no one should).
    fn new(pair: RsaKeyPair) -> Self {
        RsaSha256 {
            pair,
            rng: SystemRandom::new(),
        }
    }
}

enum Key {
    Rsa(Box<DkimSigner<RsaSha256, Done>>),
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
        let rsa = match label.as_str() {
            "RSA PRIVATE KEY" => {
                RsaKeyPair::from_der(&der).map_err(|e| format!("RSA PRIVATE KEY: {e}"))?
            }
            "PRIVATE KEY" => {
                if let Ok(k) = Ed25519Key::from_pkcs8_maybe_unchecked_der(&der) {
                    return Ok(Key::Ed(Box::new(
                        DkimSigner::from_key(k)
                            .domain(domain)
                            .selector(selector)
                            .headers(SIGNED_HEADERS),
                    )));
                }
                RsaKeyPair::from_pkcs8(&der)
                    .map_err(|e| format!("neither Ed25519 nor RSA PKCS#8: {e}"))?
            }
            other => {
                return Err(format!(
                    "unsupported PEM block {other:?} (want PRIVATE KEY or RSA PRIVATE KEY)"
                ))
            }
        };
        Ok(Key::Rsa(Box::new(
            DkimSigner::from_key(RsaSha256::new(rsa))
                .domain(domain)
                .selector(selector)
                .headers(SIGNED_HEADERS),
        )))
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

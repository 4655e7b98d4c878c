//! SendGrid's Event Webhook verification key (`[providers] sendgrid_public_key`), parsed once
//! so that a wrong key stops the start with what to copy instead.

use base64::Engine as _;

/// The DER header of a P-256 SubjectPublicKeyInfo; the uncompressed point follows.
const P256_SPKI: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// Why `[providers] sendgrid_public_key` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendGridKeyError {
    #[error("providers.sendgrid_public_key is not base64: {0}")]
    NotBase64(String),
    #[error("providers.sendgrid_public_key is not a P-256 public key (copy the verification key from SendGrid's Event Webhook settings)")]
    NotP256,
}

/// A P-256 public key: the uncompressed point of the SubjectPublicKeyInfo.
#[derive(Clone)]
pub struct SendGridKey {
    pub point: Vec<u8>,
}

impl SendGridKey {
    /// `key`: base64 of the DER public key (SubjectPublicKeyInfo), as SendGrid shows it.
    pub fn parse(key: &str) -> Result<SendGridKey, SendGridKeyError> {
        let der = base64::engine::general_purpose::STANDARD
            .decode(key.trim())
            .map_err(|e| SendGridKeyError::NotBase64(e.to_string()))?;
        if der.len() != P256_SPKI.len() + 65 || der[..P256_SPKI.len()] != P256_SPKI {
            return Err(SendGridKeyError::NotP256);
        }
        Ok(SendGridKey {
            point: der[P256_SPKI.len()..].to_vec(),
        })
    }
}

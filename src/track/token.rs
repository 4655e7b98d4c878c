//! Signed tracking tokens: what every tracked link, open pixel and unsubscribe link carries.
//!
//! `{kid}.{body}.{mac}`: `body` is the URL-safe base64 of the token's fields, `mac` the first
//! 16 bytes of HMAC-SHA256 over `{kid}.{body}` with the secret named by `kid`. Nothing that is
//! not inside a verified token is ever used as a redirect target, and old key ids stay
//! accepted so that mail already sent keeps working after a secret is rotated.

use std::collections::HashMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const MAC_LEN: usize = 16;
const SEP: char = '\u{1f}';
/// Longest token accepted on the way in (a click token carries its URL).
pub const MAX_TOKEN_LEN: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Open,
    Click,
    Unsubscribe,
}

impl Kind {
    fn tag(self) -> char {
        match self {
            Kind::Open => 'o',
            Kind::Click => 'c',
            Kind::Unsubscribe => 'u',
        }
    }
}

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub kind: Kind,
    pub id: String,
    pub campaign: String,
    pub to: String,
    /// Click tokens: the original URL and the link's name (may be empty).
    pub url: String,
    pub link: String,
    /// Open and click tokens: when the message was rendered for sending (Unix seconds), the
    /// start of the "within seconds of delivery" machine window. None in older tokens.
    pub sent: Option<i64>,
    /// Open and click tokens of a job in an experiment: its variant ("" otherwise).
    pub variant: String,
    /// Of a marketing job: its touch bucket ("" otherwise).
    pub touch: String,
    /// Open and click tokens of a transactional job (a ninth field `t`; absent in older
    /// tokens and in marketing ones): its clicks never attribute a conversion.
    pub transactional: bool,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("unknown key id")]
    UnknownKey,
    #[error("bad signature")]
    BadSignature,
}

/// Signs with the current key, verifies with any configured key.
#[derive(Clone)]
pub struct Signer {
    kid: String,
    current: HmacSha256,
    keys: HashMap<String, HmacSha256>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Signer")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl Signer {
    pub fn new(kid: &str, secret: &str, old: &HashMap<String, String>) -> Self {
        let mk = |s: &str| HmacSha256::new_from_slice(s.as_bytes()).expect("HMAC takes any key");
        let mut keys: HashMap<String, HmacSha256> =
            old.iter().map(|(k, s)| (k.clone(), mk(s))).collect();
        keys.insert(kid.to_string(), mk(secret));
        Signer {
            kid: kid.to_string(),
            current: mk(secret),
            keys,
        }
    }

    /// Appends a token for these fields to `out`. Fields must not contain U+001F (job fields
    /// are free of control characters by validation; URLs are checked by the caller).
    pub fn sign_into(&self, out: &mut String, kind: Kind, fields: &[&str]) {
        thread_local! {
            static BODY: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let start = out.len();
        out.push_str(&self.kid);
        out.push('.');
        BODY.with_borrow_mut(|body| {
            body.clear();
            body.push(kind.tag() as u8);
            for f in fields {
                body.push(SEP as u8);
                // A separator inside a field (a link name from a template) would shift the
                // fields after it: it becomes '?'.
                if f.as_bytes().contains(&(SEP as u8)) {
                    body.extend(f.bytes().map(|b| if b == SEP as u8 { b'?' } else { b }));
                } else {
                    body.extend_from_slice(f.as_bytes());
                }
            }
            B64.encode_string(&body[..], out);
        });
        let mut mac = self.current.clone();
        mac.update(&out.as_bytes()[start..]);
        let tag = mac.finalize().into_bytes();
        out.push('.');
        B64.encode_string(&tag[..MAC_LEN], out);
    }

    pub fn sign(&self, kind: Kind, fields: &[&str]) -> String {
        let mut s = String::new();
        self.sign_into(&mut s, kind, fields);
        s
    }

    /// Verifies a token and returns what it carries. Constant-time MAC comparison.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let (signed, mac_b64) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let (kid, body_b64) = signed.split_once('.').ok_or(TokenError::Malformed)?;
        let key = self.keys.get(kid).ok_or(TokenError::UnknownKey)?;
        let tag = B64.decode(mac_b64).map_err(|_| TokenError::Malformed)?;
        if tag.len() != MAC_LEN {
            return Err(TokenError::Malformed);
        }
        let mut mac = key.clone();
        mac.update(signed.as_bytes());
        mac.verify_truncated_left(&tag)
            .map_err(|_| TokenError::BadSignature)?;
        let body = B64.decode(body_b64).map_err(|_| TokenError::Malformed)?;
        let body = String::from_utf8(body).map_err(|_| TokenError::Malformed)?;
        let mut parts = body.split(SEP);
        let kind = match parts.next() {
            Some("o") => Kind::Open,
            Some("c") => Kind::Click,
            Some("u") => Kind::Unsubscribe,
            _ => return Err(TokenError::Malformed),
        };
        let mut next = || parts.next().unwrap_or_default().to_string();
        let (id, campaign, to) = (next(), next(), next());
        let (url, link) = (next(), next());
        let sent = next().parse().ok();
        let variant = next();
        let touch = next();
        let transactional = next() == "t";
        if id.is_empty() || (kind == Kind::Click && url.is_empty()) {
            return Err(TokenError::Malformed);
        }
        Ok(Claims {
            kind,
            id,
            campaign,
            to,
            url,
            link,
            sent,
            variant,
            touch,
            transactional,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> Signer {
        Signer::new(
            "2",
            "a-very-secret-key-123",
            &HashMap::from([("1".into(), "older-secret-key-456".into())]),
        )
    }

    #[test]
    fn round_trip_and_url_safe() {
        let s = signer();
        let t = s.sign(
            Kind::Click,
            &[
                "job-1",
                "spring",
                "a@b.co",
                "https://shop.example/p?x=1&y=2",
                "pricing",
            ],
        );
        assert!(
            t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
            "{t}"
        );
        let c = s.verify(&t).unwrap();
        assert_eq!(c.kind, Kind::Click);
        assert_eq!(c.url, "https://shop.example/p?x=1&y=2");
        assert_eq!(c.link, "pricing");
        assert_eq!(c.to, "a@b.co");
        assert_eq!(c.sent, None);
        let t = s.sign(
            Kind::Open,
            &["job-1", "spring", "a@b.co", "", "", "1795000000"],
        );
        let c = s.verify(&t).unwrap();
        assert_eq!((c.kind, c.sent), (Kind::Open, Some(1795000000)));
        let t = s.sign(
            Kind::Click,
            &[
                "j",
                "c",
                "a@b.co",
                "https://x.example/",
                "a\u{1f}0",
                "1795000000",
            ],
        );
        let c = s.verify(&t).unwrap();
        assert_eq!((c.link.as_str(), c.sent), ("a?0", Some(1795000000)));
        assert!(!c.transactional);
        let t = s.sign(
            Kind::Click,
            &[
                "j",
                "c",
                "a@b.co",
                "https://x.example/",
                "",
                "1",
                "",
                "",
                "t",
            ],
        );
        assert!(s.verify(&t).unwrap().transactional);
    }

    #[test]
    fn tampering_is_detected() {
        let s = signer();
        let t = s.sign(
            Kind::Click,
            &["j", "c", "a@b.co", "https://good.example/", ""],
        );
        let forged_body =
            B64.encode("c\u{1f}j\u{1f}c\u{1f}a@b.co\u{1f}https://evil.example/\u{1f}");
        let parts: Vec<&str> = t.split('.').collect();
        let forged = format!("{}.{}.{}", parts[0], forged_body, parts[2]);
        assert_eq!(s.verify(&forged), Err(TokenError::BadSignature));
        let mut flipped = t.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        assert!(s.verify(std::str::from_utf8(&flipped).unwrap()).is_err());
        assert_eq!(s.verify("x.y.z"), Err(TokenError::UnknownKey));
        assert_eq!(s.verify("garbage"), Err(TokenError::Malformed));
        assert_eq!(
            s.verify(&"a".repeat(MAX_TOKEN_LEN + 1)),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn rotated_keys_still_verify() {
        let old = Signer::new("1", "older-secret-key-456", &HashMap::new());
        let t = old.sign(Kind::Unsubscribe, &["j", "c", "a@b.co"]);
        assert_eq!(signer().verify(&t).unwrap().kind, Kind::Unsubscribe);
        let stranger = Signer::new("2", "somebody-elses-key-789", &HashMap::new());
        let t = stranger.sign(Kind::Open, &["j", "c", "a@b.co"]);
        assert_eq!(signer().verify(&t), Err(TokenError::BadSignature));
    }
}

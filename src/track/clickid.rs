//! Click ids: what a tracked redirect appends to its target URL (`[tracking] click_param`),
//! so that the shop can hand the click back with a conversion (`POST /api/v1/conversions`).
//!
//! A click id carries everything attribution needs, so nothing is stored per click: the
//! message (job id, campaign, recipient, link name, variant, touch bucket, whether it was
//! transactional), when the click was made, and whether the tracking server judged it a
//! person's or a machine hit ([`super::machine`]).
//!
//! `{kid}.{body}`: `body` is the URL-safe base64 of a 12-byte random nonce, then the fields
//! sealed with AES-256-GCM-SIV under a key derived from the tracking secret named by `kid`
//! (HMAC-SHA256 of the secret over a fixed label, so the key is never the secret itself).
//! Sealed rather than only signed: the id travels in the shop's URLs (its logs, analytics,
//! referrers), and must say nothing readable there, neither the recipient's address nor
//! the machine verdict (a scanner must not learn how it was judged). The AEAD tag makes it
//! unforgeable: any change fails to open. GCM-SIV stays safe even if two random nonces ever
//! collided. Old key ids stay accepted, as for the tracking tokens.

use std::collections::HashMap;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM_SIV, NONCE_LEN};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const SEP: u8 = 0x1f;
/// Longest click id accepted on the way in.
pub const MAX_CLICK_ID_LEN: usize = 2048;
/// The label the sealing key is derived with (a version, should the format change).
const LABEL: &[u8] = b"paloma click id v1";

/// What a click id says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Click {
    /// The job (message) clicked.
    pub job: String,
    pub campaign: String,
    pub to: String,
    /// The link's name (`data-paloma-link`; may be empty).
    pub link: String,
    /// The job's experiment variant ("" when none).
    pub variant: String,
    /// A marketing job's touch bucket ("" when none).
    pub touch: String,
    pub transactional: bool,
    /// Judged a machine hit (a scanner, a proxy) rather than a person's click.
    pub machine: bool,
    /// When the click was made (Unix seconds).
    pub at: i64,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClickIdError {
    #[error("malformed click id")]
    Malformed,
    #[error("unknown key id")]
    UnknownKey,
    /// Tampered with, or sealed with another key.
    #[error("forged click id")]
    Forged,
}

/// Seals with the current key, opens with any configured key.
pub struct ClickIds {
    kid: String,
    keys: HashMap<String, LessSafeKey>,
}

impl std::fmt::Debug for ClickIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("ClickIds")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

fn derive(secret: &str) -> LessSafeKey {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(LABEL);
    let key = mac.finalize().into_bytes();
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM_SIV, &key).expect("a 32-byte key"))
}

impl ClickIds {
    /// `kid`/`secret` as `tracking.key_id`/`tracking.secret`, `old` as `tracking.old_secrets`.
    pub fn new(kid: &str, secret: &str, old: &HashMap<String, String>) -> ClickIds {
        let mut keys: HashMap<String, LessSafeKey> =
            old.iter().map(|(k, s)| (k.clone(), derive(s))).collect();
        keys.insert(kid.to_string(), derive(secret));
        ClickIds {
            kid: kid.to_string(),
            keys,
        }
    }

    /// From `[tracking]`: its key id, secret and old secrets.
    pub fn of(t: &crate::config::TrackingSettings) -> ClickIds {
        ClickIds::new(
            &t.key_id,
            t.secret.expose(),
            &t.old_secrets
                .iter()
                .map(|(k, v)| (k.clone(), v.expose().to_string()))
                .collect(),
        )
    }

    /// The click id of `c`: URL-safe (`[A-Za-z0-9_.-]`).
    pub fn seal(&self, c: &Click) -> String {
        let mut body = Vec::with_capacity(NONCE_LEN + 96 + c.to.len() + c.job.len());
        let mut nonce = [0u8; NONCE_LEN];
        // A failing system RNG leaves the nonce at zero: GCM-SIV stays unforgeable then.
        let _ = aws_lc_rs::rand::fill(&mut nonce);
        body.extend_from_slice(&nonce);
        let at = c.at.to_string();
        let flags = [
            if c.machine { b'm' } else { b'h' },
            if c.transactional { b't' } else { b'-' },
        ];
        let fields: [&[u8]; 8] = [
            &flags,
            at.as_bytes(),
            c.job.as_bytes(),
            c.campaign.as_bytes(),
            c.to.as_bytes(),
            c.link.as_bytes(),
            c.variant.as_bytes(),
            c.touch.as_bytes(),
        ];
        for (i, f) in fields.iter().enumerate() {
            if i > 0 {
                body.push(SEP);
            }
            // A separator inside a field would shift the fields after it.
            body.extend(f.iter().map(|&b| if b == SEP { b'?' } else { b }));
        }
        let mut sealed = body.split_off(NONCE_LEN);
        let key = &self.keys[&self.kid];
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(self.kid.as_bytes()),
            &mut sealed,
        )
        .expect("sealing a short buffer");
        body.extend_from_slice(&sealed);
        let mut out = String::with_capacity(self.kid.len() + 1 + body.len() * 4 / 3 + 4);
        out.push_str(&self.kid);
        out.push('.');
        B64.encode_string(&body, &mut out);
        out
    }

    /// What a click id says, if it was sealed by one of the configured keys.
    pub fn open(&self, id: &str) -> Result<Click, ClickIdError> {
        if id.len() > MAX_CLICK_ID_LEN {
            return Err(ClickIdError::Malformed);
        }
        let (kid, body) = id.split_once('.').ok_or(ClickIdError::Malformed)?;
        let key = self.keys.get(kid).ok_or(ClickIdError::UnknownKey)?;
        let mut body = B64.decode(body).map_err(|_| ClickIdError::Malformed)?;
        if body.len() < NONCE_LEN + 16 {
            return Err(ClickIdError::Malformed);
        }
        let mut sealed = body.split_off(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(&body).map_err(|_| ClickIdError::Malformed)?;
        let plain = key
            .open_in_place(nonce, Aad::from(kid.as_bytes()), &mut sealed)
            .map_err(|_| ClickIdError::Forged)?;
        let plain = std::str::from_utf8(plain).map_err(|_| ClickIdError::Malformed)?;
        let mut parts = plain.split(SEP as char);
        let flags = parts.next().unwrap_or_default().as_bytes();
        let (machine, transactional) = match flags {
            [m @ (b'm' | b'h'), t @ (b't' | b'-')] => (*m == b'm', *t == b't'),
            _ => return Err(ClickIdError::Malformed),
        };
        let at = parts
            .next()
            .and_then(|a| a.parse().ok())
            .ok_or(ClickIdError::Malformed)?;
        let mut next = || parts.next().unwrap_or_default().to_string();
        let c = Click {
            job: next(),
            campaign: next(),
            to: next(),
            link: next(),
            variant: next(),
            touch: next(),
            transactional,
            machine,
            at,
        };
        if c.job.is_empty() {
            return Err(ClickIdError::Malformed);
        }
        Ok(c)
    }
}

/// A recipient's last click by a person on a marketing message, as kept in the field
/// `last_human_click` of `r:{address}`: `{at}␟{job}␟{campaign}␟{link}␟{variant}␟{touch}`
/// (U+001F between fields). What a conversion posted by address is attributed to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LastClick {
    /// Unix seconds.
    pub at: i64,
    pub job: String,
    pub campaign: String,
    pub link: String,
    pub variant: String,
    pub touch: String,
}

impl LastClick {
    pub fn encode(&self) -> String {
        let clean = |f: &str| f.replace(SEP as char, "?");
        format!(
            "{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}",
            self.at,
            clean(&self.job),
            clean(&self.campaign),
            clean(&self.link),
            clean(&self.variant),
            clean(&self.touch)
        )
    }

    pub fn decode(s: &str) -> Option<LastClick> {
        let mut parts = s.split(SEP as char);
        let at = parts.next()?.parse().ok()?;
        let mut next = || parts.next().unwrap_or_default().to_string();
        let c = LastClick {
            at,
            job: next(),
            campaign: next(),
            link: next(),
            variant: next(),
            touch: next(),
        };
        (!c.job.is_empty()).then_some(c)
    }
}

/// `url` with `param=value` added to its query: after `?` or `&` as the URL needs, and
/// before any `#fragment`. `value` must be URL-safe already (a click id is).
pub fn append_param(url: &str, param: &str, value: &str) -> String {
    let (base, fragment) = match url.find('#') {
        Some(i) => url.split_at(i),
        None => (url, ""),
    };
    let mut out = String::with_capacity(url.len() + param.len() + value.len() + 2);
    out.push_str(base);
    if !base.contains('?') {
        out.push('?');
    } else if !base.ends_with('?') && !base.ends_with('&') {
        out.push('&');
    }
    out.push_str(param);
    out.push('=');
    out.push_str(value);
    out.push_str(fragment);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> ClickIds {
        ClickIds::new(
            "2",
            "a-very-secret-key-123",
            &HashMap::from([("1".into(), "older-secret-key-456".into())]),
        )
    }

    fn click() -> Click {
        Click {
            job: "job-1".into(),
            campaign: "spring".into(),
            to: "ann@example.com".into(),
            link: "pricing".into(),
            variant: "B".into(),
            touch: "2".into(),
            transactional: false,
            machine: false,
            at: 1_795_000_000,
        }
    }

    #[test]
    fn click_ids_round_trip_url_safe_and_unreadable() {
        let ids = ids();
        let c = click();
        let id = ids.seal(&c);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
            "{id}"
        );
        assert!(id.len() < 200, "{} bytes: {id}", id.len());
        assert_eq!(ids.open(&id).unwrap(), c);
        // Nothing readable: not the address, not the campaign.
        let raw = B64.decode(id.split_once('.').unwrap().1).unwrap();
        assert!(!raw.windows(7).any(|w| w == b"example"));
        // Two clicks of the same link get different ids.
        assert_ne!(ids.seal(&c), id);
        let m = Click {
            machine: true,
            transactional: true,
            link: "a\u{1f}b".into(),
            ..c
        };
        let back = ids.open(&ids.seal(&m)).unwrap();
        assert!(back.machine && back.transactional);
        assert_eq!(back.link, "a?b");
        assert_eq!(back.variant, "B");
    }

    #[test]
    fn forged_or_foreign_click_ids_do_not_open() {
        let ids = ids();
        let id = ids.seal(&click());
        // Any changed byte of the body: forged.
        let (kid, body) = id.split_once('.').unwrap();
        let mut raw = B64.decode(body).unwrap();
        for i in [0, NONCE_LEN, raw.len() - 1] {
            raw[i] ^= 1;
            let t = format!("{kid}.{}", B64.encode(&raw));
            assert_eq!(ids.open(&t), Err(ClickIdError::Forged), "byte {i}");
            raw[i] ^= 1;
        }
        // Moved to another key id: the key id is authenticated too.
        assert_eq!(ids.open(&format!("1.{body}")), Err(ClickIdError::Forged));
        assert_eq!(
            ids.open(&format!("9.{body}")),
            Err(ClickIdError::UnknownKey)
        );
        let stranger = ClickIds::new("2", "somebody-elses-key-789", &HashMap::new());
        assert_eq!(
            ids.open(&stranger.seal(&click())),
            Err(ClickIdError::Forged)
        );
        for bad in ["", "2", "2.", "2.!!", "2.AAAA", "garbage"] {
            assert!(ids.open(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            ids.open(&"2.".repeat(MAX_CLICK_ID_LEN)),
            Err(ClickIdError::Malformed)
        );
        // An old key still opens what it sealed.
        let old = ClickIds::new("1", "older-secret-key-456", &HashMap::new());
        assert_eq!(ids.open(&old.seal(&click())).unwrap(), click());
    }

    #[test]
    fn last_clicks_round_trip() {
        let c = LastClick {
            at: 1_795_000_000,
            job: "j-1".into(),
            campaign: "spring".into(),
            link: "".into(),
            variant: "A".into(),
            touch: "1".into(),
        };
        assert_eq!(LastClick::decode(&c.encode()), Some(c));
        assert_eq!(LastClick::decode("x\u{1f}j"), None);
        assert_eq!(LastClick::decode("12"), None);
    }

    #[test]
    fn the_param_goes_into_the_query_before_the_fragment() {
        let a = |u| append_param(u, "pc", "X.y");
        assert_eq!(a("https://s.example/p"), "https://s.example/p?pc=X.y");
        assert_eq!(
            a("https://s.example/p?a=1"),
            "https://s.example/p?a=1&pc=X.y"
        );
        assert_eq!(a("https://s.example/p?"), "https://s.example/p?pc=X.y");
        assert_eq!(
            a("https://s.example/p?a=1&"),
            "https://s.example/p?a=1&pc=X.y"
        );
        assert_eq!(
            a("https://s.example/p#top"),
            "https://s.example/p?pc=X.y#top"
        );
        assert_eq!(
            a("https://s.example/p?a=1#x?y"),
            "https://s.example/p?a=1&pc=X.y#x?y"
        );
    }
}

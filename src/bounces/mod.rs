//! Late bounces and complaints: what comes back after a message was accepted.
//!
//! - [`ReturnPaths`]: with `[bounces] domain` set, each message's envelope sender is
//!   `b-{token}@domain` (VERP). The token is 32 hex digits: a key derived from the job id
//!   with an HMAC under `tracking.secret`, and a MAC of that key, so a forged or altered
//!   token is recognised without a lookup. A token made under one of
//!   `tracking.old_secrets` verifies too: a DSN for mail sent before a rotation still names
//!   its job (whose record was written under the key of its day). The key names `{prefix}rp:{key}`, written by the
//!   intake in the claim round trip of each batch: the job's id, campaign and recipient, for
//!   `bounces.token_ttl` (30 days by default).
//! - [`report`]: what an inbound message is — an RFC 3464 DSN, an ARF (RFC 5965) feedback
//!   report, an auto-reply (ignored), or a plain-text bounce — parsed with mail-parser.
//! - [`fields`]: the sizes of what a report may record, and RFC 3463 statuses.
//! - [`server`]: the inbound SMTP listener for DSNs and feedback reports.
//! - [`providers`] (SendGrid) and [`ses`] (Amazon SES through SNS): the same reports as
//!   signed webhooks on the tracking server; [`record`] writes them all.

pub mod fields;
pub mod providers;
pub mod record;
pub mod report;
pub mod server;
pub mod ses;
pub mod webhooks;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::Settings;

type HmacSha256 = Hmac<Sha256>;

/// Hex digits of a token's key and of its MAC.
const KEY_HEX: usize = 20;
const MAC_HEX: usize = 12;

/// Makes and checks VERP return paths.
#[derive(Clone)]
pub struct ReturnPaths {
    pub domain: String,
    /// `tracking.secret`'s HMAC (which makes tokens), then each of `old_secrets` (by key id),
    /// which still check them.
    macs: Vec<HmacSha256>,
    pub ttl_secs: u64,
}

fn hex(bytes: &[u8], out: &mut String) {
    use std::fmt::Write;
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
}

impl ReturnPaths {
    /// None unless `[bounces] domain` is set.
    pub fn new(settings: &Settings) -> Option<ReturnPaths> {
        let domain = settings.bounces.domain.clone()?;
        let t = &settings.tracking;
        let mut old: Vec<_> = t.old_secrets.iter().collect();
        old.sort_by(|a, b| a.0.cmp(b.0));
        let macs = std::iter::once(&t.secret)
            .chain(old.into_iter().map(|(_, s)| s))
            .map(|s| HmacSha256::new_from_slice(s.expose().as_bytes()).expect("HMAC takes any key"))
            .collect();
        Some(ReturnPaths {
            domain: domain.to_ascii_lowercase(),
            macs,
            ttl_secs: settings.bounces.token_ttl.get().as_secs().max(1),
        })
    }

    fn tag(mac: &HmacSha256, context: &[u8], data: &[u8]) -> [u8; 32] {
        let mut m = mac.clone();
        m.update(context);
        m.update(data);
        m.finalize().into_bytes().into()
    }

    fn key_with(mac: &HmacSha256, job_id: &str) -> String {
        let mut k = String::with_capacity(KEY_HEX);
        hex(
            &Self::tag(mac, b"paloma-rp-key\0", job_id.as_bytes())[..KEY_HEX / 2],
            &mut k,
        );
        k
    }

    /// The key of a job's token (hex), the same for every attempt of the job.
    pub fn key(&self, job_id: &str) -> String {
        Self::key_with(&self.macs[0], job_id)
    }

    /// The keys a job's tokens may have had: under the current secret first, then under
    /// each old one (mail sent before a rotation).
    pub fn keys(&self, job_id: &str) -> Vec<String> {
        self.macs
            .iter()
            .map(|m| Self::key_with(m, job_id))
            .collect()
    }

    fn mac_with(mac: &HmacSha256, key: &str) -> String {
        let mut m = String::with_capacity(MAC_HEX);
        hex(
            &Self::tag(mac, b"paloma-rp-mac\0", key.as_bytes())[..MAC_HEX / 2],
            &mut m,
        );
        m
    }

    fn mac_of(&self, key: &str) -> String {
        Self::mac_with(&self.macs[0], key)
    }

    /// The envelope sender of a job's messages: `b-{key}{mac}@{domain}` (36 octets of local
    /// part at most, under RFC 5321's 64).
    pub fn address(&self, job_id: &str) -> String {
        let key = self.key(job_id);
        format!("b-{key}{}@{}", self.mac_of(&key), self.domain)
    }

    /// A job's Message-ID with `[bounces]` on: `{key}{mac}@{domain}`, the token without its
    /// `b-`, stable per job like the default one.
    pub fn message_id(&self, job_id: &str, domain: &str) -> String {
        let key = self.key(job_id);
        format!("{key}{}@{domain}", self.mac_of(&key))
    }

    /// The key named by a Message-ID (`<{key}{mac}@…>`) this instance made, if it is one.
    pub fn key_of_message_id(&self, message_id: &str) -> Option<String> {
        let local = message_id
            .trim()
            .trim_matches(['<', '>'])
            .split('@')
            .next()?;
        self.verify(&format!("b-{local}"))
    }

    /// The key of a local part `b-{key}{mac}` whose MAC is right under the current secret
    /// or an old one (case-insensitive: some servers change the case of what they return);
    /// None for anything else.
    pub fn verify(&self, local: &str) -> Option<String> {
        let t = local
            .strip_prefix("b-")
            .or_else(|| local.strip_prefix("B-"))?;
        if t.len() != KEY_HEX + MAC_HEX || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let t = t.to_ascii_lowercase();
        // All ASCII hex digits: any split is at a character boundary.
        let (key, mac) = t.split_at(KEY_HEX);
        // Constant time: the MAC is the only secret-derived part compared, and every key
        // is tried whichever matches.
        let same = self.macs.iter().fold(false, |any, m| {
            let want = Self::mac_with(m, key);
            let diff = want
                .bytes()
                .zip(mac.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            any | (diff == 0)
        });
        same.then(|| key.to_string())
    }

    /// The keys of every valid token `b-…@{domain}` found anywhere in `text` (a returned
    /// message's headers or body), without repeats, and how many token-shaped ones had a
    /// wrong MAC.
    pub fn find(&self, text: &[u8]) -> (Vec<String>, usize) {
        let mut out: Vec<String> = Vec::new();
        let mut invalid = 0;
        let n = KEY_HEX + MAC_HEX;
        let mut i = 0;
        while i + 2 + n < text.len() {
            let at = &text[i..];
            if (at[0] == b'b' || at[0] == b'B')
                && at[1] == b'-'
                && (i == 0 || !text[i - 1].is_ascii_alphanumeric())
                && at.get(2 + n) == Some(&b'@')
                && at[2 + n + 1..]
                    .get(..self.domain.len())
                    .is_some_and(|d| d.eq_ignore_ascii_case(self.domain.as_bytes()))
            {
                let local = std::str::from_utf8(&at[..2 + n]).unwrap_or_default();
                if local.len() == 2 + n && local.bytes().skip(2).all(|b| b.is_ascii_hexdigit()) {
                    match self.verify(local) {
                        Some(k) if !out.contains(&k) => out.push(k),
                        Some(_) => {}
                        None => invalid += 1,
                    }
                }
                i += 2 + n;
                continue;
            }
            i += 1;
        }
        (out, invalid)
    }
}

/// What `{prefix}rp:{key}` holds: the job a token names.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenJob {
    pub id: String,
    pub campaign: String,
    pub to: String,
    /// Its experiment variant, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// A marketing job's touch bucket (see [`crate::policy::touches`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub touch: Option<String>,
}

impl TokenJob {
    /// The job a provider's event names, by the values paloma put in the message (unique
    /// args, headers). A variant or touch that paloma could not have written is dropped, so
    /// that the counters' fields stay the bounded set the config and the buckets make.
    pub fn named(id: &str, campaign: &str, to: &str, variant: &str, touch: &str) -> Self {
        let variant_ok = crate::values::valid_variant_name(variant);
        TokenJob {
            id: id.to_string(),
            campaign: campaign.to_string(),
            to: to.to_string(),
            variant: variant_ok.then(|| variant.to_string()),
            touch: crate::policy::touches::BUCKETS
                .contains(&touch)
                .then(|| touch.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_provider_names_only_variants_and_buckets_paloma_could_have_written() {
        let j = TokenJob::named("j", "c", "a@b.test", "b-2", "4-6");
        assert_eq!(j.variant.as_deref(), Some("b-2"));
        assert_eq!(j.touch.as_deref(), Some("4-6"));
        let long = "v".repeat(33);
        for (v, t) in [("", ""), ("a:b", "5"), (long.as_str(), "13+ ")] {
            let j = TokenJob::named("j", "c", "a@b.test", v, t);
            assert_eq!((j.variant, j.touch), (None, None), "{v:?} {t:?}");
        }
    }

    fn paths() -> ReturnPaths {
        let s = Settings::from_toml(
            "[sender]\nfrom = \"a@shop.test\"\nhelo = \"h\"\n[tracking]\nsecret = \"0123456789abcdef0\"\n[bounces]\ndomain = \"Bounces.Shop.Test\"\n",
            Vec::new(),
        )
        .unwrap();
        ReturnPaths::new(&s).unwrap()
    }

    #[test]
    fn a_token_verifies_and_any_change_is_refused() {
        let p = paths();
        let addr = p.address("job-1");
        let (local, domain) = addr.split_once('@').unwrap();
        assert_eq!(domain, "bounces.shop.test");
        assert!(local.len() <= 64);
        assert_eq!(p.verify(local), Some(p.key("job-1")));
        assert_eq!(p.verify(&local.to_ascii_uppercase()), Some(p.key("job-1")));
        assert_eq!(p.address("job-1"), addr, "stable per job");
        assert_ne!(p.key("job-2"), p.key("job-1"));
        // Every single-digit change is caught.
        for i in 2..local.len() {
            let mut b = local.as_bytes().to_vec();
            b[i] = if b[i] == b'0' { b'1' } else { b'0' };
            assert_eq!(
                p.verify(std::str::from_utf8(&b).unwrap()),
                None,
                "digit {i}"
            );
        }
        assert_eq!(p.verify("b-short"), None);
        let mid = p.message_id("job-1", "shop.test");
        assert_eq!(
            p.key_of_message_id(&format!("<{mid}>")),
            Some(p.key("job-1"))
        );
        assert_eq!(p.key_of_message_id("<abc@shop.test>"), None);
        assert_eq!(p.verify("postmaster"), None);
    }

    #[test]
    fn tokens_made_under_an_old_secret_still_verify() {
        let old = paths();
        let s = Settings::from_toml(
            "[sender]\nfrom = \"a@shop.test\"\nhelo = \"h\"\n[tracking]\nsecret = \"fedcba9876543210f\"\nold_secrets = { \"1\" = \"0123456789abcdef0\" }\n[bounces]\ndomain = \"bounces.shop.test\"\n",
            Vec::new(),
        )
        .unwrap();
        let new = ReturnPaths::new(&s).unwrap();
        let addr = old.address("job-1");
        let local = addr.split('@').next().unwrap();
        assert_ne!(new.key("job-1"), old.key("job-1"));
        assert_eq!(new.verify(local), Some(old.key("job-1")));
        assert_eq!(new.keys("job-1"), [new.key("job-1"), old.key("job-1")]);
        let (local, _) = new
            .address("job-2")
            .split_once('@')
            .map(|(l, d)| (l.to_string(), d.to_string()))
            .unwrap();
        assert_eq!(
            old.verify(&local),
            None,
            "the old key alone does not know the new"
        );
        assert_eq!(new.verify(&local), Some(new.key("job-2")));
    }

    #[test]
    fn tokens_are_found_in_returned_text() {
        let p = paths();
        let a = p.address("job-1");
        let b = p.address("job-2");
        let text = format!(
            "Return-Path: <{a}>\r\nX: xb-{b}\r\nTo: <{}>\r\n<{a}>",
            b.to_uppercase()
        );
        assert_eq!(
            p.find(text.as_bytes()),
            (vec![p.key("job-1"), p.key("job-2")], 0)
        );
        assert_eq!(p.find(b"b-0123@bounces.shop.test"), (vec![], 0));
        let forged = format!("<b-{}@bounces.shop.test>", "0".repeat(32));
        assert_eq!(p.find(forged.as_bytes()), (vec![], 1));
    }
}

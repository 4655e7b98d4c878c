//! Secrets in config: the [`Secret`] type (its `Debug` shows nothing), the policy that
//! refuses weak and example secrets, and the scrubbing of secret values out of messages.

use std::fmt;

use serde::Deserialize;

/// A secret value (HMAC keys, passwords, tokens). Its `Debug` never shows it, so a logged
/// or printed `Settings` carries no secret; `expose()` is the one way to read it.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "[redacted]"
        })
    }
}

/// How to make a good secret, for the messages that refuse a weak one.
pub const MAKE_SECRET: &str = "make one with `openssl rand -hex 32` (or `head -c 32 /dev/urandom | base64`) and set it in the file or, better, in the environment";

/// Why `s` is too weak to sign links or guard an API, if it is: shorter than 16 characters,
/// a placeholder copied from an example (the shipped config's, "change-me", "secret", …),
/// or so repetitive that it is guessed in a few tries (fewer than 6 distinct characters).
pub fn weak_secret(s: &str) -> Option<&'static str> {
    let lower = s.trim().to_ascii_lowercase();
    let squashed: String = lower
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    const PLACEHOLDERS: [&str; 12] = [
        "changemetoalongrandomstring",
        "changeme",
        "replaceme",
        "yoursecret",
        "mysecret",
        "secret",
        "password",
        "example",
        "notsecret",
        "insecure",
        "placeholder",
        "todo",
    ];
    let distinct = {
        let mut seen: Vec<char> = s.chars().collect();
        seen.sort_unstable();
        seen.dedup();
        seen.len()
    };
    if s.len() < 16 {
        Some("it is shorter than 16 characters")
    } else if PLACEHOLDERS.iter().any(|p| {
        !squashed.is_empty()
            && squashed.len().is_multiple_of(p.len())
            && squashed == p.repeat(squashed.len() / p.len())
    }) || ["changeme", "replaceme", "yoursecret", "placeholder"]
        .iter()
        .any(|p| squashed.starts_with(p))
    {
        Some("it is a placeholder from an example, known to everyone")
    } else if distinct < 6 {
        Some("it has fewer than 6 distinct characters")
    } else {
        None
    }
}

/// Keys whose values are secrets: never echoed in an error, and read from the environment
/// as strings whatever they look like (a numeric password is still a password).
pub(super) fn is_secret_key(key: &str) -> bool {
    let k = key.trim_matches('"').to_ascii_lowercase();
    matches!(k.as_str(), "secret" | "password" | "token" | "old_secrets")
        || k.ends_with("_secret")
        || k.ends_with("_password")
        || k.ends_with("_token")
}

/// Every secret value in the tree (and every Redis URL, which may carry a password).
pub(super) fn collect(v: &toml::Value, under_secret: bool, out: &mut Vec<String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                if k == "url" || k == "cluster_nodes" || k == "sentinels" {
                    // Only the password part of a Redis URL (`redis://:pass@host`).
                    let urls: Vec<&str> = match v {
                        toml::Value::String(u) => vec![u.as_str()],
                        toml::Value::Array(a) => a.iter().filter_map(|u| u.as_str()).collect(),
                        _ => Vec::new(),
                    };
                    for u in urls {
                        if let Some((cred, _)) =
                            u.split_once("://").and_then(|(_, r)| r.rsplit_once('@'))
                        {
                            let pass = cred.rsplit_once(':').map_or(cred, |(_, p)| p);
                            out.push(pass.to_string());
                        }
                    }
                    continue;
                }
                collect(v, under_secret || is_secret_key(k), out);
            }
        }
        toml::Value::Array(a) => {
            for v in a {
                collect(v, under_secret, out);
            }
        }
        other if under_secret => {
            let s = match other {
                toml::Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            out.push(s);
        }
        _ => {}
    }
}

/// `msg` with every secret value in it replaced.
pub(super) fn scrub(mut msg: String, secrets: &[String]) -> String {
    for s in secrets {
        // Very short values would blank out ordinary words; they are refused as weak anyway.
        if s.len() >= 3 && msg.contains(s.as_str()) {
            msg = msg.replace(s.as_str(), "[redacted]");
        }
    }
    msg
}

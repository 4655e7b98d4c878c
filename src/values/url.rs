//! URLs config carries: Redis URLs (which may hold a password, so they never print it) and
//! webhook targets (checked once, when the config is read).

use std::fmt;

use serde::Deserialize;

/// A Redis URL (`redis://[user:password@]host:port/db`, `rediss://…`). Its `Debug` and
/// `Display` hide the password: settings, errors and logs can show it as they are.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct RedisUrl(String);

impl RedisUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL itself, password included: for connecting, never for printing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<&str> for RedisUrl {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", redact(&self.0))
    }
}

/// A URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// Why a webhook URL was refused; its text quotes the URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookUrlError {
    #[error("{0:?} holds spaces or control characters")]
    Spaces(String),
    #[error("{0:?} is not a URL: {1}")]
    NotUrl(String, String),
    #[error("{0:?} must start with http:// or https://")]
    Scheme(String),
    #[error("{0:?} has no host")]
    NoHost(String),
    #[error("{0:?}: no user or password in the URL (use a token in the path or query)")]
    Credentials(String),
    #[error("{0:?}: no #fragment")]
    Fragment(String),
    #[error("{0:?}: port 0")]
    PortZero(String),
}

/// A webhook target: http(s), a host, no credentials (a token goes in the path or query,
/// where the operator put it on purpose), no fragment, no port 0, no spaces or control
/// characters.
pub fn webhook_url(url: &str) -> Result<reqwest::Url, WebhookUrlError> {
    use WebhookUrlError as E;
    let owned = || url.to_string();
    if url.chars().any(|c| c.is_control() || c == ' ') {
        return Err(E::Spaces(owned()));
    }
    let u = reqwest::Url::parse(url).map_err(|e| E::NotUrl(owned(), e.to_string()))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(E::Scheme(owned()));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(E::NoHost(owned()));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(E::Credentials(owned()));
    }
    if u.fragment().is_some() {
        return Err(E::Fragment(owned()));
    }
    if u.port() == Some(0) {
        return Err(E::PortZero(owned()));
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redis_url_never_shows_its_password() {
        let u = RedisUrl::from("redis://paloma:s3cret-pw@10.0.0.5:6379/2");
        assert_eq!(u.to_string(), "redis://***@10.0.0.5:6379/2");
        assert!(!format!("{u:?}").contains("s3cret"));
        assert_eq!(u.expose(), "redis://paloma:s3cret-pw@10.0.0.5:6379/2");
        assert_eq!(redact("redis://127.0.0.1:6379/"), "redis://127.0.0.1:6379/");
    }

    #[test]
    fn webhook_urls_are_checked() {
        for good in [
            "http://127.0.0.1:8088/hook?x=1",
            "HTTPS://crm.example",
            "http://[::1]:9000?a=b",
        ] {
            assert!(webhook_url(good).is_ok(), "{good}");
        }
        for bad in [
            "ftp://x/",
            "http://",
            "http://:80/",
            "http://a:0/",
            "http://a:99999/",
            "http://user:pw@a/",
            "http://a/b c",
            "http://a/\r\nX-Evil: 1",
            "http://a/#frag",
            "http://[::1/",
            "crm.example/hook",
        ] {
            assert!(webhook_url(bad).is_err(), "{bad}");
        }
    }
}

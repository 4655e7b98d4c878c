//! A send job as campaign systems write it (`{prefix}sends`, field `job`), and the checks
//! that turn it into a [`Job`] the rest of the pipeline trusts.
//!
//! Everything that can reach a header is checked here, once: CR/LF and other control
//! characters are rejected, not stripped, so a bad job is dead-lettered with its reason.

use std::fmt;

use serde::Deserialize;
use serde_json::{Map, Value};

pub use crate::values::{CampaignId, NameError, CAMPAIGN_RULE};

/// Why a job cannot be processed. The text goes to `{prefix}dead` as `error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("malformed JSON: {0}")]
    Json(String),
    #[error("missing field `{0}`")]
    Missing(&'static str),
    #[error("invalid `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("header injection: `{0}` contains CR, LF or another control character")]
    HeaderInjection(String),
    #[error("oversize job: {size} bytes, the limit is {limit}")]
    Oversize { size: usize, limit: usize },
    #[error("unknown template {0:?}")]
    UnknownTemplate(String),
    #[error("render error in template {template:?}: {reason}")]
    Render { template: String, reason: String },
    #[error("internal error: {0}")]
    Internal(String),
    /// Redis refused the job's own records (a key of the wrong type, a script error).
    #[error("{0}")]
    Store(String),
}

impl From<NameError> for JobError {
    fn from(e: NameError) -> Self {
        match e {
            NameError::Control => JobError::HeaderInjection("campaign".into()),
            NameError::Invalid(reason) => invalid("campaign", reason),
        }
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> JobError {
    JobError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// The job as written by a campaign system. Unknown fields are ignored so that campaign
/// systems can carry their own bookkeeping.
#[derive(Debug, Deserialize)]
struct RawJob {
    id: Option<Value>,
    campaign: Option<Value>,
    template: Option<Value>,
    to: Option<Value>,
    to_name: Option<String>,
    #[serde(default)]
    data: Option<Value>,
    from: Option<String>,
    reply_to: Option<String>,
    #[serde(default)]
    headers: Option<Map<String, Value>>,
    send_at: Option<String>,
    #[serde(default)]
    transactional: Option<bool>,
    pool: Option<Value>,
}

/// A validated job.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: IdempotencyKey,
    pub campaign: CampaignId,
    pub template: String,
    pub to: Recipient,
    pub to_name: Option<String>,
    pub data: Map<String, Value>,
    pub from: Option<Mailbox>,
    pub reply_to: Option<Mailbox>,
    pub headers: Vec<(String, String)>,
    /// Unix milliseconds.
    pub send_at: Option<i64>,
    pub transactional: bool,
    /// The experiment variant it goes out as (set by the intake, never read from the job).
    pub variant: Option<String>,
    /// A variant's subject: the name of its template in the plain registry.
    pub subject: Option<String>,
    /// A marketing job: which marketing message of the year it is for its recipient (1: the
    /// first), read at the intake (see [`crate::policy::touches`]).
    pub touch: Option<u32>,
    /// The egress pool it leaves from (mx mode with `[[sources]]`); None: the default pool.
    pub pool: Option<String>,
}

/// What can be learnt from a job even when it is invalid, for the `dead` event.
#[derive(Debug, Clone, Default)]
pub struct JobIdentity {
    pub id: String,
    pub campaign: String,
    pub to: String,
    /// Its experiment variant, if it is in one: every event of it says so.
    pub variant: Option<String>,
    /// A marketing job's touch bucket (see [`crate::policy::touches`]).
    pub touch: Option<&'static str>,
}

impl Job {
    /// Its id, campaign and recipient, as every event names them.
    pub fn identity(&self) -> JobIdentity {
        JobIdentity {
            id: self.id.as_str().to_string(),
            campaign: self.campaign.as_str().to_string(),
            to: self.to.as_str().to_string(),
            variant: self.variant.clone(),
            touch: self.touch.map(crate::policy::touches::bucket),
        }
    }

    /// Parses and validates the `job` field of a stream entry.
    // The error (a bad job: the rare path) is returned by value: boxing it would buy nothing
    // measurable and cost every caller an indirection.
    #[allow(clippy::result_large_err)]
    pub fn parse(raw: &[u8], max_bytes: usize) -> Result<Job, (JobError, JobIdentity)> {
        if raw.len() > max_bytes {
            return Err((
                JobError::Oversize {
                    size: raw.len(),
                    limit: max_bytes,
                },
                JobIdentity::default(),
            ));
        }
        let rj: RawJob = serde_json::from_slice(raw)
            .map_err(|e| (JobError::Json(e.to_string()), JobIdentity::default()))?;
        let ident = JobIdentity {
            id: string_lossy(&rj.id),
            campaign: string_lossy(&rj.campaign),
            to: string_lossy(&rj.to),
            variant: None,
            touch: None,
        };
        Self::validate(rj).map_err(|e| (e, ident))
    }

    fn validate(rj: RawJob) -> Result<Job, JobError> {
        let id = IdempotencyKey::parse(required_str(rj.id, "id")?)?;
        let campaign = CampaignId::parse(required_str(rj.campaign, "campaign")?)?;
        let template = required_str(rj.template, "template")?;
        if template.is_empty()
            || template.len() > 100
            || !template
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(invalid(
                "template",
                "a template name is 1-100 of A-Z a-z 0-9 - _",
            ));
        }
        let to = Recipient::parse(&required_str(rj.to, "to")?)
            .map_err(|r| invalid("to", r.to_string()))?;
        let to_name = rj.to_name.map(|n| header_text("to_name", n)).transpose()?;
        let data = match rj.data {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m,
            Some(_) => return Err(invalid("data", "must be a JSON object")),
        };
        let from = rj
            .from
            .map(|f| Mailbox::parse(&f).map_err(|r| invalid("from", r.to_string())))
            .transpose()?;
        let reply_to = rj
            .reply_to
            .map(|f| Mailbox::parse(&f).map_err(|r| invalid("reply_to", r.to_string())))
            .transpose()?;
        let mut headers = Vec::new();
        for (name, value) in rj.headers.unwrap_or_default() {
            let value = match value {
                Value::String(s) => s,
                _ => {
                    return Err(invalid(
                        "headers",
                        format!("{name}: value must be a string"),
                    ))
                }
            };
            if name.bytes().any(|b| b == b'\r' || b == b'\n') || value.contains(['\r', '\n']) {
                return Err(JobError::HeaderInjection(format!("headers.{name}")));
            }
            if !name.is_ascii()
                || name.len() > 76
                || !name.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("x-"))
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(invalid(
                    "headers",
                    format!("{name:?}: only X-… header names of ASCII letters, digits, - and _"),
                ));
            }
            // The headers paloma writes itself (tests, tools and providers' webhooks find a
            // message's job by them).
            if name
                .get(..9)
                .is_some_and(|p| p.eq_ignore_ascii_case("x-paloma-"))
            {
                return Err(invalid(
                    "headers",
                    format!("{name:?} is written by paloma itself"),
                ));
            }
            headers.push((name, header_text("headers", value)?));
        }
        let send_at = rj
            .send_at
            .map(|s| {
                chrono::DateTime::parse_from_rfc3339(&s)
                    .map(|t| t.timestamp_millis())
                    .map_err(|e| invalid("send_at", format!("{s:?} is not RFC 3339: {e}")))
            })
            .transpose()?;
        let pool = match rj.pool {
            None | Some(Value::Null) => None,
            Some(Value::String(p)) if crate::values::valid_egress_name(&p) => Some(p),
            Some(_) => return Err(invalid("pool", "a pool name is 1-64 of A-Z a-z 0-9 . _ -")),
        };
        Ok(Job {
            id,
            campaign,
            template,
            to,
            to_name,
            data,
            from,
            reply_to,
            headers,
            send_at,
            transactional: rj.transactional.unwrap_or(false),
            variant: None,
            subject: None,
            touch: None,
            pool,
        })
    }
}

fn string_lossy(v: &Option<Value>) -> String {
    match v {
        Some(Value::String(s)) => s.chars().take(320).collect(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

fn required_str(v: Option<Value>, field: &'static str) -> Result<String, JobError> {
    match v {
        None | Some(Value::Null) => Err(JobError::Missing(field)),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(invalid(field, "must be a string")),
    }
}

/// Text that will be written into a header: no control characters at all.
fn header_text(field: &'static str, s: String) -> Result<String, JobError> {
    if s.chars().any(|c| c.is_control() && c != '\t') {
        return Err(JobError::HeaderInjection(field.to_string()));
    }
    if s.len() > 998 {
        return Err(invalid(field, "longer than 998 bytes"));
    }
    Ok(s)
}

/// The job id: the idempotency key of one send.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(s: String) -> Result<Self, JobError> {
        if s.is_empty() || s.len() > 200 {
            return Err(invalid("id", "must be 1-200 characters"));
        }
        if s.chars().any(char::is_control) {
            return Err(JobError::HeaderInjection("id".into()));
        }
        Ok(Self(s))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why an address (a recipient, From, Reply-To) was refused; its text quotes the address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("contains control characters")]
    Control,
    #[error("contains CR, LF or control characters (header injection)")]
    HeaderInjection,
    #[error("longer than 254 characters")]
    TooLong,
    #[error("{0:?} is not an address (no @)")]
    NoAt(String),
    #[error("{0:?}: local part must be 1-64 characters")]
    LocalLength(String),
    #[error("{0:?}: local part is not a valid dot-atom")]
    LocalPart(String),
    #[error("{address:?}: {reason}")]
    Domain {
        address: String,
        reason: DomainError,
    },
    #[error("{0:?}: unbalanced <>")]
    Unbalanced(String),
}

/// Why a domain name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("domain must be 1-253 characters")]
    Length,
    #[error("domain must have at least two labels")]
    OneLabel,
    #[error("domain label must be 1-63 characters")]
    LabelLength,
    #[error("domain label {0:?} is not letters, digits and -")]
    LabelChars(String),
}

/// A recipient address (RFC 5321 addr-spec, ASCII dot-atom local part, lower-cased domain).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Recipient {
    addr: String,
    at: usize,
}

impl Recipient {
    pub fn parse(s: &str) -> Result<Self, AddressError> {
        let s = s.trim();
        if s.chars().any(char::is_control) {
            return Err(AddressError::Control);
        }
        if s.len() > 254 {
            return Err(AddressError::TooLong);
        }
        let at = s.rfind('@').ok_or_else(|| AddressError::NoAt(s.into()))?;
        let (local, domain) = (&s[..at], &s[at + 1..]);
        if local.is_empty() || local.len() > 64 {
            return Err(AddressError::LocalLength(s.into()));
        }
        const SPECIAL: &[u8] = b"!#$%&'*+/=?^_`{|}~-.";
        if !local
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || SPECIAL.contains(&b))
            || local.starts_with('.')
            || local.ends_with('.')
            || local.contains("..")
        {
            return Err(AddressError::LocalPart(s.into()));
        }
        Domain::check(domain).map_err(|reason| AddressError::Domain {
            address: s.into(),
            reason,
        })?;
        let mut addr = String::with_capacity(s.len());
        addr.push_str(local);
        addr.push('@');
        addr.push_str(&domain.to_ascii_lowercase());
        Ok(Recipient { addr, at })
    }
    pub fn as_str(&self) -> &str {
        &self.addr
    }
    pub fn local(&self) -> &str {
        &self.addr[..self.at]
    }
    pub fn domain(&self) -> &str {
        &self.addr[self.at + 1..]
    }
}

impl fmt::Display for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.addr)
    }
}

/// A DNS domain name in ASCII (LDH labels).
pub struct Domain;

impl Domain {
    pub fn check(d: &str) -> Result<(), DomainError> {
        if d.is_empty() || d.len() > 253 {
            return Err(DomainError::Length);
        }
        if !d.contains('.') {
            return Err(DomainError::OneLabel);
        }
        for label in d.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err(DomainError::LabelLength);
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                || label.starts_with('-')
                || label.ends_with('-')
            {
                return Err(DomainError::LabelChars(label.into()));
            }
        }
        Ok(())
    }
}

/// `Name <addr>` or `addr`, for From and Reply-To.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    pub name: Option<String>,
    pub addr: Recipient,
}

impl Mailbox {
    pub fn parse(s: &str) -> Result<Self, AddressError> {
        if s.chars().any(char::is_control) {
            return Err(AddressError::HeaderInjection);
        }
        let s = s.trim();
        if let Some(open) = s.rfind('<') {
            let close = s
                .rfind('>')
                .filter(|&c| c > open && c == s.len() - 1)
                .ok_or_else(|| AddressError::Unbalanced(s.into()))?;
            let name = s[..open].trim().trim_matches('"').trim();
            let addr = Recipient::parse(&s[open + 1..close])?;
            Ok(Mailbox {
                name: (!name.is_empty()).then(|| name.to_string()),
                addr,
            })
        } else {
            Ok(Mailbox {
                name: None,
                addr: Recipient::parse(s)?,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Job, JobError> {
        Job::parse(s.as_bytes(), 4096).map_err(|(e, _)| e)
    }

    #[test]
    fn a_complete_job_parses() {
        let j = parse(r#"{"id":"j1","campaign":"spring","template":"newsletter","to":"Ann@Example.COM","to_name":"Ann Émile","data":{"a":1},"headers":{"X-List":"7"},"send_at":"2026-01-01T00:00:00Z","transactional":true}"#).unwrap();
        assert_eq!(j.to.as_str(), "Ann@example.com");
        assert_eq!(j.to.domain(), "example.com");
        assert_eq!(j.to_name.as_deref(), Some("Ann Émile"));
        assert_eq!(j.headers, vec![("X-List".to_string(), "7".to_string())]);
        assert_eq!(j.send_at, Some(1767225600000));
        assert!(j.transactional);
    }

    #[test]
    fn bad_jobs_are_rejected_with_a_reason() {
        let cases = [
            ("{not json", "malformed JSON"),
            (
                r#"{"campaign":"c","template":"t","to":"a@b.co"}"#,
                "missing field `id`",
            ),
            (
                r#"{"id":"1","campaign":"c","template":"t","to":"nope"}"#,
                "invalid `to`",
            ),
            (
                r#"{"id":"1","campaign":"c","template":"../etc","to":"a@b.co"}"#,
                "invalid `template`",
            ),
            (
                r#"{"id":"1","campaign":"c","template":"t","to":"a@b.co","to_name":"x\r\nBcc: evil@x.com"}"#,
                "header injection",
            ),
            (
                r#"{"id":"1","campaign":"c","template":"t","to":"a@b.co","headers":{"X-A":"v\r\nBcc: e@x.com"}}"#,
                "header injection",
            ),
            (
                r#"{"id":"1","campaign":"c","template":"t","to":"a@b.co","headers":{"Bcc":"e@x.com"}}"#,
                "invalid `headers`",
            ),
            (
                r#"{"id":"1","campaign":"c","template":"t","to":"a@b.co","headers":{"x-paloma-id":"other"}}"#,
                "invalid `headers`",
            ),
            (
                r#"{"id":"1","campaign":"c","template":"t","to":"a@b.co","from":"Evil <e@x.com>\nBcc: y@z.com"}"#,
                "invalid `from`",
            ),
            (
                r#"{"id":"1","campaign":"c","template":"t","to":"a@b.co","send_at":"tomorrow"}"#,
                "invalid `send_at`",
            ),
            (
                r#"{"id":"1","campaign":"c","template":"t","to":"a@b.co","data":[1]}"#,
                "invalid `data`",
            ),
            (
                r#"{"id":"1","campaign":"c\n","template":"t","to":"a@b.co"}"#,
                "header injection",
            ),
            (
                r#"{"id":"1","campaign":"a/b/../c","template":"t","to":"a@b.co"}"#,
                "invalid `campaign`",
            ),
            (
                r#"{"id":"1","campaign":"<script>alert(1)</script>","template":"t","to":"a@b.co"}"#,
                "invalid `campaign`",
            ),
        ];
        for (job, want) in cases {
            let e = parse(job).unwrap_err().to_string();
            assert!(e.contains(want), "{job}: got {e:?}, want {want:?}");
        }
        let big = format!(
            r#"{{"id":"1","campaign":"c","template":"t","to":"a@b.co","data":{{"x":"{}"}}}}"#,
            "a".repeat(5000)
        );
        assert!(parse(&big).unwrap_err().to_string().contains("oversize"));
    }

    #[test]
    fn campaign_names_are_what_urls_keys_and_headers_carry_as_they_are() {
        for ok in ["spring", "spring-sale_2026.v2", "A", &"x".repeat(64)] {
            assert!(CampaignId::parse(ok.to_string()).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".hidden",
            "..",
            "a/b",
            "a b",
            "a:b",
            "<script>",
            "caf\u{e9}",
            "a%2Fb",
            &"x".repeat(65),
        ] {
            let e = CampaignId::parse(bad.to_string()).unwrap_err().to_string();
            assert!(e.contains("1-64 of A-Z a-z 0-9 . _ -"), "{bad}: {e}");
        }
        assert!(CampaignId::readable("a/b/../c") && CampaignId::readable("(invalid)"));
        assert!(!CampaignId::readable("a b") && !CampaignId::readable("a:b"));
    }

    #[test]
    fn identity_survives_for_dead_events() {
        let (_, ident) = Job::parse(br#"{"id":"j9","campaign":"c","to":"bad"}"#, 4096).unwrap_err();
        assert_eq!(
            (
                ident.id.as_str(),
                ident.campaign.as_str(),
                ident.to.as_str()
            ),
            ("j9", "c", "bad")
        );
    }

    #[test]
    fn mailboxes() {
        let m = Mailbox::parse("Shop <news@shop.example>").unwrap();
        assert_eq!(m.name.as_deref(), Some("Shop"));
        assert_eq!(m.addr.as_str(), "news@shop.example");
        assert!(Mailbox::parse("a@b").is_err());
        assert!(Recipient::parse("a..b@x.com").is_err());
        assert!(Recipient::parse("a@-x.com").is_err());
    }
}

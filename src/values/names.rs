//! Names that reach keys, counters, metric labels and URLs: campaign names (from jobs,
//! config and the API's paths) and experiment variant names (from config, and back from
//! provider events).

use std::fmt;

/// Why a campaign name was refused. Its text names the field, as a job's error does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("header injection: `campaign` contains CR, LF or another control character")]
    Control,
    #[error("invalid `campaign`: {0}")]
    Invalid(String),
}

/// A campaign code: it reaches events, stats, metric labels, Redis keys, the Feedback-ID
/// header and the report's URLs (`/campaigns/{campaign}`), so it is held to what all of them
/// carry as they are: 1-64 of `A-Z a-z 0-9 . _ -`, not starting with `.` (no `..` path
/// segment, no markup, no separator of keys or headers).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CampaignId(String);

/// The allowed campaign names, as error messages and the docs say it.
pub const CAMPAIGN_RULE: &str =
    "a campaign name is 1-64 of A-Z a-z 0-9 . _ - and does not start with `.`";

impl CampaignId {
    pub const MAX_LEN: usize = 64;

    pub fn parse(s: String) -> Result<Self, NameError> {
        if s.chars().any(char::is_control) {
            return Err(NameError::Control);
        }
        if !Self::allowed(&s) {
            let shown: String = s.chars().take(80).collect();
            return Err(NameError::Invalid(format!("{shown:?}: {CAMPAIGN_RULE}")));
        }
        Ok(Self(s))
    }

    /// Whether `s` is a campaign name paloma accepts.
    pub fn allowed(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= Self::MAX_LEN
            && !s.starts_with('.')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    }

    /// A name that may be in Redis from before the names were narrowed (printable ASCII
    /// without spaces, colons, quotes or backslashes, at most 100), or a counter of dead
    /// jobs (`(none)`, `(invalid)`): readable in the report and the API, never accepted in
    /// a new job.
    pub fn readable(s: &str) -> bool {
        Self::allowed(s)
            || (!s.is_empty()
                && s.len() <= 100
                && s.bytes().all(|b| b.is_ascii_graphic())
                && !s.contains([':', '"', '\\']))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CampaignId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A variant name the config accepts: 1-32 of A-Z a-z 0-9 - _ (so that it is safe as a
/// counter field, a metric label and a token part).
pub fn valid_variant_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// An egress source's or pool's name (`[[sources]]`, `[[pools]]`, a job's `pool`): 1-64 of
/// A-Z a-z 0-9 . _ - (safe in Redis keys, metric labels and a delayed-set member).
pub fn valid_egress_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The key an address is known by in the suppression list, the opt-outs, the recipient's
/// hash (caps, contact pressure) and the tracking writes: trimmed and lower-cased (ASCII:
/// a recipient's local part is ASCII, its domain lower-cased when the job is read).
pub fn address_key(addr: &str) -> String {
    addr.trim().to_ascii_lowercase()
}

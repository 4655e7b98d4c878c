//! What a report may put in an event, and how much of it: every field taken from a DSN, an
//! ARF report or a provider's webhook is cut to the size documented below (README "Late
//! bounces and complaints"), and a status counts only when it is an RFC 3463 code. A
//! malformed status is recorded as [`MALFORMED`], and a report whose status is malformed
//! never makes a bounce permanent, so it never suppresses an address.

/// `status` of a `returned` event whose report gave no well-formed RFC 3463 code.
pub const MALFORMED: &str = "malformed";
/// `diagnostic` (a DSN's `Diagnostic-Code`, a text bounce's line, a provider's reason).
pub const DIAGNOSTIC_MAX: usize = 1000;
/// `reporting_mta` (a host name: at most 255 octets).
pub const MTA_MAX: usize = 255;
/// A recipient named by a report (RFC 5321's path limit, without the brackets).
pub const RECIPIENT_MAX: usize = 254;
/// `feedback_type` (ARF's types are single words: abuse, fraud, not-spam…).
pub const FEEDBACK_TYPE_MAX: usize = 32;
/// `source` (a feedback report's User-Agent or Reporting-MTA).
pub const SOURCE_MAX: usize = 255;
/// Per-recipient blocks read from one DSN; the rest are ignored.
pub const DSN_RECIPIENTS_MAX: usize = 100;

/// An enhanced status code (RFC 3463): class `2`, `4` or `5`, then a subject and a detail
/// of one to three digits each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    class: u8,
    subject: u16,
    detail: u16,
}

impl Status {
    /// The code `s` is, exactly (no sign, no spaces, no other characters); None otherwise.
    pub fn parse(s: &str) -> Option<Status> {
        let mut parts = s.split('.');
        let class = match parts.next()? {
            "2" => 2,
            "4" => 4,
            "5" => 5,
            _ => return None,
        };
        let number = |p: Option<&str>| -> Option<u16> {
            let p = p?;
            if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            p.parse().ok()
        };
        let subject = number(parts.next())?;
        let detail = number(parts.next())?;
        if parts.next().is_some() {
            return None;
        }
        Some(Status {
            class,
            subject,
            detail,
        })
    }

    /// A permanent failure (class 5).
    pub fn is_permanent(&self) -> bool {
        self.class == 5
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// `s` trimmed, control characters made spaces, cut to at most `max` bytes at a character
/// boundary (never more work than `max` characters, however long `s` is).
pub fn clip(s: &str, max: usize) -> String {
    let s = s.trim();
    let mut out = String::with_capacity(s.len().min(max));
    for c in s.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out.truncate(out.trim_end().len());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_rfc3463_codes_are_statuses() {
        for ok in ["5.1.1", "4.7.0", "2.0.0", "5.7.26", "5.123.999"] {
            assert_eq!(Status::parse(ok).map(|s| s.to_string()), Some(ok.into()));
        }
        assert_eq!(Status::parse("5.01.1").unwrap().to_string(), "5.1.1");
        for bad in [
            "",
            "5.1.1€",
            "-5.-1.-1",
            "99999999999999999999.1.1",
            "5.1",
            "5.1.1.1",
            "3.1.1",
            "5..1",
            "5.1.1 ",
            "5.1234.1",
            "+5.1.1",
            "٥.١.١",
        ] {
            assert_eq!(Status::parse(bad), None, "{bad:?}");
        }
        assert!(Status::parse("5.1.1").unwrap().is_permanent());
        assert!(!Status::parse("4.2.2").unwrap().is_permanent());
    }

    #[test]
    fn clipping_keeps_whole_characters_and_drops_control_ones() {
        assert_eq!(clip("  a\u{0}b\r\nc  ", 100), "a b  c");
        assert_eq!(clip("€€€", 7), "€€");
        assert_eq!(clip(&"x".repeat(5_000_000), DIAGNOSTIC_MAX).len(), 1000);
        assert_eq!(clip("ab   c", 4), "ab");
    }
}

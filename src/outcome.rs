//! The outcome vocabulary every layer speaks: what one delivery attempt came to
//! ([`Outcome`]), why a message bounced ([`BounceClass`], from RFC 3463 enhanced status codes
//! and the reply text) and the code itself ([`enhanced_status`]). The SMTP client produces it,
//! shaping reacts to it, the pipeline records it; later reports (DSNs) classify with it too.

/// What one delivery attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx after the message data.
    Delivered { response: String },
    /// 4xx, a connection failure or a timeout: try again later.
    Deferred { response: String },
    /// 5xx: permanent.
    Bounced(Bounce),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounce {
    pub code: u16,
    /// RFC 3463 enhanced status (`5.1.1`), empty when the server gave none.
    pub enhanced: String,
    pub class: BounceClass,
    pub response: String,
}

/// Why a message bounced, from the enhanced status code (RFC 3463) and the reply text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BounceClass {
    InvalidRecipient,
    BadDomain,
    MailboxFull,
    InactiveMailbox,
    SpamBlock,
    PolicyBlock,
    MessageRejected,
    Other,
    /// Ended by an operator (`paloma bounce`), not by a receiver: says nothing of the
    /// address, which is never suppressed for it.
    Admin,
}

impl BounceClass {
    pub const ALL: [BounceClass; 9] = [
        BounceClass::InvalidRecipient,
        BounceClass::BadDomain,
        BounceClass::MailboxFull,
        BounceClass::InactiveMailbox,
        BounceClass::SpamBlock,
        BounceClass::PolicyBlock,
        BounceClass::MessageRejected,
        BounceClass::Other,
        BounceClass::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BounceClass::InvalidRecipient => "invalid_recipient",
            BounceClass::BadDomain => "bad_domain",
            BounceClass::MailboxFull => "mailbox_full",
            BounceClass::InactiveMailbox => "inactive_mailbox",
            BounceClass::SpamBlock => "spam_block",
            BounceClass::PolicyBlock => "policy_block",
            BounceClass::MessageRejected => "message_rejected",
            BounceClass::Other => "other",
            BounceClass::Admin => "admin",
        }
    }

    /// Hard bounces say the address itself is bad: it goes on the suppression list.
    pub fn is_hard(self) -> bool {
        matches!(
            self,
            BounceClass::InvalidRecipient | BounceClass::BadDomain | BounceClass::InactiveMailbox
        )
    }

    pub fn classify(enhanced: &str, text: &str) -> BounceClass {
        let t = text.to_ascii_lowercase();
        let has = |words: &[&str]| words.iter().any(|w| t.contains(w));
        if has(&[
            "spam",
            "blocklist",
            "blacklist",
            "block list",
            "spamhaus",
            "reputation",
        ]) {
            return BounceClass::SpamBlock;
        }
        match enhanced {
            "5.1.1" | "5.1.0" | "5.1.3" | "5.1.6" => BounceClass::InvalidRecipient,
            "5.1.2" | "5.1.10" | "5.4.4" => BounceClass::BadDomain,
            "5.2.1" => BounceClass::InactiveMailbox,
            "5.2.2" | "4.2.2" | "5.2.3" => BounceClass::MailboxFull,
            "5.7.1" | "5.7.0" | "5.7.26" | "5.7.25" | "5.7.27" | "5.7.23" => {
                BounceClass::PolicyBlock
            }
            "5.6.0" | "5.6.1" | "5.3.4" => BounceClass::MessageRejected,
            _ if has(&[
                "user unknown",
                "no such user",
                "does not exist",
                "unknown user",
                "unknown recipient",
                "recipient address rejected",
                "invalid recipient",
                "mailbox unavailable",
                "not found",
            ]) =>
            {
                BounceClass::InvalidRecipient
            }
            _ if has(&[
                "mailbox full",
                "quota",
                "over quota",
                "insufficient storage",
            ]) =>
            {
                BounceClass::MailboxFull
            }
            _ if has(&["disabled", "inactive", "suspended"]) => BounceClass::InactiveMailbox,
            _ if has(&["policy", "not allowed", "denied", "refused"]) => BounceClass::PolicyBlock,
            _ => BounceClass::Other,
        }
    }
}

/// Replies that mean "you are sending too fast" (Gmail 4.7.28, Yahoo TS01/TS02, Microsoft
/// "try again later", generic 421).
const THROTTLE_WORDS: &[&str] = &[
    "try again later",
    "too many",
    "rate limit",
    "throttl",
    "temporarily deferred",
    "4.7.28",
    "ts01",
    "ts02",
    "ts03",
];

/// Whether a deferral's reply means "you are sending too fast": a 421, or one of the
/// providers' throttling phrases and codes. Greylisting is not (its "try again later" is
/// about one sender, recipient and address triplet, and the retry is what it asks for):
/// suspending the whole site for it would hold every other recipient there.
pub fn is_throttling(response: &str) -> bool {
    let text = response.to_ascii_lowercase();
    if ["greylist", "graylist", "grey-list", "gray-list"]
        .iter()
        .any(|g| text.contains(g))
    {
        return false;
    }
    response.starts_with("421") || THROTTLE_WORDS.iter().any(|w| text.contains(w))
}

/// The first `d.ddd.ddd` token of a reply text.
pub fn enhanced_status(text: &str) -> String {
    text.split(|c: char| c.is_whitespace() || c == ',' || c == ';')
        .find(|w| {
            let mut parts = w.split('.');
            let ok = |p: Option<&str>, max: usize| {
                p.is_some_and(|p| {
                    !p.is_empty() && p.len() <= max && p.bytes().all(|b| b.is_ascii_digit())
                })
            };
            matches!(w.as_bytes().first(), Some(b'2' | b'4' | b'5'))
                && ok(parts.next(), 1)
                && ok(parts.next(), 3)
                && ok(parts.next(), 3)
                && parts.next().is_none()
        })
        .unwrap_or_default()
        .to_string()
}

impl Outcome {
    /// `delivered`, `deferred` or `bounced` (metrics labels).
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Delivered { .. } => "delivered",
            Outcome::Deferred { .. } => "deferred",
            Outcome::Bounced(_) => "bounced",
        }
    }

    /// The reply text.
    pub fn text(&self) -> &str {
        match self {
            Outcome::Delivered { response } | Outcome::Deferred { response } => response,
            Outcome::Bounced(b) => &b.response,
        }
    }

    /// A 5xx reply turned into a bounce.
    /// A permanent refusal of MAIL FROM: classified like any bounce, except that a
    /// recipient class ("5.1.0 Sender address rejected", "5.1.8 Domain not found") becomes
    /// policy_block, so the recipient is not suppressed for the sender's problem.
    pub fn sender_bounce(code: u16, response: String) -> Outcome {
        let mut o = Outcome::bounce(code, response);
        if let Outcome::Bounced(b) = &mut o {
            if b.class.is_hard() {
                b.class = BounceClass::PolicyBlock;
            }
        }
        o
    }

    /// An operator's bounce (`paloma bounce`): 550 5.0.0, class `admin`, `why` the reply
    /// text's end (the command that did it).
    pub fn admin_bounce(why: &str) -> Outcome {
        Outcome::Bounced(Bounce {
            code: 550,
            enhanced: "5.0.0".into(),
            class: BounceClass::Admin,
            response: format!("550 5.0.0 bounced by an operator ({why})"),
        })
    }

    pub fn bounce(code: u16, response: String) -> Outcome {
        let enhanced = enhanced_status(&response);
        let class = BounceClass::classify(&enhanced, &response);
        Outcome::Bounced(Bounce {
            code,
            enhanced,
            class,
            response,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greylisting_is_not_throttling() {
        assert!(is_throttling("451 4.7.1 Please try again later"));
        assert!(is_throttling("421 4.7.28 unusual rate"));
        assert!(!is_throttling("450 4.2.0 Greylisted, try again later"));
        assert!(!is_throttling(
            "451 4.7.1 <u@x.test>: Recipient address rejected: Greylisted, see http://postgrey.schweikert.ch/help/x.test.html"
        ));
        assert!(!is_throttling(
            "450 4.7.1 graylisted, please try again later"
        ));
    }

    #[test]
    fn a_refused_sender_never_suppresses_the_recipient() {
        let r = "550 5.1.0 <news@shop.example>: Sender address rejected: undeliverable address";
        let Outcome::Bounced(b) = Outcome::bounce(550, r.into()) else {
            panic!()
        };
        assert!(
            b.class.is_hard(),
            "the text alone reads as a recipient problem"
        );
        let Outcome::Bounced(b) = Outcome::sender_bounce(550, r.into()) else {
            panic!()
        };
        assert_eq!(b.class, BounceClass::PolicyBlock);
        let Outcome::Bounced(b) = Outcome::sender_bounce(554, "554 5.7.1 spamhaus listed".into())
        else {
            panic!()
        };
        assert_eq!(b.class, BounceClass::SpamBlock);
    }

    #[test]
    fn enhanced_codes_are_found() {
        assert_eq!(
            enhanced_status("550 5.1.1 <a@b>: Recipient address rejected"),
            "5.1.1"
        );
        assert_eq!(enhanced_status("5.7.26 Unauthenticated email"), "5.7.26");
        assert_eq!(enhanced_status("Error: command failed"), "");
        assert_eq!(enhanced_status("version 1.2.3"), "");
    }

    #[test]
    fn classes() {
        assert_eq!(
            BounceClass::classify("5.1.1", "user unknown"),
            BounceClass::InvalidRecipient
        );
        assert_eq!(
            BounceClass::classify("5.7.1", "blocked by Spamhaus"),
            BounceClass::SpamBlock
        );
        assert_eq!(
            BounceClass::classify("5.2.2", "mailbox full"),
            BounceClass::MailboxFull
        );
        assert_eq!(
            BounceClass::classify("", "550 No such user here"),
            BounceClass::InvalidRecipient
        );
        assert_eq!(
            BounceClass::classify("5.3.0", "Error: command failed"),
            BounceClass::Other
        );
        assert!(BounceClass::InvalidRecipient.is_hard());
        assert!(
            !BounceClass::Admin.is_hard(),
            "an operator's bounce never suppresses"
        );
        let Outcome::Bounced(b) = Outcome::admin_bounce("paloma bounce --domain d.test") else {
            panic!()
        };
        assert_eq!((b.code, b.class.as_str()), (550, "admin"));
        assert_eq!(
            b.response,
            "550 5.0.0 bounced by an operator (paloma bounce --domain d.test)"
        );
        assert!(!BounceClass::MailboxFull.is_hard());
    }
}

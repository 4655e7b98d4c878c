//! What an inbound message to the bounce domain says, parsed with mail-parser:
//!
//! - a DSN (RFC 3464: `multipart/report; report-type=delivery-status`, whose
//!   `message/delivery-status` part holds per-recipient `Action`, `Status`,
//!   `Diagnostic-Code`);
//! - a feedback report (ARF, RFC 5965: a `message/feedback-report` part with
//!   `Feedback-Type`, `User-Agent`, `Source-IP`…);
//! - an auto-reply (RFC 3834 `Auto-Submitted`, `X-Autoreply`, vacation and challenge-response
//!   subjects): recognised and ignored;
//! - a bounce in plain text, as many servers still send: its status from the first enhanced
//!   code (or SMTP code) in the text.
//!
//! The job a report is about is found from the tokens (`b-…@domain`) and `X-Paloma-Id`
//! lines it carries (see [`super`]); this module only reads the message. What it returns
//! is already cut to the sizes of [`super::fields`], however large the report.

use mail_parser::{MessageParser, MimeHeaders, PartType};

use super::fields::{self as limits, clip};

use crate::outcome::enhanced_status;

/// One recipient's part of a DSN.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DsnRecipient {
    /// `Final-Recipient` (or `Original-Recipient`), without the `rfc822;` type.
    pub recipient: String,
    /// `failed`, `delayed`, `delivered`, `relayed`, `expanded` (lower case).
    pub action: String,
    /// The enhanced status code (`5.1.1`).
    pub status: String,
    /// `Diagnostic-Code` without its type (`smtp;`), or empty.
    pub diagnostic: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dsn {
        reporting_mta: String,
        recipients: Vec<DsnRecipient>,
    },
    Feedback {
        /// `abuse`, `fraud`, `virus`, `other`, `not-spam`… (lower case).
        feedback_type: String,
        /// Who reported it: the report's `User-Agent`, else its `Reporting-MTA`, else the
        /// domain of its `From`.
        source: String,
        /// `Original-Rcpt-To`, if given.
        recipient: Option<String>,
    },
    AutoReply,
    /// A non-standard bounce: status and text as found.
    TextBounce {
        status: String,
        diagnostic: String,
        permanent: bool,
    },
    /// Nothing paloma acts on.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub kind: Kind,
    /// Every `X-Paloma-Id` found in what the report returns (headers or attached message).
    pub paloma_ids: Vec<String>,
    /// Every `Message-ID` found in what it returns (the original message's).
    pub message_ids: Vec<String>,
}

/// A typed field's value without its type (`rfc822;`, `dns;`, `smtp;`), cut to `max`.
fn strip_type(v: &str, max: usize) -> String {
    let v = v.trim();
    match v.split_once(';') {
        Some((_, rest)) => clip(rest, max),
        None => clip(v, max),
    }
}

/// The `Name: value` fields of one block (continuation lines unfolded), lower-cased names.
fn fields(block: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in block.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = out.last_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
        } else if let Some((k, v)) = line.split_once(':') {
            out.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    out
}

fn field<'a>(f: &'a [(String, String)], name: &str) -> Option<&'a str> {
    f.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// The blocks of a `message/delivery-status` body: per-message fields, then one block per
/// recipient, separated by blank lines.
fn blocks(body: &str) -> Vec<&str> {
    let body = body.trim_start_matches(['\r', '\n']);
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let cut = ["\r\n\r\n", "\n\n"]
            .iter()
            .filter_map(|sep| rest.find(sep).map(|i| (i, sep.len())))
            .min();
        match cut {
            Some((i, n)) => {
                if !rest[..i].trim().is_empty() {
                    out.push(&rest[..i]);
                }
                rest = &rest[i + n..];
            }
            None => {
                if !rest.trim().is_empty() {
                    out.push(rest);
                }
                return out;
            }
        }
    }
}

fn parse_dsn(body: &str) -> Kind {
    let mut b = blocks(body).into_iter();
    let per_message = b.next().map(fields).unwrap_or_default();
    let reporting_mta = field(&per_message, "reporting-mta")
        .map(|v| strip_type(v, limits::MTA_MAX))
        .unwrap_or_default();
    let recipients = b
        .map(fields)
        .filter(|f| field(f, "action").is_some() || field(f, "status").is_some())
        .take(limits::DSN_RECIPIENTS_MAX)
        .map(|f| DsnRecipient {
            recipient: field(&f, "final-recipient")
                .or_else(|| field(&f, "original-recipient"))
                .map(|v| strip_type(v, limits::RECIPIENT_MAX + 2))
                .unwrap_or_default()
                .trim_matches(['<', '>'])
                .to_string(),
            action: clip(field(&f, "action").unwrap_or_default(), 16).to_ascii_lowercase(),
            // The code alone (a comment may follow it); checked against RFC 3463 when
            // recorded, so that a malformed one is kept as malformed, not mended.
            status: field(&f, "status")
                .map(|s| clip(s.split_whitespace().next().unwrap_or_default(), 16))
                .unwrap_or_default(),
            diagnostic: field(&f, "diagnostic-code")
                .map(|v| strip_type(v, limits::DIAGNOSTIC_MAX))
                .unwrap_or_default(),
        })
        .collect();
    Kind::Dsn {
        reporting_mta,
        recipients,
    }
}

fn parse_feedback(body: &str, from_domain: Option<&str>) -> Kind {
    let f = fields(body);
    let source = field(&f, "user-agent")
        .or_else(|| field(&f, "reporting-mta").map(|v| v.rsplit(';').next().unwrap_or(v)))
        .or(from_domain)
        .map(|s| clip(s, limits::SOURCE_MAX))
        .unwrap_or_default();
    Kind::Feedback {
        feedback_type: clip(
            field(&f, "feedback-type").unwrap_or("other"),
            limits::FEEDBACK_TYPE_MAX,
        )
        .to_ascii_lowercase(),
        source,
        recipient: field(&f, "original-rcpt-to")
            .map(|r| clip(r.trim_matches(['<', '>', ' ']), limits::RECIPIENT_MAX)),
    }
}

/// The values of header `name` (lower case, with its colon) on any line of the raw message
/// past its own headers (a report names the message it returns, not itself).
fn header_values(raw: &[u8], own_headers_end: usize, name: &[u8]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let name_len = name.len();
    let body = &raw[own_headers_end.min(raw.len())..];
    let mut i = 0;
    while i + name_len <= body.len() {
        let at_line = i == 0 || body[i - 1] == b'\n';
        if at_line && body[i..i + name_len].eq_ignore_ascii_case(name) {
            let rest = &body[i + name_len..];
            let end = rest
                .iter()
                .position(|&b| b == b'\r' || b == b'\n')
                .unwrap_or(rest.len());
            let v = String::from_utf8_lossy(&rest[..end]).trim().to_string();
            if !v.is_empty() && v.len() <= 200 && !out.contains(&v) {
                out.push(v);
            }
            i += name_len + end;
            continue;
        }
        i += 1;
    }
    out
}

fn is_auto_reply(msg: &mail_parser::Message) -> bool {
    let h = |n: &str| msg.header_raw(n).map(|v| v.trim().to_ascii_lowercase());
    if h("Auto-Submitted").is_some_and(|v| v != "no") {
        return true;
    }
    if h("X-Autoreply").is_some()
        || h("X-Autorespond").is_some()
        || h("X-Boxtrapper").is_some()
        || h("X-Challenge").is_some()
        || h("Precedence").is_some_and(|v| v == "auto_reply")
    {
        return true;
    }
    let subject = msg.subject().unwrap_or_default().to_ascii_lowercase();
    [
        "out of office",
        "out of the office",
        "automatic reply",
        "auto-reply",
        "autoreply",
        "auto reply",
        "vacation",
        "please confirm your",
        "verify your email to",
        "challenge",
    ]
    .iter()
    .any(|p| subject.contains(p))
}

/// Reads an inbound message. `null_sender`: its envelope sender was `<>` (as bounces' is).
pub fn parse(raw: &[u8], null_sender: bool) -> Report {
    let Some(msg) = MessageParser::default().parse(raw) else {
        return Report {
            kind: Kind::Other,
            paloma_ids: Vec::new(),
            message_ids: Vec::new(),
        };
    };
    let own_end = msg.root_part().offset_body as usize;
    let paloma_ids = header_values(raw, own_end, b"x-paloma-id:");
    let message_ids = header_values(raw, own_end, b"message-id:");
    let from_domain = msg
        .from()
        .and_then(|a| a.first())
        .and_then(|a| a.address.as_deref())
        .and_then(|a| a.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase()));
    for part in msg.parts.iter() {
        let Some(ct) = part.content_type() else {
            continue;
        };
        let (t, sub) = (
            ct.ctype().to_ascii_lowercase(),
            ct.subtype().unwrap_or_default().to_ascii_lowercase(),
        );
        if t != "message" {
            continue;
        }
        let body = String::from_utf8_lossy(part.contents());
        match sub.as_str() {
            "delivery-status" | "global-delivery-status" => {
                return Report {
                    kind: parse_dsn(&body),
                    paloma_ids,
                    message_ids,
                }
            }
            "feedback-report" => {
                return Report {
                    kind: parse_feedback(&body, from_domain.as_deref()),
                    paloma_ids,
                    message_ids,
                }
            }
            _ => {}
        }
    }
    // Not a standard report: an auto-reply, a plain-text bounce, or nothing.
    let from_daemon = msg
        .from()
        .and_then(|a| a.first())
        .and_then(|a| a.address.as_deref())
        .map(|a| a.to_ascii_lowercase())
        .is_some_and(|a| a.starts_with("mailer-daemon@") || a.starts_with("postmaster@"));
    if !from_daemon && is_auto_reply(&msg) {
        return Report {
            kind: Kind::AutoReply,
            paloma_ids,
            message_ids,
        };
    }
    if null_sender || from_daemon {
        let text: String = msg
            .parts
            .iter()
            .filter(|p| matches!(p.body, PartType::Text(_)))
            .filter_map(|p| p.text_contents())
            .collect::<Vec<_>>()
            .join("\n");
        if let Some(kind) = text_bounce(&text) {
            return Report {
                kind,
                paloma_ids,
                message_ids,
            };
        }
    }
    Report {
        kind: Kind::Other,
        paloma_ids,
        message_ids,
    }
}

/// A bounce written for people: the line with the first SMTP reply code (5xx or 4xx) or
/// enhanced code.
fn text_bounce(text: &str) -> Option<Kind> {
    for line in text.lines() {
        let l = line.trim();
        let enhanced = enhanced_status(l);
        let code = l
            .split(|c: char| !c.is_ascii_digit())
            .find(|w| w.len() == 3 && matches!(w.as_bytes()[0], b'4' | b'5'))
            .filter(|w| w.as_bytes()[1] <= b'5');
        if enhanced.is_empty() && code.is_none() {
            continue;
        }
        let status = if enhanced.is_empty() {
            let class = code.and_then(|c| c.get(..1)).unwrap_or("5");
            format!("{class}.0.0")
        } else {
            enhanced
        };
        let permanent = status.starts_with('5');
        return Some(Kind::TextBounce {
            status,
            diagnostic: clip(l, limits::DIAGNOSTIC_MAX),
            permanent,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 5965 appendix B.1, the original message's headers as paloma sends them.
    const ARF: &str = "From: <abusedesk@example.com>\r\n\
Date: Thu, 8 Mar 2005 17:40:36 EDT\r\n\
Subject: FW: Earn money\r\n\
To: <abuse@example.net>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=feedback-report;\r\n     boundary=\"part1_13d.2e68ed54_boundary\"\r\n\
\r\n\
--part1_13d.2e68ed54_boundary\r\n\
Content-Type: text/plain; charset=\"US-ASCII\"\r\n\
Content-Transfer-Encoding: 7bit\r\n\
\r\n\
This is an email abuse report for an email message received from IP\r\n\
192.0.2.1 on Thu, 8 Mar 2005 14:00:00 EDT.\r\n\
\r\n\
--part1_13d.2e68ed54_boundary\r\n\
Content-Type: message/feedback-report\r\n\
\r\n\
Feedback-Type: abuse\r\n\
User-Agent: SomeGenerator/1.0\r\n\
Version: 1\r\n\
Original-Mail-From: <somespammer@example.net>\r\n\
Original-Rcpt-To: <user@example.com>\r\n\
Arrival-Date: Thu, 8 Mar 2005 14:00:00 EDT\r\n\
Reporting-MTA: dns; mail.example.com\r\n\
Source-IP: 192.0.2.1\r\n\
\r\n\
--part1_13d.2e68ed54_boundary\r\n\
Content-Type: message/rfc822\r\n\
Content-Disposition: inline\r\n\
\r\n\
From: <somespammer@example.net>\r\n\
Received: from mailserver.example.net (mailserver.example.net\r\n\
        [192.0.2.1]) by example.com with ESMTP id M63d4137594e46;\r\n\
        Thu, 08 Mar 2005 14:00:00 -0400\r\n\
To: <Undisclosed Recipients>\r\n\
Subject: Earn money\r\n\
X-Paloma-Id: spring-42\r\n\
MIME-Version: 1.0\r\n\
Content-type: text/plain\r\n\
Message-ID: 8787KJKJ3K4J3K4J3K4J3.mail@example.net\r\n\
Date: Thu, 02 Sep 2004 12:31:03 -0500\r\n\
\r\n\
Spam Spam Spam\r\n\
--part1_13d.2e68ed54_boundary--\r\n";

    #[test]
    fn the_rfc5965_example_is_a_complaint_about_the_attached_message() {
        let r = parse(ARF.as_bytes(), false);
        assert_eq!(
            r.kind,
            Kind::Feedback {
                feedback_type: "abuse".into(),
                source: "SomeGenerator/1.0".into(),
                recipient: Some("user@example.com".into()),
            }
        );
        assert_eq!(r.paloma_ids, ["spring-42"]);
    }

    const DSN: &str = "From: MAILER-DAEMON@relay.test (Mail Delivery System)\r\n\
Subject: Undelivered Mail Returned to Sender\r\n\
Auto-Submitted: auto-replied\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\
\r\n\
--B\r\n\
Content-Type: text/plain\r\n\
\r\n\
I'm sorry to have to inform you that your message could not be delivered.\r\n\
\r\n\
--B\r\n\
Content-Type: message/delivery-status\r\n\
\r\n\
Reporting-MTA: dns; relay.test\r\n\
Arrival-Date: Tue, 1 Dec 2026 10:00:00 +0000\r\n\
\r\n\
Final-Recipient: rfc822; nobody@example.test\r\n\
Original-Recipient: rfc822;nobody@example.test\r\n\
Action: failed\r\n\
Status: 5.1.1\r\n\
Remote-MTA: dns; mx.example.test\r\n\
Diagnostic-Code: smtp; 550 5.1.1 <nobody@example.test>: Recipient address\r\n\t\
rejected: User unknown\r\n\
\r\n\
--B\r\n\
Content-Type: text/rfc822-headers\r\n\
\r\n\
From: news@shop.test\r\n\
X-Paloma-Id: j-7\r\n\
\r\n\
--B--\r\n";

    #[test]
    fn a_dsn_gives_each_recipient_action_status_and_diagnostic() {
        let r = parse(DSN.as_bytes(), true);
        let Kind::Dsn {
            reporting_mta,
            recipients,
        } = r.kind
        else {
            panic!("{:?}", r.kind)
        };
        assert_eq!(reporting_mta, "relay.test");
        assert_eq!(
            recipients,
            [DsnRecipient {
                recipient: "nobody@example.test".into(),
                action: "failed".into(),
                status: "5.1.1".into(),
                diagnostic:
                    "550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown"
                        .into(),
            }]
        );
        assert_eq!(
            r.paloma_ids,
            ["j-7"],
            "Auto-Submitted on a DSN does not hide it"
        );
    }

    #[test]
    fn auto_replies_and_plain_text_bounces() {
        let vacation = "From: a@b.test\r\nSubject: Out of Office: back Monday\r\nX-Paloma-Id: no\r\n\r\nI am away.\r\n";
        assert_eq!(parse(vacation.as_bytes(), false).kind, Kind::AutoReply);
        assert!(
            parse(vacation.as_bytes(), false).paloma_ids.is_empty(),
            "its own header"
        );
        let rfc3834 =
            "From: a@b.test\r\nAuto-Submitted: auto-replied\r\nSubject: Re: hi\r\n\r\nthanks\r\n";
        assert_eq!(parse(rfc3834.as_bytes(), false).kind, Kind::AutoReply);
        let plain = "From: MAILER-DAEMON@old.test\r\nSubject: failure notice\r\n\r\nSorry.\r\n<x@old.test>:\r\n550 mailbox unavailable\r\n\r\n--- Below this line is a copy of the message.\r\n\r\nX-Paloma-Id: j-9\r\n";
        let r = parse(plain.as_bytes(), true);
        assert_eq!(
            r.kind,
            Kind::TextBounce {
                status: "5.0.0".into(),
                diagnostic: "550 mailbox unavailable".into(),
                permanent: true
            }
        );
        assert_eq!(r.paloma_ids, ["j-9"]);
        assert_eq!(parse(b"\x00\xff garbage", true).kind, Kind::Other);
        assert_eq!(parse(b"", true).kind, Kind::Other);
    }
}

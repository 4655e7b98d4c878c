//! Recording what a report (a DSN, a feedback report, a provider's webhook event) says
//! about one job: its `returned` or `complained` event, the campaign's counters and the
//! suppression, once, in one script (`scripts/report.lua`).

use super::{fields, TokenJob};
use crate::outcome::BounceClass;
use crate::queue::events::{Event, EventKind};
use crate::queue::Keys;
use crate::store::replication::{eval, AckError, Acks};
use crate::store::RedisConn;

/// What one report says about one job.
pub struct Finding {
    pub kind: EventKind,
    /// `returned-failed`, `returned-delayed`, `complained`: one of each per job.
    pub what: &'static str,
    pub status: String,
    pub class: Option<BounceClass>,
    pub diagnostic: String,
    pub reporting_mta: String,
    pub action: String,
    pub permanent: bool,
    pub feedback_type: String,
    pub source: String,
    /// The address the report names, if it names one.
    pub recipient: Option<String>,
}

impl Finding {
    /// A failed delivery reported after acceptance (`delayed`: a delay notice instead),
    /// classified as the synchronous path classifies. Every field is cut to its size
    /// ([`fields`]); a status that is not an RFC 3463 code is recorded as `malformed`, class
    /// `other`, and the return is then never permanent: whether an address is suppressed is
    /// decided from well-formed fields only.
    pub fn returned(
        status: String,
        diagnostic: String,
        reporting_mta: String,
        delayed: bool,
        permanent: bool,
        recipient: Option<String>,
    ) -> Finding {
        let diagnostic = fields::clip(&diagnostic, fields::DIAGNOSTIC_MAX);
        let parsed = fields::Status::parse(status.trim());
        let (status, class) = match parsed {
            Some(s) => {
                let s = s.to_string();
                let class = BounceClass::classify(&s, &diagnostic);
                (s, class)
            }
            None => (fields::MALFORMED.to_string(), BounceClass::Other),
        };
        Finding {
            kind: EventKind::Returned,
            what: if delayed {
                "returned-delayed"
            } else {
                "returned-failed"
            },
            class: Some(class),
            permanent: permanent && !delayed && parsed.is_some_and(|s| s.is_permanent()),
            status,
            diagnostic,
            reporting_mta: fields::clip(&reporting_mta, fields::MTA_MAX),
            action: if delayed { "delayed" } else { "failed" }.into(),
            feedback_type: String::new(),
            source: String::new(),
            recipient: recipient.map(|r| fields::clip(&r, fields::RECIPIENT_MAX)),
        }
    }

    /// A complaint (feedback-loop report or provider spam report), its fields cut to size.
    pub fn complained(feedback_type: String, source: String, recipient: Option<String>) -> Finding {
        Finding {
            kind: EventKind::Complained,
            what: "complained",
            status: String::new(),
            class: None,
            diagnostic: String::new(),
            reporting_mta: String::new(),
            action: String::new(),
            permanent: false,
            feedback_type: fields::clip(&feedback_type, fields::FEEDBACK_TYPE_MAX)
                .to_ascii_lowercase(),
            source: fields::clip(&source, fields::SOURCE_MAX),
            recipient: recipient.map(|r| fields::clip(&r, fields::RECIPIENT_MAX)),
        }
    }

    /// Counts a recorded finding about a job of `campaign` in the metrics.
    pub fn count(&self, m: &crate::metrics::Metrics, campaign: &str) {
        let kind = match self.kind {
            EventKind::Complained => {
                m.complaints.with_label_values(&[campaign]).inc();
                "complained"
            }
            _ if self.action == "delayed" => "delayed",
            _ => {
                let class = self.class.map_or("other", |c| c.as_str());
                m.returned.with_label_values(&[class]).inc();
                "returned"
            }
        };
        m.reports.with_label_values(&[kind]).inc();
    }
}

/// One report to record: what `finding` says about `job`, once per `marker`.
pub struct Report<'a> {
    pub marker: String,
    pub job: &'a TokenJob,
    pub finding: &'a Finding,
}

const REPORT: &str = include_str!("scripts/report.lua");

/// Records `reports` (each once per its marker, kept `ttl` seconds: the event, the stats,
/// the suppression) in one pipeline, acknowledged as `acks` says: Ok only once the
/// replicas confirmed them. For each, true when recorded, false when it already was.
pub async fn record(
    conn: &mut RedisConn,
    keys: &Keys,
    acks: &Acks,
    path: &'static str,
    ttl: u64,
    reports: &[Report<'_>],
) -> Result<Vec<bool>, AckError> {
    if reports.is_empty() {
        return Ok(Vec::new());
    }
    let mut p = redis::pipe();
    for r in reports {
        p.add_command(report_cmd(keys, &r.marker, ttl, r.job, r.finding));
    }
    let recorded: Vec<i64> = acks.write(conn, &p, false, path).await?;
    Ok(recorded.into_iter().map(|n| n == 1).collect())
}

fn report_cmd(keys: &Keys, marker: &str, ttl: u64, job: &TokenJob, f: &Finding) -> redis::Cmd {
    let mut ev = Event::new(f.kind, &job.id, &job.campaign, &job.to);
    ev.variant = job.variant.as_deref();
    let (fields, reason) = match f.kind {
        EventKind::Complained => {
            ev.feedback_type = Some(&f.feedback_type);
            ev.source = Some(&f.source);
            ("complained".to_string(), "complained")
        }
        _ => {
            let class = f.class.unwrap_or(BounceClass::Other);
            ev.status = Some(&f.status);
            ev.class = Some(class.as_str());
            ev.diagnostic = Some(&f.diagnostic);
            ev.reporting_mta = Some(&f.reporting_mta);
            ev.permanent = Some(f.permanent);
            ev.action = Some(&f.action);
            if f.action == "delayed" {
                ("returned_delayed".to_string(), "")
            } else {
                let suppress = f.permanent && class.is_hard();
                let mut fields = format!("returned,returned_{}", class.as_str());
                if suppress {
                    // A hard bounce after acceptance counts towards guards' bounce rate.
                    fields.push_str(",returned_hard");
                }
                (fields, if suppress { "bounced" } else { "" })
            }
        }
    };
    let stats = keys.stats(&job.campaign);
    let variants = keys.variants(&job.campaign);
    let touches = keys.touches(&job.campaign);
    let mut c = eval(
        REPORT,
        &[
            marker,
            &keys.events,
            &stats,
            &keys.suppressed,
            &keys.campaigns,
            &variants,
            &touches,
        ],
    );
    c.arg(ttl)
        .arg(ev.to_json())
        .arg(keys.events_max_len)
        .arg(fields)
        .arg(crate::policy::suppression::field(&job.to))
        .arg(reason)
        .arg(&job.campaign)
        .arg(job.variant.as_deref().unwrap_or(""))
        .arg(job.touch.as_deref().unwrap_or(""));
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_status_is_recorded_as_such_and_never_suppresses() {
        let diag = "550 5.1.1 <a@b.test>: user unknown".to_string();
        for bad in ["5.1.1€", "-5.-1.-1", "99999999999999999999.1.1", ""] {
            let f = Finding::returned(bad.into(), diag.clone(), "mx".into(), false, true, None);
            assert_eq!(f.status, "malformed", "{bad:?}");
            assert_eq!(f.class, Some(BounceClass::Other), "{bad:?}");
            assert!(!f.permanent, "{bad:?}");
        }
        let f = Finding::returned("5.1.1".into(), diag, "mx".into(), false, true, None);
        assert_eq!(
            (f.status.as_str(), f.class, f.permanent),
            ("5.1.1", Some(BounceClass::InvalidRecipient), true)
        );
        let f = Finding::returned(
            "4.2.2".into(),
            String::new(),
            String::new(),
            false,
            true,
            None,
        );
        assert!(!f.permanent, "a 4.x.x status is never permanent");
    }

    #[test]
    fn every_field_is_cut_to_its_size() {
        let huge = "x".repeat(5_000_000);
        let f = Finding::returned(
            "5.1.1".into(),
            huge.clone(),
            huge.clone(),
            false,
            true,
            Some(huge.clone()),
        );
        assert_eq!(f.diagnostic.len(), fields::DIAGNOSTIC_MAX);
        assert_eq!(f.reporting_mta.len(), fields::MTA_MAX);
        assert_eq!(f.recipient.map(|r| r.len()), Some(fields::RECIPIENT_MAX));
        let c = Finding::complained(huge.clone(), huge.clone(), Some(huge));
        assert_eq!(c.feedback_type.len(), fields::FEEDBACK_TYPE_MAX);
        assert_eq!(c.source.len(), fields::SOURCE_MAX);
    }
}

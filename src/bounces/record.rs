//! Recording what a report (a DSN, a feedback report, a provider's webhook event) says
//! about one job: its `returned` or `complained` event, the campaign's counters and the
//! suppression, once, in one script (`scripts/report.lua`).

use super::TokenJob;
use crate::outcome::BounceClass;
use crate::queue::events::{Event, EventKind};
use crate::queue::Keys;
use crate::store::RedisConn;

/// The script that records a report.
pub fn script() -> redis::Script {
    redis::Script::new(include_str!("scripts/report.lua"))
}

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
    /// classified as the synchronous path classifies.
    pub fn returned(
        status: String,
        diagnostic: String,
        reporting_mta: String,
        delayed: bool,
        permanent: bool,
        recipient: Option<String>,
    ) -> Finding {
        Finding {
            kind: EventKind::Returned,
            what: if delayed {
                "returned-delayed"
            } else {
                "returned-failed"
            },
            class: Some(BounceClass::classify(&status, &diagnostic)),
            permanent: permanent && !delayed,
            status,
            diagnostic,
            reporting_mta,
            action: if delayed { "delayed" } else { "failed" }.into(),
            feedback_type: String::new(),
            source: String::new(),
            recipient,
        }
    }

    /// A complaint (feedback-loop report or provider spam report).
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
            feedback_type,
            source,
            recipient,
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

/// Records what `f` says about `job` once per `marker` (kept `ttl` seconds): the event,
/// the stats, the suppression. True when recorded, false when it already was.
pub async fn record(
    conn: &mut RedisConn,
    keys: &Keys,
    script: &redis::Script,
    marker: &str,
    ttl: u64,
    job: &TokenJob,
    f: &Finding,
) -> redis::RedisResult<bool> {
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
    let recorded: i64 = script
        .key(marker)
        .key(&keys.events)
        .key(keys.stats(&job.campaign))
        .key(&keys.suppressed)
        .key(&keys.campaigns)
        .key(keys.variants(&job.campaign))
        .key(keys.touches(&job.campaign))
        .arg(ttl)
        .arg(ev.to_json())
        .arg(keys.events_max_len)
        .arg(fields)
        .arg(crate::policy::suppression::field(&job.to))
        .arg(reason)
        .arg(&job.campaign)
        .arg(job.variant.as_deref().unwrap_or(""))
        .arg(job.touch.as_deref().unwrap_or(""))
        .invoke_async(conn)
        .await?;
    Ok(recorded == 1)
}

//! Operator suspensions per recipient domain (`paloma domain suspend|resume`, the API's
//! `/api/v1/domains/…`), KumoMTA's suspend: no daemon sends to the domain — through every
//! source, or one — until the suspension ends or is lifted. Kept in
//! `{prefix}suspended_domains` (member `domain` or `{source}/{domain}`, score: until, on
//! Redis's clock), which every daemon reads with the fleet's site suspensions
//! (`shape::Shaper::follow_shared`, every 500 ms). A job for a suspended domain waits in the
//! delayed set until the end; lifting the suspension brings those jobs forward.

use serde::Serialize;

use super::bring_forward_where;
use crate::queue::{now_ms, Keys};
use crate::store::replication::{AckError, Acks};
use crate::store::RedisConn;

/// Twice the period at which every daemon reads the suspensions
/// (`shape::SHARED_SUSPENSIONS_EVERY`, 500 ms).
const REREAD_MS: i64 = 1000;

/// One operator suspension.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DomainSuspension {
    pub domain: String,
    /// The one source it applies to; null: every source.
    pub source: Option<String>,
    /// Until when (RFC 3339).
    pub until: String,
}

/// What a resume did.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Resumed {
    pub domain: String,
    /// Suspensions lifted (the domain's, and each source's).
    pub lifted: u64,
    /// Jobs for the domain brought forward from the delayed set.
    pub brought_forward: u64,
}

/// A recipient domain as a suspension names it: lower-cased, without a trailing dot; None
/// when it is not a domain name.
pub fn domain_name(d: &str) -> Option<String> {
    let d = d.trim().trim_end_matches('.').to_ascii_lowercase();
    let ok = !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    ok.then_some(d)
}

fn member(domain: &str, source: Option<&str>) -> String {
    match source {
        Some(s) => format!("{s}/{domain}"),
        None => domain.to_string(),
    }
}

/// Suspends `domain` (for `source` only, if given) for `ms` milliseconds from now; a later
/// end already set is kept. Returns the suspension.
pub async fn suspend(
    conn: &mut RedisConn,
    keys: &Keys,
    acks: &Acks,
    path: &'static str,
    domain: &str,
    source: Option<&str>,
    ms: i64,
) -> Result<DomainSuspension, AckError> {
    let until = now_ms() + ms;
    let m = member(domain, source);
    let mut p = redis::pipe();
    p.cmd("ZADD")
        .arg(&keys.suspended_domains)
        .arg("GT")
        .arg(until)
        .arg(&m)
        .ignore();
    p.cmd("ZSCORE").arg(&keys.suspended_domains).arg(&m);
    let (score,): (Option<i64>,) = p.query_async(conn).await?;
    acks.barrier(conn, path).await?;
    Ok(DomainSuspension {
        domain: domain.to_string(),
        source: source.map(str::to_string),
        until: crate::queue::events::rfc3339_ms(score.unwrap_or(until)),
    })
}

/// Lifts the suspensions of `domain` (only `source`'s, if given; else the domain's and
/// every source's) and brings its waiting jobs forward, so they go out now rather than when
/// the suspension would have ended. Jobs waiting for a `send_at` keep it.
pub async fn resume(
    conn: &mut RedisConn,
    keys: &Keys,
    acks: &Acks,
    path: &'static str,
    domain: &str,
    source: Option<&str>,
) -> Result<Resumed, AckError> {
    let all: Vec<String> = redis::cmd("ZRANGE")
        .arg(&keys.suspended_domains)
        .arg(0)
        .arg(-1)
        .query_async(conn)
        .await?;
    let gone: Vec<&String> = all
        .iter()
        .filter(|m| match source {
            Some(s) => **m == member(domain, Some(s)),
            None => m.as_str() == domain || m.rsplit_once('/').is_some_and(|(_, d)| d == domain),
        })
        .collect();
    let lifted = gone.len() as u64;
    if !gone.is_empty() {
        let _: () = redis::cmd("ZREM")
            .arg(&keys.suspended_domains)
            .arg(&gone)
            .query_async(conn)
            .await?;
    }
    // Due once every daemon has read the suspensions again (each does every 500 ms): sooner,
    // a daemon that has not yet seen the change would put the job back for the old end.
    let now = now_ms();
    let due = now + REREAD_MS;
    let brought_forward =
        bring_forward_where(conn, keys, due, |job| job_for(job, domain, now)).await?;
    acks.barrier(conn, path).await?;
    Ok(Resumed {
        domain: domain.to_string(),
        lifted,
        brought_forward,
    })
}

/// Whether a delayed job (its JSON) is for `domain` and not waiting for a future `send_at`.
fn job_for(job: &[u8], domain: &str, now: i64) -> bool {
    #[derive(serde::Deserialize)]
    struct J {
        to: Option<String>,
        send_at: Option<String>,
    }
    let Ok(j) = serde_json::from_slice::<J>(job) else {
        return false;
    };
    let for_domain =
        j.to.as_deref()
            .and_then(|t| t.rsplit_once('@'))
            .is_some_and(|(_, d)| d.eq_ignore_ascii_case(domain));
    let scheduled = j
        .send_at
        .as_deref()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .is_some_and(|t| t.timestamp_millis() > now);
    for_domain && !scheduled
}

/// The suspensions in force.
pub async fn list(conn: &mut RedisConn, keys: &Keys) -> redis::RedisResult<Vec<DomainSuspension>> {
    let now = now_ms();
    let items: Vec<(String, i64)> = redis::cmd("ZRANGEBYSCORE")
        .arg(&keys.suspended_domains)
        .arg(format!("({now}"))
        .arg("+inf")
        .arg("WITHSCORES")
        .query_async(conn)
        .await?;
    Ok(items
        .into_iter()
        .map(|(m, until)| {
            let (source, domain) = match m.split_once('/') {
                Some((s, d)) => (Some(s.to_string()), d.to_string()),
                None => (None, m),
            };
            DomainSuspension {
                domain,
                source,
                until: crate::queue::events::rfc3339_ms(until),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_names_and_waiting_jobs() {
        assert_eq!(domain_name("Gmail.COM.").as_deref(), Some("gmail.com"));
        assert_eq!(domain_name("a b.test"), None);
        assert_eq!(domain_name("x/y.test"), None);
        assert_eq!(domain_name(""), None);
        assert!(job_for(br#"{"to":"u@W.test"}"#, "w.test", 0));
        assert!(!job_for(br#"{"to":"u@v.test"}"#, "w.test", 0));
        assert!(!job_for(
            br#"{"to":"u@w.test","send_at":"2999-01-01T00:00:00Z"}"#,
            "w.test",
            0
        ));
    }
}

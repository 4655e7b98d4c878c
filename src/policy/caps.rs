//! Frequency caps: "at most 1 marketing message per 90 days", "3 per week", counted per
//! recipient across campaigns.
//!
//! Each recipient's recent sends live in one compact hash field, `{prefix}r:{address}` →
//! `s` = `"{unix s}:{job tag},…"`, next to the engagement fields (`last_open`,
//! `last_click`). A Lua script checks every cap and reserves the slot atomically, so two
//! daemons cannot both take the last one; the job tag makes the reservation idempotent for a
//! job that comes back (a retry, a rate put-back).

use crate::config::CapRule;
use crate::store::keys::Keys;
use crate::store::RedisConn;

/// KEYS[1]: the recipient hash. ARGV[1]: now (s), ARGV[2]: longest window (s), ARGV[3]: job
/// tag, then (max, window s) pairs. Returns 1 when the job may go (slot reserved), 0 when a
/// cap is reached.
const RESERVE: &str = include_str!("scripts/reserve.lua");

pub struct Caps {
    rules: Vec<(u32, u64)>,
    longest: u64,
    script: redis::Script,
}

impl Caps {
    pub fn new(rules: &[CapRule]) -> Option<Caps> {
        if rules.is_empty() {
            return None;
        }
        let rules: Vec<(u32, u64)> = rules
            .iter()
            .map(|r| (r.max, r.per.get().as_secs().max(1)))
            .collect();
        let longest = rules.iter().map(|(_, p)| *p).max().unwrap_or(1);
        Some(Caps {
            rules,
            longest,
            script: redis::Script::new(RESERVE),
        })
    }

    /// Reserves a slot for each `(address, job id)`: one pipelined round trip per batch.
    /// Each job is answered on its own: a recipient record that is not a hash (another tool
    /// wrote there) or a script error refuses that job, not the batch.
    pub async fn reserve(
        &self,
        conn: &mut RedisConn,
        keys: &Keys,
        jobs: &[(&str, &str)],
    ) -> redis::RedisResult<Vec<Reserved>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let now = crate::store::clock::now_ms() / 1000;
        let build = || {
            let mut p = redis::pipe();
            p.ignore_errors();
            for (addr, id) in jobs {
                let c = p
                    .cmd("EVALSHA")
                    .arg(self.script.get_hash())
                    .arg(1)
                    .arg(keys.recipient(&super::suppression::field(addr)))
                    .arg(now)
                    .arg(self.longest)
                    .arg(tag(id));
                for (max, per) in &self.rules {
                    c.arg(*max).arg(*per);
                }
            }
            p
        };
        let mut replies: Vec<redis::Value> = build().query_async(conn).await?;
        // A restarted Redis forgot the script: load it and go again.
        let noscript =
            |v: &redis::Value| matches!(v, redis::Value::ServerError(e) if e.code() == "NOSCRIPT");
        if replies.iter().any(noscript) {
            redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(RESERVE)
                .query_async::<String>(conn)
                .await?;
            replies = build().query_async(conn).await?;
        }
        Ok(replies
            .into_iter()
            .zip(jobs)
            .map(|(v, (addr, _))| Reserved::from_reply(v, addr))
            .collect())
    }
}

/// What the script answered for one job.
#[derive(Debug, PartialEq)]
pub enum Reserved {
    /// The slot is taken: the job may go.
    Go,
    /// A cap is reached.
    Capped,
    /// Redis refused this job's reservation (why): it cannot be counted, so it is not sent.
    Refused(String),
}

impl Reserved {
    fn from_reply(v: redis::Value, addr: &str) -> Reserved {
        match v {
            redis::Value::Int(1) => Reserved::Go,
            redis::Value::Int(_) => Reserved::Capped,
            redis::Value::BulkString(b) => {
                let s = String::from_utf8_lossy(&b);
                let kind = s.strip_prefix("wrongtype:").unwrap_or(&s);
                Reserved::Refused(format!(
                    "the frequency-cap record of {addr} holds a Redis {kind}, not a hash"
                ))
            }
            redis::Value::ServerError(e) => {
                Reserved::Refused(format!("reserving a frequency-cap slot failed: {e:?}"))
            }
            other => Reserved::Refused(format!(
                "reserving a frequency-cap slot: unexpected reply {other:?}"
            )),
        }
    }
}

/// A short stable tag of a job id (the reservation's owner).
fn tag(id: &str) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(id.as_bytes());
    d[..6].iter().map(|b| format!("{b:02x}")).collect()
}

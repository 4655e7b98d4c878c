//! SendsReader from `{prefix}sends` through a consumer group: batched XREADGROUP on a connection
//! of its own (a blocking read holds up whatever else shares a connection), a reclaim (fencing the old owner) of
//! entries a stopped consumer left pending, and the idempotency claim of each job id.

use super::consumer::StreamConsumer;
use super::idem::Idem;
use super::{Entry, Keys};
use crate::config::IntakeSettings;
use crate::store::RedisConn;

/// What the idempotency record says about a job id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// First time seen: ours.
    New,
    /// Already claimed for this very stream entry (a reclaim after a crash, or a retry the
    /// scheduler moved back): ours.
    Resumed,
    /// Sent, scheduled or in progress under another entry: skip.
    Duplicate,
}

pub struct SendsReader {
    pub stream: StreamConsumer,
    reader: RedisConn,
    conn: RedisConn,
    keys: Keys,
    idem_ttl: u64,
}

impl SendsReader {
    /// From `[intake]`: the consumer `consumer` of `group` on the sends stream, reading on
    /// `reader` (its own connection), claiming on `conn`.
    pub fn new(
        reader: RedisConn,
        conn: RedisConn,
        keys: Keys,
        group: &str,
        consumer: &str,
        settings: &IntakeSettings,
    ) -> Self {
        SendsReader {
            stream: StreamConsumer::new(
                keys.sends.clone(),
                group.to_string(),
                consumer.to_string(),
                settings.batch,
                settings.block.get(),
                settings.claim_idle.get(),
            ),
            reader,
            conn,
            keys,
            idem_ttl: settings.idempotency_ttl.get().as_secs().max(1),
        }
    }

    /// Creates the consumer group (and the stream) if missing. Reads from the start of the
    /// stream so that jobs enqueued before the first daemon started are not skipped.
    pub async fn ensure_group(&mut self) -> redis::RedisResult<()> {
        self.stream.ensure_group(&mut self.conn, "0").await
    }

    /// New entries for this consumer (blocks up to `block`).
    pub async fn read(
        &mut self,
        out: &mut Vec<Entry>,
        gone: &mut Vec<String>,
    ) -> redis::RedisResult<()> {
        self.stream
            .read(&mut self.reader, &mut self.conn, out, gone)
            .await
    }

    /// Entries pending longer than `claim_idle` with any consumer, now ours.
    pub async fn reclaim(
        &mut self,
        leases: &super::leases::Leases,
        out: &mut Vec<Entry>,
        gone: &mut Vec<String>,
    ) -> redis::RedisResult<()> {
        // What this daemon still works on is renewed first, on the same connection: never
        // reclaimed into itself and sent twice (see `Leases::renew_now`).
        leases.renew_now(&mut self.conn).await?;
        self.stream.reclaim(&mut self.conn, out, gone).await
    }

    /// Removes consumers with nothing pending, idle longer than `claim_idle`, from the sends
    /// group and from `also` (other groups, e.g. the workflow engine's on the events stream):
    /// daemons that stopped. A live daemon reads every `block`, so it is never that idle;
    /// and one removed while briefly idle is recreated by its next read. Returns how many.
    pub async fn prune_consumers(&mut self, also: &[(&str, &str)]) -> redis::RedisResult<i64> {
        let script = redis::Script::new(include_str!("scripts/prune_consumers.lua"));
        let mut removed = 0;
        let idle_ms = self.stream.claim_idle().as_millis() as u64;
        for (stream, group) in
            std::iter::once((self.stream.stream.as_str(), self.stream.group.as_str()))
                .chain(also.iter().copied())
        {
            let n: i64 = script
                .key(stream)
                .arg(group)
                .arg(idle_ms)
                .arg(&self.stream.consumer)
                .invoke_async(&mut self.conn)
                .await?;
            removed += n;
        }
        Ok(removed)
    }

    /// Claims each job id for its entry and looks its recipient up in the suppression list,
    /// one pipelined round trip per batch: `SET idem:{id} {in progress} NX GET` answers nil when
    /// new, else the current holder; `HGET suppressed addr` the reason, if any; and one
    /// [`touches::READ`](crate::policy::touches::READ) call for the batch, how many marketing
    /// messages each address was sent in the last year.
    pub async fn claim(&mut self, jobs: &[(&str, &str, &str)]) -> redis::RedisResult<Vec<Claimed>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let mut p = redis::pipe();
        let mut owner = String::new();
        let mut recipients = Vec::with_capacity(jobs.len());
        for (job_id, entry_id, addr) in jobs {
            Idem::InProgress(entry_id).encode(&mut owner);
            p.cmd("SET")
                .arg(self.keys.idem(job_id))
                .arg(&owner)
                .arg("NX")
                .arg("GET")
                .arg("EX")
                .arg(self.idem_ttl);
            let field = crate::policy::suppression::field(addr);
            recipients.push(self.keys.recipient(&field));
            p.cmd("HGET").arg(&self.keys.suppressed).arg(field);
        }
        p.cmd("EVAL")
            .arg(crate::policy::touches::READ)
            .arg(recipients.len())
            .arg(&recipients)
            .arg(crate::policy::touches::months(chrono::Utc::now()));
        // Read as raw values: one value that is not UTF-8 (a suppression reason written by
        // another tool) must not fail the whole batch, and so stall the intake, for ever.
        let mut replies: Vec<redis::Value> = p.query_async(&mut self.conn).await?;
        let sums = match replies.pop() {
            Some(redis::Value::Array(sums)) => sums,
            _ => Vec::new(),
        };
        let text = |v: &redis::Value| match v {
            redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
            redis::Value::SimpleString(s) => Some(s.clone()),
            redis::Value::Okay => Some("OK".into()),
            _ => None,
        };
        Ok(replies
            .chunks(2)
            .zip(jobs)
            .enumerate()
            .map(|(i, (two, (_, entry_id, _)))| {
                let claim = match two.first().and_then(text) {
                    None => Claim::New,
                    Some(v) if Idem::parse(&v) == Some(Idem::InProgress(entry_id)) => {
                        Claim::Resumed
                    }
                    Some(_) => Claim::Duplicate,
                };
                let previous = match sums.get(i) {
                    Some(redis::Value::Int(n)) => u32::try_from(*n).unwrap_or(0),
                    _ => 0,
                };
                Claimed {
                    claim,
                    suppressed: two.get(1).and_then(text),
                    previous,
                }
            })
            .collect())
    }
}

/// What the intake's claim round trip found for one job.
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    pub claim: Claim,
    /// Its address's suppression reason, if any.
    pub suppressed: Option<String>,
    /// Marketing messages delivered to the address in the current and the 12 previous
    /// months.
    pub previous: u32,
}

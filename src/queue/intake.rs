//! Intake from `{prefix}sends` through a consumer group: batched XREADGROUP on a connection
//! of its own (a blocking read holds up whatever else shares a connection), XAUTOCLAIM of
//! entries a stopped consumer left pending, and the idempotency claim of each job id.

use std::time::Duration;

use crate::store::RedisConn;
use redis::Value;

use super::{parse_autoclaim, parse_xread, Entry, Keys};

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

pub struct Intake {
    reader: RedisConn,
    conn: RedisConn,
    keys: Keys,
    group: String,
    consumer: String,
    batch: usize,
    block_ms: u64,
    claim_idle_ms: u64,
    claim_cursor: String,
    idem_ttl: u64,
}

impl Intake {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        reader: RedisConn,
        conn: RedisConn,
        keys: Keys,
        group: String,
        consumer: String,
        batch: usize,
        block: Duration,
        claim_idle: Duration,
        idem_ttl: Duration,
    ) -> Self {
        Intake {
            reader,
            conn,
            keys,
            group,
            consumer,
            batch,
            block_ms: block.as_millis() as u64,
            claim_idle_ms: claim_idle.as_millis() as u64,
            claim_cursor: "0-0".into(),
            idem_ttl: idem_ttl.as_secs().max(1),
        }
    }

    /// Creates the consumer group (and the stream) if missing. Reads from the start of the
    /// stream so that jobs enqueued before the first daemon started are not skipped.
    pub async fn ensure_group(&mut self) -> redis::RedisResult<()> {
        super::create_group(&mut self.conn, &self.keys.sends, &self.group, "0").await
    }

    /// New entries for this consumer (blocks up to `block`).
    pub async fn read(
        &mut self,
        out: &mut Vec<Entry>,
        gone: &mut Vec<String>,
    ) -> redis::RedisResult<()> {
        let reply: redis::RedisResult<Value> = super::read_group(
            &self.keys.sends,
            &self.group,
            &self.consumer,
            self.batch,
            self.block_ms,
        )
        .query_async(&mut self.reader)
        .await;
        match reply {
            Ok(v) => {
                parse_xread(&v, out, gone);
                Ok(())
            }
            // The group vanished (a Redis restart without persistence): make it again.
            Err(e) if e.code() == Some("NOGROUP") => self.ensure_group().await,
            Err(e) => Err(e),
        }
    }

    /// Entries pending longer than `claim_idle` with any consumer, now ours.
    pub async fn reclaim(
        &mut self,
        out: &mut Vec<Entry>,
        gone: &mut Vec<String>,
    ) -> redis::RedisResult<()> {
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(&self.keys.sends)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(self.claim_idle_ms)
            .arg(&self.claim_cursor)
            .arg("COUNT")
            .arg(self.batch)
            .query_async(&mut self.conn)
            .await?;
        self.claim_cursor = parse_autoclaim(&reply, out, gone);
        Ok(())
    }

    /// Removes consumers with nothing pending, idle longer than `claim_idle`, from the sends
    /// group and from `also` (other groups, e.g. the workflow engine's on the events stream):
    /// daemons that stopped. A live daemon reads every `block`, so it is never that idle;
    /// and one removed while briefly idle is recreated by its next read. Returns how many.
    pub async fn prune_consumers(&mut self, also: &[(&str, &str)]) -> redis::RedisResult<i64> {
        let script = redis::Script::new(include_str!("scripts/prune_consumers.lua"));
        let mut removed = 0;
        for (stream, group) in std::iter::once((self.keys.sends.as_str(), self.group.as_str()))
            .chain(also.iter().copied())
        {
            let n: i64 = script
                .key(stream)
                .arg(group)
                .arg(self.claim_idle_ms)
                .arg(&self.consumer)
                .invoke_async(&mut self.conn)
                .await?;
            removed += n;
        }
        Ok(removed)
    }

    /// Claims each job id for its entry and looks its recipient up in the suppression list,
    /// one pipelined round trip per batch: `SET idem:{id} p:{entry} NX GET` answers nil when
    /// new, else the current holder; `HGET suppressed addr` the reason, if any.
    pub async fn claim(
        &mut self,
        jobs: &[(&str, &str, &str)],
    ) -> redis::RedisResult<Vec<(Claim, Option<String>)>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let mut p = redis::pipe();
        let mut owner = String::new();
        for (job_id, entry_id, addr) in jobs {
            owner.clear();
            owner.push_str("p:");
            owner.push_str(entry_id);
            p.cmd("SET")
                .arg(self.keys.idem(job_id))
                .arg(&owner)
                .arg("NX")
                .arg("GET")
                .arg("EX")
                .arg(self.idem_ttl);
            p.cmd("HGET")
                .arg(&self.keys.suppressed)
                .arg(crate::policy::suppression::field(addr));
        }
        // Read as raw values: one value that is not UTF-8 (a suppression reason written by
        // another tool) must not fail the whole batch, and so stall the intake, for ever.
        let replies: Vec<redis::Value> = p.query_async(&mut self.conn).await?;
        let replies: Vec<Option<String>> = replies
            .into_iter()
            .map(|v| match v {
                redis::Value::BulkString(b) => Some(String::from_utf8_lossy(&b).into_owned()),
                redis::Value::SimpleString(s) => Some(s),
                redis::Value::Okay => Some("OK".into()),
                _ => None,
            })
            .collect();
        Ok(replies
            .chunks(2)
            .zip(jobs)
            .map(|(pair, (_, entry_id, _))| {
                let claim = match &pair[0] {
                    None => Claim::New,
                    Some(v) if v.strip_prefix("p:") == Some(*entry_id) => Claim::Resumed,
                    Some(_) => Claim::Duplicate,
                };
                (claim, pair.get(1).cloned().flatten())
            })
            .collect())
    }
}

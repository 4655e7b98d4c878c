//! One reader of a Redis stream through a consumer group, used by the intake (the sends
//! stream) and the workflow engine (the events stream): batched `XREADGROUP` on a connection
//! of its own (a blocking read holds up whatever else shares a connection), a reclaim of
//! entries a stopped consumer left pending (`reclaim.lua`: XPENDING + XCLAIM, fencing the
//! old owner), on a cadence, recreation of a group that vanished with its stream, and the
//! backoff after a failed read.
//!
//! What an entry's fields mean is the caller's: it implements [`StreamEntry`]. Entries
//! deleted from the stream while pending come back as bare ids (`gone`), to acknowledge.

use std::time::{Duration, Instant};

use redis::Value;

use crate::store::RedisConn;

/// An entry read from a stream.
pub trait StreamEntry: Sized {
    /// The entry `id` with its `[field, value, …]` list (never empty).
    fn from_fields(id: String, fields: &[Value]) -> Self;
}

/// The fields of an entry as bytes (bulk or simple strings).
pub fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn items(v: &Value) -> &[Value] {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        _ => &[],
    }
}

/// `[id, [field, value, …]]` pairs; entries without fields (deleted) go to `gone`.
fn parse_entries<T: StreamEntry>(list: &Value, out: &mut Vec<T>, gone: &mut Vec<String>) {
    for e in items(list) {
        let parts = items(e);
        let Some(id) = parts.first().and_then(bytes) else {
            continue;
        };
        let id = String::from_utf8_lossy(id).into_owned();
        let fields = parts.get(1).map(items).unwrap_or(&[]);
        if fields.is_empty() {
            gone.push(id);
        } else {
            out.push(T::from_fields(id, fields));
        }
    }
}

/// Entries of an XREADGROUP reply (RESP2 array or RESP3 map form).
pub fn parse_read<T: StreamEntry>(reply: &Value, out: &mut Vec<T>, gone: &mut Vec<String>) {
    match reply {
        Value::Map(m) => {
            for (_, list) in m {
                parse_entries(list, out, gone);
            }
        }
        other => {
            for stream in items(other) {
                if let Some(list) = items(stream).get(1) {
                    parse_entries(list, out, gone);
                }
            }
        }
    }
}

/// An XAUTOCLAIM reply, `[next cursor, [entries], [deleted ids]]`; returns the cursor.
pub fn parse_autoclaim<T: StreamEntry>(
    reply: &Value,
    out: &mut Vec<T>,
    gone: &mut Vec<String>,
) -> String {
    let parts = items(reply);
    let cursor = parts
        .first()
        .and_then(bytes)
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_else(|| "0-0".into());
    if let Some(list) = parts.get(1) {
        parse_entries(list, out, gone);
    }
    if let Some(deleted) = parts.get(2) {
        gone.extend(
            items(deleted)
                .iter()
                .filter_map(bytes)
                .map(|b| String::from_utf8_lossy(b).into_owned()),
        );
    }
    cursor
}

/// `XGROUP CREATE stream group from MKSTREAM`, where an existing group is not an error.
pub async fn create_group<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    stream: &str,
    group: &str,
    from: &str,
) -> redis::RedisResult<()> {
    let r: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg(from)
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match r {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

/// One consumer of one group of one stream.
pub struct StreamConsumer {
    pub stream: String,
    pub group: String,
    pub consumer: String,
    batch: usize,
    block_ms: u64,
    claim_idle: Duration,
    claim_every: Duration,
    last_claim: Option<Instant>,
}

impl StreamConsumer {
    /// Reads up to `batch` entries per call, blocking up to `block`; entries pending longer
    /// than `claim_idle` with any consumer are reclaimed every `claim_idle / 4` (between
    /// 0.5 s and a minute), and right at the start: a restarted daemon picks up what a
    /// killed one left.
    pub fn new(
        stream: String,
        group: String,
        consumer: String,
        batch: usize,
        block: Duration,
        claim_idle: Duration,
    ) -> Self {
        StreamConsumer {
            stream,
            group,
            consumer,
            batch,
            block_ms: block.as_millis() as u64,
            claim_idle,
            claim_every: (claim_idle / 4)
                .clamp(Duration::from_millis(500), Duration::from_secs(60)),
            last_claim: None,
        }
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn claim_idle(&self) -> Duration {
        self.claim_idle
    }

    /// Creates the group (and the stream) if missing, reading from `from` (`0`: the start,
    /// `$`: the end).
    pub async fn ensure_group(&self, conn: &mut RedisConn, from: &str) -> redis::RedisResult<()> {
        create_group(conn, &self.stream, &self.group, from).await
    }

    /// Whether it is time to reclaim; true once per cadence.
    pub fn reclaim_due(&mut self) -> bool {
        let due = self
            .last_claim
            .is_none_or(|t| t.elapsed() >= self.claim_every);
        if due {
            self.last_claim = Some(Instant::now());
        }
        due
    }

    /// New entries for this consumer, on `reader` (blocks up to `block`). A group that
    /// vanished with its stream (deleted, or Redis lost its data) is made again on `conn`,
    /// reading from the start: whatever the new stream holds was written since.
    pub async fn read<T: StreamEntry>(
        &self,
        reader: &mut RedisConn,
        conn: &mut RedisConn,
        out: &mut Vec<T>,
        gone: &mut Vec<String>,
    ) -> redis::RedisResult<()> {
        let reply: redis::RedisResult<Value> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(self.batch)
            .arg("BLOCK")
            .arg(self.block_ms)
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(">")
            .query_async(reader)
            .await;
        match reply {
            Ok(v) => {
                parse_read(&v, out, gone);
                Ok(())
            }
            Err(e) if e.code() == Some("NOGROUP") => self.ensure_group(conn, "0").await,
            Err(e) => Err(e),
        }
    }

    /// Entries pending longer than `claim_idle` with any consumer, now ours; one page per
    /// call. Each consumer they were taken from has its fence bumped (`reclaim.lua`), so an
    /// outcome it writes for them after waking from a freeze is refused (see
    /// [`super::recorder`]).
    pub async fn reclaim<T: StreamEntry>(
        &self,
        conn: &mut RedisConn,
        out: &mut Vec<T>,
        gone: &mut Vec<String>,
    ) -> redis::RedisResult<()> {
        static RECLAIM: std::sync::LazyLock<redis::Script> =
            std::sync::LazyLock::new(|| redis::Script::new(include_str!("scripts/reclaim.lua")));
        let reply: Value = RECLAIM
            .key(&self.stream)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(self.claim_idle.as_millis() as u64)
            .arg(self.batch)
            .invoke_async(conn)
            .await?;
        // No cursor to keep: what was taken is no longer idle, so the next page starts over.
        parse_autoclaim(&reply, out, gone);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Raw(String, usize);
    impl StreamEntry for Raw {
        fn from_fields(id: String, fields: &[Value]) -> Self {
            Raw(id, fields.len())
        }
    }

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn autoclaim_replies_give_entries_deleted_ids_and_the_cursor() {
        let reply = Value::Array(vec![
            bulk("5-0"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk("1-0"),
                    Value::Array(vec![bulk("job"), bulk("{}")]),
                ]),
                Value::Array(vec![bulk("2-0"), Value::Nil]),
            ]),
            Value::Array(vec![bulk("3-0")]),
        ]);
        let (mut out, mut gone) = (Vec::<Raw>::new(), Vec::new());
        assert_eq!(parse_autoclaim(&reply, &mut out, &mut gone), "5-0");
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].0.as_str(), out[0].1), ("1-0", 2));
        assert_eq!(gone, ["2-0", "3-0"]);
    }
}

//! Redis: the sends stream and its consumer group (intake), the delayed set (retries and
//! `send_at`), the events and dead-letter streams, idempotency records and stats.
//!
//! Every key is named by [`crate::store::keys::Keys`].

pub mod consumer;
pub mod events;
pub mod idem;
pub mod leases;
pub mod scheduler;
pub mod sends;

use redis::Value;

pub use crate::store::keys::Keys;
use consumer::bytes;

/// One entry of the sends stream.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: String,
    pub job: Vec<u8>,
    /// Delivery attempts already made (0 for a fresh job).
    pub attempt: u32,
    /// When the job first entered the system (ms); from the entry id for fresh jobs.
    pub first_at: i64,
    /// The egress source of its previous attempt (a retry keeps it when it can); carried
    /// in the `attempt` field as `{attempt}@{source}` (see [`scheduler::attempt_field`]).
    pub source: Option<String>,
}

impl Entry {
    /// Milliseconds part of a stream entry id.
    pub fn id_millis(id: &str) -> i64 {
        id.split('-')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0)
    }
}

impl consumer::StreamEntry for Entry {
    fn from_fields(id: String, fields: &[Value]) -> Self {
        let mut entry = Entry {
            first_at: Entry::id_millis(&id),
            id,
            job: Vec::new(),
            attempt: 0,
            source: None,
        };
        for kv in fields.chunks(2) {
            let (Some(k), Some(v)) = (kv.first().and_then(bytes), kv.get(1).and_then(bytes)) else {
                continue;
            };
            match k {
                b"job" => entry.job = v.to_vec(),
                b"attempt" => {
                    // A reason (`#x`, why it waited) is dropped: it means nothing once
                    // the job is back.
                    let text = std::str::from_utf8(v).unwrap_or("");
                    let (n, source, _) = scheduler::attempt_field(text);
                    entry.attempt = n;
                    entry.source = source
                        .filter(|s| crate::values::valid_egress_name(s))
                        .map(str::to_string);
                }
                b"first_at" => {
                    // Never later than the entry itself (a forged future first_at would
                    // keep a job out of max_age for ever).
                    if let Some(t) = std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.parse::<i64>().ok())
                    {
                        entry.first_at = t.min(entry.first_at);
                    }
                }
                _ => {}
            }
        }
        entry
    }
}

/// Now, in ms since the epoch, by the Redis server's clock (see `store::clock`).
pub fn now_ms() -> i64 {
    crate::store::clock::now_ms()
}

#[cfg(test)]
mod tests {
    use super::consumer::StreamEntry;
    use super::*;

    #[test]
    fn an_entry_drops_the_reason_it_waited_for() {
        let f = |attempt: &str| {
            let fields = [
                Value::BulkString(b"job".to_vec()),
                Value::BulkString(b"{}".to_vec()),
                Value::BulkString(b"attempt".to_vec()),
                Value::BulkString(attempt.as_bytes().to_vec()),
            ];
            let e = Entry::from_fields("5-0".into(), &fields);
            (e.attempt, e.source)
        };
        assert_eq!(f("3@ip-a#r"), (3, Some("ip-a".to_string())));
        assert_eq!(f("2#p"), (2, None));
        assert_eq!(f("1@ip-b"), (1, Some("ip-b".to_string())));
    }
}

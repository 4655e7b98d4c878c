//! Redis: the sends stream and its consumer group (intake), the delayed set (retries and
//! `send_at`), the events and dead-letter streams, idempotency records and stats.
//!
//! Redis is the only state. Every key lives under `{prefix}`:
//!
//! | key | type | what |
//! |---|---|---|
//! | `sends` | stream | jobs (`job`; retries also carry `attempt`, `first_at`) |
//! | `events` | stream | one JSON `event` per entry |
//! | `dead` | stream | `job` as received, `error` |
//! | `scheduled` | sorted set | delayed jobs by due time (ms) |
//! | `idem:{id}` | string | `p:{entry}` in progress, `s` scheduled, `d` done |
//! | `stats:{campaign}` | hash | counters per outcome |
//! | `campaigns` | set | campaign codes seen |
//! | `suppressed` | hash | lower-cased address → reason |
//! | `optouts` | hash | lower-cased address → when the recipient opted out (unix ms) |
//! | `r:{address}` | hash | recent sends (`s`, for frequency caps), `last_open`, `last_click` |
//! | `links:{campaign}` | hash | clicks per named link, total and `:unique` |
//! | `uniq:{o,c,l}:…` | HyperLogLog | sends that opened / clicked (a link), for unique counts |
//! | `timers`, `timers:cancelled` | sorted set | workflow not_opened / not_clicked timers |
//! | `webhooks` | sorted set | workflow webhooks waiting for their next attempt |
//! | `wfjob:{id}`, `wf:{rule}:{id}` | string | a sent job kept for follow-ups; a fired rule |

pub mod events;
pub mod intake;
pub mod leases;
pub mod recorder;
pub mod scheduler;

use redis::Value;

/// Key names, built once.
#[derive(Debug, Clone)]
pub struct Keys {
    pub prefix: String,
    pub sends: String,
    pub events: String,
    pub dead: String,
    pub scheduled: String,
    pub campaigns: String,
    pub suppressed: String,
    /// Recipients' own opt-outs (address → unix ms), kept apart from the suppression list.
    pub optouts: String,
    /// `XADD … MAXLEN ~` of every event (`[events] max_len`).
    pub events_max_len: u64,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_string(),
            sends: format!("{prefix}sends"),
            events: format!("{prefix}events"),
            dead: format!("{prefix}dead"),
            scheduled: format!("{prefix}scheduled"),
            campaigns: format!("{prefix}campaigns"),
            suppressed: format!("{prefix}suppressed"),
            optouts: format!("{prefix}optouts"),
            events_max_len: crate::config::EventSettings::default().max_len,
        }
    }

    /// The same keys, with the configured retention of the events stream.
    pub fn retaining(mut self, events: &crate::config::EventSettings) -> Self {
        self.events_max_len = events.max_len;
        self
    }

    pub fn idem(&self, id: &str) -> String {
        let mut k = String::with_capacity(self.prefix.len() + 5 + id.len());
        k.push_str(&self.prefix);
        k.push_str("idem:");
        k.push_str(id);
        k
    }

    pub fn stats(&self, campaign: &str) -> String {
        format!("{}stats:{campaign}", self.prefix)
    }
}

/// One entry of the sends stream.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: String,
    pub job: Vec<u8>,
    /// Delivery attempts already made (0 for a fresh job).
    pub attempt: u32,
    /// When the job first entered the system (ms); from the entry id for fresh jobs.
    pub first_at: i64,
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

fn bytes(v: &Value) -> Option<&[u8]> {
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

/// Parses `[id, [field, value, …]]` pairs; entries without fields (deleted) are skipped but
/// their ids are returned in `gone` so they can be acknowledged.
pub fn parse_entries(list: &Value, out: &mut Vec<Entry>, gone: &mut Vec<String>) {
    for e in items(list) {
        let parts = items(e);
        let Some(id) = parts.first().and_then(bytes) else {
            continue;
        };
        let id = String::from_utf8_lossy(id).into_owned();
        let fields = parts.get(1).map(items).unwrap_or(&[]);
        if fields.is_empty() {
            gone.push(id);
            continue;
        }
        let mut entry = Entry {
            first_at: Entry::id_millis(&id),
            id,
            job: Vec::new(),
            attempt: 0,
        };
        for kv in fields.chunks(2) {
            let (Some(k), Some(v)) = (kv.first().and_then(bytes), kv.get(1).and_then(bytes)) else {
                continue;
            };
            match k {
                b"job" => entry.job = v.to_vec(),
                b"attempt" => {
                    entry.attempt = std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0)
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
        out.push(entry);
    }
}

/// Entries of an XREADGROUP reply (RESP2 array or RESP3 map form).
pub fn parse_xread(reply: &Value, out: &mut Vec<Entry>, gone: &mut Vec<String>) {
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

/// XAUTOCLAIM reply: `[next-cursor, [entries], [deleted ids]]`.
pub fn parse_autoclaim(reply: &Value, out: &mut Vec<Entry>, gone: &mut Vec<String>) -> String {
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

/// `XREADGROUP GROUP group consumer COUNT batch BLOCK block_ms STREAMS stream >`: new
/// entries for this consumer.
pub fn read_group(
    stream: &str,
    group: &str,
    consumer: &str,
    batch: usize,
    block_ms: u64,
) -> redis::Cmd {
    let mut c = redis::cmd("XREADGROUP");
    c.arg("GROUP")
        .arg(group)
        .arg(consumer)
        .arg("COUNT")
        .arg(batch)
        .arg("BLOCK")
        .arg(block_ms)
        .arg("STREAMS")
        .arg(stream)
        .arg(">");
    c
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

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

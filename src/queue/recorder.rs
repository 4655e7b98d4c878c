//! The single writer of outcomes: collects records from intake and workers and writes them
//! per batch in one MULTI/EXEC: events, dead letters, delayed jobs, idempotency records,
//! stats, then XACK + XDEL of the stream entries. A job's entry is acknowledged in the same
//! transaction that makes its outcome durable, never before.
//!
//! Each transaction also sets a marker key of its own. When the reply to EXEC is lost (the
//! connection broke or timed out after the server read EXEC), the marker tells whether the
//! batch was written; only a batch that was not is written again, so a lost reply never
//! duplicates events, dead letters or stats.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::mpsc;

use super::leases::Leases;
use super::Keys;
use crate::metrics::Metrics;

/// Idempotency states written when a job leaves a daemon's hands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdemState {
    /// Ended: a later job with the same id is a duplicate.
    Done,
    /// Waiting in the delayed set.
    Scheduled,
}

/// Everything one job's outcome writes.
#[derive(Debug, Default)]
pub struct Record {
    /// Stream entry to acknowledge and delete.
    pub ack: Option<String>,
    /// Event JSON for `{prefix}events`.
    pub event: Option<String>,
    /// Job id whose idempotency record is updated.
    pub idem: Option<(String, Option<IdemState>)>,
    /// `(due ms, member)` for the delayed set.
    pub schedule: Option<(i64, String)>,
    /// `(job as received, error)` for `{prefix}dead`.
    pub dead: Option<(Vec<u8>, String)>,
    /// `(address, reason)` to add to the suppression list (kept if already there).
    pub suppress: Option<(String, &'static str)>,
    /// `(campaign, outcome)` for stats and metrics; `first` counts the job as accepted.
    pub stat: Option<(String, &'static str)>,
    pub first: bool,
    /// `(key, value, ttl secs)` to SET with the outcome (a delivered job's JSON, kept for
    /// workflow follow-ups).
    pub store: Option<(String, Vec<u8>, u64)>,
}

#[derive(Clone)]
pub struct RecorderHandle {
    tx: mpsc::Sender<Record>,
}

impl RecorderHandle {
    /// Queues a record; waits when the writer is behind (back-pressure up the pipeline).
    pub async fn send(&self, r: Record) {
        if self.tx.send(r).await.is_err() {
            tracing::error!("recorder stopped; record not written (its stream entry stays pending and will be reclaimed)");
        }
    }
}

pub struct Recorder {
    rx: mpsc::Receiver<Record>,
    conn: ConnectionManager,
    keys: Keys,
    group: String,
    idem_ttl: u64,
    batch: usize,
    metrics: Arc<Metrics>,
    leases: Arc<Leases>,
    /// `{prefix}written:{random}:`: the marker keys of this recorder's transactions.
    marker_base: String,
    seq: u64,
    /// The marker of the last batch written, deleted by the next transaction.
    last_marker: Option<String>,
}

/// How long a batch marker outlives a daemon that stopped before deleting it.
const MARKER_TTL_SECS: u64 = 24 * 3600;

impl Recorder {
    pub fn new(
        conn: ConnectionManager,
        keys: Keys,
        group: String,
        idem_ttl: Duration,
        batch: usize,
        metrics: Arc<Metrics>,
        leases: Arc<Leases>,
    ) -> (Self, RecorderHandle) {
        let (tx, rx) = mpsc::channel(batch * 2);
        let marker_base = format!("{}written:{:016x}:", keys.prefix, rand::random::<u64>());
        (
            Recorder {
                rx,
                conn,
                keys,
                group,
                idem_ttl: idem_ttl.as_secs().max(1),
                batch,
                metrics,
                leases,
                marker_base,
                seq: 0,
                last_marker: None,
            },
            RecorderHandle { tx },
        )
    }

    /// Runs until every handle is dropped and the queue is drained.
    pub async fn run(mut self) {
        let mut buf = Vec::with_capacity(self.batch);
        loop {
            buf.clear();
            if self.rx.recv_many(&mut buf, self.batch).await == 0 {
                return;
            }
            self.metrics.event_batch.observe(buf.len() as f64);
            self.seq += 1;
            let marker = format!("{}{}", self.marker_base, self.seq);
            let mut delay = Duration::from_millis(50);
            loop {
                let Err(e) = self.flush(&buf, &marker).await else {
                    break;
                };
                self.metrics.redis_errors.inc();
                // An error reply inside EXEC (a key of the wrong type, written by another
                // tool) fails that command alone: the rest of the batch is written, and
                // writing it again would count it twice.
                let refused = !(e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal());
                if refused {
                    tracing::error!(error = %e, records = buf.len(), "Redis refused part of an outcome batch");
                } else {
                    tracing::warn!(error = %e, records = buf.len(), "writing outcomes failed; checking whether they were written");
                }
                // Written or not: asked until Redis answers.
                let written = loop {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                    match self.written(&marker).await {
                        Ok(w) => break w,
                        Err(e) => {
                            self.metrics.redis_errors.inc();
                            tracing::warn!(error = %e, "Redis still unavailable");
                        }
                    }
                };
                if written {
                    if !refused {
                        tracing::info!(
                            records = buf.len(),
                            "the outcomes had been written; only the reply was lost"
                        );
                    }
                    break;
                }
            }
            self.last_marker = Some(marker);
            self.leases
                .release(buf.iter().filter_map(|r| r.ack.as_deref()));
            for r in &buf {
                if let Some((campaign, outcome)) = &r.stat {
                    self.metrics
                        .messages
                        .with_label_values(&[campaign.as_str(), outcome])
                        .inc();
                }
            }
        }
    }

    /// Whether the transaction that set `marker` was executed.
    async fn written(&mut self, marker: &str) -> redis::RedisResult<bool> {
        redis::cmd("EXISTS")
            .arg(marker)
            .query_async(&mut self.conn)
            .await
    }

    async fn flush(&mut self, records: &[Record], marker: &str) -> redis::RedisResult<()> {
        let k = &self.keys;
        let mut p = redis::pipe();
        p.atomic();
        p.cmd("SET")
            .arg(marker)
            .arg(1)
            .arg("EX")
            .arg(MARKER_TTL_SECS)
            .ignore();
        if let Some(last) = &self.last_marker {
            p.cmd("DEL").arg(last).ignore();
        }
        let mut acks: Vec<&str> = Vec::with_capacity(records.len());
        let mut stats: HashMap<(&str, &str), i64> = HashMap::new();
        for r in records {
            if let Some(ev) = &r.event {
                p.cmd("XADD")
                    .arg(&k.events)
                    .arg("*")
                    .arg("event")
                    .arg(ev)
                    .ignore();
            }
            if let Some((job, error)) = &r.dead {
                p.cmd("XADD")
                    .arg(&k.dead)
                    .arg("*")
                    .arg("job")
                    .arg(job)
                    .arg("error")
                    .arg(error)
                    .ignore();
            }
            if let Some((due, member)) = &r.schedule {
                p.cmd("ZADD")
                    .arg(&k.scheduled)
                    .arg(*due)
                    .arg(member)
                    .ignore();
            }
            if let Some((id, state)) = &r.idem {
                match state {
                    Some(IdemState::Done) => {
                        p.cmd("SET")
                            .arg(k.idem(id))
                            .arg("d")
                            .arg("EX")
                            .arg(self.idem_ttl)
                            .ignore();
                    }
                    Some(IdemState::Scheduled) => {
                        // Kept at least until the job is due (send_at or a retry may be further
                        // off than the TTL), so a re-enqueue meanwhile is still a duplicate.
                        let until_due = r
                            .schedule
                            .as_ref()
                            .map_or(0, |(due, _)| (due - super::now_ms()).max(0) as u64 / 1000);
                        p.cmd("SET")
                            .arg(k.idem(id))
                            .arg("s")
                            .arg("EX")
                            .arg(self.idem_ttl + until_due)
                            .ignore();
                    }
                    None => {
                        p.cmd("DEL").arg(k.idem(id)).ignore();
                    }
                }
            }
            if let Some((key, value, ttl)) = &r.store {
                p.cmd("SET")
                    .arg(key)
                    .arg(value)
                    .arg("EX")
                    .arg(*ttl)
                    .ignore();
            }
            if let Some((addr, reason)) = &r.suppress {
                p.cmd("HSETNX")
                    .arg(&k.suppressed)
                    .arg(crate::policy::suppression::field(addr))
                    .arg(*reason)
                    .ignore();
            }
            if let Some((campaign, outcome)) = &r.stat {
                *stats.entry((campaign.as_str(), outcome)).or_default() += 1;
                if r.first {
                    *stats.entry((campaign.as_str(), "accepted")).or_default() += 1;
                }
            }
            if let Some(id) = &r.ack {
                acks.push(id);
            }
        }
        let mut campaigns: Vec<&str> = Vec::new();
        for ((campaign, field), n) in &stats {
            p.cmd("HINCRBY")
                .arg(k.stats(campaign))
                .arg(*field)
                .arg(*n)
                .ignore();
            if !campaigns.contains(campaign) {
                campaigns.push(campaign);
            }
        }
        if !campaigns.is_empty() {
            p.cmd("SADD").arg(&k.campaigns).arg(&campaigns).ignore();
        }
        if !acks.is_empty() {
            p.cmd("XACK")
                .arg(&k.sends)
                .arg(&self.group)
                .arg(&acks)
                .ignore();
            p.cmd("XDEL").arg(&k.sends).arg(&acks).ignore();
        }
        p.query_async::<()>(&mut self.conn).await
    }
}

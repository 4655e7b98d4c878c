//! The single writer of outcomes: collects records from intake and workers and writes them
//! per batch in one MULTI/EXEC: events, dead letters, delayed jobs, idempotency records,
//! stats, then XACK + XDEL of the stream entries. A job's entry is acknowledged in the same
//! transaction that makes its outcome durable, never before.
//!
//! The write is fenced: a daemon frozen longer than `claim_idle` (a VM pause, a stall, a
//! partition) has had its entries reclaimed by another daemon, which sends them again and
//! writes their outcome. Its own outcome for them, written on waking, would end those jobs a
//! second time. So the recorder writes on a connection of its own, `WATCH`es its fence key
//! (`{sends}:fence:{consumer}`, bumped by every reclaim that takes an entry from it), checks
//! which entries of the batch it still holds (`held.lua`), and drops the records of the
//! rest (counted in `paloma_outcomes_fenced_total`); a reclaim between the check and `EXEC`
//! aborts the transaction, and the check runs again.
//!
//! Each transaction also sets a marker key of its own. When the reply to EXEC is lost (the
//! connection broke or timed out after the server read EXEC), the marker tells whether the
//! batch was written; only a batch that was not is written again, so a lost reply never
//! duplicates events, dead letters or stats.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

pub use super::next::{Park, Record, Schedule};
use crate::metrics::Metrics;
use crate::queue::leases::Leases;
use crate::queue::Keys;
use crate::store::RedisConn;

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
    /// This recorder's own connection: `WATCH` is per connection, and a shared one would
    /// let another task's `EXEC` clear it.
    conn: RedisConn,
    keys: Keys,
    group: String,
    consumer: String,
    /// `{sends}:fence:{consumer}`, watched by every transaction.
    fence: String,
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

/// A job back to the delayed set, inside the outcome transaction. If Redis refuses the ZADD
/// (a key of the wrong type, written by another tool), the job ends here instead of being
/// lost with its acknowledged entry: dead letter, `dead` event, idempotency record deleted
/// (it may be enqueued again), counted dead. Sent whole (EVAL): a NOSCRIPT inside MULTI
/// would abort the batch.
const SCHEDULE_OR_DEAD: &str = include_str!("scripts/schedule_or_dead.lua");
/// Outcomes per recipient domain, in a bounded hash per campaign.
const DOMAINS: &str = include_str!("scripts/domains.lua");
/// Fields (domain × outcome) a campaign's per-domain hash holds at most.
const MAX_DOMAIN_FIELDS: usize = 600;

/// How long a batch marker outlives a daemon that stopped before deleting it.
const MARKER_TTL_SECS: u64 = 24 * 3600;

impl Recorder {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        conn: RedisConn,
        keys: Keys,
        group: String,
        consumer: String,
        idem_ttl: Duration,
        batch: usize,
        metrics: Arc<Metrics>,
        leases: Arc<Leases>,
    ) -> (Self, RecorderHandle) {
        let (tx, rx) = mpsc::channel(batch * 2);
        let marker_base = keys.written(rand::random::<u64>());
        (
            Recorder {
                rx,
                conn,
                fence: format!("{}:fence:{consumer}", keys.sends),
                keys,
                group,
                consumer,
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
            let mut backoff = crate::retry::Backoff::writes();
            loop {
                if let Err(e) = self.fence(&mut buf).await {
                    self.metrics.redis_errors.inc();
                    tracing::warn!(error = %e, records = buf.len(), "checking which entries this daemon holds failed; trying again");
                    tokio::time::sleep(backoff.fail()).await;
                    continue;
                }
                let (result, ops) = self.flush(&buf, &marker).await;
                let e = match result {
                    Ok(Some(replies)) => {
                        self.report_dead_schedules(&buf, &replies);
                        break;
                    }
                    // The fence moved between the check and EXEC (another daemon reclaimed
                    // entries from this one): nothing was written; check again.
                    Ok(None) => continue,
                    Err(e) => e,
                };
                self.metrics.redis_errors.inc();
                // An error reply inside EXEC (a key of the wrong type, written by another
                // tool) fails that command alone: the rest of the batch is written, and
                // writing it again would count it twice.
                let refused = !(e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal());
                tracing::warn!(error = %e, records = buf.len(), "writing outcomes failed; checking whether they were written");
                // Written or not: asked until Redis answers.
                let written = loop {
                    tokio::time::sleep(backoff.fail()).await;
                    match self.written(&marker).await {
                        Ok(w) => break w,
                        Err(e) => {
                            self.metrics.redis_errors.inc();
                            tracing::warn!(error = %e, "Redis still unavailable");
                        }
                    }
                };
                if written {
                    if refused {
                        self.refused(&buf, &ops, e).await;
                    } else {
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
                        .with_label_values(&[campaign.as_str(), outcome.as_str()])
                        .inc();
                    if let Some(v) = &r.variant {
                        self.metrics
                            .experiment_messages
                            .with_label_values(&[campaign.as_str(), v.as_str(), outcome.as_str()])
                            .inc();
                    }
                }
            }
        }
    }

    /// Watches this consumer's fence, then drops from `records` those whose stream entry it
    /// no longer holds (another daemon reclaimed it while this one was stopped): their jobs
    /// end with that daemon's outcome, not a second one from here.
    async fn fence(&mut self, records: &mut Vec<Record>) -> redis::RedisResult<()> {
        let ids: Vec<&str> = records.iter().filter_map(|r| r.ack.as_deref()).collect();
        if ids.is_empty() {
            return Ok(());
        }
        // WATCH and the check in one round trip (a pipeline, not a transaction).
        let (held,): (Vec<u8>,) = redis::pipe()
            .cmd("WATCH")
            .arg(&self.fence)
            .ignore()
            .cmd("EVAL")
            .arg(crate::queue::leases::HELD)
            .arg(1)
            .arg(&self.keys.sends)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("check")
            .arg(&ids)
            .query_async(&mut self.conn)
            .await?;
        if held.iter().all(|&h| h == 1) {
            return Ok(());
        }
        let lost: std::collections::HashSet<String> = ids
            .iter()
            .zip(&held)
            .filter(|(_, &h)| h != 1)
            .map(|(id, _)| id.to_string())
            .collect();
        records.retain(|r| r.ack.as_ref().is_none_or(|id| !lost.contains(id)));
        self.leases.release(lost.iter().map(String::as_str));
        self.metrics.outcomes_fenced.inc_by(lost.len() as u64);
        tracing::warn!(
            records = lost.len(),
            "outcomes dropped: their entries were reclaimed by another daemon while this one was stopped longer than intake.claim_idle; that daemon ends those jobs"
        );
        Ok(())
    }

    /// Whether the transaction that set `marker` was executed.
    async fn written(&mut self, marker: &str) -> redis::RedisResult<bool> {
        redis::cmd("EXISTS")
            .arg(marker)
            .query_async(&mut self.conn)
            .await
    }

    /// Writes the batch in one transaction. Also returns what each command of the
    /// transaction writes, by position, to name what a refusal inside it lost.
    async fn flush(
        &mut self,
        records: &[Record],
        marker: &str,
    ) -> (
        redis::RedisResult<Option<Vec<redis::Value>>>,
        Vec<(usize, Op)>,
    ) {
        let k = &self.keys;
        let mut p = redis::pipe();
        p.atomic();
        let mut ops: Vec<(usize, Op)> = Vec::with_capacity(records.len() * 4 + 8);
        p.cmd("SET")
            .arg(marker)
            .arg(1)
            .arg("EX")
            .arg(MARKER_TTL_SECS)
            .ignore();
        ops.push((0, Op::Other));
        if let Some(last) = &self.last_marker {
            p.cmd("DEL").arg(last).ignore();
            ops.push((0, Op::Other));
        }
        let now_at = crate::queue::events::rfc3339_ms(crate::queue::now_ms());
        let mut acks: Vec<&str> = Vec::with_capacity(records.len());
        let mut value = String::new();
        let mut stats: HashMap<(&str, &str), i64> = HashMap::new();
        // (campaign, per-variant or per-touch, variant or bucket, outcome) → count; the hash
        // keys are built once per group, not per record.
        let mut vstats: HashMap<(&str, bool, &str, &str), i64> = HashMap::new();
        // The recipients' hashes of the delivered marketing messages, counted in one call.
        let mut touched: Vec<String> = Vec::new();
        // campaign → (domain, outcome) → count.
        let mut dstats: HashMap<&str, HashMap<(&str, &str), i64>> = HashMap::new();
        for (i, r) in records.iter().enumerate() {
            if let Some(ev) = &r.event {
                p.cmd("XADD")
                    .arg(&k.events)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(k.events_max_len)
                    .arg("*")
                    .arg("event")
                    .arg(ev)
                    .ignore();
                ops.push((i, Op::Event));
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
                ops.push((i, Op::Dead));
            }
            if let Some((id, state)) = &r.idem {
                match state {
                    Some(state) => {
                        // A scheduled record is kept at least until the job is due (send_at or
                        // a retry may be further off than the TTL), so a re-enqueue meanwhile
                        // is still a duplicate.
                        let until_due = r
                            .schedule
                            .as_ref()
                            .map_or(0, |s| (s.due - crate::queue::now_ms()).max(0) as u64 / 1000);
                        state.encode(&mut value);
                        p.cmd("SET")
                            .arg(k.idem(id))
                            .arg(&value)
                            .arg("EX")
                            .arg(self.idem_ttl + until_due)
                            .ignore();
                    }
                    None => {
                        p.cmd("DEL").arg(k.idem(id)).ignore();
                    }
                }
                ops.push((i, Op::Other));
            }
            if let Some(s) = &r.schedule {
                // `attempt|first_at|job`: a dead letter carries the job as received.
                let job = s.member.splitn(3, '|').nth(2).unwrap_or(&s.member);
                let idem = r
                    .idem
                    .as_ref()
                    .map_or_else(|| k.idem(""), |(id, _)| k.idem(id));
                p.cmd("EVAL")
                    .arg(SCHEDULE_OR_DEAD)
                    .arg(6)
                    .arg(&k.scheduled)
                    .arg(&k.dead)
                    .arg(&k.events)
                    .arg(idem)
                    .arg(&k.campaigns)
                    .arg(k.stats(&s.campaign))
                    .arg(s.due)
                    .arg(&s.member)
                    .arg(job)
                    .arg(&now_at)
                    .arg(&s.campaign)
                    .arg(if r.stat.is_some() { "1" } else { "0" })
                    .arg(k.events_max_len);
                ops.push((i, Op::Schedule));
            }
            if let Some(park) = &r.park {
                let set = if park.held {
                    k.held(&park.campaign)
                } else {
                    k.parked(&park.campaign)
                };
                p.cmd("ZADD")
                    .arg(set)
                    .arg(park.at)
                    .arg(&park.member)
                    .ignore();
                ops.push((i, Op::Other));
            }
            if let Some((key, value, ttl)) = &r.store {
                p.cmd("SET")
                    .arg(key)
                    .arg(value)
                    .arg("EX")
                    .arg(*ttl)
                    .ignore();
                ops.push((i, Op::Other));
            }
            if let Some((addr, reason)) = &r.suppress {
                p.cmd("HSETNX")
                    .arg(&k.suppressed)
                    .arg(crate::policy::suppression::field(addr))
                    .arg(*reason)
                    .ignore();
                ops.push((i, Op::Other));
            }
            if let Some((campaign, outcome)) = &r.stat {
                *stats
                    .entry((campaign.as_str(), outcome.as_str()))
                    .or_default() += 1;
                if r.first {
                    *stats.entry((campaign.as_str(), "accepted")).or_default() += 1;
                }
                if let Some(extra) = r.stat_extra {
                    *stats.entry((campaign.as_str(), extra)).or_default() += 1;
                }
                let groups = [
                    r.variant.as_deref().map(|v| (false, v)),
                    r.touch.map(|t| (true, t)),
                ];
                for (touch, name) in groups.into_iter().flatten() {
                    *vstats
                        .entry((campaign.as_str(), touch, name, outcome.as_str()))
                        .or_default() += 1;
                    if r.first {
                        *vstats
                            .entry((campaign.as_str(), touch, name, "accepted"))
                            .or_default() += 1;
                    }
                }
                if let Some(d) = &r.domain {
                    *dstats
                        .entry(campaign.as_str())
                        .or_default()
                        .entry((d.as_str(), outcome.as_str()))
                        .or_default() += 1;
                }
            }
            if let Some(addr) = &r.touched {
                touched.push(k.recipient(&crate::policy::suppression::field(addr)));
            }
            if let Some(id) = &r.ack {
                acks.push(id);
            }
        }
        if !touched.is_empty() {
            p.cmd("EVAL")
                .arg(crate::policy::touches::COUNT)
                .arg(touched.len())
                .arg(&touched)
                .arg(crate::policy::touches::month_field(chrono::Utc::now()))
                .arg(crate::policy::touches::KEEP_SECS)
                .ignore();
            ops.push((0, Op::Other));
        }
        for (campaign, counts) in &dstats {
            p.cmd("EVAL")
                .arg(DOMAINS)
                .arg(1)
                .arg(k.domains(campaign))
                .arg(MAX_DOMAIN_FIELDS);
            for ((domain, outcome), n) in counts {
                p.arg(*domain).arg(*outcome).arg(*n);
            }
            p.ignore();
            ops.push((0, Op::Other));
        }
        for ((campaign, touch, name, outcome), n) in &vstats {
            let hash = if *touch {
                k.touches(campaign)
            } else {
                k.variants(campaign)
            };
            p.cmd("HINCRBY")
                .arg(hash)
                .arg(format!("{name}:{outcome}"))
                .arg(*n)
                .ignore();
            ops.push((0, Op::Other));
        }
        let mut campaigns: Vec<&str> = Vec::new();
        for ((campaign, field), n) in &stats {
            p.cmd("HINCRBY")
                .arg(k.stats(campaign))
                .arg(*field)
                .arg(*n)
                .ignore();
            ops.push((0, Op::Other));
            if !campaigns.contains(campaign) {
                campaigns.push(campaign);
            }
        }
        if !campaigns.is_empty() {
            p.cmd("SADD").arg(&k.campaigns).arg(&campaigns).ignore();
            ops.push((0, Op::Other));
            // When each last had an outcome: the guards read only recent ones.
            let now = crate::queue::now_ms();
            p.cmd("ZADD").arg(&k.campaigns_active);
            for c in &campaigns {
                p.arg(now).arg(*c);
            }
            p.ignore();
            ops.push((0, Op::Other));
        }
        if !acks.is_empty() {
            p.cmd("XACK")
                .arg(&k.sends)
                .arg(&self.group)
                .arg(&acks)
                .ignore();
            p.cmd("XDEL").arg(&k.sends).arg(&acks).ignore();
            ops.push((0, Op::Other));
            ops.push((0, Op::Other));
        }
        // The replies of the commands not ignored: one per job sent back to the delayed set;
        // None when the watched fence moved and EXEC did nothing.
        (p.query_async(&mut self.conn).await, ops)
    }

    /// Jobs the transaction could not put back in the delayed set, which it dead-lettered.
    fn report_dead_schedules(&self, records: &[Record], replies: &[redis::Value]) {
        let scheduled = records.iter().filter_map(|r| r.schedule.as_ref());
        for (
            Schedule {
                member, campaign, ..
            },
            reply,
        ) in scheduled.zip(replies)
        {
            let reason = match reply {
                redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                redis::Value::SimpleString(s) => s.clone(),
                _ => continue,
            };
            let job = member.splitn(3, '|').nth(2).unwrap_or(member);
            tracing::error!(%reason, job, "a job Redis refused to put back in the delayed set went to the dead letters");
            self.metrics
                .messages
                .with_label_values(&[campaign.as_str(), "dead"])
                .inc();
        }
    }

    /// Commands Redis refused inside a transaction that otherwise ran: what each lost is
    /// logged (a refused return to the delayed set is handled inside the transaction, by
    /// [`SCHEDULE_OR_DEAD`]).
    async fn refused(&mut self, records: &[Record], ops: &[(usize, Op)], e: redis::RedisError) {
        let text = e.to_string();
        // The marker exists, but this attempt's transaction did not run (an earlier attempt
        // did): nothing to attribute.
        if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ExecAbort) {
            tracing::info!(error = %text, records = records.len(), "the outcomes had been written by an earlier attempt");
            return;
        }
        let Some(errors) = e.into_server_errors() else {
            tracing::error!(error = %text, "Redis refused part of an outcome batch");
            return;
        };
        // Index 0 is the marker's SET, which cannot fail by itself: an error there is about
        // the whole request, not one command.
        if errors.iter().any(|(i, _)| *i == 0) {
            tracing::warn!(error = %text, records = records.len(), "the outcomes had been written; the request's reply was an error");
            return;
        }
        for (index, err) in errors.iter() {
            let err = err.to_string();
            let Some(&(r, op)) = ops.get(*index) else {
                tracing::error!(error = %err, "Redis refused part of an outcome batch");
                continue;
            };
            let record = &records[r];
            match op {
                Op::Event => {
                    tracing::error!(error = %err, event = record.event.as_deref().unwrap_or_default(), "event not written: Redis refused it")
                }
                Op::Dead => {
                    tracing::error!(error = %err, job = %String::from_utf8_lossy(record.dead.as_ref().map_or(&[][..], |d| &d.0)), "dead letter not written: Redis refused it")
                }
                Op::Schedule => {
                    let member = record.schedule.as_ref().map_or("", |s| s.member.as_str());
                    tracing::error!(error = %err, job = member, "a job's return to the delayed set failed (script error)")
                }
                Op::Other => {
                    tracing::error!(error = %err, "Redis refused part of an outcome batch")
                }
            }
        }
    }
}

/// What one command of an outcome transaction writes (for [`Recorder::refused`]).
#[derive(Debug, Clone, Copy)]
enum Op {
    Event,
    Dead,
    Schedule,
    Other,
}

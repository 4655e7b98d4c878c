//! The tracking events' writer: one task takes the queued opens and clicks and stores them
//! per batch (one script call, one round trip), retrying while Redis fails and sending a
//! batch Redis keeps refusing to the dead letters.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::queue::Keys;
use crate::store::RedisConn;

/// Events per script call.
const EVENT_BATCH: usize = 256;

/// Writes a batch of tracking events, skipping recipients who opted out, and keeps the
/// counters that `paloma stats` reads: per campaign `opened`/`clicked` (people, not
/// machines), `unique_opened`/`unique_clicked` (one per send, counted with a HyperLogLog per
/// campaign so millions of sends cost kilobytes), `*_machine` for scanner hits; per link
/// totals and uniques in `links:{campaign}`; and the recipient's `last_open`/`last_click`
/// in `r:{address}`, with `last_human_click` (what conversions by address attribute to).
/// Keys and arguments: see the script. Returns a code per event: 0 not recorded (opted
/// out), 1 recorded, 2 recorded and the first by a person for that send.
const WRITE_EVENTS: &str = include_str!("../scripts/write_events.lua");

/// How often Redis may refuse a batch of tracking events (answer with an error, as against
/// not answering) before the batch goes to the dead letters with the reason, rather than
/// being retried for ever behind every click that follows.
const REFUSALS: u32 = 5;

pub(super) struct Pending {
    /// A person's click on a marketing message: the recipient's new `last_human_click`
    /// ([`crate::track::clickid::LastClick`]); "" otherwise.
    pub(super) last_click: String,
    pub(super) to: String,
    pub(super) event: String,
    /// `o` or `c`.
    pub(super) kind: &'static str,
    pub(super) id: String,
    pub(super) campaign: String,
    pub(super) link: String,
    pub(super) machine: bool,
    /// The job's experiment variant ("" when none).
    pub(super) variant: String,
    /// The job's touch bucket ("" when none).
    pub(super) touch: String,
}

pub(super) async fn write_events(
    mut rx: mpsc::Receiver<Pending>,
    mut redis: RedisConn,
    keys: Keys,
    metrics: Arc<Metrics>,
) {
    let script = redis::Script::new(WRITE_EVENTS);
    let mut buf = Vec::with_capacity(EVENT_BATCH);
    while rx.recv_many(&mut buf, EVENT_BATCH).await > 0 {
        let mut inv = script.key(&keys.suppressed);
        inv.key(&keys.events)
            .key(&keys.dead)
            .arg(crate::queue::now_ms() / 1000)
            .arg(keys.events_max_len);
        for p in &buf {
            inv.key(keys.stats(&p.campaign))
                .key(keys.unique(p.kind, &p.campaign))
                .key(keys.links(&p.campaign))
                .key(keys.unique_link(&p.campaign, &p.link))
                .key(keys.recipient(&p.to))
                .key(keys.variants(&p.campaign))
                .key(keys.touches(&p.campaign))
                .key(keys.timeline(&p.campaign))
                .arg(&p.to)
                .arg(&p.event)
                .arg(p.kind)
                .arg(&p.id)
                .arg(&p.link)
                .arg(if p.machine { "1" } else { "0" })
                .arg(&p.variant)
                .arg(&p.touch)
                .arg(&p.last_click);
        }
        let mut backoff = crate::retry::Backoff::writes();
        let mut refusals = 0;
        let codes = loop {
            match inv.invoke_async::<Vec<i64>>(&mut redis).await {
                Ok(c) => break c,
                Err(e) => {
                    metrics.redis_errors.inc();
                    if crate::store::is_refusal(&e) {
                        refusals += 1;
                        if refusals >= REFUSALS {
                            dead_letter_events(&mut redis, &keys, &buf, &e.to_string(), &metrics)
                                .await;
                            break Vec::new();
                        }
                    }
                    tracing::warn!(error = %e, events = buf.len(), "writing tracking events failed; retrying");
                    tokio::time::sleep(backoff.fail()).await;
                }
            }
        };
        let skipped = codes.iter().filter(|c| **c < 0).count();
        if skipped > 0 {
            metrics.tracking_events_dead.inc_by(skipped as u64);
            tracing::warn!(
                events = skipped,
                "tracking events whose Redis keys hold another type went to the dead letters"
            );
        }
        // Engagement metrics per campaign (and per named link), counted per batch from what
        // the script actually recorded.
        for (p, code) in buf.iter().zip(codes) {
            if code <= 0 {
                continue;
            }
            let what = if p.kind == "o" { "opened" } else { "clicked" };
            let who = if p.machine { "machine" } else { "human" };
            metrics
                .engagement
                .with_label_values(&[p.campaign.as_str(), what, who])
                .inc();
            if code == 2 {
                metrics
                    .engagement_unique
                    .with_label_values(&[p.campaign.as_str(), what])
                    .inc();
            }
            if p.kind == "c" && !p.link.is_empty() && !p.machine {
                metrics
                    .link_clicks
                    .with_label_values(&[p.campaign.as_str(), p.link.as_str()])
                    .inc();
            }
        }
        buf.clear();
    }
}

/// A batch Redis keeps refusing goes to `{prefix}dead`, each event with the error (fields
/// `event`, `error`), so that it can be looked at and replayed; if even that fails it is
/// dropped and counted, never retried for ever.
async fn dead_letter_events(
    redis: &mut RedisConn,
    keys: &Keys,
    buf: &[Pending],
    error: &str,
    metrics: &Metrics,
) {
    let mut p = redis::pipe();
    for e in buf {
        p.cmd("XADD")
            .arg(&keys.dead)
            .arg("*")
            .arg("event")
            .arg(&e.event)
            .arg("error")
            .arg(error)
            .ignore();
    }
    tracing::warn!(
        error,
        events = buf.len(),
        "Redis keeps refusing a batch of tracking events; dead-lettered"
    );
    match p.query_async::<()>(redis).await {
        Ok(()) => metrics.tracking_events_dead.inc_by(buf.len() as u64),
        Err(e) => {
            metrics.tracking_events_dropped.inc_by(buf.len() as u64);
            tracing::warn!(error = %e, events = buf.len(), "dead-lettering tracking events failed; dropped");
        }
    }
}

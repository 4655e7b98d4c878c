//! Recording a request's conversions: attribute each, then count each order once, in two
//! round trips whatever the number of conversions (one read of the posted addresses' last
//! human clicks, one acknowledged script call).

use serde_json::{Map, Value};

use super::attribution::{self, Attribution, Unattributed};
use super::{Conversions, Posted};
use crate::metrics::Metrics;
use crate::queue::events::{rfc3339_ms, Event, EventKind};
use crate::queue::Keys;
use crate::store::replication::{AckError, Acks};
use crate::store::RedisConn;
use crate::track::clickid::LastClick;

const RECORD: &str = include_str!("scripts/record.lua");

/// What became of one conversion.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Recorded now (attributed or not): the answer.
    New(Map<String, Value>),
    /// Its id was recorded before: the answer given then; nothing counted again.
    Duplicate(Map<String, Value>),
    /// Not recorded: one of its Redis keys holds another type (another tool wrote there).
    Failed(String),
}

/// The outcomes, in the order posted, and how many of each.
#[derive(Debug, Default)]
pub struct Recorded {
    pub outcomes: Vec<Outcome>,
    pub attributed: usize,
    pub unattributed: usize,
    pub duplicates: usize,
}

/// One conversion's verdict and what the script needs of it.
struct Decided<'a> {
    posted: &'a Posted,
    verdict: Result<Attribution, Unattributed>,
    answer: Map<String, Value>,
}

impl Conversions {
    /// Attributes and records `items` (checked already), each order id once.
    pub async fn record(
        &self,
        conn: &mut RedisConn,
        keys: &Keys,
        acks: &Acks,
        metrics: &Metrics,
        items: &[Posted],
    ) -> Result<Recorded, AckError> {
        // By click id first (no round trip: the id carries the click).
        let mut verdicts: Vec<Result<Attribution, Unattributed>> = items
            .iter()
            .map(|p| match &p.click {
                Some(id) => {
                    let click = self.click_ids.open(id);
                    attribution::by_click(click.as_ref(), p.at / 1000, self.window)
                }
                None => Err(Unattributed::NoClick),
            })
            .collect();
        // Then by address, for those the click did not attribute: one read for them all.
        let lookups: Vec<usize> = (0..items.len())
            .filter(|&i| verdicts[i].is_err() && items[i].to.is_some())
            .collect();
        if !lookups.is_empty() {
            let mut p = redis::pipe();
            // A recipient key of another type (another tool wrote there) is no click, not a
            // failed request.
            p.ignore_errors();
            for &i in &lookups {
                let to = items[i].to.as_deref().unwrap_or_default();
                p.cmd("HGET")
                    .arg(keys.recipient(to))
                    .arg("last_human_click");
            }
            let lasts: Vec<redis::Value> = p.query_async(conn).await.map_err(AckError::Redis)?;
            for (&i, last) in lookups.iter().zip(lasts) {
                let last: Option<String> = redis::from_redis_value(last).unwrap_or(None);
                let last = last.as_deref().and_then(LastClick::decode);
                let to = items[i].to.as_deref().unwrap_or_default();
                let by_to =
                    attribution::by_address(to, last.as_ref(), items[i].at / 1000, self.window);
                // A click id that could not attribute keeps its own reason unless the
                // address does attribute.
                if by_to.is_ok() || items[i].click.is_none() {
                    verdicts[i] = by_to;
                }
            }
        }
        let decided: Vec<Decided> = items
            .iter()
            .zip(verdicts)
            .map(|(posted, verdict)| Decided {
                answer: answer(posted, &verdict),
                posted,
                verdict,
            })
            .collect();
        let replies = self.write(conn, keys, acks, &decided).await?;
        let mut out = Recorded::default();
        for (d, reply) in decided.into_iter().zip(replies) {
            let outcome = if reply.is_empty() {
                match &d.verdict {
                    Ok(a) => {
                        out.attributed += 1;
                        metrics
                            .conversions
                            .with_label_values(&[a.campaign.as_str(), d.posted.kind.as_str()])
                            .inc();
                        if let Some((c, minor)) = d.posted.money {
                            metrics
                                .revenue
                                .with_label_values(&[a.campaign.as_str(), c.as_str()])
                                .inc_by(c.major(minor));
                        }
                    }
                    Err(why) => {
                        out.unattributed += 1;
                        metrics
                            .conversions_unattributed
                            .with_label_values(&[why.as_str()])
                            .inc();
                    }
                }
                Outcome::New(d.answer)
            } else if let Some(why) = reply.strip_prefix('!') {
                Outcome::Failed(why.to_string())
            } else {
                out.duplicates += 1;
                match serde_json::from_str::<Map<String, Value>>(&reply) {
                    Ok(before) => Outcome::Duplicate(before),
                    // Remembered by something else: still never counted twice.
                    Err(_) => Outcome::Duplicate(Map::from_iter([(
                        "id".to_string(),
                        Value::from(d.posted.id.clone()),
                    )])),
                }
            };
            out.outcomes.push(outcome);
        }
        Ok(out)
    }

    /// The script call: each order counted once, acknowledged as `redis.ack_replicas` says.
    async fn write(
        &self,
        conn: &mut RedisConn,
        keys: &Keys,
        acks: &Acks,
        decided: &[Decided<'_>],
    ) -> Result<Vec<String>, AckError> {
        let mut key_names: Vec<String> = Vec::with_capacity(1 + decided.len() * 5);
        key_names.push(keys.events.clone());
        for d in decided {
            let order = keys.order(&d.posted.id);
            match &d.verdict {
                Ok(a) => {
                    let people = keys.converted_people(&a.campaign, None);
                    let vpeople = if a.variant.is_empty() {
                        people.clone()
                    } else {
                        keys.converted_people(&a.campaign, Some(&a.variant))
                    };
                    key_names.extend([
                        order,
                        keys.conversions(&a.campaign),
                        people,
                        vpeople,
                        keys.conversion_stats(&a.campaign),
                    ]);
                }
                Err(_) => {
                    key_names.extend(std::iter::repeat_n(order, 5));
                }
            }
        }
        let names: Vec<&str> = key_names.iter().map(String::as_str).collect();
        let mut cmd = crate::store::replication::eval(RECORD, &names);
        cmd.arg(self.retention).arg(keys.events_max_len);
        for d in decided {
            let stored = serde_json::to_string(&d.answer).expect("answers serialize");
            let p = d.posted;
            let (cur, minor) = p
                .money
                .map_or((String::new(), 0), |(c, m)| (c.as_str().to_string(), m));
            match &d.verdict {
                Ok(a) => {
                    let mut ev = Event::new(EventKind::Converted, &a.job, &a.campaign, &a.to);
                    ev.at = rfc3339_ms(p.at);
                    ev.variant = (!a.variant.is_empty()).then_some(a.variant.as_str());
                    ev.link = Some(a.link.as_str());
                    ev.order = Some(p.id.as_str());
                    ev.conversion_kind = Some(p.kind.as_str());
                    ev.value = p.money.map(|(c, m)| c.major(m));
                    ev.currency = p.money.as_ref().map(|(c, _)| c.as_str());
                    // A revenue experiment's conversion in its currency: per-message sums.
                    let scale = match (p.money, self.revenue_experiments.get(&a.campaign)) {
                        (Some((c, _)), Some(want)) if c == *want && !a.variant.is_empty() => {
                            10i64.pow(c.exponent()).to_string()
                        }
                        _ => String::new(),
                    };
                    cmd.arg("1")
                        .arg(stored)
                        .arg(ev.to_json())
                        .arg(&a.to)
                        .arg(&p.kind)
                        .arg(cur)
                        .arg(minor)
                        .arg(&a.link)
                        .arg(&a.variant)
                        .arg(&a.touch)
                        .arg(&a.job)
                        .arg(scale);
                }
                Err(_) => {
                    cmd.arg("0")
                        .arg(stored)
                        .arg("")
                        .arg("")
                        .arg(&p.kind)
                        .arg(cur)
                        .arg(minor)
                        .arg("")
                        .arg("")
                        .arg("")
                        .arg("")
                        .arg("");
                }
            }
        }
        let mut pipe = redis::pipe();
        pipe.add_command(cmd);
        let mut replies: Vec<Vec<String>> =
            acks.write(conn, &pipe, false, "api_conversions").await?;
        let replies = replies.pop().unwrap_or_default();
        if replies.len() != decided.len() {
            return Err(AckError::Redis(redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "the conversions script answered for another number of conversions",
            ))));
        }
        Ok(replies)
    }
}

/// The answer for one conversion (what a retry of its id gets back).
fn answer(p: &Posted, verdict: &Result<Attribution, Unattributed>) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("id".into(), p.id.clone().into());
    match verdict {
        Ok(a) => {
            m.insert("status".into(), "attributed".into());
            m.insert("by".into(), a.by.into());
            m.insert("campaign".into(), a.campaign.clone().into());
            m.insert("job".into(), a.job.clone().into());
            if !a.variant.is_empty() {
                m.insert("variant".into(), a.variant.clone().into());
            }
            m.insert("link".into(), a.link.clone().into());
            if !a.touch.is_empty() {
                m.insert("touch".into(), a.touch.clone().into());
            }
        }
        Err(why) => {
            m.insert("status".into(), "unattributed".into());
            m.insert("reason".into(), why.as_str().into());
            m.insert("why".into(), why.why().into());
        }
    }
    m.insert("kind".into(), p.kind.clone().into());
    if let Some((c, minor)) = p.money {
        m.insert("value".into(), c.major(minor).into());
        m.insert("currency".into(), c.as_str().into());
    }
    m.insert("at".into(), rfc3339_ms(p.at).into());
    m
}

//! A/B tests (`[[experiments]]`): a campaign's recipients split into a test share, spread
//! evenly across the variants, and the rest, held until a winner is picked.
//!
//! - **Assignment** is a function of the campaign and the recipient's address (SHA-256), so
//!   every daemon, and the same daemon after a restart, gives a recipient the same place. A
//!   job of the test share goes out at once as its variant; any other job is *held* in
//!   `{prefix}held:{campaign}` (like a paused campaign's parked jobs: acknowledged, never
//!   failed or expired; its age counts only from its release).
//! - **The window** starts when a daemon first sees a job of the campaign
//!   (`{prefix}experiment:{c}` field `started`, set once). `decide_after` later, the first
//!   daemon to look judges the per-variant counters ([`judge`]) and records the winner once
//!   (a Lua script: HSETNX, then the `experiment_decided` event), then releases the held jobs;
//!   every daemon that sees the decision releases the set again, so a job a daemon held just
//!   before it knew waits at most one refresh.
//! - **After the decision** a job gets the winner, unless it is a retry of a test job (it
//!   keeps the variant it was first sent as, so that it is counted once, where it belongs).
//!   `paloma experiment pick` decides by hand, early.
//!
//! Every event of a job in an experiment carries `variant`; the recorder counts outcomes per
//! variant in `{prefix}variants:{c}`, and the tracking server people's unique opens and
//! clicks there (variant names come from the config, so metric labels stay bounded).

pub mod judge;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::config::{ExperimentMetric, ExperimentRule};
use crate::job::Job;
use crate::queue::{now_ms, Keys};
use crate::store::RedisConn;

/// How often each daemon looks at its experiments (start, decision).
pub const EVERY: Duration = Duration::from_millis(500);

/// A variant as jobs are sent with it.
#[derive(Debug, Clone)]
pub struct Variant {
    pub name: String,
    pub template: Option<String>,
    /// Its subject's template name in the renderer's plain registry.
    pub subject_key: Option<String>,
}

impl Variant {
    /// Makes `job` go out as this variant.
    pub fn apply(&self, job: &mut Job) {
        job.variant = Some(self.name.clone());
        if let Some(t) = &self.template {
            job.template = t.clone();
        }
        job.subject = self.subject_key.clone();
    }
}

/// Where a job of an experiment's campaign goes.
#[derive(Debug, Clone, Copy)]
pub enum Assign<'a> {
    /// Now, as this variant.
    Send(&'a Variant),
    /// Held until the decision.
    Hold,
}

struct Rule {
    cfg: ExperimentRule,
    variants: Vec<Variant>,
    /// Test share as a fraction of 2^32.
    threshold: u64,
    /// When this daemon first assigned a job of it (ms; 0: not yet).
    first_seen: AtomicI64,
}

/// Every experiment of this daemon, with the decisions it knows of.
#[derive(Default)]
pub struct Experiments {
    rules: HashMap<String, Rule>,
    /// Campaign → winning variant, as read from Redis.
    decided: RwLock<HashMap<String, String>>,
}

/// The template name of a variant's subject in the plain registry.
pub fn subject_key(campaign: &str, variant: &str) -> String {
    format!("experiment/{campaign}/{variant}/subject")
}

/// The recipient's two draws for `campaign`: (test share, variant), each uniform on 2^32.
fn draws(campaign: &str, to: &str) -> (u64, u64) {
    let mut h = Sha256::new();
    h.update(campaign.as_bytes());
    h.update([0]);
    h.update(crate::values::address_key(to).as_bytes());
    let d = h.finalize();
    let a = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as u64;
    let b = u32::from_be_bytes([d[4], d[5], d[6], d[7]]) as u64;
    (a, b)
}

impl Experiments {
    pub fn new(rules: &[ExperimentRule]) -> Experiments {
        let rules = rules
            .iter()
            .map(|r| {
                let variants = r
                    .variants
                    .iter()
                    .map(|v| Variant {
                        name: v.name.clone(),
                        template: v.template.clone(),
                        subject_key: v
                            .subject
                            .as_ref()
                            .map(|_| subject_key(&r.campaign, &v.name)),
                    })
                    .collect();
                let threshold = ((r.test_share.0.clamp(0.0, 1.0)) * (1u64 << 32) as f64) as u64;
                (
                    r.campaign.clone(),
                    Rule {
                        cfg: r.clone(),
                        variants,
                        threshold,
                        first_seen: AtomicI64::new(0),
                    },
                )
            })
            .collect();
        Experiments {
            rules,
            decided: RwLock::default(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Where a job of `campaign` to `to` goes; None when the campaign has no experiment.
    /// `attempt`: a retry (above 0) of a test job keeps its variant after the decision.
    pub fn assign(&self, campaign: &str, to: &str, attempt: u32) -> Option<Assign<'_>> {
        let rule = self.rules.get(campaign)?;
        if rule.first_seen.load(Ordering::Relaxed) == 0 {
            let _ =
                rule.first_seen
                    .compare_exchange(0, now_ms(), Ordering::Relaxed, Ordering::Relaxed);
        }
        let (a, b) = draws(campaign, to);
        let in_test = a < rule.threshold;
        let drawn = &rule.variants[(b % rule.variants.len() as u64) as usize];
        if in_test && attempt > 0 {
            return Some(Assign::Send(drawn));
        }
        let decided = self.decided.read().expect("decided lock");
        if let Some(w) = decided.get(campaign) {
            let winner = rule.variants.iter().find(|v| v.name == *w).unwrap_or(drawn);
            return Some(Assign::Send(winner));
        }
        Some(if in_test {
            Assign::Send(drawn)
        } else {
            Assign::Hold
        })
    }

    /// `(template name, source)` of every variant's subject, for the renderer to register.
    pub fn subjects(rules: &[ExperimentRule]) -> Vec<(String, String)> {
        rules
            .iter()
            .flat_map(|r| {
                r.variants.iter().filter_map(|v| {
                    v.subject
                        .as_ref()
                        .map(|s| (subject_key(&r.campaign, &v.name), s.clone()))
                })
            })
            .collect()
    }

    /// Reads the decisions already recorded.
    pub async fn load(&self, conn: &mut RedisConn, keys: &Keys) -> redis::RedisResult<()> {
        for campaign in self.rules.keys() {
            let w: Option<String> = redis::cmd("HGET")
                .arg(keys.experiment(campaign))
                .arg("winner")
                .query_async(conn)
                .await?;
            if let Some(w) = w {
                self.learn(campaign, w, conn, keys).await?;
            }
        }
        Ok(())
    }

    /// Looks at every experiment every [`EVERY`] until `stop`.
    pub async fn watch(
        self: Arc<Self>,
        mut conn: RedisConn,
        keys: Keys,
        metrics: Arc<crate::metrics::Metrics>,
        stop: watch::Receiver<bool>,
    ) {
        if self.is_empty() {
            return;
        }
        let mut ticker = crate::ticker::Ticker::new(EVERY, stop);
        while ticker.tick().await {
            for (campaign, rule) in &self.rules {
                if self.winner(campaign).is_some() {
                    continue;
                }
                if let Err(e) = self.look(campaign, rule, &mut conn, &keys, &metrics).await {
                    metrics.redis_errors.inc();
                    tracing::debug!(error = %e, campaign = %campaign, "experiment check failed; next round");
                }
            }
        }
    }

    /// The winner of `campaign`'s experiment, if this daemon knows it.
    pub fn winner(&self, campaign: &str) -> Option<String> {
        self.decided
            .read()
            .expect("decided lock")
            .get(campaign)
            .cloned()
    }

    /// One look at an undecided experiment: start its window, decide it when due, or learn
    /// of another daemon's decision (and release the held jobs either way).
    async fn look(
        &self,
        campaign: &str,
        rule: &Rule,
        conn: &mut RedisConn,
        keys: &Keys,
        metrics: &crate::metrics::Metrics,
    ) -> redis::RedisResult<()> {
        let key = keys.experiment(campaign);
        let (started, winner): (Option<i64>, Option<String>) = redis::cmd("HMGET")
            .arg(&key)
            .arg("started")
            .arg("winner")
            .query_async(conn)
            .await?;
        if let Some(w) = winner {
            return self.learn(campaign, w, conn, keys).await;
        }
        let started = match started {
            Some(s) => s,
            None => {
                let seen = rule.first_seen.load(Ordering::Relaxed);
                if seen == 0 {
                    return Ok(());
                }
                let _: () = redis::cmd("HSETNX")
                    .arg(&key)
                    .arg("started")
                    .arg(seen)
                    .query_async(conn)
                    .await?;
                return Ok(());
            }
        };
        if now_ms() < started + rule.cfg.decide_after.get().as_millis() as i64 {
            return Ok(());
        }
        let verdict = verdict(conn, keys, &rule.cfg).await?;
        let how = if verdict.significant {
            "auto"
        } else {
            "fallback"
        };
        if record(conn, keys, &rule.cfg, &verdict, how).await? {
            metrics.experiment_decisions.with_label_values(&[how]).inc();
            tracing::info!(campaign, winner = %verdict.winner, significant = verdict.significant, p_value = verdict.p_value, "experiment decided");
        }
        let winner: Option<String> = redis::cmd("HGET")
            .arg(&key)
            .arg("winner")
            .query_async(conn)
            .await?;
        match winner {
            Some(w) => self.learn(campaign, w, conn, keys).await,
            None => Ok(()),
        }
    }

    /// Takes note of a decision and sends the held jobs on.
    async fn learn(
        &self,
        campaign: &str,
        winner: String,
        conn: &mut RedisConn,
        keys: &Keys,
    ) -> redis::RedisResult<()> {
        self.decided
            .write()
            .expect("decided lock")
            .insert(campaign.to_string(), winner);
        let n = crate::control::release_set(conn, &keys.held(campaign), &keys.scheduled).await?;
        if n > 0 {
            tracing::info!(campaign, released = n, "held jobs go out with the winner");
        }
        Ok(())
    }
}

/// The decision the figures make now, for the rule's metric.
pub async fn verdict(
    conn: &mut RedisConn,
    keys: &Keys,
    rule: &ExperimentRule,
) -> redis::RedisResult<judge::Verdict> {
    if rule.metric == ExperimentMetric::Revenue {
        let figures = revenue_figures(conn, keys, rule).await?;
        return Ok(judge::judge_revenue(
            &figures,
            rule.confidence.0,
            &rule.fallback,
        ));
    }
    let figures = figures(conn, keys, rule).await?;
    Ok(judge::judge(&figures, rule.confidence.0, &rule.fallback))
}

/// Each variant's revenue figures (`metric = "revenue"`): delivered from `variants:{c}`,
/// people and revenue in the rule's currency from `convs:{c}`, the log sums from `convx:{c}`.
pub async fn revenue_figures(
    conn: &mut RedisConn,
    keys: &Keys,
    rule: &ExperimentRule,
) -> redis::RedisResult<Vec<judge::Revenue>> {
    let cur = rule.currency.as_deref().unwrap_or("");
    let mut p = redis::pipe();
    for v in &rule.variants {
        p.cmd("HGET")
            .arg(keys.variants(&rule.campaign))
            .arg(format!("{}:delivered", v.name));
        p.cmd("HMGET")
            .arg(keys.conversions(&rule.campaign))
            .arg(format!("variant:{}:people", v.name))
            .arg(format!("variant:{}:rev:{cur}", v.name));
        p.cmd("HMGET")
            .arg(keys.conversion_stats(&rule.campaign))
            .arg(format!("{}:lsum", v.name))
            .arg(format!("{}:lsq", v.name));
    }
    type Reply = (
        Option<i64>,
        (Option<i64>, Option<i64>),
        (Option<f64>, Option<f64>),
    );
    let replies: Vec<redis::Value> = p.query_async(conn).await?;
    let exponent = crate::conversions::Currency::parse(cur).map_or(2, |c| c.exponent());
    Ok(rule
        .variants
        .iter()
        .zip(replies.chunks(3))
        .map(|(v, r)| {
            let (delivered, (people, minor), (log_sum, log_squares)): Reply = (
                redis::from_redis_value(r[0].clone()).unwrap_or(None),
                redis::from_redis_value(r[1].clone()).unwrap_or((None, None)),
                redis::from_redis_value(r[2].clone()).unwrap_or((None, None)),
            );
            judge::Revenue {
                variant: v.name.clone(),
                delivered: delivered.unwrap_or(0),
                people: people.unwrap_or(0),
                revenue: minor.unwrap_or(0) as f64 / 10f64.powi(exponent as i32),
                log_sum: log_sum.unwrap_or(0.0),
                log_squares: log_squares.unwrap_or(0.0),
            }
        })
        .collect())
}

/// Each variant's (name, delivered, people's unique hits) for the rule's metric.
pub async fn figures(
    conn: &mut RedisConn,
    keys: &Keys,
    rule: &ExperimentRule,
) -> redis::RedisResult<Vec<(String, i64, i64)>> {
    let hits = match rule.metric {
        ExperimentMetric::Clicks => "unique_clicked",
        ExperimentMetric::Opens => "unique_opened",
        ExperimentMetric::Conversions | ExperimentMetric::Revenue => {
            return conversion_figures(conn, keys, rule).await
        }
    };
    let mut cmd = redis::cmd("HMGET");
    cmd.arg(keys.variants(&rule.campaign));
    for v in &rule.variants {
        cmd.arg(format!("{}:delivered", v.name))
            .arg(format!("{}:{hits}", v.name));
    }
    let vals: Vec<Option<i64>> = cmd.query_async(conn).await?;
    Ok(rule
        .variants
        .iter()
        .zip(vals.chunks(2))
        .map(|(v, c)| {
            (
                v.name.clone(),
                c.first().copied().flatten().unwrap_or(0),
                c.get(1).copied().flatten().unwrap_or(0),
            )
        })
        .collect())
}

/// Each variant's (name, delivered, people who converted).
async fn conversion_figures(
    conn: &mut RedisConn,
    keys: &Keys,
    rule: &ExperimentRule,
) -> redis::RedisResult<Vec<(String, i64, i64)>> {
    let mut p = redis::pipe();
    for v in &rule.variants {
        p.cmd("HGET")
            .arg(keys.variants(&rule.campaign))
            .arg(format!("{}:delivered", v.name));
        p.cmd("HGET")
            .arg(keys.conversions(&rule.campaign))
            .arg(format!("variant:{}:people", v.name));
    }
    let vals: Vec<Option<i64>> = p.query_async(conn).await?;
    Ok(rule
        .variants
        .iter()
        .zip(vals.chunks(2))
        .map(|(v, c)| {
            (
                v.name.clone(),
                c.first().copied().flatten().unwrap_or(0),
                c.get(1).copied().flatten().unwrap_or(0),
            )
        })
        .collect())
}

/// Records a decision once (whoever is first); true when this call made it.
pub async fn record(
    conn: &mut RedisConn,
    keys: &Keys,
    rule: &ExperimentRule,
    verdict: &judge::Verdict,
    how: &str,
) -> redis::RedisResult<bool> {
    let at = now_ms();
    let result = serde_json::json!({
        "metric": rule.metric.as_str(),
        "confidence": rule.confidence.0,
        "leader": verdict.leader,
        "p_value": (verdict.p_value * 1e6).round() / 1e6,
        "significant": verdict.significant,
        "variants": verdict.variants,
    });
    let mut event = serde_json::json!({
        "type": "experiment_decided",
        "campaign": rule.campaign,
        "winner": verdict.winner,
        "how": how,
        "at": crate::queue::events::rfc3339_ms(at),
    });
    if let (Some(e), Some(r)) = (event.as_object_mut(), result.as_object()) {
        e.extend(r.clone());
    }
    let script = redis::Script::new(include_str!("scripts/decide.lua"));
    let n: i64 = script
        .key(keys.experiment(&rule.campaign))
        .key(&keys.events)
        .arg(&verdict.winner)
        .arg(how)
        .arg(at)
        .arg(result.to_string())
        .arg(event.to_string())
        .arg(keys.events_max_len)
        .invoke_async(conn)
        .await?;
    Ok(n == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(share: &str) -> ExperimentRule {
        let text = format!(
            r#"
campaign = "spring"
variants = [{{ name = "a" }}, {{ name = "b", template = "other" }}, {{ name = "c", subject = "Hi {{{{name}}}}" }}]
test_share = "{share}"
decide_after = "4h"
fallback = "a"
"#
        );
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn assignment_is_stable_even_and_holds_the_rest_until_the_decision() {
        let x = Experiments::new(&[rule("30%")]);
        let mut counts: HashMap<String, usize> = HashMap::new();
        let mut held = 0;
        for i in 0..30_000 {
            let to = format!("u{i}@example.com");
            let first = x.assign("spring", &to, 0).unwrap();
            // The same answer again, and whatever the case of the address.
            let again = x.assign("spring", &to.to_uppercase(), 0).unwrap();
            match (first, again) {
                (Assign::Send(v), Assign::Send(w)) => {
                    assert_eq!(v.name, w.name);
                    *counts.entry(v.name.clone()).or_default() += 1;
                }
                (Assign::Hold, Assign::Hold) => held += 1,
                other => panic!("unstable: {other:?}"),
            }
        }
        // 30% in the test, a third of it each (binomial sd ~ 0.3% here).
        assert!((20_400..21_600).contains(&held), "{held}");
        for v in ["a", "b", "c"] {
            assert!((2_800..3_200).contains(&counts[v]), "{v}: {counts:?}");
        }
        assert!(x.assign("autumn", "u1@example.com", 0).is_none());
        // After the decision, new jobs get the winner; a retried test job keeps its variant.
        x.decided
            .write()
            .unwrap()
            .insert("spring".into(), "b".into());
        let test_to = (0..100)
            .map(|i| format!("u{i}@example.com"))
            .find(|t| {
                let (a, b) = draws("spring", t);
                a < x.rules["spring"].threshold && b % 3 == 0
            })
            .unwrap();
        match x.assign("spring", &test_to, 0).unwrap() {
            Assign::Send(v) => assert_eq!(v.name, "b"),
            Assign::Hold => panic!("held after the decision"),
        }
        match x.assign("spring", &test_to, 2).unwrap() {
            Assign::Send(v) => assert_eq!(v.name, "a"),
            Assign::Hold => panic!("held after the decision"),
        }
    }

    #[test]
    fn a_variant_changes_the_template_or_the_subject() {
        let x = Experiments::new(&[rule("100%")]);
        let raw = br#"{"id":"j","campaign":"spring","template":"newsletter","to":"a@b.test"}"#;
        let mut job = Job::parse(raw, 4096).unwrap();
        x.rules["spring"].variants[1].apply(&mut job);
        assert_eq!(
            (job.template.as_str(), job.subject.as_deref()),
            ("other", None)
        );
        let mut job = Job::parse(raw, 4096).unwrap();
        x.rules["spring"].variants[2].apply(&mut job);
        assert_eq!(job.template, "newsletter");
        assert_eq!(job.subject.as_deref(), Some("experiment/spring/c/subject"));
        assert_eq!(job.identity().variant.as_deref(), Some("c"));
        assert_eq!(
            Experiments::subjects(&[rule("5%")]),
            vec![(
                "experiment/spring/c/subject".to_string(),
                "Hi {{name}}".to_string()
            )]
        );
    }
}

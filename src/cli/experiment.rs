//! `paloma experiment status|pick`: an A/B test's figures and decision, or a pick by hand.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;

use crate::config::Settings;
use crate::queue::Keys;
use crate::store::{connect as manager, redis_target as redis_client};

#[derive(clap::Subcommand)]
pub enum Cmd {
    /// The experiment's window, per-variant figures, the leader so far and the decision.
    Status {
        #[arg(long, short)]
        config: PathBuf,
        campaign: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Decide now: the rest of the campaign goes out with VARIANT.
    Pick {
        #[arg(long, short)]
        config: PathBuf,
        campaign: String,
        variant: String,
    },
}

pub async fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    let (config, action) = match cmd {
        Cmd::Status {
            config,
            campaign,
            json,
        } => (config, ExperimentAction::Status { campaign, json }),
        Cmd::Pick {
            config,
            campaign,
            variant,
        } => (config, ExperimentAction::Pick { campaign, variant }),
    };
    experiment(&super::load(&config)?, action).await?;
    Ok(ExitCode::SUCCESS)
}

/// What `paloma experiment …` does.
pub enum ExperimentAction {
    Status { campaign: String, json: bool },
    Pick { campaign: String, variant: String },
}

pub async fn experiment(settings: &Settings, action: ExperimentAction) -> anyhow::Result<()> {
    use crate::experiment;
    let campaign = match &action {
        ExperimentAction::Status { campaign, .. } | ExperimentAction::Pick { campaign, .. } => {
            campaign.clone()
        }
    };
    let Some(rule) = settings.experiments.iter().find(|x| x.campaign == campaign) else {
        bail!("no [[experiments]] for campaign {campaign:?} in this config");
    };
    let client = redis_client(settings).await?;
    let mut conn = manager(&client, std::time::Duration::from_secs(10)).await?;
    let keys = Keys::new(&settings.redis.prefix).retaining(&settings.events);
    let now = experiment::verdict(&mut conn, &keys, rule).await?;
    let state: BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg(keys.experiment(&campaign))
        .query_async(&mut conn)
        .await?;
    match action {
        ExperimentAction::Status { json, .. } => {
            let held: i64 = redis::cmd("ZCARD")
                .arg(keys.held(&campaign))
                .query_async(&mut conn)
                .await?;
            let decide_at = state
                .get("started")
                .and_then(|s| s.parse::<i64>().ok())
                .map(|s| s + rule.decide_after.get().as_millis() as i64);
            if json {
                let v = serde_json::json!({
                    "campaign": campaign,
                    "metric": rule.metric.as_str(),
                    "confidence": rule.confidence.0,
                    "fallback": rule.fallback,
                    "held": held,
                    "decide_at": decide_at.map(crate::queue::events::rfc3339_ms),
                    "state": crate::stats::experiment_state(&state),
                    "now": now,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!(
                "experiment {campaign}: {} variants, {:.1}% in the test, by people's unique {} per delivered, at {:.1}% confidence (fallback {})",
                rule.variants.len(),
                rule.test_share.0 * 100.0,
                rule.metric.as_str(),
                rule.confidence.0 * 100.0,
                rule.fallback
            );
            match (state.get("winner"), decide_at) {
                (Some(w), _) => println!(
                    "decided: {w} ({}); {held} jobs still held",
                    state.get("how").map(String::as_str).unwrap_or("?")
                ),
                (None, Some(at)) => println!(
                    "testing: decides at {}; {held} jobs held until then",
                    crate::queue::events::rfc3339_ms(at)
                ),
                (None, None) => println!("not started: no job of {campaign} seen yet"),
            }
            println!(
                "\n{:<16} {:>10} {:>10} {:>8}",
                "variant",
                "delivered",
                rule.metric.as_str(),
                "rate"
            );
            for f in &now.variants {
                println!(
                    "{:<16} {:>10} {:>10} {:>7.2}%",
                    f.variant,
                    f.delivered,
                    f.hits,
                    f.rate * 100.0
                );
            }
            println!(
                "\nleader so far: {} (p = {:.4}: {})",
                now.leader,
                now.p_value,
                if now.significant {
                    "significant"
                } else {
                    "not significant yet"
                }
            );
        }
        ExperimentAction::Pick { variant, .. } => {
            if !rule.variants.iter().any(|v| v.name == variant) {
                bail!(
                    "{variant:?} is not a variant of {campaign} ({})",
                    rule.variants
                        .iter()
                        .map(|v| v.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let mut verdict = now;
            verdict.winner = variant.clone();
            if experiment::record(&mut conn, &keys, rule, &verdict, "manual").await? {
                eprintln!(
                    "{campaign}: {variant} picked; the held jobs go out with it within a second"
                );
            } else {
                let (winner, how): (Option<String>, Option<String>) = redis::cmd("HMGET")
                    .arg(keys.experiment(&campaign))
                    .arg("winner")
                    .arg("how")
                    .query_async(&mut conn)
                    .await?;
                bail!(
                    "{campaign} was already decided: {} ({}); nothing changed",
                    winner.unwrap_or_default(),
                    how.unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

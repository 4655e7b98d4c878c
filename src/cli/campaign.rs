//! `paloma campaign list|pause|resume|cancel`: campaign control across every daemon
//! ([`crate::control`]); `paloma campaign cost`: what a campaign cost, for its ROI.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;

use crate::config::Settings;
use crate::queue::Keys;
use crate::store::{connect as manager, redis_target as redis_client};

#[derive(clap::Subcommand)]
pub enum Cmd {
    /// Every campaign with its state and counts.
    List {
        #[arg(long, short)]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop sending a campaign (within about a second, on every daemon); its jobs wait.
    Pause {
        #[arg(long, short)]
        config: PathBuf,
        campaign: String,
    },
    /// Send a paused or cancelled campaign's waiting jobs again.
    Resume {
        #[arg(long, short)]
        config: PathBuf,
        campaign: String,
    },
    /// End every job of a campaign not yet sent (`suppressed`, reason `cancelled`).
    Cancel {
        #[arg(long, short)]
        config: PathBuf,
        campaign: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Set what a campaign cost in a currency (its ROI in that currency follows); an amount
    /// of 0 removes it. Costs in other currencies are kept.
    Cost {
        #[arg(long, short)]
        config: PathBuf,
        campaign: String,
        /// In major units: 1200 or 1200.50.
        amount: String,
        /// ISO 4217: EUR, USD, JPY.
        currency: String,
    },
}

pub async fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    let (config, action) = match cmd {
        Cmd::List { config, json } => (config, CampaignAction::List { json }),
        Cmd::Pause { config, campaign } => (config, CampaignAction::Pause(campaign)),
        Cmd::Resume { config, campaign } => (config, CampaignAction::Resume(campaign)),
        Cmd::Cancel {
            config,
            campaign,
            yes,
        } => (config, CampaignAction::Cancel { campaign, yes }),
        Cmd::Cost {
            config,
            campaign,
            amount,
            currency,
        } => (
            config,
            CampaignAction::Cost {
                campaign,
                amount,
                currency,
            },
        ),
    };
    campaign(&super::load(&config)?, action).await?;
    Ok(ExitCode::SUCCESS)
}

/// What `paloma campaign …` does.
pub enum CampaignAction {
    List {
        json: bool,
    },
    Pause(String),
    Resume(String),
    Cancel {
        campaign: String,
        yes: bool,
    },
    Cost {
        campaign: String,
        amount: String,
        currency: String,
    },
}

pub async fn campaign(settings: &Settings, action: CampaignAction) -> anyhow::Result<()> {
    use crate::control;
    let client = redis_client(settings).await?;
    let mut conn = manager(&client, std::time::Duration::from_secs(30)).await?;
    let acks = super::acks(&mut conn, settings).await?;
    let keys = Keys::new(&settings.redis.prefix);
    let check = |c: &str| {
        crate::job::CampaignId::parse(c.to_string())
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!("campaign {c:?}: {e}"))
    };
    match action {
        CampaignAction::List { json } => {
            let o = crate::stats::overview(&mut conn, &keys, &settings.redis.group, None).await?;
            let rows = crate::stats::campaign_rows(&mut conn, &keys, o).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(());
            }
            println!(
                "{:<24} {:>9} {:>9} {:>9} {:>10} {:>9} {:>8} {:>10}",
                "campaign",
                "state",
                "accepted",
                "parked",
                "delivered",
                "bounced",
                "failed",
                "suppressed"
            );
            for r in &rows {
                println!(
                    "{:<24} {:>9} {:>9} {:>9} {:>10} {:>9} {:>8} {:>10}",
                    r.stats.campaign,
                    r.state.as_str(),
                    r.stats.accepted,
                    r.parked,
                    r.stats.delivered,
                    r.stats.bounced,
                    r.stats.failed,
                    r.stats.suppressed
                );
            }
            if rows.is_empty() {
                println!("(no campaign has an outcome yet)");
            }
        }
        CampaignAction::Pause(c) => {
            check(&c)?;
            control::pause(&mut conn, &keys, &acks, "campaign", &c).await?;
            eprintln!(
                "paused {c}: within about {} ms no daemon starts another message of it; its jobs wait (paloma campaign resume {c})",
                control::REFRESH.as_millis() * 2
            );
        }
        CampaignAction::Resume(c) => {
            check(&c)?;
            let n = control::resume(&mut conn, &keys, &acks, "campaign", &c)
                .await?
                .released;
            eprintln!("resumed {c}: {n} parked jobs go out now, paced by shaping as usual");
        }
        CampaignAction::Cost {
            campaign: c,
            amount,
            currency,
        } => {
            check(&c)?;
            let cur = crate::conversions::Currency::parse(&currency)?;
            let minor = cur.parse_amount(&amount)?;
            crate::conversions::figures::set_cost(&mut conn, &keys, &acks, &c, cur, minor).await?;
            if minor == 0 {
                eprintln!("{c}: no cost in {cur} any more");
            } else {
                eprintln!("{c} cost {} {cur}", cur.decimal(minor));
            }
        }
        CampaignAction::Cancel { campaign: c, yes } => {
            check(&c)?;
            if !yes {
                if !std::io::stdin().is_terminal() {
                    bail!("cancel ends every job of {c} not yet sent; pass --yes to confirm");
                }
                eprint!("cancel {c}: every job not yet sent ends as suppressed (cancelled). Type the campaign name to confirm: ");
                std::io::stderr().flush().ok();
                let mut line = String::new();
                std::io::stdin().read_line(&mut line)?;
                if line.trim() != c {
                    bail!("not confirmed; nothing changed");
                }
            }
            let done = control::cancel(&mut conn, &keys, &acks, "campaign", &c).await?;
            let (parked, delayed) = (done.released, done.brought_forward);
            eprintln!(
                "cancelled {c}: its jobs end as suppressed (cancelled) as the daemons reach them ({parked} parked and {delayed} delayed brought forward); paloma campaign resume {c} undoes it for jobs not yet ended"
            );
        }
    }
    Ok(())
}

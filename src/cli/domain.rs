//! `paloma domain suspend|resume|list`: an operator's suspension of a recipient domain for
//! every daemon ([`crate::control::domains`]).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail};

use crate::config::{Dur, Settings};
use crate::control::domains;
use crate::queue::Keys;
use crate::store::{connect, redis_target};

#[derive(clap::Subcommand)]
pub enum Cmd {
    /// Stop sending to a domain (every source, or one) for a while, on every daemon.
    Suspend {
        #[arg(long, short)]
        config: PathBuf,
        domain: String,
        /// How long: "30m", "1h", "2d".
        #[arg(long = "for")]
        duration: String,
        /// Only this egress source (its `name` in the sources of the config).
        #[arg(long)]
        source: Option<String>,
    },
    /// Lift a domain's suspension (every source's, or one's) and send its waiting jobs now.
    Resume {
        #[arg(long, short)]
        config: PathBuf,
        domain: String,
        #[arg(long)]
        source: Option<String>,
    },
    /// The suspensions in force.
    List {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

/// A source named on the command line, checked against `[[sources]]`.
pub fn known_source(settings: &Settings, source: Option<&str>) -> anyhow::Result<()> {
    let Some(s) = source else {
        return Ok(());
    };
    if settings.sources.iter().any(|x| x.name == s) {
        return Ok(());
    }
    let names: Vec<&str> = settings.sources.iter().map(|x| x.name.as_str()).collect();
    if names.is_empty() {
        bail!("--source {s:?}: there are no [[sources]] in the config");
    }
    bail!(
        "--source {s:?} names no source: the [[sources]] are {}",
        names.join(", ")
    )
}

pub async fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    let config = match &cmd {
        Cmd::Suspend { config, .. } | Cmd::Resume { config, .. } | Cmd::List { config, .. } => {
            config.clone()
        }
    };
    let settings = super::load(&config)?;
    let keys = Keys::new(&settings.redis.prefix);
    let target = redis_target(&settings).await?;
    let mut conn = connect(&target, std::time::Duration::from_secs(30)).await?;
    crate::store::clock::sync(&mut conn).await?;
    let name =
        |d: &str| domains::domain_name(d).ok_or_else(|| anyhow!("{d:?} is not a domain name"));
    match cmd {
        Cmd::Suspend {
            domain,
            duration,
            source,
            ..
        } => {
            let domain = name(&domain)?;
            known_source(&settings, source.as_deref())?;
            let d: Dur = duration
                .parse()
                .map_err(|e| anyhow!("--for {duration:?}: {e} (such as \"30m\" or \"1h\")"))?;
            if d.get().is_zero() {
                bail!("--for must be above zero");
            }
            let acks = super::acks(&mut conn, &settings).await?;
            let s = domains::suspend(
                &mut conn,
                &keys,
                &acks,
                "cli_domains",
                &domain,
                source.as_deref(),
                d.get().as_millis() as i64,
            )
            .await?;
            let through = s
                .source
                .as_deref()
                .map_or("every source".to_string(), |s| format!("source {s}"));
            println!("suspended {} ({through}) until {}", s.domain, s.until);
        }
        Cmd::Resume { domain, source, .. } => {
            let domain = name(&domain)?;
            known_source(&settings, source.as_deref())?;
            let acks = super::acks(&mut conn, &settings).await?;
            let r = domains::resume(
                &mut conn,
                &keys,
                &acks,
                "cli_domains",
                &domain,
                source.as_deref(),
            )
            .await?;
            println!(
                "resumed {}: {} suspension(s) lifted, {} waiting job(s) brought forward",
                r.domain, r.lifted, r.brought_forward
            );
        }
        Cmd::List { json, .. } => {
            let list = domains::list(&mut conn, &keys).await?;
            if json {
                println!("{}", serde_json::json!({ "suspended": list }));
            } else if list.is_empty() {
                println!("no domain is suspended");
            } else {
                for s in list {
                    println!(
                        "{}  {}  until {}",
                        s.domain,
                        s.source.as_deref().unwrap_or("(every source)"),
                        s.until
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

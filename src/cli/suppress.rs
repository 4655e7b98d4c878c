//! `paloma suppress add|remove|list|import`: the suppression list, each write confirmed by
//! the replicas.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use super::enqueue::{open, Input, ENQUEUE_BATCH};
use crate::config::Settings;
use crate::queue::Keys;
use crate::store::{connect as manager, redis_target as redis_client};

/// `paloma suppress`: the suppression list.
#[derive(clap::Args)]
pub struct Args {
    #[arg(long, short)]
    config: PathBuf,
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Add addresses (reason: manual unless given).
    Add {
        addresses: Vec<String>,
        #[arg(long, default_value = "manual")]
        reason: String,
    },
    /// Remove addresses.
    Remove { addresses: Vec<String> },
    /// Print `address reason` lines.
    List,
    /// Add every address of a file (one per line, or the first CSV column; - for stdin).
    Import {
        file: String,
        #[arg(long, default_value = "manual")]
        reason: String,
    },
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let settings = super::load(&args.config)?;
    let action = match args.action {
        Action::Add { addresses, reason } => Suppress::Add(addresses, reason),
        Action::Remove { addresses } => Suppress::Remove(addresses),
        Action::List => Suppress::List,
        Action::Import { file, reason } => Suppress::Import(file, reason),
    };
    suppress(&settings, action).await
}

pub enum Suppress {
    Add(Vec<String>, String),
    Remove(Vec<String>),
    List,
    Import(String, String),
}

/// `paloma suppress …`.
pub async fn suppress(
    settings: &Settings,
    action: Suppress,
) -> anyhow::Result<std::process::ExitCode> {
    use crate::job::Recipient;
    use crate::policy::suppression::{self, REASONS};
    let client = redis_client(settings).await?;
    let mut conn = manager(&client, std::time::Duration::from_secs(30)).await?;
    let acks = super::acks(&mut conn, settings).await?;
    let keys = Keys::new(&settings.redis.prefix);
    let check_reason = |r: &str| {
        if REASONS.contains(&r) {
            Ok(())
        } else {
            Err(anyhow::anyhow!("--reason must be one of {REASONS:?}"))
        }
    };
    let valid = |addrs: Vec<String>| -> anyhow::Result<Vec<String>> {
        addrs
            .into_iter()
            .map(|a| {
                Recipient::parse(&a)
                    .map(|r| r.as_str().to_string())
                    .map_err(|e| anyhow::anyhow!("{e}"))
            })
            .collect()
    };
    match action {
        Suppress::Add(addrs, reason) => {
            check_reason(&reason)?;
            let addrs = valid(addrs)?;
            suppression::add(&mut conn, &keys, &acks, "suppress", &addrs, &reason).await?;
            eprintln!("suppressed {} addresses ({reason})", addrs.len());
        }
        Suppress::Remove(addrs) => {
            let (n, kept) =
                suppression::remove(&mut conn, &keys, &acks, "suppress", &addrs).await?;
            eprintln!("removed {n} of {} addresses", addrs.len());
            if kept > 0 {
                eprintln!("kept {kept} as unsubscribed: those recipients opted out themselves (remove again to undo the opt-out)");
            }
        }
        Suppress::List => {
            let mut out = std::io::stdout().lock();
            let n = suppression::list(&mut conn, &keys, |a, r| {
                let _ = writeln!(out, "{a} {r}");
            })
            .await?;
            eprintln!("{n} suppressed");
        }
        Suppress::Import(file, reason) => {
            check_reason(&reason)?;
            let input = if file == "-" {
                Input::Stdin
            } else {
                Input::File(file.into())
            };
            let (mut good, mut bad, mut total) = (Vec::new(), 0u64, 0u64);
            for (i, line) in open(&input)?.lines().enumerate() {
                let line = line?;
                let first = line
                    .split([',', ';', '\t'])
                    .next()
                    .unwrap_or("")
                    .trim()
                    .trim_matches('"');
                if first.is_empty() || (i == 0 && !first.contains('@')) {
                    continue; // blank line or a header row
                }
                match Recipient::parse(first) {
                    Ok(r) => {
                        total += 1;
                        good.push(r.as_str().to_string());
                    }
                    Err(e) => {
                        bad += 1;
                        eprintln!("line {}: {e}; skipped", i + 1);
                    }
                }
                if good.len() >= ENQUEUE_BATCH {
                    suppression::add(&mut conn, &keys, &acks, "suppress", &good, &reason).await?;
                    good.clear();
                }
            }
            suppression::add(&mut conn, &keys, &acks, "suppress", &good, &reason).await?;
            eprintln!("imported {total} addresses ({reason}); {bad} lines skipped");
            if bad > 0 {
                return Ok(std::process::ExitCode::from(1));
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

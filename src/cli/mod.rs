//! The `paloma` command line: [`Cli`] parses it, [`run`] carries it out. Each command's
//! arguments and handler live together, one file each: [`enqueue`], [`stats`],
//! [`suppress`], [`campaign`], [`experiment`], [`queue`], [`bounce`], [`demo`]; `run` is
//! the daemon
//! ([`crate::daemon`]).

pub mod bounce;
pub mod campaign;
pub mod demo;
pub mod domain;
pub mod enqueue;
pub mod experiment;
pub mod queue;
pub mod sources;
pub mod stats;
pub mod suppress;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use enqueue::{enqueue, CsvOptions, EnqueueReport, Input};
pub use stats::{print_stats, stats};

use crate::config::Settings;
use crate::store::replication::Acks;

#[derive(Parser)]
#[command(name = "paloma", version, about = "Email campaign delivery engine")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: intake, delivery, tracking, metrics. SIGTERM drains and exits.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Enqueue jobs: JSON lines (one job per line) or, with --csv, a CSV list.
    Enqueue(enqueue::Args),
    /// Per-campaign counters.
    Stats(stats::Args),
    /// Manage the suppression list: add, remove, list, import.
    Suppress(suppress::Args),
    /// Campaign control: list, pause, resume, cancel (across every daemon).
    Campaign {
        #[command(subcommand)]
        action: campaign::Cmd,
    },
    /// A/B tests: status, or pick a winner by hand.
    Experiment {
        #[command(subcommand)]
        action: experiment::Cmd,
    },
    /// Operator suspensions of recipient domains: suspend, resume, list (every daemon).
    Domain {
        #[command(subcommand)]
        action: domain::Cmd,
    },
    /// Egress sources: address, EHLO name, pools, warm-up day and cap, sent today, suspensions.
    Sources(sources::Args),
    /// What waits, by campaign and by destination, and why.
    Queue(queue::Args),
    /// End every waiting job of a domain or campaign as bounced (class admin); --for keeps
    /// bouncing new ones for a while. Without --yes, only counts.
    Bounce(bounce::Args),
    /// The quick start: a throwaway Redis, a local mail capture, a sample campaign.
    Demo(demo::Args),
}

/// Carries out the command; `shutdown` ends the daemon (`run`).
pub async fn run(cli: Cli, shutdown: impl Future<Output = ()>) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { config } => {
            crate::daemon::run(load(&config)?, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Enqueue(args) => enqueue::run(args).await,
        Command::Stats(args) => stats::run(args).await,
        Command::Suppress(args) => suppress::run(args).await,
        Command::Campaign { action } => campaign::run(action).await,
        Command::Experiment { action } => experiment::run(action).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Sources(args) => sources::run(args).await,
        Command::Domain { action } => domain::run(action).await,
        Command::Queue(args) => queue::run(args).await,
        Command::Bounce(args) => bounce::run(args).await,
    }
}

fn load(path: &Path) -> anyhow::Result<Settings> {
    Ok(Settings::load(path)?)
}

/// The campaigns of the configured experiments (their held jobs wait under them, maybe
/// before any outcome names the campaign).
fn experiment_campaigns(settings: &Settings) -> Vec<String> {
    settings
        .experiments
        .iter()
        .map(|e| e.campaign.clone())
        .collect()
}

/// What a CLI command's writes wait for (`redis.ack_replicas`), read from the primary.
async fn acks(conn: &mut crate::store::RedisConn, settings: &Settings) -> anyhow::Result<Acks> {
    Acks::start(
        None,
        conn,
        &settings.redis,
        std::sync::Arc::new(crate::metrics::Metrics::new()),
        None,
    )
    .await
}

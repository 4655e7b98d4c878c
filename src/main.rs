//! The `paloma` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use paloma::cli::{self, CsvOptions, Input};
use paloma::config::Settings;

#[derive(Parser)]
#[command(name = "paloma", version, about = "Email campaign delivery engine")]
struct Cli {
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
    Enqueue {
        #[arg(long, short)]
        config: PathBuf,
        /// File to read, or - for standard input.
        #[arg(default_value = "-")]
        file: String,
        /// Read CSV: an `email` column, other columns become the template data.
        #[arg(long, requires_all = ["campaign", "template"])]
        csv: bool,
        #[arg(long)]
        campaign: Option<String>,
        #[arg(long)]
        template: Option<String>,
    },
    /// Per-campaign counters.
    Stats {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        campaign: Option<String>,
        /// One recipient's engagement, suppression and recent sends instead.
        #[arg(long)]
        recipient: Option<String>,
        /// The contact-pressure curve instead: figures by how many marketing messages the
        /// recipient had received in the last year.
        #[arg(long, conflicts_with = "recipient")]
        touches: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Manage the suppression list: add, remove, list, import.
    Suppress {
        #[arg(long, short)]
        config: PathBuf,
        #[command(subcommand)]
        action: SuppressAction,
    },
    /// Campaign control: list, pause, resume, cancel (across every daemon).
    Campaign {
        #[command(subcommand)]
        action: CampaignCmd,
    },
    /// A/B tests: status, or pick a winner by hand.
    Experiment {
        #[command(subcommand)]
        action: ExperimentCmd,
    },
    /// The quick start: a throwaway Redis, a local mail capture, a sample campaign.
    Demo {
        /// How many recipients.
        #[arg(long, default_value_t = 200)]
        count: usize,
        /// Where captured mail and the throwaway Redis live.
        #[arg(long, default_value = "paloma-demo")]
        dir: PathBuf,
        /// Use this Redis instead of starting one.
        #[arg(long)]
        redis_url: Option<String>,
        #[arg(long, default_value = "templates")]
        templates: PathBuf,
    },
}

#[derive(Subcommand)]
enum CampaignCmd {
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
}

#[derive(Subcommand)]
enum ExperimentCmd {
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

#[derive(Subcommand)]
enum SuppressAction {
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

fn load(path: &std::path::Path) -> anyhow::Result<Settings> {
    Ok(Settings::load(path)?)
}

async fn main_inner(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { config } => {
            let settings = load(&config)?;
            paloma::daemon::run(settings, shutdown_signal()).await?;
        }
        Command::Enqueue {
            config,
            file,
            csv,
            campaign,
            template,
        } => {
            let settings = load(&config)?;
            let input = if file == "-" {
                Input::Stdin
            } else {
                Input::File(file.into())
            };
            let csv = csv.then(|| CsvOptions {
                campaign: campaign.unwrap_or_default(),
                template: template.unwrap_or_default(),
            });
            let report = cli::enqueue(&settings, input, csv).await?;
            eprintln!(
                "enqueued {} jobs, rejected {}",
                report.enqueued, report.rejected
            );
            if report.rejected > 0 {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Stats {
            config,
            recipient: Some(addr),
            json,
            ..
        } => {
            let settings = load(&config)?;
            let info = cli::recipient(&settings, &addr).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!("{addr}");
                for (k, v) in &info {
                    println!("  {k:<14} {v}");
                }
            }
        }
        Command::Stats {
            config,
            campaign,
            json,
            touches: true,
            ..
        } => {
            let settings = load(&config)?;
            let rows = cli::touches(&settings, campaign.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                cli::print_touches(&rows, campaign.as_deref());
            }
        }
        Command::Stats {
            config,
            campaign,
            json,
            ..
        } => {
            let settings = load(&config)?;
            let o = cli::stats(&settings, campaign.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&o)?);
            } else {
                cli::print_stats(&o);
            }
        }
        Command::Suppress { config, action } => {
            let settings = load(&config)?;
            return cli::suppress(&settings, action.into()).await;
        }
        Command::Campaign { action } => {
            let (config, action) = match action {
                CampaignCmd::List { config, json } => (config, cli::CampaignAction::List { json }),
                CampaignCmd::Pause { config, campaign } => {
                    (config, cli::CampaignAction::Pause(campaign))
                }
                CampaignCmd::Resume { config, campaign } => {
                    (config, cli::CampaignAction::Resume(campaign))
                }
                CampaignCmd::Cancel {
                    config,
                    campaign,
                    yes,
                } => (config, cli::CampaignAction::Cancel { campaign, yes }),
            };
            let settings = load(&config)?;
            cli::campaign(&settings, action).await?;
        }
        Command::Experiment { action } => {
            let (config, action) = match action {
                ExperimentCmd::Status {
                    config,
                    campaign,
                    json,
                } => (config, cli::ExperimentAction::Status { campaign, json }),
                ExperimentCmd::Pick {
                    config,
                    campaign,
                    variant,
                } => (config, cli::ExperimentAction::Pick { campaign, variant }),
            };
            let settings = load(&config)?;
            cli::experiment(&settings, action).await?;
        }
        Command::Demo {
            count,
            dir,
            redis_url,
            templates,
        } => {
            paloma::demo::run(paloma::demo::DemoOptions {
                count,
                dir,
                redis_url,
                templates,
            })
            .await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

impl From<SuppressAction> for cli::Suppress {
    fn from(a: SuppressAction) -> Self {
        match a {
            SuppressAction::Add { addresses, reason } => cli::Suppress::Add(addresses, reason),
            SuppressAction::Remove { addresses } => cli::Suppress::Remove(addresses),
            SuppressAction::List => cli::Suppress::List,
            SuppressAction::Import { file, reason } => cli::Suppress::Import(file, reason),
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PALOMA_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    paloma::panics::install();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("paloma: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(main_inner(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("paloma: {e:#}");
            ExitCode::from(1)
        }
    }
}

//! `paloma demo`: the quick start's arguments; the demo itself is [`crate::demo`].

use std::path::PathBuf;
use std::process::ExitCode;

/// The quick start: a throwaway Redis, a local mail capture, a sample campaign.
#[derive(clap::Args)]
pub struct Args {
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
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    crate::demo::run(crate::demo::DemoOptions {
        count: args.count,
        dir: args.dir,
        redis_url: args.redis_url,
        templates: args.templates,
    })
    .await?;
    Ok(ExitCode::SUCCESS)
}

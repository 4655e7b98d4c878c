//! `paloma queue`: what waits, by campaign and by destination, and why (`--json` as
//! `GET /api/v1/queue` answers; see [`crate::control::queue`]).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::control::queue::{render, view, DEFAULT_TOP};
use crate::queue::Keys;
use crate::store::{connect, redis_target};

/// `paloma queue`.
#[derive(clap::Args)]
pub struct Args {
    #[arg(long, short)]
    config: PathBuf,
    /// JSON, as the API answers.
    #[arg(long)]
    json: bool,
    /// Destinations shown, most waiting first.
    #[arg(long, default_value_t = DEFAULT_TOP)]
    limit: usize,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let settings = super::load(&args.config)?;
    let keys = Keys::new(&settings.redis.prefix);
    let target = redis_target(&settings).await?;
    let mut conn = connect(&target, std::time::Duration::from_secs(30)).await?;
    let also = super::experiment_campaigns(&settings);
    let v = view(&mut conn, &keys, &settings.redis.group, &also, args.limit).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", render(&v, args.limit));
    }
    Ok(ExitCode::SUCCESS)
}

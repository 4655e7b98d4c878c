//! `paloma sources`: each egress source's address and EHLO name, its pools, its warm-up day
//! and cap, what it sent today, and the sites it is suspended for (`--json` as
//! `GET /api/v1/sources` answers).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::egress::status::{text, Catalog};
use crate::queue::Keys;
use crate::store::{connect, redis_target};

/// `paloma sources`.
#[derive(clap::Args)]
pub struct Args {
    #[arg(long, short)]
    config: PathBuf,
    /// JSON, as the API answers.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let settings = super::load(&args.config)?;
    let keys = Keys::new(&settings.redis.prefix);
    let target = redis_target(&settings).await?;
    let mut conn = connect(&target, std::time::Duration::from_secs(10)).await?;
    crate::store::clock::sync(&mut conn).await?;
    let now = crate::store::clock::now_ms();
    let list = Catalog::new(&settings)
        .status(&mut conn, &keys, now)
        .await?;
    if args.json {
        println!("{}", serde_json::json!({ "sources": list }));
    } else {
        print!("{}", text(&list));
    }
    Ok(ExitCode::SUCCESS)
}

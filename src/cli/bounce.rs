//! `paloma bounce`: end every waiting job of a destination or a campaign as `bounced`,
//! class `admin`, and with `--for` the new ones too for a while (see
//! [`crate::control::admin_bounce`]). Without `--yes` it only counts.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;

use crate::config::Dur;
use crate::control::admin_bounce::{self, Bounced, Target};
use crate::queue::Keys;
use crate::store::{connect, redis_target};

/// `paloma bounce`.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("target").args(["domain", "campaign"])))]
pub struct Args {
    #[arg(long, short)]
    config: PathBuf,
    /// The recipients' domain (exactly: not its subdomains).
    #[arg(long)]
    domain: Option<String>,
    /// The campaign.
    #[arg(long)]
    campaign: Option<String>,
    /// Also bounce new jobs of it for this long (e.g. 10m, 2h).
    #[arg(long = "for", value_name = "DURATION")]
    lasting: Option<Dur>,
    /// Do it (without: only count what would be bounced).
    #[arg(long)]
    yes: bool,
    /// Lift the directive of --domain or --campaign (set by --for).
    #[arg(long, conflicts_with_all = ["lasting", "yes", "list"])]
    cancel: bool,
    /// The directives in force.
    #[arg(long, conflicts_with_all = ["domain", "campaign", "lasting", "yes"])]
    list: bool,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let settings = super::load(&args.config)?;
    let keys = Keys::new(&settings.redis.prefix).retaining(&settings.events);
    let client = redis_target(&settings).await?;
    let mut conn = connect(&client, std::time::Duration::from_secs(30)).await?;
    if args.list {
        let now = crate::store::clock::now_ms();
        let list = admin_bounce::list(&mut conn, &keys, now).await?;
        for d in &list {
            println!("{} {} until {}", d.kind, d.target, d.until);
        }
        if list.is_empty() {
            eprintln!("no bounce directive in force");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let target = match (&args.domain, &args.campaign) {
        (Some(d), None) => Target::domain(d),
        (None, Some(c)) => Target::campaign(c),
        _ => bail!("name what to bounce: --domain D or --campaign C (or --list)"),
    }
    .map_err(anyhow::Error::msg)?;
    let acks = super::acks(&mut conn, &settings).await?;
    if args.cancel {
        let lifted = admin_bounce::lift(&mut conn, &keys, &acks, "bounce", &target).await?;
        if lifted {
            eprintln!(
                "lifted: new jobs of {} {} are sent again",
                target.kind(),
                target.name()
            );
        } else {
            eprintln!("no directive for {} {}", target.kind(), target.name());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let also = super::experiment_campaigns(&settings);
    if !args.yes {
        let b = admin_bounce::count(&mut conn, &keys, &target, &also).await?;
        println!("{}", summary(&b));
        eprintln!("nothing changed: add --yes to bounce them");
        return Ok(ExitCode::SUCCESS);
    }
    let b = admin_bounce::bounce(
        &mut conn,
        &keys,
        &acks,
        "bounce",
        &target,
        &also,
        args.lasting.map(Dur::get),
        settings.intake.idempotency_ttl.get(),
    )
    .await?;
    println!("{}", summary(&b));
    Ok(ExitCode::SUCCESS)
}

/// One line: how many, from where, and the directive.
fn summary(b: &Bounced) -> String {
    let verb = if b.applied {
        "bounced (admin)"
    } else {
        "would bounce"
    };
    let mut s = format!(
        "{} {}: {verb} {} waiting jobs ({} delayed, {} parked, {} held)",
        b.kind, b.target, b.total, b.delayed, b.parked, b.held
    );
    if let Some(until) = &b.until {
        s.push_str(&format!("; new jobs of it are bounced until {until}"));
    }
    s
}

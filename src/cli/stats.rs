//! `paloma stats`: what is read back of campaigns, one recipient, or contact pressure
//! ([`crate::stats`]), as a table or JSON.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::Settings;
use crate::queue::Keys;
pub use crate::stats::{CampaignStats, Overview};
use crate::store::{connect as manager, redis_target as redis_client};

/// `paloma stats`: per-campaign counters, one recipient, or the contact-pressure curve.
#[derive(clap::Args)]
pub struct Args {
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
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let settings = super::load(&args.config)?;
    let campaign = args.campaign.as_deref();
    if let Some(addr) = &args.recipient {
        let info = recipient(&settings, addr).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&info)?);
        } else {
            println!("{addr}");
            for (k, v) in &info {
                println!("  {k:<14} {v}");
            }
        }
    } else if args.touches {
        let rows = touches(&settings, campaign).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            print_touches(&rows, campaign);
        }
    } else {
        let o = stats(&settings, campaign).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&o)?);
        } else {
            print_stats(&o);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn stats(settings: &Settings, campaign: Option<&str>) -> anyhow::Result<Overview> {
    let client = redis_client(settings).await?;
    let mut conn = manager(&client, std::time::Duration::from_secs(10)).await?;
    let keys = Keys::new(&settings.redis.prefix);
    Ok(crate::stats::overview(&mut conn, &keys, &settings.redis.group, campaign).await?)
}

pub fn print_stats(o: &Overview) {
    println!(
        "{:<24} {:>9} {:>10} {:>9} {:>9} {:>8} {:>10} {:>7}",
        "campaign", "queued", "delivered", "deferred", "bounced", "failed", "suppressed", "dead"
    );
    for c in &o.campaigns {
        println!(
            "{:<24} {:>9} {:>10} {:>9} {:>9} {:>8} {:>10} {:>7}",
            c.campaign,
            c.queued,
            c.delivered,
            c.deferred,
            c.bounced,
            c.failed,
            c.suppressed,
            c.dead
        );
    }
    if o.campaigns.is_empty() {
        println!("(no campaign has an outcome yet)");
    }
    println!(
        "\n{:<24} {:>9} {:>9} {:>9} {:>9} {:>9} {:>12}",
        "engagement", "opens", "unique", "clicks", "unique", "unsubs", "machine hits"
    );
    for c in &o.campaigns {
        println!(
            "{:<24} {:>9} {:>9} {:>9} {:>9} {:>9} {:>12}",
            c.campaign,
            c.opened,
            c.unique_opened,
            c.clicked,
            c.unique_clicked,
            c.unsubscribed,
            c.opened_machine + c.clicked_machine
        );
        for (link, total, unique) in &c.links {
            println!("  link {link:<19} {:>29} {:>9}", total, unique);
        }
    }
    if o.campaigns
        .iter()
        .any(|c| c.returned + c.returned_delayed + c.complained > 0)
    {
        println!(
            "\n{:<24} {:>9} {:>9} {:>10} {:>10}  returned by class",
            "after delivery", "returned", "delayed", "complaints", "compl. rate"
        );
        for c in &o.campaigns {
            let classes: Vec<String> = c
                .returned_by_class
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            println!(
                "{:<24} {:>9} {:>9} {:>10} {:>9.2}%  {}",
                c.campaign,
                c.returned,
                c.returned_delayed,
                c.complained,
                c.complaint_rate * 100.0,
                classes.join(", ")
            );
        }
    }
    if o.campaigns.iter().any(|c| !c.variants.is_empty()) {
        println!(
            "\n{:<24} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9}  decision",
            "variants", "variant", "delivered", "bounced", "u.opens", "u.clicks", "machine"
        );
        for c in o.campaigns.iter().filter(|c| !c.variants.is_empty()) {
            let decision = c
                .experiment
                .as_ref()
                .and_then(|x| {
                    Some(format!(
                        "{} ({})",
                        x.get("winner")?.as_str()?,
                        x.get("how")?.as_str()?
                    ))
                })
                .unwrap_or_else(|| "testing".into());
            for (v, f) in &c.variants {
                let g = |k: &str| f.get(k).copied().unwrap_or(0);
                println!(
                    "{:<24} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9}  {}",
                    c.campaign,
                    v,
                    g("delivered"),
                    g("bounced"),
                    g("unique_opened"),
                    g("unique_clicked"),
                    g("opened_machine") + g("clicked_machine"),
                    decision
                );
            }
        }
    }
    if o.campaigns
        .iter()
        .any(|c| c.conversions.count > 0 || !c.conversions.cost.is_empty())
    {
        print_conversions(o);
    }
    println!(
        "\nsends stream: {} waiting ({} being processed); delayed set: {} (retries and send_at)",
        o.stream_waiting, o.stream_pending, o.scheduled
    );
}

/// Money by currency: `179.70 EUR, 1200 JPY`.
fn amounts(m: &std::collections::BTreeMap<String, f64>) -> String {
    let v: Vec<String> = m
        .iter()
        .map(|(cur, v)| match crate::conversions::Currency::parse(cur) {
            Ok(c) => format!(
                "{} {cur}",
                c.decimal((v * 10f64.powi(c.exponent() as i32)).round() as i64)
            ),
            Err(_) => format!("{v} {cur}"),
        })
        .collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(", ")
    }
}

/// The conversions section: count, people, revenue, cost and ROI per campaign, then per
/// link, variant and kind.
fn print_conversions(o: &Overview) {
    println!(
        "\n{:<24} {:>11} {:>9}  revenue / cost / roi",
        "conversions", "conversions", "people"
    );
    for c in &o.campaigns {
        let f = &c.conversions;
        if f.count == 0 && f.cost.is_empty() {
            continue;
        }
        let roi: Vec<String> = f
            .roi
            .iter()
            .map(|(cur, r)| format!("{:.1}% {cur}", r * 100.0))
            .collect();
        println!(
            "{:<24} {:>11} {:>9}  {} / {} / {}",
            c.campaign,
            f.count,
            f.people,
            amounts(&f.revenue),
            amounts(&f.cost),
            if roi.is_empty() {
                "-".into()
            } else {
                roi.join(", ")
            }
        );
        for (what, slices) in [
            ("link", &f.link),
            ("variant", &f.variant),
            ("kind", &f.kind),
        ] {
            for (name, s) in slices {
                println!(
                    "  {what} {:<19} {:>11} {:>9}  {}",
                    name,
                    s.count,
                    s.people.map_or(String::new(), |p| p.to_string()),
                    amounts(&s.revenue)
                );
            }
        }
    }
}

/// `paloma stats --touches`: the contact-pressure curve.
pub async fn touches(
    settings: &Settings,
    campaign: Option<&str>,
) -> anyhow::Result<Vec<crate::stats::TouchRow>> {
    let client = redis_client(settings).await?;
    let mut conn = manager(&client, std::time::Duration::from_secs(30)).await?;
    let keys = Keys::new(&settings.redis.prefix);
    Ok(crate::stats::touches(&mut conn, &keys, campaign).await?)
}

pub fn print_touches(rows: &[crate::stats::TouchRow], campaign: Option<&str>) {
    println!(
        "contact pressure ({}): the sends that were their recipient's Nth marketing message in the last year",
        campaign.unwrap_or("every campaign")
    );
    println!(
        "{:<8} {:>11} {:>9} {:>9} {:>9} {:>9} {:>11}  revenue per delivered",
        "touch", "recipients", "opens", "clicks", "unsubs", "complaints", "conversions"
    );
    for r in rows {
        let revenue: Vec<String> = r
            .revenue_per_delivered
            .iter()
            .map(|(c, v)| format!("{v:.4} {c}"))
            .collect();
        println!(
            "{:<8} {:>11} {:>8.2}% {:>8.2}% {:>8.2}% {:>9.3}% {:>10.2}%  {}",
            r.bucket,
            r.recipients,
            r.open_rate * 100.0,
            r.click_rate * 100.0,
            r.unsubscribe_rate * 100.0,
            r.complaint_rate * 100.0,
            r.conversion_rate * 100.0,
            if revenue.is_empty() {
                "-".to_string()
            } else {
                revenue.join(", ")
            }
        );
    }
    println!("(opens and clicks: people's unique ones per delivered; machine hits excluded; conversions: attributed ones per delivered)");
}

/// What is known about one recipient: engagement, suppression, recent sends.
pub async fn recipient(
    settings: &Settings,
    addr: &str,
) -> anyhow::Result<BTreeMap<String, String>> {
    let client = redis_client(settings).await?;
    let mut conn = manager(&client, std::time::Duration::from_secs(10)).await?;
    let keys = Keys::new(&settings.redis.prefix);
    Ok(crate::stats::recipient(&mut conn, &keys, addr).await?)
}

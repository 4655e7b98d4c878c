//! The operator commands besides `run`: `enqueue` (JSON lines or CSV into the sends stream),
//! `stats` (per-campaign counters, read by [`crate::stats`]), `suppress` and `campaign`.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};
use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::{Map, Value};

use crate::config::Settings;
use crate::queue::Keys;
pub use crate::stats::{CampaignStats, Overview};
use crate::store::replication::{AckError, Acks};
use crate::store::{connect as manager, redis_target as redis_client};

const ENQUEUE_BATCH: usize = 1000;

/// Where `enqueue` reads from.
pub enum Input {
    Stdin,
    File(std::path::PathBuf),
}

pub struct CsvOptions {
    pub campaign: String,
    pub template: String,
}

pub struct EnqueueReport {
    pub enqueued: u64,
    pub rejected: u64,
}

fn open(input: &Input) -> anyhow::Result<Box<dyn BufRead>> {
    Ok(match input {
        Input::Stdin => Box::new(std::io::BufReader::new(std::io::stdin())),
        Input::File(p) => Box::new(std::io::BufReader::new(
            std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?,
        )),
    })
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

/// Reads jobs and XADDs them to `{prefix}sends`, pipelined per 1,000.
pub async fn enqueue(
    settings: &Settings,
    input: Input,
    csv: Option<CsvOptions>,
) -> anyhow::Result<EnqueueReport> {
    let client = redis_client(settings).await?;
    let mut conn = manager(&client, std::time::Duration::from_secs(30)).await?;
    let acks = acks(&mut conn, settings).await?;
    let keys = Keys::new(&settings.redis.prefix);
    let mut reader = open(&input)?;
    // A byte-order mark (spreadsheet and Windows exports) is not part of the first line or
    // the header row; removed from the bytes, before a quote of a quoted header is read.
    let head = reader.fill_buf().context("reading the input")?;
    if head.starts_with(b"\xEF\xBB\xBF") {
        reader.consume(3);
    }
    let checker = Checker::new(settings);
    let bar = progress_bar(&input);
    let started = Instant::now();
    let mut report = EnqueueReport {
        enqueued: 0,
        rejected: 0,
    };
    let mut batch: Vec<String> = Vec::with_capacity(ENQUEUE_BATCH);

    // Each batch is checked against the memory high-water mark first, and written in one
    // MULTI/EXEC: what is reported enqueued is exactly what is in the stream.
    let high_water = settings.redis.high_water;
    let flush = |batch: &mut Vec<String>, conn: &mut crate::store::RedisConn| {
        let mut p = redis::pipe();
        for job in batch.iter() {
            p.cmd("XADD").arg(&keys.sends).arg("*").arg("job").arg(job);
        }
        let acks = &acks;
        let jobs = batch.len() as u64;
        batch.clear();
        let mut c = conn.clone();
        let (sends, scheduled) = (&keys.sends, &keys.scheduled);
        async move {
            let look = crate::store::checks::memory(&mut c, sends, scheduled)
                .await
                .context("looking at Redis memory")?;
            if let Some(why) = look.and_then(|m| m.refusal(high_water, 0)) {
                return Err(anyhow::Error::msg(why));
            }
            acks.write::<redis::Value>(&mut c, &p, true, "enqueue")
                .await
                .map_err(|e| match e {
                    AckError::Redis(e) => {
                        let full = crate::store::checks::is_full(&e);
                        let e = anyhow::Error::from(e);
                        match full {
                            true => e.context(
                                "Redis is full (maxmemory reached); nothing of this batch was written",
                            ),
                            false => e.context("XADD to Redis"),
                        }
                    }
                    // Written on the primary, perhaps not kept: enqueued again, the same
                    // job ids are delivered once.
                    unconfirmed => anyhow::Error::from(unconfirmed),
                })?;
            anyhow::Ok(jobs)
        }
    };
    // Stops with what was enqueued and where the rest begins.
    let stopped = |e: anyhow::Error, enqueued: u64, from_line: usize| {
        e.context(format!(
            "stopped: {enqueued} jobs were enqueued; the input from line {from_line} on was not (enqueue it from there once Redis takes it again; a job id already enqueued is delivered once)"
        ))
    };
    let mut batch_line = 1usize;

    let push = |line_no: usize,
                job: Result<String, String>,
                batch: &mut Vec<String>,
                report: &mut EnqueueReport| {
        match job.and_then(|j| checker.check(&j).map(|()| j)) {
            Ok(j) => batch.push(j),
            Err(e) => {
                report.rejected += 1;
                bar.suspend(|| eprintln!("line {line_no}: {e}; not enqueued"));
            }
        }
    };

    match csv {
        None => {
            let mut read = 0u64;
            for (i, line) in reader.lines().enumerate() {
                let line = line.with_context(|| format!("reading line {}", i + 1))?;
                read += line.len() as u64 + 1;
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                let job = match serde_json::from_str::<Value>(line) {
                    // A campaign name the intake would refuse is refused here, with the rule.
                    Ok(Value::Object(o)) => match o.get("campaign") {
                        Some(Value::String(c)) if !crate::job::CampaignId::allowed(c) => {
                            Err(format!("campaign {:?}: {}", c, crate::job::CAMPAIGN_RULE))
                        }
                        _ => Ok(line.to_string()),
                    },
                    Ok(_) => Err("not a JSON object".to_string()),
                    Err(e) => Err(format!("invalid JSON ({e})")),
                };
                if batch.is_empty() {
                    batch_line = i + 1;
                }
                push(i + 1, job, &mut batch, &mut report);
                if batch.len() >= ENQUEUE_BATCH {
                    report.enqueued += flush(&mut batch, &mut conn)
                        .await
                        .map_err(|e| stopped(e, report.enqueued, batch_line))?;
                    show(&bar, read, &report, started);
                }
            }
        }
        Some(opts) => {
            if !crate::job::CampaignId::allowed(&opts.campaign) {
                bail!(
                    "--campaign {:?}: {}; nothing was enqueued",
                    opts.campaign,
                    crate::job::CAMPAIGN_RULE
                );
            }
            let mut rdr = csv::ReaderBuilder::new()
                .flexible(false)
                .from_reader(reader);
            let headers: Vec<String> = rdr
                .headers()
                .context("reading the CSV header row")?
                .iter()
                .map(|h| h.trim().to_string())
                .collect();
            let Some(email_col) = headers
                .iter()
                .position(|h| h.trim().eq_ignore_ascii_case("email"))
            else {
                bail!("the CSV has no `email` column (header row: {:?})", headers);
            };
            let mut read = 0u64;
            for (i, rec) in rdr.records().enumerate() {
                let at = match &rec {
                    Ok(r) => r.position(),
                    Err(e) => e.position(),
                };
                let line_no = at.map_or(i + 2, |p| p.line() as usize);
                read = at.map_or(read, |p| p.byte());
                let job = rec
                    .map_err(|e| csv_row_error(&e, headers.len()))
                    .map(|rec| {
                        let email = rec.get(email_col).unwrap_or_default().trim().to_string();
                        let mut data = Map::new();
                        let mut id = None;
                        for (h, v) in headers.iter().zip(rec.iter()) {
                            if h.eq_ignore_ascii_case("email") {
                                continue;
                            }
                            if h == "id" {
                                id = Some(v.to_string());
                                continue;
                            }
                            data.insert(h.to_string(), Value::String(v.to_string()));
                        }
                        // Deterministic id: enqueueing the same list twice sends once.
                        let id = id.unwrap_or_else(|| csv_job_id(&opts.campaign, &email));
                        serde_json::json!({
                            "id": id,
                            "campaign": opts.campaign,
                            "template": opts.template,
                            "to": email,
                            "data": data,
                        })
                        .to_string()
                    });
                if batch.is_empty() {
                    batch_line = line_no;
                }
                push(line_no, job, &mut batch, &mut report);
                if batch.len() >= ENQUEUE_BATCH {
                    report.enqueued += flush(&mut batch, &mut conn)
                        .await
                        .map_err(|e| stopped(e, report.enqueued, batch_line))?;
                    show(&bar, read, &report, started);
                }
            }
        }
    }
    if !batch.is_empty() {
        report.enqueued += flush(&mut batch, &mut conn)
            .await
            .map_err(|e| stopped(e, report.enqueued, batch_line))?;
    }
    bar.finish_and_clear();
    Ok(report)
}

/// A CSV row that could not be read, said in terms of the file: a row with another number
/// of cells than the header row (a missing or extra column), or what the reader found.
fn csv_row_error(e: &csv::Error, columns: usize) -> String {
    match e.kind() {
        csv::ErrorKind::UnequalLengths { len, .. } => format!(
            "{len} column(s), the header row has {columns} (a missing or extra column; quote a value that holds a comma)"
        ),
        _ => e.to_string(),
    }
}

/// `campaign:address` (lowercased), or, where that would pass the 200 characters a job id
/// may have, `campaign:` and the SHA-256 of the address: still deterministic.
fn csv_job_id(campaign: &str, email: &str) -> String {
    let email = email.to_ascii_lowercase();
    if campaign.len() + 1 + email.len() <= 200 {
        return format!("{campaign}:{email}");
    }
    use sha2::{Digest, Sha256};
    use std::fmt::Write;
    let mut id = String::with_capacity(campaign.len() + 65);
    id.push_str(campaign);
    id.push(':');
    for b in Sha256::digest(email.as_bytes()) {
        let _ = write!(id, "{b:02x}");
    }
    id
}

/// What `enqueue` checks of each job before it is sent: what the intake would refuse (the
/// intake's own parse: fields, address, sizes, header injection) and a template the
/// templates directory does not have, so that a bad row is reported with its line at once
/// instead of becoming a dead letter later.
struct Checker {
    max_job_bytes: usize,
    /// None when the templates directory cannot be read here (the CLI may run on another
    /// machine than the daemons): template names are then left to the daemon.
    templates: Option<crate::render::Templates>,
}

impl Checker {
    fn new(settings: &Settings) -> Checker {
        let dir = &settings.templates.dir;
        let templates = match crate::render::Templates::load(dir, false) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("paloma: template names are not checked here ({e})");
                None
            }
        };
        Checker {
            max_job_bytes: settings.intake.max_job_bytes,
            templates,
        }
    }

    fn check(&self, job: &str) -> Result<(), String> {
        let parsed = crate::job::Job::parse(job.as_bytes(), self.max_job_bytes)
            .map_err(|(e, _)| e.to_string())?;
        match &self.templates {
            Some(t) if !t.contains(&parsed.template) => {
                let mut names: Vec<&str> = t.names().collect();
                names.sort_unstable();
                Err(format!(
                    "unknown template {:?} (templates: {})",
                    parsed.template,
                    names.join(", ")
                ))
            }
            _ => Ok(()),
        }
    }
}

/// Progress on a terminal (hidden when stderr is not one): bytes of a file read so far,
/// or a count for standard input, with what was enqueued and rejected.
fn progress_bar(input: &Input) -> indicatif::ProgressBar {
    let size = match input {
        Input::File(p) => std::fs::metadata(p).ok().map(|m| m.len()),
        Input::Stdin => None,
    };
    let (bar, template) = match size {
        Some(n) => (
            indicatif::ProgressBar::new(n),
            "{bar:30} {bytes}/{total_bytes} {elapsed} · {msg}",
        ),
        None => (
            indicatif::ProgressBar::new_spinner(),
            "{spinner} {elapsed} · {msg}",
        ),
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar
}

fn show(bar: &indicatif::ProgressBar, read: u64, report: &EnqueueReport, started: Instant) {
    bar.set_position(read);
    let rate = report.enqueued as f64 / started.elapsed().as_secs_f64().max(0.001);
    bar.set_message(format!(
        "enqueued {} ({rate:.0}/s), rejected {}",
        report.enqueued, report.rejected
    ));
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
    println!(
        "\nsends stream: {} waiting ({} being processed); delayed set: {} (retries and send_at)",
        o.stream_waiting, o.stream_pending, o.scheduled
    );
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
    let acks = acks(&mut conn, settings).await?;
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
        "{:<8} {:>11} {:>9} {:>9} {:>9} {:>9}",
        "touch", "recipients", "opens", "clicks", "unsubs", "complaints"
    );
    for r in rows {
        println!(
            "{:<8} {:>11} {:>8.2}% {:>8.2}% {:>8.2}% {:>9.3}%",
            r.bucket,
            r.recipients,
            r.open_rate * 100.0,
            r.click_rate * 100.0,
            r.unsubscribe_rate * 100.0,
            r.complaint_rate * 100.0
        );
    }
    println!("(opens and clicks: people's unique ones per delivered; machine hits excluded)");
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

/// What `paloma campaign …` does.
pub enum CampaignAction {
    List { json: bool },
    Pause(String),
    Resume(String),
    Cancel { campaign: String, yes: bool },
}

pub async fn campaign(settings: &Settings, action: CampaignAction) -> anyhow::Result<()> {
    use crate::control;
    let client = redis_client(settings).await?;
    let mut conn = manager(&client, std::time::Duration::from_secs(30)).await?;
    let acks = acks(&mut conn, settings).await?;
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

/// What `paloma experiment …` does.
pub enum ExperimentAction {
    Status { campaign: String, json: bool },
    Pick { campaign: String, variant: String },
}

pub async fn experiment(settings: &Settings, action: ExperimentAction) -> anyhow::Result<()> {
    use crate::experiment::{self, judge};
    let campaign = match &action {
        ExperimentAction::Status { campaign, .. } | ExperimentAction::Pick { campaign, .. } => {
            campaign.clone()
        }
    };
    let Some(rule) = settings.experiments.iter().find(|x| x.campaign == campaign) else {
        bail!("no [[experiments]] for campaign {campaign:?} in this config");
    };
    let client = redis_client(settings).await?;
    let mut conn = manager(&client, std::time::Duration::from_secs(10)).await?;
    let keys = Keys::new(&settings.redis.prefix).retaining(&settings.events);
    let figures = experiment::figures(&mut conn, &keys, rule).await?;
    let now = judge::judge(&figures, rule.confidence.0, &rule.fallback);
    let state: BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg(keys.experiment(&campaign))
        .query_async(&mut conn)
        .await?;
    match action {
        ExperimentAction::Status { json, .. } => {
            let held: i64 = redis::cmd("ZCARD")
                .arg(keys.held(&campaign))
                .query_async(&mut conn)
                .await?;
            let decide_at = state
                .get("started")
                .and_then(|s| s.parse::<i64>().ok())
                .map(|s| s + rule.decide_after.get().as_millis() as i64);
            if json {
                let v = serde_json::json!({
                    "campaign": campaign,
                    "metric": rule.metric.as_str(),
                    "confidence": rule.confidence.0,
                    "fallback": rule.fallback,
                    "held": held,
                    "decide_at": decide_at.map(crate::queue::events::rfc3339_ms),
                    "state": crate::stats::experiment_state(&state),
                    "now": now,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!(
                "experiment {campaign}: {} variants, {:.1}% in the test, by people's unique {} per delivered, at {:.1}% confidence (fallback {})",
                rule.variants.len(),
                rule.test_share.0 * 100.0,
                rule.metric.as_str(),
                rule.confidence.0 * 100.0,
                rule.fallback
            );
            match (state.get("winner"), decide_at) {
                (Some(w), _) => println!(
                    "decided: {w} ({}); {held} jobs still held",
                    state.get("how").map(String::as_str).unwrap_or("?")
                ),
                (None, Some(at)) => println!(
                    "testing: decides at {}; {held} jobs held until then",
                    crate::queue::events::rfc3339_ms(at)
                ),
                (None, None) => println!("not started: no job of {campaign} seen yet"),
            }
            println!(
                "\n{:<16} {:>10} {:>10} {:>8}",
                "variant",
                "delivered",
                rule.metric.as_str(),
                "rate"
            );
            for f in &now.variants {
                println!(
                    "{:<16} {:>10} {:>10} {:>7.2}%",
                    f.variant,
                    f.delivered,
                    f.hits,
                    f.rate * 100.0
                );
            }
            println!(
                "\nleader so far: {} (p = {:.4}: {})",
                now.leader,
                now.p_value,
                if now.significant {
                    "significant"
                } else {
                    "not significant yet"
                }
            );
        }
        ExperimentAction::Pick { variant, .. } => {
            if !rule.variants.iter().any(|v| v.name == variant) {
                bail!(
                    "{variant:?} is not a variant of {campaign} ({})",
                    rule.variants
                        .iter()
                        .map(|v| v.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let mut verdict = now;
            verdict.winner = variant.clone();
            if experiment::record(&mut conn, &keys, rule, &verdict, "manual").await? {
                eprintln!(
                    "{campaign}: {variant} picked; the held jobs go out with it within a second"
                );
            } else {
                let (winner, how): (Option<String>, Option<String>) = redis::cmd("HMGET")
                    .arg(keys.experiment(&campaign))
                    .arg("winner")
                    .arg("how")
                    .query_async(&mut conn)
                    .await?;
                bail!(
                    "{campaign} was already decided: {} ({}); nothing changed",
                    winner.unwrap_or_default(),
                    how.unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

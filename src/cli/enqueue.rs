//! `paloma enqueue`: JSON lines or a CSV list into the sends stream, each job checked as the
//! intake would, per 1,000 in one transaction confirmed by the replicas.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::{Map, Value};

use crate::config::Settings;
use crate::queue::Keys;
use crate::store::replication::AckError;
use crate::store::{connect as manager, redis_target as redis_client};

/// Jobs per transaction.
pub(super) const ENQUEUE_BATCH: usize = 1000;

/// `paloma enqueue`: JSON lines (one job per line) or, with --csv, a CSV list.
#[derive(clap::Args)]
pub struct Args {
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
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let settings = super::load(&args.config)?;
    let input = if args.file == "-" {
        Input::Stdin
    } else {
        Input::File(args.file.into())
    };
    let csv = args.csv.then(|| CsvOptions {
        campaign: args.campaign.unwrap_or_default(),
        template: args.template.unwrap_or_default(),
    });
    let report = enqueue(&settings, input, csv).await?;
    eprintln!(
        "enqueued {} jobs, rejected {}",
        report.enqueued, report.rejected
    );
    Ok(match report.rejected {
        0 => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    })
}

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

pub(super) fn open(input: &Input) -> anyhow::Result<Box<dyn BufRead>> {
    Ok(match input {
        Input::Stdin => Box::new(std::io::BufReader::new(std::io::stdin())),
        Input::File(p) => Box::new(std::io::BufReader::new(
            std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?,
        )),
    })
}

/// Reads jobs and XADDs them to `{prefix}sends`, pipelined per 1,000.
pub async fn enqueue(
    settings: &Settings,
    input: Input,
    csv: Option<CsvOptions>,
) -> anyhow::Result<EnqueueReport> {
    let client = redis_client(settings).await?;
    let mut conn = manager(&client, std::time::Duration::from_secs(30)).await?;
    let acks = super::acks(&mut conn, settings).await?;
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

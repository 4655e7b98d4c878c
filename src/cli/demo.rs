//! `paloma demo`: the quick start. Starts a throwaway Redis (unless given one), a local SMTP
//! capture that writes every message it receives as an `.eml` file, enqueues a sample
//! campaign, runs the daemon until every job has its terminal event, and prints a summary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use super::{enqueue, stats, Input};
use crate::config::Settings;

pub struct DemoOptions {
    pub count: usize,
    pub dir: PathBuf,
    pub redis_url: Option<String>,
    pub templates: PathBuf,
}

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
    demo(DemoOptions {
        count: args.count,
        dir: args.dir,
        redis_url: args.redis_url,
        templates: args.templates,
    })
    .await?;
    Ok(ExitCode::SUCCESS)
}

/// A minimal SMTP server that accepts everything and writes each message to `dir`.
pub struct Capture {
    pub addr: SocketAddr,
    pub received: Arc<AtomicU64>,
}

impl Capture {
    pub async fn start(dir: &Path) -> anyhow::Result<Capture> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let received = Arc::new(AtomicU64::new(0));
        let (dir, count) = (dir.to_path_buf(), received.clone());
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let _ = sock.set_nodelay(true);
                tokio::spawn(session(sock, dir.clone(), count.clone()));
            }
        });
        Ok(Capture { addr, received })
    }
}

async fn session(
    sock: tokio::net::TcpStream,
    dir: PathBuf,
    count: Arc<AtomicU64>,
) -> std::io::Result<()> {
    let (r, mut w) = sock.into_split();
    let mut r = BufReader::new(r);
    w.write_all(b"220 paloma-demo capture ESMTP\r\n").await?;
    let mut line = String::new();
    let (mut from, mut rcpt) = (String::new(), Vec::<String>::new());
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" => b"250-paloma-demo\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 52428800\r\n",
            "HELO" => b"250 paloma-demo\r\n",
            "MAIL" => {
                from = line[10..].trim().to_string();
                rcpt.clear();
                b"250 2.1.0 Ok\r\n"
            }
            "RCPT" => {
                rcpt.push(line[8..].trim().to_string());
                b"250 2.1.5 Ok\r\n"
            }
            "DATA" => {
                w.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    .await?;
                let mut body = Vec::with_capacity(16 * 1024);
                body.extend_from_slice(
                    format!(
                        "X-Envelope-From: {from}\r\nX-Envelope-To: {}\r\n",
                        rcpt.join(", ")
                    )
                    .as_bytes(),
                );
                let mut l = Vec::new();
                loop {
                    l.clear();
                    if r.read_until(b'\n', &mut l).await? == 0 {
                        return Ok(());
                    }
                    if l == b".\r\n" || l == b".\n" {
                        break;
                    }
                    let unstuffed = if l.starts_with(b"..") {
                        &l[1..]
                    } else {
                        &l[..]
                    };
                    body.extend_from_slice(unstuffed);
                }
                let n = count.fetch_add(1, Ordering::Relaxed) + 1;
                tokio::fs::write(dir.join(format!("{n:05}.eml")), &body).await?;
                b"250 2.0.0 Ok: queued\r\n"
            }
            "RSET" | "NOOP" => b"250 2.0.0 Ok\r\n",
            "QUIT" => {
                w.write_all(b"221 2.0.0 Bye\r\n").await?;
                return Ok(());
            }
            _ => b"502 5.5.2 Command not recognized\r\n",
        };
        w.write_all(reply).await?;
    }
}

/// A redis-server child on a free port, killed on drop.
pub struct ThrowawayRedis {
    child: std::process::Child,
    pub url: String,
}

impl ThrowawayRedis {
    /// Starts `redis-server`; when there is none, installs it first where that is this
    /// process's to do (root on Debian or Ubuntu, as the tests' peers are installed), or
    /// says in one line what to run.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        let (child, port) = match Self::spawn(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                install_redis()?;
                Self::spawn(dir).map_err(|e| {
                    anyhow::anyhow!("redis-server was installed but does not start ({e}); pass --redis-url redis://HOST:PORT/ to use another Redis")
                })?
            }
            r => r.map_err(|e| anyhow::anyhow!("cannot start redis-server ({e}); pass --redis-url redis://HOST:PORT/ to use another Redis"))?,
        };
        // Killed on drop from here on, also when it never listens.
        let redis = ThrowawayRedis {
            child,
            url: format!("redis://127.0.0.1:{port}/"),
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("redis-server did not start listening on port {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(redis)
    }

    fn spawn(dir: &Path) -> std::io::Result<(std::process::Child, u16)> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok((child, port))
    }
}

/// What to run to get redis-server, for the one line the demo stops with.
const INSTALL_HINT: &str = "install it (Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis) or pass --redis-url redis://HOST:PORT/";

/// Installs redis-server with apt-get when this process is root on a system that has it;
/// otherwise the error says what to run.
fn install_redis() -> anyhow::Result<()> {
    let have_apt = std::process::Command::new("apt-get")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !(have_apt && root) {
        bail!("redis-server is not installed: {INSTALL_HINT}");
    }
    eprintln!("redis-server is not installed: installing it (apt-get install redis-server) …");
    let ok = std::process::Command::new("sh")
        .args([
            "-c",
            "apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server >/dev/null",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        bail!("installing redis-server with apt-get failed: {INSTALL_HINT}");
    }
    Ok(())
}

impl Drop for ThrowawayRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const FIRST: [&str; 8] = [
    "Ana", "Björn", "Chloé", "Dmitri", "Elif", "Farah", "Gonzalo", "Hana",
];
const LAST: [&str; 6] = [
    "García", "Müller", "O'Brien", "Nakamura", "Silva", "Kowalski",
];

pub async fn demo(mut opts: DemoOptions) -> anyhow::Result<()> {
    // Run from elsewhere (`cargo run --manifest-path …`): the checkout this was built from.
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("templates");
    if !opts.templates.join("newsletter").is_dir()
        && opts.templates == Path::new("templates")
        && built_from.join("newsletter").is_dir()
    {
        opts.templates = built_from;
    }
    if !opts.templates.join("newsletter").is_dir() {
        bail!(
            "templates not found at {} (run the demo from the repository root, or pass --templates DIR)",
            opts.templates.display()
        );
    }
    let mail_dir = opts.dir.join("mail");
    if mail_dir.exists() {
        std::fs::remove_dir_all(&mail_dir)
            .with_context(|| format!("clearing {}", mail_dir.display()))?;
    }
    std::fs::create_dir_all(&opts.dir)?;
    let redis = match &opts.redis_url {
        Some(_) => None,
        None => Some(ThrowawayRedis::start(&opts.dir)?),
    };
    let redis_url = opts
        .redis_url
        .clone()
        .unwrap_or_else(|| redis.as_ref().map(|r| r.url.clone()).unwrap_or_default());
    let capture = Capture::start(&mail_dir).await?;
    let prefix = format!("paloma-demo:{}:", std::process::id());
    let toml = format!(
        r#"
[redis]
url = "{redis_url}"
prefix = "{prefix}"
[templates]
dir = "{templates}"
[sender]
from = "Paloma Shop <news@shop.example>"
helo = "demo.shop.example"
[delivery]
mode = "relay"
relay = "{relay}"
tls = "none"
connections = 8
[tracking]
base_url = "http://127.0.0.1:8080"
secret = "{secret}"
"#,
        templates = opts.templates.display(),
        relay = capture.addr,
        // A fresh key per run: the demo's links are signed like any others, and a fixed
        // example key is exactly what the daemon refuses.
        secret = {
            use rand::Rng;
            let bytes: [u8; 32] = rand::thread_rng().gen();
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        },
    );
    let settings = Settings::from_toml(&toml, std::iter::empty())?;

    let mut jobs = String::new();
    for i in 0..opts.count {
        let first = FIRST[i % FIRST.len()];
        let last = LAST[i % LAST.len()];
        let job = serde_json::json!({
            "id": format!("demo-{i}"),
            "campaign": "demo-spring",
            "template": "newsletter",
            "to": format!("{}.{}@example.com", first.to_lowercase().replace(['ö', 'é'], "o"), i),
            "to_name": format!("{first} {last}"),
            "data": {
                "first_name": first,
                "products": [
                    {"name": "Linen shirt", "price": "39.00", "url": "https://shop.example/p/linen?ref=demo"},
                    {"name": "Straw hat <limited>", "price": "19.50", "url": "https://shop.example/p/hat"},
                ],
            },
        });
        jobs.push_str(&job.to_string());
        jobs.push('\n');
    }
    // One bad job: `paloma enqueue` refuses its line (and says why); the same job put on
    // the stream directly, as a campaign system may, becomes a dead letter.
    const BAD: &str = r#"{"id":"demo-bad","campaign":"demo-spring","template":"newsletter","to":"not-an-address"}"#;
    jobs.push_str(BAD);
    jobs.push('\n');
    let list = opts.dir.join("jobs.jsonl");
    std::fs::write(&list, &jobs)?;
    let report = enqueue(&settings, Input::File(list.clone()), None).await?;
    println!(
        "enqueued {} jobs from {} ({} refused, above)",
        report.enqueued,
        list.display(),
        report.rejected
    );
    let mut conn = redis::Client::open(redis_url.as_str())?
        .get_multiplexed_async_connection()
        .await
        .context("connecting to the demo's Redis")?;
    redis::cmd("XADD")
        .arg(format!("{prefix}sends"))
        .arg("*")
        .arg("job")
        .arg(BAD)
        .query_async::<()>(&mut conn)
        .await
        .context("adding the bad job to the stream")?;

    let started = Instant::now();
    let expected = report.enqueued as i64 + 1;
    let watcher_settings = settings.clone();
    let done = async move {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if let Ok(o) = stats(&watcher_settings, Some("demo-spring")).await {
                let c = &o.campaigns[0];
                if c.delivered + c.bounced + c.failed + c.suppressed + c.dead >= expected {
                    return;
                }
            }
            if started.elapsed() > Duration::from_secs(120) {
                eprintln!("demo: gave up waiting after 120 s");
                return;
            }
        }
    };
    crate::daemon::run(settings.clone(), done).await?;
    let elapsed = started.elapsed();
    let o = stats(&settings, Some("demo-spring")).await?;
    println!();
    super::print_stats(&o);
    println!(
        "\n{} messages captured in {:.2} s ({:.0} msg/s) in {}/",
        capture.received.load(Ordering::Relaxed),
        elapsed.as_secs_f64(),
        capture.received.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64(),
        mail_dir.display()
    );
    println!("open one: {}", mail_dir.join("00001.eml").display());
    println!("the bad job put straight on the stream is in the dead-letter stream {prefix}dead, with its reason");
    drop(redis);
    Ok(())
}

//! Test harness: real peers on free loopback ports. redis-server, Postfix's smtp-sink
//! (dumping every message), dnsmasq, and the paloma binary itself, all started and killed
//! by the tests. Nothing is installed from here: `scripts/install-test-peers` installs the
//! peers (`scripts/test` runs it before `cargo test`), and a test whose peer is missing
//! fails with one line per missing tool saying what to install.

#![allow(dead_code)]

pub mod bounce;
pub mod mx;
pub mod postfix;
pub mod replicas;
pub mod track;

use std::collections::HashMap;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const SECRET: &str = "test-secret-0123456789abcdef";

/// A program (or module, or library) a test runs, how to tell it is there, and the Debian
/// package that brings it (what `scripts/install-test-peers` installs).
pub struct Tool {
    pub name: &'static str,
    /// A shell test that succeeds when the tool is there.
    pub probe: &'static str,
    pub package: &'static str,
}

const fn bin(name: &'static str, probe: &'static str, package: &'static str) -> Tool {
    Tool {
        name,
        probe,
        package,
    }
}

/// The peers of most scenarios and of the benches.
pub const PEERS: &[Tool] = &[
    bin("redis-server", "command -v redis-server", "redis-server"),
    bin("redis-cli", "command -v redis-cli", "redis-tools"),
    bin("smtp-sink", "test -x /usr/sbin/smtp-sink", "postfix"),
    bin("smtp-source", "test -x /usr/sbin/smtp-source", "postfix"),
    bin("postfix", "test -x /usr/sbin/postfix", "postfix"),
    bin(
        "dnsmasq",
        "command -v dnsmasq || test -x /usr/sbin/dnsmasq",
        "dnsmasq-base",
    ),
    bin("openssl", "command -v openssl", "openssl"),
    bin(
        "python3 with aiosmtpd",
        "/usr/bin/python3 -c 'import aiosmtpd' 2>/dev/null",
        "python3-aiosmtpd",
    ),
];

/// Headless Chromium and its WebDriver (the report pages' test).
pub const BROWSER: &[Tool] = &[
    bin("chromium", "test -x /usr/bin/chromium", "chromium"),
    bin(
        "chromedriver",
        "test -x /usr/bin/chromedriver",
        "chromium-driver",
    ),
];

/// libfaketime, for a daemon whose wall clock is off.
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
pub const FAKETIME: &[Tool] = &[bin(
    "libfaketime",
    "test -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "faketime",
)];

/// The HTTP load generator of the tracking bench.
pub const WRK: &[Tool] = &[bin("wrk", "command -v wrk", "wrk")];

/// One line per tool of `tools` that is not there, saying what to install.
pub fn missing(tools: &[Tool]) -> Vec<String> {
    tools
        .iter()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", t.probe])
                .env(
                    "PATH",
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                )
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|t| {
            format!(
                "{} missing: run scripts/install-test-peers (or apt-get install {})",
                t.name, t.package
            )
        })
        .collect()
}

/// Fails, one line per missing tool, unless every tool of `tools` is there.
pub fn require(tools: &[Tool]) {
    let lines = missing(tools);
    assert!(lines.is_empty(), "\n{}", lines.join("\n"));
}

/// [`require`] for [`PEERS`], looked up once per process.
pub fn require_tools() {
    static MISSING: OnceLock<Vec<String>> = OnceLock::new();
    let lines = MISSING.get_or_init(|| missing(PEERS));
    assert!(lines.is_empty(), "\n{}", lines.join("\n"));
}

/// Holds the machine for one scenario among those that take it: what it measures (a
/// timing bound, throughput, memory, a failover's pace) must not share the CPU with
/// another such scenario. All scenarios run in one test binary, side by side on the test
/// threads; the ones that take this run one at a time. A failed holder does not block the
/// rest.
pub fn exclusive() -> MutexGuard<'static, ()> {
    static MACHINE: Mutex<()> = Mutex::new(());
    MACHINE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The lowest port of the kernel's ephemeral range (outgoing connections' local ports).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// Every port this process has handed out: never the same one twice.
static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// A port for a test peer on loopback. Below the kernel's ephemeral range (so no outgoing
/// connection's local port can take it between here and the peer's bind), chosen at random
/// (so that test binaries running at once rarely collide), never handed out twice by this
/// process (so threads of one binary cannot get the same one), and bindable on 127.0.0.1
/// over TCP and UDP right now.
pub fn free_port() -> u16 {
    use rand::Rng;
    let hi = ephemeral_low().clamp(2048, 32000);
    let lo = if hi > 20000 { 20000 } else { 1024 };
    let mut taken = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = rand::thread_rng();
    for _ in 0..10_000 {
        let port = rng.gen_range(lo..hi);
        if taken.contains(&port) {
            continue;
        }
        let tcp = TcpListener::bind(("127.0.0.1", port)).is_ok();
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok();
        if tcp && udp {
            taken.insert(port);
            return port;
        }
    }
    panic!("no free port in {lo}..{hi}");
}

pub fn wait_port(host: &str, port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect((host, port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listening on {host}:{port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sbin(name: &str) -> String {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"] {
        let p = format!("{dir}/{name}");
        if Path::new(&p).exists() {
            return p;
        }
    }
    name.to_string()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// A redis-server on a free port, with its own directory (AOF on, so a restart keeps data).
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    args: Vec<String>,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_with(&["--appendonly", "yes", "--appendfsync", "always"])
    }

    /// With other server options than AOF on (e.g. an eviction policy, no persistence).
    pub fn start_with(args: &[&str]) -> Redis {
        require_tools();
        let mut r = Redis {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            args: args.iter().map(|s| s.to_string()).collect(),
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new(sbin("redis-server"))
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(&self.args)
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server");
        self.child = Some(child);
        wait_port("127.0.0.1", self.port, Duration::from_secs(10));
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Postfix's smtp-sink on 127.0.0.1 (or another loopback address), dumping each message.
pub struct Sink {
    child: Option<Child>,
    pub host: String,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Sink {
    pub fn start(args: &[&str]) -> Sink {
        Self::start_on("127.0.0.1", free_port(), args)
    }

    pub fn start_on(host: &str, port: u16, args: &[&str]) -> Sink {
        require_tools();
        let dir = tempfile::tempdir().unwrap();
        // smtp-sink drops to `nobody` when run as root; it must be able to write dumps.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let mut s = Sink {
            child: None,
            host: host.to_string(),
            port,
            dir,
        };
        s.spawn(args);
        s
    }

    fn spawn(&mut self, args: &[&str]) {
        let mut cmd = Command::new(sbin("smtp-sink"));
        if is_root() {
            cmd.args(["-u", "nobody"]);
        }
        cmd.arg("-d")
            .arg(format!("{}/m.", self.dir.path().display()))
            .args(args)
            .arg(format!("{}:{}", self.host, self.port))
            .arg("256")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.child = Some(cmd.spawn().expect("starting smtp-sink"));
        wait_port(&self.host, self.port, Duration::from_secs(10));
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts on the same port with other fault options.
    pub fn restart(&mut self, args: &[&str]) {
        self.stop();
        self.spawn(args);
    }

    /// The raw dumped files.
    pub fn dumps(&self) -> Vec<Vec<u8>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        files.sort();
        files
            .into_iter()
            .filter_map(|p| {
                let mut buf = Vec::new();
                std::fs::File::open(p).ok()?.read_to_end(&mut buf).ok()?;
                Some(buf)
            })
            .collect()
    }

    pub fn count(&self) -> usize {
        std::fs::read_dir(self.dir.path())
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// X-Paloma-Id of every dumped message complete enough to carry one, in file order.
    pub fn ids(&self) -> Vec<String> {
        self.dumps()
            .iter()
            .filter_map(|raw| {
                mail_parser::MessageParser::default()
                    .parse(raw)
                    .and_then(|m| m.header_raw("X-Paloma-Id").map(|s| s.trim().to_string()))
            })
            .collect()
    }

    /// Waits until at least `n` messages are dumped whole (headers and a body), and returns
    /// how many dump files there are then.
    pub fn wait_count(&self, n: usize, timeout: Duration) -> usize {
        wait_until(&format!("{n} whole messages at the sink"), timeout, || {
            self.dumps()
                .iter()
                .filter(|raw| {
                    mail_parser::MessageParser::default()
                        .parse(raw)
                        .is_some_and(|m| {
                            m.header_raw("X-Paloma-Id").is_some()
                                && (m.body_text(0).is_some() || m.body_html(0).is_some())
                        })
                })
                .count()
                >= n
        });
        self.count()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop();
    }
}

/// dnsmasq serving the given records on a free UDP/TCP port of 127.0.0.1.
pub struct Dns {
    child: Child,
    pub port: u16,
}

impl Dns {
    /// `records` are dnsmasq options without the leading `--`, e.g.
    /// `txt-record=s1._domainkey.shop.test,v=DKIM1; …`. They go on the command line, where
    /// dnsmasq keeps double quotes as part of the text.
    pub fn start(records: &[String]) -> Dns {
        Self::start_on(free_port(), records)
    }

    /// On a given port: a restart with other records, at the address a daemon already uses.
    pub fn start_on(port: u16, records: &[String]) -> Dns {
        require_tools();
        let mut cmd = Command::new(sbin("dnsmasq"));
        cmd.args([
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
        ])
        .args(["--listen-address=127.0.0.1", "--pid-file="])
        .arg(format!("--port={port}"));
        if is_root() {
            cmd.arg("--user=root");
        }
        for r in records {
            cmd.arg(format!("--{r}"));
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting dnsmasq");
        wait_port("127.0.0.1", port, Duration::from_secs(10));
        Dns { child, port }
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One paloma daemon process.
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    pub fn spawn(config: &Path) -> Daemon {
        Self::spawn_env(config, &[])
    }

    pub fn spawn_env(config: &Path, env: &[(&str, &str)]) -> Daemon {
        Self::spawn_with(config, env, None)
    }

    /// With the descriptor limit (`ulimit -n`) set to `nofile`, as on a default host.
    pub fn spawn_nofile(config: &Path, nofile: u32) -> Daemon {
        Self::spawn_with(config, &[], Some(nofile))
    }

    fn spawn_with(config: &Path, env: &[(&str, &str)], nofile: Option<u32>) -> Daemon {
        let log = config.with_extension(format!("{}.log", free_port()));
        let f = std::fs::File::create(&log).unwrap();
        let mut cmd = match nofile {
            Some(n) => {
                let mut c = Command::new("sh");
                c.args(["-c", &format!("ulimit -n {n} && exec \"$0\" \"$@\"")])
                    .arg(env!("CARGO_BIN_EXE_paloma"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_paloma")),
        };
        let child = cmd
            .args(["run", "--config"])
            .arg(config)
            .env("PALOMA_LOG", "info,paloma=debug")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("starting paloma");
        Daemon {
            child: Some(child),
            log,
        }
    }

    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            Command::new("kill")
                .args([&format!("-{sig}"), &c.id().to_string()])
                .status()
                .unwrap();
        }
    }

    /// Waits for exit; None on timeout.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let c = self.child.as_mut()?;
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                self.child = None;
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, and an exit with status 0 within 20 s (the log shown if not).
    pub fn term(&mut self) {
        self.signal("TERM");
        let st = self.wait(Duration::from_secs(20)).expect("daemon exits");
        assert!(st.success(), "{}", self.log_text());
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A config file for one test; `extra` is appended TOML (sections that the base lacks).
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub prefix: String,
    pub config: PathBuf,
}

pub fn repo_templates() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("templates")
}

impl Setup {
    pub fn new(
        redis_url: &str,
        relay_port: u16,
        delivery_extra: &str,
        intake_extra: &str,
        extra: &str,
    ) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let prefix = format!("t{}:", free_port());
        let config = dir.path().join("paloma.toml");
        let toml = format!(
            r#"
[redis]
url = "{redis_url}"
prefix = "{prefix}"
[templates]
dir = "{templates}"
[sender]
from = "Shop Test <news@shop.test>"
helo = "mta.shop.test"
[delivery]
mode = "relay"
relay = "127.0.0.1:{relay_port}"
tls = "none"
connections = 8
timeout = "5s"
{delivery_extra}
[intake]
block = "200ms"
claim_idle = "3s"
{intake_extra}
[tracking]
base_url = "https://t.shop.test"
secret = "{SECRET}"
{extra}
"#,
            templates = repo_templates().display()
        );
        std::fs::write(&config, toml).unwrap();
        Setup {
            dir,
            prefix,
            config,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Jobs of `campaign` held until its experiment is decided.
pub fn held(conn: &mut redis::Connection, prefix: &str, campaign: &str) -> usize {
    redis::cmd("ZCARD")
        .arg(format!("{prefix}held:{campaign}"))
        .query(conn)
        .unwrap()
}

/// XADDs raw job strings to `{prefix}sends`.
pub fn enqueue_raw(conn: &mut redis::Connection, prefix: &str, jobs: &[String]) {
    let mut p = redis::pipe();
    for j in jobs {
        p.cmd("XADD")
            .arg(format!("{prefix}sends"))
            .arg("*")
            .arg("job")
            .arg(j)
            .ignore();
    }
    p.query::<()>(conn).unwrap();
}

pub fn job(id: &str, campaign: &str, template: &str, to: &str, data: Value) -> String {
    serde_json::json!({"id": id, "campaign": campaign, "template": template, "to": to, "data": data}).to_string()
}

/// Every event so far, parsed.
pub fn events(conn: &mut redis::Connection, prefix: &str) -> Vec<Value> {
    // Tolerate a Redis that is restarting (tests kill it on purpose).
    let mut tries = 0;
    let reply: redis::streams::StreamRangeReply = loop {
        match redis::cmd("XRANGE")
            .arg(format!("{prefix}events"))
            .arg("-")
            .arg("+")
            .query(conn)
        {
            Ok(r) => break r,
            // Only a Redis that is not there (yet) is waited for; an error reply is a
            // failure of the test at once.
            Err(e)
                if tries < 100
                    && (e.is_io_error()
                        || e.is_connection_refusal()
                        || e.is_connection_dropped()
                        || e.is_timeout()
                        || e.code() == Some("LOADING")) =>
            {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("XRANGE events: {e}"),
        }
    };
    reply
        .ids
        .iter()
        .filter_map(|e| match e.map.get("event") {
            Some(redis::Value::BulkString(b)) => serde_json::from_slice(b).ok(),
            _ => None,
        })
        .collect()
}

/// Data for the newsletter template: a first name and one product.
pub fn newsletter_data(name: &str) -> Value {
    serde_json::json!({
        "first_name": name,
        "products": [{"name": "Linen shirt", "price": "49", "url": "https://shop.example/linen"}],
    })
}

/// A newsletter job `id` of `campaign` to `to`, with a first name "F" and one product.
pub fn news(id: &str, campaign: &str, to: &str) -> String {
    job(
        id,
        campaign,
        "newsletter",
        to,
        serde_json::json!({"first_name": "F", "products": [{"name": "X", "price": "1", "url": "https://shop.example/x"}]}),
    )
}

/// The terminal events so far.
pub fn terminal_events(conn: &mut redis::Connection, prefix: &str) -> Vec<Value> {
    events(conn, prefix)
        .into_iter()
        .filter(is_terminal)
        .collect()
}

pub fn is_terminal(e: &Value) -> bool {
    matches!(
        e["type"].as_str(),
        Some("delivered" | "bounced" | "failed" | "suppressed" | "dead")
    )
}

/// Waits until `n` terminal events exist; panics with the daemon log on timeout.
pub fn wait_terminal(
    conn: &mut redis::Connection,
    prefix: &str,
    n: usize,
    timeout: Duration,
    daemon: Option<&Daemon>,
) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let evs = events(conn, prefix);
        let t = evs.iter().filter(|e| is_terminal(e)).count();
        if t >= n {
            return evs;
        }
        if Instant::now() > deadline {
            let log = daemon.map(|d| d.log_text()).unwrap_or_default();
            let tail: String = log
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            panic!("only {t} of {n} terminal events after {timeout:?}; daemon log tail:\n{tail}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts that the terminal events `evs` are `n` jobs', each ended once, delivered.
pub fn assert_delivered_once(evs: &[Value], n: usize) {
    let t = terminal_by_id(evs);
    assert_eq!(t.len(), n, "{evs:?}");
    assert!(
        t.values()
            .all(|v| v.len() == 1 && v[0]["type"] == "delivered"),
        "{t:?}"
    );
}

/// Terminal events per job id.
pub fn terminal_by_id(evs: &[Value]) -> HashMap<String, Vec<Value>> {
    let mut m: HashMap<String, Vec<Value>> = HashMap::new();
    for e in evs.iter().filter(|e| is_terminal(e)) {
        m.entry(e["id"].as_str().unwrap_or_default().to_string())
            .or_default()
            .push(e.clone());
    }
    m
}

/// Dead-letter entries: (job, error).
pub fn dead_letters(conn: &mut redis::Connection, prefix: &str) -> Vec<(String, String)> {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(format!("{prefix}dead"))
        .arg("-")
        .arg("+")
        .query(conn)
        .unwrap();
    reply
        .ids
        .iter()
        .map(|e| {
            let s = |k: &str| match e.map.get(k) {
                Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                _ => String::new(),
            };
            (s("job"), s("error"))
        })
        .collect()
}

/// Runs the paloma CLI and returns (status, stdout, stderr).
pub fn paloma(args: &[&str], stdin: Option<&str>) -> (ExitStatus, String, String) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_paloma"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Polls `f` every 20 ms until it gives a value; None after `timeout`.
pub fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `f` every 20 ms until it gives a value, and returns it; panics naming `what`
/// after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    poll(timeout, f).unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// Polls `f` every 20 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    wait_for(what, timeout, || f().then_some(()))
}

/// [`wait_for`] that shows the daemon's log when it times out.
pub fn wait_for_daemon<T>(
    what: &str,
    timeout: Duration,
    daemon: &Daemon,
    f: impl FnMut() -> Option<T>,
) -> T {
    poll(timeout, f).unwrap_or_else(|| {
        panic!(
            "timed out after {timeout:?} waiting for {what}; daemon log:\n{}",
            daemon.log_text()
        )
    })
}

/// [`wait_until`] that shows the daemon's log when it times out.
pub fn wait_until_daemon(
    what: &str,
    timeout: Duration,
    daemon: &Daemon,
    mut f: impl FnMut() -> bool,
) {
    wait_for_daemon(what, timeout, daemon, || f().then_some(()))
}

/// Receipt jobs `{tag}-{i}` of campaign `tag`, one to each address of `to`.
pub fn jobs_to<S: AsRef<str>>(tag: &str, to: &[S]) -> Vec<String> {
    to.iter()
        .enumerate()
        .map(|(i, t)| {
            job(
                &format!("{tag}-{i}"),
                tag,
                "receipt",
                t.as_ref(),
                serde_json::json!({"name": "R", "order_id": i}),
            )
        })
        .collect()
}

/// `n` receipt jobs `{tag}-{i}` of campaign `tag`, to `u{i}@{domain}`.
pub fn jobs(n: usize, tag: &str, domain: &str) -> Vec<String> {
    let to: Vec<String> = (0..n).map(|i| format!("u{i}@{domain}")).collect();
    jobs_to(tag, &to)
}

/// The body of `GET /metrics` on `port` (the `[metrics] listen` of a test config).
pub fn metrics_text(port: u16) -> String {
    use std::io::Write;
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Asserts that each of `lines` (a sample, or the start of one) is in the /metrics `text`.
pub fn assert_metrics(text: &str, lines: &[&str]) {
    for line in lines {
        assert!(text.contains(line), "{line} not in:\n{text}");
    }
}

/// The value of the sample whose name and labels are exactly `series` (e.g.
/// `paloma_in_flight` or `paloma_messages_total{campaign="c",outcome="delivered"}`): 0 when
/// absent (a counter not yet touched), as Prometheus reads it; NaN when the endpoint does
/// not answer, so that no comparison holds.
pub fn metric(port: u16, series: &str) -> f64 {
    let text = metrics_text(port);
    if !text.starts_with("HTTP/1.1 200") {
        return f64::NAN;
    }
    metric_in(&text, series).unwrap_or(0.0)
}

/// The value of `series` in an already fetched /metrics body, if it is there.
pub fn metric_in(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// True once the consumer group `group` of `{prefix}events` has read every entry now in the
/// stream and acknowledged all of them: whatever those events cause, it has decided.
pub fn events_consumed(conn: &mut redis::Connection, prefix: &str, group: &str) -> bool {
    let key = format!("{prefix}events");
    let last: redis::RedisResult<redis::streams::StreamRangeReply> = redis::cmd("XREVRANGE")
        .arg(&key)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query(conn);
    let Ok(last) = last else { return false };
    let Some(last) = last.ids.first().map(|e| e.id.clone()) else {
        return true;
    };
    let groups: redis::RedisResult<Vec<HashMap<String, redis::Value>>> =
        redis::cmd("XINFO").arg("GROUPS").arg(&key).query(conn);
    let Ok(groups) = groups else { return false };
    groups.iter().any(|g| {
        let s = |k: &str| match g.get(k) {
            Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(redis::Value::SimpleString(s)) => s.clone(),
            _ => String::new(),
        };
        s("name") == group
            && s("last-delivered-id") == last
            && matches!(g.get("pending"), Some(redis::Value::Int(0)))
    })
}

/// True once every entry of `{prefix}sends` has been read, handled and removed.
pub fn sends_drained(conn: &mut redis::Connection, prefix: &str) -> bool {
    let len: redis::RedisResult<i64> = redis::cmd("XLEN").arg(format!("{prefix}sends")).query(conn);
    len == Ok(0) && pending(conn, prefix) == 0
}

/// Milliseconds since the epoch of an event's `at` (RFC 3339).
pub fn at_ms(e: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(e["at"].as_str().expect("an `at`"))
        .expect("RFC 3339")
        .timestamp_millis()
}

/// Checks, from their `at` times (ms, any order), that deliveries kept to one per
/// `interval_ms` after a burst of `burst`: any k of them span at least
/// (k - burst - slack) intervals. A limiter admits k in no less than (k - burst) intervals;
/// `slack` intervals allow for the spread of delivery times after admission (a process
/// stalled a moment records a few at once). Two limiters where one was due, or none, break
/// it by many intervals.
pub fn assert_paced(at: &[i64], burst: usize, interval_ms: i64, slack: usize) {
    let mut at = at.to_vec();
    at.sort();
    for i in 0..at.len() {
        for j in i + 1..at.len() {
            let k = (j - i + 1) as i64;
            let least = (k - burst as i64 - slack as i64) * interval_ms;
            assert!(
                at[j] - at[i] >= least,
                "{k} deliveries within {} ms, less than {least} ms at one per {interval_ms} ms \
                 after a burst of {burst}: {at:?}",
                at[j] - at[i]
            );
        }
    }
}

/// A private CA in `dir` (openssl) and, per `(file stem, names)`, a server certificate it
/// signed for those names (DNS names, or IP addresses): returns the CA's PEM and
/// `(cert, key)` per leaf.
pub fn ca_and_leaves(dir: &Path, leaves: &[(&str, &[&str])]) -> (PathBuf, Vec<(PathBuf, PathBuf)>) {
    let run = |args: &[&str]| {
        let st = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("running openssl");
        assert!(st.success(), "openssl {args:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=paloma test CA",
    ]);
    let mut out = Vec::new();
    for (stem, names) in leaves {
        let (key, csr, pem, ext) = (
            format!("{stem}.key"),
            format!("{stem}.csr"),
            format!("{stem}.pem"),
            format!("{stem}.cnf"),
        );
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={}", names[0]),
        ]);
        let sans: Vec<String> = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(_) => format!("IP:{n}"),
                Err(_) => format!("DNS:{n}"),
            })
            .collect();
        std::fs::write(
            dir.join(&ext),
            format!(
                "subjectAltName={}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
                sans.join(",")
            ),
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &ext,
        ]);
        out.push((dir.join(pem), dir.join(key)));
    }
    (dir.join("ca.pem"), out)
}

/// A private CA and a server certificate it signed for 127.0.0.1 (openssl), in `dir`:
/// returns (ca.pem, server.pem, server.key).
pub fn private_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    require_tools();
    let (ca, mut leaves) = ca_and_leaves(dir, &[("server", &["127.0.0.1", "localhost"])]);
    let (pem, key) = leaves.remove(0);
    (ca, pem, key)
}

/// Starts `tests/peers/{script}` (an aiosmtpd peer) on `port` with `args`, and waits until
/// it prints "ready" and listens.
fn python_peer(script: &str, port: u16, args: &[&std::ffi::OsStr]) -> Child {
    python_peer_on("127.0.0.1", script, port, args)
}

/// A Python peer whose first argument after the port is the address it listens on, `host`.
pub fn python_peer_on(host: &str, script: &str, port: u16, args: &[&std::ffi::OsStr]) -> Child {
    require_tools();
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/peers")
        .join(script);
    let mut child = Command::new("/usr/bin/python3")
        .arg(script)
        .arg(port.to_string())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting aiosmtpd");
    let mut line = String::new();
    let mut r = std::io::BufReader::new(child.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut r, &mut line).unwrap();
    assert_eq!(line.trim(), "ready", "aiosmtpd did not start");
    wait_port(host, port, Duration::from_secs(10));
    child
}

/// Python's aiosmtpd as a receiver with one fault (tests/peers/faulty_smtpd.py): `slow N`
/// answers the first message's final dot N seconds late, `drop` closes the connection
/// instead of answering the second message of each session (kept, reply lost).
pub struct FaultyMta {
    child: Child,
    pub port: u16,
    pub out: tempfile::TempDir,
}

impl FaultyMta {
    pub fn start(mode: &[&str]) -> FaultyMta {
        let port = free_port();
        let out = tempfile::tempdir().unwrap();
        let mut args = vec![out.path().as_os_str()];
        args.extend(mode.iter().map(std::ffi::OsStr::new));
        let child = python_peer("faulty_smtpd.py", port, &args);
        FaultyMta { child, port, out }
    }

    /// Every recipient of every message kept, in arrival order (one per message here).
    pub fn recipients(&self) -> Vec<String> {
        std::fs::read_to_string(self.out.path().join("rcpts.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for FaultyMta {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Python's aiosmtpd as a relay that requires STARTTLS and AUTH (tests/peers/auth_smtpd.py).
pub struct AuthRelay {
    child: Child,
    pub port: u16,
    pub out: tempfile::TempDir,
}

impl AuthRelay {
    pub fn start(cert: &Path, key: &Path, user: &str, pass: &str) -> AuthRelay {
        Self::spawn(cert, key, user, pass, &[])
    }

    /// The same relay with TLS offered but not required, for AUTH or anything else.
    pub fn start_clear(cert: &Path, key: &Path, user: &str, pass: &str) -> AuthRelay {
        Self::spawn(cert, key, user, pass, &["clear"])
    }

    fn spawn(cert: &Path, key: &Path, user: &str, pass: &str, mode: &[&str]) -> AuthRelay {
        let port = free_port();
        let out = tempfile::tempdir().unwrap();
        let mut args: Vec<&std::ffi::OsStr> = vec![cert.as_ref(), key.as_ref()];
        args.extend([user, pass].map(std::ffi::OsStr::new));
        args.push(out.path().as_os_str());
        args.extend(mode.iter().map(std::ffi::OsStr::new));
        let child = python_peer("auth_smtpd.py", port, &args);
        AuthRelay { child, port, out }
    }

    pub fn messages(&self) -> usize {
        std::fs::read_dir(self.out.path())
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
                    .count()
            })
            .unwrap_or(0)
    }

    /// The accepted messages, in arrival order.
    pub fn message_texts(&self) -> Vec<String> {
        (1..=self.messages())
            .filter_map(|n| std::fs::read_to_string(self.out.path().join(format!("{n}.eml"))).ok())
            .collect()
    }

    /// One line per AUTH attempt: "user tls=True|False".
    pub fn auth_log(&self) -> String {
        std::fs::read_to_string(self.out.path().join("auth.log")).unwrap_or_default()
    }
}

impl Drop for AuthRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy in front of a real server that records every byte the client sent, so a
/// test can check what went over the wire. Each connection's bytes are kept apart.
pub struct WireTap {
    pub port: u16,
    sent: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

impl WireTap {
    pub fn start(upstream: u16) -> WireTap {
        use std::io::Write;
        use std::net::{Shutdown, TcpStream};
        use std::sync::{Arc, Mutex};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let sent: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let all = sent.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { return };
                let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let slot = {
                    let mut v = all.lock().unwrap();
                    v.push(Vec::new());
                    v.len() - 1
                };
                let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s2, &mut c2);
                    let _ = c2.shutdown(Shutdown::Both);
                });
                let all = all.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = client.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        all.lock().unwrap()[slot].extend_from_slice(&buf[..n]);
                        if server.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = server.shutdown(Shutdown::Both);
                });
            }
        });
        WireTap { port, sent }
    }

    /// What clients sent, one buffer per connection.
    pub fn sent(&self) -> Vec<Vec<u8>> {
        self.sent.lock().unwrap().clone()
    }
}

/// Entries in the stream `key`.
pub fn stream_len(conn: &mut redis::Connection, key: &str) -> usize {
    redis::cmd("XLEN").arg(key).query(conn).unwrap()
}

/// Entries pending in the sends group (`paloma`).
pub fn pending(conn: &mut redis::Connection, prefix: &str) -> i64 {
    let v: redis::RedisResult<redis::Value> = redis::cmd("XPENDING")
        .arg(format!("{prefix}sends"))
        .arg("paloma")
        .query(conn);
    match v {
        Ok(redis::Value::Array(a)) => match a.first() {
            Some(redis::Value::Int(p)) => *p,
            _ => 0,
        },
        _ => -1,
    }
}

/// (name, pending) of each consumer of the sends group.
pub fn consumers(conn: &mut redis::Connection, prefix: &str) -> Vec<(String, i64)> {
    let v: redis::RedisResult<Vec<Vec<redis::Value>>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(format!("{prefix}sends"))
        .arg("paloma")
        .query(conn);
    v.unwrap_or_default()
        .iter()
        .filter_map(|c| match (c.get(1), c.get(3)) {
            (Some(redis::Value::BulkString(b)), Some(redis::Value::Int(p))) => {
                Some((String::from_utf8_lossy(b).into_owned(), *p))
            }
            _ => None,
        })
        .collect()
}

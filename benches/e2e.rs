//! End-to-end load bench: a pre-filled Redis stream → the paloma daemon (release build) →
//! Postfix's smtp-sink on loopback, next to `smtp-source` into the same sink in the same run
//! (the SMTP ceiling of this machine), measured before and after.
//!
//! ```text
//! cargo bench --bench e2e                      # relay, 20,000 newsletter messages
//! cargo bench --bench e2e -- --jobs 50000 --dkim rsa --connections 64
//! cargo bench --bench e2e -- --quick           # smoke run (CI)
//! ```
//!
//! Prints messages/s, the ratio to the ceiling, peak RSS and CPU time per message of the
//! daemon.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

struct Opts {
    jobs: usize,
    connections: usize,
    dkim: Option<String>,
    products: usize,
    domains: usize,
}

fn opts() -> Opts {
    let mut o = Opts {
        jobs: 20_000,
        connections: 50,
        dkim: None,
        products: 6,
        domains: 5,
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let next = |i: usize| args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--jobs" => {
                o.jobs = next(i).parse().expect("--jobs N");
                i += 1;
            }
            "--connections" => {
                o.connections = next(i).parse().expect("--connections N");
                i += 1;
            }
            "--dkim" => {
                o.dkim = Some(next(i));
                i += 1;
            }
            "--products" => {
                o.products = next(i).parse().expect("--products N");
                i += 1;
            }
            "--domains" => {
                o.domains = next(i).parse().expect("--domains N");
                i += 1;
            }
            "--quick" => o.jobs = 2_000,
            _ => {} // cargo passes --bench
        }
        i += 1;
    }
    o
}

/// smtp-source's rate into the sink: the ceiling.
fn ceiling(port: u16, size: usize, count: usize) -> f64 {
    let t = Instant::now();
    let st = Command::new("/usr/sbin/smtp-source")
        .args([
            "-d",
            "-s",
            "50",
            "-l",
            &size.to_string(),
            "-m",
            &count.to_string(),
        ])
        .args(["-f", "bench@shop.test", "-t", "sink@dest.test"])
        .arg(format!("127.0.0.1:{port}"))
        .status()
        .expect("smtp-source");
    assert!(st.success());
    count as f64 / t.elapsed().as_secs_f64()
}

fn proc_stat(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = fields
        .get(11)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    (hwm, ticks / 100.0)
}

fn main() {
    let o = opts();
    ensure_tools();
    let redis = Redis::start();
    // The harness sink dumps every message; under load we want one that only accepts.
    let port = free_port();
    let mut sink = Command::new("/usr/sbin/smtp-sink");
    if std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
    {
        sink.args(["-u", "nobody"]);
    }
    let mut sink = sink
        .args(["-m", "1024"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("1024")
        .spawn()
        .expect("smtp-sink");
    wait_port("127.0.0.1", port, Duration::from_secs(5));

    let mut dkim_extra = String::new();
    let keydir = tempfile::tempdir().unwrap();
    if let Some(alg) = &o.dkim {
        let key = keydir.path().join("k.pem");
        let args: Vec<&str> = match alg.as_str() {
            "rsa" => vec![
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ],
            "ed25519" => vec!["genpkey", "-algorithm", "ed25519", "-out"],
            other => panic!("--dkim rsa|ed25519, not {other}"),
        };
        assert!(Command::new("openssl")
            .args(&args)
            .arg(&key)
            .status()
            .unwrap()
            .success());
        dkim_extra = format!(
            "[[dkim]]\ndomain = \"shop.test\"\nselector = \"s1\"\nkey = \"{}\"\n",
            key.display()
        );
    }
    let setup = Setup::new(
        &redis.url(),
        port,
        "",
        &format!(
            "workers = {}\nbatch = 512\nevent_batch = 1024",
            o.connections * 2
        ),
        &dkim_extra,
    );
    // Raise the connection count (the harness config fixes 8).
    let cfg = std::fs::read_to_string(&setup.config).unwrap().replace(
        "connections = 8",
        &format!("connections = {}", o.connections),
    );
    std::fs::write(&setup.config, cfg).unwrap();

    // Fill the stream.
    let mut conn = redis.conn();
    let products: Vec<_> = (0..o.products)
        .map(|i| serde_json::json!({"name": format!("Product {i}"), "price": "29.90", "url": format!("https://shop.test/p/{i}?utm_source=mail")}))
        .collect();
    let t = Instant::now();
    for chunk in (0..o.jobs).collect::<Vec<_>>().chunks(5000) {
        let jobs: Vec<String> = chunk
            .iter()
            .map(|&i| {
                job(
                    &format!("b{i}"),
                    "bench",
                    "newsletter",
                    &format!("user{i}@d{}.test", i % o.domains),
                    serde_json::json!({"first_name": format!("User {i}"), "products": products}),
                )
            })
            .collect();
        enqueue_raw(&mut conn, &setup.prefix, &jobs);
    }
    eprintln!(
        "filled {} jobs in {:.2}s",
        o.jobs,
        t.elapsed().as_secs_f64()
    );

    // Size of one rendered message, for smtp-source.
    let size = {
        let probe = Sink::start(&[]);
        let s2 = Setup::new(&redis.url(), probe.port, "", "", &dkim_extra);
        let mut c2 = redis.conn();
        enqueue_raw(
            &mut c2,
            &s2.prefix,
            &[job(
                "probe",
                "probe",
                "newsletter",
                "p@d.test",
                serde_json::json!({"first_name": "User 1", "products": products}),
            )],
        );
        let d = Daemon::spawn(&s2.config);
        wait_terminal(&mut c2, &s2.prefix, 1, Duration::from_secs(30), Some(&d));
        std::thread::sleep(Duration::from_millis(200));
        probe.dumps().first().map(|m| m.len()).unwrap_or(10_000)
    };

    let count = o.jobs.min(20_000);
    let before = ceiling(port, size, count);
    eprintln!("ceiling before: smtp-source {before:.0} msg/s ({size} bytes)");

    let t0 = Instant::now();
    let daemon = Daemon::spawn(&setup.config);
    let daemon_pid = daemon.pid().expect("daemon running");
    let stats_key = format!("{}stats:bench", setup.prefix);
    let mut peak = 0;
    loop {
        let delivered: Option<i64> = redis::cmd("HGET")
            .arg(&stats_key)
            .arg("delivered")
            .query(&mut conn)
            .unwrap();
        let (hwm, _) = proc_stat(daemon_pid);
        peak = peak.max(hwm);
        if delivered.unwrap_or(0) as usize >= o.jobs {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "bench did not finish in 10 minutes\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let wall = t0.elapsed().as_secs_f64();
    let (hwm, cpu) = proc_stat(daemon_pid);
    peak = peak.max(hwm);
    drop(daemon);
    let after = ceiling(port, size, count);
    let rate = o.jobs as f64 / wall;
    let ceil = (before + after) / 2.0;
    println!(
        "paloma e2e bench: {} jobs, newsletter {} products ({size} bytes), {} connections, dkim {}",
        o.jobs,
        o.products,
        o.connections,
        o.dkim.as_deref().unwrap_or("off")
    );
    println!("  smtp-source ceiling: {before:.0} msg/s before, {after:.0} msg/s after");
    println!("  paloma:              {rate:.0} msg/s ({wall:.2} s wall, from daemon start)");
    println!("  ratio to ceiling:    {:.2}", rate / ceil);
    println!("  daemon peak RSS:     {} MB", peak / 1024);
    println!(
        "  daemon CPU:          {:.1} µs per message ({cpu:.2} s)",
        cpu * 1e6 / o.jobs as f64
    );
    let _ = sink.kill();
    let _ = sink.wait();
}

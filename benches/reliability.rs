//! Reliability soak: the faults and attacks of docs/RELIABILITY.md, at full size, against
//! the release build, with real peers; writes the figures into docs/RELIABILITY.md.
//!
//! ```text
//! cargo bench --bench reliability              # all scenarios (about 3 minutes)
//! cargo bench --bench reliability -- --quick   # smaller sizes
//! ```
//!
//! The suite (`cargo test`) runs the same scenarios smaller, as pass/fail tests; this
//! measures them.

#[path = "../tests/it/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::track::*;
use common::*;
use serde_json::json;

struct Figures {
    rows: Vec<(String, String, String)>,
}

impl Figures {
    fn add(&mut self, scenario: &str, what: &str, value: String) {
        println!("{scenario:>14} | {what}: {value}");
        self.rows.push((scenario.into(), what.into(), value));
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn receipts(n: usize, tag: &str) -> Vec<String> {
    (0..n)
        .map(|i| {
            job(
                &format!("{tag}{i}"),
                tag,
                "receipt",
                &format!("{tag}{i}@x.test"),
                json!({"name": "R"}),
            )
        })
        .collect()
}

fn sink_ids(sink: &Sink) -> Vec<String> {
    sink.dumps()
        .iter()
        .filter_map(|raw| {
            let text = String::from_utf8_lossy(raw);
            text.lines()
                .find(|l| l.starts_with("X-Paloma-Id:"))
                .map(|l| l.trim_start_matches("X-Paloma-Id:").trim().to_string())
        })
        .collect()
}

/// Two SIGKILLs, a Redis restart and the sink gone for 3 s, with the default claim_idle.
fn crash(f: &mut Figures, n: usize) {
    let mut redis = Redis::start();
    let mut sink = Sink::start(&[]);
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "retry_intervals = [\"2s\"]",
        "",
        "",
    );
    let cfg = std::fs::read_to_string(&setup.config)
        .unwrap()
        .replace("claim_idle = \"3s\"\n", "");
    std::fs::write(&setup.config, cfg).unwrap();
    let mut conn = redis.conn();
    enqueue_raw(&mut conn, &setup.prefix, &receipts(n, "k"));
    let delivered = |c: &mut redis::Connection| stat(c, &setup.prefix, "k", "delivered") as usize;
    let mut daemon = Daemon::spawn(&setup.config);
    let mut recoveries = Vec::new();
    for (round, share) in [(1, 10), (2, 40)] {
        wait_until("deliveries", Duration::from_secs(300), || {
            delivered(&mut conn) >= n * share / 100
        });
        let held = pending(&mut conn, &setup.prefix);
        let done_at_kill = delivered(&mut conn);
        let dead: Vec<String> = consumers(&mut conn, &setup.prefix)
            .into_iter()
            .map(|(c, _)| c)
            .collect();
        daemon.kill9();
        let t = Instant::now();
        if round == 2 {
            redis.restart();
            conn = redis.conn();
        }
        daemon = Daemon::spawn(&setup.config);
        wait_until("reclaim", Duration::from_secs(120), || {
            let now = consumers(&mut conn, &setup.prefix);
            !now.is_empty() && now.iter().all(|(c, p)| !dead.contains(c) || *p == 0)
        });
        recoveries.push(format!(
            "{held} held ({done_at_kill} of {n} delivered at the kill), picked up after {}",
            secs(t.elapsed())
        ));
    }
    sink.stop();
    std::thread::sleep(Duration::from_secs(3));
    sink.restart(&[]);
    let last = Instant::now();
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        n,
        Duration::from_secs(600),
        Some(&daemon),
    );
    let after = last.elapsed();
    let by_id = terminal_by_id(&evs);
    let exactly_once = by_id
        .values()
        .filter(|t| t.len() == 1 && t[0]["type"] == "delivered")
        .count();
    std::thread::sleep(Duration::from_millis(500));
    let ids = sink_ids(&sink);
    let unique: HashSet<&String> = ids.iter().collect();
    let removal = Instant::now();
    wait_until("stale consumers removed", Duration::from_secs(60), || {
        consumers(&mut conn, &setup.prefix).len() == 1
    });
    let removed_after = removal.elapsed();
    let left = consumers(&mut conn, &setup.prefix);
    let s = "crash";
    f.add(
        s,
        "jobs; faults",
        format!("{n}; 2 × SIGKILL, Redis restart (AOF), sink gone 3 s"),
    );
    for (i, r) in recoveries.iter().enumerate() {
        f.add(s, &format!("kill {}: in-flight jobs", i + 1), r.clone());
    }
    f.add(
        s,
        "jobs with exactly one terminal event (delivered)",
        format!("{exactly_once} of {n}"),
    );
    f.add(s, "lost", format!("{}", n - unique.len()));
    f.add(
        s,
        "duplicates at the sink",
        format!("{}", ids.len() - unique.len()),
    );
    f.add(s, "all delivered after the last fault", secs(after));
    f.add(
        s,
        "consumers left in the group",
        format!(
            "{} ({} pending), the dead ones gone {} after the last delivery",
            left.len(),
            left.iter().map(|(_, p)| p).sum::<i64>(),
            secs(removed_after)
        ),
    );
}

/// One link, then every link of one message, flooded by 8 keep-alive clients.
fn flood(f: &mut Figures, seconds: u64) {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let (setup, port, base) = tracking_setup(&redis.url(), sink.port, "", "");
    let mut conn = redis.conn();
    let data = json!({"first_name": "A", "products": [{"name": "X", "price": "1", "url": "https://shop.example/x"}]});
    enqueue_raw(
        &mut conn,
        &setup.prefix,
        &[job("m", "flood", "newsletter", "m@example.test", data)],
    );
    let daemon = Daemon::spawn(&setup.config);
    wait_terminal(
        &mut conn,
        &setup.prefix,
        1,
        Duration::from_secs(30),
        Some(&daemon),
    );
    wait_port("127.0.0.1", port, Duration::from_secs(10));
    let mail = &captured(&sink, &base)["m"];
    let mut all = mail.clicks.clone();
    all.push(mail.pixel.clone());
    for (name, paths) in [
        ("one link", vec![mail.clicks[0].clone()]),
        ("every link + pixel", all),
    ] {
        let before = used_memory(&mut conn);
        let events_before = xlen(&mut conn, &setup.prefix);
        let t0 = Instant::now();
        let answered: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    let paths = &paths;
                    s.spawn(move || {
                        let mut n = 0;
                        while t0.elapsed() < Duration::from_secs(seconds) {
                            n += hammer(port, paths, 200);
                        }
                        n
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        let took = t0.elapsed();
        std::thread::sleep(Duration::from_millis(500));
        let growth = used_memory(&mut conn) - before;
        let events = xlen(&mut conn, &setup.prefix) - events_before;
        f.add(
            "flood",
            name,
            format!(
                "{answered} requests answered in {} ({:.0}/s), Redis +{:.1} KB, {events} events",
                secs(took),
                answered as f64 / took.as_secs_f64(),
                growth as f64 / 1024.0
            ),
        );
    }
}

/// 1,500 half-request clients against a daemon limited to 1,024 descriptors, during 2,000
/// sends; real clicks timed one after another.
fn slow_loris(f: &mut Figures) {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let (setup, port, base) = tracking_setup(&redis.url(), sink.port, "", "");
    let mut conn = redis.conn();
    let data = json!({"first_name": "A", "products": []});
    enqueue_raw(
        &mut conn,
        &setup.prefix,
        &[job("first", "slow", "newsletter", "a@example.test", data)],
    );
    let daemon = Daemon::spawn_nofile(&setup.config, 1024);
    wait_terminal(
        &mut conn,
        &setup.prefix,
        1,
        Duration::from_secs(30),
        Some(&daemon),
    );
    wait_port("127.0.0.1", port, Duration::from_secs(10));
    let link = captured(&sink, &base)["first"].clicks[0].clone();
    let mut slow: Vec<TcpStream> = (0..1500)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.write_all(b"GET /c/AAAA HT").unwrap();
            s
        })
        .collect();
    enqueue_raw(&mut conn, &setup.prefix, &receipts(2000, "s"));
    let t0 = Instant::now();
    let mut lat: Vec<Duration> = (0..200)
        .map(|_| {
            let t = Instant::now();
            assert_eq!(get(port, &link, MAIL_UA).status, 302);
            t.elapsed()
        })
        .collect();
    wait_terminal(
        &mut conn,
        &setup.prefix,
        2001,
        Duration::from_secs(120),
        Some(&daemon),
    );
    let sends = t0.elapsed();
    lat.sort();
    let pct = |p: usize| {
        format!(
            "{:.1} ms",
            lat[(lat.len() * p / 100).min(lat.len() - 1)].as_secs_f64() * 1000.0
        )
    };
    let mut closed = 0;
    for s in &mut slow {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut b = [0u8; 256];
        loop {
            match s.read(&mut b) {
                Ok(0) => {
                    closed += 1;
                    break;
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    closed += 1;
                    break;
                }
                Err(_) => break,
            }
        }
    }
    let s = "slow-loris";
    f.add(
        s,
        "attack",
        "1,500 clients holding half a request line; daemon at ulimit -n 1024".into(),
    );
    f.add(
        s,
        "2,000 sends during it",
        format!("all delivered in {}", secs(sends)),
    );
    f.add(
        s,
        "200 real clicks during it",
        format!("p50 {}, p99 {}, max {}", pct(50), pct(99), pct(100)),
    );
    f.add(
        s,
        "slow connections closed by the server",
        format!("{closed} of 1500"),
    );
}

/// Redis killed for 10 s mid-campaign.
fn redis_outage(f: &mut Figures, n: usize) {
    let mut redis = Redis::start();
    let sink = Sink::start(&[]);
    let setup = Setup::new(&redis.url(), sink.port, "", "", "");
    let mut conn = redis.conn();
    enqueue_raw(&mut conn, &setup.prefix, &receipts(n, "o"));
    let daemon = Daemon::spawn(&setup.config);
    wait_until("deliveries", Duration::from_secs(60), || {
        sink.count() >= n / 5
    });
    redis.kill();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    redis.restart();
    let mut conn = redis.conn();
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        n,
        Duration::from_secs(300),
        Some(&daemon),
    );
    let by_id = terminal_by_id(&evs);
    let once = by_id
        .values()
        .filter(|t| t.len() == 1 && t[0]["type"] == "delivered")
        .count();
    let ids = sink_ids(&sink);
    let unique: HashSet<&String> = ids.iter().collect();
    let s = "redis outage";
    f.add(
        s,
        "jobs; fault",
        format!("{n}; Redis killed for 10 s after {} were delivered", n / 5),
    );
    f.add(
        s,
        "exactly one terminal event (delivered)",
        format!("{once} of {n}"),
    );
    f.add(
        s,
        "lost; duplicates",
        format!("{}; {}", n - unique.len(), ids.len() - unique.len()),
    );
    f.add(
        s,
        "all delivered",
        format!("{} after Redis went away", secs(t.elapsed())),
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // `cargo bench` passes --bench; nothing else is ours.
    let mut f = Figures { rows: Vec::new() };
    crash(&mut f, if quick { 3_000 } else { 20_000 });
    flood(&mut f, if quick { 5 } else { 20 });
    slow_loris(&mut f);
    redis_outage(&mut f, if quick { 2_000 } else { 10_000 });
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/RELIABILITY.md");
    let doc = std::fs::read_to_string(&path).unwrap_or_default();
    let begin = "<!-- figures: generated by `cargo bench --bench reliability` -->";
    let end = "<!-- end of figures -->";
    let mut table = String::new();
    let _ = writeln!(
        table,
        "{begin}\n\nMeasured {} on this machine ({} cores), release build{}.\n\n| scenario | what | figure |\n|---|---|---|",
        chrono::Utc::now().format("%Y-%m-%d"),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if quick { ", --quick sizes" } else { "" }
    );
    for (s, w, v) in &f.rows {
        let _ = writeln!(table, "| {s} | {w} | {v} |");
    }
    table.push('\n');
    table.push_str(end);
    let new = match (doc.find(begin), doc.find(end)) {
        (Some(a), Some(b)) => format!("{}{table}{}", &doc[..a], &doc[b + end.len()..]),
        _ => format!("{doc}\n{table}\n"),
    };
    std::fs::write(&path, new).unwrap();
    println!("figures written to {}", path.display());
}

//! Tracking server under load: `wrk` (a second process) requests one signed click link as
//! fast as it can; every request verifies the token, answers 302 and queues a `clicked`
//! event that is written to Redis. Prints requests/s, latency percentiles and how many
//! events reached the stream.
//!
//! `cargo bench --bench tracking` (wrk and the peers: `scripts/install-test-peers`)

#[path = "../tests/it/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use common::*;
use paloma::track::token::{Kind, Signer};

fn main() {
    require_tools();
    require(WRK);
    let seconds: u64 = std::env::args()
        .skip_while(|a| a != "--seconds")
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let redis = Redis::start();
    let port = free_port();
    let setup = Setup::new(&redis.url(), free_port(), "", "", "");
    let cfg = std::fs::read_to_string(&setup.config).unwrap().replace(
        "base_url = \"https://t.shop.test\"",
        &format!("base_url = \"http://127.0.0.1:{port}\"\nlisten = \"127.0.0.1:{port}\""),
    );
    std::fs::write(&setup.config, cfg).unwrap();
    let daemon = Daemon::spawn(&setup.config);
    wait_port("127.0.0.1", port, Duration::from_secs(10));
    let signer = Signer::new("0", SECRET, &HashMap::new());
    let token = signer.sign(
        Kind::Click,
        &[
            "bench-1",
            "load",
            "ana@example.com",
            "https://shop.example/p/1?utm_source=mail",
            "buy",
        ],
    );
    let url = format!("http://127.0.0.1:{port}/c/{token}");
    let out = Command::new("wrk")
        .args([
            "-t",
            "2",
            "-c",
            "64",
            "-d",
            &format!("{seconds}s"),
            "--latency",
            "-H",
            "User-Agent: Mozilla/5.0 (Macintosh) AppleWebKit/605.1.15",
        ])
        .arg(&url)
        .output()
        .expect("wrk");
    assert!(
        out.status.success(),
        "wrk failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    std::thread::sleep(Duration::from_secs(1));
    let mut conn = redis.conn();
    let written: i64 = redis::cmd("XLEN")
        .arg(format!("{}events", setup.prefix))
        .query(&mut conn)
        .unwrap();
    let pick = |key: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(key))
            .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_string())
            .unwrap_or_else(|| "?".into())
    };
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or("?");
    println!("tracking server, clicks for {seconds} s from wrk (2 threads, 64 connections):");
    println!("  requests/s: {}", pick("Requests/sec:"));
    println!(
        "  latency p50 {}  p90 {}  p99 {}",
        pick("50%"),
        pick("90%"),
        pick("99%")
    );
    println!("  requests {requests}, clicked events in Redis {written}");
    let dropped = daemon.log_text().matches("dropped").count();
    if dropped > 0 {
        println!("  (the daemon log mentions dropped events {dropped} times)");
    }
    drop(daemon);
}

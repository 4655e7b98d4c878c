//! `POST /api/v1/sends`: jobs per second the API takes in (read, split, validate each job
//! as the intake does, one MULTI/EXEC of XADDs, answer) against the release build and a
//! real Redis, while the same daemon's intake reads them off the stream.
//!
//! ```text
//! cargo bench --bench api                  # 200,000 jobs, 5,000 per request, 2 clients
//! cargo bench --bench api -- --quick       # 40,000
//! ```
//!
//! The campaign is paused before, so the intake parks what it reads (read, claim, park)
//! instead of delivering it: the daemon does its share of the work on the same two cores,
//! and nothing else does.

#[path = "../tests/it/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::time::{Duration, Instant};

use common::track::request;
use common::*;

const TOKEN: &str = "bench-token-3b9e61f0c2d84a57";

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n: usize = if quick { 40_000 } else { 200_000 };
    let per_request = 5_000;
    let clients = 2;
    let redis = Redis::start();
    let port = free_port();
    let setup = Setup::new(
        &redis.url(),
        free_port(),
        "",
        "",
        &format!("[api]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"{TOKEN}\"\n"),
    );
    let mut conn = redis.conn();
    redis::cmd("HSET")
        .arg(format!("{}campaign_states", setup.prefix))
        .arg("bench")
        .arg("paused")
        .query::<()>(&mut conn)
        .unwrap();
    let all = jobs(n, "bench", "bench.test");
    let bodies: Vec<Vec<u8>> = all
        .chunks(per_request)
        .map(|c| format!("[{}]", c.join(",")).into_bytes())
        .collect();
    let bytes: usize = bodies.iter().map(Vec::len).sum();
    let daemon = Daemon::spawn(&setup.config);
    wait_port("127.0.0.1", port, Duration::from_secs(30));
    let auth = format!("Bearer {TOKEN}");
    let t = Instant::now();
    let accepted: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let (bodies, auth) = (&bodies, &auth);
                s.spawn(move || {
                    let mut accepted = 0;
                    for body in bodies.iter().skip(c).step_by(clients) {
                        let r = request(
                            port,
                            "POST",
                            "/api/v1/sends",
                            &[
                                ("Authorization", auth),
                                ("Content-Type", "application/json"),
                            ],
                            body,
                        );
                        assert_eq!(r.status, 200, "{}", &r.text()[..200.min(r.text().len())]);
                        let a: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                        accepted += a["accepted"].as_u64().unwrap() as usize;
                    }
                    accepted
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(accepted, n, "every job accepted");
    println!(
        "paloma API: {n} jobs ({:.1} MB) in {} requests of {per_request} over {clients} clients in {secs:.2} s: {:.0} jobs/s",
        bytes as f64 / 1e6,
        bodies.len(),
        n as f64 / secs
    );
    // And every one reached the intake once (parked, its campaign being paused).
    wait_until("every job parked", Duration::from_secs(300), || {
        redis::cmd("ZCARD")
            .arg(format!("{}parked:bench", setup.prefix))
            .query::<usize>(&mut conn)
            .unwrap()
            == n
    });
    println!(
        "  and parked by the intake: all {n} after {:.2} s",
        t.elapsed().as_secs_f64()
    );
    drop(daemon);
}

//! What acknowledging only what a replica has costs: the same primary with one replica, the
//! same requests, `[redis] ack_replicas = 0` against `= 1`, against the release build.
//!
//! ```text
//! cargo bench --bench acks               # 40,000 API jobs in 500s, 4,000 single-job requests,
//!                                        # 4,000 one-click unsubscribes, for each setting
//! cargo bench --bench acks -- --quick    # a quarter of each
//! ```
//!
//! Three loads, each from concurrent clients on their own connections:
//! - `POST /api/v1/sends` with 500 jobs a request (4 clients): a campaign system's batches;
//! - `POST /api/v1/sends` with one job a request (32 clients): transactional sends, where
//!   the group commit matters — the requests that arrive while one `WAIT` is out share the next;
//! - `POST /u/{token}` (32 clients): RFC 8058 one-click unsubscribes.
//!
//! The campaign is paused so the intake parks what it reads: the daemon does its share of the
//! work on the same cores and nothing is delivered. The primary and its replica both write an
//! AOF (fsync every second), as a deployment with replicas would.

#[path = "../tests/it/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::replicas::{replicating_from, Server};
use common::track::{request, tracking_setup};
use common::*;
use paloma::track::token::{Kind, Signer};

const TOKEN: &str = "bench-token-3b9e61f0c2d84a57";
const CAMPAIGN: &str = "bench";

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick { 4 } else { 1 };
    let batch_jobs = 40_000 / scale;
    let single = 4_000 / scale;
    let unsubscribes = 4_000 / scale;

    let primary = Server::start(&[]);
    let replica = Server::replica_of(primary.port);
    wait_until("the replica in sync", Duration::from_secs(30), || {
        replicating_from(replica.port, primary.port)
    });
    println!(
        "acknowledged writes, a primary with one replica (AOF on both), {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:>12} | {:>22} | {:>22} | {:>22}",
        "ack_replicas", "API 500-job requests", "API 1-job requests", "one-click unsubscribes"
    );
    for replicas in [0u32, 1] {
        let r = run(&primary, replicas, batch_jobs, single, unsubscribes);
        println!(
            "{replicas:>12} | {:>15.0} jobs/s | {:>13.0} requests/s | {:>16.0} /s",
            r.batch, r.single, r.unsubscribe
        );
        println!(
            "{:>12} | {:>22} | p50 {:>5.1} ms p99 {:>5.1} | p50 {:>5.1} ms p99 {:>5.1}",
            "", "", r.single_p50, r.single_p99, r.unsub_p50, r.unsub_p99
        );
    }
    drop(replica);
}

struct Figures {
    batch: f64,
    single: f64,
    single_p50: f64,
    single_p99: f64,
    unsubscribe: f64,
    unsub_p50: f64,
    unsub_p99: f64,
}

/// One daemon on `primary` with `ack_replicas = replicas`, and the three loads against it.
fn run(
    primary: &Server,
    replicas: u32,
    batch_jobs: usize,
    single: usize,
    unsubscribes: usize,
) -> Figures {
    let (api, metrics) = (free_port(), free_port());
    let (setup, track, _) = tracking_setup(
        &primary.url(),
        free_port(),
        "",
        &format!(
            "[api]\nlisten = \"127.0.0.1:{api}\"\ntoken = \"{TOKEN}\"\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics}\"\n"
        ),
    );
    let text = std::fs::read_to_string(&setup.config).unwrap().replacen(
        "[redis]\n",
        &format!("[redis]\nack_replicas = {replicas}\n"),
        1,
    );
    std::fs::write(&setup.config, text).unwrap();
    let mut conn = primary.conn();
    redis::cmd("HSET")
        .arg(format!("{}campaign_states", setup.prefix))
        .arg(CAMPAIGN)
        .arg("paused")
        .query::<()>(&mut conn)
        .unwrap();
    let daemon = Daemon::spawn(&setup.config);
    wait_port("127.0.0.1", api, Duration::from_secs(30));
    wait_port("127.0.0.1", track, Duration::from_secs(30));
    let auth = format!("Bearer {TOKEN}");
    let post = |body: &[u8]| {
        let r = request(
            api,
            "POST",
            "/api/v1/sends",
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            body,
        );
        assert_eq!(r.status, 200, "{}", r.text());
    };

    // Batches: 500 jobs a request, 4 clients.
    let all = jobs(batch_jobs + single, CAMPAIGN, "bench.test");
    let (batched, singles) = all.split_at(batch_jobs);
    let bodies: Vec<Vec<u8>> = batched
        .chunks(500)
        .map(|c| format!("[{}]", c.join(",")).into_bytes())
        .collect();
    let (secs, _) = spread(4, bodies.len(), |i| post(&bodies[i]));
    let batch = batch_jobs as f64 / secs;

    // One job a request, 32 clients.
    let (secs, mut lat) = spread(32, singles.len(), |i| {
        post(format!("[{}]", singles[i]).as_bytes())
    });
    let single_rate = singles.len() as f64 / secs;
    let (single_p50, single_p99) = percentiles(&mut lat);

    // One-click unsubscribes, 32 clients, each of its own person.
    let signer = Signer::new("0", SECRET, &HashMap::new());
    let tokens: Vec<String> = (0..unsubscribes)
        .map(|i| {
            signer.sign(
                Kind::Unsubscribe,
                &[&format!("u-{i}"), CAMPAIGN, &format!("p{i}@bench.test")],
            )
        })
        .collect();
    let (secs, mut lat) = spread(32, tokens.len(), |i| {
        let r = request(
            track,
            "POST",
            &format!("/u/{}", tokens[i]),
            &[
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("User-Agent", "Mozilla/5.0 (compatible; Google-Unsubscribe)"),
            ],
            b"List-Unsubscribe=One-Click",
        );
        assert_eq!(r.status, 200, "{}", r.text());
    });
    let unsubscribe = unsubscribes as f64 / secs;
    let (unsub_p50, unsub_p99) = percentiles(&mut lat);

    // Every acknowledged write is there (and, with replicas, the replica confirmed it).
    wait_until("every job parked", Duration::from_secs(120), || {
        redis::cmd("ZCARD")
            .arg(format!("{}parked:{CAMPAIGN}", setup.prefix))
            .query::<usize>(&mut conn)
            .unwrap()
            == batch_jobs + single
    });
    let refused: f64 = metrics_text(metrics)
        .lines()
        .filter(|l| l.starts_with("paloma_ack_timeouts_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(refused, 0.0, "no acknowledgement refused in a healthy pair");
    drop(daemon);
    Figures {
        batch,
        single: single_rate,
        single_p50,
        single_p99,
        unsubscribe,
        unsub_p50,
        unsub_p99,
    }
}

/// `n` calls of `f(i)` spread over `clients` threads: (seconds, latency of each call in ms).
fn spread(clients: usize, n: usize, f: impl Fn(usize) + Sync) -> (f64, Vec<f64>) {
    let next = AtomicUsize::new(0);
    let t = Instant::now();
    let lat: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                let (next, f) = (&next, &f);
                s.spawn(move || {
                    let mut lat = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return lat;
                        }
                        let t = Instant::now();
                        f(i);
                        lat.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    (t.elapsed().as_secs_f64(), lat)
}

fn percentiles(lat: &mut [f64]) -> (f64, f64) {
    lat.sort_by(f64::total_cmp);
    let at = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize];
    (at(0.5), at(0.99))
}

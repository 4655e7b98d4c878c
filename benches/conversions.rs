//! `POST /api/v1/conversions`: conversions per second the API records (read, check each,
//! open the click ids, one read of the posted addresses' last clicks, one acknowledged
//! script call that counts each order once, answer) against the release build and a real
//! Redis.
//!
//! ```text
//! cargo bench --bench conversions              # 200,000 conversions, 1,000 per request, 2 clients
//! cargo bench --bench conversions -- --quick   # 40,000
//! ```
//!
//! Half come by click id (sealed here with the daemon's tracking secret, as its redirects
//! would), half by address (each address given a last human click beforehand, as the
//! tracking server would record it); every one is attributed, a tenth are retries of
//! orders already posted (answered, not counted). The figures are checked exactly at the
//! end: the count and the revenue in cents.

#[path = "../tests/it/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::track::request;
use common::*;
use paloma::track::clickid::{Click, ClickIds, LastClick};
use serde_json::json;

const TOKEN: &str = "bench-token-7c2d9e04b1a6f358";

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n: usize = if quick { 40_000 } else { 200_000 };
    let per_request = 1_000;
    let clients = 2;
    let people = 10_000;
    let redis = Redis::start();
    let port = free_port();
    let setup = Setup::new(
        &redis.url(),
        free_port(),
        "",
        "",
        &format!("[api]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"{TOKEN}\"\n"),
    );
    let p = setup.prefix.clone();
    let mut conn = redis.conn();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    // Every person clicked a marketing message of "bench" an hour ago.
    let mut pipe = redis::pipe();
    for i in 0..people {
        let last = LastClick {
            at: now - 3600,
            job: format!("job-{i}"),
            campaign: "bench".into(),
            link: format!("link-{}", i % 5),
            variant: String::new(),
            touch: "1".into(),
        };
        pipe.cmd("HSET")
            .arg(format!("{p}r:p{i}@bench.test"))
            .arg("last_human_click")
            .arg(last.encode())
            .ignore();
    }
    pipe.query::<()>(&mut conn).unwrap();
    let ids = ClickIds::new("0", SECRET, &HashMap::new());
    // The conversions: unique orders, then a tenth of them again (retries).
    let unique = n - n / 10;
    let item = |i: usize| {
        let person = i % people;
        if i.is_multiple_of(2) {
            let c = Click {
                job: format!("job-{person}"),
                campaign: "bench".into(),
                to: format!("p{person}@bench.test"),
                link: format!("link-{}", person % 5),
                touch: "1".into(),
                at: now - 60,
                ..Default::default()
            };
            json!({"id": format!("order-{i}"), "click": ids.seal(&c), "value": "19.99", "currency": "EUR"})
        } else {
            json!({"id": format!("order-{i}"), "to": format!("p{person}@bench.test"), "value": "19.99", "currency": "EUR"})
        }
    };
    let mut all: Vec<serde_json::Value> = (0..unique).map(item).collect();
    all.extend((0..n - unique).map(|i| item(i * 7 % unique)));
    let bodies: Vec<Vec<u8>> = all
        .chunks(per_request)
        .map(|c| serde_json::to_vec(c).unwrap())
        .collect();
    let bytes: usize = bodies.iter().map(Vec::len).sum();
    let daemon = Daemon::spawn(&setup.config);
    wait_port("127.0.0.1", port, Duration::from_secs(30));
    let auth = format!("Bearer {TOKEN}");
    let t = Instant::now();
    let (accepted, attributed): (usize, usize) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let (bodies, auth) = (&bodies, &auth);
                s.spawn(move || {
                    let (mut accepted, mut attributed) = (0, 0);
                    for body in bodies.iter().skip(c).step_by(clients) {
                        let r = request(
                            port,
                            "POST",
                            "/api/v1/conversions",
                            &[
                                ("Authorization", auth),
                                ("Content-Type", "application/json"),
                            ],
                            body,
                        );
                        assert_eq!(r.status, 200, "{}", &r.text()[..300.min(r.text().len())]);
                        let a: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                        accepted += a["accepted"].as_u64().unwrap() as usize;
                        attributed += a["attributed"].as_u64().unwrap() as usize;
                    }
                    (accepted, attributed)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
    });
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(accepted, n, "every conversion accepted");
    assert_eq!(attributed, unique, "every order attributed once");
    println!(
        "paloma conversions: {n} conversions ({:.1} MB, {} retries) in {} requests of {per_request} over {clients} clients in {secs:.2} s: {:.0} conversions/s",
        bytes as f64 / 1e6,
        n - unique,
        bodies.len(),
        n as f64 / secs
    );
    let (count, cents): (i64, i64) = redis::pipe()
        .cmd("HGET")
        .arg(format!("{p}convs:bench"))
        .arg("count")
        .cmd("HGET")
        .arg(format!("{p}convs:bench"))
        .arg("rev:EUR")
        .query(&mut conn)
        .unwrap();
    assert_eq!((count, cents), (unique as i64, unique as i64 * 1999));
    println!(
        "  counted exactly: {count} orders, {:.2} EUR",
        cents as f64 / 100.0
    );
    drop(daemon);
}

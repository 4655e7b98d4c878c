//! Several daemons on one Redis: they share the consumer group (each job is sent once) and a
//! `[[domains]]` rate bounds them together (`delivery.shared_rates`, on by default), not
//! each of them. Also the shared rate itself, driven directly against a real Redis.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use paloma::shape::{Admission, RuleState};
use serde_json::json;

fn jobs(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            job(
                &format!("fleet-{i}"),
                "fleet",
                "receipt",
                &format!("u{i}@rate.test"),
                json!({"name": "F", "order_id": i}),
            )
        })
        .collect()
}

/// `paloma_messages_total{campaign="fleet",outcome="delivered"}` of one daemon.
fn delivered_by(port: u16) -> u64 {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .find(|l| l.starts_with("paloma_messages_total{campaign=\"fleet\",outcome=\"delivered\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn two_daemons_share_one_domain_rate() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        // Small reads, so that both daemons take jobs from the stream.
        "batch = 2",
        "[[domains]]\nmatch = \"rate.test\"\nrate = \"5/s\"\n",
    );
    // One config per daemon: each its own metrics port.
    let base = std::fs::read_to_string(&setup.config).unwrap();
    let ports = [free_port(), free_port()];
    let configs: Vec<_> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let path = setup.path(&format!("daemon{i}.toml"));
            std::fs::write(
                &path,
                format!("{base}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
            )
            .unwrap();
            path
        })
        .collect();
    let a = Daemon::spawn(&configs[0]);
    let b = Daemon::spawn(&configs[1]);
    for port in ports {
        wait_port("127.0.0.1", port, Duration::from_secs(20));
    }
    let mut conn = redis.conn();
    let n = 30;
    enqueue_raw(&mut conn, &setup.prefix, &jobs(n));
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        n,
        Duration::from_secs(60),
        Some(&a),
    );
    let by_id = terminal_by_id(&evs);
    assert_eq!(by_id.len(), n);
    assert!(by_id
        .values()
        .all(|t| t.len() == 1 && t[0]["type"] == "delivered"));
    assert_eq!(sink.count(), n, "each job sent once");
    let (da, db) = (delivered_by(ports[0]), delivered_by(ports[1]));
    assert_eq!(da + db, n as u64);
    assert!(
        da > 0 && db > 0,
        "both daemons delivered: {da} and {db}\n{}",
        b.log_text()
    );

    let mut at: Vec<_> = evs
        .iter()
        .filter(|e| e["type"] == "delivered")
        .map(|e| chrono::DateTime::parse_from_rfc3339(e["at"].as_str().unwrap()).unwrap())
        .collect();
    at.sort();
    // 30 at 5/s for the pair: a burst of 5, then 25 at 200 ms: about 5 s. Two separate
    // limiters would allow 10/s: about 2 s.
    let span = (at[n - 1] - at[0]).num_milliseconds();
    assert!(span >= 4_000, "30 messages at 5/s took only {span} ms");
    // In any two seconds: the burst and two seconds' worth (15), with room for a stalled
    // process finishing a few at once; separate limiters would allow 30.
    let most = at
        .iter()
        .map(|t| {
            at.iter()
                .filter(|u| **u >= *t && (**u - *t).num_milliseconds() < 2000)
                .count()
        })
        .max()
        .unwrap();
    assert!(most <= 21, "{most} messages within two seconds");
}

/// Two daemons' rules on one key, rate 2/s (a burst of 2, then one every 500 ms): the
/// burst is spent for both; reservations come within a second and are waited for in
/// memory; later ones are sent back, paced one interval apart across both daemons.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_rate_reserves_within_a_second_and_sends_the_rest_back_paced() {
    let redis = Redis::start();
    let client = redis::Client::open(redis.url()).unwrap();
    let conn: paloma::store::RedisConn = client.get_connection_manager().await.unwrap().into();
    let rate = "2/s".parse().unwrap();
    let a = RuleState::with_redis("t", Some(rate), 1, 1, Some((conn.clone(), "x:")));
    let b = RuleState::with_redis("t", Some(rate), 1, 1, Some((conn.clone(), "x:")));

    let t0 = Instant::now();
    assert_eq!(a.admit("d.test").await, Admission::Go);
    assert_eq!(a.admit("d.test").await, Admission::Go);
    assert!(t0.elapsed() < Duration::from_millis(450), "the burst");

    // Four at once, two per daemon: slots at +0.5 s and +1 s are reserved and waited for;
    // +1.5 s is past the longest reservation, so two go back, 500 ms apart.
    let t1 = Instant::now();
    let (r1, r2, r3, r4) = tokio::join!(
        a.admit("d.test"),
        b.admit("d.test"),
        a.admit("d.test"),
        b.admit("d.test")
    );
    let waited = t1.elapsed();
    let results = [r1, r2, r3, r4];
    let go = results.iter().filter(|r| **r == Admission::Go).count();
    let mut back: Vec<Duration> = results
        .iter()
        .filter_map(|r| match r {
            Admission::Later(w) => Some(*w),
            Admission::Go => None,
        })
        .collect();
    back.sort();
    assert_eq!((go, back.len()), (2, 2), "{results:?}");
    assert!(
        waited >= Duration::from_millis(800),
        "the reserved slots were waited for: {waited:?}"
    );
    assert!(back[0] >= Duration::from_millis(1000), "{back:?}");
    let gap = back[1] - back[0];
    assert!(
        gap >= Duration::from_millis(400) && gap <= Duration::from_millis(600),
        "sent back one interval apart: {back:?}"
    );

    // Both keys expire on their own.
    let mut c = redis.conn();
    for key in ["x:rate:t:d.test", "x:rate-back:t:d.test"] {
        let ttl: i64 = redis::cmd("PTTL").arg(key).query(&mut c).unwrap();
        assert!(ttl > 0 && ttl < 10_000, "{key}: PTTL {ttl}");
    }

    // A TAT and a return horizon an hour ahead (the server's clock stepped back): pulled
    // back, the next job waits a second at most instead of an hour.
    let (secs, micros): (String, String) = redis::cmd("TIME").query(&mut c).unwrap();
    let far =
        secs.parse::<i64>().unwrap() * 1_000_000 + micros.parse::<i64>().unwrap() + 3_600_000_000;
    for key in ["x:rate:t:far.test", "x:rate-back:t:far.test"] {
        let _: () = redis::cmd("SET").arg(key).arg(far).query(&mut c).unwrap();
    }
    let t2 = Instant::now();
    assert_eq!(a.admit("far.test").await, Admission::Go);
    assert!(
        t2.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t2.elapsed()
    );
}

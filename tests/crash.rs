//! Shutdown and crashes: SIGTERM drains and exits 0 within 10 s; a daemon killed with
//! SIGKILL mid-campaign leaves its pending jobs to a restarted one, and every job still ends
//! in exactly one terminal event; a Redis restart mid-campaign loses nothing.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use mail_parser::MessageParser;
use serde_json::json;

fn jobs(n: usize, tag: &str) -> Vec<String> {
    (0..n)
        .map(|i| {
            job(
                &format!("{tag}-{i}"),
                tag,
                "receipt",
                &format!("c{i}@crash.test"),
                json!({"name": "C", "order_id": i}),
            )
        })
        .collect()
}

fn delivered_ids(sink: &Sink) -> Vec<String> {
    sink.dumps()
        .iter()
        .filter_map(|raw| {
            MessageParser::default()
                .parse(raw)
                .and_then(|m| m.header_raw("X-Paloma-Id").map(|s| s.trim().to_string()))
        })
        .collect()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_drains_in_flight_jobs_and_exits_zero() {
    let redis = Redis::start();
    // Each DATA answer waits 1 s, so sessions are in flight when SIGTERM arrives.
    let mut sink = Sink::start(&["-w", "1"]);
    let setup = Setup::new(&redis.url(), sink.port, "", "", "");
    let mut conn = redis.conn();
    let n = 400;
    enqueue_raw(&mut conn, &setup.prefix, &jobs(n, "term"));
    let mut daemon = Daemon::spawn(&setup.config);
    wait_for("sessions in flight", Duration::from_secs(20), || {
        daemon.log_text().contains("paloma running")
    });
    std::thread::sleep(Duration::from_millis(600));
    let t0 = Instant::now();
    daemon.signal("TERM");
    let status = daemon
        .wait(Duration::from_secs(10))
        .expect("exited within 10 s of SIGTERM");
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        daemon.log_text()
    );
    assert!(t0.elapsed() < Duration::from_secs(10));
    let log = daemon.log_text();
    assert!(log.contains("shutting down"), "{log}");

    // Everything the sink accepted has its delivered event: in-flight sessions finished and
    // their outcomes were written before exit.
    std::thread::sleep(Duration::from_millis(300));
    let sent: HashSet<String> = delivered_ids(&sink).into_iter().collect();
    let evs = events(&mut conn, &setup.prefix);
    let recorded: HashSet<String> = evs
        .iter()
        .filter(|e| e["type"] == "delivered")
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert!(!sent.is_empty(), "some mail was in flight");
    assert_eq!(
        sent, recorded,
        "every accepted message was recorded before exit"
    );
    assert!(recorded.len() < n, "the test needs work left over");

    // A new daemon finishes the rest (the sink no longer stalls); nothing is sent twice.
    sink.restart(&[]);
    let daemon2 = Daemon::spawn(&setup.config);
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        n,
        Duration::from_secs(120),
        Some(&daemon2),
    );
    let by_id = terminal_by_id(&evs);
    assert_eq!(by_id.len(), n);
    assert!(by_id.values().all(|t| t.len() == 1));
    std::thread::sleep(Duration::from_millis(300));
    let ids = delivered_ids(&sink);
    let unique: HashSet<&String> = ids.iter().collect();
    let missing: Vec<_> = by_id
        .keys()
        .filter(|k| !unique.contains(k))
        .take(5)
        .collect();
    assert_eq!(
        unique.len(),
        n,
        "every job reached the sink; missing e.g. {missing:?}"
    );
    assert_eq!(ids.len(), n, "no duplicates after a drained shutdown");
}

#[test]
fn a_killed_daemons_pending_jobs_are_picked_up_by_a_restarted_one() {
    let redis = Redis::start();
    let mut sink = Sink::start(&["-w", "1"]);
    let setup = Setup::new(&redis.url(), sink.port, "", "", "");
    let mut conn = redis.conn();
    let n = 300;
    enqueue_raw(&mut conn, &setup.prefix, &jobs(n, "kill"));
    let mut daemon = Daemon::spawn(&setup.config);
    wait_for("some pending entries", Duration::from_secs(20), || {
        let v: redis::RedisResult<redis::Value> = redis::cmd("XPENDING")
            .arg(format!("{}sends", setup.prefix))
            .arg("paloma")
            .query(&mut conn);
        matches!(&v, Ok(redis::Value::Array(a)) if matches!(a.first(), Some(redis::Value::Int(p)) if *p > 0))
    });
    std::thread::sleep(Duration::from_millis(500));
    daemon.kill9();
    sink.restart(&[]);

    // claim_idle is 3 s in the test config: the new daemon reclaims what the dead one held.
    let daemon2 = Daemon::spawn(&setup.config);
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        n,
        Duration::from_secs(120),
        Some(&daemon2),
    );
    let by_id = terminal_by_id(&evs);
    assert_eq!(by_id.len(), n, "every job ended");
    for (id, t) in &by_id {
        assert_eq!(t.len(), 1, "{id}: exactly one terminal event, got {t:?}");
        assert_eq!(t[0]["type"], "delivered");
    }
    std::thread::sleep(Duration::from_millis(300));
    let sent: HashSet<String> = delivered_ids(&sink).into_iter().collect();
    assert_eq!(sent.len(), n, "every job reached the sink (at least once)");
    assert!(
        daemon2.log_text().contains("reclaimed"),
        "{}",
        daemon2.log_text()
    );
}

#[test]
fn a_redis_restart_mid_campaign_loses_nothing() {
    let mut redis = Redis::start();
    let sink = Sink::start(&[]);
    let setup = Setup::new(&redis.url(), sink.port, "", "", "");
    let mut conn = redis.conn();
    let n = 3000;
    enqueue_raw(&mut conn, &setup.prefix, &jobs(n, "rr"));
    let daemon = Daemon::spawn(&setup.config);
    wait_for("progress", Duration::from_secs(30), || {
        events(&mut conn, &setup.prefix)
            .iter()
            .filter(|e| is_terminal(e))
            .count()
            > 200
    });
    redis.kill();
    std::thread::sleep(Duration::from_secs(1));
    redis.restart();
    let mut conn = redis.conn();
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        n,
        Duration::from_secs(120),
        Some(&daemon),
    );
    let by_id = terminal_by_id(&evs);
    assert_eq!(by_id.len(), n, "every job ended after the Redis restart");
    let ids: HashSet<String> = delivered_ids(&sink).into_iter().collect();
    assert_eq!(ids.len(), n);
    assert!(
        by_id
            .values()
            .all(|t| t.iter().all(|e| e["type"] == "delivered")),
        "only delivered events"
    );
}

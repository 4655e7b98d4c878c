//! SMTP faults from the sink's own options: 4xx defers and retries through the delayed set
//! until the sink is healthy; 5xx bounces with code, enhanced status and class; a job that
//! keeps deferring past `max_age` fails; 421 + disconnect defers.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use serde_json::json;

fn jobs(n: usize, campaign: &str) -> Vec<String> {
    (0..n)
        .map(|i| {
            job(
                &format!("{campaign}-{i}"),
                campaign,
                "receipt",
                &format!("r{i}@dest.test"),
                json!({"name": "R", "order_id": i}),
            )
        })
        .collect()
}

#[test]
fn temporary_failures_defer_then_deliver_once_the_sink_recovers() {
    let redis = Redis::start();
    let mut sink = Sink::start(&["-r", "RCPT"]);
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        r#"retry_intervals = ["1s"]"#,
        "",
        "",
    );
    let mut conn = redis.conn();
    enqueue_raw(&mut conn, &setup.prefix, &jobs(20, "soft"));
    let daemon = Daemon::spawn(&setup.config);

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let evs = events(&mut conn, &setup.prefix);
        let deferred: HashSet<_> = evs
            .iter()
            .filter(|e| e["type"] == "deferred")
            .map(|e| e["id"].to_string())
            .collect();
        assert!(
            evs.iter().all(|e| !is_terminal(e)),
            "nothing may end while the sink answers 4xx: {evs:?}"
        );
        if deferred.len() == 20 {
            let e = evs.iter().find(|e| e["type"] == "deferred").unwrap();
            assert_eq!(e["attempt"], 1);
            assert!(e["response"].as_str().unwrap().starts_with("450"), "{e}");
            assert!(e["retry_at"].as_str().unwrap().ends_with('Z'));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not every job deferred: {}\n{}",
            deferred.len(),
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(sink.count(), 0);

    sink.restart(&[]);
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        20,
        Duration::from_secs(30),
        Some(&daemon),
    );
    let by_id = terminal_by_id(&evs);
    assert_eq!(by_id.len(), 20);
    assert!(
        by_id
            .values()
            .all(|t| t.len() == 1 && t[0]["type"] == "delivered"),
        "{by_id:?}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(sink.count(), 20, "each job delivered exactly once");
    let scheduled: i64 = redis::cmd("ZCARD")
        .arg(format!("{}scheduled", setup.prefix))
        .query(&mut conn)
        .unwrap();
    assert_eq!(scheduled, 0);
}

#[test]
fn permanent_failures_bounce_with_code_status_and_class() {
    let redis = Redis::start();
    let sink = Sink::start(&[
        "-f",
        "RCPT",
        "-B",
        "550 5.1.1 Recipient address rejected: User unknown",
    ]);
    let setup = Setup::new(&redis.url(), sink.port, "", "", "");
    let mut conn = redis.conn();
    enqueue_raw(&mut conn, &setup.prefix, &jobs(10, "hard"));
    let daemon = Daemon::spawn(&setup.config);
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        10,
        Duration::from_secs(30),
        Some(&daemon),
    );
    for e in evs.iter().filter(|e| is_terminal(e)) {
        assert_eq!(e["type"], "bounced", "{e}");
        assert_eq!(e["code"], 550);
        assert_eq!(e["enhanced"], "5.1.1");
        assert_eq!(e["class"], "invalid_recipient");
        assert!(
            e["response"].as_str().unwrap().contains("User unknown"),
            "{e}"
        );
    }
    assert_eq!(
        evs.iter().filter(|e| e["type"] == "deferred").count(),
        0,
        "a 5xx is not retried"
    );
}

#[test]
fn jobs_that_keep_deferring_fail_after_max_age() {
    let redis = Redis::start();
    let sink = Sink::start(&["-r", "RCPT"]);
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "retry_intervals = [\"1s\"]\nmax_age = \"3s\"",
        "",
        "",
    );
    let mut conn = redis.conn();
    enqueue_raw(&mut conn, &setup.prefix, &jobs(5, "old"));
    let daemon = Daemon::spawn(&setup.config);
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        5,
        Duration::from_secs(30),
        Some(&daemon),
    );
    let by_id = terminal_by_id(&evs);
    for (id, t) in &by_id {
        assert_eq!(t.len(), 1);
        assert_eq!(t[0]["type"], "failed", "{id}: {}", t[0]);
        assert!(t[0]["response"].as_str().unwrap().starts_with("450"));
    }
    let deferrals = evs.iter().filter(|e| e["type"] == "deferred").count();
    assert!(
        deferrals >= 5,
        "each job was retried before failing ({deferrals} deferrals)"
    );
}

#[test]
fn a_421_disconnect_defers() {
    let redis = Redis::start();
    let mut sink = Sink::start(&["-Q", "MAIL"]);
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        r#"retry_intervals = ["1s"]"#,
        "",
        "",
    );
    let mut conn = redis.conn();
    enqueue_raw(&mut conn, &setup.prefix, &jobs(3, "busy"));
    let daemon = Daemon::spawn(&setup.config);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let evs = events(&mut conn, &setup.prefix);
        let d: Vec<_> = evs.iter().filter(|e| e["type"] == "deferred").collect();
        if d.len() >= 3 {
            assert!(
                d.iter()
                    .all(|e| e["response"].as_str().unwrap().starts_with("421")),
                "{d:?}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    sink.restart(&[]);
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        3,
        Duration::from_secs(20),
        Some(&daemon),
    );
    assert!(terminal_by_id(&evs)
        .values()
        .all(|t| t[0]["type"] == "delivered"));
}

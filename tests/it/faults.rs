//! SMTP faults from the sink's own options: 4xx defers and retries through the delayed set
//! until the sink is healthy; 5xx bounces with code, enhanced status and class; a job that
//! keeps deferring past `max_age` fails; 421 + disconnect defers.

use crate::common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;

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
    enqueue_raw(&mut conn, &setup.prefix, &jobs(20, "soft", "dest.test"));
    let daemon = Daemon::spawn(&setup.config);

    let evs = wait_for("every job deferred", Duration::from_secs(30), || {
        let evs = events(&mut conn, &setup.prefix);
        assert!(
            evs.iter().all(|e| !is_terminal(e)),
            "nothing may end while the sink answers 4xx: {evs:?}\n{}",
            daemon.log_text()
        );
        let deferred: HashSet<_> = evs
            .iter()
            .filter(|e| e["type"] == "deferred")
            .map(|e| e["id"].to_string())
            .collect();
        (deferred.len() == 20).then_some(evs)
    });
    let e = evs.iter().find(|e| e["type"] == "deferred").unwrap();
    assert_eq!(e["attempt"], 1);
    assert!(e["response"].as_str().unwrap().starts_with("450"), "{e}");
    assert!(e["retry_at"].as_str().unwrap().ends_with('Z'));
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
    assert_eq!(
        sink.wait_count(20, Duration::from_secs(10)),
        20,
        "each job delivered exactly once"
    );
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
    enqueue_raw(&mut conn, &setup.prefix, &jobs(10, "hard", "dest.test"));
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
    enqueue_raw(&mut conn, &setup.prefix, &jobs(5, "old", "dest.test"));
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
    enqueue_raw(&mut conn, &setup.prefix, &jobs(3, "busy", "dest.test"));
    let daemon = Daemon::spawn(&setup.config);
    let d = wait_for_daemon("three deferrals", Duration::from_secs(20), &daemon, || {
        let d: Vec<_> = events(&mut conn, &setup.prefix)
            .into_iter()
            .filter(|e| e["type"] == "deferred")
            .collect();
        (d.len() >= 3).then_some(d)
    });
    assert!(
        d.iter()
            .all(|e| e["response"].as_str().unwrap().starts_with("421")),
        "{d:?}"
    );
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

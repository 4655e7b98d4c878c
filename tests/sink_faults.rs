//! The SMTP peer misbehaving in the ways real servers do: smtp-sink disconnecting in the
//! middle of DATA (after the DATA command, and after the final dot, before its reply) and
//! answering slower than `delivery.timeout`. Each attempt defers (never bounces), and once
//! the sink behaves every job is delivered with exactly one terminal event.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

fn run_fault(args: &[&str]) {
    let redis = Redis::start();
    let mut sink = Sink::start(args);
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "retry_intervals = [\"1s\"]",
        "",
        "",
    );
    let mut conn = redis.conn();
    let n = 20;
    let jobs: Vec<String> = (0..n)
        .map(|i| {
            job(
                &format!("f{i}"),
                "fault",
                "receipt",
                &format!("f{i}@x.test"),
                json!({"name": "F"}),
            )
        })
        .collect();
    enqueue_raw(&mut conn, &setup.prefix, &jobs);
    let daemon = Daemon::spawn(&setup.config);
    wait_until("deferrals", Duration::from_secs(30), || {
        events(&mut conn, &setup.prefix)
            .iter()
            .filter(|e| e["type"] == "deferred")
            .count()
            >= n
    });
    let evs = events(&mut conn, &setup.prefix);
    assert!(
        !evs.iter().any(is_terminal),
        "no job ends while the sink misbehaves: {evs:?}"
    );
    let d = evs.iter().find(|e| e["type"] == "deferred").unwrap();
    assert!(!d["response"].as_str().unwrap().is_empty(), "{d}");
    sink.restart(&[]);
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        n,
        Duration::from_secs(60),
        Some(&daemon),
    );
    let by_id = terminal_by_id(&evs);
    assert_eq!(by_id.len(), n);
    for (id, t) in by_id {
        assert_eq!(t.len(), 1, "{id}: {t:?}");
        assert_eq!(t[0]["type"], "delivered", "{id}: {t:?}");
    }
}

#[test]
fn a_disconnect_after_the_data_command_defers() {
    run_fault(&["-q", "DATA"]);
}

#[test]
fn a_disconnect_after_the_final_dot_defers() {
    // The ambiguous case: the server may have the message. RFC 5321 §4.1.1.4 makes it a
    // temporary failure; it is sent again.
    run_fault(&["-q", "."]);
}

#[test]
fn a_reply_slower_than_the_timeout_defers() {
    let redis = Redis::start();
    let mut sink = Sink::start(&["-w", "3"]);
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "retry_intervals = [\"1s\"]",
        "",
        "",
    );
    let cfg = std::fs::read_to_string(&setup.config)
        .unwrap()
        .replace("timeout = \"5s\"", "timeout = \"1s\"");
    std::fs::write(&setup.config, cfg).unwrap();
    let mut conn = redis.conn();
    enqueue_raw(
        &mut conn,
        &setup.prefix,
        &[job(
            "s1",
            "slow",
            "receipt",
            "s1@x.test",
            json!({"name": "S"}),
        )],
    );
    let daemon = Daemon::spawn(&setup.config);
    wait_until("a deferral", Duration::from_secs(30), || {
        events(&mut conn, &setup.prefix)
            .iter()
            .any(|e| e["type"] == "deferred")
    });
    let evs = events(&mut conn, &setup.prefix);
    let d = evs.iter().find(|e| e["type"] == "deferred").unwrap();
    assert!(d["response"].as_str().unwrap().contains("timed out"), "{d}");
    assert!(!evs.iter().any(is_terminal));
    sink.restart(&[]);
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        1,
        Duration::from_secs(30),
        Some(&daemon),
    );
    let t = terminal_by_id(&evs);
    assert_eq!(t["s1"].len(), 1);
    assert_eq!(t["s1"][0]["type"], "delivered");
}

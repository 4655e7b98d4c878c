//! Late bounces: a real Postfix accepts paloma's messages as its relay, then cannot deliver
//! them (its next hop, smtp-sink, refuses every recipient with 550 5.1.1), so Postfix's own
//! bounce daemon sends RFC 3464 DSNs to each message's VERP return path, which Postfix routes
//! to paloma's bounce listener. Each job gets one `returned` event after its `delivered`,
//! and its address is suppressed.

use crate::common;

use std::time::Duration;

use common::postfix::Postfix;
use common::*;

#[test]
fn a_real_postfix_dsn_reaches_the_verp_address_and_suppresses_the_recipient() {
    let redis = Redis::start();
    let sink = Sink::start(&[
        "-f",
        "RCPT",
        "-B",
        "550 5.1.1 <nobody>: Recipient address rejected: User unknown",
    ]);
    let bounce_port = free_port();
    let metrics_port = free_port();
    let postfix = Postfix::start(sink.port, &[("bounces.test", bounce_port)], "");
    let setup = Setup::new(
        &redis.url(),
        postfix.port,
        "",
        "",
        &format!(
            "[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n[bounces]\ndomain = \"bounces.test\"\nlisten = \"127.0.0.1:{bounce_port}\"\n"
        ),
    );
    let daemon = Daemon::spawn(&setup.config);
    let mut conn = redis.conn();
    let jobs = jobs(3, "late", "example.test");
    enqueue_raw(&mut conn, &setup.prefix, &jobs);
    wait_terminal(
        &mut conn,
        &setup.prefix,
        3,
        Duration::from_secs(30),
        Some(&daemon),
    );
    let returned = wait_for_daemon(
        "a returned event per job (Postfix's DSNs)",
        Duration::from_secs(90),
        &daemon,
        || {
            let evs = events(&mut conn, &setup.prefix);
            let r: Vec<_> = evs
                .into_iter()
                .filter(|e| e["type"] == "returned")
                .collect();
            (r.len() >= 3).then_some(r)
        },
    );
    let log = postfix.log();
    assert!(
        log.contains("status=bounced"),
        "Postfix bounced them:\n{log}"
    );
    let mut ids: Vec<&str> = returned.iter().map(|e| e["id"].as_str().unwrap()).collect();
    ids.sort();
    assert_eq!(
        ids,
        ["late-0", "late-1", "late-2"],
        "one per job, none twice"
    );
    for e in &returned {
        assert_eq!(e["campaign"], "late");
        assert_eq!(e["status"], "5.1.1", "{e}");
        assert_eq!(e["class"], "invalid_recipient", "{e}");
        assert_eq!(e["permanent"], true);
        assert_eq!(e["reporting_mta"], "relay.postfix.test");
        assert!(
            e["diagnostic"].as_str().unwrap().contains("User unknown"),
            "{e}"
        );
        let to = e["to"].as_str().unwrap();
        let reason: Option<String> = redis::cmd("HGET")
            .arg(format!("{}suppressed", setup.prefix))
            .arg(to)
            .query(&mut conn)
            .unwrap();
        assert_eq!(reason.as_deref(), Some("bounced"), "{to} suppressed");
    }
    // Each job still has exactly one terminal event (the delivery to the relay).
    let by_id = terminal_by_id(&events(&mut conn, &setup.prefix));
    for id in ["late-0", "late-1", "late-2"] {
        assert_eq!(by_id[id].len(), 1);
        assert_eq!(by_id[id][0]["type"], "delivered");
    }
    let returned_stat: i64 = redis::cmd("HGET")
        .arg(format!("{}stats:late", setup.prefix))
        .arg("returned")
        .query(&mut conn)
        .unwrap();
    assert_eq!(returned_stat, 3);
    // Counted at the level of contact pressure of the send it came back from (the token
    // carries it): each was its recipient's first marketing message.
    let by_touch: i64 = redis::cmd("HGET")
        .arg(format!("{}touches:late", setup.prefix))
        .arg("1:returned")
        .query(&mut conn)
        .unwrap();
    assert_eq!(by_touch, 3);
    assert_eq!(
        metric(
            metrics_port,
            "paloma_returned_total{class=\"invalid_recipient\"}"
        ),
        3.0
    );
    // A new job to a returned address is suppressed, not sent.
    enqueue_raw(
        &mut conn,
        &setup.prefix,
        &[job(
            "late-again",
            "late",
            "receipt",
            "u0@example.test",
            serde_json::json!({"name": "R", "order_id": 1}),
        )],
    );
    wait_terminal(
        &mut conn,
        &setup.prefix,
        4,
        Duration::from_secs(30),
        Some(&daemon),
    );
    let by_id = terminal_by_id(&events(&mut conn, &setup.prefix));
    assert_eq!(by_id["late-again"][0]["type"], "suppressed");
    assert_eq!(by_id["late-again"][0]["reason"], "bounced");
}

/// Postfix's next hop answers 450 to every recipient, so the messages wait in Postfix's
/// queue; past `delay_warning_time` its bounce daemon sends a delay notice (`Action:
/// delayed`), which is recorded and never suppresses.
#[test]
fn a_delay_notice_is_recorded_and_does_not_suppress() {
    let redis = Redis::start();
    let sink = Sink::start(&["-r", "RCPT"]);
    let bounce_port = free_port();
    let postfix = Postfix::start(
        sink.port,
        &[("bounces.test", bounce_port)],
        "delay_warning_time = 1s\nqueue_run_delay = 1s\nminimal_backoff_time = 1s\nmaximal_backoff_time = 2s\n",
    );
    let setup = Setup::new(
        &redis.url(),
        postfix.port,
        "",
        "",
        &format!("[bounces]\ndomain = \"bounces.test\"\nlisten = \"127.0.0.1:{bounce_port}\"\n"),
    );
    let daemon = Daemon::spawn(&setup.config);
    let mut conn = redis.conn();
    enqueue_raw(&mut conn, &setup.prefix, &jobs(1, "slow", "example.test"));
    wait_terminal(
        &mut conn,
        &setup.prefix,
        1,
        Duration::from_secs(30),
        Some(&daemon),
    );
    let e = wait_for_daemon("a delay notice", Duration::from_secs(90), &daemon, || {
        events(&mut conn, &setup.prefix)
            .into_iter()
            .find(|e| e["type"] == "returned")
    });
    assert_eq!(e["id"], "slow-0");
    assert_eq!(e["action"], "delayed", "{e}");
    assert_eq!(e["permanent"], false);
    assert!(e["status"].as_str().unwrap().starts_with("4."), "{e}");
    let reason: Option<String> = redis::cmd("HGET")
        .arg(format!("{}suppressed", setup.prefix))
        .arg("u0@example.test")
        .query(&mut conn)
        .unwrap();
    assert_eq!(reason, None, "a delay suppresses nobody");
    let delayed: i64 = redis::cmd("HGET")
        .arg(format!("{}stats:slow", setup.prefix))
        .arg("returned_delayed")
        .query(&mut conn)
        .unwrap();
    assert_eq!(delayed, 1);
}

//! Workflow timers (`not_opened`, `not_clicked`), end to end: a not_opened timer reminds
//! only the recipient who stayed silent (a machine's open cancels nothing; an unsubscribe or
//! a real open does; a suppressed address gets nothing), and a timer outlives the daemon that
//! armed it.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use common::track::*;
use common::*;
use serde_json::Value;

#[test]
fn not_opened_reminds_only_the_silent_recipient_after_the_window() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let mport = free_port();
    let (setup, port, base) = tracking_setup(
        &redis.url(),
        sink.port,
        "",
        &format!(
            r#"
[metrics]
listen = "127.0.0.1:{mport}"
[[workflows]]
name = "reminder"
campaign = "launch"
on = "not_opened"
within = "3s"
send = {{ template = "followup", campaign = "launch-reminder" }}
"#
        ),
    );
    let mut conn = redis.conn();
    let people = ["opener", "leaver", "silent", "blocked"];
    let jobs: Vec<String> = people
        .iter()
        .map(|p| {
            job(
                p,
                "launch",
                "newsletter",
                &format!("{p}@example.test"),
                newsletter_data(p),
            )
        })
        .collect();
    enqueue_raw(&mut conn, &setup.prefix, &jobs);
    let mut daemon = Daemon::spawn(&setup.config);
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        4,
        Duration::from_secs(60),
        Some(&daemon),
    );
    wait_port("127.0.0.1", port, Duration::from_secs(10));
    let delivered_at: HashMap<String, i64> = evs
        .iter()
        .filter(|e| e["type"] == "delivered")
        .map(|e| (e["id"].as_str().unwrap().to_string(), at_ms(e)))
        .collect();
    assert_eq!(delivered_at.len(), 4, "{evs:?}");

    let mails = captured(&sink, &base);
    // Well inside the window: a person opens, another unsubscribes, an image proxy fetches
    // the silent one's pixel (a machine's open cancels nothing), and an operator blocks the
    // fourth address (suppressed: no follow-up, for any reason).
    assert_eq!(get(port, &mails["opener"].pixel, MAIL_UA).status, 200);
    assert_eq!(one_click(port, &mails["leaver"].unsubscribe).status, 200);
    assert_eq!(get(port, &mails["silent"].pixel, PROXY_UA).status, 200);
    let _: () = redis::cmd("HSET")
        .arg(format!("{}suppressed", setup.prefix))
        .arg("blocked@example.test")
        .arg("manual")
        .query(&mut conn)
        .unwrap();

    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        5,
        Duration::from_secs(20),
        Some(&daemon),
    );
    let reminder = evs
        .iter()
        .find(|e| is_terminal(e) && e["id"] == "wf:reminder:silent")
        .unwrap_or_else(|| panic!("no reminder among {evs:?}"));
    assert_eq!(reminder["type"], "delivered");
    assert_eq!(reminder["campaign"], "launch-reminder");
    let waited = at_ms(reminder) - delivered_at["silent"];
    assert!(
        (3000..10_000).contains(&waited),
        "reminder {waited} ms after delivery"
    );

    // Every timer fired or cancelled, every event taken in by the rules, every job they
    // queued done: nothing more can come of them.
    let timers = format!("{}timers", setup.prefix);
    wait_until("every timer resolved", Duration::from_secs(20), || {
        let n: i64 = redis::cmd("ZCARD").arg(&timers).query(&mut conn).unwrap();
        n == 0 && rules_done(&mut conn, &setup.prefix)
    });
    let ends = terminal_events(&mut conn, &setup.prefix);
    assert_eq!(ends.len(), 5, "exactly one reminder: {ends:?}");
    assert_eq!(sink.count(), 5);
    let mails = captured(&sink, &base);
    assert_eq!(mails["wf:reminder:silent"].to, "silent@example.test");
    assert!(mails["wf:reminder:silent"].html.contains("Hello silent,"));
    let left: i64 = redis::cmd("ZCARD").arg(&timers).query(&mut conn).unwrap();
    assert_eq!(left, 0, "fired and cancelled timers are gone");

    let m = metrics_text(mport);
    assert_metrics(
        &m,
        &[
            r#"paloma_workflow_actions_total{action="timer",result="armed",rule="reminder"} 4"#,
            r#"paloma_workflow_actions_total{action="timer",result="cancelled",rule="reminder"} 2"#,
            r#"paloma_workflow_actions_total{action="timer",result="fired",rule="reminder"} 2"#,
            r#"paloma_workflow_actions_total{action="send",result="enqueued",rule="reminder"} 1"#,
            r#"paloma_workflow_actions_total{action="send",result="suppressed",rule="reminder"} 1"#,
        ],
    );
    assert!(!daemon.log_text().contains("panicked"));
    daemon.term();
}

#[test]
fn a_timer_outlives_the_daemon_that_armed_it() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        "",
        r#"
[[workflows]]
name = "nudge"
on = "not_clicked"
within = "3s"
send = { template = "followup" }
"#,
    );
    let mut conn = redis.conn();
    enqueue_raw(
        &mut conn,
        &setup.prefix,
        &[job(
            "d1",
            "drip",
            "newsletter",
            "d1@example.test",
            newsletter_data("Dee"),
        )],
    );
    let mut daemon = Daemon::spawn(&setup.config);
    wait_terminal(
        &mut conn,
        &setup.prefix,
        1,
        Duration::from_secs(60),
        Some(&daemon),
    );
    let timers = format!("{}timers", setup.prefix);
    let due = wait_for("the armed timer", Duration::from_secs(10), || {
        let armed: Vec<(String, i64)> = redis::cmd("ZRANGE")
            .arg(&timers)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query(&mut conn)
            .unwrap();
        (armed.len() == 1).then(|| armed[0].1)
    });
    // Killed outright, and down past the due time (by Redis's clock, which the timers go
    // by): nothing is sent meanwhile…
    daemon.kill9();
    wait_until("the timer's due time", Duration::from_secs(10), || {
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query(&mut conn).unwrap();
        secs * 1000 + micros / 1000 > due
    });
    assert_eq!(sink.count(), 1);
    // …and the next daemon (any daemon) fires it.
    let mut daemon = Daemon::spawn(&setup.config);
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        2,
        Duration::from_secs(30),
        Some(&daemon),
    );
    let ends: Vec<&Value> = evs.iter().filter(|e| is_terminal(e)).collect();
    assert_eq!(ends[1]["id"], "wf:nudge:d1", "{ends:?}");
    assert_eq!(ends[1]["campaign"], "drip");
    // Once the rules have taken in the follow-up's own events and every job is done,
    // nothing more can come of them.
    wait_until(
        "the rules done with every event",
        Duration::from_secs(20),
        || rules_done(&mut conn, &setup.prefix),
    );
    assert_eq!(terminal_events(&mut conn, &setup.prefix).len(), 2);
    // The follow-up is of the same campaign, but a rule never arms for its own follow-ups.
    let n: i64 = redis::cmd("ZCARD").arg(&timers).query(&mut conn).unwrap();
    assert_eq!(n, 0);
    daemon.term();
}

//! A workflow on clicks, end to end: real mail through smtp-sink and real clicks against
//! the tracking server. A click on a named link sends one follow-up with the original data,
//! however often it is clicked and however often the click reaches the events stream.

use crate::common;

use std::time::Duration;

use common::track::*;
use common::*;
use serde_json::Value;

#[test]
fn a_click_on_the_named_link_sends_one_follow_up_with_the_original_data() {
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
name = "pricing-followup"
campaign = "spring"
on = "clicked"
link = "pricing"
send = {{ template = "followup", campaign = "spring-followup" }}
"#
        ),
    );
    let mut conn = redis.conn();
    let jobs = vec![
        job(
            "ann",
            "spring",
            "newsletter",
            "ann@example.test",
            newsletter_data("Ann"),
        ),
        job(
            "bob",
            "spring",
            "newsletter",
            "bob@example.test",
            newsletter_data("Bob"),
        ),
    ];
    enqueue_raw(&mut conn, &setup.prefix, &jobs);
    let mut daemon = Daemon::spawn(&setup.config);
    wait_terminal(
        &mut conn,
        &setup.prefix,
        2,
        Duration::from_secs(60),
        Some(&daemon),
    );
    assert!(daemon.log_text().contains("workflows running"));
    wait_port("127.0.0.1", port, Duration::from_secs(10));

    let mails = captured(&sink, &base);
    // The newsletter's ninth tracked link is "See all prices" (data-paloma-link="pricing");
    // HEAD shows where it goes without recording a click.
    let pricing = &mails["ann"].clicks[8];
    let head = request(port, "HEAD", pricing, &[("User-Agent", MAIL_UA)], b"");
    assert_eq!(
        head.header("location"),
        Some("https://shop.example/pricing")
    );
    for _ in 0..3 {
        assert_eq!(get(port, pricing, MAIL_UA).status, 302);
    }
    // Bob clicks another link (home) only.
    assert_eq!(get(port, &mails["bob"].clicks[0], MAIL_UA).status, 302);
    // One daemon records the repeats as one click (tracking.repeat_window); the same click
    // can still reach the stream again, from other daemons behind a load balancer or after
    // the window: two more copies of it, which the rule must not act on again.
    let clicked = wait_for("ann's click", Duration::from_secs(10), || {
        let evs = events(&mut conn, &setup.prefix);
        let ann: Vec<&Value> = evs
            .iter()
            .filter(|e| e["type"] == "clicked" && e["id"] == "ann")
            .collect();
        assert!(ann.len() <= 1, "{ann:?}");
        ann.first().map(|e| e.to_string())
    });
    add_events(&mut conn, &setup.prefix, &[clicked.clone(), clicked]);

    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        3,
        Duration::from_secs(20),
        Some(&daemon),
    );
    let follow_up = evs
        .iter()
        .find(|e| e["id"] == "wf:pricing-followup:ann")
        .unwrap_or_else(|| panic!("no follow-up among {evs:?}"));
    assert_eq!(follow_up["type"], "delivered");
    assert_eq!(follow_up["campaign"], "spring-followup");
    assert_eq!(follow_up["to"], "ann@example.test");

    // However long we wait: three clicks, one follow-up; Bob's click, none. Once the rules
    // have taken in every event (the copies and Bob's click too) and every job they queued
    // is done, nothing more can come of them.
    wait_until(
        "the rules done with every event",
        Duration::from_secs(20),
        || rules_done(&mut conn, &setup.prefix),
    );
    let ends = terminal_events(&mut conn, &setup.prefix);
    assert_eq!(ends.len(), 3, "{ends:?}");
    assert_eq!(sink.count(), 3);
    let mails = captured(&sink, &base);
    let f = &mails["wf:pricing-followup:ann"];
    assert_eq!(f.to, "ann@example.test");
    assert_eq!(f.subject, "Ann, still thinking it over?");
    assert!(f.html.contains("Hello Ann,"), "{}", f.html);
    assert!(f.html.contains("Linen shirt") && f.text.contains("Linen shirt, 49 €"));
    assert!(!mails.contains_key("wf:pricing-followup:bob"));

    // The follow-up is a mail like any other: its own clicks do not fire the rule again
    // (another campaign), and the clicks were counted.
    assert!(!f.clicks.is_empty(), "the follow-up has tracked links");
    for link in &f.clicks {
        assert_eq!(get(port, link, MAIL_UA).status, 302, "{link}");
    }
    wait_until(
        "the follow-up's clicks recorded",
        Duration::from_secs(10),
        || {
            events(&mut conn, &setup.prefix)
                .iter()
                .filter(|e| e["type"] == "clicked" && e["id"] == "wf:pricing-followup:ann")
                .count()
                == f.clicks.len()
        },
    );
    wait_until(
        "the rules done with the follow-up's clicks",
        Duration::from_secs(20),
        || rules_done(&mut conn, &setup.prefix),
    );
    assert_eq!(terminal_events(&mut conn, &setup.prefix).len(), 3);
    let m = metrics_text(mport);
    assert_metrics(
        &m,
        &[
            r#"paloma_workflow_actions_total{action="send",result="enqueued",rule="pricing-followup"} 1"#,
            r#"paloma_workflow_actions_total{action="send",result="duplicate",rule="pricing-followup"} 2"#,
        ],
    );

    daemon.term();
    assert!(!daemon.log_text().contains("panicked"));
}

//! Contact pressure and engagement: a frequency cap holds across campaigns (transactional
//! mail exempt); opens and clicks are counted per campaign and per link, total and unique,
//! with machine hits apart; `paloma stats --recipient` shows one person's engagement.

use crate::common;

use std::time::Duration;

use common::track::*;
use common::*;
use serde_json::json;

#[test]
fn a_frequency_cap_holds_across_campaigns() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let (setup, _, _) = tracking_setup(
        &redis.url(),
        sink.port,
        "",
        "[[caps]]\nmax = 1\nper = \"90d\"\n[[caps]]\nmax = 3\nper = \"7d\"\n",
    );
    let mut conn = redis.conn();
    enqueue_raw(
        &mut conn,
        &setup.prefix,
        &[
            news("a1", "spring", "x@cap.test"),
            news("a2", "spring", "y@cap.test"),
        ],
    );
    let daemon = Daemon::spawn(&setup.config);
    wait_terminal(
        &mut conn,
        &setup.prefix,
        2,
        Duration::from_secs(30),
        Some(&daemon),
    );
    enqueue_raw(
        &mut conn,
        &setup.prefix,
        &[
            news("b1", "summer", "x@cap.test"),
            news("b2", "summer", "Y@cap.test"),
            news("b3", "summer", "z@cap.test"),
            json!({"id": "t1", "campaign": "receipts", "template": "receipt", "to": "x@cap.test", "transactional": true, "data": {"name": "X"}}).to_string(),
        ],
    );
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        6,
        Duration::from_secs(30),
        Some(&daemon),
    );
    let t = terminal_by_id(&evs);
    assert_eq!(t["a1"][0]["type"], "delivered");
    for id in ["b1", "b2"] {
        assert_eq!(
            (t[id][0]["type"].as_str(), t[id][0]["reason"].as_str()),
            (Some("suppressed"), Some("frequency_cap")),
            "{id}"
        );
    }
    assert_eq!(
        t["b3"][0]["type"], "delivered",
        "a new recipient is not capped"
    );
    assert_eq!(
        t["t1"][0]["type"], "delivered",
        "transactional mail is exempt"
    );
    assert_eq!(sink.wait_count(4, Duration::from_secs(10)), 4);
    let (_, out, _) = paloma(
        &[
            "stats",
            "--config",
            setup.config.to_str().unwrap(),
            "--recipient",
            "x@cap.test",
        ],
        None,
    );
    assert!(
        out.contains("recent_sends") && out.contains("suppressed     no"),
        "{out}"
    );
}

#[test]
fn opens_and_clicks_are_counted_per_campaign_and_link() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let mport = free_port();
    let (setup, port, base) = tracking_setup(
        &redis.url(),
        sink.port,
        "",
        &format!("[metrics]\nlisten = \"127.0.0.1:{mport}\""),
    );
    let mut conn = redis.conn();
    enqueue_raw(
        &mut conn,
        &setup.prefix,
        &[
            news("e1", "eng", "a@eng.test"),
            news("e2", "eng", "b@eng.test"),
        ],
    );
    let daemon = Daemon::spawn(&setup.config);
    wait_terminal(
        &mut conn,
        &setup.prefix,
        2,
        Duration::from_secs(30),
        Some(&daemon),
    );
    wait_port("127.0.0.1", port, Duration::from_secs(5));
    sink.wait_count(2, Duration::from_secs(10));
    let mails = captured(&sink, &base);
    let (m1, m2) = (&mails["e1"], &mails["e2"]);
    // e1 opens twice and clicks "pricing" twice; e2 opens once; a proxy fetches e2's pixel.
    // The repeats come within tracking.repeat_window, so they are answered, not counted.
    for _ in 0..2 {
        assert_eq!(get(port, &m1.pixel, MAIL_UA).status, 200);
    }
    assert_eq!(get(port, &m2.pixel, MAIL_UA).status, 200);
    assert_eq!(get(port, &m2.pixel, PROXY_UA).status, 200);
    let pricing = &m1.clicks[8];
    // The second click on it comes once the first is recorded (the open and this click).
    assert_eq!(get(port, pricing, MAIL_UA).status, 302);
    wait_tracking(&mut conn, &setup.prefix, "e1", 2);
    assert_eq!(get(port, pricing, MAIL_UA).status, 302);
    // A marker after the repeats: once its event is stored, theirs would be too.
    assert_eq!(get(port, &m1.clicks[0], MAIL_UA).status, 302);
    let e1 = wait_tracking(&mut conn, &setup.prefix, "e1", 3);
    assert_eq!(
        e1.len(),
        3,
        "one open, one pricing click, the marker: {e1:?}"
    );
    wait_tracking(&mut conn, &setup.prefix, "e2", 2);
    let (st, out, err) = paloma(
        &[
            "stats",
            "--config",
            setup.config.to_str().unwrap(),
            "--json",
        ],
        None,
    );
    assert!(st.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let c = &v["campaigns"][0];
    assert_eq!(
        (
            &c["opened"],
            &c["unique_opened"],
            &c["clicked"],
            &c["unique_clicked"],
            &c["opened_machine"]
        ),
        (&json!(2), &json!(2), &json!(2), &json!(1), &json!(1)),
        "{c}"
    );
    assert_eq!(c["links"], json!([["home", 1, 1], ["pricing", 1, 1]]));
    let (_, out, _) = paloma(
        &[
            "stats",
            "--config",
            setup.config.to_str().unwrap(),
            "--recipient",
            "a@eng.test",
        ],
        None,
    );
    assert!(
        out.contains("last_open") && out.contains("last_click"),
        "{out}"
    );
    let (_, out, _) = paloma(&["stats", "--config", setup.config.to_str().unwrap()], None);
    assert!(out.contains("link pricing"), "{out}");
    let metrics = get(mport, "/metrics", MAIL_UA).text();
    for line in [
        "paloma_engagement_total{campaign=\"eng\",type=\"opened\",who=\"human\"} 2",
        "paloma_engagement_total{campaign=\"eng\",type=\"opened\",who=\"machine\"} 1",
        "paloma_engagement_unique_total{campaign=\"eng\",type=\"opened\"} 2",
        "paloma_engagement_unique_total{campaign=\"eng\",type=\"clicked\"} 1",
        "paloma_link_clicks_total{campaign=\"eng\",link=\"pricing\"} 1",
    ] {
        assert!(metrics.contains(line), "/metrics lacks {line}:\n{metrics}");
    }
}

#[test]
fn scanner_addresses_and_hits_right_after_sending_are_machine_hits() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let (setup, port, base) = tracking_setup(
        &redis.url(),
        sink.port,
        "",
        "machine_window = \"3s\"\nscanner_networks = [\"203.0.113.0/24\"]\ntrust_forwarded = true",
    );
    let mut conn = redis.conn();
    enqueue_raw(
        &mut conn,
        &setup.prefix,
        &[news("m1", "mach", "a@mach.test")],
    );
    let daemon = Daemon::spawn(&setup.config);
    wait_terminal(
        &mut conn,
        &setup.prefix,
        1,
        Duration::from_secs(30),
        Some(&daemon),
    );
    let delivered_at = at_ms(
        &events(&mut conn, &setup.prefix)
            .into_iter()
            .find(|e| e["type"] == "delivered")
            .unwrap(),
    );
    wait_port("127.0.0.1", port, Duration::from_secs(5));
    let mails = captured(&sink, &base);
    let m = &mails["m1"];
    let hit = |path: &str, from: &str| {
        request(
            port,
            "GET",
            path,
            &[("User-Agent", MAIL_UA), ("X-Forwarded-For", from)],
            b"",
        )
        .status
    };
    // A person's client, but right after delivery: a gateway prefetching.
    assert_eq!(hit(&m.pixel, "198.51.100.7"), 200);
    wait_tracking(&mut conn, &setup.prefix, "m1", 1);
    // Time must pass here: until machine_window (3 s) after the send time the token carries
    // (whole seconds, no later than the delivered event's `at`), and a second more.
    wait_until("the machine window past", Duration::from_secs(10), || {
        chrono::Utc::now().timestamp_millis() >= delivered_at + 3000 + 1000
    });
    // Later: the same client is a person; a scanner's address range is not.
    assert_eq!(hit(&m.pixel, "198.51.100.7"), 200);
    wait_tracking(&mut conn, &setup.prefix, "m1", 2);
    assert_eq!(hit(&m.clicks[0], "10.0.0.1, 203.0.113.40"), 302);
    wait_tracking(&mut conn, &setup.prefix, "m1", 3);
    assert_eq!(hit(&m.clicks[0], "203.0.113.40, 198.51.100.7"), 302);
    let evs = wait_tracking(&mut conn, &setup.prefix, "m1", 4);
    let seen: Vec<(&str, bool)> = evs
        .iter()
        .map(|e| (e["type"].as_str().unwrap(), e["machine"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        seen,
        [
            ("opened", true),
            ("opened", false),
            ("clicked", true),
            ("clicked", false)
        ]
    );
}

//! A campaign of 1,000 personalized jobs arrives complete and correct at a real smtp-sink:
//! headers, both MIME parts, escaped data, encoded subjects and names, stats; a replay of the
//! same ids sends nothing more.

use crate::common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use mail_parser::MessageParser;
use serde_json::json;

const N: usize = 1000;

#[test]
fn thousand_job_campaign_arrives_complete_and_correct() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let setup = Setup::new(&redis.url(), sink.port, "", "", "");
    let mut conn = redis.conn();
    let mut jobs = Vec::with_capacity(N);
    for i in 0..N {
        let mut j = json!({
            "id": format!("job-{i}"),
            "campaign": "spring",
            "template": "newsletter",
            "to": format!("user{i}@example{}.test", i % 7),
            "to_name": if i.is_multiple_of(2) { format!("Zoë Ünal {i}") } else { format!("Plain Name {i}") },
            "data": {
                "first_name": format!("Zoë<b>{i}</b>"),
                "products": [
                    {"name": "Tom & Jerry \"mug\"", "price": "9.90", "url": format!("https://shop.test/p/{i}?a=1&b=2")},
                    {"name": "Hat", "price": "5.00", "url": "https://shop.test/p/hat"},
                ],
            },
            "headers": {"X-List-Segment": "vip"},
        });
        if i.is_multiple_of(10) {
            // The transactional template has its own text part.
            j["template"] = json!("receipt");
            j["data"] = json!({"name": format!("Ana {i}"), "order_id": format!("A-{i}"), "total": "12.00 €",
                "items": [{"qty": 1, "name": "Café <grande>", "price": "3.00"}], "tracking_url": "https://track.test/A"});
        }
        jobs.push(j.to_string());
    }
    // Enqueue before the daemon starts: the group must read from the stream's start.
    enqueue_raw(&mut conn, &setup.prefix, &jobs);
    let daemon = Daemon::spawn(&setup.config);
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        N,
        Duration::from_secs(120),
        Some(&daemon),
    );

    let by_id = terminal_by_id(&evs);
    assert_eq!(by_id.len(), N, "one terminal event per job");
    for (id, t) in &by_id {
        assert_eq!(t.len(), 1, "{id} has {} terminal events", t.len());
        assert_eq!(t[0]["type"], "delivered", "{id}: {}", t[0]);
        assert_eq!(t[0]["campaign"], "spring");
        let at = t[0]["at"].as_str().unwrap();
        assert!(
            at.ends_with('Z') && at.len() == 24,
            "RFC 3339 UTC with ms: {at}"
        );
    }

    sink.wait_count(N, Duration::from_secs(10));
    let dumps = sink.dumps();
    assert_eq!(dumps.len(), N, "the sink got every message once");
    let mut seen = HashSet::new();
    for raw in &dumps {
        for line in raw.split(|&b| b == b'\n') {
            assert!(line.len() <= 1000, "a line longer than 998 octets");
        }
        let msg = MessageParser::default()
            .parse(raw)
            .expect("parseable message");
        let id = msg.header_raw("X-Paloma-Id").unwrap().trim().to_string();
        let i: usize = id.trim_start_matches("job-").parse().unwrap();
        assert!(seen.insert(i), "duplicate {id}");
        let to = msg.to().unwrap().first().unwrap();
        assert_eq!(
            to.address().unwrap(),
            format!("user{i}@example{}.test", i % 7)
        );
        let from = msg.from().unwrap().first().unwrap();
        assert_eq!(from.address().unwrap(), "news@shop.test");
        assert_eq!(from.name().unwrap(), "Shop Test");
        let mid = msg.message_id().unwrap();
        assert!(
            mid.ends_with("@shop.test"),
            "Message-ID on the sender's domain: {mid}"
        );
        assert!(msg.date().is_some());
        let lu = msg.header_raw("List-Unsubscribe").unwrap().trim();
        assert!(
            lu.starts_with("<https://t.shop.test/u/") && lu.ends_with('>'),
            "{lu}"
        );
        assert_eq!(
            msg.header_raw("List-Unsubscribe-Post").unwrap().trim(),
            "List-Unsubscribe=One-Click"
        );
        assert!(msg
            .header_raw("Feedback-ID")
            .unwrap()
            .trim()
            .starts_with("spring:"));
        assert_eq!(msg.header_raw("X-List-Segment").unwrap().trim(), "vip");
        assert_eq!(msg.text_body_count(), 1, "{id}: a text part");
        assert_eq!(msg.html_body_count(), 1, "{id}: an html part");
        let html = msg.body_html(0).unwrap();
        let text = msg.body_text(0).unwrap();
        let subject = msg.subject().unwrap();
        if i.is_multiple_of(10) {
            assert_eq!(subject, format!("Your receipt for order A-{i}"));
            assert!(html.contains("Café &lt;grande&gt;"), "escaped in HTML");
            assert!(
                text.contains("1 x Café <grande>"),
                "verbatim in text: {text}"
            );
        } else {
            assert_eq!(
                subject,
                format!("Zoë<b>{i}</b>, the spring collection is here ☀️"),
                "UTF-8 subject decoded"
            );
            assert!(
                html.contains(&format!("Hello Zoë&lt;b&gt;{i}&lt;/b&gt;,")),
                "data escaped in HTML"
            );
            assert!(html.contains("Tom &amp; Jerry &quot;mug&quot;"));
            assert!(
                !html.contains("https://shop.test/p/hat\""),
                "links are tracked"
            );
            assert!(html.contains("https://t.shop.test/c/"));
            assert!(html.contains("https://t.shop.test/o/"), "open pixel");
            assert!(
                html.contains("mailto:help@shop.example"),
                "mailto untouched"
            );
            assert!(!html.contains("data-paloma"), "paloma attributes removed");
            assert!(
                text.contains(&format!("Hello Zoë<b>{i}</b>,")),
                "text derived from HTML: {text}"
            );
            assert!(
                text.contains("https://shop.test/p/hat"),
                "plain URLs in the text part"
            );
            let expected_name = if i.is_multiple_of(2) {
                format!("Zoë Ünal {i}")
            } else {
                format!("Plain Name {i}")
            };
            assert_eq!(to.name().unwrap(), expected_name, "encoded display name");
        }
        let raw_head = String::from_utf8_lossy(
            &raw[..raw
                .windows(4)
                .position(|w| w == b"\r\n\r\n" || &w[..2] == b"\n\n")
                .unwrap_or(raw.len())],
        );
        assert!(!raw_head.contains("Zoë"), "no raw 8-bit in headers");
    }
    assert_eq!(seen.len(), N);

    // Stats per campaign.
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
    assert_eq!(c["campaign"], "spring");
    assert_eq!(c["delivered"], N as i64);
    assert_eq!(c["queued"], 0);
    assert_eq!(
        v["stream_waiting"], 0,
        "acknowledged entries are removed from the stream"
    );

    // Replaying the same ids sends nothing and adds no event.
    let before = events(&mut conn, &setup.prefix).len();
    enqueue_raw(&mut conn, &setup.prefix, &jobs[..20]);
    // A new job after them: once it has ended and the stream is empty, the replayed entries
    // have been read and dealt with.
    let sentinel = job(
        "replay-sentinel",
        "sentinel",
        "receipt",
        "sentinel@example0.test",
        json!({"name": "S", "order_id": 0}),
    );
    enqueue_raw(&mut conn, &setup.prefix, &[sentinel]);
    wait_terminal(
        &mut conn,
        &setup.prefix,
        N + 1,
        Duration::from_secs(30),
        Some(&daemon),
    );
    wait_until(
        "the replayed entries handled",
        Duration::from_secs(30),
        || sends_drained(&mut conn, &setup.prefix),
    );
    let evs = events(&mut conn, &setup.prefix);
    assert_eq!(
        evs.iter().filter(|e| e["id"] != "replay-sentinel").count(),
        before,
        "no new events for duplicate ids"
    );
    assert_eq!(
        sink.wait_count(N + 1, Duration::from_secs(10)),
        N + 1,
        "no message sent twice"
    );
    let len: i64 = redis::cmd("XLEN")
        .arg(format!("{}sends", setup.prefix))
        .query(&mut conn)
        .unwrap();
    assert_eq!(len, 0, "duplicates acknowledged");
}

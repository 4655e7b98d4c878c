//! Workflows end to end: real mail through smtp-sink, real clicks, opens and unsubscribes
//! against the tracking server, and real HTTP receivers for webhooks. A click on a named link
//! sends one follow-up however often it is clicked; a not_opened timer reminds only the
//! recipient who stayed silent; webhooks arrive signed, and a receiver that is down at first
//! gets its event once it comes up, while one that never does ends in the dead letters.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use hmac::{Hmac, Mac};
use mail_parser::MessageParser;
use serde_json::{json, Value};
use sha2::Sha256;

const MAIL_UA: &str =
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)";
const PROXY_UA: &str =
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)";
const HOOK_SECRET: &str = "hook-secret-0123456789abcdef";

/// One HTTP/1.1 request on its own connection; returns (status, Location).
fn request(
    port: u16,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Option<String>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req =
        format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let head = String::from_utf8_lossy(&raw).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let location = head
        .split("\r\n")
        .find_map(|l| {
            l.strip_prefix("location: ")
                .or_else(|| l.strip_prefix("Location: "))
        })
        .map(str::to_string);
    (status, location)
}

fn get(port: u16, target: &str, ua: &str) -> u16 {
    request(port, "GET", target, &[("User-Agent", ua)], b"").0
}

fn one_click(port: u16, target: &str) -> u16 {
    request(
        port,
        "POST",
        target,
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("User-Agent", "Mozilla/5.0 (compatible; Google-Unsubscribe)"),
        ],
        b"List-Unsubscribe=One-Click",
    )
    .0
}

/// One captured message.
struct Mail {
    to: String,
    subject: String,
    html: String,
    text: String,
    clicks: Vec<String>,
    pixel: String,
    unsubscribe: String,
}

fn paths_after(html: &str, prefix: &str) -> Vec<String> {
    html.match_indices(prefix)
        .map(|(i, _)| {
            let rest = &html[i + prefix.len()..];
            rest[..rest.find('"').unwrap()].to_string()
        })
        .collect()
}

/// Captured messages by job id (X-Paloma-Id).
fn captured(sink: &Sink, base: &str) -> HashMap<String, Mail> {
    let mut out = HashMap::new();
    for raw in sink.dumps() {
        let msg = MessageParser::default().parse(&raw).expect("parsable mail");
        let id = msg.header_raw("X-Paloma-Id").unwrap().trim().to_string();
        let html = msg.body_html(0).unwrap().into_owned();
        let text = msg.body_text(0).map(|t| t.into_owned()).unwrap_or_default();
        let lu = msg.header_raw("List-Unsubscribe").unwrap();
        let lu = lu.trim().trim_start_matches('<').trim_end_matches('>');
        let mail = Mail {
            to: msg
                .header_raw("To")
                .unwrap_or_default()
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string(),
            subject: msg.subject().unwrap_or_default().to_string(),
            clicks: paths_after(&html, &format!("href=\"{base}"))
                .into_iter()
                .filter(|p| p.starts_with("/c/"))
                .collect(),
            pixel: paths_after(&html, &format!("src=\"{base}"))
                .into_iter()
                .find(|p| p.starts_with("/o/"))
                .expect("an open pixel"),
            unsubscribe: lu.strip_prefix(base).expect("unsubscribe link").to_string(),
            html,
            text,
        };
        out.insert(id, mail);
    }
    out
}

/// A config with the tracking server on a free port and `extra` appended.
fn setup(redis: &Redis, sink: &Sink, extra: &str) -> (Setup, u16, String) {
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let setup = Setup::new(&redis.url(), sink.port, "", "", extra);
    let text = std::fs::read_to_string(&setup.config).unwrap().replace(
        "base_url = \"https://t.shop.test\"",
        &format!("base_url = \"{base}\"\nlisten = \"127.0.0.1:{port}\""),
    );
    std::fs::write(&setup.config, text).unwrap();
    (setup, port, base)
}

fn data(name: &str) -> Value {
    json!({
        "first_name": name,
        "products": [{"name": "Linen shirt", "price": "49", "url": "https://shop.example/linen"}],
    })
}

fn metrics(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn terminal(conn: &mut redis::Connection, prefix: &str) -> Vec<Value> {
    events(conn, prefix)
        .into_iter()
        .filter(is_terminal)
        .collect()
}

fn millis(at: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(at.as_str().unwrap())
        .unwrap()
        .timestamp_millis()
}

/// Appends raw events to `{prefix}events`, as another daemon's tracking server would.
fn enqueue_events(conn: &mut redis::Connection, prefix: &str, evs: &[String]) {
    for e in evs {
        redis::cmd("XADD")
            .arg(format!("{prefix}events"))
            .arg("*")
            .arg("event")
            .arg(e)
            .query::<String>(conn)
            .unwrap();
    }
}

#[test]
fn a_click_on_the_named_link_sends_one_follow_up_with_the_original_data() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let mport = free_port();
    let (setup, port, base) = setup(
        &redis,
        &sink,
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
            data("Ann"),
        ),
        job(
            "bob",
            "spring",
            "newsletter",
            "bob@example.test",
            data("Bob"),
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
    let (_, location) = request(port, "HEAD", pricing, &[("User-Agent", MAIL_UA)], b"");
    assert_eq!(location.as_deref(), Some("https://shop.example/pricing"));
    for _ in 0..3 {
        assert_eq!(get(port, pricing, MAIL_UA), 302);
    }
    // Bob clicks another link (home) only.
    assert_eq!(get(port, &mails["bob"].clicks[0], MAIL_UA), 302);
    // One daemon records the repeats as one click (tracking.repeat_window); the same click
    // can still reach the stream again, from other daemons behind a load balancer or after
    // the window: two more copies of it, which the rule must not act on again.
    let clicked = loop {
        let evs = events(&mut conn, &setup.prefix);
        if let Some(e) = evs
            .iter()
            .find(|e| e["type"] == "clicked" && e["id"] == "ann")
        {
            assert_eq!(
                evs.iter()
                    .filter(|e| e["type"] == "clicked" && e["id"] == "ann")
                    .count(),
                1
            );
            break e.to_string();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    enqueue_events(&mut conn, &setup.prefix, &[clicked.clone(), clicked]);

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

    // However long we wait: three clicks, one follow-up; Bob's click, none.
    std::thread::sleep(Duration::from_millis(1500));
    let ends = terminal(&mut conn, &setup.prefix);
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
    let m = metrics(mport);
    for line in [
        r#"paloma_workflow_actions_total{action="send",result="enqueued",rule="pricing-followup"} 1"#,
        r#"paloma_workflow_actions_total{action="send",result="duplicate",rule="pricing-followup"} 2"#,
    ] {
        assert!(m.contains(line), "{line} not in:\n{m}");
    }

    daemon.signal("TERM");
    let st = daemon.wait(Duration::from_secs(20)).expect("daemon exits");
    assert!(st.success(), "{}", daemon.log_text());
    assert!(!daemon.log_text().contains("panicked"));
}

#[test]
fn not_opened_reminds_only_the_silent_recipient_after_the_window() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let mport = free_port();
    let (setup, port, base) = setup(
        &redis,
        &sink,
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
                data(p),
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
        .map(|e| (e["id"].as_str().unwrap().to_string(), millis(&e["at"])))
        .collect();
    assert_eq!(delivered_at.len(), 4, "{evs:?}");

    let mails = captured(&sink, &base);
    // Well inside the window: a person opens, another unsubscribes, an image proxy fetches
    // the silent one's pixel (a machine's open cancels nothing), and an operator blocks the
    // fourth address (suppressed: no follow-up, for any reason).
    assert_eq!(get(port, &mails["opener"].pixel, MAIL_UA), 200);
    assert_eq!(one_click(port, &mails["leaver"].unsubscribe), 200);
    assert_eq!(get(port, &mails["silent"].pixel, PROXY_UA), 200);
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
    let waited = millis(&reminder["at"]) - delivered_at["silent"];
    assert!(
        (3000..10_000).contains(&waited),
        "reminder {waited} ms after delivery"
    );

    std::thread::sleep(Duration::from_millis(2000));
    let ends = terminal(&mut conn, &setup.prefix);
    assert_eq!(ends.len(), 5, "exactly one reminder: {ends:?}");
    assert_eq!(sink.count(), 5);
    let mails = captured(&sink, &base);
    assert_eq!(mails["wf:reminder:silent"].to, "silent@example.test");
    assert!(mails["wf:reminder:silent"].html.contains("Hello silent,"));
    let timers: i64 = redis::cmd("ZCARD")
        .arg(format!("{}timers", setup.prefix))
        .query(&mut conn)
        .unwrap();
    assert_eq!(timers, 0, "fired and cancelled timers are gone");

    let m = metrics(mport);
    for line in [
        r#"paloma_workflow_actions_total{action="timer",result="armed",rule="reminder"} 4"#,
        r#"paloma_workflow_actions_total{action="timer",result="cancelled",rule="reminder"} 2"#,
        r#"paloma_workflow_actions_total{action="timer",result="fired",rule="reminder"} 2"#,
        r#"paloma_workflow_actions_total{action="send",result="enqueued",rule="reminder"} 1"#,
        r#"paloma_workflow_actions_total{action="send",result="suppressed",rule="reminder"} 1"#,
    ] {
        assert!(m.contains(line), "{line} not in:\n{m}");
    }
    assert!(!daemon.log_text().contains("panicked"));
    daemon.signal("TERM");
    assert!(daemon
        .wait(Duration::from_secs(20))
        .expect("exits")
        .success());
}

/// What a webhook receiver got: headers (lower-case names) and body.
type Got = Arc<Mutex<Vec<(HashMap<String, String>, String)>>>;

/// An HTTP receiver on `port` that answers `fail_first` requests with 503, then 200, and
/// keeps every request it read.
fn receiver(port: u16, fail_first: usize) -> Got {
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let got: Got = Arc::default();
    let out = got.clone();
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(mut s) = conn else { continue };
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut raw = Vec::new();
            let mut buf = [0u8; 4096];
            let (head, body) = loop {
                let k = s.read(&mut buf).unwrap_or(0);
                if k == 0 {
                    break (String::new(), String::new());
                }
                raw.extend_from_slice(&buf[..k]);
                let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
                    continue;
                };
                let head = String::from_utf8_lossy(&raw[..end]).into_owned();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if raw.len() >= end + 4 + len {
                    break (
                        head,
                        String::from_utf8_lossy(&raw[end + 4..end + 4 + len]).into_owned(),
                    );
                }
            };
            let mut headers: HashMap<String, String> = head
                .lines()
                .skip(1)
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            headers.insert(
                ":line".into(),
                head.lines().next().unwrap_or("").to_string(),
            );
            let answer: &[u8] = if n < fail_first {
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            };
            let _ = s.write_all(answer);
            out.lock().unwrap().push((headers, body));
        }
    });
    got
}

/// The receiver's check: HMAC-SHA256 over "{timestamp}.{body}", fresh timestamp.
fn assert_signed(headers: &HashMap<String, String>, body: &str) {
    let ts = &headers["x-paloma-timestamp"];
    let age = chrono::Utc::now().timestamp() - ts.parse::<i64>().unwrap();
    assert!((-5..60).contains(&age), "timestamp {ts} is {age} s old");
    let mut mac = Hmac::<Sha256>::new_from_slice(HOOK_SECRET.as_bytes()).unwrap();
    mac.update(format!("{ts}.{body}").as_bytes());
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(headers["x-paloma-signature"], format!("sha256={want}"));
    assert_eq!(headers["content-type"], "application/json");
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn webhooks_are_signed_retried_until_the_receiver_is_up_and_dead_lettered_at_last() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let (crm, late, never) = (free_port(), free_port(), free_port());
    let (setup, _port, _base) = setup(
        &redis,
        &sink,
        &format!(
            r#"
[webhooks]
secret = "{HOOK_SECRET}"
retry_intervals = ["300ms", "600ms"]
max_attempts = 8
timeout = "2s"
[[workflows]]
name = "crm"
campaign = "hooks"
on = "delivered"
webhook = "http://127.0.0.1:{crm}/paloma?src=test"
[[workflows]]
name = "late"
campaign = "late"
on = "delivered"
webhook = "http://127.0.0.1:{late}/late"
[[workflows]]
name = "never"
campaign = "never"
on = "delivered"
webhook = "http://127.0.0.1:{never}/x"
"#
        ),
    );
    // The CRM answers 503 once, then 200: a non-2xx answer is retried like a refusal.
    let crm_got = receiver(crm, 1);
    let mut conn = redis.conn();
    let jobs = vec![
        job(
            "h1",
            "hooks",
            "receipt",
            "h1@example.test",
            json!({"name": "H"}),
        ),
        job(
            "h2",
            "hooks",
            "receipt",
            "h2@example.test",
            json!({"name": "H"}),
        ),
        job(
            "l1",
            "late",
            "receipt",
            "l1@example.test",
            json!({"name": "L"}),
        ),
        job(
            "n1",
            "never",
            "receipt",
            "n1@example.test",
            json!({"name": "N"}),
        ),
        job(
            "o1",
            "other",
            "receipt",
            "o1@example.test",
            json!({"name": "O"}),
        ),
    ];
    enqueue_raw(&mut conn, &setup.prefix, &jobs);
    let mut daemon = Daemon::spawn(&setup.config);
    wait_terminal(
        &mut conn,
        &setup.prefix,
        5,
        Duration::from_secs(60),
        Some(&daemon),
    );
    // Garbage in the events stream (another writer's bug) is skipped and acknowledged.
    let events_key = format!("{}events", setup.prefix);
    for (field, value) in [
        ("event", "not json"),
        ("event", r#"{"type":"delivered"}"#),
        ("other", "x"),
    ] {
        let _: String = redis::cmd("XADD")
            .arg(&events_key)
            .arg("*")
            .arg(field)
            .arg(value)
            .query(&mut conn)
            .unwrap();
    }

    let got = wait_for("two signed CRM webhooks", Duration::from_secs(15), || {
        let g = crm_got.lock().unwrap();
        (g.len() >= 3).then(|| g.clone())
    });
    let mut ids = Vec::new();
    for (headers, body) in &got {
        assert_eq!(headers[":line"], "POST /paloma?src=test HTTP/1.1");
        assert_signed(headers, body);
        let ev: Value = serde_json::from_str(body).unwrap();
        assert_eq!(ev["type"], "delivered");
        assert_eq!(ev["campaign"], "hooks");
        assert_eq!(ev["workflow"], "crm");
        assert_eq!(
            ev["to"],
            format!("{}@example.test", ev["id"].as_str().unwrap())
        );
        ids.push((
            ev["id"].as_str().unwrap().to_string(),
            headers["x-paloma-attempt"].clone(),
        ));
    }
    ids.sort();
    let delivered: Vec<&str> = ids.iter().map(|(id, _)| id.as_str()).collect();
    assert!(
        delivered == ["h1", "h1", "h2"] || delivered == ["h1", "h2", "h2"],
        "one refused then retried, one straight through: {ids:?}"
    );
    assert!(ids.iter().any(|(_, attempt)| attempt == "2"), "{ids:?}");

    // The late receiver comes up after a few failed tries and still gets its event.
    std::thread::sleep(Duration::from_millis(1200));
    let late_got = receiver(late, 0);
    let (headers, body) = wait_for("the late webhook", Duration::from_secs(10), || {
        late_got.lock().unwrap().first().cloned()
    });
    assert_signed(&headers, &body);
    let ev: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (ev["id"].as_str(), ev["workflow"].as_str()),
        (Some("l1"), Some("late"))
    );
    let attempt: u32 = headers["x-paloma-attempt"].parse().unwrap();
    assert!(
        attempt >= 2,
        "the first tries found nobody: attempt {attempt}"
    );

    // Nobody ever listens on the third: after max_attempts it is a dead letter.
    let dead = format!("{}dead", setup.prefix);
    let entry = wait_for("the dead-lettered webhook", Duration::from_secs(15), || {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(&dead)
            .arg("-")
            .arg("+")
            .query(&mut conn)
            .unwrap();
        reply.ids.into_iter().next()
    });
    let field = |k: &str| match entry.map.get(k) {
        Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
        other => panic!("{k}: {other:?}"),
    };
    let body: Value = serde_json::from_str(&field("webhook")).unwrap();
    assert_eq!(
        (body["id"].as_str(), body["workflow"].as_str()),
        (Some("n1"), Some("never"))
    );
    assert_eq!(field("url"), format!("http://127.0.0.1:{never}/x"));
    assert!(field("error").contains("connect"), "{}", field("error"));
    let waiting: i64 = redis::cmd("ZCARD")
        .arg(format!("{}webhooks", setup.prefix))
        .query(&mut conn)
        .unwrap();
    assert_eq!(waiting, 0);

    // Nothing for the campaign without a rule, and nothing twice for the others.
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(crm_got.lock().unwrap().len(), 3);
    assert_eq!(late_got.lock().unwrap().len(), 1);
    let pending: Vec<redis::Value> = redis::cmd("XPENDING")
        .arg(&events_key)
        .arg("paloma-workflows")
        .query(&mut conn)
        .unwrap();
    assert_eq!(pending.first(), Some(&redis::Value::Int(0)), "{pending:?}");
    let log = daemon.log_text();
    assert!(
        log.contains("malformed event") && log.contains("without a JSON"),
        "{log}"
    );
    assert!(!log.contains("panicked"));
    daemon.signal("TERM");
    assert!(daemon
        .wait(Duration::from_secs(20))
        .expect("exits")
        .success());
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
            data("Dee"),
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
    wait_for("the armed timer", Duration::from_secs(10), || {
        let n: i64 = redis::cmd("ZCARD").arg(&timers).query(&mut conn).unwrap();
        (n == 1).then_some(())
    });
    // Killed outright, and down past the due time: nothing is sent meanwhile…
    daemon.kill9();
    std::thread::sleep(Duration::from_secs(4));
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
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(terminal(&mut conn, &setup.prefix).len(), 2);
    // The follow-up is of the same campaign, but a rule never arms for its own follow-ups.
    let n: i64 = redis::cmd("ZCARD").arg(&timers).query(&mut conn).unwrap();
    assert_eq!(n, 0);
    daemon.signal("TERM");
    assert!(daemon
        .wait(Duration::from_secs(20))
        .expect("exits")
        .success());
}

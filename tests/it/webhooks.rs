//! Webhooks from workflows, end to end against real HTTP receivers: they arrive signed
//! (HMAC over timestamp and body), a non-2xx answer is retried, a receiver that is down at
//! first gets its event once it comes up, one that never does ends in the dead letters, and
//! garbage in the events stream is skipped.

use crate::common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::track::*;
use common::*;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

pub(crate) const HOOK_SECRET: &str = "hook-secret-0123456789abcdef";

/// What a webhook receiver got: headers (lower-case names) and body.
pub(crate) type Got = Arc<Mutex<Vec<(HashMap<String, String>, String)>>>;

/// An HTTP receiver on `port` that answers `fail_first` requests with 503, then 200, and
/// keeps every request it read.
pub(crate) fn receiver(port: u16, fail_first: usize) -> Got {
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

#[test]
fn webhooks_are_signed_retried_until_the_receiver_is_up_and_dead_lettered_at_last() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let (crm, late, never) = (free_port(), free_port(), free_port());
    let (setup, _port, _base) = tracking_setup(
        &redis.url(),
        sink.port,
        "",
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

    // The late receiver comes up after a failed try (the webhook waits for its next one,
    // `attempt` counting the tries so far) and still gets its event.
    let waiting = format!("{}webhooks", setup.prefix);
    wait_until(
        "a failed try of the late webhook",
        Duration::from_secs(15),
        || {
            let members: Vec<String> = redis::cmd("ZRANGE")
                .arg(&waiting)
                .arg(0)
                .arg(-1)
                .query(&mut conn)
                .unwrap();
            members.iter().any(|m| {
                let w: Value = serde_json::from_str(m).unwrap();
                w["workflow"] == "late" && w["attempt"].as_u64() >= Some(1)
            })
        },
    );
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
    let left: i64 = redis::cmd("ZCARD").arg(&waiting).query(&mut conn).unwrap();
    assert_eq!(left, 0);

    // Nothing for the campaign without a rule, and nothing twice for the others: once the
    // rules have taken in every event and no webhook waits or is leased, none can come.
    wait_until(
        "the rules done with every event",
        Duration::from_secs(20),
        || {
            let left: i64 = redis::cmd("ZCARD").arg(&waiting).query(&mut conn).unwrap();
            left == 0 && events_consumed(&mut conn, &setup.prefix, WORKFLOWS)
        },
    );
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
    daemon.term();
}

/// Issue 21, point 5: a workflow outage at volume must not lose the events the engine has
/// not read. While the only daemon running has no workflows (the engine's daemons are
/// down), `[events] max_len` is passed rather than trimming what the workflow group has not
/// read, and a gauge says so; once an engine is back, every event gets its webhook and the
/// stream is trimmed to its bound again.
#[test]
fn events_the_workflow_engine_has_not_read_are_kept_past_max_len() {
    // Small stream nodes, so that the old `XADD … MAXLEN ~ 20` would really trim.
    let redis = Redis::start_with(&["--stream-node-max-entries", "10"]);
    let sink = Sink::start(&[]);
    let (crm, mport) = (free_port(), free_port());
    let base = format!(
        r#"
[metrics]
listen = "127.0.0.1:{mport}"
[events]
max_len = 20
max_age = "1h"
"#
    );
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        "",
        &format!(
            r#"{base}
[webhooks]
secret = "{HOOK_SECRET}"
[[workflows]]
name = "crm"
campaign = "bulk"
on = "delivered"
webhook = "http://127.0.0.1:{crm}/hook"
"#
        ),
    );
    let mut conn = redis.conn();
    let events_key = format!("{}events", setup.prefix);
    // A daemon with workflows creates the engine's group, then the fleet's workflow
    // daemons are gone; one without workflows delivers 200 jobs.
    let plain = workflow_engine_gone(&setup, &mut conn);
    let n = 200;
    enqueue_raw(&mut conn, &setup.prefix, &jobs(n, "bulk", "example.test"));
    let plain_daemon = Daemon::spawn(&plain);
    let delivered = r#"paloma_messages_total{campaign="bulk",outcome="delivered"}"#;
    wait_until_daemon(
        "200 delivered",
        Duration::from_secs(60),
        &plain_daemon,
        || metric(mport, delivered) == n as f64,
    );
    // The retention round after the last write holds back at max_len + the unread ones.
    wait_until_daemon(
        "the retention held back by the workflow group",
        Duration::from_secs(20),
        &plain_daemon,
        || metric(mport, "paloma_events_held") >= (n - 20) as f64,
    );
    let len: usize = redis::cmd("XLEN")
        .arg(&events_key)
        .query(&mut conn)
        .unwrap();
    assert!(len >= n, "every unread event kept: {len}");
    assert!(
        metric(mport, r#"paloma_stream_lag{group="paloma-workflows"}"#) >= n as f64,
        "the workflow group's lag is exported"
    );
    assert!(plain_daemon
        .log_text()
        .contains("the workflow engine has not read it yet"));
    drop(plain_daemon);

    // The engine is back: every delivery gets its webhook, and then the stream its bound.
    let got = receiver(crm, 0);
    let engine = Daemon::spawn(&setup.config);
    let ids = wait_for_daemon("200 webhooks", Duration::from_secs(60), &engine, || {
        let ids: std::collections::BTreeSet<String> = got
            .lock()
            .unwrap()
            .iter()
            .map(|(_, body)| serde_json::from_str::<Value>(body).unwrap()["id"].to_string())
            .collect();
        (ids.len() >= n).then_some(ids)
    });
    assert_eq!(ids.len(), n);
    wait_until_daemon(
        "the stream back to max_len",
        Duration::from_secs(20),
        &engine,
        || {
            let len: usize = redis::cmd("XLEN")
                .arg(&events_key)
                .query(&mut conn)
                .unwrap();
            len <= 20 && metric(mport, "paloma_events_held") == 0.0
        },
    );
    assert_eq!(
        metric(mport, r#"paloma_stream_lag{group="paloma-workflows"}"#),
        0.0
    );
    assert_eq!(metric(mport, "paloma_events_lost_total"), 0.0);
}

/// The last resort, `[events] hard_max_len`, does drop events the workflow engine has not
/// read, but never silently: they are counted in `paloma_events_lost_total` and logged.
#[test]
fn unread_events_dropped_by_the_hard_bound_are_counted() {
    let redis = Redis::start_with(&["--stream-node-max-entries", "10"]);
    let sink = Sink::start(&[]);
    let mport = free_port();
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        "",
        &format!(
            r#"
[metrics]
listen = "127.0.0.1:{mport}"
[events]
max_len = 20
hard_max_len = 40
[webhooks]
secret = "{HOOK_SECRET}"
[[workflows]]
name = "crm"
campaign = "bulk"
on = "delivered"
webhook = "http://127.0.0.1:{}/hook"
"#,
            free_port()
        ),
    );
    let mut conn = redis.conn();
    let events_key = format!("{}events", setup.prefix);
    let plain = workflow_engine_gone(&setup, &mut conn);
    let n = 200;
    enqueue_raw(&mut conn, &setup.prefix, &jobs(n, "bulk", "example.test"));
    let daemon = Daemon::spawn(&plain);
    // Every event is either still in the stream or counted lost.
    let delivered = r#"paloma_messages_total{campaign="bulk",outcome="delivered"}"#;
    let lost = wait_for_daemon(
        "lost events counted",
        Duration::from_secs(60),
        &daemon,
        || {
            let lost = metric(mport, "paloma_events_lost_total");
            let len: usize = redis::cmd("XLEN")
                .arg(&events_key)
                .query(&mut conn)
                .unwrap();
            (metric(mport, delivered) == n as f64 && lost as usize + len == n).then_some(lost)
        },
    );
    assert!(
        lost >= 150.0,
        "the hard bound kept at most about 40: {lost} lost"
    );
    assert!(daemon.log_text().contains("events.hard_max_len"));
}

/// Runs a daemon of `setup`'s config (with workflows) until the engine's consumer group
/// exists, stops it with SIGTERM (a drain, exit 0), and returns a config without the
/// `[webhooks]` section and what follows (no workflows) for the daemons that go on.
fn workflow_engine_gone(setup: &Setup, conn: &mut redis::Connection) -> std::path::PathBuf {
    let with_workflows = std::fs::read_to_string(&setup.config).unwrap();
    let plain = setup.path("plain.toml");
    std::fs::write(
        &plain,
        &with_workflows[..with_workflows.find("[webhooks]").unwrap()],
    )
    .unwrap();
    let events_key = format!("{}events", setup.prefix);
    let mut engine = Daemon::spawn(&setup.config);
    wait_until_daemon(
        "the workflow group",
        Duration::from_secs(30),
        &engine,
        || {
            let g: redis::RedisResult<Vec<HashMap<String, redis::Value>>> = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(&events_key)
                .query(conn);
            g.is_ok_and(|g| !g.is_empty())
        },
    );
    // Its SIGTERM handler is in place once it says it runs (a signal before that ends it
    // by default, not by a drain).
    wait_until_daemon(
        "the engine running",
        Duration::from_secs(30),
        &engine,
        || engine.log_text().contains("paloma running"),
    );
    engine.signal("TERM");
    assert!(engine
        .wait(Duration::from_secs(30))
        .is_some_and(|s| s.success()));
    plain
}

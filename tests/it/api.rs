//! The HTTP API against a real daemon, Redis and smtp-sink: tokens (missing, wrong, right),
//! malformed and oversize bodies (with and without Content-Length), per-job refusals and
//! all_or_nothing, a 10,000-job batch delivered exactly once, campaign pause / resume /
//! cancel, recipients and suppressions, JSON errors for unknown routes and methods, the
//! OpenAPI document, and the API beside /metrics on one listener.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::track::{api_call, json_array, request, stat, Answer};
use common::*;

const TOKEN: &str = "api-token-5f0c2e9a7d41b3867c";

/// A JSON error answer: the status, and an `error` sentence.
fn refused(a: &Answer, status: u16) -> String {
    assert_eq!(a.status, status, "{}", a.raw);
    let e = a.body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("not a JSON error: {}", a.raw));
    assert!(!e.is_empty());
    assert!(
        !a.raw.contains(TOKEN),
        "the token is in an answer: {}",
        a.raw
    );
    e.to_string()
}

#[test]
fn the_api_guards_its_door_and_takes_a_10000_job_batch() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let port = free_port();
    let metrics = free_port();
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        "",
        &format!(
            "[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n[api]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"{TOKEN}\"\nmax_body_bytes = 3000000\n"
        ),
    );
    let p = setup.prefix.clone();
    let daemon = Daemon::spawn(&setup.config);
    wait_port("127.0.0.1", port, Duration::from_secs(30));
    let mut conn = redis.conn();

    // The document needs no token and describes every route.
    let doc = api_call(port, "GET", "/api/v1/openapi.json", None, b"");
    assert_eq!(doc.status, 200, "{}", doc.raw);
    assert!(doc.body["openapi"].as_str().unwrap().starts_with("3."));
    assert!(doc.body["paths"]["/api/v1/sends"]["post"].is_object());
    assert!(doc.body["paths"]["/api/v1/suppressions/{address}"]["put"].is_object());

    // The door: no token, a wrong one, another scheme.
    let one = json_array(&jobs(1, "door", "door.test"));
    let e = refused(&api_call(port, "POST", "/api/v1/sends", None, &one), 401);
    assert!(e.contains("Bearer"), "{e}");
    refused(
        &api_call(
            port,
            "POST",
            "/api/v1/sends",
            Some("api-token-5f0c2e9a7d41b3867d"),
            &one,
        ),
        401,
    );
    refused(
        &api_call(port, "POST", "/api/v1/sends", Some(""), &one),
        401,
    );
    let basic = request(
        port,
        "GET",
        "/api/v1/campaigns",
        &[("Authorization", &format!("Basic {TOKEN}"))],
        b"",
    );
    assert_eq!(basic.status, 401);
    assert!(basic
        .header("www-authenticate")
        .unwrap()
        .starts_with("Bearer"));
    refused(
        &api_call(port, "GET", "/api/v1/campaigns", Some("x"), b""),
        401,
    );
    assert_eq!(
        stream_len(&mut conn, &format!("{p}sends")),
        0,
        "nothing written without the token"
    );

    // Bad bodies.
    let e = refused(
        &api_call(
            port,
            "POST",
            "/api/v1/sends",
            Some(TOKEN),
            b"[{\"id\": \"a\",",
        ),
        400,
    );
    assert!(e.contains("malformed JSON"), "{e}");
    refused(
        &api_call(port, "POST", "/api/v1/sends", Some(TOKEN), b"hello"),
        400,
    );
    refused(
        &api_call(port, "POST", "/api/v1/sends", Some(TOKEN), b"[]"),
        400,
    );
    refused(
        &api_call(port, "POST", "/api/v1/sends", Some(TOKEN), b""),
        400,
    );
    // Over the limit by its Content-Length: refused before any of the body is read (the
    // client sends only the head, so the refusal is read back whole).
    let head = |s: &mut TcpStream| {
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST /api/v1/sends HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 3100000\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let answer = head(&mut s);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("max_body_bytes"), "{answer}");
    // Without Content-Length: the limit holds while the body streams in. The client stops
    // once it has sent more than the limit, and the refusal comes then.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST /api/v1/sends HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let chunk = vec![b' '; 65536];
    for _ in 0..46 {
        write!(s, "{:x}\r\n", chunk.len()).unwrap();
        s.write_all(&chunk).unwrap();
        s.write_all(b"\r\n").unwrap();
    }
    let answer = head(&mut s);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // Per-job refusals, with the reasons the intake would give.
    let mut mixed = jobs(3, "mixed", "mixed.test");
    mixed.push(r#"{"id":"mixed-x","campaign":"mixed","template":"receipt"}"#.into());
    mixed.push(mixed[0].clone());
    mixed.push(r#"{"id":"mixed-y","campaign":"mixed","template":"receipt","to":"a@b.test","headers":{"X-A":"1\r\nBcc: x@y.test"}}"#.into());
    let all = api_call(
        port,
        "POST",
        "/api/v1/sends?all_or_nothing=true",
        Some(TOKEN),
        &json_array(&mixed),
    );
    assert_eq!(all.status, 422, "{}", all.raw);
    assert_eq!(all.body["accepted"], 0);
    assert_eq!(
        stream_len(&mut conn, &format!("{p}sends")),
        0,
        "all_or_nothing wrote nothing"
    );
    let a = api_call(
        port,
        "POST",
        "/api/v1/sends",
        Some(TOKEN),
        &json_array(&mixed),
    );
    assert_eq!(a.status, 200, "{}", a.raw);
    assert_eq!(
        (a.body["accepted"].as_u64(), a.body["refused"].as_u64()),
        (Some(3), Some(3))
    );
    let r = &a.body["results"];
    assert_eq!(r[0]["id"], "mixed-0");
    assert!(r[0]["entry"].as_str().unwrap().contains('-'));
    assert_eq!(r[3]["error"], "missing field `to`");
    assert!(r[4]["error"].as_str().unwrap().contains("duplicate id"));
    assert!(
        r[5]["error"].as_str().unwrap().contains("header injection"),
        "{}",
        r[5]
    );
    // JSON lines go in too.
    let lines = jobs(2, "lines", "lines.test").join("\n");
    let a = api_call(port, "POST", "/api/v1/sends", Some(TOKEN), lines.as_bytes());
    assert_eq!(a.body["accepted"], 2, "{}", a.raw);

    // 10,000 jobs in one request, each delivered exactly once.
    let bulk = jobs(10_000, "bulk", "bulk.test");
    let a = api_call(
        port,
        "POST",
        "/api/v1/sends",
        Some(TOKEN),
        &json_array(&bulk),
    );
    assert_eq!(a.status, 200, "{}", &a.raw[..a.raw.len().min(300)]);
    assert_eq!(a.body["accepted"], 10_000);
    wait_until_daemon(
        "10,000 bulk deliveries",
        Duration::from_secs(240),
        &daemon,
        || stat(&mut conn, &p, "bulk", "delivered") >= 10_000,
    );
    assert_eq!(stat(&mut conn, &p, "bulk", "delivered"), 10_000);
    let evs = events(&mut conn, &p);
    let by_id = terminal_by_id(&evs);
    for i in 0..10_000 {
        let t = &by_id[&format!("bulk-{i}")];
        assert_eq!(t.len(), 1, "bulk-{i}: {t:?}");
        assert_eq!(t[0]["type"], "delivered");
    }
    // And at the sink: each bulk job's message exactly once.
    let at_sink: Vec<String> = sink
        .ids()
        .into_iter()
        .filter(|id| id.starts_with("bulk-"))
        .collect();
    let unique: std::collections::HashSet<&String> = at_sink.iter().collect();
    assert_eq!((at_sink.len(), unique.len()), (10_000, 10_000));

    // Campaign figures, as `paloma stats --json` shows them, with states.
    let l = api_call(port, "GET", "/api/v1/campaigns", Some(TOKEN), b"");
    assert_eq!(l.status, 200, "{}", l.raw);
    let row = l.body["campaigns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["campaign"] == "bulk")
        .unwrap()
        .clone();
    assert_eq!(
        (row["delivered"].as_i64(), row["state"].as_str()),
        (Some(10_000), Some("active"))
    );
    let one = api_call(port, "GET", "/api/v1/campaigns/mixed", Some(TOKEN), b"");
    assert_eq!(one.body["accepted"], 3, "{}", one.raw);
    refused(
        &api_call(port, "GET", "/api/v1/campaigns/nobody", Some(TOKEN), b""),
        404,
    );
    refused(
        &api_call(
            port,
            "GET",
            "/api/v1/campaigns/bad%20name",
            Some(TOKEN),
            b"",
        ),
        422,
    );

    // Pause: new jobs wait; resume: they go out. Cancel: they end suppressed/cancelled.
    let a = api_call(
        port,
        "POST",
        "/api/v1/campaigns/later/pause",
        Some(TOKEN),
        b"",
    );
    assert_eq!(
        (a.status, a.body["state"].as_str()),
        (200, Some("paused")),
        "{}",
        a.raw
    );
    api_call(
        port,
        "POST",
        "/api/v1/campaigns/gone/pause",
        Some(TOKEN),
        b"",
    );
    // The campaign's figure shows it at once; the daemon knows at its next refresh.
    let g = api_call(port, "GET", "/api/v1/campaigns/later", Some(TOKEN), b"");
    assert_eq!(g.body["state"], "paused", "{}", g.raw);
    wait_until_daemon(
        "the daemon sees both paused",
        Duration::from_secs(10),
        &daemon,
        || metric(metrics, "paloma_campaigns_held{state=\"paused\"}") == 2.0,
    );
    api_call(
        port,
        "POST",
        "/api/v1/sends",
        Some(TOKEN),
        &json_array(&jobs(20, "later", "later.test")),
    );
    api_call(
        port,
        "POST",
        "/api/v1/sends",
        Some(TOKEN),
        &json_array(&jobs(20, "gone", "gone.test")),
    );
    wait_until_daemon("40 parked jobs", Duration::from_secs(30), &daemon, || {
        let g = api_call(port, "GET", "/api/v1/campaigns/later", Some(TOKEN), b"");
        let h = api_call(port, "GET", "/api/v1/campaigns/gone", Some(TOKEN), b"");
        g.body["parked"] == 20 && h.body["parked"] == 20
    });
    assert_eq!(stat(&mut conn, &p, "later", "delivered"), 0);
    let a = api_call(
        port,
        "POST",
        "/api/v1/campaigns/later/resume",
        Some(TOKEN),
        b"",
    );
    assert_eq!(a.body["released"], 20, "{}", a.raw);
    let a = api_call(
        port,
        "POST",
        "/api/v1/campaigns/gone/cancel",
        Some(TOKEN),
        b"",
    );
    assert_eq!(
        (a.body["state"].as_str(), a.body["released"].as_u64()),
        (Some("cancelled"), Some(20)),
        "{}",
        a.raw
    );
    wait_until_daemon(
        "later delivered, gone cancelled",
        Duration::from_secs(60),
        &daemon,
        || {
            stat(&mut conn, &p, "later", "delivered") == 20
                && stat(&mut conn, &p, "gone", "suppressed") == 20
        },
    );
    let evs = events(&mut conn, &p);
    assert!(evs
        .iter()
        .filter(|e| e["campaign"] == "gone" && is_terminal(e))
        .all(|e| e["type"] == "suppressed" && e["reason"] == "cancelled"));

    // Recipients and suppressions.
    let r = api_call(
        port,
        "GET",
        "/api/v1/recipients/u7@bulk.test",
        Some(TOKEN),
        b"",
    );
    assert_eq!(
        (r.status, r.body["suppressed"].as_str()),
        (200, Some("no")),
        "{}",
        r.raw
    );
    refused(
        &api_call(
            port,
            "GET",
            "/api/v1/recipients/not-an-address",
            Some(TOKEN),
            b"",
        ),
        400,
    );
    let s = api_call(
        port,
        "PUT",
        "/api/v1/suppressions/U7@Bulk.test",
        Some(TOKEN),
        b"",
    );
    assert_eq!(s.body["reason"], "manual", "{}", s.raw);
    let s = api_call(
        port,
        "PUT",
        "/api/v1/suppressions/u8@bulk.test",
        Some(TOKEN),
        br#"{"reason":"complained"}"#,
    );
    assert_eq!(s.body["reason"], "complained", "{}", s.raw);
    refused(
        &api_call(
            port,
            "PUT",
            "/api/v1/suppressions/u9@bulk.test",
            Some(TOKEN),
            br#"{"reason":"whim"}"#,
        ),
        400,
    );
    refused(
        &api_call(
            port,
            "PUT",
            "/api/v1/suppressions/u9@bulk.test",
            Some(TOKEN),
            b"{",
        ),
        400,
    );
    let r = api_call(
        port,
        "GET",
        "/api/v1/recipients/u7@bulk.test",
        Some(TOKEN),
        b"",
    );
    assert_eq!(r.body["suppressed"], "manual", "{}", r.raw);
    let d = api_call(
        port,
        "DELETE",
        "/api/v1/suppressions/u7@bulk.test",
        Some(TOKEN),
        b"",
    );
    assert_eq!(d.body["removed"], true, "{}", d.raw);
    let r = api_call(
        port,
        "GET",
        "/api/v1/recipients/u7@bulk.test",
        Some(TOKEN),
        b"",
    );
    assert_eq!(r.body["suppressed"], "no", "{}", r.raw);
    // A suppressed address posted again ends suppressed, not delivered.
    let again = job(
        "again-1",
        "again",
        "receipt",
        "u8@bulk.test",
        serde_json::json!({"name": "R", "order_id": 1}),
    );
    api_call(
        port,
        "POST",
        "/api/v1/sends",
        Some(TOKEN),
        format!("[{again}]").as_bytes(),
    );
    wait_until_daemon("again suppressed", Duration::from_secs(30), &daemon, || {
        stat(&mut conn, &p, "again", "suppressed") == 1
    });

    // Unknown routes and methods answer JSON too.
    refused(
        &api_call(port, "GET", "/api/v1/nothing", Some(TOKEN), b""),
        404,
    );
    refused(
        &api_call(port, "DELETE", "/api/v1/campaigns", Some(TOKEN), b""),
        405,
    );

    // Counted, by route pattern (never the path); the token is in no log line.
    let text = metrics_text(metrics);
    assert!(metric_in(&text, "paloma_api_jobs_total{result=\"accepted\"}").unwrap() >= 10_045.0);
    assert!(metric_in(&text, "paloma_api_jobs_total{result=\"refused\"}").unwrap() >= 9.0);
    assert!(
        text.contains("route=\"/api/v1/campaigns/{campaign}\""),
        "{text}"
    );
    assert!(!text.contains("u7@bulk.test"));
    assert!(!daemon.log_text().contains(TOKEN));
}

#[test]
fn the_api_can_share_the_metrics_listener() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let port = free_port();
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        "",
        &format!(
            "[metrics]\nlisten = \"127.0.0.1:{port}\"\n[api]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"{TOKEN}\"\n"
        ),
    );
    let daemon = Daemon::spawn(&setup.config);
    wait_port("127.0.0.1", port, Duration::from_secs(30));
    let mut conn = redis.conn();
    let a = api_call(
        port,
        "POST",
        "/api/v1/sends",
        Some(TOKEN),
        &json_array(&jobs(5, "shared", "shared.test")),
    );
    assert_eq!(a.body["accepted"], 5, "{}", a.raw);
    wait_until_daemon("5 deliveries", Duration::from_secs(30), &daemon, || {
        stat(&mut conn, &setup.prefix, "shared", "delivered") == 5
    });
    assert!(metrics_text(port).starts_with("HTTP/1.1 200"));
    refused(&api_call(port, "GET", "/api/v1/campaigns", None, b""), 401);
}

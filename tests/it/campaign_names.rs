//! Campaign names travel through URLs, Redis keys, metric labels and headers, so only
//! 1-64 of `A-Z a-z 0-9 . _ -` (not starting with `.`) are taken: a job with another is a
//! dead letter at the intake, a 422 at the API, refused by `paloma enqueue` and, in a
//! config, a config error. Names kept in Redis from before stay readable in the report,
//! their links percent-encoded. And the report's session cookie is `Secure` when the
//! deployment is served over HTTPS.

use crate::common;

use std::time::Duration;

use common::track::request;
use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "api-token-5f0c2e9a7d41b3867c";
const RULE: &str = "1-64 of A-Z a-z 0-9 . _ -";

fn api_setup(redis: &Redis, sink: &Sink, extra: &str) -> (Setup, u16) {
    let port = free_port();
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        "",
        &format!("[api]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"{TOKEN}\"\n{extra}"),
    );
    (setup, port)
}

const AUTH: (&str, &str) = ("Authorization", "Bearer api-token-5f0c2e9a7d41b3867c");

#[test]
fn names_that_do_not_travel_are_refused_at_every_door() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let (setup, port) = api_setup(&redis, &sink, "");
    let p = setup.prefix.clone();
    let cfg = setup.config.to_str().unwrap().to_string();
    let daemon = Daemon::spawn(&setup.config);
    wait_port("127.0.0.1", port, Duration::from_secs(30));
    let mut conn = redis.conn();

    // The intake: a dead letter with the rule, the good job delivered.
    let bad = ["a/b/../c", "<script>alert(1)</script>", ".hidden"];
    let mut all: Vec<String> = bad
        .iter()
        .enumerate()
        .map(|(i, c)| {
            job(
                &format!("bad-{i}"),
                c,
                "receipt",
                "a@x.test",
                json!({"name": "A", "order_id": i}),
            )
        })
        .collect();
    all.push(job(
        "good-0",
        "spring-2026.v1_a",
        "receipt",
        "b@x.test",
        json!({"name": "B", "order_id": 9}),
    ));
    enqueue_raw(&mut conn, &p, &all);
    let evs = wait_terminal(&mut conn, &p, 4, Duration::from_secs(30), Some(&daemon));
    let t = terminal_by_id(&evs);
    assert_eq!(t["good-0"][0]["type"], "delivered", "{evs:?}");
    for i in 0..bad.len() {
        let e = &t[&format!("bad-{i}")][0];
        assert_eq!(e["type"], "dead", "{}: {e}", bad[i]);
        assert!(
            e["error"].as_str().unwrap().contains(RULE),
            "the reason says what is allowed: {e}"
        );
    }
    let dead = dead_letters(&mut conn, &p);
    assert_eq!(dead.len(), 3, "{dead:?}");
    assert!(dead.iter().all(|(_, e)| e.contains("invalid `campaign`")));

    // The API: 422 for a job and for a campaign route, the rule in the error.
    let body = format!(
        "[{}]",
        job("api-0", "a/b/../c", "receipt", "c@x.test", json!({}))
    );
    let r = request(
        port,
        "POST",
        "/api/v1/sends",
        &[AUTH, ("Content-Type", "application/json")],
        body.as_bytes(),
    );
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains(RULE), "{}", r.text());
    for (method, path) in [
        ("POST", "/api/v1/campaigns/a%2Fb/pause"),
        ("POST", "/api/v1/campaigns/%3Cscript%3E/cancel"),
        ("GET", "/api/v1/campaigns/bad%20name"),
    ] {
        let r = request(port, method, path, &[AUTH], b"");
        assert_eq!(r.status, 422, "{method} {path}: {}", r.text());
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert!(v["error"].as_str().unwrap().contains(RULE), "{v}");
    }
    let states: Vec<String> = redis::cmd("HKEYS")
        .arg(format!("{p}campaign_states"))
        .query(&mut conn)
        .unwrap();
    assert!(states.is_empty(), "nothing was paused: {states:?}");

    // paloma enqueue: the line is refused (exit 1), the rest enqueued; a CSV's --campaign
    // is refused before anything is read.
    let lines = format!(
        "{}\n{}\n",
        job("cli-0", "<b>x</b>", "receipt", "d@x.test", json!({})),
        job(
            "cli-1",
            "autumn",
            "receipt",
            "e@x.test",
            json!({"name": "E", "order_id": 1})
        )
    );
    let (st, _, err) = paloma(&["enqueue", "--config", &cfg, "-"], Some(&lines));
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(err.contains("line 1") && err.contains(RULE), "{err}");
    assert!(err.contains("enqueued 1 jobs, rejected 1"), "{err}");
    let (st, _, err) = paloma(
        &[
            "enqueue",
            "--config",
            &cfg,
            "--csv",
            "--campaign",
            "a/b",
            "--template",
            "receipt",
            "-",
        ],
        Some("email\nf@x.test\n"),
    );
    assert!(!st.success(), "{err}");
    assert!(err.contains(RULE), "{err}");

    // A config naming such a campaign is refused, saying which key and what is allowed.
    let bad_cfg = setup.path("bad.toml");
    std::fs::write(
        &bad_cfg,
        std::fs::read_to_string(&setup.config).unwrap()
            + "[[workflows]]\nname = \"follow\"\ncampaign = \"spring/2026\"\non = \"clicked\"\nsend = { template = \"receipt\" }\n",
    )
    .unwrap();
    let (st, _, err) = paloma(&["stats", "--config", bad_cfg.to_str().unwrap()], None);
    assert!(!st.success(), "{err}");
    assert!(
        err.contains("workflows[0]") && err.contains("campaign") && err.contains(RULE),
        "{err}"
    );
    drop(daemon);
}

#[test]
fn names_kept_from_before_are_linked_encoded_and_cookies_are_secure_over_https() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let (setup, port) = api_setup(&redis, &sink, "");
    let p = setup.prefix.clone();
    let mut conn = redis.conn();
    // Campaigns the old rule took, with their counters.
    let old = ["a/b/../c", "<script>alert(1)</script>"];
    for c in old {
        let _: () = redis::pipe()
            .cmd("SADD")
            .arg(format!("{p}campaigns"))
            .arg(c)
            .cmd("HSET")
            .arg(format!("{p}stats:{c}"))
            .arg("accepted")
            .arg(1)
            .arg("delivered")
            .arg(1)
            .query(&mut conn)
            .unwrap();
    }
    let daemon = Daemon::spawn(&setup.config);
    wait_port("127.0.0.1", port, Duration::from_secs(30));

    let list = request(port, "GET", "/campaigns", &[AUTH], b"");
    assert_eq!(list.status, 200, "{}", daemon.log_text());
    let html = list.text();
    for href in [
        "href=\"/campaigns/a%2Fb%2F..%2Fc\"",
        "href=\"/campaigns/%3Cscript%3Ealert%281%29%3C%2Fscript%3E\"",
    ] {
        assert!(html.contains(href), "{href} not in {html}");
    }
    assert!(!html.contains("<script>"), "escaped: {html}");
    let page = request(port, "GET", "/campaigns/a%2Fb%2F..%2Fc", &[AUTH], b"");
    assert_eq!(page.status, 200, "{}", page.text());
    assert!(page.text().contains("a/b/../c"));
    let page = request(
        port,
        "GET",
        "/campaigns/%3Cscript%3Ealert%281%29%3C%2Fscript%3E",
        &[AUTH],
        b"",
    );
    assert_eq!(page.status, 200);
    assert!(page
        .text()
        .contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    let api = request(
        port,
        "GET",
        "/api/v1/campaigns/a%2Fb%2F..%2Fc",
        &[AUTH],
        b"",
    );
    assert_eq!(api.status, 200, "{}", api.text());
    // Signing in from such a page comes back to it.
    let r = request(port, "GET", "/campaigns/a%2Fb%2F..%2Fc", &[], b"");
    assert_eq!(
        r.header("location"),
        Some("/login?next=/campaigns/a%252Fb%252F..%252Fc")
    );

    // tracking.base_url is https in this config: the session cookie is Secure.
    let form = format!("token={TOKEN}&next=%2Fcampaigns%2Fa%252Fb%252F..%252Fc");
    let login = request(
        port,
        "POST",
        "/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        form.as_bytes(),
    );
    assert_eq!(login.status, 303);
    assert_eq!(login.header("location"), Some("/campaigns/a%2Fb%2F..%2Fc"));
    let cookie = login.header("set-cookie").unwrap().to_string();
    assert!(
        cookie.contains("; Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    let logout = request(port, "POST", "/logout", &[], b"");
    assert!(logout.header("set-cookie").unwrap().contains("; Secure"));
    drop(daemon);

    // Over plain HTTP (base_url http://…) it is not, or a browser would drop it.
    let (plain, plain_port) = api_setup(&redis, &sink, "");
    let text = std::fs::read_to_string(&plain.config)
        .unwrap()
        .replace("https://t.shop.test", "http://t.shop.test");
    std::fs::write(&plain.config, text).unwrap();
    let daemon = Daemon::spawn(&plain.config);
    wait_port("127.0.0.1", plain_port, Duration::from_secs(30));
    let form = format!("token={TOKEN}");
    let login = request(
        plain_port,
        "POST",
        "/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        form.as_bytes(),
    );
    assert_eq!(login.status, 303, "{}", daemon.log_text());
    let cookie = login.header("set-cookie").unwrap();
    assert!(
        !cookie.contains("Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
}

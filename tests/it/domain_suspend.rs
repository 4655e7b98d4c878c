//! An operator suspends a recipient domain (`paloma domain suspend`, the API's
//! `/api/v1/domains/…`): every daemon stops sending to it within a round of reading the
//! fleet's suspensions, its jobs wait in the delayed set without an attempt or an event,
//! other domains go on; `resume` lifts it and brings the waiting jobs forward; a suspension
//! for one egress source sends the domain's mail through the pool's other sources.

use crate::common;

use std::time::Duration;

use common::mx::*;
use common::track::api_call;
use common::*;

const TOKEN: &str = "api-token-5f0c2e9a7d41b3867c";

fn cli(config: &std::path::Path, args: &[&str]) -> String {
    let mut all = vec!["domain"];
    all.extend_from_slice(&args[..1]);
    all.extend(["--config", config.to_str().unwrap()]);
    all.extend_from_slice(&args[1..]);
    let (st, out, err) = paloma(&all, None);
    assert!(st.success(), "paloma {all:?}: {out}{err}");
    out
}

#[test]
fn a_suspended_domain_waits_on_every_daemon_and_resume_sends_it_at_once() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let api = free_port();
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        "",
        &format!("[api]\nlisten = \"127.0.0.1:{api}\"\ntoken = \"{TOKEN}\"\n"),
    );
    let p = setup.prefix.clone();
    let out = cli(&setup.config, &["suspend", "W.test", "--for", "1h"]);
    assert!(
        out.contains("suspended w.test (every source) until"),
        "{out}"
    );
    let daemon = Daemon::spawn(&setup.config);
    wait_port("127.0.0.1", api, Duration::from_secs(30));
    let mut conn = redis.conn();
    enqueue_raw(&mut conn, &p, &jobs(20, "held", "w.test"));
    enqueue_raw(&mut conn, &p, &jobs(20, "other", "v.test"));
    // The other domain goes out; the suspended one waits in the delayed set, no event.
    wait_until_daemon(
        "v.test delivered, w.test waiting",
        Duration::from_secs(30),
        &daemon,
        || {
            let evs = events(&mut conn, &p);
            let delivered = evs.iter().filter(|e| e["type"] == "delivered").count();
            let waiting: usize = redis::cmd("ZCARD")
                .arg(format!("{p}scheduled"))
                .query(&mut conn)
                .unwrap();
            delivered == 20 && waiting == 20
        },
    );
    let evs = events(&mut conn, &p);
    assert!(evs.iter().all(|e| e["campaign"] != "held"), "{evs:?}");
    assert_eq!(sink.count(), 20);
    let listed = cli(&setup.config, &["list"]);
    assert!(listed.contains("w.test  (every source)  until"), "{listed}");

    // The API: the same list; refusals say why.
    let a = api_call(api, "GET", "/api/v1/domains/suspended", Some(TOKEN), b"");
    assert_eq!(a.status, 200, "{}", a.raw);
    assert_eq!(a.body["suspended"][0]["domain"], "w.test");
    let a = api_call(
        api,
        "POST",
        "/api/v1/domains/bad%20name/suspend",
        Some(TOKEN),
        br#"{"for":"1h"}"#,
    );
    assert_eq!(a.status, 422, "{}", a.raw);
    let a = api_call(
        api,
        "POST",
        "/api/v1/domains/v.test/suspend",
        Some(TOKEN),
        br#"{"for":"1h","source":"ip9"}"#,
    );
    assert_eq!(a.status, 422, "{}", a.raw);
    assert!(a.body["error"].as_str().unwrap().contains("ip9"));
    let a = api_call(
        api,
        "POST",
        "/api/v1/domains/v.test/suspend",
        Some(TOKEN),
        br#"{"for":"soon"}"#,
    );
    assert_eq!(a.status, 422, "{}", a.raw);
    let a = api_call(
        api,
        "POST",
        "/api/v1/domains/v.test/suspend",
        None,
        br#"{"for":"1h"}"#,
    );
    assert_eq!(a.status, 401, "{}", a.raw);
    let a = api_call(
        api,
        "POST",
        "/api/v1/domains/v.test/suspend",
        Some(TOKEN),
        br#"{"for":"10m"}"#,
    );
    assert_eq!(a.status, 200, "{}", a.raw);
    assert_eq!(a.body["domain"], "v.test");
    assert!(a.body["source"].is_null());
    let a = api_call(
        api,
        "POST",
        "/api/v1/domains/v.test/resume",
        Some(TOKEN),
        b"",
    );
    assert_eq!(a.status, 200, "{}", a.raw);
    assert_eq!(a.body["lifted"], 1);

    // Resume: lifted on every daemon, and the waiting jobs go now, not in an hour.
    let out = cli(&setup.config, &["resume", "w.test"]);
    assert!(
        out.contains("1 suspension(s) lifted, 20 waiting job(s) brought forward"),
        "{out}"
    );
    let evs = wait_terminal(&mut conn, &p, 40, Duration::from_secs(30), Some(&daemon));
    assert_delivered_once(&evs, 40);
    assert_eq!(sink.count(), 40);
    assert!(cli(&setup.config, &["list"]).contains("no domain is suspended"));
}

#[test]
fn a_suspension_for_one_source_sends_through_the_others() {
    let _machine = exclusive();
    let e = env(
        &[
            "mx-host=w.test,mx.w.test,10",
            "host-record=mx.w.test,127.0.0.10",
        ],
        &[],
        "",
        "[[sources]]\nname = \"ip1\"\naddress = \"127.0.0.2\"\nhelo = \"one.test\"\n\
         [[sources]]\nname = \"ip2\"\naddress = \"127.0.0.3\"\nhelo = \"two.test\"\n",
    );
    let mx = Recorder::start("127.0.0.10", e.port, "ok");
    let out = cli(
        &e.setup.config,
        &["suspend", "w.test", "--source", "ip1", "--for", "1h"],
    );
    assert!(out.contains("(source ip1)"), "{out}");
    let (st, _, err) = paloma(
        &[
            "domain",
            "suspend",
            "--config",
            e.setup.config.to_str().unwrap(),
            "w.test",
            "--source",
            "ip7",
            "--for",
            "1h",
        ],
        None,
    );
    assert!(
        !st.success() && err.contains("ip7") && err.contains("ip1, ip2"),
        "{err}"
    );
    let mut conn = e.redis.conn();
    enqueue_raw(&mut conn, &e.setup.prefix, &jobs(50, "one", "w.test"));
    let daemon = Daemon::spawn(&e.setup.config);
    let evs = wait_terminal(
        &mut conn,
        &e.setup.prefix,
        50,
        Duration::from_secs(60),
        Some(&daemon),
    );
    assert_delivered_once(&evs, 50);
    let kept = mx.kept();
    assert_eq!(kept.len(), 50);
    assert!(
        kept.iter()
            .all(|k| k.client == "127.0.0.3" && k.ehlo == "two.test"),
        "nothing through the suspended source"
    );
}

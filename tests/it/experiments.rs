//! A/B tests against a real daemon, Redis and smtp-sink, with clicks over HTTP on the
//! tracking server:
//!
//! - 2,000 recipients, three variants (the job's template, a subject override, another
//!   template), 30% in the test. The daemon is restarted during the test window. People
//!   click variant b's mail most, a's a little, and a mail-security scanner clicks c's most
//!   of all (machine clicks, which must not count). The window is then closed (its start is
//!   moved back in Redis: the test's clock), b wins significantly, and the held 70% go out
//!   as b, each job delivered exactly once, every event naming its variant.
//! - A test nobody clicks ends with the fallback; another is decided by hand early with
//!   `paloma experiment pick`, which refuses a second pick.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use common::track::{captured, request, stat, MAIL_UA};
use common::*;
use paloma::experiment::{Assign, Experiments};
use serde_json::Value;

fn config_experiments(path: &std::path::Path) -> paloma::config::Settings {
    paloma::config::Settings::load(path).unwrap()
}

/// Where the daemon must have put each recipient, computed with paloma's own assignment.
fn expected(
    settings: &paloma::config::Settings,
    campaign: &str,
    to: &[String],
) -> Vec<Option<String>> {
    let x = Experiments::new(&settings.experiments);
    to.iter()
        .map(|t| match x.assign(campaign, t, 0).unwrap() {
            Assign::Send(v) => Some(v.name.clone()),
            Assign::Hold => None,
        })
        .collect()
}

fn newsletter_jobs(tag: &str, n: usize) -> (Vec<String>, Vec<String>) {
    let to: Vec<String> = (0..n).map(|i| format!("p{i}@{tag}.test")).collect();
    let jobs = to
        .iter()
        .enumerate()
        .map(|(i, t)| {
            job(
                &format!("{tag}-{i}"),
                tag,
                "newsletter",
                t,
                newsletter_data("Ana"),
            )
        })
        .collect();
    (to, jobs)
}

fn decided(conn: &mut redis::Connection, prefix: &str, campaign: &str) -> Option<Value> {
    events(conn, prefix)
        .into_iter()
        .find(|e| e["type"] == "experiment_decided" && e["campaign"] == campaign)
}

fn click(port: u16, path: &str, ua: &str, ip: &str) {
    let r = request(
        port,
        "GET",
        path,
        &[("User-Agent", ua), ("X-Forwarded-For", ip)],
        b"",
    );
    assert_eq!(r.status, 302, "{}", r.text());
}

#[test]
fn people_clicks_pick_the_winner_and_the_rest_go_out_with_it() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let track = free_port();
    let metrics = free_port();
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        "",
        &format!(
            r#"listen = "127.0.0.1:{track}"
trust_forwarded = true
[metrics]
listen = "127.0.0.1:{metrics}"
[[experiments]]
campaign = "spring"
variants = [ {{ name = "a" }},
             {{ name = "b", subject = "Last days, {{{{first_name}}}}: the spring sale ends" }},
             {{ name = "c", template = "followup" }} ]
test_share = "30%"
decide_after = "30s"
metric = "clicks"
confidence = "95%"
fallback = "a"
"#
        ),
    );
    let p = setup.prefix.clone();
    let settings = config_experiments(&setup.config);
    let (to, all) = newsletter_jobs("spring", 2000);
    let want = expected(&settings, "spring", &to);
    let in_test = want.iter().filter(|v| v.is_some()).count();
    assert!((520..680).contains(&in_test), "{in_test}");

    let mut daemon = Daemon::spawn(&setup.config);
    let mut conn = redis.conn();
    enqueue_raw(&mut conn, &p, &all);
    wait_until_daemon(
        "the test share delivered, the rest held",
        Duration::from_secs(120),
        &daemon,
        || {
            stat(&mut conn, &p, "spring", "delivered") == in_test as i64
                && held(&mut conn, &p, "spring") == 2000 - in_test
        },
    );
    // A restart during the window changes nothing: nothing is sent again, nothing decided.
    daemon.signal("TERM");
    assert!(daemon.wait(Duration::from_secs(20)).unwrap().success());
    let daemon = Daemon::spawn(&setup.config);
    wait_port("127.0.0.1", track, Duration::from_secs(30));
    assert!(decided(&mut conn, &p, "spring").is_none());

    // Clicks: people click b's mail (1 in 2) and a's (1 in 10); a scanner clicks c's (4 in 5).
    let mails = captured(&sink, "https://t.shop.test");
    assert_eq!(mails.len(), in_test, "only the test share was sent");
    let mut clicks: HashMap<&str, usize> = HashMap::new();
    for (i, v) in want.iter().enumerate() {
        let Some(v) = v.as_deref() else { continue };
        let m = &mails[&format!("spring-{i}")];
        let (go, ua, ip) = match v {
            "a" => (i % 10 == 0, MAIL_UA, "198.51.100.7"),
            "b" => (i % 2 == 0, MAIL_UA, "198.51.100.8"),
            _ => (
                i % 5 != 0,
                "Mozilla/5.0 (compatible; Proofpoint URL Defense)",
                "203.0.113.9",
            ),
        };
        if go {
            click(track, &m.clicks[0], ua, ip);
            *clicks
                .entry(if v == "c" {
                    "c"
                } else if v == "b" {
                    "b"
                } else {
                    "a"
                })
                .or_default() += 1;
        }
        if v == "b" {
            assert!(m.subject.starts_with("Last days, Ana"), "{}", m.subject);
        } else if v == "c" {
            assert!(m.subject.contains("still thinking"), "{}", m.subject);
        }
    }
    let total: usize = clicks.values().sum();
    wait_until_daemon(
        "every click recorded",
        Duration::from_secs(30),
        &daemon,
        || {
            events(&mut conn, &p)
                .iter()
                .filter(|e| e["type"] == "clicked")
                .count()
                == total
        },
    );
    let evs = events(&mut conn, &p);
    for e in evs.iter().filter(|e| e["type"] == "clicked") {
        let v = e["variant"].as_str().expect("a click names its variant");
        assert_eq!(e["machine"], v == "c", "{e}");
    }

    // The test's clock: the window started 31 s ago.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    redis::cmd("HSET")
        .arg(format!("{p}experiment:spring"))
        .arg("started")
        .arg(now - 31_000)
        .query::<()>(&mut conn)
        .unwrap();
    let d = wait_for_daemon(
        "experiment_decided",
        Duration::from_secs(20),
        &daemon,
        || decided(&mut conn, &p, "spring"),
    );
    assert_eq!(
        (
            d["winner"].as_str(),
            d["significant"].as_bool(),
            d["how"].as_str()
        ),
        (Some("b"), Some(true), Some("auto")),
        "{d}"
    );
    assert_eq!(d["metric"], "clicks");
    let figs = d["variants"].as_array().unwrap();
    assert_eq!(figs.len(), 3);
    let c = figs.iter().find(|f| f["variant"] == "c").unwrap();
    assert_eq!(c["hits"], 0, "machine clicks never count: {d}");

    // The rest goes out with the winner, each job once.
    wait_until_daemon(
        "all 2,000 delivered",
        Duration::from_secs(120),
        &daemon,
        || stat(&mut conn, &p, "spring", "delivered") == 2000,
    );
    let evs = events(&mut conn, &p);
    let by_id = terminal_by_id(&evs);
    for (i, v) in want.iter().enumerate() {
        let t = &by_id[&format!("spring-{i}")];
        assert_eq!(t.len(), 1, "spring-{i}: {t:?}");
        assert_eq!(t[0]["type"], "delivered");
        assert_eq!(
            t[0]["variant"].as_str(),
            Some(v.as_deref().unwrap_or("b")),
            "spring-{i}"
        );
    }
    assert_eq!(held(&mut conn, &p, "spring"), 0);
    assert_eq!(sink.wait_count(2000, Duration::from_secs(30)), 2000);

    // paloma stats and the metrics show the variants and the decision.
    let cfg = setup.config.to_str().unwrap();
    let (st, out, err) = paloma(
        &["stats", "--config", cfg, "--campaign", "spring", "--json"],
        None,
    );
    assert!(st.success(), "{err}");
    let o: Value = serde_json::from_str(&out).unwrap();
    let s = &o["campaigns"][0];
    assert_eq!(s["experiment"]["winner"], "b", "{s}");
    let b_delivered = s["variants"]["b"]["delivered"].as_i64().unwrap();
    assert_eq!(
        b_delivered as usize,
        2000 - in_test + want.iter().filter(|v| v.as_deref() == Some("b")).count()
    );
    assert!(s["variants"]["c"]["clicked_machine"].as_i64().unwrap() > 0);
    let (st, out, _) = paloma(&["stats", "--config", cfg], None);
    assert!(
        st.success() && out.contains("variants") && out.contains("b (auto)"),
        "{out}"
    );
    let m = metric(
        metrics,
        "paloma_experiment_messages_total{campaign=\"spring\",outcome=\"delivered\",variant=\"b\"}",
    );
    assert!(m > 0.0, "{}", metrics_text(metrics));
}

#[test]
fn no_winner_means_the_fallback_and_a_person_can_pick_early() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        "",
        r#"
[[experiments]]
campaign = "quiet"
variants = [ { name = "a" }, { name = "b", subject = "B for {{first_name}}" }, { name = "c", subject = "C for {{first_name}}" } ]
test_share = "40%"
decide_after = "2s"
fallback = "a"
[[experiments]]
campaign = "early"
variants = [ { name = "a" }, { name = "b", template = "followup" } ]
test_share = "20%"
decide_after = "1h"
fallback = "a"
"#,
    );
    let p = setup.prefix.clone();
    let cfg = setup.config.to_str().unwrap().to_string();
    let settings = config_experiments(&setup.config);
    let (quiet_to, mut all) = newsletter_jobs("quiet", 300);
    let (early_to, early) = newsletter_jobs("early", 300);
    all.extend(early);
    let quiet = expected(&settings, "quiet", &quiet_to);
    let early = expected(&settings, "early", &early_to);
    let daemon = Daemon::spawn(&setup.config);
    let mut conn = redis.conn();
    enqueue_raw(&mut conn, &p, &all);

    // Nobody clicks: after 2 s the fallback is sent to the rest.
    let d = wait_for_daemon("quiet decided", Duration::from_secs(30), &daemon, || {
        decided(&mut conn, &p, "quiet")
    });
    assert_eq!(
        (
            d["winner"].as_str(),
            d["significant"].as_bool(),
            d["how"].as_str()
        ),
        (Some("a"), Some(false), Some("fallback")),
        "{d}"
    );
    wait_until_daemon("quiet delivered", Duration::from_secs(60), &daemon, || {
        stat(&mut conn, &p, "quiet", "delivered") == 300
    });

    // early waits for a person.
    let early_test = early.iter().filter(|v| v.is_some()).count();
    wait_until_daemon(
        "early's test share out",
        Duration::from_secs(60),
        &daemon,
        || stat(&mut conn, &p, "early", "delivered") == early_test as i64,
    );
    let (st, out, err) = paloma(&["experiment", "status", "--config", &cfg, "early"], None);
    assert!(st.success(), "{err}");
    assert!(
        out.contains("testing") && out.contains(&format!("{} jobs held", 300 - early_test)),
        "{out}"
    );
    let (st, _, err) = paloma(
        &["experiment", "pick", "--config", &cfg, "early", "z"],
        None,
    );
    assert!(!st.success() && err.contains("not a variant"), "{err}");
    let (st, _, err) = paloma(
        &["experiment", "pick", "--config", &cfg, "early", "b"],
        None,
    );
    assert!(st.success(), "{err}");
    let (st, _, err) = paloma(
        &["experiment", "pick", "--config", &cfg, "early", "a"],
        None,
    );
    assert!(
        !st.success() && err.contains("already decided: b (manual)"),
        "{err}"
    );
    wait_until_daemon("early delivered", Duration::from_secs(60), &daemon, || {
        stat(&mut conn, &p, "early", "delivered") == 300
    });
    let d = decided(&mut conn, &p, "early").unwrap();
    assert_eq!(
        (d["winner"].as_str(), d["how"].as_str()),
        (Some("b"), Some("manual"))
    );

    let evs = events(&mut conn, &p);
    let by_id = terminal_by_id(&evs);
    for (tag, want, rest) in [("quiet", &quiet, "a"), ("early", &early, "b")] {
        for (i, v) in want.iter().enumerate() {
            let t = &by_id[&format!("{tag}-{i}")];
            assert_eq!(t.len(), 1);
            assert_eq!(
                t[0]["variant"].as_str(),
                Some(v.as_deref().unwrap_or(rest)),
                "{tag}-{i}"
            );
        }
    }
    let (st, out, _) = paloma(
        &["experiment", "status", "--config", &cfg, "quiet", "--json"],
        None,
    );
    assert!(st.success());
    let s: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["state"]["winner"], "a", "{s}");
    assert_eq!(s["held"], 0);
}

//! Egress sources and pools in mx mode: each message leaves from a source of its pool (the
//! address bound, the source's EHLO name), split by weight; a warming source carries at most
//! its day's cap; a pool of only cold sources sends its cap and the rest wait for the next
//! UTC day with no terminal event; a job naming no pool is a dead letter. The receiver is
//! aiosmtpd recording each message's client address and EHLO name.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use common::mx::*;
use common::*;

const TOKEN: &str = "egress-token-3b9d0c7e5a41f268";

const DNS: &[&str] = &[
    "mx-host=w.test,mx.w.test,10",
    "host-record=mx.w.test,127.0.0.10",
];

fn sources(warmup_cold: &str) -> String {
    format!(
        "[[sources]]\nname = \"ip1\"\naddress = \"127.0.0.2\"\nhelo = \"one.test\"\n{warmup_cold}\
         [[sources]]\nname = \"ip2\"\naddress = \"127.0.0.3\"\nhelo = \"two.test\"\n"
    )
}

fn today() -> String {
    chrono::Utc::now()
        .date_naive()
        .format("%Y-%m-%d")
        .to_string()
}

/// Messages kept by the receiver, by client address, each address's EHLO names.
fn by_client(kept: &[Kept]) -> HashMap<String, (usize, Vec<String>)> {
    let mut m: HashMap<String, (usize, Vec<String>)> = HashMap::new();
    for k in kept {
        let e = m.entry(k.client.clone()).or_default();
        e.0 += 1;
        if !e.1.contains(&k.ehlo) {
            e.1.push(k.ehlo.clone());
        }
    }
    m
}

#[test]
fn a_pool_splits_by_weight_each_source_with_its_address_and_name() {
    let _machine = exclusive();
    let e = env(
        DNS,
        &[],
        "pool = \"marketing\"",
        &format!(
            "{}[[pools]]\nname = \"marketing\"\nsources = [{{ source = \"ip1\", weight = 1 }}, {{ source = \"ip2\", weight = 3 }}]\n",
            sources("")
        ),
    );
    let mx = Recorder::start("127.0.0.10", e.port, "ok");
    let mut conn = e.redis.conn();
    let n = 2000;
    enqueue_raw(&mut conn, &e.setup.prefix, &jobs(n, "split", "w.test"));
    let daemon = Daemon::spawn(&e.setup.config);
    let evs = wait_terminal(
        &mut conn,
        &e.setup.prefix,
        n,
        Duration::from_secs(120),
        Some(&daemon),
    );
    assert_delivered_once(&evs, n);
    let kept = mx.kept();
    assert_eq!(kept.len(), n, "each message kept once");
    let m = by_client(&kept);
    assert_eq!(m.len(), 2, "{:?}", m.keys());
    let (one, ehlo1) = &m["127.0.0.2"];
    let (two, ehlo2) = &m["127.0.0.3"];
    assert_eq!(ehlo1, &["one.test"], "ip1 speaks as its own name");
    assert_eq!(ehlo2, &["two.test"]);
    // 1:3 of 2,000 is 500:1,500; a retry or a session race may move a few.
    assert!((450..=550).contains(one), "ip1 carried {one}, ip2 {two}");
    // Sent today, per source, as `paloma sources --json` reports it (counted each second).
    let sent = wait_for("sent counts", Duration::from_secs(10), || {
        let (st, out, _) = paloma(
            &[
                "sources",
                "--config",
                e.setup.config.to_str().unwrap(),
                "--json",
            ],
            None,
        );
        assert!(st.success());
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let counts: Vec<u64> = v["sources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["sent_today"].as_u64().unwrap())
            .collect();
        (counts.iter().sum::<u64>() == n as u64).then_some(counts)
    });
    assert_eq!(sent, vec![*one as u64, *two as u64]);
}

#[test]
fn a_warming_source_carries_at_most_its_cap_and_a_cold_pool_waits_for_tomorrow() {
    let _machine = exclusive();
    let api = free_port();
    let cold = format!(
        "warmup = {{ start = \"{}\", daily = [100, 1000] }}\n",
        today()
    );
    let e = env(
        DNS,
        &[],
        "pool = \"mixed\"",
        &format!(
            "{}[[pools]]\nname = \"mixed\"\nsources = [{{ source = \"ip1\", weight = 3 }}, {{ source = \"ip2\", weight = 1 }}]\n\
             [[pools]]\nname = \"new\"\nsources = [{{ source = \"ip1\" }}]\n\
             [api]\nlisten = \"127.0.0.1:{api}\"\ntoken = \"{TOKEN}\"\n",
            sources(&cold)
        ),
    );
    let mx = Recorder::start("127.0.0.10", e.port, "ok");
    let mut conn = e.redis.conn();
    // 1,000 through the mixed pool: ip1 would carry 750 by weight, its cap is 100.
    let n = 1000;
    enqueue_raw(&mut conn, &e.setup.prefix, &jobs(n, "mixed", "w.test"));
    let mut daemon = Daemon::spawn(&e.setup.config);
    let evs = wait_terminal(
        &mut conn,
        &e.setup.prefix,
        n,
        Duration::from_secs(120),
        Some(&daemon),
    );
    assert_delivered_once(&evs, n);
    let m = by_client(&mx.kept());
    let cold_sent = m.get("127.0.0.2").map_or(0, |c| c.0);
    assert!(
        (1..=100).contains(&cold_sent),
        "the warming source carried {cold_sent}"
    );
    // The pool of only the cold source: what is left of its cap goes, the rest waits for
    // the next UTC day, with no terminal event and no attempt counted.
    let prefix = &e.setup.prefix;
    let left = 100 - cold_sent;
    let jobs_new: Vec<String> = (0..(left + 30))
        .map(|i| {
            let mut j: serde_json::Value =
                serde_json::from_str(&jobs(1, "cold", "w.test")[0]).unwrap();
            j["id"] = format!("cold-{i}").into();
            j["to"] = format!("c{i}@w.test").into();
            j["pool"] = "new".into();
            j.to_string()
        })
        .collect();
    let mut bad: serde_json::Value = serde_json::from_str(&jobs(1, "nopool", "w.test")[0]).unwrap();
    bad["pool"] = "transactional".into();
    let mut all = jobs_new;
    all.push(bad.to_string());
    enqueue_raw(&mut conn, prefix, &all);
    let tomorrow = (chrono::Utc::now().timestamp_millis() / 86_400_000 + 1) * 86_400_000;
    wait_until_daemon(
        "the cold jobs wait for tomorrow",
        Duration::from_secs(30),
        &daemon,
        || {
            let waiting: Vec<(String, i64)> = redis::cmd("ZRANGE")
                .arg(format!("{prefix}scheduled"))
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query(&mut conn)
                .unwrap();
            waiting.len() == 30
                && waiting
                    .iter()
                    .all(|(m, due)| *due >= tomorrow && m.starts_with("0#w|"))
        },
    );
    let evs = events(&mut conn, prefix);
    let cold_ended = evs
        .iter()
        .filter(|v| v["campaign"] == "cold" && is_terminal(v))
        .count();
    assert_eq!(cold_ended, left, "only the cap's worth ended (delivered)");
    let dead = dead_letters(&mut conn, prefix);
    assert!(
        dead.iter()
            .any(|(_, err)| err.contains("pool") && err.contains("transactional")),
        "{dead:?}"
    );
    assert_eq!(
        by_client(&mx.kept()).get("127.0.0.2").map_or(0, |c| c.0),
        100,
        "the cold source sent exactly its cap"
    );
    // The same on the API.
    let a = common::track::api_call(api, "GET", "/api/v1/sources", Some(TOKEN), b"");
    assert_eq!(a.status, 200, "{}", a.raw);
    let ip1 = &a.body["sources"][0];
    assert_eq!(ip1["name"], "ip1");
    assert_eq!(ip1["pools"], serde_json::json!(["mixed", "new"]));
    assert_eq!(ip1["warmup"]["day"], 1);
    assert_eq!(ip1["warmup"]["cap"], 100);
    assert!(a.body["sources"][1]["warmup"].is_null(), "{}", a.raw);
    daemon.term();
    // What the operator sees.
    let (st, out, _) = paloma(
        &["sources", "--config", e.setup.config.to_str().unwrap()],
        None,
    );
    assert!(st.success(), "{out}");
    assert!(
        out.contains("warm-up day 1 of 2: cap 100, claimed 100"),
        "{out}"
    );
    assert!(out.contains("ip2  127.0.0.3  helo two.test"), "{out}");
}

/// Two daemons send through one source; the receiver answers its first RCPT `421 4.7.28`.
/// The suspension is the source's at that site, kept in Redis: from about a second after the
/// 421 until it ends, the receiver sees nothing from either daemon.
#[test]
fn a_421_to_one_daemon_suspends_the_source_for_the_whole_fleet() {
    let _machine = exclusive();
    let e = env(
        DNS,
        &[],
        "retry_intervals = [\"1s\"]",
        &format!(
            "{}[[pools]]\nname = \"one\"\nsources = [{{ source = \"ip1\" }}]\n[[backoff]]\ncode = \"421\"\nsuspend = \"4s\"\n[[domains]]\nmatch = \"*\"\nrate = \"20/s\"\n",
            sources("")
        ),
    );
    let mx = Recorder::start("127.0.0.10", e.port, "throttle-once");
    let mut conn = e.redis.conn();
    let n = 120;
    enqueue_raw(&mut conn, &e.setup.prefix, &jobs(n, "fleet", "w.test"));
    let a = Daemon::spawn(&e.setup.config);
    let b = Daemon::spawn(&e.setup.config);
    let throttled = wait_for_daemon("the 421", Duration::from_secs(30), &a, || {
        events(&mut conn, &e.setup.prefix)
            .into_iter()
            .find(|v| v["type"] == "deferred")
    });
    let at = at_ms(&throttled) as f64 / 1000.0;
    let evs = wait_terminal(
        &mut conn,
        &e.setup.prefix,
        n,
        Duration::from_secs(60),
        Some(&b),
    );
    assert_delivered_once(&evs, n);
    let kept = mx.kept();
    assert_eq!(kept.len(), n, "each job kept once");
    let suspended: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("{}suspended_sites", e.setup.prefix))
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .unwrap();
    assert!(
        suspended.is_empty() || suspended == ["ip1/mx.w.test"],
        "the suspension is the source's at the site: {suspended:?}"
    );
    let quiet: Vec<f64> = kept
        .iter()
        .map(|k| k.at - at)
        .filter(|d| (1.2..3.8).contains(d))
        .collect();
    assert!(
        quiet.is_empty(),
        "messages reached the receiver {quiet:?} s after the 421, inside the source's suspension"
    );
    assert!(kept
        .iter()
        .all(|k| k.client == "127.0.0.2" && k.ehlo == "one.test"));
}

/// A retry leaves from the source of its first attempt, so a greylisting receiver sees the
/// same address come back; the pool's choice still spreads first attempts over both.
#[test]
fn a_retry_keeps_its_source_for_a_greylisting_receiver() {
    let _machine = exclusive();
    let e = env(DNS, &[], "retry_intervals = [\"1s\"]", &sources(""));
    let mx = Recorder::start("127.0.0.10", e.port, "greylist");
    let mut conn = e.redis.conn();
    let n = 40;
    enqueue_raw(&mut conn, &e.setup.prefix, &jobs(n, "grey", "w.test"));
    let daemon = Daemon::spawn(&e.setup.config);
    let evs = wait_terminal(
        &mut conn,
        &e.setup.prefix,
        n,
        Duration::from_secs(60),
        Some(&daemon),
    );
    assert_delivered_once(&evs, n);
    let first: HashMap<String, String> =
        std::fs::read_to_string(mx.out.path().join("greylisted.tsv"))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(ip, rcpt)| (rcpt.to_string(), ip.to_string()))
            .collect();
    assert_eq!(first.len(), n, "each recipient greylisted once");
    let kept = mx.kept();
    assert_eq!(kept.len(), n);
    for k in &kept {
        assert_eq!(
            first[&k.rcpt], k.client,
            "{}: greylisted from one address, retried from another",
            k.rcpt
        );
    }
    let by = by_client(&kept);
    assert_eq!(
        by.len(),
        2,
        "both sources carried first attempts: {:?}",
        by.keys()
    );
}

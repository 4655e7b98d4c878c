//! 10,000 campaigns, 1,000 of them cancelled, and guards on every campaign: what a daemon
//! does every tick must not grow with them, nor `/metrics`, nor one answer of the API or
//! the report. Measured: Redis's reply bytes per second to an idle daemon (the states
//! re-read every 500 ms, the guards every 2 s), the size of `/metrics` once the campaigns
//! are idle past `metrics.campaign_idle`, and the pages of `/api/v1/campaigns` and
//! `/campaigns`.

use crate::common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::track::request;
use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "api-token-5f0c2e9a7d41b3867c";
const AUTH: (&str, &str) = ("Authorization", "Bearer api-token-5f0c2e9a7d41b3867c");
const CAMPAIGNS: usize = 10_000;

fn info_field(conn: &mut redis::Connection, field: &str) -> i64 {
    let info: String = redis::cmd("INFO").arg("stats").query(conn).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Redis's reply bytes per second to its clients over `window` (the test's own INFO
/// calls included: two small replies).
fn reply_rate(conn: &mut redis::Connection, window: Duration) -> f64 {
    let t0 = Instant::now();
    let b0 = info_field(conn, "total_net_output_bytes");
    // A rate is measured over a time, not awaited: this is the window.
    std::thread::sleep(window);
    let b1 = info_field(conn, "total_net_output_bytes");
    (b1 - b0) as f64 / t0.elapsed().as_secs_f64()
}

#[test]
fn ten_thousand_campaigns_keep_a_daemons_work_and_metrics_bounded() {
    let _machine = exclusive();
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let (api, metrics) = (free_port(), free_port());
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        "",
        &format!(
            "[metrics]\nlisten = \"127.0.0.1:{metrics}\"\ncampaign_idle = \"3s\"\n\
             [api]\nlisten = \"127.0.0.1:{api}\"\ntoken = \"{TOKEN}\"\n\
             [[guards]]\ncampaign = \"*\"\nbounce_rate = \"5%\"\nmin_sent = 1000\n"
        ),
    );
    let p = setup.prefix.clone();
    let daemon = Daemon::spawn(&setup.config);
    wait_port("127.0.0.1", metrics, Duration::from_secs(30));
    wait_port("127.0.0.1", api, Duration::from_secs(30));
    let mut conn = redis.conn();
    let window = Duration::from_secs(4);
    let idle_before = reply_rate(&mut conn, window);
    let metrics_before = metrics_text(metrics).len();

    // One job to each of 10,000 campaigns.
    let jobs: Vec<String> = (0..CAMPAIGNS)
        .map(|i| {
            job(
                &format!("j{i}"),
                &format!("c{i:05}"),
                "receipt",
                &format!("u{i}@x.test"),
                json!({"name": "N", "order_id": i}),
            )
        })
        .collect();
    for chunk in jobs.chunks(1000) {
        enqueue_raw(&mut conn, &p, chunk);
    }
    let started = Instant::now();
    // /metrics sampled about once a second while they go out.
    let (mut polls, mut metrics_peak, mut series_peak) = (0usize, 0usize, 0usize);
    wait_until_daemon(
        "10,000 jobs ended",
        Duration::from_secs(600),
        &daemon,
        || {
            polls += 1;
            if polls % 50 == 0 {
                let t = metrics_text(metrics);
                metrics_peak = metrics_peak.max(t.len());
                series_peak = series_peak.max(
                    t.lines()
                        .filter(|l| l.starts_with("paloma_messages_total{"))
                        .count(),
                );
            }
            stream_len(&mut conn, &format!("{p}events")) >= CAMPAIGNS
        },
    );
    let sent_in = started.elapsed();

    // 1,000 of them cancelled, as `paloma campaign cancel` writes it.
    let mut cancel = redis::cmd("HSET");
    cancel.arg(format!("{p}campaign_states"));
    for i in 0..1000 {
        cancel.arg(format!("c{i:05}")).arg("cancelled");
    }
    let _: () = redis::pipe()
        .atomic()
        .add_command(cancel)
        .ignore()
        .cmd("INCR")
        .arg(format!("{p}campaign_states:v"))
        .ignore()
        .query(&mut conn)
        .unwrap();
    wait_until_daemon(
        "the daemon holds 1,000 cancelled",
        Duration::from_secs(30),
        &daemon,
        || metric(metrics, "paloma_campaigns_held{state=\"cancelled\"}") == 1000.0,
    );

    // /metrics: the campaigns' series go once they are idle.
    let metrics_after = wait_for_daemon(
        "the idle campaigns' series removed",
        Duration::from_secs(60),
        &daemon,
        || {
            let t = metrics_text(metrics);
            let n = t.len();
            (!t.contains("paloma_messages_total{campaign=")).then_some(n)
        },
    );
    assert!(
        metrics_after < metrics_before + 16 * 1024,
        "/metrics {metrics_before} B before, {metrics_peak} B at the peak, {metrics_after} B after"
    );

    // The daemon's own Redis work, idle: as without the campaigns, once the guards'
    // look-back (5 s past their last round) has passed the last outcome.
    let bound = idle_before + 4096.0;
    let mut rates = Vec::new();
    let idle_after = wait_for_daemon(
        "the idle daemon's Redis work back to its level without campaigns",
        Duration::from_secs(60),
        &daemon,
        || {
            let r = reply_rate(&mut conn, window);
            rates.push(r as i64);
            (r < bound).then_some(r)
        },
    );
    println!(
        "10,000 campaigns sent in {sent_in:.1?}; Redis replies to the idle daemon: {idle_before:.0} B/s before, windows after {rates:?} B/s (1,000 cancelled, guards on all); /metrics {metrics_before} B before, {metrics_peak} B at the peak ({series_peak} message series), {metrics_after} B once idle"
    );
    assert!(idle_after < bound);

    // The API: pages of at most 100 (default) or `limit`, in name order, all of them
    // reached by following `next`.
    let first = request(api, "GET", "/api/v1/campaigns", &[AUTH], b"");
    assert_eq!(first.status, 200);
    let v: Value = serde_json::from_slice(&first.body).unwrap();
    assert_eq!(v["campaigns"].as_array().unwrap().len(), 100);
    assert_eq!(v["campaigns"][0]["campaign"], "c00000");
    assert_eq!(v["campaigns"][0]["state"], "cancelled");
    assert_eq!(v["next"], "c00099");
    let first_bytes = first.body.len();
    let mut seen = BTreeSet::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let target = match &after {
            Some(a) => format!("/api/v1/campaigns?limit=1000&after={a}"),
            None => "/api/v1/campaigns?limit=1000".to_string(),
        };
        let r = request(api, "GET", &target, &[AUTH], b"");
        assert_eq!(r.status, 200, "{}", r.text());
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        let page = v["campaigns"].as_array().unwrap();
        assert!(page.len() <= 1000);
        for c in page {
            assert!(seen.insert(c["campaign"].as_str().unwrap().to_string()));
            assert_eq!(c["delivered"], 1);
        }
        pages += 1;
        match v["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    assert_eq!((seen.len(), pages), (CAMPAIGNS, 10));
    let r = request(api, "GET", "/api/v1/campaigns?limit=0", &[AUTH], b"");
    assert_eq!(r.status, 422);
    let doc = request(api, "GET", "/api/v1/openapi.json", &[], b"");
    let doc: Value = serde_json::from_slice(&doc.body).unwrap();
    let params = doc["paths"]["/api/v1/campaigns"]["get"]["parameters"].to_string();
    assert!(
        params.contains("\"limit\"") && params.contains("\"after\""),
        "{params}"
    );

    // The report: 100 a page and a link to the next.
    let page = request(api, "GET", "/campaigns", &[AUTH], b"");
    let html = page.text();
    assert_eq!(html.matches("<tr><td><a href=").count(), 100);
    assert!(
        html.contains("href=\"/campaigns?after=c00099\""),
        "a next link"
    );
    let page2 = request(api, "GET", "/campaigns?after=c00099", &[AUTH], b"");
    assert!(page2.text().contains("href=\"/campaigns/c00100\""));
    println!(
        "GET /api/v1/campaigns: {first_bytes} B (100 of 10,000); GET /campaigns: {} B",
        html.len()
    );
}

#[test]
fn a_finished_campaign_is_archived_after_the_retention_and_still_read_back() {
    let _machine = exclusive();
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let (api, metrics) = (free_port(), free_port());
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        "",
        &format!(
            "[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n[api]\nlisten = \"127.0.0.1:{api}\"\ntoken = \"{TOKEN}\"\n[campaigns]\nretention = \"2s\"\n"
        ),
    );
    let p = setup.prefix.clone();
    let daemon = Daemon::spawn(&setup.config);
    wait_port("127.0.0.1", api, Duration::from_secs(30));
    let mut conn = redis.conn();
    // A paused campaign with a parked job is not finished, however long it waits.
    enqueue_raw(&mut conn, &p, &jobs(1, "kept", "x.test"));
    wait_terminal(&mut conn, &p, 1, Duration::from_secs(30), Some(&daemon));
    let r = request(api, "POST", "/api/v1/campaigns/kept/pause", &[AUTH], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    wait_until_daemon("the daemon knows", Duration::from_secs(10), &daemon, || {
        metric(metrics, "paloma_campaigns_held{state=\"paused\"}") == 1.0
    });
    let parked_job = jobs(2, "kept", "x.test").pop().unwrap();
    enqueue_raw(&mut conn, &p, &[parked_job]);
    wait_until_daemon(
        "the kept job parked",
        Duration::from_secs(30),
        &daemon,
        || {
            redis::cmd("ZCARD")
                .arg(format!("{p}parked:kept"))
                .query::<i64>(&mut conn)
                .unwrap()
                == 1
        },
    );
    enqueue_raw(&mut conn, &p, &jobs(3, "old", "x.test"));
    wait_terminal(&mut conn, &p, 4, Duration::from_secs(30), Some(&daemon));
    // The campaign's own keys (not the jobs' idempotency records).
    let keys_of = |conn: &mut redis::Connection| -> Vec<String> {
        let all: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{p}*:old"))
            .query(conn)
            .unwrap();
        all
    };
    let keys_before = keys_of(&mut conn);
    assert!(
        keys_before.contains(&format!("{p}stats:old")),
        "{keys_before:?}"
    );

    let entry: String = wait_for_daemon(
        "the campaign archived",
        Duration::from_secs(30),
        &daemon,
        || {
            redis::cmd("HGET")
                .arg(format!("{p}campaigns:archive"))
                .arg("old")
                .query::<Option<String>>(&mut conn)
                .unwrap()
        },
    );
    let v: Value = serde_json::from_str(&entry).unwrap();
    assert_eq!(v["stats"]["delivered"], 3, "{entry}");
    let keys_after = keys_of(&mut conn);
    assert!(keys_after.is_empty(), "its keys are gone: {keys_after:?}");
    let member: bool = redis::cmd("SISMEMBER")
        .arg(format!("{p}campaigns"))
        .arg("old")
        .query(&mut conn)
        .unwrap();
    assert!(!member);
    let kept: bool = redis::cmd("HEXISTS")
        .arg(format!("{p}campaigns:archive"))
        .arg("kept")
        .query(&mut conn)
        .unwrap();
    assert!(!kept, "a campaign with a parked job stays");
    println!(
        "archived: {} keys ({}) → one field of {} B",
        keys_before.len(),
        keys_before.join(", "),
        entry.len()
    );

    // Still read back by name; no longer in the list.
    let one = request(api, "GET", "/api/v1/campaigns/old", &[AUTH], b"");
    assert_eq!(one.status, 200, "{}", one.text());
    let one: Value = serde_json::from_slice(&one.body).unwrap();
    assert_eq!(
        (one["delivered"].as_i64(), one["accepted"].as_i64()),
        (Some(3), Some(3))
    );
    let list = request(api, "GET", "/api/v1/campaigns", &[AUTH], b"");
    let list: Value = serde_json::from_slice(&list.body).unwrap();
    let names: Vec<&str> = list["campaigns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["campaign"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["kept"], "{list}");
    let page = request(api, "GET", "/campaigns/old", &[AUTH], b"");
    assert_eq!(page.status, 200);

    // Sent again: new counters, added to the archived ones.
    let again: Vec<String> = jobs(5, "old", "y.test")
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i >= 3)
        .map(|(_, j)| j.replace("\"old-", "\"again-"))
        .collect();
    enqueue_raw(&mut conn, &p, &again);
    wait_terminal(&mut conn, &p, 6, Duration::from_secs(30), Some(&daemon));
    let one = request(api, "GET", "/api/v1/campaigns/old", &[AUTH], b"");
    let one: Value = serde_json::from_slice(&one.body).unwrap();
    assert_eq!(one["delivered"], 5, "{one}");
}

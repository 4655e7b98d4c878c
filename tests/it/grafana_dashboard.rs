//! The Grafana dashboard (config/grafana/paloma.json) against a running daemon: every metric
//! a panel queries is exported by /metrics after a little real traffic (deliveries of a
//! campaign in an experiment, a click, a workflow follow-up, an API call), and the document
//! is one Grafana imports (unique panel ids, panels inside the 24-column grid, the
//! Prometheus data source as a variable).

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::track::{captured, request, MAIL_UA};
use common::*;
use serde_json::Value;

const TOKEN: &str = "dash-token-8c1f4e0a29b7d653";

/// The `paloma_…` metric names in a PromQL expression (a histogram's `_bucket` series
/// named by its family).
fn metric_names(expr: &str, out: &mut BTreeSet<String>) {
    let mut rest = expr;
    while let Some(i) = rest.find("paloma_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        out.insert(name.strip_suffix("_bucket").unwrap_or(name).to_string());
        rest = &tail[end..];
    }
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/grafana/paloma.json"),
    )
    .unwrap();
    let dash: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(dash["uid"], "paloma");
    assert_eq!(dash["templating"]["list"][0]["query"], "prometheus");
    let panels = dash["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut names = BTreeSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_i64().unwrap()), "duplicate id: {p}");
        let g = &p["gridPos"];
        assert!(
            g["x"].as_i64().unwrap() + g["w"].as_i64().unwrap() <= 24,
            "{p}"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{p}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{p}");
        for t in targets {
            metric_names(t["expr"].as_str().unwrap(), &mut names);
        }
    }
    assert!(names.len() >= 30, "{names:?}");

    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let (track, metrics, api) = (free_port(), free_port(), free_port());
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        "",
        &format!(
            r#"listen = "127.0.0.1:{track}"
[metrics]
listen = "127.0.0.1:{metrics}"
[api]
listen = "127.0.0.1:{api}"
token = "{TOKEN}"
[[domains]]
match = "dash.test"
rate = "1000/s"
[[experiments]]
campaign = "dash"
variants = [ {{ name = "a" }}, {{ name = "b" }} ]
test_share = "100%"
decide_after = "1h"
fallback = "a"
[[workflows]]
name = "dash-follow"
campaign = "dash"
on = "clicked"
send = {{ template = "followup", campaign = "dash-follow" }}
"#
        ),
    );
    let daemon = Daemon::spawn(&setup.config);
    let mut conn = redis.conn();
    let jobs: Vec<String> = (0..3)
        .map(|i| {
            job(
                &format!("dash-{i}"),
                "dash",
                "newsletter",
                &format!("p{i}@dash.test"),
                newsletter_data("Ana"),
            )
        })
        .collect();
    enqueue_raw(&mut conn, &setup.prefix, &jobs);
    wait_terminal(
        &mut conn,
        &setup.prefix,
        3,
        Duration::from_secs(30),
        Some(&daemon),
    );
    sink.wait_count(3, Duration::from_secs(10));
    let mails = captured(&sink, "https://t.shop.test");
    let link = mails["dash-0"]
        .clicks
        .iter()
        .find(|c| !c.is_empty())
        .unwrap()
        .clone();
    let r = request(track, "GET", &link, &[("User-Agent", MAIL_UA)], b"");
    assert_eq!(r.status, 302);
    wait_terminal(
        &mut conn,
        &setup.prefix,
        4,
        Duration::from_secs(30),
        Some(&daemon),
    );
    let a = request(
        api,
        "GET",
        "/api/v1/campaigns",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        b"",
    );
    assert_eq!(a.status, 200);
    // The person who clicked buys; someone who never clicked too (unattributed).
    let c = request(
        api,
        "POST",
        "/api/v1/conversions",
        &[
            ("Authorization", &format!("Bearer {TOKEN}")),
            ("Content-Type", "application/json"),
        ],
        br#"[{"id": "dash-order", "to": "p0@dash.test", "value": 25, "currency": "EUR"},
             {"id": "dash-order-2", "to": "nobody@dash.test", "value": 5, "currency": "EUR"}]"#,
    );
    assert_eq!(c.status, 200, "{}", c.text());
    assert!(c.text().contains("\"campaign\":\"dash\""), "{}", c.text());

    let exported = metrics_text(metrics);
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !exported.contains(&format!("# TYPE {n} ")))
        .collect();
    assert!(
        missing.is_empty(),
        "queried by the dashboard, not in /metrics: {missing:?}"
    );
}

//! Several daemons on one Redis: they share the consumer group (each job is sent once) and a
//! `[[domains]]` rate bounds them together (`delivery.shared_rates`, on by default), not
//! each of them.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

fn jobs(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            job(
                &format!("fleet-{i}"),
                "fleet",
                "receipt",
                &format!("u{i}@rate.test"),
                json!({"name": "F", "order_id": i}),
            )
        })
        .collect()
}

#[test]
fn two_daemons_share_one_domain_rate() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        // Small reads, so that both daemons take jobs from the stream.
        "batch = 2",
        "[[domains]]\nmatch = \"rate.test\"\nrate = \"5/s\"\n",
    );
    let mut conn = redis.conn();
    let n = 30;
    enqueue_raw(&mut conn, &setup.prefix, &jobs(n));
    let a = Daemon::spawn(&setup.config);
    let b = Daemon::spawn(&setup.config);
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        n,
        Duration::from_secs(60),
        Some(&a),
    );
    let by_id = terminal_by_id(&evs);
    assert_eq!(by_id.len(), n);
    assert!(by_id
        .values()
        .all(|t| t.len() == 1 && t[0]["type"] == "delivered"));
    assert_eq!(sink.count(), n, "each job sent once");
    let consumers: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(format!("{}sends", setup.prefix))
        .arg("paloma")
        .query(&mut conn)
        .unwrap();
    assert_eq!(consumers.len(), 2, "both daemons read from the group");

    let mut at: Vec<_> = evs
        .iter()
        .filter(|e| e["type"] == "delivered")
        .map(|e| chrono::DateTime::parse_from_rfc3339(e["at"].as_str().unwrap()).unwrap())
        .collect();
    at.sort();
    // 30 at 5/s for the pair: a burst of 5, then 25 at 200 ms: about 5 s. Two separate
    // limiters would allow 10/s: about 2 s.
    let span = (at[n - 1] - at[0]).num_milliseconds();
    assert!(span >= 4_000, "30 messages at 5/s took only {span} ms");
    // In any second: the burst and one second's worth, and one for the edges.
    let most = at
        .iter()
        .map(|t| {
            at.iter()
                .filter(|u| **u >= *t && (**u - *t).num_milliseconds() < 1000)
                .count()
        })
        .max()
        .unwrap();
    assert!(most <= 11, "{most} messages within one second");
    drop((a, b));
}

//! A `[[domains]]` rate in MX mode paces that domain only, not another one on the same
//! MX host.

use crate::common;

use std::time::Duration;

use common::mx::*;
use common::*;

#[test]
fn a_rate_limited_domain_is_paced() {
    let _machine = exclusive();
    let e = env(
        &[
            "mx-host=rate.test,mx.rate.test,10",
            "host-record=mx.rate.test,127.0.0.8",
            "mx-host=free.test,mx.rate.test,10",
        ],
        &[("127.0.0.8", &[])],
        "",
        "[[domains]]\nmatch = \"rate.test\"\nrate = \"5/s\"\n",
    );
    let mut conn = e.redis.conn();
    let to: Vec<String> = (0..20).map(|i| format!("u{i}@rate.test")).collect();
    let free: Vec<String> = (0..20).map(|i| format!("u{i}@free.test")).collect();
    enqueue_raw(&mut conn, &e.setup.prefix, &jobs_to("rate", &to));
    enqueue_raw(&mut conn, &e.setup.prefix, &jobs_to("free", &free));
    let daemon = Daemon::spawn(&e.setup.config);
    let evs = wait_terminal(
        &mut conn,
        &e.setup.prefix,
        40,
        Duration::from_secs(60),
        Some(&daemon),
    );
    let times = |c: &str| -> Vec<i64> {
        let mut v: Vec<i64> = evs
            .iter()
            .filter(|v| v["type"] == "delivered" && v["campaign"] == c)
            .map(at_ms)
            .collect();
        v.sort();
        v
    };
    let rate = times("rate");
    let free_t = times("free");
    assert_eq!((rate.len(), free_t.len()), (20, 20));
    let span = rate[19] - rate[0];
    // 20 messages at 5/s: a burst of 5, then one every 200 ms, the last 3 s after the first
    // (one interval allowed for the first and last deliveries' own spread).
    let least = (20 - 5 - 1) * 200;
    assert!(
        span >= least,
        "rate.test deliveries spanned only {span} ms, at least {least} ms"
    );
    // The limited domain did not hold up the other one sharing the same MX host.
    let free_span = free_t[19] - free_t[0];
    assert!(
        free_span < span,
        "free.test took {free_span} ms, rate.test {span} ms"
    );
    // Pacing holds jobs back; it never defers or fails one: each ends delivered, once.
    let by_id = terminal_by_id(&evs);
    assert_eq!(by_id.len(), 40);
    assert!(
        by_id
            .values()
            .all(|t| t.len() == 1 && t[0]["type"] == "delivered"),
        "{by_id:?}"
    );
    assert!(
        !evs.iter().any(|v| v["type"] == "deferred"),
        "no job deferred by pacing: {evs:?}"
    );
}

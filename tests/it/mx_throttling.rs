//! An MX that defers: 4xx recovers through retries; a 421 suspends the whole site rather
//! than retrying job by job; a `[[backoff]]` rule lowers the site's rate instead.

use crate::common;

use std::time::Duration;

use common::mx::*;
use common::*;

#[test]
fn a_deferring_domain_recovers_and_a_421_suspends_its_site() {
    let metrics = free_port();
    let mut e = env(
        &[
            "mx-host=soft.test,mx.soft.test,10",
            "host-record=mx.soft.test,127.0.0.6",
            "mx-host=busy.test,mx.busy.test,10",
            "host-record=mx.busy.test,127.0.0.7",
        ],
        &[
            ("127.0.0.6", &["-r", "RCPT"]),
            ("127.0.0.7", &["-Q", "RCPT"]),
        ],
        "retry_intervals = [\"1s\"]\nthrottle_suspend = \"3s\"",
        &format!("[metrics]\nlisten = \"127.0.0.1:{metrics}\""),
    );
    let mut conn = e.redis.conn();
    enqueue_raw(
        &mut conn,
        &e.setup.prefix,
        &jobs_to("s", &["a@soft.test", "b@soft.test"]),
    );
    enqueue_raw(
        &mut conn,
        &e.setup.prefix,
        &jobs_to("q", &["a@busy.test", "b@busy.test", "c@busy.test"]),
    );
    let daemon = Daemon::spawn(&e.setup.config);
    wait_until_daemon(
        "deferrals of both domains",
        Duration::from_secs(20),
        &daemon,
        || {
            let evs = events(&mut conn, &e.setup.prefix);
            let deferred = |c: &str| {
                evs.iter()
                    .filter(|v| v["type"] == "deferred" && v["campaign"] == c)
                    .count()
            };
            deferred("s") >= 2 && deferred("q") >= 1
        },
    );
    assert!(
        daemon
            .log_text()
            .contains("throttled: suspending the destination"),
        "{}",
        daemon.log_text()
    );
    e.sinks.get_mut("127.0.0.6").unwrap().restart(&[]);
    e.sinks.get_mut("127.0.0.7").unwrap().restart(&[]);
    let evs = wait_terminal(
        &mut conn,
        &e.setup.prefix,
        5,
        Duration::from_secs(30),
        Some(&daemon),
    );
    for id in ["s-0", "s-1", "q-0", "q-1", "q-2"] {
        assert_eq!(terminal(&evs, id)["type"], "delivered", "{id}");
    }
    // While busy.test's site was suspended, its jobs were not attempted job by job: their
    // retries (due after 1 s, inside the 3 s suspension) were put back without a session
    // (counted), and no job met the 421 twice.
    let put_back: f64 = metrics_text(metrics)
        .lines()
        .filter(|l| l.starts_with("paloma_suspended_delays_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(put_back >= 1.0, "no job was held back by the suspension");
    for id in ["q-0", "q-1", "q-2"] {
        let deferrals = evs
            .iter()
            .filter(|v| v["type"] == "deferred" && v["id"] == id)
            .count();
        assert!(deferrals <= 1, "{id} was deferred {deferrals} times");
    }
}

#[test]
fn a_backoff_rule_can_lower_a_sites_rate_instead_of_suspending_it() {
    let mut e = env(
        &[
            "mx-host=slow.test,mx.slow.test,10",
            "host-record=mx.slow.test,127.0.0.9",
        ],
        &[(
            "127.0.0.9",
            &[
                "-r",
                "RCPT",
                "-b",
                "452 4.5.3 Too much mail, slow down please",
            ],
        )],
        "retry_intervals = [\"1s\"]",
        "[[backoff]]\ncode = \"452\"\nslow_to = \"2/s\"\nslow_for = \"1m\"\n",
    );
    let mut conn = e.redis.conn();
    enqueue_raw(
        &mut conn,
        &e.setup.prefix,
        &jobs_to("first", &["a@slow.test"]),
    );
    let daemon = Daemon::spawn(&e.setup.config);
    wait_until_daemon("a deferral", Duration::from_secs(20), &daemon, || {
        events(&mut conn, &e.setup.prefix)
            .iter()
            .any(|v| v["type"] == "deferred")
    });
    assert!(
        daemon
            .log_text()
            .contains("lowering the destination's rate"),
        "{}",
        daemon.log_text()
    );
    e.sinks.get_mut("127.0.0.9").unwrap().restart(&[]);
    let to: Vec<String> = (0..10).map(|i| format!("u{i}@slow.test")).collect();
    enqueue_raw(&mut conn, &e.setup.prefix, &jobs_to("paced", &to));
    let evs = wait_terminal(
        &mut conn,
        &e.setup.prefix,
        11,
        Duration::from_secs(60),
        Some(&daemon),
    );
    let at: Vec<i64> = evs
        .iter()
        .filter(|v| v["type"] == "delivered" && v["campaign"] == "paced")
        .map(at_ms)
        .collect();
    assert_eq!(at.len(), 10);
    let span = at.iter().max().unwrap() - at.iter().min().unwrap();
    // 10 messages at 2/s after a burst of 2: one every 500 ms, the last 4 s after the first
    // (one interval allowed for the first and last deliveries' own spread).
    let least = (10 - 2 - 1) * 500;
    assert!(
        span >= least,
        "the lowered rate held for only {span} ms, at least {least} ms"
    );
}

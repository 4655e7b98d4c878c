//! `[[backoff]]` rules as the fleet applies them: a `trigger` makes a rule act only on its
//! Nth matching reply within the period, and a lowered rate (`slow_to`) is one budget for
//! every daemon, not one each. The receiver is aiosmtpd answering its first RCPTs
//! `421 4.7.28` and recording when each message arrived.

use crate::common;

use std::time::Duration;

use common::mx::Recorder;
use common::*;

fn deferred_times(conn: &mut redis::Connection, prefix: &str) -> Vec<f64> {
    let mut t: Vec<f64> = events(conn, prefix)
        .iter()
        .filter(|e| e["type"] == "deferred")
        .map(|e| at_ms(e) as f64 / 1000.0)
        .collect();
    t.sort_by(f64::total_cmp);
    t
}

#[test]
fn a_trigger_acts_on_the_third_matching_reply_only() {
    let _machine = exclusive();
    let redis = Redis::start();
    let port = free_port();
    let relay = Recorder::start("127.0.0.1", port, "throttle-3");
    let setup = Setup::new(
        &redis.url(),
        port,
        "retry_intervals = [\"1s\"]",
        "",
        "[[backoff]]\ncode = \"421\"\ntrigger = \"3/10m\"\nsuspend = \"4s\"\n\
         [[domains]]\nmatch = \"*\"\nrate = \"20/s\"\n",
    );
    let mut conn = redis.conn();
    let n = 60;
    enqueue_raw(&mut conn, &setup.prefix, &jobs(n, "trig", "trig.test"));
    let daemon = Daemon::spawn(&setup.config);
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        n,
        Duration::from_secs(60),
        Some(&daemon),
    );
    assert_delivered_once(&evs, n);
    let d = deferred_times(&mut conn, &setup.prefix);
    assert_eq!(d.len(), 3, "{d:?}");
    // Neither of the first two suspended anything: the third came right after them.
    assert!(d[2] - d[0] < 1.0, "the 421s came {d:?}");
    // The third did: nothing reached the receiver for the 4 s after it.
    let kept = relay.kept();
    assert_eq!(kept.len(), n);
    let inside: Vec<f64> = kept
        .iter()
        .map(|k| k.at - d[2])
        .filter(|x| (0.5..3.8).contains(x))
        .collect();
    assert!(inside.is_empty(), "sent {inside:?} s after the third 421");
    assert!(kept.iter().any(|k| k.at - d[2] >= 3.8), "sending resumed");
}

#[test]
fn a_lowered_rate_is_one_budget_for_the_whole_fleet() {
    let _machine = exclusive();
    let redis = Redis::start();
    let port = free_port();
    let relay = Recorder::start("127.0.0.1", port, "throttle-once");
    let setup = Setup::new(
        &redis.url(),
        port,
        "retry_intervals = [\"1s\"]",
        "",
        "[[backoff]]\ncode = \"421\"\nslow_to = \"3/s\"\nslow_for = \"1m\"\n\
         [[domains]]\nmatch = \"*\"\nrate = \"20/s\"\n",
    );
    let mut conn = redis.conn();
    let n = 60;
    enqueue_raw(&mut conn, &setup.prefix, &jobs(n, "slow", "slow.test"));
    let a = Daemon::spawn(&setup.config);
    let b = Daemon::spawn(&setup.config);
    let first = wait_for_daemon("the 421", Duration::from_secs(30), &a, || {
        deferred_times(&mut conn, &setup.prefix).first().copied()
    });
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        n,
        Duration::from_secs(90),
        Some(&b),
    );
    assert_delivered_once(&evs, n);
    let kept = relay.kept();
    assert_eq!(kept.len(), n);
    // From a second and a half after the 421 (every daemon has read the lowered rate),
    // 3 s at 3/s for the fleet: 9, and a burst of 3. (A daemon that kept its own rate, or
    // went on at the domain's 20/s, sends most of the 60 in that time.)
    let window = kept
        .iter()
        .filter(|k| (1.5..4.5).contains(&(k.at - first)))
        .count();
    assert!(
        window <= 13,
        "{window} messages in 3 s: not one lowered rate for the fleet"
    );
    assert!(
        window >= 5,
        "{window}: the lowered rate still lets mail through"
    );
}

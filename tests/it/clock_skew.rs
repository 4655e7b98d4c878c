//! A daemon whose clock is off: due times follow the Redis server's clock, not the host's.
//! The daemon runs under libfaketime (Debian package faketime, which `scripts/install-test-peers` installs) ten
//! minutes ahead of or behind the Redis server (which the test's own clock matches), and a
//! `send_at` job still goes out at its time, not ten minutes early or late, and a retry's
//! `retry_at` and every event's `at` are on the server's clock.

use crate::common;

use std::time::Duration;

use common::*;
use serde_json::json;

/// The daemon with its clock `skew` seconds off (only the wall clock: timers and sleeps run
/// on the monotonic one, as on a host whose NTP is wrong).
fn skewed_daemon(setup: &Setup, skew: &str) -> Daemon {
    require(FAKETIME);
    Daemon::spawn_env(
        &setup.config,
        &[
            ("LD_PRELOAD", LIBFAKETIME),
            ("FAKETIME", skew),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
            ("FAKETIME_DONT_RESET", "1"),
        ],
    )
}

/// The Redis server's clock, ms.
fn redis_ms(conn: &mut redis::Connection) -> i64 {
    let (s, us): (i64, i64) = redis::cmd("TIME").query(conn).unwrap();
    s * 1000 + us / 1000
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn ms_of(s: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(s)
        .unwrap()
        .timestamp_millis()
}

/// Enqueues one receipt job `id` with `send_at` at `at` ms.
fn enqueue_at(conn: &mut redis::Connection, prefix: &str, id: &str, at: i64) {
    let j = json!({"id": id, "campaign": "skew", "template": "receipt", "to": format!("{id}@dest.test"),
        "send_at": rfc3339(at), "data": {"name": "R", "order_id": 1}});
    enqueue_raw(conn, prefix, &[j.to_string()]);
}

/// Waits for the `send_at` job `id` due at `due` (server ms): nothing at the sink before it,
/// delivered within a few seconds after it.
fn delivered_on_time(
    conn: &mut redis::Connection,
    setup: &Setup,
    sink: &Sink,
    id: &str,
    due: i64,
    daemon: &Daemon,
) {
    let before = sink.count();
    let delivered = wait_for_daemon(
        &format!("{id} delivered"),
        Duration::from_secs(30),
        daemon,
        || {
            let now = redis_ms(conn);
            let evs = events(conn, &setup.prefix);
            let e = evs.into_iter().find(|e| e["id"] == id && is_terminal(e));
            if e.is_none() && now < due {
                assert_eq!(
                    sink.count(),
                    before,
                    "{id} reached the sink before its send_at"
                );
            }
            e
        },
    );
    assert_eq!(delivered["type"], "delivered", "{delivered}");
    let at = at_ms(&delivered);
    assert!(
        at >= due,
        "{id} delivered at {at}, before its send_at {due}"
    );
    assert!(
        at < due + 5_000,
        "{id} delivered at {at}, more than 5 s after its send_at {due}"
    );
}

#[test]
fn a_daemon_behind_the_server_sends_at_send_at_not_ten_minutes_late() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let setup = Setup::new(&redis.url(), sink.port, "", "", "");
    let mut conn = redis.conn();
    let daemon = skewed_daemon(&setup, "-600");

    let due = redis_ms(&mut conn) + 3_000;
    enqueue_at(&mut conn, &setup.prefix, "late", due);
    delivered_on_time(&mut conn, &setup, &sink, "late", due, &daemon);
}

#[test]
fn a_daemon_ahead_of_the_server_keeps_send_at_and_retries_on_the_servers_clock() {
    let redis = Redis::start();
    let port = free_port();
    let setup = Setup::new(&redis.url(), port, r#"retry_intervals = ["3s"]"#, "", "");
    let mut conn = redis.conn();
    let daemon = skewed_daemon(&setup, "+600");

    // Nothing listens at the relay yet: the job defers, due again 3 s (±10%) from now by
    // the server's clock.
    let t0 = redis_ms(&mut conn);
    enqueue_raw(&mut conn, &setup.prefix, &jobs(1, "retry", "dest.test"));
    let deferred = wait_for_daemon("the job deferred", Duration::from_secs(30), &daemon, || {
        events(&mut conn, &setup.prefix)
            .into_iter()
            .find(|e| e["type"] == "deferred")
    });
    let t1 = redis_ms(&mut conn);
    let at = at_ms(&deferred);
    assert!(
        t0 <= at && at <= t1,
        "event time {at} not within [{t0}, {t1}] of the server's clock"
    );
    let retry_at = ms_of(deferred["retry_at"].as_str().unwrap());
    assert!(
        at + 2_700 <= retry_at && retry_at <= at + 3_300,
        "retry_at {retry_at} is not 3 s ±10% after the attempt at {at}: {deferred}"
    );

    let sink = Sink::start_on("127.0.0.1", port, &[]);
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        1,
        Duration::from_secs(30),
        Some(&daemon),
    );
    let done = evs.iter().find(|e| is_terminal(e)).unwrap();
    assert_eq!(done["type"], "delivered", "{done}");
    assert!(
        at_ms(done) >= retry_at,
        "retried before its retry_at: {evs:?}"
    );

    // A send_at 3 s ahead is not yet due, though the daemon's clock is past it.
    let due = redis_ms(&mut conn) + 3_000;
    enqueue_at(&mut conn, &setup.prefix, "early", due);
    delivered_on_time(&mut conn, &setup, &sink, "early", due, &daemon);
}

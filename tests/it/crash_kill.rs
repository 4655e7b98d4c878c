//! Shutdown and crashes: SIGTERM drains and exits 0 within 10 s; a daemon killed with
//! SIGKILL mid-campaign leaves its pending jobs to a restarted one, and every job still ends
//! in exactly one terminal event; a Redis restart mid-campaign loses nothing.

use crate::common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;

/// The test config with a metrics endpoint on a port of its own: (config, metrics port).
fn with_metrics(setup: &Setup) -> (PathBuf, u16) {
    let port = free_port();
    let path = setup.path("metrics.toml");
    let base = std::fs::read_to_string(&setup.config).unwrap();
    std::fs::write(
        &path,
        format!("{base}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    )
    .unwrap();
    (path, port)
}

/// Waits until the daemon behind `mport` has SMTP sessions open (mail in flight).
fn wait_sessions_open(mport: u16, daemon: &Daemon) {
    wait_until_daemon(
        "SMTP sessions in flight",
        Duration::from_secs(20),
        daemon,
        || metric(mport, "paloma_smtp_sessions_open") >= 1.0,
    );
}

#[test]
fn sigterm_drains_in_flight_jobs_and_exits_zero() {
    let _machine = exclusive();
    let redis = Redis::start();
    // Each DATA answer waits 1 s, so sessions are in flight when SIGTERM arrives.
    let mut sink = Sink::start(&["-w", "1"]);
    let setup = Setup::new(&redis.url(), sink.port, "", "", "");
    let (config, mport) = with_metrics(&setup);
    let mut conn = redis.conn();
    let n = 400;
    enqueue_raw(&mut conn, &setup.prefix, &jobs(n, "term", "crash.test"));
    let mut daemon = Daemon::spawn(&config);
    wait_until("paloma running", Duration::from_secs(20), || {
        daemon.log_text().contains("paloma running")
    });
    wait_sessions_open(mport, &daemon);
    let t0 = Instant::now();
    daemon.signal("TERM");
    let status = daemon
        .wait(Duration::from_secs(10))
        .expect("exited within 10 s of SIGTERM");
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        daemon.log_text()
    );
    assert!(t0.elapsed() < Duration::from_secs(10));
    let log = daemon.log_text();
    assert!(log.contains("shutting down"), "{log}");

    // Everything the sink accepted has its delivered event: in-flight sessions finished and
    // their outcomes were written before exit.
    let evs = events(&mut conn, &setup.prefix);
    let recorded: HashSet<String> = evs
        .iter()
        .filter(|e| e["type"] == "delivered")
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert!(!recorded.is_empty(), "some mail was in flight");
    // The sink has dumped whatever it accepted before the daemon saw its 250.
    sink.wait_count(recorded.len(), Duration::from_secs(10));
    let sent: HashSet<String> = sink.ids().into_iter().collect();
    assert_eq!(
        sent, recorded,
        "every accepted message was recorded before exit"
    );
    assert!(recorded.len() < n, "the test needs work left over");

    // A new daemon finishes the rest (the sink no longer stalls); nothing is sent twice.
    sink.restart(&[]);
    let daemon2 = Daemon::spawn(&setup.config);
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        n,
        Duration::from_secs(120),
        Some(&daemon2),
    );
    let by_id = terminal_by_id(&evs);
    assert_eq!(by_id.len(), n);
    assert!(by_id.values().all(|t| t.len() == 1));
    sink.wait_count(n, Duration::from_secs(10));
    let ids = sink.ids();
    let unique: HashSet<&String> = ids.iter().collect();
    let missing: Vec<_> = by_id
        .keys()
        .filter(|k| !unique.contains(k))
        .take(5)
        .collect();
    assert_eq!(
        unique.len(),
        n,
        "every job reached the sink; missing e.g. {missing:?}"
    );
    assert_eq!(ids.len(), n, "no duplicates after a drained shutdown");
}

#[test]
fn a_killed_daemons_pending_jobs_are_picked_up_by_a_restarted_one() {
    let _machine = exclusive();
    let redis = Redis::start();
    let mut sink = Sink::start(&["-w", "1"]);
    let setup = Setup::new(&redis.url(), sink.port, "", "", "");
    let (config, mport) = with_metrics(&setup);
    let mut conn = redis.conn();
    let n = 300;
    enqueue_raw(&mut conn, &setup.prefix, &jobs(n, "kill", "crash.test"));
    let mut daemon = Daemon::spawn(&config);
    wait_until("some pending entries", Duration::from_secs(20), || {
        pending(&mut conn, &setup.prefix) > 0
    });
    // Killed with sessions in the middle of a transaction, not merely with jobs read.
    wait_sessions_open(mport, &daemon);
    daemon.kill9();
    sink.restart(&[]);

    // claim_idle is 3 s in the test config: the new daemon reclaims what the dead one held.
    let daemon2 = Daemon::spawn(&setup.config);
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        n,
        Duration::from_secs(120),
        Some(&daemon2),
    );
    let by_id = terminal_by_id(&evs);
    assert_eq!(by_id.len(), n, "every job ended");
    for (id, t) in &by_id {
        assert_eq!(t.len(), 1, "{id}: exactly one terminal event, got {t:?}");
        assert_eq!(t[0]["type"], "delivered");
    }
    sink.wait_count(n, Duration::from_secs(10));
    let sent: HashSet<String> = sink.ids().into_iter().collect();
    assert_eq!(sent.len(), n, "every job reached the sink (at least once)");
    assert!(
        daemon2.log_text().contains("reclaimed"),
        "{}",
        daemon2.log_text()
    );
}

#[test]
fn a_redis_restart_mid_campaign_loses_nothing() {
    let _machine = exclusive();
    let mut redis = Redis::start();
    let sink = Sink::start(&[]);
    let setup = Setup::new(&redis.url(), sink.port, "", "", "");
    let (config, mport) = with_metrics(&setup);
    let mut conn = redis.conn();
    let n = 3000;
    enqueue_raw(&mut conn, &setup.prefix, &jobs(n, "rr", "crash.test"));
    let daemon = Daemon::spawn(&config);
    wait_until("progress", Duration::from_secs(30), || {
        events(&mut conn, &setup.prefix)
            .iter()
            .filter(|e| is_terminal(e))
            .count()
            > 200
    });
    let errors = metric(mport, "paloma_redis_errors_total");
    redis.kill();
    // Down until the daemon has run into it, then back.
    wait_until(
        "the daemon noticing Redis gone",
        Duration::from_secs(30),
        || metric(mport, "paloma_redis_errors_total") > errors,
    );
    redis.restart();
    let mut conn = redis.conn();
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        n,
        Duration::from_secs(120),
        Some(&daemon),
    );
    let by_id = terminal_by_id(&evs);
    assert_eq!(by_id.len(), n, "every job ended after the Redis restart");
    sink.wait_count(n, Duration::from_secs(10));
    let ids: HashSet<String> = sink.ids().into_iter().collect();
    assert_eq!(ids.len(), n);
    assert!(
        by_id
            .values()
            .all(|t| t.iter().all(|e| e["type"] == "delivered")),
        "only delivered events"
    );
}

/// Issue 21, point 4: a daemon frozen (SIGSTOP) longer than `claim_idle` loses its entries
/// to the other daemon, which sends them again (at-least-once, accepted). When it wakes,
/// its SMTP replies arrive and its recorder would write a second terminal event for each
/// of those jobs. The write is fenced: only entries it still holds are recorded, the rest
/// are dropped and counted. Every job ends exactly once.
#[test]
fn a_frozen_daemon_does_not_end_a_reclaimed_job_twice() {
    let _machine = exclusive();
    let redis = Redis::start();
    // Each DATA answer waits 1 s: the frozen daemon holds sessions and entries in flight.
    let sink = Sink::start(&["-w", "1"]);
    let setup = Setup::new(&redis.url(), sink.port, "", "", "");
    let (config_a, mport_a) = with_metrics(&setup);
    let mut conn = redis.conn();
    let n = 240;
    enqueue_raw(&mut conn, &setup.prefix, &jobs(n, "freeze", "freeze.test"));
    let mut a = Daemon::spawn(&config_a);
    wait_sessions_open(mport_a, &a);
    let b = Daemon::spawn(&setup.config);
    wait_until_daemon("B delivering", Duration::from_secs(20), &b, || {
        terminal_events(&mut conn, &setup.prefix).len() >= 24
    });
    a.signal("STOP");
    // B reclaims what A held once it has been idle for claim_idle (3 s), sends it again
    // and ends every job.
    wait_until_daemon("every job ended by B", Duration::from_secs(120), &b, || {
        sends_drained(&mut conn, &setup.prefix)
    });
    a.signal("CONT");
    // A's late SMTP replies come in and its recorder tries to write their outcomes.
    // Either its recorder drops them (fenced) or, as before the fix, writes them again.
    let ended_twice = |conn: &mut redis::Connection| {
        terminal_by_id(&terminal_events(conn, &setup.prefix))
            .values()
            .any(|e| e.len() > 1)
    };
    wait_until_daemon(
        "A's stale outcomes handled",
        Duration::from_secs(30),
        &a,
        || metric(mport_a, "paloma_outcomes_fenced_total") >= 1.0 || ended_twice(&mut conn),
    );
    wait_until_daemon("A idle", Duration::from_secs(30), &a, || {
        metric(mport_a, "paloma_in_flight") == 0.0
    });
    let evs = terminal_events(&mut conn, &setup.prefix);
    let by_id = terminal_by_id(&evs);
    let twice: Vec<&String> = by_id
        .iter()
        .filter(|(_, e)| e.len() > 1)
        .map(|(id, _)| id)
        .collect();
    assert!(
        twice.is_empty(),
        "{} jobs ended twice: {twice:?}",
        twice.len()
    );
    assert_eq!(by_id.len(), n, "every job ended");
    eprintln!(
        "freeze: {n} jobs, {} ended once, {} outcomes fenced on the frozen daemon, {} messages at the sink",
        by_id.len(),
        metric(mport_a, "paloma_outcomes_fenced_total"),
        sink.count()
    );
    drop(b);
    a.kill9();
}

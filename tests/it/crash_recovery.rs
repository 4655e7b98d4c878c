//! Recovery with the default `claim_idle`: a campaign survives two SIGKILLed daemons, a
//! Redis restart (AOF) and its SMTP sink gone for 3 s. Each killed daemon's in-flight jobs
//! are picked up by the next daemon within 30 s, every job ends in exactly one terminal
//! event, duplicates stay within what was in flight, and the dead consumers are removed
//! from the group.

use crate::common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::track::stat;
use common::*;
use serde_json::json;

#[test]
fn two_kills_a_redis_restart_and_a_sink_outage_lose_nothing_and_recover_within_30s() {
    let _machine = exclusive();
    let mut redis = Redis::start();
    let mut sink = Sink::start(&[]);
    // The test config's claim_idle = "3s" is removed: this runs with the default.
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "retry_intervals = [\"2s\"]",
        "",
        "",
    );
    let cfg = std::fs::read_to_string(&setup.config)
        .unwrap()
        .replace("claim_idle = \"3s\"\n", "");
    std::fs::write(&setup.config, cfg).unwrap();
    let mut conn = redis.conn();
    let n = 3000;
    let jobs: Vec<String> = (0..n)
        .map(|i| {
            job(
                &format!("k{i}"),
                "kill",
                "receipt",
                &format!("k{i}@crash.test"),
                json!({"name": "K"}),
            )
        })
        .collect();
    enqueue_raw(&mut conn, &setup.prefix, &jobs);
    let delivered = |conn: &mut redis::Connection| stat(conn, &setup.prefix, "kill", "delivered");

    let mut recovery = Vec::new();
    let mut daemon = Daemon::spawn(&setup.config);
    for (round, until) in [(1, 300), (2, 1200)] {
        wait_until(
            "deliveries before the kill",
            Duration::from_secs(60),
            || delivered(&mut conn) >= until,
        );
        let held = pending(&mut conn, &setup.prefix);
        // Every consumer so far belongs to a daemon that is dead after this.
        let dead: Vec<String> = consumers(&mut conn, &setup.prefix)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert!(!dead.is_empty());
        daemon.kill9();
        let killed = Instant::now();
        // What the dead daemon held when it died: its pending entries, read before anyone
        // can reclaim them. The scenario is only worth its name if there were some.
        let in_flight: i64 = consumers(&mut conn, &setup.prefix)
            .into_iter()
            .filter(|(c, _)| dead.contains(c))
            .map(|(_, p)| p)
            .sum();
        assert!(
            in_flight > 0,
            "round {round}: no job was in flight at the kill"
        );
        if round == 2 {
            redis.restart();
            conn = redis.conn();
        }
        daemon = Daemon::spawn(&setup.config);
        // The next daemon (a new consumer) takes over what the killed ones held.
        wait_until(
            "the killed daemon's jobs reclaimed",
            Duration::from_secs(45),
            || {
                let now = consumers(&mut conn, &setup.prefix);
                !now.is_empty() && now.iter().all(|(n, p)| !dead.contains(n) || *p == 0)
            },
        );
        recovery.push((held.max(in_flight), killed.elapsed()));
    }
    // The sink goes away under the third daemon, until the daemon has run into it (a job
    // deferred for it).
    let deferred = stat(&mut conn, &setup.prefix, "kill", "deferred");
    sink.stop();
    wait_until(
        "a deferral while the sink is down",
        Duration::from_secs(30),
        || stat(&mut conn, &setup.prefix, "kill", "deferred") > deferred,
    );
    sink.restart(&[]);
    let last_fault = Instant::now();
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        n,
        Duration::from_secs(90),
        Some(&daemon),
    );
    let after_last_fault = last_fault.elapsed();
    let by_id = terminal_by_id(&evs);
    assert_eq!(by_id.len(), n);
    for (id, t) in &by_id {
        assert_eq!(t.len(), 1, "{id}: {t:?}");
        assert_eq!(t[0]["type"], "delivered", "{id}: {t:?}");
    }
    for (held, took) in &recovery {
        assert!(
            *took < Duration::from_secs(30),
            "{held} in-flight jobs took {took:?} to be picked up"
        );
    }
    // Duplicates: at most what the two killed daemons had in flight (intake.workers each).
    let mut ids = Vec::new();
    for raw in sink.dumps() {
        let text = String::from_utf8_lossy(&raw).into_owned();
        if let Some(l) = text.lines().find(|l| l.starts_with("X-Paloma-Id:")) {
            ids.push(l.trim_start_matches("X-Paloma-Id:").trim().to_string());
        }
    }
    let unique: HashSet<&String> = ids.iter().collect();
    let duplicates = ids.len() - unique.len();
    assert!(duplicates <= 2 * 64, "{duplicates} duplicates");
    // The dead consumers leave the group.
    wait_until("stale consumers removed", Duration::from_secs(40), || {
        consumers(&mut conn, &setup.prefix).len() == 1
    });
    println!(
        "recovery {recovery:?}; all {n} delivered {after_last_fault:?} after the last fault; {duplicates} duplicates (sink saw {} messages)",
        ids.len()
    );
}

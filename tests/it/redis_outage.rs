//! Redis unreachable for 10 s in the middle of a campaign: the daemon stays alive
//! (`/healthz`), says it is not ready (`/readyz` 503), loses nothing, and carries on once
//! Redis is back, every job ending in exactly one terminal event.

use crate::common;

use std::time::{Duration, Instant};

use common::track::get;
use common::*;
use serde_json::json;

fn try_get(port: u16, path: &str) -> Option<u16> {
    std::panic::catch_unwind(|| get(port, path, "curl").status).ok()
}

#[test]
fn ten_seconds_without_redis_lose_nothing() {
    let _machine = exclusive();
    let mut redis = Redis::start();
    let sink = Sink::start(&[]);
    let mport = free_port();
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        "",
        &format!("[metrics]\nlisten = \"127.0.0.1:{mport}\""),
    );
    let mut conn = redis.conn();
    let n = 2000;
    let jobs: Vec<String> = (0..n)
        .map(|i| {
            job(
                &format!("o{i}"),
                "outage",
                "receipt",
                &format!("o{i}@x.test"),
                json!({"name": "O"}),
            )
        })
        .collect();
    enqueue_raw(&mut conn, &setup.prefix, &jobs);
    let daemon = Daemon::spawn(&setup.config);
    wait_port("127.0.0.1", mport, Duration::from_secs(20));
    wait_until("some deliveries", Duration::from_secs(30), || {
        sink.count() >= 200
    });

    redis.kill();
    let down = Instant::now();
    let mut saw_not_ready = false;
    while down.elapsed() < Duration::from_secs(10) {
        assert_eq!(
            try_get(mport, "/healthz"),
            Some(200),
            "the daemon stays alive"
        );
        if try_get(mport, "/readyz") == Some(503) {
            saw_not_ready = true;
        }
        // Not a wait for a state: the outage lasts 10 s on purpose, probed every 200 ms.
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(saw_not_ready, "/readyz said ready without Redis");
    redis.restart();
    let mut conn = redis.conn();
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        n,
        Duration::from_secs(120),
        Some(&daemon),
    );
    let back = down.elapsed();
    let by_id = terminal_by_id(&evs);
    assert_eq!(by_id.len(), n, "every job ended");
    for (id, t) in &by_id {
        assert_eq!(t.len(), 1, "{id}: {t:?}");
        assert_eq!(t[0]["type"], "delivered", "{id}: {t:?}");
    }
    wait_until("ready again", Duration::from_secs(20), || {
        try_get(mport, "/readyz") == Some(200)
    });
    assert!(daemon.pid().is_some());
    println!(
        "all {n} delivered {back:?} after Redis went away; sink saw {} messages",
        sink.count()
    );
}

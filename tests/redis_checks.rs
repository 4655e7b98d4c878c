//! paloma looks at the Redis it is given: an evicting `maxmemory-policy` is refused at start
//! with what to change (or run with a warning when `redis.allow_eviction`), a Redis without
//! persistence is warned about, `/readyz` turns not ready when the policy changes under a
//! running daemon, and `paloma_redis_check{check}` says what passed.

mod common;

use std::time::Duration;

use common::track::get;
use common::*;

#[test]
fn an_evicting_or_volatile_redis_is_refused_or_reported() {
    // 1. allkeys-lru: refused at start, naming the setting.
    let redis = Redis::start_with(&["--maxmemory-policy", "allkeys-lru", "--appendonly", "yes"]);
    let sink = Sink::start(&[]);
    let setup = Setup::new(&redis.url(), sink.port, "", "", "");
    let mut d = Daemon::spawn(&setup.config);
    let st = d.wait(Duration::from_secs(20)).expect("exits");
    assert!(!st.success());
    let log = d.log_text();
    assert!(
        log.contains("maxmemory-policy noeviction") && log.contains("allkeys-lru"),
        "{log}"
    );

    // 2. allowed: it runs, warns, and says so in /readyz and the metric.
    let mport = free_port();
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        "",
        &format!("[metrics]\nlisten = \"127.0.0.1:{mport}\""),
    );
    let cfg = std::fs::read_to_string(&setup.config)
        .unwrap()
        .replace("[redis]\n", "[redis]\nallow_eviction = true\n");
    std::fs::write(&setup.config, cfg).unwrap();
    let d = Daemon::spawn(&setup.config);
    wait_port("127.0.0.1", mport, Duration::from_secs(20));
    let r = get(mport, "/readyz", "curl");
    assert_eq!(r.status, 200);
    assert!(
        r.text().contains("warning") && r.text().contains("allkeys-lru"),
        "{}",
        r.text()
    );
    let m = get(mport, "/metrics", "curl").text();
    assert!(
        m.contains("paloma_redis_check{check=\"eviction\"} 0"),
        "{m}"
    );
    assert!(m.contains("paloma_redis_check{check=\"version\"} 1"), "{m}");
    assert!(d.log_text().contains("maxmemory-policy"));
    drop(d);

    // 3. No persistence: a warning; a policy changed under a running daemon: not ready.
    let bare = Redis::start_with(&["--appendonly", "no", "--save", ""]);
    let mport = free_port();
    let setup = Setup::new(
        &bare.url(),
        sink.port,
        "",
        "",
        &format!("[metrics]\nlisten = \"127.0.0.1:{mport}\""),
    );
    let d = Daemon::spawn(&setup.config);
    wait_port("127.0.0.1", mport, Duration::from_secs(20));
    wait_until("ready", Duration::from_secs(10), || {
        get(mport, "/readyz", "curl").status == 200
    });
    let r = get(mport, "/readyz", "curl").text();
    assert!(r.contains("appendonly"), "{r}");
    let m = get(mport, "/metrics", "curl").text();
    assert!(
        m.contains("paloma_redis_check{check=\"persistence\"} 0"),
        "{m}"
    );
    let mut c = bare.conn();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("volatile-ttl")
        .query(&mut c)
        .unwrap();
    wait_until("/readyz not ready", Duration::from_secs(15), || {
        let r = get(mport, "/readyz", "curl");
        r.status == 503 && r.text().contains("volatile-ttl")
    });
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query(&mut c)
        .unwrap();
    wait_until("ready again", Duration::from_secs(15), || {
        get(mport, "/readyz", "curl").status == 200
    });
    drop(d);
}

//! MX mode does not trust the recipient's DNS too far: MX hosts on loopback, link-local
//! (169.254.169.254 included) or private addresses (RFC 1918, CGNAT) are never connected to
//! and bounce as a bad destination, unless `allowed_hosts` lets them in; only `mx_max_hosts` hosts are tried per attempt; one job holds a worker at
//! most `attempt_timeout` against a tarpit; a DNS server that is down defers, never bounces.
//! The tarpit (accepts, never greets) is a few lines here: no packaged server behaves so.

use crate::common;

use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

struct Env {
    redis: Redis,
    _dns: Option<Dns>,
    setup: Setup,
    port: u16,
}

fn env(records: &[String], delivery_extra: &str, dns_down: bool) -> Env {
    let redis = Redis::start();
    let port = free_port();
    let mut recs: Vec<String> = vec!["local=/test/".into()];
    recs.extend(records.iter().cloned());
    let (dns, ns_port) = if dns_down {
        (None, free_port())
    } else {
        let d = Dns::start(&recs);
        let p = d.port;
        (Some(d), p)
    };
    let setup = Setup::new(
        &redis.url(),
        port,
        &format!("mx_port = {port}\nnameservers = [\"127.0.0.1:{ns_port}\"]\n{delivery_extra}"),
        "",
        "",
    );
    let cfg = std::fs::read_to_string(&setup.config)
        .unwrap()
        .replace("mode = \"relay\"", "mode = \"mx\"");
    std::fs::write(&setup.config, cfg).unwrap();
    Env {
        redis,
        _dns: dns,
        setup,
        port,
    }
}

fn send(env: &Env, to: &[&str]) -> Vec<Value> {
    let mut conn = env.redis.conn();
    let jobs: Vec<String> = to
        .iter()
        .enumerate()
        .map(|(i, t)| job(&format!("j{i}"), "mx", "receipt", t, json!({"name": "M"})))
        .collect();
    enqueue_raw(&mut conn, &env.setup.prefix, &jobs);
    jobs.iter()
        .map(|j| serde_json::from_str(j).unwrap())
        .collect()
}

fn first_outcome(env: &Env, id: &str, daemon: &Daemon, timeout: Duration) -> Value {
    let mut conn = env.redis.conn();
    poll(timeout, || {
        events(&mut conn, &env.setup.prefix)
            .into_iter()
            .find(|e| e["id"] == id && (is_terminal(e) || e["type"] == "deferred"))
    })
    .unwrap_or_else(|| panic!("no outcome for {id}: {}", daemon.log_text()))
}

#[test]
fn loopback_and_link_local_mx_hosts_bounce_and_are_never_connected_to() {
    // Defaults: prohibited_hosts = loopback, link-local, "this host".
    let records = [
        "mx-host=loop.test,mx.loop.test,10".to_string(),
        "address=/mx.loop.test/127.0.0.2".to_string(),
        "mx-host=meta.test,mx.meta.test,10".to_string(),
        "address=/mx.meta.test/169.254.169.254".to_string(),
        "mx-host=mixed.test,mx1.mixed.test,10".to_string(),
        "mx-host=mixed.test,mx2.mixed.test,20".to_string(),
        "address=/mx1.mixed.test/127.0.0.9".to_string(),
        "address=/mx2.mixed.test/127.0.0.2".to_string(),
    ];
    let e = env(
        &records,
        "prohibited_hosts = [\"127.0.0.9/32\", \"169.254.0.0/16\"]",
        false,
    );
    let allowed = Sink::start_on("127.0.0.2", e.port, &[]);
    // Connections, not mail, are what "never connected to" counts.
    let banned = Arc::new(AtomicUsize::new(0));
    tarpit("127.0.0.9", e.port, banned.clone());
    send(&e, &["a@mixed.test", "b@meta.test"]);
    let d = Daemon::spawn(&e.setup.config);
    let mixed = first_outcome(&e, "j0", &d, Duration::from_secs(20));
    assert_eq!(mixed["type"], "delivered", "{mixed}");
    let meta = first_outcome(&e, "j1", &d, Duration::from_secs(20));
    assert_eq!(
        (
            meta["type"].as_str(),
            meta["enhanced"].as_str(),
            meta["class"].as_str()
        ),
        (Some("bounced"), Some("5.4.4"), Some("bad_domain")),
        "{meta}"
    );
    assert_eq!(allowed.count(), 1);
    assert_eq!(
        banned.load(Ordering::SeqCst),
        0,
        "a prohibited address was connected to"
    );
    drop(d);

    // With the default list, loopback itself is prohibited.
    let e = env(&records, "", false);
    let loopback = Arc::new(AtomicUsize::new(0));
    tarpit("127.0.0.2", e.port, loopback.clone());
    send(&e, &["c@loop.test"]);
    let d = Daemon::spawn(&e.setup.config);
    let o = first_outcome(&e, "j0", &d, Duration::from_secs(20));
    assert_eq!(
        (o["type"].as_str(), o["class"].as_str()),
        (Some("bounced"), Some("bad_domain")),
        "{o}"
    );
    assert!(
        o["response"].as_str().unwrap().contains("prohibited"),
        "{o}"
    );
    assert_eq!(
        loopback.load(Ordering::SeqCst),
        0,
        "loopback was connected to"
    );
}

/// Listens on `ip:port`, accepts and never says a word; counts connections.
fn tarpit(ip: &str, port: u16, hits: Arc<AtomicUsize>) {
    let l = TcpListener::bind((ip, port)).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            hits.fetch_add(1, Ordering::SeqCst);
            held.push(s);
        }
    });
}

#[test]
fn a_tarpit_domain_holds_a_worker_only_so_long_and_only_so_many_hosts_are_tried() {
    let _machine = exclusive();
    let mut records = Vec::new();
    for i in 0..6 {
        records.push(format!("mx-host=tar.test,mx{i}.tar.test,{}", 10 + i));
        records.push(format!("address=/mx{i}.tar.test/127.0.0.{}", 30 + i));
    }
    // Each greeting times out after 1 s; 3 hosts at most: deferred after about 3 s, with
    // only three of the six hosts contacted.
    let e = env(
        &records,
        "prohibited_hosts = []\nmx_max_hosts = 3\nattempt_timeout = \"60s\"",
        false,
    );
    let hits = Arc::new(AtomicUsize::new(0));
    for i in 0..6 {
        tarpit(&format!("127.0.0.{}", 30 + i), e.port, hits.clone());
    }
    let cfg = std::fs::read_to_string(&e.setup.config)
        .unwrap()
        .replace("timeout = \"5s\"", "timeout = \"1s\"");
    std::fs::write(&e.setup.config, cfg).unwrap();
    send(&e, &["x@tar.test"]);
    let t0 = Instant::now();
    let d = Daemon::spawn(&e.setup.config);
    let o = first_outcome(&e, "j0", &d, Duration::from_secs(30));
    assert_eq!(o["type"], "deferred", "{o}");
    assert_eq!(hits.load(Ordering::SeqCst), 3, "hosts contacted");
    assert!(t0.elapsed() < Duration::from_secs(15));
    drop(d);

    // attempt_timeout bounds one job's hold on its worker, whatever the per-command timeout.
    let e = env(
        &records,
        "prohibited_hosts = []\nattempt_timeout = \"2s\"",
        false,
    );
    let hits = Arc::new(AtomicUsize::new(0));
    for i in 0..6 {
        tarpit(&format!("127.0.0.{}", 30 + i), e.port, hits.clone());
    }
    let cfg = std::fs::read_to_string(&e.setup.config)
        .unwrap()
        .replace("timeout = \"5s\"", "timeout = \"30s\"");
    std::fs::write(&e.setup.config, cfg).unwrap();
    send(&e, &["y@tar.test"]);
    let t0 = Instant::now();
    let d = Daemon::spawn(&e.setup.config);
    let o = first_outcome(&e, "j0", &d, Duration::from_secs(30));
    let took = t0.elapsed();
    assert_eq!(o["type"], "deferred", "{o}");
    // Cut at the 2 s attempt deadline, long before the 30 s greeting timeout.
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "the attempt took {took:?}"
    );
    assert!(
        o["response"].as_str().unwrap().contains("attempt_timeout"),
        "{o}"
    );
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "one greeting waited for, then the deadline"
    );
}

#[test]
fn a_dns_server_that_is_down_defers_and_never_bounces() {
    let e = env(&[], "prohibited_hosts = []", true);
    send(&e, &["z@nowhere.test"]);
    let d = Daemon::spawn(&e.setup.config);
    let o = first_outcome(&e, "j0", &d, Duration::from_secs(40));
    assert_eq!(o["type"], "deferred", "{o}");
    assert!(o["response"].as_str().unwrap().contains("DNS"), "{o}");
}

#[test]
fn private_mx_addresses_are_prohibited_by_default_and_allowed_by_name() {
    // A recipient's DNS pointing at an internal mail server: RFC 1918, CGNAT (ULA, fc00::/7,
    // in the unit test of src/deliver/mx.rs).
    let records = [
        "mx-host=intra.test,mx.intra.test,10".to_string(),
        "address=/mx.intra.test/10.11.12.13".to_string(),
        "mx-host=cgnat.test,mx.cgnat.test,10".to_string(),
        "address=/mx.cgnat.test/100.64.1.1".to_string(),
        "mx-host=home.test,mx.home.test,10".to_string(),
        "address=/mx.home.test/192.168.1.25".to_string(),
        "mx-host=loop.test,mx.loop.test,10".to_string(),
        "address=/mx.loop.test/127.0.0.2".to_string(),
    ];
    let e = env(&records, "", false);
    send(&e, &["a@intra.test", "b@cgnat.test", "c@home.test"]);
    let d = Daemon::spawn(&e.setup.config);
    for id in ["j0", "j1", "j2"] {
        let o = first_outcome(&e, id, &d, Duration::from_secs(20));
        assert_eq!(
            (
                o["type"].as_str(),
                o["enhanced"].as_str(),
                o["class"].as_str()
            ),
            (Some("bounced"), Some("5.4.4"), Some("bad_domain")),
            "{id}: {o}"
        );
        assert!(
            o["response"].as_str().unwrap().contains("prohibited"),
            "{o}"
        );
    }
    drop(d);

    // One internal range let in, the rest of the defaults kept.
    let e = env(&records, "allowed_hosts = [\"127.0.0.2/32\"]", false);
    let sink = Sink::start_on("127.0.0.2", e.port, &[]);
    send(&e, &["e@loop.test", "f@intra.test"]);
    let d = Daemon::spawn(&e.setup.config);
    let o = first_outcome(&e, "j0", &d, Duration::from_secs(20));
    assert_eq!(o["type"], "delivered", "{o}");
    let o = first_outcome(&e, "j1", &d, Duration::from_secs(20));
    assert_eq!(o["type"], "bounced", "{o}");
    assert_eq!(sink.count(), 1);
}

//! Direct-to-MX delivery against a real DNS server (dnsmasq) and several smtp-sink
//! instances on 127.0.0.x: MX preference with fallback, implicit MX, null MX, NXDOMAIN,
//! hard bounces feeding the suppression list, 4xx recovery, 421 backoff, per-domain rates.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

struct MxEnv {
    redis: Redis,
    _dns: Dns,
    sinks: HashMap<&'static str, Sink>,
    setup: Setup,
}

/// dnsmasq answering for `.test` only (unknown names: NXDOMAIN), sinks on the given
/// loopback addresses, all on one port (the config's `mx_port`).
fn env(
    records: &[&str],
    sinks: &[(&'static str, &[&str])],
    delivery_extra: &str,
    extra: &str,
) -> MxEnv {
    let redis = Redis::start();
    let port = free_port();
    let mut recs: Vec<String> = vec!["local=/test/".into()];
    recs.extend(records.iter().map(|r| r.to_string()));
    let dns = Dns::start(&recs);
    let sinks = sinks
        .iter()
        .map(|(ip, args)| (*ip, Sink::start_on(ip, port, args)))
        .collect();
    let setup = Setup::new(
        &redis.url(),
        port,
        &format!(
            "mx_port = {port}\nnameservers = [\"127.0.0.1:{}\"]\nprohibited_hosts = []\n{delivery_extra}",
            dns.port
        ),
        "",
        extra,
    );
    let cfg = std::fs::read_to_string(&setup.config)
        .unwrap()
        .replace("mode = \"relay\"", "mode = \"mx\"");
    std::fs::write(&setup.config, cfg).unwrap();
    MxEnv {
        redis,
        _dns: dns,
        sinks,
        setup,
    }
}

fn jobs(prefix: &str, to: &[&str]) -> Vec<String> {
    to.iter()
        .enumerate()
        .map(|(i, t)| {
            job(
                &format!("{prefix}-{i}"),
                prefix,
                "receipt",
                t,
                json!({"name": "M", "order_id": i}),
            )
        })
        .collect()
}

fn terminal(evs: &[Value], id: &str) -> Value {
    let t = terminal_by_id(evs);
    assert_eq!(t.get(id).map(Vec::len), Some(1), "{id}: {evs:?}");
    t[id][0].clone()
}

#[test]
fn routing_preference_fallback_implicit_null_and_nxdomain() {
    let e = env(
        &[
            "mx-host=pref.test,mx1.pref.test,10",
            "mx-host=pref.test,mx2.pref.test,20",
            "host-record=mx1.pref.test,127.0.0.2",
            "host-record=mx2.pref.test,127.0.0.3",
            "host-record=amx.test,127.0.0.4",
            // RFC 7505 null MX: preference 0, root target.
            "dns-rr=null.test,15,000000",
        ],
        &[("127.0.0.3", &[]), ("127.0.0.4", &[])],
        "",
        "",
    );
    let mut conn = e.redis.conn();
    enqueue_raw(
        &mut conn,
        &e.setup.prefix,
        &jobs(
            "r",
            &["a@pref.test", "b@amx.test", "c@null.test", "d@nx.test"],
        ),
    );
    let daemon = Daemon::spawn(&e.setup.config);
    let evs = wait_terminal(
        &mut conn,
        &e.setup.prefix,
        4,
        Duration::from_secs(30),
        Some(&daemon),
    );

    // mx1 (127.0.0.2) refuses connections: delivered through mx2.
    assert_eq!(terminal(&evs, "r-0")["type"], "delivered");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        e.sinks["127.0.0.3"].count(),
        1,
        "delivered by preference fallback to mx2"
    );
    // No MX but an A record: implicit MX.
    assert_eq!(terminal(&evs, "r-1")["type"], "delivered");
    assert_eq!(e.sinks["127.0.0.4"].count(), 1);
    let null = terminal(&evs, "r-2");
    assert_eq!(
        (null["type"].as_str(), null["enhanced"].as_str()),
        (Some("bounced"), Some("5.1.10")),
        "{null}"
    );
    let nx = terminal(&evs, "r-3");
    assert_eq!(
        (nx["type"].as_str(), nx["class"].as_str()),
        (Some("bounced"), Some("bad_domain")),
        "{nx}"
    );
}

#[test]
fn hard_bounces_are_suppressed_and_later_sends_to_them_too() {
    let e = env(
        &[
            "mx-host=hard.test,mx.hard.test,10",
            "host-record=mx.hard.test,127.0.0.5",
        ],
        &[("127.0.0.5", &["-f", "RCPT", "-B", "550 5.1.1 User unknown"])],
        "",
        "",
    );
    let mut conn = e.redis.conn();
    enqueue_raw(&mut conn, &e.setup.prefix, &jobs("h", &["Gone@hard.test"]));
    let daemon = Daemon::spawn(&e.setup.config);
    let evs = wait_terminal(
        &mut conn,
        &e.setup.prefix,
        1,
        Duration::from_secs(30),
        Some(&daemon),
    );
    assert_eq!(terminal(&evs, "h-0")["class"], "invalid_recipient");
    let reason: Option<String> = redis::cmd("HGET")
        .arg(format!("{}suppressed", e.setup.prefix))
        .arg("gone@hard.test")
        .query(&mut conn)
        .unwrap();
    assert_eq!(reason.as_deref(), Some("bounced"));

    // A later campaign to the same address: suppressed, not sent; even when transactional.
    let later = vec![
        job("h2", "later", "receipt", "gone@hard.test", json!({})),
        json!({"id": "h3", "campaign": "later", "template": "receipt", "to": "gone@hard.test", "transactional": true}).to_string(),
    ];
    enqueue_raw(&mut conn, &e.setup.prefix, &later);
    let evs = wait_terminal(
        &mut conn,
        &e.setup.prefix,
        3,
        Duration::from_secs(30),
        Some(&daemon),
    );
    for id in ["h2", "h3"] {
        let t = terminal(&evs, id);
        assert_eq!(
            (t["type"].as_str(), t["reason"].as_str()),
            (Some("suppressed"), Some("bounced")),
            "{t}"
        );
    }

    // Operators manage the list: a manual entry blocks; an unsubscribe does not block
    // transactional mail.
    let cfg = e.setup.config.to_str().unwrap();
    let (st, _, err) = paloma(&["suppress", "--config", cfg, "add", "vip@hard.test"], None);
    assert!(st.success(), "{err}");
    let (st, _, err) = paloma(
        &[
            "suppress",
            "--config",
            cfg,
            "add",
            "--reason",
            "unsubscribed",
            "news@hard.test",
        ],
        None,
    );
    assert!(st.success(), "{err}");
    let (_, out, _) = paloma(&["suppress", "--config", cfg, "list"], None);
    assert!(
        out.contains("vip@hard.test manual") && out.contains("gone@hard.test bounced"),
        "{out}"
    );
    enqueue_raw(
        &mut conn,
        &e.setup.prefix,
        &[
            job("h4", "later", "receipt", "vip@hard.test", json!({})),
            json!({"id": "h5", "campaign": "later", "template": "receipt", "to": "news@hard.test", "transactional": true}).to_string(),
        ],
    );
    let evs = wait_terminal(
        &mut conn,
        &e.setup.prefix,
        5,
        Duration::from_secs(30),
        Some(&daemon),
    );
    assert_eq!(terminal(&evs, "h4")["reason"], "manual");
    // h5 went to the (rejecting) MX instead of being suppressed.
    assert_eq!(terminal(&evs, "h5")["type"], "bounced");
    let (st, _, _) = paloma(
        &["suppress", "--config", cfg, "remove", "vip@hard.test"],
        None,
    );
    assert!(st.success());
    let (_, out, _) = paloma(&["suppress", "--config", cfg, "list"], None);
    assert!(!out.contains("vip@hard.test"));
}

#[test]
fn a_deferring_domain_recovers_and_a_421_suspends_its_site() {
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
        &format!("[metrics]\nlisten = \"127.0.0.1:{}\"", free_port()),
    );
    let mut conn = e.redis.conn();
    enqueue_raw(
        &mut conn,
        &e.setup.prefix,
        &jobs("s", &["a@soft.test", "b@soft.test"]),
    );
    enqueue_raw(
        &mut conn,
        &e.setup.prefix,
        &jobs("q", &["a@busy.test", "b@busy.test", "c@busy.test"]),
    );
    let daemon = Daemon::spawn(&e.setup.config);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let evs = events(&mut conn, &e.setup.prefix);
        let soft = evs
            .iter()
            .filter(|v| v["type"] == "deferred" && v["campaign"] == "s")
            .count();
        let busy = evs
            .iter()
            .filter(|v| v["type"] == "deferred" && v["campaign"] == "q")
            .count();
        if soft >= 2 && busy >= 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{evs:?}\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
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
    // While busy.test's site was suspended, its other jobs were not attempted job by job:
    // fewer 421 deferrals than jobs.
    let busy_deferrals = evs
        .iter()
        .filter(|v| v["type"] == "deferred" && v["campaign"] == "q")
        .count();
    assert!(
        busy_deferrals < 3 * 2,
        "suspended as a site, not retried per job: {busy_deferrals}"
    );
}

#[test]
fn a_rate_limited_domain_is_paced() {
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
    enqueue_raw(
        &mut conn,
        &e.setup.prefix,
        &jobs("rate", &to.iter().map(String::as_str).collect::<Vec<_>>()),
    );
    enqueue_raw(
        &mut conn,
        &e.setup.prefix,
        &jobs("free", &free.iter().map(String::as_str).collect::<Vec<_>>()),
    );
    let t0 = std::time::Instant::now();
    let daemon = Daemon::spawn(&e.setup.config);
    let evs = wait_terminal(
        &mut conn,
        &e.setup.prefix,
        40,
        Duration::from_secs(60),
        Some(&daemon),
    );
    let times = |c: &str| -> Vec<chrono::DateTime<chrono::FixedOffset>> {
        let mut v: Vec<_> = evs
            .iter()
            .filter(|v| v["type"] == "delivered" && v["campaign"] == c)
            .map(|v| chrono::DateTime::parse_from_rfc3339(v["at"].as_str().unwrap()).unwrap())
            .collect();
        v.sort();
        v
    };
    let rate = times("rate");
    let free_t = times("free");
    assert_eq!((rate.len(), free_t.len()), (20, 20));
    let span = (rate[19] - rate[0]).num_milliseconds();
    // 20 messages at 5/s: a burst of 5, then 15 at 200 ms: at least ~3 s.
    assert!(span >= 2_500, "rate.test deliveries spanned only {span} ms");
    // The limited domain did not hold up the other one sharing the same MX host.
    let free_span = (free_t[19] - free_t[0]).num_milliseconds();
    assert!(
        free_span < span,
        "free.test took {free_span} ms, rate.test {span} ms"
    );
    assert!(t0.elapsed() < Duration::from_secs(30));
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
    enqueue_raw(&mut conn, &e.setup.prefix, &jobs("first", &["a@slow.test"]));
    let daemon = Daemon::spawn(&e.setup.config);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !events(&mut conn, &e.setup.prefix)
        .iter()
        .any(|v| v["type"] == "deferred")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        daemon
            .log_text()
            .contains("lowering the destination's rate"),
        "{}",
        daemon.log_text()
    );
    e.sinks.get_mut("127.0.0.9").unwrap().restart(&[]);
    let to: Vec<String> = (0..10).map(|i| format!("u{i}@slow.test")).collect();
    enqueue_raw(
        &mut conn,
        &e.setup.prefix,
        &jobs("paced", &to.iter().map(String::as_str).collect::<Vec<_>>()),
    );
    let evs = wait_terminal(
        &mut conn,
        &e.setup.prefix,
        11,
        Duration::from_secs(60),
        Some(&daemon),
    );
    let mut at: Vec<_> = evs
        .iter()
        .filter(|v| v["type"] == "delivered" && v["campaign"] == "paced")
        .map(|v| chrono::DateTime::parse_from_rfc3339(v["at"].as_str().unwrap()).unwrap())
        .collect();
    at.sort();
    assert_eq!(at.len(), 10);
    let span = (at[9] - at[0]).num_milliseconds();
    // 10 messages at 2/s after a burst of 2: at least ~4 s.
    assert!(span >= 3_500, "the lowered rate held for only {span} ms");
}

#[test]
fn idle_sessions_are_closed_after_their_timeout_without_more_mail() {
    let mport = free_port();
    let e = env(
        &[
            "mx-host=idle.test,mx.idle.test,10",
            "host-record=mx.idle.test,127.0.0.3",
        ],
        &[("127.0.0.3", &[])],
        "idle_timeout = \"1s\"",
        &format!("[metrics]\nlisten = \"127.0.0.1:{mport}\""),
    );
    let mut conn = e.redis.conn();
    enqueue_raw(
        &mut conn,
        &e.setup.prefix,
        &jobs("i", &["a@idle.test", "b@idle.test", "c@idle.test"]),
    );
    let daemon = Daemon::spawn(&e.setup.config);
    wait_terminal(
        &mut conn,
        &e.setup.prefix,
        3,
        Duration::from_secs(30),
        Some(&daemon),
    );
    let open = || {
        common::track::get(mport, "/metrics", "test")
            .text()
            .lines()
            .find(|l| l.starts_with("paloma_smtp_sessions_open "))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .unwrap_or(-1.0)
    };
    // Nothing else is sent: the housekeeping closes the idle sessions on its own.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while open() != 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} sessions still open\n{}",
            open(),
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

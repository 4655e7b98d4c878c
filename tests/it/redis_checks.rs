//! paloma looks at the Redis it is given: an evicting `maxmemory-policy` is refused at start
//! with what to change (or run with a warning when `redis.allow_eviction`), a Redis without
//! persistence is warned about, `/readyz` turns not ready when the policy changes under a
//! running daemon, and `paloma_redis_check{check}` says what passed.

use crate::common;

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
    // The metrics listener is bound before the daemon is ready: poll for readiness.
    let r = wait_for_daemon("/readyz answering 200", Duration::from_secs(20), &d, || {
        let r = get(mport, "/readyz", "curl");
        (r.status == 200).then_some(r)
    });
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

/// `INFO errorstats`: how many commands Redis refused as out of memory.
fn oom_refusals(conn: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("errorstats").query(conn).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("errorstat_OOM:count="))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// Issue 21, point 6: a Redis with a small `maxmemory` never fills up with jobs. Above
/// `redis.high_water` (counting a reserve for the outcomes of jobs accepted but not done),
/// `POST /api/v1/sends` answers 503 with `Retry-After` and says why, `paloma enqueue` stops
/// saying how many it enqueued, `/readyz` and the metrics say why; and the room left holds
/// every accepted job's outcome and a recipient's one-click unsubscribe, with not one
/// command refused by Redis for want of memory.
#[test]
fn above_the_memory_high_water_mark_new_jobs_wait_and_accepted_ones_still_end() {
    let redis = Redis::start_with(&["--maxmemory", "16mb", "--maxmemory-policy", "noeviction"]);
    // A slow peer at first (1 s per DATA): the accepted jobs pile up, as behind a slow
    // provider, and the refusal holds while it is looked at.
    let mut sink = Sink::start(&["-w", "1"]);
    let (api, mport, tport) = (free_port(), free_port(), free_port());
    let token = "api-token-5f0c2e9a7d41b3867c";
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "retry_intervals = [\"1s\"]",
        "",
        &format!(
            "[metrics]\nlisten = \"127.0.0.1:{mport}\"\n[api]\nlisten = \"127.0.0.1:{api}\"\ntoken = \"{token}\"\nmax_body_bytes = 3000000\n"
        ),
    );
    let base = format!("http://127.0.0.1:{tport}");
    let text = std::fs::read_to_string(&setup.config).unwrap().replace(
        "base_url = \"https://t.shop.test\"",
        &format!("base_url = \"{base}\"\nlisten = \"127.0.0.1:{tport}\""),
    );
    std::fs::write(&setup.config, text).unwrap();
    let mut conn = redis.conn();
    let daemon = Daemon::spawn(&setup.config);
    wait_until_daemon(
        "a look at Redis memory",
        Duration::from_secs(30),
        &daemon,
        || metric(mport, "paloma_redis_memory_ratio") > 0.0,
    );

    // Batches of 2,000 until one is refused: all of it, with Retry-After and the reason.
    let auth = format!("Bearer {token}");
    let mut accepted = 0usize;
    let refusal = loop {
        assert!(accepted < 200_000, "no refusal after {accepted} jobs");
        let batch = jobs(2_000, &format!("mem{accepted}"), "example.test");
        let body = format!("[{}]", batch.join(","));
        let r = common::track::request(
            api,
            "POST",
            "/api/v1/sends",
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            body.as_bytes(),
        );
        match r.status {
            200 => accepted += 2_000,
            503 => break r,
            s => panic!("{s}: {}", r.text()),
        }
    };
    assert!(accepted >= 2_000, "the first batch fits");
    assert!(
        refusal
            .header("retry-after")
            .is_some_and(|s| s.parse::<u32>().unwrap() > 0),
        "Retry-After"
    );
    let why: serde_json::Value = serde_json::from_slice(&refusal.body).unwrap();
    let why = why["error"].as_str().unwrap();
    assert!(
        why.contains("high-water") && why.contains("redis.high_water"),
        "{why}"
    );
    let refused_campaign = format!("\"campaign\":\"mem{accepted}\"");
    let waiting: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(format!("{}sends", setup.prefix))
        .arg("-")
        .arg("+")
        .query(&mut conn)
        .unwrap();
    assert!(
        !waiting.ids.is_empty(),
        "the accepted jobs wait behind the slow peer"
    );
    assert!(
        waiting.ids.iter().all(|e| {
            let job: String = e.get("job").unwrap();
            !job.contains(&refused_campaign)
        }),
        "nothing of the refused batch written"
    );
    let ready = get(mport, "/readyz", "probe");
    assert_eq!(
        ready.status, 200,
        "still ready: deliveries and opt-outs go on"
    );
    assert!(ready.text().contains("high-water"), "{}", ready.text());
    // The daemon's next look (every second) sees what the API counted since the last one.
    wait_until("the memory check failed", Duration::from_secs(10), || {
        metric(mport, r#"paloma_redis_check{check="memory"}"#) == 0.0
    });

    // The CLI stops before its first batch, and says so.
    let list = setup.path("more.jsonl");
    std::fs::write(&list, jobs(10, "cli", "example.test").join("\n")).unwrap();
    let (st, _, err) = paloma(
        &[
            "enqueue",
            "--config",
            setup.config.to_str().unwrap(),
            list.to_str().unwrap(),
        ],
        None,
    );
    assert!(!st.success(), "{err}");
    assert!(
        err.contains("high-water") && err.contains("0 jobs were enqueued"),
        "{err}"
    );

    // The peer speeds up: every accepted job ends (the room above the mark holds their
    // outcomes), and the refusal lifts once they are out.
    sink.restart(&[]);
    wait_until_daemon(
        "every accepted job delivered",
        Duration::from_secs(180),
        &daemon,
        || {
            let done: i64 = redis::cmd("SCARD")
                .arg(format!("{}campaigns", setup.prefix))
                .query::<i64>(&mut conn)
                .map(|_| {
                    (0..accepted / 2_000)
                        .map(|b| {
                            common::track::stat(
                                &mut conn,
                                &setup.prefix,
                                &format!("mem{}", b * 2_000),
                                "delivered",
                            )
                        })
                        .sum()
                })
                .unwrap();
            done == accepted as i64
        },
    );
    wait_until("the refusal lifted", Duration::from_secs(10), || {
        metric(mport, r#"paloma_redis_check{check="memory"}"#) == 1.0
    });

    // A recipient's one-click unsubscribe is written too.
    let raw = sink.dumps().into_iter().next().unwrap();
    let msg = mail_parser::MessageParser::default().parse(&raw).unwrap();
    let to = msg
        .header_raw("To")
        .unwrap()
        .trim()
        .trim_matches(['<', '>'])
        .to_string();
    let lu = msg.header_raw("List-Unsubscribe").unwrap();
    let path = lu
        .trim()
        .trim_matches(['<', '>'])
        .strip_prefix(&base)
        .unwrap()
        .to_string();
    assert_eq!(common::track::one_click(tport, &path).status, 200);
    let reason: Option<String> = redis::cmd("HGET")
        .arg(format!("{}suppressed", setup.prefix))
        .arg(to.to_ascii_lowercase())
        .query(&mut conn)
        .unwrap();
    assert_eq!(reason.as_deref(), Some("unsubscribed"));
    assert_eq!(oom_refusals(&mut conn), 0, "no write met a full Redis");
    let info: String = redis::cmd("INFO").arg("memory").query(&mut conn).unwrap();
    let peak = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory_peak:"))
        .unwrap()
        .trim()
        .to_string();
    eprintln!("accepted {accepted} jobs before the refusal; peak used_memory {peak} of 16 MiB");
}

/// The bytes Redis holds per message, by kind of key, for README "Sizing Redis": 10,000
/// marketing jobs (with `[bounces]`, so each has a return-path key) waiting, then delivered
/// by a real daemon. A measurement, not a check: `cargo test --test it
/// redis_checks::bytes_per_message -- --ignored --nocapture`.
#[test]
#[ignore]
fn bytes_per_message_at_rest() {
    use common::track::used_memory;
    let n = 10_000usize;
    let redis = Redis::start_with(&["--maxmemory-policy", "noeviction"]);
    let sink = Sink::start(&[]);
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        "",
        &format!(
            "[bounces]\ndomain = \"bounces.test\"\nlisten = \"127.0.0.1:{}\"\n",
            free_port()
        ),
    );
    let mut conn = redis.conn();
    let usage = |conn: &mut redis::Connection, pattern: &str| -> (u64, u64) {
        let keys: Vec<String> = redis::cmd("KEYS").arg(pattern).query(conn).unwrap();
        let mut bytes = 0;
        for k in &keys {
            let b: Option<u64> = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(k)
                .arg("SAMPLES")
                .arg(0)
                .query(conn)
                .unwrap();
            bytes += b.unwrap_or(0);
        }
        (keys.len() as u64, bytes)
    };
    let base = used_memory(&mut conn);
    let batch = jobs(n, "size", "example.test");
    let job_bytes: usize = batch.iter().map(|j| j.len()).sum();
    enqueue_raw(&mut conn, &setup.prefix, &batch);
    let waiting = used_memory(&mut conn) - base;
    let (_, sends) = usage(&mut conn, &format!("{}sends", setup.prefix));
    let daemon = Daemon::spawn(&setup.config);
    wait_until_daemon(
        "every job delivered",
        Duration::from_secs(300),
        &daemon,
        || {
            common::track::stat(&mut conn, &setup.prefix, "size", "delivered") == n as i64
                && sends_drained(&mut conn, &setup.prefix)
        },
    );
    drop(daemon);
    let _: () = redis::cmd("MEMORY").arg("PURGE").query(&mut conn).unwrap();
    let after = used_memory(&mut conn) - base;
    let p = &setup.prefix;
    let per = |b: u64| b as f64 / n as f64;
    eprintln!("jobs: {:.0} B of JSON each", job_bytes as f64 / n as f64);
    eprintln!(
        "waiting: used_memory +{:.0} B per job; the sends stream {:.0} B per job",
        waiting as f64 / n as f64,
        per(sends)
    );
    eprintln!(
        "delivered (at rest): used_memory +{:.0} B per message",
        after as f64 / n as f64
    );
    let mut total = 0;
    for (what, pattern) in [
        ("idempotency records", format!("{p}idem:*")),
        ("events stream", format!("{p}events")),
        ("return-path keys", format!("{p}rp:*")),
        ("recipient hashes", format!("{p}r:*")),
        ("sends stream (drained)", format!("{p}sends")),
        ("everything else", String::new()),
    ] {
        let (keys, bytes) = if pattern.is_empty() {
            let (_, all) = usage(&mut conn, &format!("{p}*"));
            (0, all - total)
        } else {
            usage(&mut conn, &pattern)
        };
        total += bytes;
        eprintln!("{what}: {keys} keys, {:.0} B per message", per(bytes));
    }
}

/// A batch that passes the high-water mark's look but does not fit is refused by Redis
/// (OOM): the answer says Redis is full, not "unavailable", with `Retry-After`, and nothing
/// of the batch is written.
#[test]
fn a_full_redis_is_reported_as_full() {
    let redis = Redis::start_with(&["--maxmemory-policy", "noeviction"]);
    let sink = Sink::start(&[]);
    let (api, mport) = (free_port(), free_port());
    let token = "api-token-5f0c2e9a7d41b3867c";
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        "",
        &format!(
            "[metrics]\nlisten = \"127.0.0.1:{mport}\"\n[api]\nlisten = \"127.0.0.1:{api}\"\ntoken = \"{token}\"\n"
        ),
    );
    let daemon = Daemon::spawn_env(&setup.config, &[("PALOMA_REDIS__HIGH_WATER", "0.99")]);
    let mut conn = redis.conn();
    wait_port("127.0.0.1", mport, Duration::from_secs(30));
    wait_until_daemon("ready", Duration::from_secs(30), &daemon, || {
        get(mport, "/readyz", "probe").status == 200
    });
    let used = common::track::used_memory(&mut conn);
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(used + 400_000)
        .query(&mut conn)
        .unwrap();
    wait_until_daemon(
        "a look at the limit",
        Duration::from_secs(10),
        &daemon,
        || metric(mport, "paloma_redis_memory_ratio") > 0.0,
    );
    let batch = jobs(10_000, "full", "example.test");
    let r = common::track::request(
        api,
        "POST",
        "/api/v1/sends",
        &[
            ("Authorization", &format!("Bearer {token}")),
            ("Content-Type", "application/json"),
        ],
        format!("[{}]", batch.join(",")).as_bytes(),
    );
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("Redis is full"), "{}", r.text());
    assert!(r.header("retry-after").is_some());
    let sends: usize = redis::cmd("XLEN")
        .arg(format!("{}sends", setup.prefix))
        .query(&mut conn)
        .unwrap();
    assert_eq!(sends, 0, "all or nothing");
}

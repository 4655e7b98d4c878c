//! Several daemons on one Redis: they share the consumer group (each job is sent once) and a
//! `[[domains]]` rate bounds them together (`delivery.shared_rates`, on by default), not
//! each of them. Also the shared rate itself, driven directly against a real Redis.

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use paloma::shape::{Admission, RuleState};

/// `paloma_messages_total{campaign="fleet",outcome="delivered"}` of one daemon.
fn delivered_by(port: u16) -> u64 {
    metric(
        port,
        r#"paloma_messages_total{campaign="fleet",outcome="delivered"}"#,
    ) as u64
}

#[test]
fn two_daemons_share_one_domain_rate() {
    let _machine = exclusive();
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        // Small reads, so that both daemons take jobs from the stream.
        "batch = 2",
        "[[domains]]\nmatch = \"rate.test\"\nrate = \"5/s\"\n",
    );
    // One config per daemon: each its own metrics port.
    let base = std::fs::read_to_string(&setup.config).unwrap();
    let ports = [free_port(), free_port()];
    let configs: Vec<_> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let path = setup.path(&format!("daemon{i}.toml"));
            std::fs::write(
                &path,
                format!("{base}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
            )
            .unwrap();
            path
        })
        .collect();
    let a = Daemon::spawn(&configs[0]);
    let b = Daemon::spawn(&configs[1]);
    for port in ports {
        wait_port("127.0.0.1", port, Duration::from_secs(20));
    }
    let mut conn = redis.conn();
    let n = 30;
    enqueue_raw(&mut conn, &setup.prefix, &jobs(n, "fleet", "rate.test"));
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        n,
        Duration::from_secs(60),
        Some(&a),
    );
    let by_id = terminal_by_id(&evs);
    assert_eq!(by_id.len(), n);
    assert!(by_id
        .values()
        .all(|t| t.len() == 1 && t[0]["type"] == "delivered"));
    assert_eq!(sink.count(), n, "each job sent once");
    let (da, db) = (delivered_by(ports[0]), delivered_by(ports[1]));
    assert_eq!(da + db, n as u64);
    assert!(
        da > 0 && db > 0,
        "both daemons delivered: {da} and {db}\n{}",
        b.log_text()
    );

    let at: Vec<i64> = evs
        .iter()
        .filter(|e| e["type"] == "delivered")
        .map(at_ms)
        .collect();
    // 30 at 5/s for the pair: a burst of 5, then one every 200 ms, the last 5 s after the
    // first (one interval allowed for the first and last deliveries' own spread). Two
    // separate limiters would allow 10/s: about 2 s.
    let (first, last) = (at.iter().min().unwrap(), at.iter().max().unwrap());
    let least = (n as i64 - 5 - 1) * 200;
    assert!(
        last - first >= least,
        "30 messages at 5/s took only {} ms, at least {least} ms",
        last - first
    );
    // And no stretch of them faster than the rate, less seven intervals for a stalled
    // process finishing a few at once: at most 21 within any two seconds, as before, and
    // the like for every other stretch (separate limiters would allow 30 in two seconds).
    assert_paced(&at, 5, 200, 7);
}

/// Two daemons' rules on one key, rate 2/s (a burst of 2, then one every 500 ms): the
/// burst is spent for both; reservations come within a second and are waited for in
/// memory; later ones are sent back, paced one interval apart across both daemons.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)] // the machine is held for the whole test
async fn the_shared_rate_reserves_within_a_second_and_sends_the_rest_back_paced() {
    let _machine = exclusive();
    let redis = Redis::start();
    let client = redis::Client::open(redis.url()).unwrap();
    let conn: paloma::store::RedisConn = client.get_connection_manager().await.unwrap().into();
    let keys = paloma::store::keys::Keys::new("x:");
    let rate = "2/s".parse().unwrap();
    let a = RuleState::with_redis("t", Some(rate), 1, 1, Some((conn.clone(), &keys)));
    let b = RuleState::with_redis("t", Some(rate), 1, 1, Some((conn.clone(), &keys)));

    let t0 = Instant::now();
    assert_eq!(a.admit("d.test").await, Admission::Go);
    assert_eq!(a.admit("d.test").await, Admission::Go);
    assert!(t0.elapsed() < Duration::from_millis(450), "the burst");

    // Four at once, two per daemon: slots at +0.5 s and +1 s are reserved and waited for;
    // +1.5 s is past the longest reservation, so two go back, 500 ms apart.
    let t1 = Instant::now();
    let (r1, r2, r3, r4) = tokio::join!(
        a.admit("d.test"),
        b.admit("d.test"),
        a.admit("d.test"),
        b.admit("d.test")
    );
    let waited = t1.elapsed();
    let results = [r1, r2, r3, r4];
    let go = results.iter().filter(|r| **r == Admission::Go).count();
    let mut back: Vec<Duration> = results
        .iter()
        .filter_map(|r| match r {
            Admission::Later(w) => Some(*w),
            Admission::Go => None,
        })
        .collect();
    back.sort();
    assert_eq!((go, back.len()), (2, 2), "{results:?}");
    assert!(
        waited >= Duration::from_millis(800),
        "the reserved slots were waited for: {waited:?}"
    );
    assert!(back[0] >= Duration::from_millis(1000), "{back:?}");
    let gap = back[1] - back[0];
    assert!(
        gap >= Duration::from_millis(400) && gap <= Duration::from_millis(600),
        "sent back one interval apart: {back:?}"
    );

    // Both keys expire on their own.
    let mut c = redis.conn();
    for key in ["x:rate:t:d.test", "x:rate-back:t:d.test"] {
        let ttl: i64 = redis::cmd("PTTL").arg(key).query(&mut c).unwrap();
        assert!(ttl > 0 && ttl < 10_000, "{key}: PTTL {ttl}");
    }

    // A TAT and a return horizon an hour ahead (the server's clock stepped back): pulled
    // back, the next job waits a second at most instead of an hour.
    let (secs, micros): (String, String) = redis::cmd("TIME").query(&mut c).unwrap();
    let far =
        secs.parse::<i64>().unwrap() * 1_000_000 + micros.parse::<i64>().unwrap() + 3_600_000_000;
    for key in ["x:rate:t:far.test", "x:rate-back:t:far.test"] {
        let _: () = redis::cmd("SET").arg(key).arg(far).query(&mut c).unwrap();
    }
    // Timed out after a minute rather than the hour, should the TAT not be pulled back.
    let go = tokio::time::timeout(Duration::from_secs(60), a.admit("far.test"))
        .await
        .expect("admitted within a minute, not an hour");
    assert_eq!(go, Admission::Go);
    // By the server's clock: the TAT now stands at most the burst tolerance, the longest
    // reservation (500 ms) and one interval ahead (1.5 s at 2/s), so this job waited at most
    // a second, and the far return horizon is dropped.
    let (secs, micros): (String, String) = redis::cmd("TIME").query(&mut c).unwrap();
    let now = secs.parse::<i64>().unwrap() * 1_000_000 + micros.parse::<i64>().unwrap();
    let tat: i64 = redis::cmd("GET")
        .arg("x:rate:t:far.test")
        .query::<String>(&mut c)
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        tat - now <= 1_500_000,
        "TAT {} ms ahead of the server's clock",
        (tat - now) / 1000
    );
    let back: Option<String> = redis::cmd("GET")
        .arg("x:rate-back:t:far.test")
        .query(&mut c)
        .unwrap();
    assert_eq!(back, None, "the far return horizon is dropped");
}

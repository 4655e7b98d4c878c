//! A flood of one link, or of every link of one message, answers every request and grows
//! Redis by next to nothing: a repeat of one message's link or pixel within
//! `tracking.repeat_window` is not recorded. A scanner's prefetch does not hide the person's
//! click that follows. The events stream keeps `[events] max_len` and `max_age`, while the
//! stats counters stay exact.

use crate::common;

use std::time::{Duration, Instant};

use common::track::*;
use common::*;
use serde_json::json;

#[test]
fn replayed_and_flooded_links_are_answered_but_recorded_once() {
    let _machine = exclusive();
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let (setup, port, base) = tracking_setup(&redis.url(), sink.port, "", "");
    let mut conn = redis.conn();
    let data = json!({"first_name": "A", "products": [{"name": "X", "price": "1", "url": "https://shop.example/x"}]});
    let jobs: Vec<String> = ["one", "all", "scan"]
        .iter()
        .map(|id| {
            job(
                id,
                "flood",
                "newsletter",
                &format!("{id}@example.test"),
                data.clone(),
            )
        })
        .collect();
    enqueue_raw(&mut conn, &setup.prefix, &jobs);
    let daemon = Daemon::spawn(&setup.config);
    wait_terminal(
        &mut conn,
        &setup.prefix,
        3,
        Duration::from_secs(30),
        Some(&daemon),
    );
    wait_port("127.0.0.1", port, Duration::from_secs(10));
    let mails = captured(&sink, &base);

    // 500 requests for one link: 500 redirects, one event.
    let one = &mails["one"].clicks[1];
    let t = Instant::now();
    assert_eq!(hammer(port, std::slice::from_ref(one), 500), 500);
    println!("500 in {:?}", t.elapsed());
    let evs = wait_tracking(&mut conn, &setup.prefix, "one", 1);
    assert_eq!(evs.len(), 1, "{evs:?}");

    // A flood over every link and the pixel of one message, from 8 clients for a bounded
    // number of requests: every request answered, at most one event per link and pixel.
    let before = used_memory(&mut conn);
    let xlen_before = xlen(&mut conn, &setup.prefix);
    let mut paths = mails["all"].clicks.clone();
    paths.push(mails["all"].pixel.clone());
    let t0 = Instant::now();
    let answered: usize = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|_| s.spawn(|| hammer(port, &paths, 5_000)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let took = t0.elapsed();
    assert_eq!(answered, 40_000);
    // Every distinct link of the message (the template repeats one URL) once, and its pixel.
    let distinct: std::collections::HashSet<&String> = paths.iter().collect();
    let evs = wait_tracking(&mut conn, &setup.prefix, "all", 1);
    // At most one person's and one machine's (a burst of distinct links reads as a scanner).
    assert!(
        evs.len() <= 2 * distinct.len(),
        "{} events for {} distinct targets",
        evs.len(),
        distinct.len()
    );
    let growth = used_memory(&mut conn) - before;
    assert!(
        growth < 2 * 1024 * 1024,
        "Redis grew by {growth} bytes under 40,000 requests"
    );
    assert!(xlen(&mut conn, &setup.prefix) - xlen_before <= 2 * distinct.len());
    println!(
        "flood: 40000 requests in {took:?}, Redis +{growth} bytes, {} events",
        evs.len()
    );

    // A scanner's prefetch, then the person: both recorded.
    let link = &mails["scan"].clicks[2];
    assert_eq!(get(port, link, PROXY_UA).status, 302);
    assert_eq!(get(port, link, MAIL_UA).status, 302);
    let evs = wait_tracking(&mut conn, &setup.prefix, "scan", 2);
    let machine: Vec<bool> = evs
        .iter()
        .map(|e| e["machine"].as_bool().unwrap())
        .collect();
    assert_eq!(machine, [true, false], "{evs:?}");
}

#[test]
fn the_events_stream_keeps_its_length_and_age_bounds_and_counters_stay_exact() {
    let _machine = exclusive();
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        "",
        "[events]\nmax_len = 100\nmax_age = \"4s\"",
    );
    let mut conn = redis.conn();
    let jobs: Vec<String> = (0..600)
        .map(|i| {
            job(
                &format!("r{i}"),
                "ret",
                "receipt",
                &format!("r{i}@x.test"),
                json!({"name": "R"}),
            )
        })
        .collect();
    enqueue_raw(&mut conn, &setup.prefix, &jobs);
    let daemon = Daemon::spawn(&setup.config);
    wait_until("600 delivered", Duration::from_secs(60), || {
        stat(&mut conn, &setup.prefix, "ret", "delivered") == 600
    });
    // The retention task trims to max_len within a second or two, in whole stream nodes
    // (100 entries each by default) when no workflow group needs the events.
    wait_until(
        "the events stream trimmed to about max_len = 100",
        Duration::from_secs(5),
        || (100..200).contains(&xlen(&mut conn, &setup.prefix)),
    );
    assert_eq!(sink.count(), 600);
    // Older than max_age: gone, while the counters stay.
    wait_until(
        "events older than 4 s trimmed",
        Duration::from_secs(15),
        || xlen(&mut conn, &setup.prefix) == 0,
    );
    assert_eq!(stat(&mut conn, &setup.prefix, "ret", "delivered"), 600);
    drop(daemon);
}

//! Back-off shared by the fleet: two daemons send one campaign through the same relay;
//! the relay (aiosmtpd) answers its first RCPT `421 4.7.28`, as Gmail does to a sender going
//! too fast, and accepts everything after. The daemon that heard it suspends the site, and
//! so must the other one, within about a second: the relay sees nothing from either until
//! the suspension ends; then every job is delivered, once.

use crate::common;

use std::time::Duration;

use common::*;

#[test]
fn a_421_heard_by_one_daemon_stops_the_whole_fleet_for_the_suspension() {
    let _one_at_a_time = exclusive();
    let redis = Redis::start();
    let relay = FaultyMta::start(&["throttle-once"]);
    // 20 messages a second for the fleet (shared in Redis): both daemons are still sending
    // when the 421 comes, and for seconds after.
    let setup = Setup::new(
        &redis.url(),
        relay.port,
        "retry_intervals = [\"1s\"]",
        "",
        "[[backoff]]\ncode = \"421\"\nsuspend = \"4s\"\n\
         [[domains]]\nmatch = \"*\"\nrate = \"20/s\"\n",
    );
    let mut conn = redis.conn();
    let n = 120;
    enqueue_raw(&mut conn, &setup.prefix, &jobs(n, "fleet", "fleet.test"));
    let a = Daemon::spawn(&setup.config);
    let b = Daemon::spawn(&setup.config);
    let throttled = wait_for_daemon("the 421", Duration::from_secs(30), &a, || {
        events(&mut conn, &setup.prefix)
            .into_iter()
            .find(|e| e["type"] == "deferred")
    });
    let at = at_ms(&throttled) as f64 / 1000.0;
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        n,
        Duration::from_secs(60),
        Some(&b),
    );
    let by_id = terminal_by_id(&evs);
    assert_eq!(by_id.len(), n);
    assert!(by_id
        .values()
        .all(|t| t.len() == 1 && t[0]["type"] == "delivered"));
    let times: Vec<f64> = std::fs::read_to_string(relay.out.path().join("times.log"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(times.len(), n, "each job kept once by the relay");
    // The suspension runs 4 s from the 421. The other daemon learns it within about a
    // second (it reads the fleet's suspensions every 500 ms; a message already on the wire
    // may still land): from then until the suspension ends, nothing reaches the relay.
    let quiet: Vec<f64> = times
        .iter()
        .map(|t| t - at)
        .filter(|d| (1.2..3.8).contains(d))
        .collect();
    assert!(
        quiet.is_empty(),
        "messages reached the relay {quiet:?} s after the 421, inside the fleet's suspension"
    );
    assert!(
        times.iter().any(|t| t - at >= 3.8),
        "sending resumed after the suspension"
    );
}

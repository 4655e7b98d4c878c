//! Redis refusing one write inside a transaction (a key of the wrong type, written by
//! another tool): the other writes of the batch stand and are not repeated, the refusal is
//! logged, and a job whose retry cannot be scheduled goes to the dead letters.

use crate::common;

use std::time::Duration;

use common::*;

#[test]
fn a_refused_write_inside_an_outcome_batch_is_reported_not_repeated() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let setup = Setup::new(&redis.url(), sink.port, "", "", "");
    let mut conn = redis.conn();
    // Another tool wrote a plain string where the event stream belongs: every XADD to it is
    // refused (WRONGTYPE) inside transactions whose other writes succeed.
    let _: () = redis::cmd("SET")
        .arg(format!("{}events", setup.prefix))
        .arg("not a stream")
        .query(&mut conn)
        .unwrap();
    let n = 10;
    enqueue_raw(&mut conn, &setup.prefix, &jobs(n, "wt", "crash.test"));
    let daemon = Daemon::spawn(&setup.config);
    let stats = format!("{}stats:wt", setup.prefix);
    wait_until("outcomes written", Duration::from_secs(30), || {
        let d: Option<i64> = redis::cmd("HGET")
            .arg(&stats)
            .arg("delivered")
            .query(&mut conn)
            .unwrap();
        d == Some(n as i64)
    });
    // The recorder handles one batch at a time: once a job enqueued after them has its
    // outcome written, it is done with theirs, written again or not.
    enqueue_raw(
        &mut conn,
        &setup.prefix,
        &jobs(1, "wt-sentinel", "crash.test"),
    );
    wait_until("the sentinel's outcome", Duration::from_secs(30), || {
        let d: Option<i64> = redis::cmd("HGET")
            .arg(format!("{}stats:wt-sentinel", setup.prefix))
            .arg("delivered")
            .query(&mut conn)
            .unwrap();
        d == Some(1)
    });
    let d: i64 = redis::cmd("HGET")
        .arg(&stats)
        .arg("delivered")
        .query(&mut conn)
        .unwrap();
    assert_eq!(d, n as i64, "the batch was not written again");
    assert_eq!(sink.count(), n + 1);
    let pending: i64 = redis::cmd("XLEN")
        .arg(format!("{}sends", setup.prefix))
        .query(&mut conn)
        .unwrap();
    assert_eq!(pending, 0, "every entry acknowledged and deleted");
    let log = daemon.log_text();
    assert!(
        log.contains("WRONGTYPE") && log.contains("event not written"),
        "the refusal is in the log: {log}"
    );
}

#[test]
fn a_job_redis_refuses_to_schedule_goes_to_the_dead_letters_not_nowhere() {
    let redis = Redis::start();
    // Every RCPT deferred: each job goes back to the delayed set for a retry.
    let sink = Sink::start(&["-r", "RCPT"]);
    let setup = Setup::new(&redis.url(), sink.port, "", "", "");
    let mut conn = redis.conn();
    let _: () = redis::cmd("SET")
        .arg(format!("{}scheduled", setup.prefix))
        .arg("not a sorted set")
        .query(&mut conn)
        .unwrap();
    let n = 3;
    enqueue_raw(&mut conn, &setup.prefix, &jobs(n, "ns", "crash.test"));
    let daemon = Daemon::spawn(&setup.config);
    wait_until("dead letters", Duration::from_secs(30), || {
        dead_letters(&mut conn, &setup.prefix).len() >= n
    });
    let dead = dead_letters(&mut conn, &setup.prefix);
    assert_eq!(dead.len(), n, "{dead:?}");
    let mut ids: Vec<String> = dead
        .iter()
        .map(|(job, error)| {
            assert!(error.contains("delayed set"), "{error}");
            let v: serde_json::Value = serde_json::from_str(job).expect("the job as received");
            v["id"].as_str().unwrap().to_string()
        })
        .collect();
    ids.sort();
    assert_eq!(ids, ["ns-0", "ns-1", "ns-2"]);
    // Each ends in one terminal event: dead.
    let evs = events(&mut conn, &setup.prefix);
    let by_id = terminal_by_id(&evs);
    assert_eq!(by_id.len(), n, "{evs:?}");
    assert!(by_id
        .values()
        .all(|t| t.len() == 1 && t[0]["type"] == "dead"));
    // Counted as dead, and free to be enqueued again once fixed.
    let dead_stat: i64 = redis::cmd("HGET")
        .arg(format!("{}stats:ns", setup.prefix))
        .arg("dead")
        .query(&mut conn)
        .unwrap();
    assert_eq!(dead_stat, n as i64);
    let idem: i64 = redis::cmd("EXISTS")
        .arg(format!("{}idem:ns-0", setup.prefix))
        .query(&mut conn)
        .unwrap();
    assert_eq!(idem, 0, "the idempotency record is gone");
    assert!(daemon.log_text().contains("went to the dead letters"));
}

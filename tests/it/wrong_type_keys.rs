//! Keys of the wrong type, written by another tool into paloma's prefix. The frequency-cap
//! reservation and the tracking-event writer are batch scripts: one bad key used to fail the
//! batch after part of it was written, and the batch was retried for ever. Now each item is
//! checked before it is written: the bad one is dead-lettered with its reason and the rest
//! goes on; a batch Redis keeps refusing is dead-lettered after a bounded number of tries.

use crate::common;

use std::time::Duration;

use common::track::*;
use common::*;

fn set_string(conn: &mut redis::Connection, key: &str) {
    redis::cmd("SET")
        .arg(key)
        .arg("written by another tool")
        .query::<()>(conn)
        .unwrap();
}

/// Entries of `{prefix}dead` as field maps.
fn dead_entries(
    conn: &mut redis::Connection,
    prefix: &str,
) -> Vec<std::collections::HashMap<String, String>> {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(format!("{prefix}dead"))
        .arg("-")
        .arg("+")
        .query(conn)
        .unwrap();
    reply
        .ids
        .iter()
        .map(|e| {
            e.map
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                        _ => String::new(),
                    };
                    (k.clone(), v)
                })
                .collect()
        })
        .collect()
}

#[test]
fn a_cap_record_of_the_wrong_type_dead_letters_its_job_and_the_batch_goes_on() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        "",
        "[[caps]]\nmax = 3\nper = \"7d\"\n",
    );
    let mut conn = redis.conn();
    set_string(&mut conn, &format!("{}r:b@wrong.test", setup.prefix));
    enqueue_raw(
        &mut conn,
        &setup.prefix,
        &[
            news("a", "spring", "a@wrong.test"),
            news("b", "spring", "b@wrong.test"),
            news("c", "spring", "c@wrong.test"),
        ],
    );
    let daemon = Daemon::spawn(&setup.config);
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        3,
        Duration::from_secs(30),
        Some(&daemon),
    );
    let t = terminal_by_id(&evs);
    assert_eq!(t.len(), 3, "{t:?}");
    for id in ["a", "c"] {
        assert_eq!(t[id].len(), 1, "{id}: {:?}", t[id]);
        assert_eq!(t[id][0]["type"], "delivered", "{id}: {:?}", t[id]);
    }
    assert_eq!(t["b"].len(), 1, "{:?}", t["b"]);
    assert_eq!(t["b"][0]["type"], "dead", "{:?}", t["b"]);
    let error = t["b"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("holds a Redis string, not a hash"),
        "{error}"
    );
    let dead = dead_letters(&mut conn, &setup.prefix);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].0.contains("\"id\":\"b\""), "{dead:?}");
    assert_eq!(dead[0].1, error);
    assert_eq!(sink.wait_count(2, Duration::from_secs(10)), 2);
}

#[test]
fn a_tracking_key_of_the_wrong_type_dead_letters_that_event_and_a_refused_batch_is_bounded() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let metrics_port = free_port();
    let (setup, port, base) = tracking_setup(
        &redis.url(),
        sink.port,
        "",
        &format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"),
    );
    let p = setup.prefix.clone();
    let mut conn = redis.conn();
    enqueue_raw(
        &mut conn,
        &p,
        &[
            news("g1", "good", "g1@track.test"),
            news("b1", "broken", "b1@track.test"),
            news("g2", "good", "g2@track.test"),
        ],
    );
    let daemon = Daemon::spawn(&setup.config);
    wait_terminal(&mut conn, &p, 3, Duration::from_secs(30), Some(&daemon));
    sink.wait_count(3, Duration::from_secs(10));
    let mails = captured(&sink, &base);

    // The unique-opens HyperLogLog of one campaign is a plain string.
    set_string(&mut conn, &format!("{p}uniq:o:broken"));
    assert_eq!(get(port, &mails["b1"].pixel, MAIL_UA).status, 200);
    assert_eq!(get(port, &mails["g1"].pixel, MAIL_UA).status, 200);
    let opened = wait_tracking(&mut conn, &p, "g1", 1);
    let dead = wait_for_daemon(
        "the broken open dead-lettered",
        Duration::from_secs(10),
        &daemon,
        || {
            let d = dead_entries(&mut conn, &p);
            (!d.is_empty()).then_some(d)
        },
    );
    assert_eq!(dead.len(), 1, "{dead:?}");
    let ev: serde_json::Value = serde_json::from_str(&dead[0]["event"]).unwrap();
    assert_eq!(
        (ev["type"].as_str(), ev["id"].as_str()),
        (Some("opened"), Some("b1"))
    );
    assert!(dead[0]["error"].contains("not a HyperLogLog"), "{dead:?}");
    assert_eq!(opened.len(), 1, "the good open written once: {opened:?}");
    assert!(tracking_events(&mut conn, &p, "b1").is_empty());
    assert_eq!(stat(&mut conn, &p, "good", "opened"), 1);
    assert_eq!(
        stat(&mut conn, &p, "broken", "opened"),
        0,
        "nothing of the bad event written"
    );

    // A batch key of the wrong type (the suppression list) fails every event of the batch:
    // refused a bounded number of times, then dead-lettered, and the writer goes on.
    redis::cmd("DEL")
        .arg(format!("{p}suppressed"))
        .query::<()>(&mut conn)
        .unwrap();
    set_string(&mut conn, &format!("{p}suppressed"));
    assert_eq!(get(port, &mails["g2"].pixel, MAIL_UA).status, 200);
    let dead = wait_for_daemon(
        "the refused batch dead-lettered",
        Duration::from_secs(20),
        &daemon,
        || {
            let d = dead_entries(&mut conn, &p);
            (d.len() == 2).then_some(d)
        },
    );
    assert!(dead[1]["error"].contains("WRONGTYPE"), "{dead:?}");
    assert!(dead[1]["event"].contains("\"g2\""), "{dead:?}");
    redis::cmd("DEL")
        .arg(format!("{p}suppressed"))
        .query::<()>(&mut conn)
        .unwrap();
    assert_eq!(get(port, &mails["g2"].clicks[0], MAIL_UA).status, 302);
    let evs = wait_tracking(&mut conn, &p, "g2", 1);
    assert_eq!(evs[0]["type"], "clicked", "{evs:?}");
    assert_eq!(
        metric(metrics_port, "paloma_tracking_events_dead_total"),
        2.0
    );
}

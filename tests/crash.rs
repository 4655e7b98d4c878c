//! Shutdown and crashes: SIGTERM drains and exits 0 within 10 s; a daemon killed with
//! SIGKILL mid-campaign leaves its pending jobs to a restarted one, and every job still ends
//! in exactly one terminal event; a Redis restart mid-campaign loses nothing.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use mail_parser::MessageParser;
use serde_json::json;

fn jobs(n: usize, tag: &str) -> Vec<String> {
    (0..n)
        .map(|i| {
            job(
                &format!("{tag}-{i}"),
                tag,
                "receipt",
                &format!("c{i}@crash.test"),
                json!({"name": "C", "order_id": i}),
            )
        })
        .collect()
}

fn delivered_ids(sink: &Sink) -> Vec<String> {
    sink.dumps()
        .iter()
        .filter_map(|raw| {
            MessageParser::default()
                .parse(raw)
                .and_then(|m| m.header_raw("X-Paloma-Id").map(|s| s.trim().to_string()))
        })
        .collect()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_drains_in_flight_jobs_and_exits_zero() {
    let redis = Redis::start();
    // Each DATA answer waits 1 s, so sessions are in flight when SIGTERM arrives.
    let mut sink = Sink::start(&["-w", "1"]);
    let setup = Setup::new(&redis.url(), sink.port, "", "", "");
    let mut conn = redis.conn();
    let n = 400;
    enqueue_raw(&mut conn, &setup.prefix, &jobs(n, "term"));
    let mut daemon = Daemon::spawn(&setup.config);
    wait_for("sessions in flight", Duration::from_secs(20), || {
        daemon.log_text().contains("paloma running")
    });
    std::thread::sleep(Duration::from_millis(600));
    let t0 = Instant::now();
    daemon.signal("TERM");
    let status = daemon
        .wait(Duration::from_secs(10))
        .expect("exited within 10 s of SIGTERM");
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        daemon.log_text()
    );
    assert!(t0.elapsed() < Duration::from_secs(10));
    let log = daemon.log_text();
    assert!(log.contains("shutting down"), "{log}");

    // Everything the sink accepted has its delivered event: in-flight sessions finished and
    // their outcomes were written before exit.
    std::thread::sleep(Duration::from_millis(300));
    let sent: HashSet<String> = delivered_ids(&sink).into_iter().collect();
    let evs = events(&mut conn, &setup.prefix);
    let recorded: HashSet<String> = evs
        .iter()
        .filter(|e| e["type"] == "delivered")
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert!(!sent.is_empty(), "some mail was in flight");
    assert_eq!(
        sent, recorded,
        "every accepted message was recorded before exit"
    );
    assert!(recorded.len() < n, "the test needs work left over");

    // A new daemon finishes the rest (the sink no longer stalls); nothing is sent twice.
    sink.restart(&[]);
    let daemon2 = Daemon::spawn(&setup.config);
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        n,
        Duration::from_secs(120),
        Some(&daemon2),
    );
    let by_id = terminal_by_id(&evs);
    assert_eq!(by_id.len(), n);
    assert!(by_id.values().all(|t| t.len() == 1));
    std::thread::sleep(Duration::from_millis(300));
    let ids = delivered_ids(&sink);
    let unique: HashSet<&String> = ids.iter().collect();
    let missing: Vec<_> = by_id
        .keys()
        .filter(|k| !unique.contains(k))
        .take(5)
        .collect();
    assert_eq!(
        unique.len(),
        n,
        "every job reached the sink; missing e.g. {missing:?}"
    );
    assert_eq!(ids.len(), n, "no duplicates after a drained shutdown");
}

#[test]
fn a_killed_daemons_pending_jobs_are_picked_up_by_a_restarted_one() {
    let redis = Redis::start();
    let mut sink = Sink::start(&["-w", "1"]);
    let setup = Setup::new(&redis.url(), sink.port, "", "", "");
    let mut conn = redis.conn();
    let n = 300;
    enqueue_raw(&mut conn, &setup.prefix, &jobs(n, "kill"));
    let mut daemon = Daemon::spawn(&setup.config);
    wait_for("some pending entries", Duration::from_secs(20), || {
        let v: redis::RedisResult<redis::Value> = redis::cmd("XPENDING")
            .arg(format!("{}sends", setup.prefix))
            .arg("paloma")
            .query(&mut conn);
        matches!(&v, Ok(redis::Value::Array(a)) if matches!(a.first(), Some(redis::Value::Int(p)) if *p > 0))
    });
    std::thread::sleep(Duration::from_millis(500));
    daemon.kill9();
    sink.restart(&[]);

    // claim_idle is 3 s in the test config: the new daemon reclaims what the dead one held.
    let daemon2 = Daemon::spawn(&setup.config);
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        n,
        Duration::from_secs(120),
        Some(&daemon2),
    );
    let by_id = terminal_by_id(&evs);
    assert_eq!(by_id.len(), n, "every job ended");
    for (id, t) in &by_id {
        assert_eq!(t.len(), 1, "{id}: exactly one terminal event, got {t:?}");
        assert_eq!(t[0]["type"], "delivered");
    }
    std::thread::sleep(Duration::from_millis(300));
    let sent: HashSet<String> = delivered_ids(&sink).into_iter().collect();
    assert_eq!(sent.len(), n, "every job reached the sink (at least once)");
    assert!(
        daemon2.log_text().contains("reclaimed"),
        "{}",
        daemon2.log_text()
    );
}

#[test]
fn a_redis_restart_mid_campaign_loses_nothing() {
    let mut redis = Redis::start();
    let sink = Sink::start(&[]);
    let setup = Setup::new(&redis.url(), sink.port, "", "", "");
    let mut conn = redis.conn();
    let n = 3000;
    enqueue_raw(&mut conn, &setup.prefix, &jobs(n, "rr"));
    let daemon = Daemon::spawn(&setup.config);
    wait_for("progress", Duration::from_secs(30), || {
        events(&mut conn, &setup.prefix)
            .iter()
            .filter(|e| is_terminal(e))
            .count()
            > 200
    });
    redis.kill();
    std::thread::sleep(Duration::from_secs(1));
    redis.restart();
    let mut conn = redis.conn();
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        n,
        Duration::from_secs(120),
        Some(&daemon),
    );
    let by_id = terminal_by_id(&evs);
    assert_eq!(by_id.len(), n, "every job ended after the Redis restart");
    let ids: HashSet<String> = delivered_ids(&sink).into_iter().collect();
    assert_eq!(ids.len(), n);
    assert!(
        by_id
            .values()
            .all(|t| t.iter().all(|e| e["type"] == "delivered")),
        "only delivered events"
    );
}

/// A TCP proxy in front of Redis. Armed, it passes on the client's next transaction that
/// acknowledges stream entries (`XACK` … `EXEC`), waits until the server has executed it
/// (the reply to EXEC follows the last `+QUEUED`), then cuts both connections without passing
/// on a byte of those replies: the outcome is written, but the daemon cannot know.
struct ReplyCutter {
    port: u16,
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cuts: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl ReplyCutter {
    fn start(upstream: u16) -> ReplyCutter {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Arc;

        fn has(hay: &[u8], w: &[u8]) -> bool {
            hay.windows(w.len()).any(|x| x == w)
        }

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(AtomicUsize::new(0));
        let (a, c) = (armed.clone(), cuts.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { return };
                let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let cut = Arc::new(AtomicBool::new(false));
                let executed = Arc::new(AtomicBool::new(false));
                let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (cut2, executed2) = (cut.clone(), executed.clone());
                // server → client; after the cut, swallowed until EXEC's reply has come.
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut swallowed = Vec::new();
                    while let Ok(n) = s2.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        if cut2.load(Ordering::SeqCst) {
                            swallowed.extend_from_slice(&buf[..n]);
                            if has(&swallowed, b"QUEUED\r\n*") {
                                executed2.store(true, Ordering::SeqCst);
                            }
                            continue;
                        }
                        if c2.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = c2.shutdown(Shutdown::Both);
                });
                let (a, c) = (a.clone(), c.clone());
                // client → server, cutting after a whole acknowledging transaction (which
                // may arrive in several reads).
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 256 * 1024];
                    let mut tail: Vec<u8> = Vec::new();
                    let mut saw_xack = false;
                    while let Ok(n) = client.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        // The end of the previous read, for words split across reads.
                        tail.extend_from_slice(&buf[..n]);
                        saw_xack |= has(&tail, b"XACK");
                        let exec = has(&tail, b"EXEC");
                        let trigger = a.load(Ordering::SeqCst) && saw_xack && exec;
                        if exec {
                            saw_xack = false;
                        }
                        let keep = tail.len().saturating_sub(8);
                        tail.drain(..keep);
                        if trigger {
                            a.store(false, Ordering::SeqCst);
                            cut.store(true, Ordering::SeqCst);
                        }
                        if server.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        if trigger {
                            c.fetch_add(1, Ordering::SeqCst);
                            let deadline = Instant::now() + Duration::from_secs(10);
                            while !executed.load(Ordering::SeqCst) && Instant::now() < deadline {
                                std::thread::sleep(Duration::from_millis(5));
                            }
                            break;
                        }
                    }
                    let _ = client.shutdown(Shutdown::Both);
                    let _ = server.shutdown(Shutdown::Both);
                });
            }
        });
        ReplyCutter { port, armed, cuts }
    }
}

#[test]
fn a_lost_reply_to_a_written_outcome_does_not_write_it_twice() {
    use std::sync::atomic::Ordering;
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let cutter = ReplyCutter::start(redis.port);
    let url = format!("redis://127.0.0.1:{}/", cutter.port);
    let setup = Setup::new(&url, sink.port, "", "", "");
    let mut conn = redis.conn();
    let n = 20;
    enqueue_raw(&mut conn, &setup.prefix, &jobs(n, "lost"));
    cutter.armed.store(true, Ordering::SeqCst);
    let daemon = Daemon::spawn(&setup.config);
    wait_terminal(
        &mut conn,
        &setup.prefix,
        n,
        Duration::from_secs(60),
        Some(&daemon),
    );
    assert_eq!(
        cutter.cuts.load(Ordering::SeqCst),
        1,
        "one reply was lost after its transaction ran"
    );
    // The recorder decides, after the lost reply, whether to write the batch again: once it
    // has said it found the batch written, nothing more comes of it.
    wait_until("the recorder's decision", Duration::from_secs(20), || {
        daemon.log_text().contains("only the reply was lost")
    });
    let evs = events(&mut conn, &setup.prefix);
    let by_id = terminal_by_id(&evs);
    assert_eq!(by_id.len(), n);
    for (id, t) in &by_id {
        assert_eq!(t.len(), 1, "{id}: exactly one terminal event, got {t:?}");
    }
    // A batch written twice would have counted its jobs twice.
    let delivered: i64 = redis::cmd("HGET")
        .arg(format!("{}stats:lost", setup.prefix))
        .arg("delivered")
        .query(&mut conn)
        .unwrap();
    assert_eq!(delivered, n as i64, "stats counted each job once");
}

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
    enqueue_raw(&mut conn, &setup.prefix, &jobs(n, "wt"));
    let daemon = Daemon::spawn(&setup.config);
    let stats = format!("{}stats:wt", setup.prefix);
    wait_for("outcomes written", Duration::from_secs(30), || {
        let d: Option<i64> = redis::cmd("HGET")
            .arg(&stats)
            .arg("delivered")
            .query(&mut conn)
            .unwrap();
        d == Some(n as i64)
    });
    std::thread::sleep(Duration::from_secs(1));
    let d: i64 = redis::cmd("HGET")
        .arg(&stats)
        .arg("delivered")
        .query(&mut conn)
        .unwrap();
    assert_eq!(d, n as i64, "the batch was not written again");
    assert_eq!(sink.count(), n);
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
    enqueue_raw(&mut conn, &setup.prefix, &jobs(n, "ns"));
    let daemon = Daemon::spawn(&setup.config);
    wait_for("dead letters", Duration::from_secs(30), || {
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

//! A lost reply: Redis executes the transaction that writes a batch of outcomes, and the
//! connection drops before its reply reaches the daemon. The daemon finds the batch written
//! and does not write it again: one terminal event per job, stats counted once.

use crate::common;

use std::time::{Duration, Instant};

use common::*;

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
    enqueue_raw(&mut conn, &setup.prefix, &jobs(n, "lost", "crash.test"));
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

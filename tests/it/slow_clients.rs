//! Slow clients cannot stop delivery: 1,500 connections that each send half a request line
//! hit a daemon limited to 1,024 descriptors while 2,000 sends go out. Every send is
//! delivered, a real click is answered within 2 s, the daemon never runs out of
//! descriptors, and the server closes the slow connections itself.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::track::*;
use common::*;
use serde_json::json;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn slow_loris_clients_neither_starve_delivery_nor_block_a_real_click() {
    let _machine = exclusive();
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let (setup, port, base) =
        tracking_setup(&redis.url(), sink.port, "header_timeout = \"5s\"", "");
    let mut conn = redis.conn();
    let data = json!({"first_name": "A", "products": []});
    enqueue_raw(
        &mut conn,
        &setup.prefix,
        &[job("first", "slow", "newsletter", "a@example.test", data)],
    );
    let daemon = Daemon::spawn_nofile(&setup.config, 1024);
    let pid = daemon.pid().unwrap();
    wait_terminal(
        &mut conn,
        &setup.prefix,
        1,
        Duration::from_secs(30),
        Some(&daemon),
    );
    wait_port("127.0.0.1", port, Duration::from_secs(10));
    let link = captured(&sink, &base)["first"].clicks[0].clone();

    // 1,500 clients, each with half a request line, held open.
    let mut slow = Vec::with_capacity(1500);
    for _ in 0..1500 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET /c/AAAA HT").unwrap();
        slow.push(s);
    }
    let fds_under_attack = open_fds(pid);

    // 2,000 sends while they hold on, and a person's click in the middle of it.
    let jobs: Vec<String> = (0..2000)
        .map(|i| {
            job(
                &format!("r{i}"),
                "slow",
                "receipt",
                &format!("r{i}@x.test"),
                json!({"name": "R"}),
            )
        })
        .collect();
    enqueue_raw(&mut conn, &setup.prefix, &jobs);
    let t0 = Instant::now();
    let r = get(port, &link, MAIL_UA);
    let click = t0.elapsed();
    assert_eq!(r.status, 302);
    assert!(
        click < Duration::from_secs(2),
        "a real click took {click:?}"
    );
    wait_terminal(
        &mut conn,
        &setup.prefix,
        2001,
        Duration::from_secs(60),
        Some(&daemon),
    );
    let evs = events(&mut conn, &setup.prefix);
    assert_eq!(
        evs.iter().filter(|e| e["type"] == "delivered").count(),
        2001
    );
    assert!(
        fds_under_attack < 1024,
        "{fds_under_attack} descriptors open"
    );

    // The server closes every slow connection: evicted to make room, or past header_timeout.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut closed = 0;
    for s in &mut slow {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        s.set_read_timeout(Some(left)).unwrap();
        let mut buf = [0u8; 512];
        // EOF, or a 408/400 answer and then EOF; a timeout means still open.
        loop {
            match s.read(&mut buf) {
                Ok(0) => {
                    closed += 1;
                    break;
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    closed += 1;
                    break;
                }
                Err(_) => break,
            }
        }
    }
    assert_eq!(closed, 1500, "slow connections the server closed");
    let m = get(port, &link, MAIL_UA);
    assert_eq!(m.status, 302);
    println!("click under attack {click:?}; descriptors {fds_under_attack}; closed {closed}");
}

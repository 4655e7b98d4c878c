//! Trickling request bodies cannot lock out the tracking listener: 1,500 connections each send
//! a whole `POST /u/{token}` head and then one byte of its body every 5 s, against a daemon
//! limited to 1,024 descriptors (341 connection slots), while 2,000 sends go out. Every send
//! is delivered, a real click and an RFC 8058 one-click unsubscribe are answered within 2 s,
//! an unconfigured provider webhook answers 404 without waiting for its body, and the server
//! closes every trickling connection itself within 40 s (evicted to make room, or past
//! `tracking.request_timeout`, 20 s by default).

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::track::*;
use common::*;
use serde_json::json;

const TRICKLERS: usize = 1500;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Sends `raw` on a new connection and waits at most `limit` for the status line: the
/// status and how long it took, or what happened instead.
fn answered_within(port: u16, raw: &[u8], limit: Duration) -> Result<(u16, Duration), String> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.write_all(raw).map_err(|e| format!("write: {e}"))?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(t0.elapsed());
        if left.is_zero() {
            return Err(format!("no answer within {limit:?}"));
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Err(format!("closed without an answer after {:?}", t0.elapsed())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("no answer within {limit:?} ({e})")),
        }
        if let Some(end) = got.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&got[..end]).into_owned();
            let status = line
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| format!("not a status line: {line:?}"))?;
            return Ok((status, t0.elapsed()));
        }
    }
}

/// True once the server has closed `s` (EOF or reset, after a 408 or not).
fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

#[test]
fn trickling_bodies_neither_hold_the_slots_nor_block_a_click_or_an_unsubscribe() {
    let _machine = exclusive();
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let mport = free_port();
    let (setup, port, base) = tracking_setup(
        &redis.url(),
        sink.port,
        "",
        &format!("[metrics]\nlisten = \"127.0.0.1:{mport}\"\n"),
    );
    let mut conn = redis.conn();
    let data = json!({"first_name": "A", "products": []});
    enqueue_raw(
        &mut conn,
        &setup.prefix,
        &[job(
            "first",
            "trickle",
            "newsletter",
            "a@example.test",
            data,
        )],
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
    let mail = captured(&sink, &base).remove("first").unwrap();
    let (link, unsubscribe) = (mail.clicks[0].clone(), mail.unsubscribe.clone());

    // 1,500 clients, each with a whole one-click POST head and a body that never ends.
    let attack = Instant::now();
    let head = format!(
        "POST {unsubscribe} HTTP/1.1\r\nHost: x\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100000\r\n\r\n"
    );
    let mut slow = Vec::with_capacity(TRICKLERS);
    for _ in 0..TRICKLERS {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        // A connection turned away at once may refuse it: it is closed, as it should be.
        let _ = s.write_all(head.as_bytes());
        slow.push(s);
    }
    let connected = attack.elapsed();
    // A byte of body every 5 s on each (on clones: another thread watches for the closes).
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers: Vec<TcpStream> = slow.iter().map(|s| s.try_clone().unwrap()).collect();
    let trickle = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if Instant::now() >= next {
                    for w in &mut writers {
                        // A connection the server closed refuses it: that is the point.
                        let _ = w.write(b"a");
                    }
                    next += Duration::from_secs(5);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    // Watches for the server closing each trickler: when the last one was closed, or how
    // many were still open after 40 s.
    let watch = std::thread::spawn(move || {
        for s in &slow {
            s.set_nonblocking(true).unwrap();
        }
        let mut open: Vec<TcpStream> = slow;
        while attack.elapsed() < Duration::from_secs(40) {
            open.retain_mut(|s| !closed_by_server(s));
            if open.is_empty() {
                return Ok(attack.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(open.len())
    });
    // Every trickler has been taken in (or turned away) by the accept loop: the slots are
    // held by tricklers.
    let series = |reason: &str| {
        format!("paloma_http_connections_closed_total{{listener=\"tracking\",reason=\"{reason}\"}}")
    };
    wait_until_daemon(
        "the accept loop to see every trickler",
        Duration::from_secs(30),
        &daemon,
        || {
            let text = metrics_text(mport);
            let taken = |r: &str| metric_in(&text, &series(r)).unwrap_or(0.0);
            taken("evicted") + taken("all_busy") + taken("request_timeout")
                >= (TRICKLERS - 341) as f64
        },
    );
    let fds_under_attack = open_fds(pid);
    let taken_in = attack.elapsed();

    // 2,000 sends while they trickle, and a person's click and one-click unsubscribe.
    let jobs: Vec<String> = (0..2000)
        .map(|i| {
            job(
                &format!("r{i}"),
                "trickle",
                "receipt",
                &format!("r{i}@x.test"),
                json!({"name": "R"}),
            )
        })
        .collect();
    enqueue_raw(&mut conn, &setup.prefix, &jobs);
    let limit = Duration::from_secs(2);
    let click = format!("GET {link} HTTP/1.1\r\nHost: x\r\nUser-Agent: {MAIL_UA}\r\n\r\n");
    let (status, click_took) = answered_within(port, click.as_bytes(), limit)
        .unwrap_or_else(|e| panic!("a real click under attack: {e}"));
    assert_eq!(status, 302);
    let body = "List-Unsubscribe=One-Click";
    let one_click = format!(
        "POST {unsubscribe} HTTP/1.1\r\nHost: x\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (status, unsubscribe_took) = answered_within(port, one_click.as_bytes(), limit)
        .unwrap_or_else(|e| panic!("a one-click unsubscribe under attack: {e}"));
    assert_eq!(status, 200);
    wait_until("the unsubscribed event", Duration::from_secs(10), || {
        tracking_events(&mut conn, &setup.prefix, "first")
            .iter()
            .any(|e| e["type"] == "unsubscribed")
    });
    // No provider configured: 404 at once, without reading the body it announces.
    let webhook = "POST /webhooks/sendgrid HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n";
    let (status, _) = answered_within(port, webhook.as_bytes(), limit)
        .unwrap_or_else(|e| panic!("an unconfigured webhook: {e}"));
    assert_eq!(status, 404);

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

    // The server closes every trickler itself: evicted to make room, or past request_timeout.
    let all_closed = watch
        .join()
        .unwrap()
        .unwrap_or_else(|open| panic!("{open} tricklers still open 40 s into the attack"));
    stop.store(true, Ordering::Relaxed);
    trickle.join().unwrap();
    let text = metrics_text(mport);
    let closed = |r: &str| metric_in(&text, &series(r)).unwrap_or(0.0);
    let (evicted, timed_out) = (closed("evicted"), closed("request_timeout"));
    assert!(
        timed_out >= 1.0 && evicted + timed_out >= TRICKLERS as f64,
        "evicted {evicted}, timed out {timed_out}"
    );
    let (status, _) = answered_within(port, click.as_bytes(), limit).unwrap();
    assert_eq!(status, 302);
    println!(
        "click under attack {click_took:?}; one-click unsubscribe {unsubscribe_took:?}; \
         descriptors {fds_under_attack}; {TRICKLERS} tricklers connected after {connected:?}, \
         taken in after {taken_in:?}, \
         all closed after {all_closed:?} ({evicted} evicted, {timed_out} past request_timeout)"
    );
}

const TOKEN: &str = "api-token-7c31e9b04d5a2f68";

/// Watches `s` until the server closes it: how long after `since`.
fn wait_closed(s: &mut TcpStream, since: Instant, limit: Duration) -> Duration {
    s.set_nonblocking(true).unwrap();
    wait_for("the server to close the connection", limit, || {
        closed_by_server(s).then(|| since.elapsed())
    })
}

#[test]
fn the_api_listener_bounds_a_whole_request_yet_a_slow_sends_body_still_gets_its_408() {
    let _machine = exclusive();
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let port = free_port();
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        "",
        &format!("[api]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"{TOKEN}\"\ntimeout = \"2s\"\n"),
    );
    let _daemon = Daemon::spawn(&setup.config);
    wait_port("127.0.0.1", port, Duration::from_secs(30));

    // A sends body that stops coming: the handler answers 408 after api.timeout, before the
    // listener's own deadline (10 s for the head + api.timeout) would close the connection.
    let stalled = format!(
        "POST /api/v1/sends HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Length: 1000\r\n\r\n["
    );
    let (status, took) = answered_within(port, stalled.as_bytes(), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("a stalled sends body: {e}"));
    assert_eq!(status, 408);
    assert!(took >= Duration::from_secs(2), "408 after {took:?}");

    // A sign-in form trickled a byte a second, which no handler deadline covers: the
    // listener closes it 12 s (10 s + api.timeout) after the connection was opened.
    let opened = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(
        b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n\
          Content-Length: 1000\r\n\r\ntoken=",
    )
    .unwrap();
    let mut w = s.try_clone().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let trickle = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) && w.write(b"a").is_ok() {
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    let closed = wait_closed(&mut s, opened, Duration::from_secs(20));
    stop.store(true, Ordering::Relaxed);
    trickle.join().unwrap();
    assert!(
        closed >= Duration::from_secs(12),
        "closed after {closed:?}, before its deadline"
    );
    println!("stalled sends body: 408 after {took:?}; trickled /login closed after {closed:?}");
}

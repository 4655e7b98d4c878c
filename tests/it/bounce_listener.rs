//! The bounce listener under hostile input, spoken to over SMTP: it never relays, refuses
//! oversize messages, ignores forged tokens, reports for addresses paloma never sent to and
//! garbage, and records an ARF complaint (RFC 5965's example, with the original message as
//! paloma sent it attached) against the job it names.

use crate::common;

use std::time::Duration;

use common::bounce::{arf, Client};
use common::*;

#[test]
fn the_listener_refuses_relaying_oversize_and_forgeries_and_records_a_complaint() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let bounce_port = free_port();
    let metrics_port = free_port();
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        "",
        &format!(
            "[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n[bounces]\ndomain = \"bounces.test\"\nlisten = \"127.0.0.1:{bounce_port}\"\naccept = [\"fbl@bounces.test\"]\nmax_message_bytes = 1048576\n"
        ),
    );
    let daemon = Daemon::spawn(&setup.config);
    let mut conn = redis.conn();
    enqueue_raw(&mut conn, &setup.prefix, &jobs(2, "spring", "example.test"));
    wait_terminal(
        &mut conn,
        &setup.prefix,
        2,
        Duration::from_secs(30),
        Some(&daemon),
    );
    wait_port("127.0.0.1", bounce_port, Duration::from_secs(10));
    // The return path paloma used for spring-0, as the sink saw it.
    let dumps = sink.dumps();
    let dump = dumps
        .iter()
        .map(|d| String::from_utf8_lossy(d).into_owned())
        .find(|d| d.contains("X-Paloma-Id: spring-0"))
        .expect("spring-0 at the sink");
    // smtp-sink records the MAIL command's arguments as `X-Mail-Args: FROM:<…>`.
    let return_path = dump
        .lines()
        .find_map(|l| l.strip_prefix("X-Mail-Args: "))
        .and_then(|a| a.split(['<', '>']).nth(1))
        .unwrap_or_default()
        .to_string();
    assert!(
        return_path.starts_with("b-") && return_path.ends_with("@bounces.test"),
        "VERP envelope sender: {return_path:?}\n{dump}"
    );

    let reason = |addr: &str, conn: &mut redis::Connection| -> Option<String> {
        redis::cmd("HGET")
            .arg(format!("{}suppressed", setup.prefix))
            .arg(addr)
            .query(conn)
            .unwrap()
    };
    let mut c = Client::connect(bounce_port);
    assert!(c.cmd("EHLO fbl.example.net").starts_with("250"));
    // Never a relay.
    assert!(c.cmd("MAIL FROM:<x@evil.test>").starts_with("250"));
    let r = c.cmd("RCPT TO:<victim@elsewhere.test>");
    assert!(r.starts_with("550"), "{r}");
    assert!(c.cmd("RSET").starts_with("250"));
    // Oversize (2 MB over a 1 MB limit): refused, the session goes on.
    let big = vec![b'a'; 1000]
        .into_iter()
        .chain(*b"\r\n")
        .cycle()
        .take(2 << 20)
        .collect::<Vec<u8>>();
    let r = c.send("", "fbl@bounces.test", &big);
    assert!(r.starts_with("552"), "{r}");
    // Garbage: taken, nothing recorded.
    let r = c.send(
        "",
        "fbl@bounces.test",
        b"\x00\x01garbage\xff\r\nno headers at all",
    );
    assert!(r.starts_with("250"), "{r}");
    // A forged token (right shape, wrong MAC) naming a real job: ignored.
    let forged = format!("b-{}@bounces.test", "0".repeat(32));
    let r = c.send(
        "",
        &forged,
        arf("spring-1", "u1@example.test", &forged).as_bytes(),
    );
    assert!(r.starts_with("250"), "{r}");
    assert!(
        events(&mut conn, &setup.prefix)
            .iter()
            .all(|e| e["type"] != "complained"),
        "a forgery records nothing"
    );
    assert_eq!(
        reason("u1@example.test", &mut conn),
        None,
        "a forgery suppresses nobody"
    );
    // A report about an address paloma never sent to (an unknown job id): ignored.
    let r = c.send(
        "",
        "fbl@bounces.test",
        arf("never-sent", "who@example.test", "x@y").as_bytes(),
    );
    assert!(r.starts_with("250"), "{r}");
    // A job id paloma sent, but naming another recipient and no token: ignored.
    let r = c.send(
        "",
        "fbl@bounces.test",
        arf("spring-1", "other@example.test", "x@y").as_bytes(),
    );
    assert!(r.starts_with("250"), "{r}");
    // The real complaint about spring-0, to the feedback-loop address.
    let r = c.send(
        "",
        "fbl@bounces.test",
        arf("spring-0", "u0@example.test", &return_path).as_bytes(),
    );
    assert!(r.starts_with("250"), "{r}");
    // The same report again (a retry): recorded once.
    let r = c.send(
        "",
        "fbl@bounces.test",
        arf("spring-0", "u0@example.test", &return_path).as_bytes(),
    );
    assert!(r.starts_with("250"), "{r}");
    // A bounce in plain text that quotes only the original Message-ID (no token, no
    // X-Paloma-Id): the Message-ID is the job's token, so it names spring-1.
    let dump1 = dumps
        .iter()
        .map(|d| String::from_utf8_lossy(d).into_owned())
        .find(|d| d.contains("X-Paloma-Id: spring-1"))
        .expect("spring-1 at the sink");
    let mid = dump1
        .lines()
        .find_map(|l| l.strip_prefix("Message-ID: "))
        .expect("a Message-ID")
        .trim()
        .to_string();
    let plain = format!(
        "From: MAILER-DAEMON@old.example.net\r\nSubject: failure notice\r\n\r\nHi. This is the mail system at old.example.net.\r\n<u1@example.test>:\r\n550 5.1.1 mailbox does not exist\r\n\r\n--- Original message headers\r\n\r\nMessage-ID: {mid}\r\nSubject: Spring\r\n"
    );
    let r = c.send("", "postmaster@bounces.test", plain.as_bytes());
    assert!(r.starts_with("250"), "{r}");
    // A 20 KB line (past the 4 KB line limit, read in pieces) and a dot-stuffed line ending
    // in a lone dot that is not the end: taken as one message.
    let long = format!(
        "From: a@b.test\r\nSubject: x\r\n\r\n{}.\r\n...\r\nend",
        "y".repeat(20_000)
    );
    let r = c.send("", "fbl@bounces.test", long.as_bytes());
    assert!(r.starts_with("250"), "{r}");
    assert!(
        c.cmd("NOOP").starts_with("250"),
        "the session is still in step"
    );
    assert!(c.cmd("QUIT").starts_with("221"));

    // 250 came after the write: the events are there now.
    let evs = events(&mut conn, &setup.prefix);
    let complaints: Vec<_> = evs.iter().filter(|e| e["type"] == "complained").collect();
    assert_eq!(complaints.len(), 1, "{complaints:?}");
    let e = complaints[0];
    assert_eq!(e["id"], "spring-0");
    assert_eq!(e["campaign"], "spring");
    assert_eq!(e["to"], "u0@example.test");
    assert_eq!(e["feedback_type"], "abuse");
    assert_eq!(e["source"], "ExampleFBL/1.0");
    let returned: Vec<_> = evs.iter().filter(|e| e["type"] == "returned").collect();
    assert_eq!(returned.len(), 1, "{returned:?}");
    assert_eq!(returned[0]["id"], "spring-1");
    assert_eq!(returned[0]["status"], "5.1.1");
    assert_eq!(returned[0]["class"], "invalid_recipient");
    assert_eq!(
        reason("u0@example.test", &mut conn).as_deref(),
        Some("complained")
    );
    // spring-1's address is suppressed by the plain-text bounce, not by the forgery.
    assert_eq!(
        reason("u1@example.test", &mut conn).as_deref(),
        Some("bounced")
    );
    let kind = |k: &str| {
        metric(
            metrics_port,
            &format!("paloma_reports_total{{kind=\"{k}\"}}"),
        )
    };
    assert_eq!(kind("complained"), 1.0);
    assert_eq!(kind("duplicate"), 1.0);
    assert_eq!(kind("forged"), 1.0);
    assert_eq!(kind("unmatched"), 2.0);
    assert_eq!(kind("other"), 2.0);
    let (_, out, _) = paloma(
        &[
            "stats",
            "--config",
            setup.config.to_str().unwrap(),
            "--json",
        ],
        None,
    );
    let stats: serde_json::Value = serde_json::from_str(&out).expect("stats --json");
    let spring = stats["campaigns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["campaign"] == "spring")
        .unwrap();
    assert_eq!(spring["complained"], 1);
    assert_eq!(spring["complaint_rate"], 0.5);
}

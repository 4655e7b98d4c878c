//! The bounce listener's SMTP sessions against hostile clients, over raw sockets to the
//! real daemon: a multi-byte recipient (once a panic of the session task), a bare `\n.\n`
//! inside DATA (once the end of the message: SMTP smuggling), 256 sessions trickling in DATA
//! (once 421 for everyone else), trickling past the DATA and session deadlines, and 40
//! sessions each holding 10 MB of unfinished DATA (once 10 MB of memory each).

use crate::common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::bounce::*;
use common::*;

#[test]
fn a_multibyte_recipient_is_answered_and_the_session_goes_on() {
    let b = Bounces::start(1, "mb", "");
    let mut c = Client::connect(b.port);
    assert!(c.cmd("EHLO x.example").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<>").starts_with("250"));
    for rcpt in [
        "€€x@bounces.test",
        "b€@bounces.test",
        "€@bounces.test",
        "b-€€€€€€€€€€€€€€€€@bounces.test",
        "€€x@€€.test",
    ] {
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        assert!(
            r.starts_with("250") || r.starts_with("550"),
            "RCPT TO:<{rcpt}> got {r:?}; daemon log:\n{}",
            b.daemon.log_text()
        );
    }
    assert!(c.cmd("MAIL FROM:<€@x> SIZE=€€").starts_with("250"));
    assert!(c.cmd("NOOP").starts_with("250"), "still in step");
    assert!(c.cmd("QUIT").starts_with("221"));
    assert!(
        !b.daemon.log_text().contains("panicked"),
        "{}",
        b.daemon.log_text()
    );
}

#[test]
fn only_crlf_dot_crlf_ends_data_so_nothing_can_be_smuggled() {
    let b = Bounces::start(1, "sm", "");
    let rp = b.return_paths()["sm-0"].clone();
    // A harmless message whose body, after bare-LF "ends" of DATA, carries a second
    // transaction: a complaint about sm-0 under its real token.
    // The smuggled message needs no end of its own: the outer CRLF.CRLF would end it.
    let smuggled = format!(
        "MAIL FROM:<>\r\nRCPT TO:<{rp}>\r\nDATA\r\n{}",
        arf("sm-0", "u0@example.test", &rp)
    );
    let body = format!("Subject: hello\r\n\r\nhi\n.\nthere\r\n.\nagain\n.\r\n{smuggled}");
    let mut c = Client::connect(b.port);
    // Not a null sender: the outer message is then plainly nothing to act on.
    c.start_data("someone@example.net", "fbl@bounces.test");
    c.write(body.as_bytes()).unwrap();
    c.write(b".\r\n").unwrap();
    let r = c.reply();
    assert!(r.starts_with("250"), "{r}");
    // One message, one reply: the next reply is QUIT's, not one to a smuggled command.
    let r = c.cmd("QUIT");
    assert!(
        r.starts_with("221"),
        "a smuggled command was answered: {r:?}"
    );
    assert!(
        b.events_of("complained").is_empty(),
        "smuggled report recorded"
    );
    assert_eq!(b.suppressed("u0@example.test"), None);
    assert_eq!(b.metric("paloma_reports_total{kind=\"other\"}"), 1.0);
}

/// One session that has started DATA and sent one line, then holds.
fn trickler(port: u16) -> Client {
    let mut c = Client::connect(port);
    c.start_data("", "postmaster@bounces.test");
    c.write(b"Subject: slowly\r\n").unwrap();
    c
}

#[test]
fn at_the_cap_the_oldest_trickling_session_makes_room_for_a_real_dsn() {
    let _machine = exclusive();
    let b = Bounces::start(1, "cap", "max_connections = 256\n");
    let rp = b.return_paths()["cap-0"].clone();
    let mut held: Vec<Client> = (0..256).map(|_| trickler(b.port)).collect();
    // A reporting MTA's DSN, sent with Python's smtplib.
    let t = Instant::now();
    let sent = smtplib_send(
        b.port,
        "",
        &rp,
        dsn(
            "u0@example.test",
            "5.1.1",
            "550 5.1.1 user unknown",
            "mx.example.test",
            "",
        )
        .as_bytes(),
    );
    let took = t.elapsed();
    assert_eq!(sent, Ok(()), "a DSN at the cap");
    eprintln!(
        "256 trickling sessions held; a real DSN sent with smtplib recorded in {took:?} (Python start included)"
    );
    let returned = b.events_of("returned");
    assert_eq!(returned.len(), 1, "{returned:?}");
    assert_eq!(returned[0]["id"], "cap-0");
    assert_eq!(b.suppressed("u0@example.test").as_deref(), Some("bounced"));
    // The oldest trickler was told and closed.
    let r = held[0].reply();
    assert!(r.starts_with("421 4.3.2"), "the oldest session: {r:?}");
    assert_eq!(held[0].reply(), "", "then closed");
    wait_until_daemon(
        "one eviction counted",
        Duration::from_secs(10),
        &b.daemon,
        || b.metric("paloma_bounce_sessions_closed_total{reason=\"evicted\"}") == 1.0,
    );
    // The newest trickler is still there.
    let last = held.last_mut().unwrap();
    last.write(b"\r\n.\r\n").unwrap();
    assert!(last.reply().starts_with("250"));
}

/// Writes a line into `c`'s socket every `every` until a write fails or `stop` is set.
fn trickle(
    c: &Client,
    line: &'static [u8],
    every: Duration,
) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let mut w = c.r.get_ref().try_clone().unwrap();
    std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) && w.write_all(line).is_ok() {
            std::thread::sleep(every);
        }
    });
    stop
}

#[test]
fn trickling_is_cut_at_the_data_and_session_deadlines() {
    let _machine = exclusive();
    use std::sync::atomic::Ordering;
    let b = Bounces::start(
        1,
        "dl",
        "timeout = \"30s\"\ndata_timeout = \"2s\"\nsession_timeout = \"4s\"\n",
    );
    // DATA: a line every 200 ms, well within the per-line timeout, for ever.
    // Each clock starts before the step that starts the daemon's: its DATA deadline runs
    // from the DATA command, its session deadline from the accept, both of which come
    // before this side sees their replies.
    let mut data = Client::connect(b.port);
    let t = Instant::now();
    data.start_data("", "postmaster@bounces.test");
    let stop_data = trickle(&data, b"x\r\n", Duration::from_millis(200));
    // Commands: a NOOP every 200 ms.
    let t_session = Instant::now();
    let mut cmds = Client::connect(b.port);
    let stop_cmds = trickle(&cmds, b"NOOP\r\n", Duration::from_millis(200));
    let r = data.reply();
    let in_data = t.elapsed();
    stop_data.store(true, Ordering::Relaxed);
    assert!(r.starts_with("421 4.4.2 DATA time limit"), "{r:?}");
    assert!(in_data >= Duration::from_secs(2), "{in_data:?}");
    let r = loop {
        let r = cmds.reply();
        if !r.starts_with("250") {
            break r;
        }
    };
    let session = t_session.elapsed();
    stop_cmds.store(true, Ordering::Relaxed);
    assert!(r.starts_with("421 4.4.2 session time limit"), "{r:?}");
    assert!(session >= Duration::from_secs(4), "{session:?}");
    eprintln!("DATA trickle cut after {in_data:?} (data_timeout 2s), NOOP trickle after {session:?} (session_timeout 4s)");
    for reason in ["data_timeout", "session_timeout"] {
        let series = format!("paloma_bounce_sessions_closed_total{{reason=\"{reason}\"}}");
        wait_until_daemon(&series, Duration::from_secs(10), &b.daemon, || {
            b.metric(&series) == 1.0
        });
    }
}

#[test]
fn forty_sessions_of_unfinished_10mb_data_hold_less_than_100mb() {
    let _machine = exclusive();
    // Each session may wait long for its next line: only memory bounds them here.
    let b = Bounces::start(1, "mem", "timeout = \"5m\"\n");
    let rp = b.return_paths()["mem-0"].clone();
    let pid = b.daemon.pid().unwrap();
    let before = vm_rss_kb(pid);
    let line = [b"y".repeat(998), b"\r\n".to_vec()].concat();
    let chunk: Vec<u8> = line.iter().copied().cycle().take(1_000_000).collect();
    let mut held = Vec::new();
    for _ in 0..40 {
        let mut c = Client::connect(b.port);
        c.start_data("", "postmaster@bounces.test");
        for _ in 0..10 {
            c.write(&chunk).unwrap();
        }
        held.push(c);
    }
    wait_until_daemon(
        "the daemon to read every byte sent",
        Duration::from_secs(120),
        &b.daemon,
        || loopback_drained(b.port),
    );
    let after = vm_rss_kb(pid);
    let grown_mb = after.saturating_sub(before) as f64 / 1024.0;
    eprintln!(
        "40 sessions x 10 MB of unfinished DATA: VmRSS {} MB -> {} MB (+{grown_mb:.1} MB)",
        before / 1024,
        after / 1024
    );
    assert!(grown_mb < 100.0, "+{grown_mb:.1} MB");
    // A real DSN still gets in and is recorded meanwhile.
    let mut c = Client::connect(b.port);
    let r = c.send(
        "",
        &rp,
        dsn(
            "u0@example.test",
            "5.1.1",
            "550 5.1.1 user unknown",
            "mx.example.test",
            "",
        )
        .as_bytes(),
    );
    assert!(r.starts_with("250"), "{r}");
    assert_eq!(b.events_of("returned").len(), 1);
    // A held message ended: taken (250, recorded as nothing) if it fitted in the budget,
    // else 452 so that its sender retries.
    let last = held.len() - 1;
    for i in [0, last] {
        let c = &mut held[i];
        c.write(b"\r\n.\r\n").unwrap();
        let r = c.reply();
        assert!(r.starts_with("250") || r.starts_with("452"), "{r}");
    }
}

//! The bounce listener's intake: DSNs per second it takes in (SMTP, parse, token check,
//! lookup, write) on this machine, against the release build and a real Redis.
//!
//! ```text
//! cargo bench --bench bounces                  # 20,000 DSNs over 8 sessions
//! cargo bench --bench bounces -- --quick       # 2,000
//! ```
//!
//! Each DSN is a Postfix-style RFC 3464 report of a permanent failure for a job whose token
//! was written as the intake writes it; every one must end as one `returned` event.

#[path = "../tests/it/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use paloma::bounces::ReturnPaths;
use paloma::store::keys::Keys;

fn dsn(to: &str, id: &str) -> String {
    format!(
        "From: MAILER-DAEMON@relay.bench.test (Mail Delivery System)\r\n\
Subject: Undelivered Mail Returned to Sender\r\n\
Auto-Submitted: auto-replied\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\
\r\n\
--B\r\n\
Content-Type: text/plain\r\n\
\r\n\
I'm sorry to have to inform you that your message could not be delivered.\r\n\
\r\n\
--B\r\n\
Content-Type: message/delivery-status\r\n\
\r\n\
Reporting-MTA: dns; relay.bench.test\r\n\
\r\n\
Final-Recipient: rfc822; {to}\r\n\
Action: failed\r\n\
Status: 5.1.1\r\n\
Diagnostic-Code: smtp; 550 5.1.1 <{to}>: Recipient address rejected: User unknown\r\n\
\r\n\
--B\r\n\
Content-Type: text/rfc822-headers\r\n\
\r\n\
From: news@shop.test\r\n\
To: {to}\r\n\
X-Paloma-Id: {id}\r\n\
Subject: Spring\r\n\
\r\n\
--B--\r\n.\r\n"
    )
}

fn reply(r: &mut BufReader<TcpStream>) -> String {
    loop {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        if l.len() < 4 || l.as_bytes()[3] != b'-' {
            return l;
        }
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n: usize = if quick { 2_000 } else { 20_000 };
    let sessions = 8;
    let redis = Redis::start();
    let bounce_port = free_port();
    let setup = Setup::new(
        &redis.url(),
        free_port(),
        "",
        "",
        &format!("[bounces]\ndomain = \"bounces.test\"\nlisten = \"127.0.0.1:{bounce_port}\"\n"),
    );
    let text = std::fs::read_to_string(&setup.config).unwrap();
    let settings = paloma::config::Settings::from_toml(&text, Vec::new()).unwrap();
    let paths = ReturnPaths::new(&settings).unwrap();
    let keys = Keys::new(&setup.prefix);
    let mut conn = redis.conn();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut p = redis::pipe();
        for i in chunk {
            let id = format!("b-{i}");
            let v = serde_json::json!({"id": id, "campaign": "bench", "to": format!("u{i}@example.test")});
            p.cmd("SET")
                .arg(keys.return_path(&paths.key(&id)))
                .arg(v.to_string())
                .ignore();
        }
        p.query::<()>(&mut conn).unwrap();
    }
    let daemon = Daemon::spawn(&setup.config);
    wait_port("127.0.0.1", bounce_port, Duration::from_secs(30));
    let t = Instant::now();
    let threads: Vec<_> = (0..sessions)
        .map(|s| {
            let paths = paths.clone();
            std::thread::spawn(move || {
                let sock = TcpStream::connect(("127.0.0.1", bounce_port)).unwrap();
                sock.set_nodelay(true).unwrap();
                let mut r = BufReader::new(sock);
                reply(&mut r);
                r.get_mut().write_all(b"EHLO bench\r\n").unwrap();
                reply(&mut r);
                for i in (s..n).step_by(sessions) {
                    let id = format!("b-{i}");
                    let to = format!("u{i}@example.test");
                    // MAIL, RCPT and DATA pipelined; then the message.
                    let cmds = format!(
                        "MAIL FROM:<>\r\nRCPT TO:<{}>\r\nDATA\r\n",
                        paths.address(&id)
                    );
                    r.get_mut().write_all(cmds.as_bytes()).unwrap();
                    for _ in 0..3 {
                        reply(&mut r);
                    }
                    r.get_mut().write_all(dsn(&to, &id).as_bytes()).unwrap();
                    let a = reply(&mut r);
                    assert!(a.starts_with("250"), "{a}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    let returned: i64 = redis::cmd("HGET")
        .arg(keys.stats("bench"))
        .arg("returned")
        .query(&mut conn)
        .unwrap();
    assert_eq!(returned as usize, n, "every DSN recorded once");
    println!(
        "paloma bounce listener: {n} DSNs over {sessions} sessions in {secs:.2} s: {:.0} DSNs/s (each answered 250 after its write)",
        n as f64 / secs
    );
    drop(daemon);
}

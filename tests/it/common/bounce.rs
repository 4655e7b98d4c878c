//! The bounce listener's side of the tests: an SMTP client speaking to it line by line
//! (raw sockets, so that a test controls every byte, bare LFs and unfinished DATA
//! included), a daemon with `[bounces]` on that has sent some jobs through smtp-sink, and
//! the reports to send it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;

use super::*;

/// One SMTP client session, line by line.
pub struct Client {
    pub r: BufReader<TcpStream>,
}

impl Client {
    /// Connects and returns the session with the server's greeting (read whole).
    pub fn open(port: u16) -> (Client, String) {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_nodelay(true).unwrap();
        let mut c = Client {
            r: BufReader::new(s),
        };
        let greeting = c.reply();
        (c, greeting)
    }

    /// Connects and checks the 220 greeting.
    pub fn connect(port: u16) -> Client {
        let (c, greeting) = Self::open(port);
        assert!(greeting.starts_with("220"), "greeting {greeting:?}");
        c
    }

    /// The last line of a (possibly multi-line) reply; empty when the server closed.
    pub fn reply(&mut self) -> String {
        loop {
            let mut l = String::new();
            if self.r.read_line(&mut l).is_err() {
                return l;
            }
            if l.len() < 4 || l.as_bytes()[3] != b'-' {
                return l;
            }
        }
    }

    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.r.get_mut().write_all(bytes)
    }

    pub fn cmd(&mut self, line: &str) -> String {
        if self.write(format!("{line}\r\n").as_bytes()).is_err() {
            return String::new();
        }
        self.reply()
    }

    /// EHLO, MAIL FROM:<from>, RCPT TO:<to> and DATA, each checked.
    pub fn start_data(&mut self, from: &str, to: &str) {
        let r = self.cmd("EHLO reporter.example.net");
        assert!(r.starts_with("250"), "EHLO: {r}");
        let r = self.cmd(&format!("MAIL FROM:<{from}>"));
        assert!(r.starts_with("250"), "MAIL: {r}");
        let r = self.cmd(&format!("RCPT TO:<{to}>"));
        assert!(r.starts_with("250"), "RCPT: {r}");
        let r = self.cmd("DATA");
        assert!(r.starts_with("354"), "DATA: {r}");
    }

    /// A whole transaction (the message must need no dot-stuffing); the final reply.
    pub fn send(&mut self, from: &str, to: &str, message: &[u8]) -> String {
        self.start_data(from, to);
        let mut body = Vec::with_capacity(message.len() + 5);
        body.extend_from_slice(message);
        body.extend_from_slice(b"\r\n.\r\n");
        self.write(&body).unwrap();
        self.reply()
    }
}

/// A daemon with `[bounces] domain = "bounces.test"` (and `accept =
/// ["fbl@bounces.test"]`) that has delivered jobs `{tag}-{i}` to `u{i}@example.test`.
pub struct Bounces {
    pub redis: Redis,
    pub sink: Sink,
    pub setup: Setup,
    pub daemon: Daemon,
    pub port: u16,
    pub metrics_port: u16,
}

impl Bounces {
    /// `bounces_extra`: more `[bounces]` keys.
    pub fn start(n: usize, tag: &str, bounces_extra: &str) -> Bounces {
        let redis = Redis::start();
        let sink = Sink::start(&[]);
        let port = free_port();
        let metrics_port = free_port();
        let setup = Setup::new(
            &redis.url(),
            sink.port,
            "",
            "",
            &format!(
                "[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n[bounces]\ndomain = \"bounces.test\"\nlisten = \"127.0.0.1:{port}\"\naccept = [\"fbl@bounces.test\"]\n{bounces_extra}\n"
            ),
        );
        let daemon = Daemon::spawn(&setup.config);
        let mut conn = redis.conn();
        enqueue_raw(&mut conn, &setup.prefix, &jobs(n, tag, "example.test"));
        wait_terminal(
            &mut conn,
            &setup.prefix,
            n,
            Duration::from_secs(60),
            Some(&daemon),
        );
        wait_port("127.0.0.1", port, Duration::from_secs(10));
        Bounces {
            redis,
            sink,
            setup,
            daemon,
            port,
            metrics_port,
        }
    }

    /// Stops the daemon and starts it again on a config changed by `edit`.
    pub fn restart_with(&mut self, edit: impl Fn(&str) -> String) {
        self.daemon.kill9();
        let text = std::fs::read_to_string(&self.setup.config).unwrap();
        std::fs::write(&self.setup.config, edit(&text)).unwrap();
        self.daemon = Daemon::spawn(&self.setup.config);
        wait_port("127.0.0.1", self.port, Duration::from_secs(20));
    }

    /// The envelope sender (VERP return path) of each message at the sink, by job id.
    pub fn return_paths(&self) -> HashMap<String, String> {
        return_paths(&self.sink)
    }

    pub fn events_of(&self, kind: &str) -> Vec<Value> {
        events(&mut self.redis.conn(), &self.setup.prefix)
            .into_iter()
            .filter(|e| e["type"] == kind)
            .collect()
    }

    /// Why `addr` is suppressed, if it is.
    pub fn suppressed(&self, addr: &str) -> Option<String> {
        redis::cmd("HGET")
            .arg(format!("{}suppressed", self.setup.prefix))
            .arg(addr)
            .query(&mut self.redis.conn())
            .unwrap()
    }

    pub fn metric(&self, series: &str) -> f64 {
        metric(self.metrics_port, series)
    }
}

/// The envelope sender (VERP return path) of each message at `sink`, by job id.
pub fn return_paths(sink: &Sink) -> HashMap<String, String> {
    sink.dumps()
        .iter()
        .filter_map(|d| {
            let d = String::from_utf8_lossy(d);
            let id = d
                .lines()
                .find_map(|l| l.strip_prefix("X-Paloma-Id: "))?
                .trim()
                .to_string();
            // smtp-sink records MAIL's arguments as `X-Mail-Args: FROM:<…>`.
            let rp = d
                .lines()
                .find_map(|l| l.strip_prefix("X-Mail-Args: "))?
                .split(['<', '>'])
                .nth(1)?
                .to_string();
            Some((id, rp))
        })
        .collect()
}

/// An RFC 3464 DSN for one recipient; `text` goes in its human-readable part.
pub fn dsn(rcpt: &str, status: &str, diagnostic: &str, mta: &str, text: &str) -> String {
    format!(
        "From: MAILER-DAEMON@relay.example.net (Mail Delivery System)\r\n\
Subject: Undelivered Mail Returned to Sender\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\
\r\n\
--B\r\n\
Content-Type: text/plain\r\n\
\r\n\
Your message could not be delivered.\r\n\
{text}\r\n\
--B\r\n\
Content-Type: message/delivery-status\r\n\
\r\n\
Reporting-MTA: dns; {mta}\r\n\
\r\n\
Final-Recipient: rfc822; {rcpt}\r\n\
Action: failed\r\n\
Status: {status}\r\n\
Diagnostic-Code: smtp; {diagnostic}\r\n\
\r\n\
--B--\r\n"
    )
}

/// An ARF complaint (RFC 5965) returning a message with `X-Paloma-Id: {id}`, to `rcpt`, sent
/// with `return_path`.
pub fn arf(id: &str, rcpt: &str, return_path: &str) -> String {
    format!(
        "From: <staff@fbl.example.net>\r\n\
Subject: FW: Spring sale\r\n\
To: <fbl@bounces.test>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=feedback-report; boundary=\"b1\"\r\n\
\r\n\
--b1\r\n\
Content-Type: text/plain\r\n\
\r\n\
This is an email abuse report.\r\n\
--b1\r\n\
Content-Type: message/feedback-report\r\n\
\r\n\
Feedback-Type: abuse\r\n\
User-Agent: ExampleFBL/1.0\r\n\
Version: 1\r\n\
Original-Rcpt-To: <{rcpt}>\r\n\
Source-IP: 192.0.2.1\r\n\
\r\n\
--b1\r\n\
Content-Type: message/rfc822\r\n\
\r\n\
Return-Path: <{return_path}>\r\n\
From: Shop Test <news@shop.test>\r\n\
To: <{rcpt}>\r\n\
X-Paloma-Id: {id}\r\n\
Subject: Spring\r\n\
\r\n\
Hello\r\n\
--b1--\r\n"
    )
}

/// The resident set of process `pid` (VmRSS), in KB.
pub fn vm_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// True when every byte on the loopback TCP connections of `port` has been read by its
/// receiver: nothing unacknowledged in a send queue, nothing unread in a receive queue
/// (`/proc/net/tcp`).
pub fn loopback_drained(port: u16) -> bool {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let port_of = |addr: &str| {
        addr.rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    text.lines().skip(1).all(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (Some(local), Some(remote), Some(queues)) = (f.get(1), f.get(2), f.get(4)) else {
            return true;
        };
        if port_of(local) != Some(port) && port_of(remote) != Some(port) {
            return true;
        }
        queues
            .split(':')
            .all(|q| u64::from_str_radix(q, 16) == Ok(0))
    })
}

/// Sends `message` from `from` to `to` with Python's smtplib (a standard client, as a
/// reporting MTA would): Ok once the server answered 250 to the final dot, else its error.
pub fn smtplib_send(port: u16, from: &str, to: &str, message: &[u8]) -> Result<(), String> {
    use std::process::{Command, Stdio};
    require_tools();
    let script = "import smtplib, sys\n\
s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]), timeout=20)\n\
s.sendmail(sys.argv[2], [sys.argv[3]], sys.stdin.buffer.read())\n\
s.quit()\n";
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", script, &port.to_string(), from, to])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting python3");
    child.stdin.take().unwrap().write_all(message).unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

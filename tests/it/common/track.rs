//! HTTP helpers for tests that click through captured mail: plain HTTP/1.1 requests over a
//! TCP stream, and the tracked links, pixel and unsubscribe URL of each captured message.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use mail_parser::MessageParser;
use serde_json::Value;

use super::{events, Sink};

pub const MAIL_UA: &str =
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)";
pub const PROXY_UA: &str =
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)";

pub struct Resp {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request on its own connection; `target` goes on the request line as is.
pub fn request(
    port: u16,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    try_request(port, method, target, headers, body).unwrap_or_else(|e| panic!("{e}"))
}

/// [`request`], with what went wrong (no connection, no answer within 10 s) as an error.
pub fn try_request(
    port: u16,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Resp, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connecting: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req =
        format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .and_then(|_| s.write_all(body))
        .map_err(|e| format!("sending: {e}"))?;
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no response head: {:?}", String::from_utf8_lossy(&raw)))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Resp {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    })
}

pub fn get(port: u16, target: &str, ua: &str) -> Resp {
    request(port, "GET", target, &[("User-Agent", ua)], b"")
}

pub fn one_click(port: u16, target: &str) -> Resp {
    request(
        port,
        "POST",
        target,
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("User-Agent", "Mozilla/5.0 (compatible; Google-Unsubscribe)"),
        ],
        b"List-Unsubscribe=One-Click",
    )
}

/// What one captured message points at: paths of its tracked links, its pixel and its
/// List-Unsubscribe URL, relative to the tracking server.
pub struct Mail {
    pub to: String,
    pub subject: String,
    pub html: String,
    pub text: String,
    pub clicks: Vec<String>,
    pub pixel: String,
    pub unsubscribe: String,
}

pub fn paths_after(html: &str, prefix: &str) -> Vec<String> {
    html.match_indices(prefix)
        .map(|(i, _)| {
            let rest = &html[i + prefix.len()..];
            rest[..rest.find('"').unwrap()].to_string()
        })
        .collect()
}

pub fn captured(sink: &Sink, base: &str) -> HashMap<String, Mail> {
    let mut out = HashMap::new();
    for raw in sink.dumps() {
        let msg = MessageParser::default().parse(&raw).expect("parsable mail");
        let id = msg.header_raw("X-Paloma-Id").unwrap().trim().to_string();
        let html = msg.body_html(0).unwrap().into_owned();
        let text = msg.body_text(0).map(|t| t.into_owned()).unwrap_or_default();
        let to = msg
            .header_raw("To")
            .unwrap_or_default()
            .trim()
            .trim_start_matches('<')
            .trim_end_matches('>')
            .to_string();
        let subject = msg.subject().unwrap_or_default().to_string();
        let clicks: Vec<String> = paths_after(&html, &format!("href=\"{base}"))
            .into_iter()
            .filter(|p| p.starts_with("/c/"))
            .collect();
        let pixel = paths_after(&html, &format!("src=\"{base}"))
            .into_iter()
            .find(|p| p.starts_with("/o/"))
            .expect("an open pixel");
        let lu = msg.header_raw("List-Unsubscribe").unwrap();
        let lu = lu.trim().trim_start_matches('<').trim_end_matches('>');
        let unsubscribe = lu
            .strip_prefix(base)
            .expect("unsubscribe on the tracking server");
        out.insert(
            id,
            Mail {
                to,
                subject,
                html,
                text,
                clicks,
                pixel,
                unsubscribe: unsubscribe.to_string(),
            },
        );
    }
    out
}

/// Tracking events (opened, clicked, unsubscribed) of job `id`.
pub fn tracking_events(conn: &mut redis::Connection, prefix: &str, id: &str) -> Vec<Value> {
    events(conn, prefix)
        .into_iter()
        .filter(|e| {
            e["id"] == id
                && matches!(
                    e["type"].as_str(),
                    Some("opened" | "clicked" | "unsubscribed")
                )
        })
        .collect()
}

/// Waits until job `id` has at least `n` tracking events.
pub fn wait_tracking(conn: &mut redis::Connection, prefix: &str, id: &str, n: usize) -> Vec<Value> {
    let got = super::poll(Duration::from_secs(10), || {
        let evs = tracking_events(conn, prefix, id);
        (evs.len() >= n).then_some(evs)
    });
    got.unwrap_or_else(|| {
        let evs = tracking_events(conn, prefix, id);
        panic!("{id}: {} of {n} tracking events: {evs:?}", evs.len())
    })
}

/// A test config with the tracking server on a free port: (setup, port, base URL).
/// `extra` is appended TOML (sections after [tracking]; `[tracking]` keys go in `tracking`).
pub fn tracking_setup(
    redis_url: &str,
    sink_port: u16,
    tracking: &str,
    extra: &str,
) -> (super::Setup, u16, String) {
    let port = super::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let setup = super::Setup::new(redis_url, sink_port, "", "", extra);
    let text = std::fs::read_to_string(&setup.config).unwrap().replace(
        "base_url = \"https://t.shop.test\"",
        &format!("base_url = \"{base}\"\nlisten = \"127.0.0.1:{port}\"\n{tracking}"),
    );
    std::fs::write(&setup.config, text).unwrap();
    (setup, port, base)
}

/// A value of `{prefix}stats:{campaign}`.
pub fn stat(conn: &mut redis::Connection, prefix: &str, campaign: &str, field: &str) -> i64 {
    redis::cmd("HGET")
        .arg(format!("{prefix}stats:{campaign}"))
        .arg(field)
        .query::<Option<i64>>(conn)
        .unwrap()
        .unwrap_or(0)
}

pub fn used_memory(conn: &mut redis::Connection) -> i64 {
    let info: String = redis::cmd("INFO").arg("memory").query(conn).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Entries in `{prefix}events`.
pub fn xlen(conn: &mut redis::Connection, prefix: &str) -> usize {
    super::stream_len(conn, &format!("{prefix}events"))
}

/// The consumer group of the workflow engine on the events stream.
pub const WORKFLOWS: &str = "paloma-workflows";

/// Appends raw events to `{prefix}events`, as another daemon's tracking server would.
pub fn add_events(conn: &mut redis::Connection, prefix: &str, evs: &[String]) {
    for e in evs {
        redis::cmd("XADD")
            .arg(format!("{prefix}events"))
            .arg("*")
            .arg("event")
            .arg(e)
            .query::<String>(conn)
            .unwrap();
    }
}

/// True once the workflow rules have taken in every event now in `{prefix}events` and every
/// job in `{prefix}sends` is done: nothing more can come of the rules.
pub fn rules_done(conn: &mut redis::Connection, prefix: &str) -> bool {
    super::events_consumed(conn, prefix, WORKFLOWS) && super::sends_drained(conn, prefix)
}

/// An answer of the HTTP API: the status, the body as JSON (Null when it is not) and as text.
pub struct Answer {
    pub status: u16,
    pub body: serde_json::Value,
    pub raw: String,
}

/// One call to the HTTP API on `port`, with a JSON body and the bearer `token` if any.
pub fn api_call(port: u16, method: &str, target: &str, token: Option<&str>, body: &[u8]) -> Answer {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    let r = request(port, method, target, &headers, body);
    let raw = r.text();
    Answer {
        status: r.status,
        body: serde_json::from_str(&raw).unwrap_or(serde_json::Value::Null),
        raw,
    }
}

/// Jobs (JSON objects) as one JSON array, the body of `POST /api/v1/sends`.
pub fn json_array(jobs: &[String]) -> Vec<u8> {
    format!("[{}]", jobs.join(",")).into_bytes()
}

/// `n` keep-alive GETs over one connection, cycling through `paths` (as a flooding client
/// sends them); how many were answered 200 or 302.
pub fn hammer(port: u16, paths: &[String], n: usize) -> usize {
    use std::io::{BufRead, BufReader, Read, Write};
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut answered = 0;
    for i in 0..n {
        let p = &paths[i % paths.len()];
        // One write per request (write! would send it in pieces, each waiting on Nagle).
        w.write_all(
            format!("GET {p} HTTP/1.1\r\nHost: x\r\nUser-Agent: {MAIL_UA}\r\n\r\n").as_bytes(),
        )
        .unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let ok = line.contains(" 302 ") || line.contains(" 200 ");
        let mut len = 0usize;
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).unwrap();
        answered += usize::from(ok);
    }
    answered
}

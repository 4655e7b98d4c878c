//! The inbound SMTP listener for `[bounces] domain`: DSNs and feedback reports come here.
//!
//! A small SMTP server of our own, on purpose: it takes mail for one domain (and the
//! `accept` addresses) and nothing else, never relays, and answers 250 to a message only
//! once what it learnt is durable in Redis — a receive-only subset (EHLO/HELO, MAIL, RCPT,
//! DATA, RSET, NOOP, QUIT) that no kept crate offers on tokio with these guarantees. Limits:
//! `max_connections` sessions (more get 421), `timeout` for each command or data line, lines
//! of at most 4 KB, `max_message_bytes` per message (more gets 552), 50 recipients.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use super::record::Finding;
use super::report::{self, Kind};
use super::{ReturnPaths, TokenJob};
use crate::metrics::Metrics;
use crate::queue::Keys;
use crate::store::RedisConn;

const MAX_LINE: usize = 4096;
const MAX_RCPTS: usize = 50;
/// The longest one session may last, however busy.
const MAX_SESSION: Duration = Duration::from_secs(600);

/// What the listener needs.
pub struct BounceState {
    pub paths: ReturnPaths,
    /// Extra recipient addresses taken in (lower case).
    pub accept: Vec<String>,
    pub redis: RedisConn,
    pub keys: Keys,
    pub metrics: Arc<Metrics>,
    pub max_bytes: usize,
    pub max_connections: usize,
    pub timeout: Duration,
    /// The name in the greeting.
    pub hostname: String,
}

/// Serves on `listener` until `stop` turns true.
pub fn serve(
    listener: TcpListener,
    state: BounceState,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, domain = %state.paths.domain, "bounce listener listening");
    }
    let state = Arc::new(state);
    let permits = Arc::new(Semaphore::new(state.max_connections));
    let script = Arc::new(super::record::script());
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "bounce listener: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        sock.write_all(b"421 4.3.2 too many connections, try later\r\n"),
                    )
                    .await;
                });
                continue;
            };
            let state = state.clone();
            let script = script.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(MAX_SESSION, session(sock, &state, &script)).await;
                drop(permit);
            });
        }
    })
}

enum Line {
    Text(Vec<u8>),
    TooLong,
    Closed,
}

async fn read_line(r: &mut BufReader<TcpStream>, timeout: Duration, buf: &mut Vec<u8>) -> Line {
    buf.clear();
    let read = async {
        loop {
            let avail = match r.fill_buf().await {
                Ok([]) | Err(_) => return Line::Closed,
                Ok(b) => b,
            };
            let (n, done) = match avail.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (avail.len(), false),
            };
            // Never more than MAX_LINE at once: the rest of a longer line comes next call.
            let take = n.min(MAX_LINE - buf.len());
            buf.extend_from_slice(&avail[..take]);
            r.consume(take);
            if take < n || (!done && buf.len() == MAX_LINE) {
                return Line::TooLong;
            }
            if done {
                return Line::Text(std::mem::take(buf));
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or(Line::Closed)
}

fn addr_of(arg: &str) -> Option<String> {
    let a = arg.trim();
    let inner = a.strip_prefix('<')?.split('>').next()?;
    Some(inner.trim().to_string())
}

/// A recipient the listener takes mail for.
enum Rcpt {
    /// A valid VERP token: its key.
    Token(String),
    /// Token-shaped, but its MAC is wrong.
    Forged,
    /// Another address of the domain, or an `accept` address.
    Plain,
}

/// Whether the listener takes mail for `addr` (None: it does not, it is no relay).
fn accepts(state: &BounceState, addr: &str) -> Option<Rcpt> {
    let lower = addr.to_ascii_lowercase();
    if state.accept.contains(&lower) {
        return Some(Rcpt::Plain);
    }
    let (local, domain) = addr.rsplit_once('@')?;
    if !domain.eq_ignore_ascii_case(&state.paths.domain) {
        return None;
    }
    Some(match state.paths.verify(local) {
        Some(k) => Rcpt::Token(k),
        None if local.len() > 2 && local[..2].eq_ignore_ascii_case("b-") => Rcpt::Forged,
        None => Rcpt::Plain,
    })
}

async fn session(sock: TcpStream, state: &BounceState, script: &redis::Script) {
    let _ = sock.set_nodelay(true);
    let mut r = BufReader::new(sock);
    macro_rules! reply {
        ($s:expr) => {
            if r.get_mut().write_all($s.as_bytes()).await.is_err() {
                return;
            }
        };
    }
    reply!(format!("220 {} paloma bounce receiver\r\n", state.hostname));
    let mut buf = Vec::new();
    let mut mail: Option<bool> = None; // Some(null sender)
    let mut tokens: Vec<String> = Vec::new();
    let mut forged = false;
    let mut rcpts = 0usize;
    loop {
        let line = match read_line(&mut r, state.timeout, &mut buf).await {
            Line::Text(l) => l,
            Line::TooLong => {
                reply!("500 5.5.2 line too long\r\n");
                return;
            }
            Line::Closed => return,
        };
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        let (verb, arg) = text.split_once(' ').unwrap_or((text, ""));
        match verb.to_ascii_uppercase().as_str() {
            "EHLO" => reply!(format!(
                "250-{}\r\n250-SIZE {}\r\n250-8BITMIME\r\n250 PIPELINING\r\n",
                state.hostname, state.max_bytes
            )),
            "HELO" => reply!(format!("250 {}\r\n", state.hostname)),
            "MAIL" => {
                let Some(from) = arg
                    .get(..5)
                    .filter(|p| p.eq_ignore_ascii_case("FROM:"))
                    .and_then(|_| addr_of(&arg[5..]))
                else {
                    reply!("501 5.5.4 MAIL FROM:<address>\r\n");
                    continue;
                };
                let size = arg
                    .split_whitespace()
                    .find_map(|p| {
                        p.get(..5)
                            .filter(|k| k.eq_ignore_ascii_case("SIZE="))
                            .map(|_| &p[5..])
                    })
                    .and_then(|v| v.parse::<usize>().ok());
                if size.is_some_and(|s| s > state.max_bytes) {
                    reply!("552 5.3.4 message too big\r\n");
                    continue;
                }
                mail = Some(from.is_empty());
                tokens.clear();
                forged = false;
                rcpts = 0;
                reply!("250 2.1.0 ok\r\n");
            }
            "RCPT" => {
                if mail.is_none() {
                    reply!("503 5.5.1 MAIL first\r\n");
                    continue;
                }
                let Some(to) = arg
                    .get(..3)
                    .filter(|p| p.eq_ignore_ascii_case("TO:"))
                    .and_then(|_| addr_of(&arg[3..]))
                else {
                    reply!("501 5.5.4 RCPT TO:<address>\r\n");
                    continue;
                };
                if rcpts >= MAX_RCPTS {
                    reply!("452 4.5.3 too many recipients\r\n");
                    continue;
                }
                match accepts(state, &to) {
                    Some(rcpt) => {
                        rcpts += 1;
                        match rcpt {
                            Rcpt::Token(t) if !tokens.contains(&t) => tokens.push(t),
                            Rcpt::Forged => forged = true,
                            _ => {}
                        }
                        reply!("250 2.1.5 ok\r\n");
                    }
                    None => reply!("550 5.7.1 relaying denied: this server takes mail for its bounce domain only\r\n"),
                }
            }
            "DATA" => {
                let Some(null_sender) = mail else {
                    reply!("503 5.5.1 MAIL first\r\n");
                    continue;
                };
                if rcpts == 0 {
                    reply!("554 5.5.1 no valid recipients\r\n");
                    continue;
                }
                reply!("354 end with <CRLF>.<CRLF>\r\n");
                let mut msg = Vec::with_capacity(16 * 1024);
                let mut over = false;
                // The rest of a line longer than MAX_LINE is read in pieces: only a piece
                // that starts a line can be the final dot or be dot-stuffed.
                let mut continuing = false;
                loop {
                    let (line, starts_line) = match read_line(&mut r, state.timeout, &mut buf).await
                    {
                        Line::Text(l) => (l, !std::mem::replace(&mut continuing, false)),
                        Line::TooLong => (
                            std::mem::take(&mut buf),
                            !std::mem::replace(&mut continuing, true),
                        ),
                        Line::Closed => return,
                    };
                    if starts_line && !continuing && (line == b".\r\n" || line == b".\n") {
                        break;
                    }
                    let l = if starts_line {
                        line.strip_prefix(b".").unwrap_or(&line)
                    } else {
                        &line[..]
                    };
                    if msg.len() + l.len() > state.max_bytes {
                        over = true;
                    }
                    if !over {
                        msg.extend_from_slice(l);
                    }
                }
                mail = None;
                if over {
                    reply!("552 5.3.4 message too big\r\n");
                    continue;
                }
                let answer = match take_in(state, script, &msg, &tokens, forged, null_sender).await
                {
                    Ok(()) => "250 2.0.0 recorded\r\n",
                    Err(e) => {
                        state.metrics.redis_errors.inc();
                        tracing::warn!(error = %e, "bounce listener: recording a report failed; asked to retry");
                        "451 4.3.0 temporary failure, try again later\r\n"
                    }
                };
                reply!(answer);
            }
            "RSET" => {
                mail = None;
                tokens.clear();
                forged = false;
                rcpts = 0;
                reply!("250 2.0.0 ok\r\n");
            }
            "NOOP" => reply!("250 2.0.0 ok\r\n"),
            "QUIT" => {
                reply!("221 2.0.0 bye\r\n");
                return;
            }
            "VRFY" => reply!("252 2.5.2 cannot verify\r\n"),
            _ => reply!("502 5.5.2 command not recognised\r\n"),
        }
    }
}

/// Parses a report, finds the jobs it is about, and records it for each, durably.
async fn take_in(
    state: &BounceState,
    script: &redis::Script,
    raw: &[u8],
    envelope_tokens: &[String],
    envelope_forged: bool,
    null_sender: bool,
) -> redis::RedisResult<()> {
    let m = &state.metrics;
    let count = |kind: &str| m.reports.with_label_values(&[kind]).inc();
    let r = report::parse(raw, null_sender);
    let findings: Vec<Finding> = match &r.kind {
        Kind::AutoReply => {
            count("auto_reply");
            return Ok(());
        }
        Kind::Other => {
            count("other");
            return Ok(());
        }
        Kind::Dsn {
            reporting_mta,
            recipients,
        } => recipients
            .iter()
            .filter_map(|d| {
                let delayed = d.action == "delayed";
                if !(delayed || d.action == "failed") {
                    return None;
                }
                Some(Finding::returned(
                    d.status.clone(),
                    d.diagnostic.clone(),
                    reporting_mta.clone(),
                    delayed,
                    d.status.starts_with('5'),
                    Some(d.recipient.clone()).filter(|r| !r.is_empty()),
                ))
            })
            .collect(),
        Kind::TextBounce {
            status,
            diagnostic,
            permanent,
        } => vec![Finding::returned(
            status.clone(),
            diagnostic.clone(),
            String::new(),
            false,
            *permanent,
            None,
        )],
        Kind::Feedback {
            feedback_type,
            source,
            recipient,
        } => vec![Finding::complained(
            feedback_type.clone(),
            source.clone(),
            recipient.clone(),
        )],
    };
    if findings.is_empty() {
        count("other");
        return Ok(());
    }
    // A token of ours with a wrong MAC, in the envelope or the text: a forgery, not acted
    // on at all (a real report carries the real token).
    let (found, invalid) = state.paths.find(raw);
    if envelope_forged || invalid > 0 {
        count("forged");
        return Ok(());
    }
    // The jobs: signed tokens (the envelope's, then any in the returned text) name theirs;
    // an X-Paloma-Id counts only when the report also names that job's recipient.
    let mut keys: Vec<(String, bool)> = envelope_tokens.iter().map(|k| (k.clone(), true)).collect();
    for k in found {
        if !keys.iter().any(|(x, _)| *x == k) {
            keys.push((k, true));
        }
    }
    // A Message-ID this instance made is the token itself (signed: it names its job).
    for mid in &r.message_ids {
        if let Some(k) = state.paths.key_of_message_id(mid) {
            if !keys.iter().any(|(x, _)| *x == k) {
                keys.push((k, true));
            }
        }
    }
    for id in &r.paloma_ids {
        let k = state.paths.key(id);
        if !keys.iter().any(|(x, _)| *x == k) {
            keys.push((k, false));
        }
    }
    keys.truncate(MAX_RCPTS);
    if keys.is_empty() {
        count("unmatched");
        return Ok(());
    }
    let mut conn = state.redis.clone();
    let mut get = redis::pipe();
    for (k, _) in &keys {
        get.cmd("GET").arg(state.keys.return_path(k));
    }
    let jobs: Vec<Option<String>> = get.query_async(&mut conn).await?;
    let mut matched = false;
    for ((key, signed), job) in keys.iter().zip(jobs) {
        let Some(job) = job.and_then(|j| serde_json::from_str::<TokenJob>(&j).ok()) else {
            continue;
        };
        for f in &findings {
            let names_it = f
                .recipient
                .as_deref()
                .is_some_and(|r| r.eq_ignore_ascii_case(&job.to));
            // A DSN for several recipients: the one this job was for, when it says.
            if f.recipient.is_some() && !names_it && (findings.len() > 1 || !signed) {
                continue;
            }
            if !signed && !names_it {
                continue;
            }
            matched = true;
            let marker = state.keys.report_seen(key, f.what);
            if super::record::record(
                &mut conn,
                &state.keys,
                script,
                &marker,
                state.paths.ttl_secs,
                &job,
                f,
            )
            .await?
            {
                f.count(m, &job.campaign);
            } else {
                count("duplicate");
            }
            break;
        }
    }
    if !matched {
        count("unmatched");
    }
    Ok(())
}

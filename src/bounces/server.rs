//! The inbound SMTP listener for `[bounces] domain`: DSNs and feedback reports come here.
//!
//! A small SMTP server of our own, on purpose: it takes mail for one domain (and the
//! `accept` addresses) and nothing else, never relays, and answers 250 to a message only
//! once what it learnt is durable in Redis — a receive-only subset (EHLO/HELO, MAIL, RCPT,
//! DATA, RSET, NOOP, QUIT) that no kept crate offers on tokio with these guarantees.
//!
//! It is open to anyone, so every resource a client can hold is bounded:
//! - sessions: `max_connections` at once; at the cap a new session still gets in, and the
//!   oldest session that is not recording a report (the one a trickling client holds) is
//!   closed to make room (421), as the HTTP listeners do for slow heads; 421 to the new one
//!   only when every session is recording;
//! - time: `timeout` for each command or data line, `data_timeout` for the whole of DATA,
//!   `session_timeout` for the whole session (421, then closed);
//! - memory: lines of at most 4 KB, `max_message_bytes` per message (more: 552), and across
//!   sessions at most [`DATA_FLOOR`] per session plus `max_data_bytes` of message data
//!   (past it the message is read to its end, not kept, and answered 452: the sender
//!   retries); 50 recipients;
//! - input: text from the network is never sliced by byte index, and DATA ends only at
//!   `CRLF.CRLF` (RFC 5321 §4.1.1.4): a bare `\n.\n` is data, so what a sender took for
//!   one message can never be read here as two (SMTP smuggling).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::record::{Finding, Report};
use super::report::{self, Kind};
use super::{ReturnPaths, TokenJob};
use crate::metrics::Metrics;
use crate::queue::Keys;
use crate::store::replication::AckError;
use crate::store::RedisConn;

const MAX_LINE: usize = 4096;
const MAX_RCPTS: usize = 50;
/// What each message may hold before drawing on the shared `max_data_bytes`: a DSN or a
/// feedback report of ordinary size is always taken in, whatever the other sessions hold.
pub const DATA_FLOOR: usize = 64 * 1024;

/// What the listener takes and how long it waits: everything a session needs besides
/// the connection, Redis and the other sessions.
pub struct Rules {
    pub paths: ReturnPaths,
    /// Extra recipient addresses taken in (lower case).
    pub accept: Vec<String>,
    /// The name in the greeting.
    pub hostname: String,
    pub max_bytes: usize,
    /// The longest wait for a command or a data line.
    pub timeout: Duration,
    /// The longest a session may last, however busy.
    pub session_timeout: Duration,
    /// The longest DATA may last, from 354 to the final dot.
    pub data_timeout: Duration,
}

/// What the listener needs.
pub struct BounceState {
    pub rules: Rules,
    pub redis: RedisConn,
    pub keys: Keys,
    pub metrics: Arc<Metrics>,
    /// What a recorded report waits for before its 250 (`redis.ack_replicas`).
    pub acks: Arc<crate::store::replication::Acks>,
    pub max_connections: usize,
    /// Message data held across sessions beyond each one's [`DATA_FLOOR`].
    pub max_data_bytes: usize,
}

/// Why a session was closed by the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// No command or data line within `timeout`.
    Idle,
    /// `session_timeout` reached.
    Session,
    /// `data_timeout` reached.
    Data,
    /// Closed to make room for a new session at the cap.
    Evicted,
}

impl Cut {
    /// `paloma_bounce_sessions_closed_total{reason}`.
    pub fn label(self) -> &'static str {
        match self {
            Cut::Idle => "idle_timeout",
            Cut::Session => "session_timeout",
            Cut::Data => "data_timeout",
            Cut::Evicted => "evicted",
        }
    }

    fn reply(self) -> &'static str {
        match self {
            Cut::Idle => "421 4.4.2 idle too long, closing\r\n",
            Cut::Session => "421 4.4.2 session time limit reached, closing\r\n",
            Cut::Data => "421 4.4.2 DATA time limit reached, closing\r\n",
            Cut::Evicted => "421 4.3.2 too many sessions, closing the oldest\r\n",
        }
    }
}

/// The envelope of a message, as a session hands it over.
#[derive(Debug, Clone, Default)]
pub struct Envelope {
    /// The envelope sender was `<>` (as a bounce's is).
    pub null_sender: bool,
    /// Keys of the valid VERP tokens among the recipients.
    pub tokens: Vec<String>,
    /// A recipient was token-shaped with a wrong MAC.
    pub forged: bool,
}

/// Where a session's messages go.
pub trait Intake {
    /// Records one message: true once it is kept (250), false to ask the sender to try
    /// again later (451).
    fn take(&self, raw: &[u8], envelope: &Envelope) -> impl Future<Output = bool> + Send;
}

/// Message data held across sessions, past each one's floor.
pub struct DataBudget {
    sem: Arc<Semaphore>,
}

impl DataBudget {
    pub fn new(bytes: usize) -> DataBudget {
        DataBudget {
            sem: Arc::new(Semaphore::new(bytes.min(Semaphore::MAX_PERMITS))),
        }
    }
}

/// Why a message is not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    TooBig,
    NoMemory,
}

/// One message's data as it arrives: kept while within `max_message_bytes` and the budget,
/// its capacity grown by hand so that what it holds is what it has reserved.
struct Buffer<'a> {
    msg: Vec<u8>,
    held: Option<OwnedSemaphorePermit>,
    held_bytes: usize,
    budget: &'a DataBudget,
    max: usize,
    refused: Option<Refusal>,
}

impl<'a> Buffer<'a> {
    fn new(budget: &'a DataBudget, max: usize) -> Self {
        Buffer {
            msg: Vec::new(),
            held: None,
            held_bytes: 0,
            budget,
            max,
            refused: None,
        }
    }

    fn refuse(&mut self, why: Refusal) {
        self.refused = Some(why);
        // Given back at once: a refused message holds nothing while it is read to its end.
        self.msg = Vec::new();
        self.held = None;
        self.held_bytes = 0;
    }

    fn push(&mut self, bytes: &[u8]) {
        if self.refused.is_some() || bytes.is_empty() {
            return;
        }
        let need = self.msg.len() + bytes.len();
        if need > self.max {
            self.refuse(Refusal::TooBig);
            return;
        }
        if need > self.msg.capacity() {
            let want = need.max(self.msg.capacity() * 2).max(4096).min(self.max);
            let past_floor = want.saturating_sub(DATA_FLOOR);
            if past_floor > self.held_bytes {
                let more = past_floor - self.held_bytes;
                let permit = u32::try_from(more)
                    .ok()
                    .and_then(|n| self.budget.sem.clone().try_acquire_many_owned(n).ok());
                let Some(permit) = permit else {
                    self.refuse(Refusal::NoMemory);
                    return;
                };
                match &mut self.held {
                    Some(h) => h.merge(permit),
                    None => self.held = Some(permit),
                }
                self.held_bytes += more;
            }
            self.msg.reserve_exact(want - self.msg.len());
        }
        self.msg.extend_from_slice(bytes);
    }
}

/// Where DATA ends: only at `CRLF.CRLF` (RFC 5321 §4.1.1.4), the first CRLF being the end
/// of the line before (or of the DATA command). A line starts after CRLF only: after a bare
/// LF a dot is data, neither the end nor dot-stuffing.
#[derive(Debug, Clone)]
pub struct DataLines {
    /// The last two bytes of the stream so far.
    tail: [u8; 2],
}

/// What one piece of DATA is.
#[derive(Debug, PartialEq, Eq)]
pub enum DataPiece<'a> {
    /// The final dot.
    End,
    /// Message data (dot-stuffing undone).
    Data(&'a [u8]),
}

impl Default for DataLines {
    fn default() -> Self {
        DataLines { tail: *b"\r\n" }
    }
}

impl DataLines {
    /// `piece`: the next bytes of DATA, up to and including a LF, or part of a longer line.
    pub fn piece<'a>(&mut self, piece: &'a [u8]) -> DataPiece<'a> {
        let line_start = self.tail == *b"\r\n";
        if line_start && piece == b".\r\n" {
            return DataPiece::End;
        }
        match piece {
            [] => {}
            [b] => self.tail = [self.tail[1], *b],
            [.., a, b] => self.tail = [*a, *b],
        }
        if line_start {
            DataPiece::Data(piece.strip_prefix(b".").unwrap_or(piece))
        } else {
            DataPiece::Data(piece)
        }
    }
}

enum Line {
    /// A whole line, with its LF.
    Full(Vec<u8>),
    /// MAX_LINE bytes of a longer line (the rest comes next call).
    Part(Vec<u8>),
    Closed,
    Cut(Cut),
}

/// How long a read may wait, and what else ends it.
struct Wait<'a> {
    line: Duration,
    until: Instant,
    why: Cut,
    close: &'a Notify,
}

async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, buf: &mut Vec<u8>, wait: &Wait<'_>) -> Line {
    buf.clear();
    let read = async {
        loop {
            let avail = match r.fill_buf().await {
                Ok([]) | Err(_) => return Line::Closed,
                Ok(b) => b,
            };
            let (n, done) = match memchr::memchr(b'\n', avail) {
                Some(i) => (i + 1, true),
                None => (avail.len(), false),
            };
            // Never more than MAX_LINE at once: the rest of a longer line comes next call.
            let take = n.min(MAX_LINE - buf.len());
            buf.extend_from_slice(&avail[..take]);
            r.consume(take);
            if take < n || (!done && buf.len() == MAX_LINE) {
                return Line::Part(std::mem::take(buf));
            }
            if done {
                return Line::Full(std::mem::take(buf));
            }
        }
    };
    tokio::select! {
        l = tokio::time::timeout(wait.line, read) => l.unwrap_or(Line::Cut(Cut::Idle)),
        _ = tokio::time::sleep_until(wait.until) => Line::Cut(wait.why),
        _ = wait.close.notified() => Line::Cut(Cut::Evicted),
    }
}

/// The rest of `s` after `prefix` (ASCII, any case).
fn after_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    s.get(..prefix.len())
        .filter(|h| h.eq_ignore_ascii_case(prefix))
        .and_then(|_| s.get(prefix.len()..))
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
fn accepts(rules: &Rules, addr: &str) -> Option<Rcpt> {
    let lower = addr.to_ascii_lowercase();
    if rules.accept.contains(&lower) {
        return Some(Rcpt::Plain);
    }
    let (local, domain) = addr.rsplit_once('@')?;
    if !domain.eq_ignore_ascii_case(&rules.paths.domain) {
        return None;
    }
    let token_shaped = local.len() > 2 && after_ci(local, "b-").is_some();
    Some(match rules.paths.verify(local) {
        Some(k) => Rcpt::Token(k),
        None if token_shaped => Rcpt::Forged,
        None => Rcpt::Plain,
    })
}

/// Serves on `listener` until `stop` turns true.
pub fn serve(
    listener: TcpListener,
    state: BounceState,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, domain = %state.rules.paths.domain, "bounce listener listening");
    }
    let state = Arc::new(state);
    let sessions = Arc::new(Sessions::default());
    let budget = Arc::new(DataBudget::new(state.max_data_bytes));
    let closed = state.metrics.bounce_sessions_closed.clone();
    tokio::spawn(async move {
        let mut next_id = 0u64;
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
            next_id += 1;
            let id = next_id;
            let Some(close) = sessions.admit(id, state.max_connections) else {
                closed.with_label_values(&["all_busy"]).inc();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        sock.write_all(b"421 4.3.2 too many connections, try later\r\n"),
                    )
                    .await;
                });
                continue;
            };
            let _ = sock.set_nodelay(true);
            let recorder = Recorder {
                state: state.clone(),
                sessions: sessions.clone(),
                id,
            };
            let (budget, closed) = (budget.clone(), closed.clone());
            tokio::spawn(async move {
                let rules = &recorder.state.rules;
                // A hard bound past the session's own deadline, which a client that does
                // not read its replies could otherwise outlast in a write.
                let hard = rules.session_timeout + rules.timeout;
                let cut =
                    tokio::time::timeout(hard, converse(sock, rules, &budget, &recorder, &close))
                        .await
                        .unwrap_or(Some(Cut::Session));
                if let Some(c) = cut {
                    closed.with_label_values(&[c.label()]).inc();
                }
                recorder.sessions.remove(id);
            });
        }
    })
}

struct Slot {
    /// Recording a report (between the final dot and its reply): never evicted.
    busy: bool,
    /// Accepted, or done recording its last report.
    since: std::time::Instant,
    close: Arc<Notify>,
}

/// The open sessions.
#[derive(Default)]
struct Sessions {
    slots: Mutex<HashMap<u64, Slot>>,
}

impl Sessions {
    /// Registers a session; at the cap, first closes the oldest one not recording. None when
    /// every session is recording (the new one is refused).
    fn admit(&self, id: u64, cap: usize) -> Option<Arc<Notify>> {
        let mut slots = self.slots.lock().ok()?;
        if slots.len() >= cap {
            let victim = slots
                .iter()
                .filter(|(_, s)| !s.busy)
                .min_by_key(|(_, s)| s.since)
                .map(|(k, _)| *k)?;
            if let Some(s) = slots.remove(&victim) {
                // notify_one stores a permit: a session not waiting right now sees it at
                // its next read.
                s.close.notify_one();
            }
        }
        let close = Arc::new(Notify::new());
        slots.insert(
            id,
            Slot {
                busy: false,
                since: std::time::Instant::now(),
                close: close.clone(),
            },
        );
        Some(close)
    }

    fn set_busy(&self, id: u64, busy: bool) {
        if let Ok(mut slots) = self.slots.lock() {
            if let Some(s) = slots.get_mut(&id) {
                s.busy = busy;
                s.since = std::time::Instant::now();
            }
        }
    }

    fn remove(&self, id: u64) {
        if let Ok(mut slots) = self.slots.lock() {
            slots.remove(&id);
        }
    }
}

/// Records the messages of one session in Redis.
struct Recorder {
    state: Arc<BounceState>,
    sessions: Arc<Sessions>,
    id: u64,
}

impl Intake for Recorder {
    async fn take(&self, raw: &[u8], envelope: &Envelope) -> bool {
        self.sessions.set_busy(self.id, true);
        let r = take_in(&self.state, raw, envelope).await;
        self.sessions.set_busy(self.id, false);
        if let Err(e) = &r {
            self.state.metrics.redis_errors.inc();
            tracing::warn!(error = %e, "bounce listener: recording a report failed; asked to retry");
        }
        r.is_ok()
    }
}

/// One SMTP session on `io`, until the client quits or a limit closes it (then the
/// reason). Messages go to `intake`; `close` closes the session at its next read.
pub async fn converse<S, I>(
    io: S,
    rules: &Rules,
    budget: &DataBudget,
    intake: &I,
    close: &Notify,
) -> Option<Cut>
where
    S: AsyncRead + AsyncWrite + Unpin,
    I: Intake,
{
    let mut r = BufReader::new(io);
    let session_end = Instant::now() + rules.session_timeout;
    macro_rules! reply {
        ($s:expr) => {
            match tokio::time::timeout(rules.timeout, r.get_mut().write_all($s.as_bytes())).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        };
    }
    macro_rules! cut {
        ($c:expr) => {{
            let c: Cut = $c;
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                r.get_mut().write_all(c.reply().as_bytes()),
            )
            .await;
            return Some(c);
        }};
    }
    reply!(format!("220 {} paloma bounce receiver\r\n", rules.hostname));
    let mut buf = Vec::new();
    let mut mail: Option<bool> = None; // Some(null sender)
    let mut envelope = Envelope::default();
    let mut rcpts = 0usize;
    let command_wait = Wait {
        line: rules.timeout,
        until: session_end,
        why: Cut::Session,
        close,
    };
    loop {
        let line = match read_line(&mut r, &mut buf, &command_wait).await {
            Line::Full(l) => l,
            Line::Part(_) => {
                reply!("500 5.5.2 line too long\r\n");
                return None;
            }
            Line::Closed => return None,
            Line::Cut(c) => cut!(c),
        };
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        let (verb, arg) = text.split_once(' ').unwrap_or((text, ""));
        match verb.to_ascii_uppercase().as_str() {
            "EHLO" => reply!(format!(
                "250-{}\r\n250-SIZE {}\r\n250-8BITMIME\r\n250 PIPELINING\r\n",
                rules.hostname, rules.max_bytes
            )),
            "HELO" => reply!(format!("250 {}\r\n", rules.hostname)),
            "MAIL" => {
                let Some(from) = after_ci(arg, "FROM:").and_then(addr_of) else {
                    reply!("501 5.5.4 MAIL FROM:<address>\r\n");
                    continue;
                };
                let size = arg
                    .split_whitespace()
                    .find_map(|p| after_ci(p, "SIZE="))
                    .and_then(|v| v.parse::<usize>().ok());
                if size.is_some_and(|s| s > rules.max_bytes) {
                    reply!("552 5.3.4 message too big\r\n");
                    continue;
                }
                mail = Some(from.is_empty());
                envelope = Envelope::default();
                rcpts = 0;
                reply!("250 2.1.0 ok\r\n");
            }
            "RCPT" => {
                if mail.is_none() {
                    reply!("503 5.5.1 MAIL first\r\n");
                    continue;
                }
                let Some(to) = after_ci(arg, "TO:").and_then(addr_of) else {
                    reply!("501 5.5.4 RCPT TO:<address>\r\n");
                    continue;
                };
                if rcpts >= MAX_RCPTS {
                    reply!("452 4.5.3 too many recipients\r\n");
                    continue;
                }
                match accepts(rules, &to) {
                    Some(rcpt) => {
                        rcpts += 1;
                        match rcpt {
                            Rcpt::Token(t) if !envelope.tokens.contains(&t) => {
                                envelope.tokens.push(t)
                            }
                            Rcpt::Forged => envelope.forged = true,
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
                let data_end = Instant::now() + rules.data_timeout;
                let data_wait = Wait {
                    line: rules.timeout,
                    until: data_end.min(session_end),
                    why: if data_end < session_end {
                        Cut::Data
                    } else {
                        Cut::Session
                    },
                    close,
                };
                let mut lines = DataLines::default();
                let mut msg = Buffer::new(budget, rules.max_bytes);
                loop {
                    let piece = match read_line(&mut r, &mut buf, &data_wait).await {
                        Line::Full(l) | Line::Part(l) => l,
                        Line::Closed => return None,
                        Line::Cut(c) => cut!(c),
                    };
                    match lines.piece(&piece) {
                        DataPiece::End => break,
                        DataPiece::Data(d) => msg.push(d),
                    }
                }
                mail = None;
                match msg.refused {
                    Some(Refusal::TooBig) => {
                        reply!("552 5.3.4 message too big\r\n");
                        continue;
                    }
                    Some(Refusal::NoMemory) => {
                        reply!("452 4.3.1 insufficient system storage, try again later\r\n");
                        continue;
                    }
                    None => {}
                }
                envelope.null_sender = null_sender;
                let answer = if intake.take(&msg.msg, &envelope).await {
                    "250 2.0.0 recorded\r\n"
                } else {
                    "451 4.3.0 temporary failure, try again later\r\n"
                };
                drop(msg);
                reply!(answer);
            }
            "RSET" => {
                mail = None;
                envelope = Envelope::default();
                rcpts = 0;
                reply!("250 2.0.0 ok\r\n");
            }
            "NOOP" => reply!("250 2.0.0 ok\r\n"),
            "QUIT" => {
                reply!("221 2.0.0 bye\r\n");
                return None;
            }
            "VRFY" => reply!("252 2.5.2 cannot verify\r\n"),
            _ => reply!("502 5.5.2 command not recognised\r\n"),
        }
    }
}

/// Parses a report, finds the jobs it is about, and records it for each, durably.
///
/// Which tokens count: every one whose MAC is right under the current secret or an old one.
/// A report sent to a forged token (and to no valid one) is a forgery, not acted on at all;
/// a bad token quoted in the text (a stale one, another sender's) is passed over alone, so
/// it does not void what the valid ones say.
async fn take_in(state: &BounceState, raw: &[u8], envelope: &Envelope) -> Result<(), AckError> {
    let m = &state.metrics;
    let paths = &state.rules.paths;
    let count = |kind: &str| m.reports.with_label_values(&[kind]).inc();
    if envelope.forged && envelope.tokens.is_empty() {
        count("forged");
        return Ok(());
    }
    let r = report::parse(raw, envelope.null_sender);
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
    // Tokens in the text with a wrong MAC are passed over, one by one.
    let (found, invalid) = paths.find(raw);
    // The jobs: signed tokens (the envelope's, then any in the returned text) name theirs;
    // an X-Paloma-Id counts only when the report also names that job's recipient.
    let mut keys: Vec<(String, bool)> = envelope.tokens.iter().map(|k| (k.clone(), true)).collect();
    for k in found {
        if !keys.iter().any(|(x, _)| *x == k) {
            keys.push((k, true));
        }
    }
    // A Message-ID this instance made is the token itself (signed: it names its job).
    for mid in &r.message_ids {
        if let Some(k) = paths.key_of_message_id(mid) {
            if !keys.iter().any(|(x, _)| *x == k) {
                keys.push((k, true));
            }
        }
    }
    // A job sent before a secret rotation has its record under the key of its day.
    for id in &r.paloma_ids {
        for k in paths.keys(id) {
            if !keys.iter().any(|(x, _)| *x == k) {
                keys.push((k, false));
            }
        }
    }
    keys.truncate(MAX_RCPTS);
    if keys.is_empty() {
        count(if invalid > 0 { "forged" } else { "unmatched" });
        return Ok(());
    }
    let mut conn = state.redis.clone();
    let mut get = redis::pipe();
    for (k, _) in &keys {
        get.cmd("GET").arg(state.keys.return_path(k));
    }
    let jobs: Vec<Option<String>> = get.query_async(&mut conn).await?;
    // Each job the report is about, with the finding that names it: recorded together,
    // and answered 250 only once the replicas have them (`redis.ack_replicas`).
    let mut about: Vec<(String, TokenJob, &Finding)> = Vec::new();
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
            about.push((state.keys.report_seen(key, f.what), job, f));
            break;
        }
    }
    let matched = !about.is_empty();
    let reports: Vec<Report<'_>> = about
        .iter()
        .map(|(marker, job, finding)| Report {
            marker: marker.clone(),
            job,
            finding,
        })
        .collect();
    let recorded = super::record::record(
        &mut conn,
        &state.keys,
        &state.acks,
        "bounce_listener",
        paths.ttl_secs,
        &reports,
    )
    .await?;
    for (r, new) in reports.iter().zip(recorded) {
        if new {
            r.finding.count(m, &r.job.campaign);
        } else {
            count("duplicate");
        }
    }
    if !matched {
        count("unmatched");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends(stream: &[&[u8]]) -> Vec<bool> {
        let mut d = DataLines::default();
        stream
            .iter()
            .map(|p| d.piece(p) == DataPiece::End)
            .collect()
    }

    #[test]
    fn only_crlf_dot_crlf_ends_data() {
        assert_eq!(ends(&[b".\r\n"]), [true], "an empty message");
        assert_eq!(ends(&[b"a\r\n", b".\r\n"]), [false, true]);
        assert_eq!(ends(&[b"a\n", b".\n", b"b\n", b".\r\n"]), [false; 4]);
        assert_eq!(ends(&[b"a\r\n", b".\n"]), [false, false]);
        // A CRLF split across pieces of a long line still ends the line.
        assert_eq!(ends(&[b"aaa\r", b"\n", b".\r\n"]), [false, false, true]);
        let mut d = DataLines::default();
        assert_eq!(d.piece(b"..x\r\n"), DataPiece::Data(b".x\r\n"), "unstuffed");
        assert_eq!(d.piece(b"a\n"), DataPiece::Data(b"a\n"));
        assert_eq!(
            d.piece(b"..\n"),
            DataPiece::Data(b"..\n"),
            "not a line start"
        );
    }

    #[test]
    fn at_the_cap_the_oldest_session_not_recording_makes_room() {
        let s = Sessions::default();
        let c1 = s.admit(1, 2).unwrap();
        let c2 = s.admit(2, 2).unwrap();
        s.set_busy(1, true);
        assert!(s.admit(3, 2).is_some());
        let held: Vec<u64> = s.slots.lock().unwrap().keys().copied().collect();
        assert!(held.contains(&1) && held.contains(&3) && !held.contains(&2));
        s.set_busy(3, true);
        assert!(s.admit(4, 2).is_none(), "every session recording");
        drop((c1, c2));
    }

    #[test]
    fn message_data_past_the_floor_comes_from_the_shared_budget() {
        let budget = DataBudget::new(200 * 1024);
        let chunk = vec![b'x'; 1024];
        let mut a = Buffer::new(&budget, 10 << 20);
        for _ in 0..200 {
            a.push(&chunk);
        }
        assert_eq!(a.refused, None);
        assert_eq!(a.msg.len(), 200 * 1024);
        let mut b = Buffer::new(&budget, 10 << 20);
        for _ in 0..300 {
            b.push(&chunk);
        }
        assert_eq!(b.refused, Some(Refusal::NoMemory), "the budget is spent");
        assert_eq!(b.msg.capacity(), 0, "and what it held given back");
        let mut small = Buffer::new(&budget, 10 << 20);
        for _ in 0..60 {
            small.push(&chunk);
        }
        assert_eq!(
            small.refused, None,
            "a message within the floor always fits"
        );
        drop(a);
        let mut c = Buffer::new(&budget, 100 * 1024);
        for _ in 0..101 {
            c.push(&chunk);
        }
        assert_eq!(c.refused, Some(Refusal::TooBig));
    }
}

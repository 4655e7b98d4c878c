//! SMTP sessions over lettre's `AsyncSmtpConnection`, on TCP connections this module opens
//! itself with TCP_NODELAY (lettre's own pool leaves Nagle on and stalls ~44 ms per message),
//! kept in a small pool per destination and capped by a semaphore.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::Address;
use tokio::sync::{watch, Semaphore};

use super::deadline::{Deadlined, Limits};
use super::{AttemptFlags, Outcome, TlsPolicy};
use crate::config::TlsMode;

/// How sessions to one destination are opened and reused.
#[derive(Clone)]
pub struct SessionConfig {
    pub helo: ClientId,
    pub tls: TlsMode,
    /// Name checked against the certificate when TLS is required.
    pub tls_name: String,
    /// Trusted besides the public roots (`delivery.tls_ca_file`).
    pub ca: Option<Certificate>,
    pub credentials: Option<Credentials>,
    pub timeouts: Timeouts,
    pub idle_timeout: Duration,
    pub messages_per_connection: u32,
    /// The local address bound before connect (an egress source's); None: the kernel picks.
    pub bind: Option<std::net::IpAddr>,
    /// Why TLS is required beyond `tls` (an enforced MTA-STS policy): named in the reason
    /// a failed STARTTLS gives, and counted in `policy_failures`.
    pub policy: TlsPolicy,
    pub policy_failures: Option<prometheus::IntCounter>,
    /// `TlsPolicy::MtaStsTesting`: the roots the session's chain is checked against.
    pub verify_roots: Option<Arc<super::verify::Roots>>,
}

/// The limits of each stage of a session (`delivery.*_timeout`), after RFC 5321 §4.5.3.2 and
/// Postfix's `smtp_*_timeout`. Each bounds one wait: for a reply, or for a write of the body
/// to make progress.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP connect (Postfix `smtp_connect_timeout`, 30 s).
    pub connect: Duration,
    /// The greeting, EHLO, STARTTLS and AUTH replies (RFC 5 min; `smtp_helo_timeout`).
    pub greeting: Duration,
    /// The MAIL and each RCPT reply (RFC 5 min; `smtp_mail_timeout`, `smtp_rcpt_timeout`).
    pub command: Duration,
    /// DATA's 354 (RFC 2 min; `smtp_data_init_timeout`).
    pub data: Duration,
    /// Each write of the body (RFC 3 min per block; `smtp_data_xfer_timeout`).
    pub data_block: Duration,
    /// The reply after the final dot (RFC 10 min; `smtp_data_done_timeout`). Longer than
    /// any other: the receiver has the message and may be scanning it; giving up early
    /// defers a message it will deliver, and the retry sends it twice.
    pub data_done: Duration,
}

struct Idle {
    conn: AsyncSmtpConnection,
    /// The time limits of the session's socket, set per stage.
    limits: Arc<Limits>,
    /// What the server offered in its EHLO reply.
    caps: Caps,
    sent: u32,
    since: Instant,
    _open: OpenGuard,
}

/// Counts open sessions for the `paloma_smtp_sessions_open` gauge.
struct OpenGuard(Arc<AtomicI64>);

impl OpenGuard {
    fn new(c: Arc<AtomicI64>) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        OpenGuard(c)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Connections to one server address; idle ones are reused. Concurrency is capped by the
/// [`Site`] the address belongs to.
pub struct Pool {
    addr: SocketAddr,
    cfg: SessionConfig,
    idle: Mutex<Vec<Idle>>,
    open: Arc<AtomicI64>,
}

/// Why a session could not be used.
enum SessionError {
    /// Nothing reached the server's reply to our message; another connection may work.
    Stale(String),
    Outcome(Outcome),
}

/// One attempt at one address.
pub enum Attempt {
    /// The server answered the transaction.
    Done(Outcome),
    /// No session could be set up (refused, timed out, greeting/EHLO/TLS failed): the next
    /// MX host may do better.
    Unreachable(String),
}

impl Pool {
    pub fn new(addr: SocketAddr, cfg: SessionConfig, open: Arc<AtomicI64>) -> Arc<Self> {
        Arc::new(Pool {
            addr,
            cfg,
            idle: Mutex::new(Vec::new()),
            open,
        })
    }

    /// Sends one message over a reused or new session. A reused session that turns out
    /// dead is replaced once.
    pub async fn attempt(&self, envelope: &Envelope, message: &[u8]) -> Attempt {
        let reused = self.take_idle();
        let fresh_tried = reused.is_none();
        let mut session = match reused {
            Some(s) => s,
            None => match self.connect().await {
                Ok(c) => self.fresh(c),
                Err(reason) => return Attempt::Unreachable(reason),
            },
        };
        match self
            .transact(&mut session, envelope, message, !fresh_tried)
            .await
        {
            Ok(response) => {
                self.put_back(session);
                Attempt::Done(Outcome::Delivered { response })
            }
            Err(SessionError::Outcome(o)) => Attempt::Done(o),
            Err(SessionError::Stale(reason)) if !fresh_tried => {
                tracing::debug!(addr = %self.addr, %reason, "pooled connection was dead; reconnecting");
                let mut session = match self.connect().await {
                    Ok(c) => self.fresh(c),
                    Err(reason) => return Attempt::Unreachable(reason),
                };
                match self.transact(&mut session, envelope, message, false).await {
                    Ok(response) => {
                        self.put_back(session);
                        Attempt::Done(Outcome::Delivered { response })
                    }
                    Err(SessionError::Outcome(o)) => Attempt::Done(o),
                    Err(SessionError::Stale(r)) => Attempt::Done(Outcome::Deferred { response: r }),
                }
            }
            Err(SessionError::Stale(r)) => Attempt::Done(Outcome::Deferred { response: r }),
        }
    }

    fn fresh(&self, (conn, caps, limits): (AsyncSmtpConnection, Caps, Arc<Limits>)) -> Idle {
        Idle {
            conn,
            limits,
            caps,
            sent: 0,
            since: Instant::now(),
            _open: OpenGuard::new(self.open.clone()),
        }
    }

    fn take_idle(&self) -> Option<Idle> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(s) = idle.pop() {
            if s.since.elapsed() < self.cfg.idle_timeout && !s.conn.has_broken() {
                return Some(s);
            }
            // Too old: dropped here, closed by the OS; the server sees EOF.
        }
        None
    }

    fn put_back(&self, mut s: Idle) {
        s.sent += 1;
        if s.sent >= self.cfg.messages_per_connection {
            let mut conn = s.conn;
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), conn.quit()).await;
            });
            return;
        }
        s.since = Instant::now();
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(s);
        }
    }

    /// Closes (QUIT, in the background) idle sessions past `idle_timeout` or broken, so a
    /// pool that is not used again does not hold its sockets for ever.
    pub fn reap_idle(&self) {
        let expired: Vec<Idle> = match self.idle.lock() {
            Ok(mut idle) => {
                let (keep, gone): (Vec<Idle>, Vec<Idle>) = idle.drain(..).partition(|s| {
                    s.since.elapsed() < self.cfg.idle_timeout && !s.conn.has_broken()
                });
                *idle = keep;
                gone
            }
            Err(_) => return,
        };
        for mut s in expired {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(2), s.conn.quit()).await;
            });
        }
    }

    /// Closes idle sessions politely (QUIT), for shutdown.
    pub async fn close_idle(&self) {
        let drained: Vec<Idle> = self
            .idle
            .lock()
            .map(|mut v| v.drain(..).collect())
            .unwrap_or_default();
        for mut s in drained {
            let _ = tokio::time::timeout(Duration::from_secs(2), s.conn.quit()).await;
        }
    }

    /// A TCP connection to the address, from the source's address when one is bound.
    async fn open_socket(&self) -> std::io::Result<tokio::net::TcpStream> {
        let Some(local) = self.cfg.bind else {
            return tokio::net::TcpStream::connect(self.addr).await;
        };
        let socket = if local.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(local, 0)).map_err(|e| {
            std::io::Error::new(e.kind(), format!("binding source address {local}: {e}"))
        })?;
        socket.connect(self.addr).await
    }

    /// A new session, the extensions it offers, and the limits of its socket.
    async fn connect(&self) -> Result<(AsyncSmtpConnection, Caps, Arc<Limits>), String> {
        let deferred = |what: &str, e: &dyn std::fmt::Display| format!("{what} {}: {e}", self.addr);
        let t = &self.cfg.timeouts;
        let tcp = match tokio::time::timeout(t.connect, self.open_socket()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(deferred("connect to", &e)),
            Err(_) => return Err(deferred("connect to", &"timed out")),
        };
        // The whole point of opening the socket here: without this every message waits for
        // the peer's delayed ACK.
        let _ = tcp.set_nodelay(true);
        // From here every read and write is bounded by the stage's limit (see `deadline`).
        let limits = Limits::new(t.greeting);
        let stream = Deadlined::new(tcp, limits.clone());
        let greet = AsyncSmtpConnection::connect_with_transport(Box::new(stream), &self.cfg.helo);
        let mut conn = match greet.await {
            Ok(c) => c,
            // A refusal at greeting or EHLO is about the server, not the recipient: defer.
            Err(e) => return Err(deferred("greeting/EHLO from", &e)),
        };
        match self.cfg.tls {
            TlsMode::None => {}
            TlsMode::Opportunistic | TlsMode::Required if conn.can_starttls() => {
                let params = if self.cfg.tls == TlsMode::Required {
                    let mut b = TlsParameters::builder(self.cfg.tls_name.clone());
                    if let Some(ca) = &self.cfg.ca {
                        b = b.add_root_certificate(ca.clone());
                    }
                    b.build()
                } else {
                    // Opportunistic TLS between MTAs encrypts without authenticating (RFC 7435).
                    TlsParameters::builder(self.cfg.tls_name.clone())
                        .dangerous_accept_invalid_certs(true)
                        .dangerous_accept_invalid_hostnames(true)
                        .build()
                };
                let params = params.map_err(|e| self.by_policy(deferred("TLS setup for", &e)))?;
                limits.set(t.greeting, t.greeting);
                if let Err(e) = conn.starttls(params, &self.cfg.helo).await {
                    return Err(self.by_policy(deferred("STARTTLS with", &e)));
                }
            }
            TlsMode::Required => {
                return Err(
                    self.by_policy(deferred("STARTTLS required but not offered by", &"server"))
                );
            }
            TlsMode::Opportunistic => {}
        }
        if self.cfg.policy == TlsPolicy::MtaStsTesting {
            self.check_testing_policy(&conn);
        }
        // lettre keeps only the EHLO keywords it uses itself; ask once more (once per
        // session, not per message, and after STARTTLS as RFC 3207 requires) to learn what the
        // server offers. A probe without its reply leaves the session out of step (the late
        // reply would answer the next command): the session is dropped, never used.
        let ehlo = format!("EHLO {}\r\n", self.cfg.helo);
        limits.set(t.greeting, t.greeting);
        let caps = match conn.command(Raw(&ehlo)).await {
            Ok(resp) => Caps::of(resp.message()),
            Err(e) => return Err(deferred("EHLO to", &e)),
        };
        if let Some(creds) = &self.cfg.credentials {
            // With tls = "opportunistic" a relay without STARTTLS (or a path that strips
            // it) would get the password in clear: refused unless tls = "none" says so.
            if !conn.is_encrypted() && self.cfg.tls != TlsMode::None {
                return Err(deferred(
                    "AUTH refused without TLS to",
                    &"no STARTTLS (set delivery.tls = \"none\" to send credentials in clear)",
                ));
            }
            limits.set(t.greeting, t.greeting);
            if let Err(e) = conn
                .auth(&[Mechanism::Plain, Mechanism::Login], creds)
                .await
            {
                return Err(deferred("AUTH with", &e));
            }
        }
        Ok((conn, caps, limits))
    }

    /// An MTA-STS policy in `testing` mode: counts (and logs) a session `enforce` would have
    /// refused — no STARTTLS, or a chain not valid for the MX host — and goes on with it.
    /// With `delivery.tls = "none"` no TLS is tried, so there is nothing to judge.
    fn check_testing_policy(&self, conn: &AsyncSmtpConnection) {
        if self.cfg.tls == TlsMode::None {
            return;
        }
        let why = if !conn.is_encrypted() {
            Some("no STARTTLS".to_string())
        } else {
            let roots = self.cfg.verify_roots.as_deref();
            match (conn.certificate_chain(), roots) {
                (Ok(chain), Some(r)) => r.verify(&chain, &self.cfg.tls_name).err(),
                (Err(e), _) => Some(e.to_string()),
                (Ok(_), None) => None,
            }
        };
        if let Some(why) = why {
            if let Some(c) = &self.cfg.policy_failures {
                c.inc();
            }
            tracing::info!(addr = %self.addr, host = %self.cfg.tls_name, %why, "MTA-STS policy (testing): enforce would refuse this session; delivering as usual");
        }
    }

    /// A TLS failure, said to be the recipient's policy's doing when one required TLS.
    fn by_policy(&self, reason: String) -> String {
        match self.cfg.policy {
            TlsPolicy::Configured | TlsPolicy::MtaStsTesting => reason,
            TlsPolicy::MtaSts => {
                if let Some(c) = &self.cfg.policy_failures {
                    c.inc();
                }
                format!("MTA-STS policy (enforce) requires verified TLS: {reason}")
            }
        }
    }

    /// One transaction on `session`; `reused`: it waited in the pool, so a 421 to its first
    /// command is the server's idle timeout, not about this message, and a connection found
    /// dead before any of the message was sent is stale (both: retried at once on a fresh
    /// connection, and no throttling is inferred).
    async fn transact(
        &self,
        session: &mut Idle,
        envelope: &Envelope,
        message: &[u8],
        reused: bool,
    ) -> Result<String, SessionError> {
        // Render already did this; here it guards whatever else hands us a message.
        let fixed = crate::render::crlf_line_endings(message);
        let message = fixed.as_deref().unwrap_or(message);
        let limits = session.limits.clone();
        let t = self.cfg.timeouts;
        let result = transaction(
            &mut session.conn,
            session.caps,
            envelope,
            message,
            &limits,
            &t,
        )
        .await;
        let (stage, e) = match result {
            Ok(resp) => {
                let mut s = resp.code().to_string();
                for line in resp.message() {
                    s.push(' ');
                    s.push_str(line);
                }
                return Ok(s);
            }
            Err(failure) => failure,
        };
        let text = e.to_string();
        let code = e.status().and_then(|c| c.to_string().parse::<u16>().ok());
        let response = reply_text(code, &text);
        let deferred =
            |response: String| Err(SessionError::Outcome(Outcome::Deferred { response }));
        match code {
            Some(421) if reused && stage == Stage::Mail => {
                Err(SessionError::Stale(format!("{}: {response}", self.addr)))
            }
            // A refused MAIL FROM is about the sender (verification, SPF, our domain): never
            // a recipient class that would suppress the recipient.
            Some(c) if e.is_permanent() && stage == Stage::Mail => {
                Err(SessionError::Outcome(Outcome::sender_bounce(c, response)))
            }
            Some(c) if e.is_permanent() => Err(SessionError::Outcome(Outcome::bounce(c, response))),
            Some(_) => deferred(response),
            // No reply code: the connection failed or timed out under us. Before any of the
            // message went out, a pooled connection was simply dead.
            None if stage == Stage::Mail && reused => {
                Err(SessionError::Stale(format!("{}: {text}", self.addr)))
            }
            // The body did not get through: the receiver cannot have accepted it.
            None if stage == Stage::Body && limits.write_failed() => {
                deferred(format!("{}: sending the message failed: {text}", self.addr))
            }
            // The whole message, final dot included, went out and its reply never came: the
            // receiver may well have it. Deferred, never resent at once; counted.
            None if stage == Stage::Body => {
                AttemptFlags::mark_reply_lost();
                let why = if limits.read_timed_out() {
                    format!(
                        "no reply within delivery.data_done_timeout ({:?})",
                        t.data_done
                    )
                } else {
                    format!("the connection closed ({text})")
                };
                deferred(format!(
                    "{}: {why} after the whole message was sent: reply lost, the receiver may have accepted it",
                    self.addr
                ))
            }
            None => deferred(format!("{}: {text}", self.addr)),
        }
    }
}

/// The EHLO keywords the transaction uses.
#[derive(Debug, Clone, Copy, Default)]
struct Caps {
    pipelining: bool,
    eightbitmime: bool,
}

impl Caps {
    fn of<'a>(lines: impl Iterator<Item = &'a str>) -> Caps {
        let mut caps = Caps::default();
        for l in lines {
            match l.split_whitespace().next() {
                Some(k) if k.eq_ignore_ascii_case("PIPELINING") => caps.pipelining = true,
                Some(k) if k.eq_ignore_ascii_case("8BITMIME") => caps.eightbitmime = true,
                _ => {}
            }
        }
        caps
    }
}

/// Text handed to lettre's `command()` as is (it writes the `Display` form in one write).
struct Raw<'a>(&'a str);

impl std::fmt::Display for Raw<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// One SMTP transaction. lettre's `send` writes MAIL, RCPT and DATA in lockstep and then
/// dot-stuffs the body a byte at a time (9% of the daemon's CPU in the e2e profile) and
/// writes the terminator separately. Here, with PIPELINING (RFC 2920) the three commands
/// go in one write and their replies are read together, and the body is dot-stuffed with a
/// line scan and written with its terminator in one write. Each wait has its stage's limit
/// (`limits`). A failed transaction's session is not reused (the caller drops it), so no
/// RSET is needed.
async fn transaction(
    conn: &mut AsyncSmtpConnection,
    caps: Caps,
    envelope: &Envelope,
    message: &[u8],
    limits: &Limits,
    t: &Timeouts,
) -> Result<lettre::transport::smtp::response::Response, (Stage, lettre::transport::smtp::Error)> {
    let from = envelope.from().map(|a| a.as_ref()).unwrap_or("");
    let mut head = String::with_capacity(96);
    head.push_str("MAIL FROM:<");
    head.push_str(from);
    head.push('>');
    // Only where offered (RFC 6152): elsewhere the parameter itself is a 5xx.
    if caps.eightbitmime && !message.is_ascii() {
        head.push_str(" BODY=8BITMIME");
    }
    head.push_str("\r\n");
    let mut rcpts = 0;
    for to in envelope.to() {
        head.push_str("RCPT TO:<");
        head.push_str(to.as_ref());
        head.push_str(">\r\n");
        rcpts += 1;
    }
    limits.set(t.command, t.command);
    if caps.pipelining {
        head.push_str("DATA\r\n");
        // Every pipelined reply is read, even after a failure, so that the first one is
        // what counts and the stream stays in step.
        let mut first_err = conn
            .command(Raw(&head))
            .await
            .err()
            .map(|e| (Stage::Mail, e));
        for i in 0..rcpts + 1 {
            let limit = if i < rcpts { t.command } else { t.data };
            limits.set(limit, limit);
            let r = conn.read_response().await;
            if let (None, Err(e)) = (&first_err, r) {
                first_err = Some((if i < rcpts { Stage::Rcpt } else { Stage::Data }, e));
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
    } else {
        for (i, line) in head.split_inclusive("\r\n").enumerate() {
            let stage = if i == 0 { Stage::Mail } else { Stage::Rcpt };
            limits.set(t.command, t.command);
            conn.command(Raw(line)).await.map_err(|e| (stage, e))?;
        }
        limits.set(t.data, t.data);
        conn.command(Raw("DATA\r\n"))
            .await
            .map_err(|e| (Stage::Data, e))?;
    }
    // The message goes out: from here a failure may leave the receiver with it, so the
    // attempt runs to its reply whatever `attempt_timeout` says.
    AttemptFlags::mark_committed();
    limits.clear_failures();
    limits.set(t.data_done, t.data_block);
    let sent = match std::str::from_utf8(message) {
        // The fast path: the dot-stuffed body and its terminator in one write.
        Ok(text) => conn.command(Raw(&dot_stuff(text))).await,
        // Not UTF-8 (a raw 8-bit body): lettre's own stuffing handles it.
        Err(_) => conn.message(message).await,
    };
    sent.map_err(|e| (Stage::Body, e))
}

/// Which step of a transaction a reply answered, or failed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Mail,
    Rcpt,
    Data,
    /// The body and the reply after its final dot.
    Body,
}

/// The DATA payload: lines starting with `.` get another `.` (RFC 5321 §4.5.2), the body
/// ends with CRLF, then `.` CRLF.
fn dot_stuff(message: &str) -> String {
    let mut out = String::with_capacity(message.len() + message.len() / 64 + 8);
    let rest = message;
    if rest.starts_with('.') {
        out.push('.');
    }
    let mut copied = 0;
    for i in memchr::memmem::find_iter(rest.as_bytes(), b"\n.") {
        out.push_str(&rest[copied..=i]);
        out.push('.');
        copied = i + 1;
    }
    out.push_str(&rest[copied..]);
    if !out.ends_with("\r\n") {
        out.push_str("\r\n");
    }
    out.push_str(".\r\n");
    out
}

/// A destination: the addresses of one relay, or of the MX hosts of one or more domains
/// (domains served by the same MX set share a site, as KumoMTA's sites do), in preference
/// order, with one cap on concurrent sessions. Throttling state (suspension, a lowered rate)
/// is shaping's, kept by `shape::Shaper` under the site's key.
pub struct Site {
    /// The MX host names joined by `,` (the relay's `host:port` in relay mode).
    pub key: String,
    /// The MX host names (the relay in relay mode), in preference order.
    pub hosts: Vec<String>,
    /// Swapped whole when a relay's name resolves to other addresses (`super::relay`); a
    /// send works on the list it started with (a shared slice: no copy per message).
    pools: std::sync::RwLock<Arc<[Arc<Pool>]>>,
    permits: Semaphore,
    /// Sends that found every address unreachable: a relay's name is resolved again then.
    unreachable: std::sync::atomic::AtomicU64,
}

impl Site {
    pub fn new(
        key: String,
        hosts: Vec<String>,
        pools: Vec<Arc<Pool>>,
        connections: usize,
    ) -> Arc<Self> {
        Arc::new(Site {
            key,
            hosts,
            pools: std::sync::RwLock::new(pools.into()),
            permits: Semaphore::new(connections.max(1)),
            unreachable: Default::default(),
        })
    }

    fn pools(&self) -> Arc<[Arc<Pool>]> {
        self.pools.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the addresses (their pools) sessions go to; the cap on sessions stays.
    pub fn set_pools(&self, pools: Vec<Arc<Pool>>) {
        *self.pools.write().unwrap_or_else(|e| e.into_inner()) = pools.into();
    }

    /// How many sends so far found no address that would take a session.
    pub fn unreachable(&self) -> u64 {
        self.unreachable.load(Ordering::Relaxed)
    }

    /// Sends over the first address that accepts a session. None when `stop` turned true
    /// while waiting for a free session (nothing was sent).
    pub async fn send(
        &self,
        envelope: &Envelope,
        message: &[u8],
        stop: &mut watch::Receiver<bool>,
    ) -> Option<Outcome> {
        let _permit = tokio::select! {
            p = self.permits.acquire() => p.expect("site semaphore never closes"),
            _ = stop.wait_for(|s| *s) => return None,
        };
        let mut last = String::from("no address to deliver to");
        for pool in self.pools().iter() {
            match pool.attempt(envelope, message).await {
                Attempt::Done(o) => return Some(o),
                Attempt::Unreachable(reason) => {
                    tracing::debug!(site = %self.key, %reason, "trying the next address");
                    last = reason;
                }
            }
        }
        self.unreachable.fetch_add(1, Ordering::Relaxed);
        Some(Outcome::Deferred { response: last })
    }

    pub async fn close_idle(&self) {
        for p in self.pools().iter() {
            p.close_idle().await;
        }
    }

    pub fn reap_idle(&self) {
        for p in self.pools().iter() {
            p.reap_idle();
        }
    }
}

/// lettre renders a negative reply as `permanent error (550): 5.1.1 text`; keep it as
/// `550 5.1.1 text`.
fn reply_text(code: Option<u16>, err: &str) -> String {
    match (code, err.split_once("): ")) {
        (Some(c), Some((_, rest))) => format!("{c} {rest}"),
        (Some(c), None) => format!("{c} {err}"),
        _ => err.to_string(),
    }
}

/// Why an envelope could not be made: an address lettre does not take, quoted.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("{address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("{0}")]
    Envelope(String),
}

/// The SMTP envelope of one message.
pub fn envelope(mail_from: &str, rcpt: &str) -> Result<Envelope, EnvelopeError> {
    let parse = |s: &str| -> Result<Address, EnvelopeError> {
        s.parse::<Address>().map_err(|e| EnvelopeError::Address {
            address: s.into(),
            reason: e.to_string(),
        })
    };
    Envelope::new(Some(parse(mail_from)?), vec![parse(rcpt)?])
        .map_err(|e| EnvelopeError::Envelope(e.to_string()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn dot_stuffing() {
        assert_eq!(
            super::dot_stuff("a\r\n.b\r\n..c\r\nd"),
            "a\r\n..b\r\n...c\r\nd\r\n.\r\n"
        );
        assert_eq!(super::dot_stuff(".x\r\n"), "..x\r\n.\r\n");
        assert_eq!(super::dot_stuff("plain\r\n"), "plain\r\n.\r\n");
    }

    #[test]
    fn reply_text_keeps_code_and_enhanced_status() {
        assert_eq!(
            super::reply_text(
                Some(550),
                "permanent error (550): 5.1.1 <x@y>: Recipient address rejected"
            ),
            "550 5.1.1 <x@y>: Recipient address rejected"
        );
    }
}

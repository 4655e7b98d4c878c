//! SMTP sessions over lettre's `AsyncSmtpConnection`, on TCP connections this module opens
//! itself with TCP_NODELAY (lettre's own pool leaves Nagle on and stalls ~44 ms per message),
//! kept in a small pool per destination and capped by a semaphore.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::Address;
use tokio::sync::{watch, Semaphore};

use super::Outcome;
use crate::config::TlsMode;

/// How sessions to one destination are opened and reused.
#[derive(Clone)]
pub struct SessionConfig {
    pub helo: ClientId,
    pub tls: TlsMode,
    /// Name checked against the certificate when TLS is required.
    pub tls_name: String,
    pub credentials: Option<Credentials>,
    pub timeout: Duration,
    pub idle_timeout: Duration,
    pub messages_per_connection: u32,
}

struct Idle {
    conn: AsyncSmtpConnection,
    sent: u32,
    since: Instant,
}

/// Connections to one destination address: at most `max` at once, idle ones reused.
pub struct Pool {
    addr: SocketAddr,
    cfg: SessionConfig,
    permits: Semaphore,
    idle: Mutex<Vec<Idle>>,
}

/// Why a session could not be used.
enum SessionError {
    /// Nothing reached the server's reply to our message; another connection may work.
    Stale(String),
    Outcome(Outcome),
}

impl Pool {
    pub fn new(addr: SocketAddr, max: usize, cfg: SessionConfig) -> Arc<Self> {
        Arc::new(Pool {
            addr,
            cfg,
            permits: Semaphore::new(max.max(1)),
            idle: Mutex::new(Vec::new()),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sessions open right now (in use and idle).
    pub fn open_idle(&self) -> usize {
        self.idle.lock().map(|v| v.len()).unwrap_or(0)
    }

    /// Sends one message. A reused connection that turns out dead is replaced once.
    /// Returns None, without touching the server, when `stop` turns true while waiting for
    /// a free session: the job is left for another daemon.
    pub async fn send(
        &self,
        envelope: &Envelope,
        message: &[u8],
        stop: &mut watch::Receiver<bool>,
    ) -> Option<Outcome> {
        let _permit = tokio::select! {
            p = self.permits.acquire() => p.expect("pool semaphore never closes"),
            _ = stop.wait_for(|s| *s) => return None,
        };
        Some(self.send_with_permit(envelope, message).await)
    }

    async fn send_with_permit(&self, envelope: &Envelope, message: &[u8]) -> Outcome {
        let reused = self.take_idle();
        let fresh_tried = reused.is_none();
        let mut session = match reused {
            Some(s) => s,
            None => match self.connect().await {
                Ok(c) => Idle {
                    conn: c,
                    sent: 0,
                    since: Instant::now(),
                },
                Err(o) => return o,
            },
        };
        match self.transact(&mut session.conn, envelope, message).await {
            Ok(response) => {
                self.put_back(session);
                Outcome::Delivered { response }
            }
            Err(SessionError::Outcome(o)) => o,
            Err(SessionError::Stale(reason)) if !fresh_tried => {
                tracing::debug!(addr = %self.addr, %reason, "pooled connection was dead; reconnecting");
                let mut conn = match self.connect().await {
                    Ok(c) => c,
                    Err(o) => return o,
                };
                match self.transact(&mut conn, envelope, message).await {
                    Ok(response) => {
                        self.put_back(Idle {
                            conn,
                            sent: 0,
                            since: Instant::now(),
                        });
                        Outcome::Delivered { response }
                    }
                    Err(SessionError::Outcome(o)) => o,
                    Err(SessionError::Stale(r)) => Outcome::Deferred { response: r },
                }
            }
            Err(SessionError::Stale(r)) => Outcome::Deferred { response: r },
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

    async fn connect(&self) -> Result<AsyncSmtpConnection, Outcome> {
        let deferred = |what: &str, e: &dyn std::fmt::Display| Outcome::Deferred {
            response: format!("{what} {}: {e}", self.addr),
        };
        let tcp =
            match tokio::time::timeout(self.cfg.timeout, tokio::net::TcpStream::connect(self.addr))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(deferred("connect to", &e)),
                Err(_) => return Err(deferred("connect to", &"timed out")),
            };
        // The whole point of opening the socket here: without this every message waits for
        // the peer's delayed ACK.
        let _ = tcp.set_nodelay(true);
        let greet = AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &self.cfg.helo);
        let mut conn = match tokio::time::timeout(self.cfg.timeout, greet).await {
            Ok(Ok(c)) => c,
            // A refusal at greeting or EHLO is about the server, not the recipient: defer.
            Ok(Err(e)) => return Err(deferred("greeting/EHLO from", &e)),
            Err(_) => return Err(deferred("greeting from", &"timed out")),
        };
        match self.cfg.tls {
            TlsMode::None => {}
            TlsMode::Opportunistic | TlsMode::Required if conn.can_starttls() => {
                let params = if self.cfg.tls == TlsMode::Required {
                    TlsParameters::new(self.cfg.tls_name.clone())
                } else {
                    // Opportunistic TLS between MTAs encrypts without authenticating (RFC 7435).
                    TlsParameters::builder(self.cfg.tls_name.clone())
                        .dangerous_accept_invalid_certs(true)
                        .dangerous_accept_invalid_hostnames(true)
                        .build()
                };
                let params = params.map_err(|e| deferred("TLS setup for", &e))?;
                let up = conn.starttls(params, &self.cfg.helo);
                match tokio::time::timeout(self.cfg.timeout, up).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(deferred("STARTTLS with", &e)),
                    Err(_) => return Err(deferred("STARTTLS with", &"timed out")),
                }
            }
            TlsMode::Required => {
                return Err(deferred("STARTTLS required but not offered by", &"server"));
            }
            TlsMode::Opportunistic => {}
        }
        if let Some(creds) = &self.cfg.credentials {
            let auth = conn.auth(&[Mechanism::Plain, Mechanism::Login], creds);
            match tokio::time::timeout(self.cfg.timeout, auth).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(deferred("AUTH with", &e)),
                Err(_) => return Err(deferred("AUTH with", &"timed out")),
            }
        }
        Ok(conn)
    }

    async fn transact(
        &self,
        conn: &mut AsyncSmtpConnection,
        envelope: &Envelope,
        message: &[u8],
    ) -> Result<String, SessionError> {
        match tokio::time::timeout(self.cfg.timeout, conn.send(envelope, message)).await {
            Ok(Ok(resp)) => {
                let mut s = resp.code().to_string();
                for line in resp.message() {
                    s.push(' ');
                    s.push_str(line);
                }
                Ok(s)
            }
            Ok(Err(e)) => {
                let text = e.to_string();
                let code = e.status().and_then(|c| c.to_string().parse::<u16>().ok());
                let response = reply_text(code, &text);
                match code {
                    Some(c) if e.is_permanent() => {
                        Err(SessionError::Outcome(Outcome::bounce(c, response)))
                    }
                    Some(_) => Err(SessionError::Outcome(Outcome::Deferred { response })),
                    // No reply code: the connection failed under us.
                    None => Err(SessionError::Stale(format!("{}: {text}", self.addr))),
                }
            }
            Err(_) => Err(SessionError::Outcome(Outcome::Deferred {
                response: format!("{}: timed out after {:?}", self.addr, self.cfg.timeout),
            })),
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

/// The SMTP envelope of one message.
pub fn envelope(mail_from: &str, rcpt: &str) -> Result<Envelope, String> {
    let parse = |s: &str| -> Result<Address, String> {
        s.parse::<Address>().map_err(|e| format!("{s:?}: {e}"))
    };
    Envelope::new(Some(parse(mail_from)?), vec![parse(rcpt)?]).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
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

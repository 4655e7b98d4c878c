//! Public HTTP listeners (tracking, metrics, API) served with limits that hostile clients
//! cannot get around: a client must send its request headers within `header_timeout` (hyper's
//! header-read timer, which also runs while a keep-alive connection waits for its next
//! request, so an idle connection is closed after it too), its whole request — head and body
//! — within `request_timeout`, and at most `max_connections` are served at once.
//!
//! A request counts as unfinished until its body has been read to the end (a request without
//! a body, once its head is read); only then is it being answered. `request_timeout` runs
//! from the moment the connection is ready for a request (accepted, or its previous response
//! handed over to be written) until the request is finished, so neither a client that
//! trickles its head nor one that trickles its body (a byte every few seconds, for ever) holds
//! a connection past it, whatever the handler; and a response the client does not read in
//! that time is not waited for either. Handlers bound their own work once the request is in.
//!
//! At the cap, a new connection does not wait in the kernel's backlog behind slow ones (a
//! real click would then wait for every slow client's timeout): the oldest connection that
//! has not finished its request — idle, still sending its head, or still sending its body,
//! which is what a slow-loris client does for ever — is closed to make room. A person's click
//! or one-click unsubscribe, whose request arrives at once, is therefore answered even while
//! thousands of connections trickle.
//!
//! The cap never exceeds a third of the process's descriptor limit, so held sockets cannot
//! starve the SMTP and Redis connections of the same process.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

use crate::metrics::Metrics;

/// How one listener limits its clients.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Names the listener in logs and in `paloma_http_connections_*{listener}`.
    pub name: &'static str,
    pub max_connections: usize,
    pub header_timeout: Duration,
    /// The whole request, head and body, must have arrived within this.
    pub request_timeout: Duration,
}

impl Limits {
    /// The cap actually used: `max_connections`, but at most a third of RLIMIT_NOFILE.
    pub fn effective_cap(&self) -> usize {
        let nofile = descriptor_limit().unwrap_or(1024);
        self.max_connections.min((nofile / 3).max(1) as usize)
    }
}

/// The token of an `Authorization: Bearer <token>` header, trimmed. The scheme's name is
/// matched without regard to case (RFC 7235 §2.1), as every client may write it.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let v = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Adds `Retry-After` to a 503 that passes by itself: Redis replicas catching up, or a
/// failover ending ([`crate::store::replication::RETRY_AFTER`] seconds).
pub fn retry_later(mut r: axum::response::Response) -> axum::response::Response {
    r.headers_mut().insert(
        axum::http::header::RETRY_AFTER,
        axum::http::HeaderValue::from(crate::store::replication::RETRY_AFTER),
    );
    r
}

/// The soft RLIMIT_NOFILE of this process.
pub fn descriptor_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass, which lives on this stack frame.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    (rc == 0).then_some(lim.rlim_cur)
}

/// One connection, as its task, its requests' bodies and the table see it.
struct Conn {
    /// Its request has been read in full (head and body) and is being answered: it is not
    /// evicted, and `request_timeout` does not run (the handler bounds its own work).
    answering: AtomicBool,
    /// When it became ready for its current request (accepted, or its last response handed
    /// over), in microseconds since the table's epoch.
    since: AtomicU64,
    close: Notify,
}

impl Conn {
    fn answering(&self) -> bool {
        self.answering.load(Ordering::Acquire)
    }

    /// The request is in: from now on it is being answered.
    fn request_read(&self) {
        self.answering.store(true, Ordering::Release);
    }

    /// The response is handed over: the next request's time starts now.
    fn ready(&self, now: u64) {
        self.since.store(now, Ordering::Release);
        self.answering.store(false, Ordering::Release);
    }
}

/// The connections of one listener.
struct Table {
    slots: Mutex<HashMap<u64, Arc<Conn>>>,
    emptied: Notify,
    epoch: Instant,
}

impl Default for Table {
    fn default() -> Self {
        Table {
            slots: Mutex::default(),
            emptied: Notify::new(),
            epoch: Instant::now(),
        }
    }
}

impl Table {
    /// Microseconds since the epoch: what `Conn::since` holds.
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// When a connection ready since `since` (table time) must have finished its request.
    fn due(&self, since: u64, timeout: Duration) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.epoch + Duration::from_micros(since) + timeout)
    }

    /// Registers a connection; at the cap, first closes the oldest one that has not
    /// finished its request (head or body). None when every slot is being answered (the
    /// new connection is refused).
    fn admit(&self, id: u64, cap: usize) -> Option<(Arc<Conn>, bool)> {
        let now = self.now();
        let mut slots = self.slots.lock().ok()?;
        let mut evicted = false;
        if slots.len() >= cap {
            let victim = slots
                .iter()
                .filter(|(_, c)| !c.answering())
                .min_by_key(|(_, c)| c.since.load(Ordering::Acquire))
                .map(|(k, _)| *k)?;
            if let Some(c) = slots.remove(&victim) {
                // notify_one stores a permit, so a connection not yet waiting still sees it.
                c.close.notify_one();
                evicted = true;
            }
        }
        let conn = Arc::new(Conn {
            answering: AtomicBool::new(false),
            since: AtomicU64::new(now),
            close: Notify::new(),
        });
        slots.insert(id, conn.clone());
        Some((conn, evicted))
    }

    fn remove(&self, id: u64) {
        if let Ok(mut slots) = self.slots.lock() {
            slots.remove(&id);
            if slots.is_empty() {
                self.emptied.notify_waiters();
            }
        }
    }

    fn len(&self) -> usize {
        self.slots.lock().map(|s| s.len()).unwrap_or(0)
    }
}

/// A request body that marks its connection's request as read once its end is reached.
struct Tracked {
    inner: Incoming,
    conn: Arc<Conn>,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.conn.request_read();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Resolves once `stop` is true (the watch guard is not held across an await).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Serves `router` on `listener` until `stop` turns true, then lets open requests finish
/// (at most `grace`). Handlers can read the peer address with `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let cap = limits.effective_cap();
    let table = Arc::new(Table::default());
    let open = metrics.http_connections.with_label_values(&[limits.name]);
    let mut next_id = 0u64;
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true)
        .max_buf_size(64 * 1024);
    let builder = Arc::new(builder);
    tracing::debug!(listener = limits.name, cap, "serving");
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors (EMFILE) or a connection reset before accept:
                    // wait a little instead of spinning.
                    tracing::warn!(listener = limits.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        next_id += 1;
        let id = next_id;
        let Some((conn, evicted)) = table.admit(id, cap) else {
            metrics
                .http_refused
                .with_label_values(&[limits.name, "all_busy"])
                .inc();
            drop(stream);
            continue;
        };
        if evicted {
            metrics
                .http_refused
                .with_label_values(&[limits.name, "evicted"])
                .inc();
        }
        let _ = stream.set_nodelay(true);
        open.inc();
        let (table, router, builder, open, metrics) = (
            table.clone(),
            router.clone(),
            builder.clone(),
            open.clone(),
            metrics.clone(),
        );
        let (name, timeout) = (limits.name, limits.request_timeout);
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let (t2, c2) = (table.clone(), conn.clone());
            let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let (mut parts, body) = req.into_parts();
                parts.extensions.insert(ConnectInfo(peer));
                if body.is_end_stream() {
                    c2.request_read();
                }
                let body = Tracked {
                    inner: body,
                    conn: c2.clone(),
                };
                let req = hyper::Request::from_parts(parts, body);
                let mut router = router.clone();
                let (table, conn) = (t2.clone(), c2.clone());
                async move {
                    let r = tower_service::Service::call(&mut router, req).await;
                    conn.ready(table.now());
                    r
                }
            });
            let served = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(served);
            let accepted = conn.since.load(Ordering::Acquire);
            let deadline = tokio::time::sleep_until(table.due(accepted, timeout));
            tokio::pin!(deadline);
            let mut draining = false;
            loop {
                tokio::select! {
                    _ = served.as_mut() => break,
                    _ = conn.close.notified() => break,
                    _ = stopped(&mut stop), if !draining => {
                        draining = true;
                        served.as_mut().graceful_shutdown();
                    }
                    _ = deadline.as_mut() => {
                        // A request being answered has no deadline here; the next one's
                        // starts when it is answered, so look again a timeout from now.
                        let next = if conn.answering() {
                            tokio::time::Instant::now() + timeout
                        } else {
                            table.due(conn.since.load(Ordering::Acquire), timeout)
                        };
                        if next <= tokio::time::Instant::now() {
                            metrics
                                .http_refused
                                .with_label_values(&[name, "request_timeout"])
                                .inc();
                            break;
                        }
                        deadline.as_mut().reset(next);
                    }
                }
            }
            table.remove(id);
            open.dec();
        });
    }
    drop(listener);
    // Open requests finish; idle connections close at once (graceful shutdown).
    let wait = async {
        while table.len() > 0 {
            let emptied = table.emptied.notified();
            if table.len() == 0 {
                break;
            }
            emptied.await;
        }
    };
    let _ = tokio::time::timeout(grace, wait).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_whatever_the_scheme_case() {
        let h = |v: &str| {
            let mut m = axum::http::HeaderMap::new();
            m.insert(axum::http::header::AUTHORIZATION, v.parse().unwrap());
            m
        };
        assert_eq!(bearer(&h("Bearer t0k")), Some("t0k"));
        assert_eq!(bearer(&h("bearer  t0k ")), Some("t0k"));
        assert_eq!(bearer(&h("BEARER t0k")), Some("t0k"));
        assert_eq!(bearer(&h("Basic dTpw")), None);
        assert_eq!(bearer(&h("Bearer")), None);
        assert_eq!(bearer(&axum::http::HeaderMap::new()), None);
    }

    #[test]
    fn at_the_cap_the_oldest_unfinished_request_makes_room_head_or_body() {
        let t = Table::default();
        let (c1, _) = t.admit(1, 3).unwrap();
        let (c2, _) = t.admit(2, 3).unwrap();
        let (c3, _) = t.admit(3, 3).unwrap();
        // Ready for a request at table times 1, 2, 3 µs.
        for (i, c) in [&c1, &c2, &c3].into_iter().enumerate() {
            c.ready(i as u64 + 1);
        }
        // 1 has its whole request in and is being answered; 2 sent its head and is still
        // sending its body; 3 is idle or still sending its head. 2 is the oldest unfinished.
        c1.request_read();
        assert!(!c2.answering());
        let (_, evicted) = t.admit(4, 3).unwrap();
        assert!(evicted);
        assert_eq!(t.len(), 3);
        let slots = t.slots.lock().unwrap();
        assert!(slots.contains_key(&1) && !slots.contains_key(&2));
        drop(slots);
        // Answered: 1 is ready for its next request, the youngest of all now.
        c1.ready(t.now() + 1_000_000);
        c3.request_read();
        let (c5, evicted) = t.admit(5, 3).unwrap();
        assert!(evicted);
        assert!(!t.slots.lock().unwrap().contains_key(&4));
        // Everything being answered: refused.
        c5.request_read();
        t.slots
            .lock()
            .unwrap()
            .values()
            .for_each(|c| c.request_read());
        assert!(t.admit(6, 3).is_none());
    }

    #[test]
    fn the_cap_follows_the_descriptor_limit() {
        let l = Limits {
            name: "t",
            max_connections: usize::MAX,
            header_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
        };
        let nofile = descriptor_limit().unwrap();
        assert_eq!(l.effective_cap() as u64, (nofile / 3).max(1));
    }
}

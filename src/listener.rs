//! Public HTTP listeners (tracking, metrics) served with limits that hostile clients cannot
//! get around: a client must send its request headers within `header_timeout` (hyper's
//! header-read timer, which also runs while a keep-alive connection waits for its next
//! request, so an idle connection is closed after it too), and at most `max_connections`
//! are served at once.
//!
//! At the cap, a new connection does not wait in the kernel's backlog behind slow ones (a
//! real click would then wait for every slow client's timeout): the oldest connection that
//! is not in the middle of a request — idle, or still sending its headers, which is what a
//! slow-loris client does for ever — is closed to make room. A person's click, whose request
//! arrives at once, is therefore answered even while thousands of connections trickle.
//!
//! The cap never exceeds a third of the process's descriptor limit, so held sockets cannot
//! starve the SMTP and Redis connections of the same process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
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
}

impl Limits {
    /// The cap actually used: `max_connections`, but at most a third of RLIMIT_NOFILE.
    pub fn effective_cap(&self) -> usize {
        let nofile = descriptor_limit().unwrap_or(1024);
        self.max_connections.min((nofile / 3).max(1) as usize)
    }
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

struct Slot {
    /// In the middle of a request (headers read, response not yet written): not evicted.
    busy: bool,
    /// When it last became idle (accepted, or answered its last request).
    since: Instant,
    close: Arc<Notify>,
}

/// The connections of one listener.
#[derive(Default)]
struct Table {
    slots: Mutex<HashMap<u64, Slot>>,
    emptied: Notify,
}

impl Table {
    /// Registers a connection; at the cap, first closes the oldest one not in a request.
    /// None when every slot is in a request (the new connection is refused).
    fn admit(&self, id: u64, cap: usize) -> Option<(Arc<Notify>, bool)> {
        let mut slots = self.slots.lock().ok()?;
        let mut evicted = false;
        if slots.len() >= cap {
            let victim = slots
                .iter()
                .filter(|(_, s)| !s.busy)
                .min_by_key(|(_, s)| s.since)
                .map(|(k, _)| *k)?;
            if let Some(s) = slots.remove(&victim) {
                // notify_one stores a permit, so a connection not yet waiting still sees it.
                s.close.notify_one();
                evicted = true;
            }
        }
        let close = Arc::new(Notify::new());
        slots.insert(
            id,
            Slot {
                busy: false,
                since: Instant::now(),
                close: close.clone(),
            },
        );
        Some((close, evicted))
    }

    fn set_busy(&self, id: u64, busy: bool) {
        if let Ok(mut slots) = self.slots.lock() {
            if let Some(s) = slots.get_mut(&id) {
                s.busy = busy;
                s.since = Instant::now();
            }
        }
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
        let Some((close, evicted)) = table.admit(id, cap) else {
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
        let (table, router, builder, open) =
            (table.clone(), router.clone(), builder.clone(), open.clone());
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let t2 = table.clone();
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                let mut router = router.clone();
                let table = t2.clone();
                async move {
                    table.set_busy(id, true);
                    let r = tower_service::Service::call(&mut router, req).await;
                    table.set_busy(id, false);
                    r
                }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            let mut draining = false;
            loop {
                tokio::select! {
                    _ = conn.as_mut() => break,
                    _ = close.notified() => break,
                    _ = stopped(&mut stop), if !draining => {
                        draining = true;
                        conn.as_mut().graceful_shutdown();
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
    fn at_the_cap_the_oldest_connection_not_in_a_request_makes_room() {
        let t = Table::default();
        let (c1, _) = t.admit(1, 2).unwrap();
        t.admit(2, 2).unwrap();
        t.set_busy(1, true);
        // 1 is in a request: 2 is closed for 3.
        let (_, evicted) = t.admit(3, 2).unwrap();
        assert!(evicted);
        assert_eq!(t.len(), 2);
        assert!(t.slots.lock().unwrap().contains_key(&1));
        t.set_busy(3, true);
        // Everything busy: refused.
        assert!(t.admit(4, 2).is_none());
        drop(c1);
    }

    #[test]
    fn the_cap_follows_the_descriptor_limit() {
        let l = Limits {
            name: "t",
            max_connections: usize::MAX,
            header_timeout: Duration::from_secs(1),
        };
        let nofile = descriptor_limit().unwrap();
        assert_eq!(l.effective_cap() as u64, (nofile / 3).max(1));
    }
}

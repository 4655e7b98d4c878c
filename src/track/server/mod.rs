//! The tracking endpoint: the open pixel (`/o/{token}`), tracked links (`/c/{token}`) and
//! unsubscribe (`/u/{token}`), all carrying tokens signed by [`Signer`].
//!
//! Opens and clicks never wait on Redis: their events go through a bounded queue to one
//! writer task that stores them per batch (one script call, one round trip). When Redis
//! falls behind and the queue is full, tracking events are dropped and counted
//! (`paloma_tracking_events_dropped_total`); the pixel and the redirect are answered anyway.
//! An unsubscribe, by contrast, is written before it is confirmed: the page must not say
//! "unsubscribed" unless it is true.
//!
//! A recipient whose address is suppressed as `unsubscribed` or `complained` is no longer
//! tracked: their links and pixel keep working, but record nothing.
//!
//! `HEAD` answers like `GET` and records nothing. `GET /u/…` only shows a confirmation
//! page, because link scanners follow every link in a message; the unsubscribe itself is
//! the `POST` (the page's button, or an RFC 8058 one-click POST from the mailbox provider).
//!
//! With `[tracking] click_param` set, each redirect appends `{click_param}=<click id>` to its
//! target (see [`crate::track::clickid`]): the click's message and the tracker's verdict
//! (person or machine), sealed, for the shop to hand back with a conversion. A person's
//! click of a marketing message is also kept as the recipient's last (`last_human_click`
//! in `r:{address}`), what a conversion posted by address is attributed to.
//!
//! Files: this one (state, routes, pixel and redirect), [`writer`] (the events' batch
//! writer), [`repeats`] (the memory of recent hits), [`unsubscribe`] (the opt-out and its
//! page). The providers' webhooks served on the same listener are `crate::bounces::webhooks`.

mod repeats;
mod unsubscribe;
mod writer;

use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::{mpsc, watch};

use self::repeats::Repeats;
use self::writer::Pending;
use super::machine::{Detector, Hit};
use super::token::{Claims, Kind, Signer, MAX_TOKEN_LEN};
use crate::metrics::Metrics;
use crate::queue::events::{Event, EventKind};
use crate::queue::Keys;
use crate::store::replication::Acks;
use crate::store::RedisConn;
use crate::track::clickid::{append_param, Click, ClickIds, LastClick};

/// What the tracking server needs from the daemon.
pub struct TrackState {
    pub detector: Detector,
    pub signer: Signer,
    pub redis: RedisConn,
    pub keys: Keys,
    pub metrics: Arc<Metrics>,
    /// Repeats of one message's pixel or link within this are not recorded.
    pub repeat_window: Duration,
    pub limits: crate::listener::Limits,
    /// Routes served beside tracking, with their own state: the providers' webhooks
    /// (`crate::bounces::webhooks`), when one is configured.
    pub webhooks: Option<Router>,
    /// What an unsubscribe waits for before its success (`redis.ack_replicas`).
    pub acks: Arc<Acks>,
    /// `[tracking] click_param`: the query parameter a redirect adds its click id as.
    pub click_param: Option<String>,
    pub click_ids: Arc<ClickIds>,
}

/// Tracking events waiting for the writer; beyond this, new ones are dropped.
const EVENT_QUEUE: usize = 8192;
/// How long a request waits for room in a full event queue before its event is dropped.
const QUEUE_WAIT: Duration = Duration::from_secs(2);
/// Largest POST body read (a one-click body is 26 bytes).
const MAX_BODY: usize = 16 * 1024;

/// 1×1 transparent GIF89a.
const PIXEL: &[u8] = &[
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

pub(super) struct Inner {
    signer: Signer,
    redis: RedisConn,
    keys: Keys,
    metrics: Arc<Metrics>,
    tx: mpsc::Sender<Pending>,
    detector: Detector,
    repeats: Repeats,
    acks: Arc<Acks>,
    click_param: Option<String>,
    click_ids: Arc<ClickIds>,
}

pub(super) type Tracker = Arc<Inner>;

/// Binds `addr` and serves until `stop` turns true; the returned task ends once open
/// connections are done and queued events are written (or a short grace period passes).
pub fn serve(
    listener: tokio::net::TcpListener,
    state: TrackState,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "tracking endpoint listening");
    }
    let (tx, rx) = mpsc::channel(EVENT_QUEUE);
    let writer = tokio::spawn(writer::write_events(
        rx,
        state.redis.clone(),
        state.keys.clone(),
        state.metrics.clone(),
    ));
    let metrics = state.metrics.clone();
    let app = router(
        Arc::new(Inner {
            signer: state.signer,
            redis: state.redis,
            keys: state.keys,
            metrics: state.metrics,
            tx,
            detector: state.detector,
            repeats: Repeats::new(state.repeat_window),
            acks: state.acks,
            click_param: state.click_param,
            click_ids: state.click_ids,
        }),
        state.webhooks,
    );
    tokio::spawn(async move {
        crate::listener::serve(
            listener,
            app,
            state.limits,
            metrics,
            stop,
            Duration::from_secs(3),
        )
        .await;
        // The router, and with it the queue's sender, is gone: the writer drains and ends.
        let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    })
}

/// The tracking routes, and `extra` beside them (the providers' webhooks, which set their
/// own body limit): anything else is the fallback's 404, answered without reading (or
/// waiting for) the body.
fn router(app: Tracker, extra: Option<Router>) -> Router {
    let r: Router = Router::new()
        .route("/o/{token}", get(open))
        .route("/c/{token}", get(click))
        .route(
            "/u/{token}",
            get(unsubscribe::unsubscribe_page).post(unsubscribe::unsubscribe),
        )
        .with_state(app);
    match extra {
        Some(extra) => r.merge(extra),
        None => r,
    }
    .fallback(|| async { not_found() })
    .layer(DefaultBodyLimit::max(MAX_BODY))
}

impl Inner {
    pub(super) fn count(&self, kind: &str, result: &str) {
        self.metrics
            .tracking_requests
            .with_label_values(&[kind, result])
            .inc();
    }

    /// Queues an event. A full queue (Redis behind) makes the request wait, up to
    /// [`QUEUE_WAIT`], rather than lose the event: under overload responses slow down first;
    /// only past that is an event dropped (and counted).
    async fn record(&self, c: &Claims, kind: &'static str, machine: bool, event: String) {
        // What attribution by address needs of a person's click on a marketing message.
        let last_click = if kind == "c" && !machine && !c.transactional {
            LastClick {
                at: unix_now(),
                job: c.id.clone(),
                campaign: c.campaign.clone(),
                link: c.link.clone(),
                variant: c.variant.clone(),
                touch: c.touch.clone(),
            }
            .encode()
        } else {
            String::new()
        };
        let p = Pending {
            last_click,
            to: crate::values::address_key(&c.to),
            event,
            kind,
            id: c.id.clone(),
            campaign: c.campaign.clone(),
            link: c.link.clone(),
            machine,
            variant: c.variant.clone(),
            touch: c.touch.clone(),
        };
        let p = match self.tx.try_send(p) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(p)) => p,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.metrics.tracking_events_dropped.inc();
                return;
            }
        };
        if self.tx.send_timeout(p, QUEUE_WAIT).await.is_err() {
            self.metrics.tracking_events_dropped.inc();
            tracing::debug!("tracking event queue full; event dropped");
        }
    }

    /// Judges a hit (see [`super::machine`]) and counts the reason of a machine's.
    fn is_machine(
        &self,
        c: &Claims,
        peer: SocketAddr,
        headers: &HeaderMap,
        link: Option<u64>,
    ) -> bool {
        let hit = Hit {
            user_agent: user_agent(headers),
            ip: self.detector.client_ip(peer, headers),
            sent: c.sent,
            click: link.map(|l| (c.id.as_str(), l)),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        match self.detector.judge(&hit, now) {
            Some(reason) => {
                self.metrics
                    .machine_hits
                    .with_label_values(&[reason.as_str()])
                    .inc();
                true
            }
            None => false,
        }
    }

    /// The redirect target with the click's id (`[tracking] click_param`), when configured.
    fn with_click_id(&self, c: &Claims, machine: bool) -> Option<HeaderValue> {
        let param = self.click_param.as_deref()?;
        let id = self.click_ids.seal(&Click {
            job: c.id.clone(),
            campaign: c.campaign.clone(),
            to: c.to.clone(),
            link: c.link.clone(),
            variant: c.variant.clone(),
            touch: c.touch.clone(),
            transactional: c.transactional,
            machine,
            at: unix_now(),
        });
        location(&append_param(&c.url, param, &id))
    }

    /// The claims of a token of `kind`, or None for anything else.
    pub(super) fn verify(
        &self,
        token: Result<Path<String>, PathRejection>,
        kind: Kind,
    ) -> Option<Claims> {
        let Path(token) = token.ok()?;
        if token.len() > MAX_TOKEN_LEN {
            return None;
        }
        self.signer.verify(&token).ok().filter(|c| c.kind == kind)
    }
}

async fn open(
    State(app): State<Tracker>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    headers: HeaderMap,
    token: Result<Path<String>, PathRejection>,
) -> Response {
    let token = token.map(|Path(t)| Path(t.strip_suffix(".gif").unwrap_or(&t).to_string()));
    let Some(c) = app.verify(token, Kind::Open) else {
        app.count("open", "invalid");
        return not_found();
    };
    if method == Method::HEAD {
        app.count("open", "head");
    } else {
        let machine = app.is_machine(&c, peer, &headers, None);
        if app
            .repeats
            .seen(if machine { "om" } else { "o" }, &c.id, "")
        {
            app.count("open", "repeat");
            return pixel();
        }
        app.count("open", if machine { "machine" } else { "human" });
        let mut ev = Event::new(EventKind::Opened, &c.id, &c.campaign, &c.to);
        ev.machine = Some(machine);
        ev.variant = (!c.variant.is_empty()).then_some(c.variant.as_str());
        app.record(&c, "o", machine, ev.to_json()).await;
    }
    pixel()
}

fn pixel() -> Response {
    (
        [
            (header::CONTENT_TYPE, "image/gif"),
            (
                header::CACHE_CONTROL,
                "no-store, no-cache, must-revalidate, private",
            ),
            (header::PRAGMA, "no-cache"),
        ],
        Bytes::from_static(PIXEL),
    )
        .into_response()
}

async fn click(
    State(app): State<Tracker>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    headers: HeaderMap,
    token: Result<Path<String>, PathRejection>,
) -> Response {
    let Some((c, location)) = app
        .verify(token, Kind::Click)
        .and_then(|c| location(&c.url).map(|l| (c, l)))
    else {
        app.count("click", "invalid");
        return not_found();
    };
    if method == Method::HEAD {
        app.count("click", "head");
        // Nobody reading the mail sends HEAD: a machine's, if it is ever handed back.
        redirect(app.with_click_id(&c, true).unwrap_or(location))
    } else {
        let mut h = DefaultHasher::new();
        c.url.hash(&mut h);
        let machine = app.is_machine(&c, peer, &headers, Some(h.finish()));
        // Machine and human hits are told apart: a scanner's prefetch must not hide the
        // person's click that follows.
        let location = app.with_click_id(&c, machine).unwrap_or(location);
        if app
            .repeats
            .seen(if machine { "cm" } else { "c" }, &c.id, &c.url)
        {
            app.count("click", "repeat");
            return redirect(location);
        }
        app.count("click", if machine { "machine" } else { "human" });
        let mut ev = Event::new(EventKind::Clicked, &c.id, &c.campaign, &c.to);
        ev.url = Some(&c.url);
        ev.link = Some(&c.link);
        ev.machine = Some(machine);
        ev.variant = (!c.variant.is_empty()).then_some(c.variant.as_str());
        app.record(&c, "c", machine, ev.to_json()).await;
        redirect(location)
    }
}

fn unix_now() -> i64 {
    crate::queue::now_ms() / 1000
}

fn redirect(location: HeaderValue) -> Response {
    Response::builder()
        .status(StatusCode::FOUND)
        .header(header::LOCATION, location)
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::empty())
        .unwrap_or_else(|_| not_found())
}

pub(super) fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CACHE_CONTROL, "no-store")],
        "not found\n",
    )
        .into_response()
}

fn user_agent(headers: &HeaderMap) -> &str {
    headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// The redirect target of a click token: only `http(s)` URLs, never one with control
/// characters; spaces and non-ASCII bytes are percent-encoded so the header stays valid.
fn location(url: &str) -> Option<HeaderValue> {
    let scheme = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if !(scheme.starts_with("http://") || scheme.starts_with("https://")) {
        return None;
    }
    if url.chars().any(char::is_control) {
        return None;
    }
    let mut out = String::with_capacity(url.len() + 16);
    for b in url.bytes() {
        if b.is_ascii_graphic() {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_urls_become_locations() {
        assert_eq!(
            location("https://shop.example/x?a=1&b=2").unwrap(),
            "https://shop.example/x?a=1&b=2"
        );
        assert_eq!(
            location("HTTP://shop.example/caf\u{e9} y").unwrap(),
            "HTTP://shop.example/caf%C3%A9%20y"
        );
        for bad in [
            "javascript:alert(1)",
            "//evil.example/",
            "ftp://x/",
            "https://x/\r\nSet-Cookie: a=b",
            "",
        ] {
            assert!(location(bad).is_none(), "{bad:?}");
        }
    }
}

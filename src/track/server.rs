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

use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::{mpsc, watch};

use super::machine::{Detector, Hit};
use super::token::{Claims, Kind, Signer, MAX_TOKEN_LEN};
use crate::metrics::Metrics;
use crate::queue::events::{Event, EventKind};
use crate::queue::Keys;
use crate::store::replication::{eval, AckError, Acks};
use crate::store::RedisConn;

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
    /// SendGrid's event webhook (`[providers] sendgrid_public_key`), if configured.
    pub sendgrid: Option<crate::bounces::providers::SendGrid>,
    /// Amazon SES through SNS (`[providers] ses_topics`), if configured.
    pub ses: Option<crate::bounces::ses::Ses>,
    /// What an unsubscribe or a provider's report waits for before its success
    /// (`redis.ack_replicas`).
    pub acks: Arc<Acks>,
}

/// Tracking events waiting for the writer; beyond this, new ones are dropped.
const EVENT_QUEUE: usize = 8192;
/// How long a request waits for room in a full event queue before its event is dropped.
const QUEUE_WAIT: Duration = Duration::from_secs(2);
/// Events per script call.
const EVENT_BATCH: usize = 256;
/// Largest POST body read (a one-click body is 26 bytes).
const MAX_BODY: usize = 16 * 1024;
/// An unsubscribe that Redis has not confirmed by then gets a "try again" page.
const UNSUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest provider webhook body taken (SendGrid batches events up to about 1 MB).
const MAX_WEBHOOK_BODY: usize = 4 << 20;
/// How long a provider event's once-only marker is kept (providers retry for hours).
const WEBHOOK_MARKER_TTL: u64 = 7 * 86400;

/// 1×1 transparent GIF89a.
const PIXEL: &[u8] = &[
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

/// Writes a batch of tracking events, skipping recipients who opted out, and keeps the
/// counters that `paloma stats` reads: per campaign `opened`/`clicked` (people, not
/// machines), `unique_opened`/`unique_clicked` (one per send, counted with a HyperLogLog per
/// campaign so millions of sends cost kilobytes), `*_machine` for scanner hits; per link
/// totals and uniques in `links:{campaign}`; and the recipient's `last_open`/`last_click`
/// in `r:{address}`.
/// Keys and arguments: see the script. Returns a code per event: 0 not recorded (opted
/// out), 1 recorded, 2 recorded and the first by a person for that send.
const WRITE_EVENTS: &str = include_str!("scripts/write_events.lua");

/// How often Redis may refuse a batch of tracking events (answer with an error, as against
/// not answering) before the batch goes to the dead letters with the reason, rather than
/// being retried for ever behind every click that follows.
const REFUSALS: u32 = 5;

/// Records a recipient's opt-out: in `optouts` (kept apart from the suppression list, so that
/// removing a bounce or a manual block later cannot undo it), on the suppression list unless
/// the address is already there for another reason, and as one `unsubscribed` event — the
/// first time only, so that a second click or a provider's retried POST is not a second event.
/// KEYS: suppressed hash, events stream, the campaign's stats hash, optouts hash, its
/// per-variant and per-touch counters;
/// ARGV: lowercased address, event JSON, now (unix ms), events max length, the job's variant
/// and touch bucket ("" when none).
const UNSUBSCRIBE: &str = include_str!("scripts/unsubscribe.lua");

struct Pending {
    to: String,
    event: String,
    /// `o` or `c`.
    kind: &'static str,
    id: String,
    campaign: String,
    link: String,
    machine: bool,
    /// The job's experiment variant ("" when none).
    variant: String,
    /// The job's touch bucket ("" when none).
    touch: String,
}

struct Inner {
    signer: Signer,
    redis: RedisConn,
    keys: Keys,
    metrics: Arc<Metrics>,
    tx: mpsc::Sender<Pending>,
    detector: Detector,
    repeats: Repeats,
    sendgrid: Option<crate::bounces::providers::SendGrid>,
    ses: Option<crate::bounces::ses::Ses>,
    acks: Arc<Acks>,
}

/// Which (message, pixel or link) hits were recorded lately, so that a repeat within the
/// repeat window is answered but not recorded: a replayed or flooded link then costs no
/// Redis write at all, and one message can add at most one event per link and one per
/// pixel per window. Two generations of hashes, each covering `window`: a hit is a repeat
/// if either holds it, so it is remembered between one and two windows. Each generation
/// holds at most `CAP` hashes (then it turns over early): memory stays flat, about 16 bytes
/// a hash, whatever the traffic.
struct Repeats {
    window: Duration,
    hasher: std::hash::RandomState,
    gens: std::sync::Mutex<(
        std::collections::HashSet<u64>,
        std::collections::HashSet<u64>,
        std::time::Instant,
    )>,
}

impl Repeats {
    const CAP: usize = 500_000;

    fn new(window: Duration) -> Self {
        Repeats {
            window,
            hasher: std::hash::RandomState::new(),
            gens: std::sync::Mutex::new((
                Default::default(),
                Default::default(),
                std::time::Instant::now(),
            )),
        }
    }

    /// True when this (kind, send id, url) was recorded within the window; else it is
    /// remembered now and false is returned.
    fn seen(&self, kind: &str, id: &str, url: &str) -> bool {
        self.seen_at(kind, id, url, std::time::Instant::now())
    }

    fn seen_at(&self, kind: &str, id: &str, url: &str, now: std::time::Instant) -> bool {
        use std::hash::BuildHasher;
        let h = self.hasher.hash_one((kind, id, url));
        let Ok(mut g) = self.gens.lock() else {
            return false;
        };
        let (current, previous, since) = &mut *g;
        let age = now.saturating_duration_since(*since);
        if age >= 2 * self.window {
            // Nothing was seen for a whole window: both generations are too old.
            current.clear();
            previous.clear();
            *since = now;
        } else if age >= self.window || current.len() >= Self::CAP {
            *previous = std::mem::take(current);
            *since = now;
        }
        if current.contains(&h) || previous.contains(&h) {
            return true;
        }
        current.insert(h);
        false
    }
}

type App = Arc<Inner>;

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
    let writer = tokio::spawn(write_events(
        rx,
        state.redis.clone(),
        state.keys.clone(),
        state.metrics.clone(),
    ));
    let metrics = state.metrics.clone();
    let app = router(Arc::new(Inner {
        signer: state.signer,
        redis: state.redis,
        keys: state.keys,
        metrics: state.metrics,
        tx,
        detector: state.detector,
        repeats: Repeats::new(state.repeat_window),
        sendgrid: state.sendgrid,
        ses: state.ses,
        acks: state.acks,
    }));
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

fn router(app: App) -> Router {
    let mut r = Router::new()
        .route("/o/{token}", get(open))
        .route("/c/{token}", get(click))
        .route("/u/{token}", get(unsubscribe_page).post(unsubscribe));
    // A provider's webhook is routed only when configured: otherwise the fallback's 404,
    // answered without reading (or waiting for) the body. A provider sends events in
    // batches: a larger body limit for its route alone.
    if app.sendgrid.is_some() {
        r = r.route(
            "/webhooks/sendgrid",
            post(sendgrid).layer(DefaultBodyLimit::max(MAX_WEBHOOK_BODY)),
        );
    }
    if app.ses.is_some() {
        r = r.route(
            "/webhooks/ses",
            post(ses).layer(DefaultBodyLimit::max(MAX_WEBHOOK_BODY)),
        );
    }
    r.fallback(|| async { not_found() })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(app)
}

/// SendGrid's Event Webhook: verified (signature, timestamp), then each bounce, drop and
/// spam report recorded against the job its unique args name, once per event. 200 once
/// written; 401 unsigned or forged; 400 not JSON; 503 when Redis fails (SendGrid retries).
async fn sendgrid(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(sg) = &app.sendgrid else {
        return not_found();
    };
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let now = chrono::Utc::now().timestamp();
    use crate::bounces::providers::{self, Refused};
    if let Err(why) = sg.verify(h(providers::SIGNATURE), h(providers::TIMESTAMP), &body, now) {
        let result = match why {
            Refused::Unsigned => "unsigned",
            Refused::BadSignature => "forged",
            Refused::Stale => "stale",
        };
        app.count("sendgrid", result);
        return (StatusCode::UNAUTHORIZED, "signature refused\n").into_response();
    }
    let items = match providers::sendgrid_events(&body) {
        Ok(i) => i,
        Err(e) => {
            app.count("sendgrid", "malformed");
            return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response();
        }
    };
    if let Err(r) = record_items(&app, "sg", &items).await {
        return r;
    }
    app.count("sendgrid", "ok");
    (StatusCode::OK, "ok\n").into_response()
}

/// Records provider events (each once, by `{source}:{event id}`) in one pipeline, confirmed
/// by the replicas (`redis.ack_replicas`); Err(503 with `Retry-After`) when Redis fails or
/// the replicas do not confirm in time (the provider retries).
async fn record_items(
    app: &App,
    source: &str,
    items: &[crate::bounces::providers::Item],
) -> Result<(), Response> {
    use crate::bounces::record::{record, Report};
    let mut redis = app.redis.clone();
    let reports: Vec<Report<'_>> = items
        .iter()
        .map(|it| Report {
            marker: app
                .keys
                .report_seen(&format!("{source}:{}", it.event_id), it.finding.what),
            job: &it.job,
            finding: &it.finding,
        })
        .collect();
    let written = record(
        &mut redis,
        &app.keys,
        &app.acks,
        "webhooks",
        WEBHOOK_MARKER_TTL,
        &reports,
    )
    .await;
    match written {
        Ok(recorded) => {
            for (it, new) in items.iter().zip(recorded) {
                match new {
                    true => it.finding.count(&app.metrics, &it.job.campaign),
                    false => app.metrics.reports.with_label_values(&["duplicate"]).inc(),
                }
            }
            Ok(())
        }
        Err(e) => {
            if matches!(e, AckError::Redis(_)) {
                app.metrics.redis_errors.inc();
            }
            tracing::warn!(error = %e, source, "recording provider events failed; the provider will retry");
            Err(retry_later(
                (StatusCode::SERVICE_UNAVAILABLE, "try again later\n").into_response(),
            ))
        }
    }
}

/// Adds `Retry-After` to a 503 that passes by itself (a replica catching up, a failover).
fn retry_later(mut r: Response) -> Response {
    r.headers_mut().insert(
        header::RETRY_AFTER,
        header::HeaderValue::from(crate::api::ACK_RETRY_AFTER),
    );
    r
}

/// Amazon SES notifications through SNS: verified (topic, certificate URL, signature),
/// then a subscription is confirmed, or a Bounce / Complaint recorded against the job its
/// original headers name. 200 once done; 401 refused; 502 when a confirmation fails.
async fn ses(State(app): State<App>, body: Bytes) -> Response {
    let Some(ses) = &app.ses else {
        return not_found();
    };
    use crate::bounces::ses::Refused;
    let m = match ses.verify(&body).await {
        Ok(m) => m,
        Err(why) => {
            let result = match why {
                Refused::Malformed => "malformed",
                Refused::Topic => "topic",
                Refused::CertUrl => "cert_url",
                Refused::Cert => "cert",
                Refused::BadSignature => "forged",
                Refused::Version => "signature_version",
            };
            app.count("ses", result);
            if why == Refused::Version {
                tracing::warn!("an SNS message with SignatureVersion 1 (SHA1) was refused: set the topic's SignatureVersion to 2");
            }
            return (StatusCode::UNAUTHORIZED, "signature refused\n").into_response();
        }
    };
    match m.kind.as_str() {
        "SubscriptionConfirmation" => {
            if !ses.confirm(&m).await {
                app.count("ses", "confirm_failed");
                return (StatusCode::BAD_GATEWAY, "could not confirm\n").into_response();
            }
            tracing::info!(topic = %m.topic_arn, "SNS subscription confirmed");
            app.count("ses", "subscribed");
        }
        "Notification" => {
            let items = crate::bounces::ses::ses_events(&m);
            if let Err(r) = record_items(&app, "ses", &items).await {
                return r;
            }
            app.count("ses", "ok");
        }
        _ => app.count("ses", "ignored"),
    }
    (StatusCode::OK, "ok\n").into_response()
}

async fn write_events(
    mut rx: mpsc::Receiver<Pending>,
    mut redis: RedisConn,
    keys: Keys,
    metrics: Arc<Metrics>,
) {
    let script = redis::Script::new(WRITE_EVENTS);
    let mut buf = Vec::with_capacity(EVENT_BATCH);
    while rx.recv_many(&mut buf, EVENT_BATCH).await > 0 {
        let mut inv = script.key(&keys.suppressed);
        inv.key(&keys.events)
            .key(&keys.dead)
            .arg(crate::queue::now_ms() / 1000)
            .arg(keys.events_max_len);
        for p in &buf {
            inv.key(keys.stats(&p.campaign))
                .key(keys.unique(p.kind, &p.campaign))
                .key(keys.links(&p.campaign))
                .key(keys.unique_link(&p.campaign, &p.link))
                .key(keys.recipient(&p.to))
                .key(keys.variants(&p.campaign))
                .key(keys.touches(&p.campaign))
                .key(keys.timeline(&p.campaign))
                .arg(&p.to)
                .arg(&p.event)
                .arg(p.kind)
                .arg(&p.id)
                .arg(&p.link)
                .arg(if p.machine { "1" } else { "0" })
                .arg(&p.variant)
                .arg(&p.touch);
        }
        let mut delay = Duration::from_millis(50);
        let mut refusals = 0;
        let codes = loop {
            match inv.invoke_async::<Vec<i64>>(&mut redis).await {
                Ok(c) => break c,
                Err(e) => {
                    metrics.redis_errors.inc();
                    if crate::store::is_refusal(&e) {
                        refusals += 1;
                        if refusals >= REFUSALS {
                            dead_letter_events(&mut redis, &keys, &buf, &e.to_string(), &metrics)
                                .await;
                            break Vec::new();
                        }
                    }
                    tracing::warn!(error = %e, events = buf.len(), "writing tracking events failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        };
        let skipped = codes.iter().filter(|c| **c < 0).count();
        if skipped > 0 {
            metrics.tracking_events_dead.inc_by(skipped as u64);
            tracing::warn!(
                events = skipped,
                "tracking events whose Redis keys hold another type went to the dead letters"
            );
        }
        // Engagement metrics per campaign (and per named link), counted per batch from what
        // the script actually recorded.
        for (p, code) in buf.iter().zip(codes) {
            if code <= 0 {
                continue;
            }
            let what = if p.kind == "o" { "opened" } else { "clicked" };
            let who = if p.machine { "machine" } else { "human" };
            metrics
                .engagement
                .with_label_values(&[p.campaign.as_str(), what, who])
                .inc();
            if code == 2 {
                metrics
                    .engagement_unique
                    .with_label_values(&[p.campaign.as_str(), what])
                    .inc();
            }
            if p.kind == "c" && !p.link.is_empty() && !p.machine {
                metrics
                    .link_clicks
                    .with_label_values(&[p.campaign.as_str(), p.link.as_str()])
                    .inc();
            }
        }
        buf.clear();
    }
}

/// A batch Redis keeps refusing goes to `{prefix}dead`, each event with the error (fields
/// `event`, `error`), so that it can be looked at and replayed; if even that fails it is
/// dropped and counted, never retried for ever.
async fn dead_letter_events(
    redis: &mut RedisConn,
    keys: &Keys,
    buf: &[Pending],
    error: &str,
    metrics: &Metrics,
) {
    let mut p = redis::pipe();
    for e in buf {
        p.cmd("XADD")
            .arg(&keys.dead)
            .arg("*")
            .arg("event")
            .arg(&e.event)
            .arg("error")
            .arg(error)
            .ignore();
    }
    tracing::warn!(
        error,
        events = buf.len(),
        "Redis keeps refusing a batch of tracking events; dead-lettered"
    );
    match p.query_async::<()>(redis).await {
        Ok(()) => metrics.tracking_events_dead.inc_by(buf.len() as u64),
        Err(e) => {
            metrics.tracking_events_dropped.inc_by(buf.len() as u64);
            tracing::warn!(error = %e, events = buf.len(), "dead-lettering tracking events failed; dropped");
        }
    }
}

impl Inner {
    fn count(&self, kind: &str, result: &str) {
        self.metrics
            .tracking_requests
            .with_label_values(&[kind, result])
            .inc();
    }

    /// Queues an event. A full queue (Redis behind) makes the request wait, up to
    /// [`QUEUE_WAIT`], rather than lose the event: under overload responses slow down first;
    /// only past that is an event dropped (and counted).
    async fn record(&self, c: &Claims, kind: &'static str, machine: bool, event: String) {
        let p = Pending {
            to: c.to.to_lowercase(),
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

    /// The claims of a token of `kind`, or None for anything else.
    fn verify(&self, token: Result<Path<String>, PathRejection>, kind: Kind) -> Option<Claims> {
        let Path(token) = token.ok()?;
        if token.len() > MAX_TOKEN_LEN {
            return None;
        }
        self.signer.verify(&token).ok().filter(|c| c.kind == kind)
    }
}

async fn open(
    State(app): State<App>,
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
    State(app): State<App>,
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
    } else {
        let mut h = DefaultHasher::new();
        c.url.hash(&mut h);
        let machine = app.is_machine(&c, peer, &headers, Some(h.finish()));
        // Machine and human hits are told apart: a scanner's prefetch must not hide the
        // person's click that follows.
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
    }
    redirect(location)
}

fn redirect(location: HeaderValue) -> Response {
    Response::builder()
        .status(StatusCode::FOUND)
        .header(header::LOCATION, location)
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::empty())
        .unwrap_or_else(|_| not_found())
}

async fn unsubscribe_page(
    State(app): State<App>,
    uri: Uri,
    headers: HeaderMap,
    token: Result<Path<String>, PathRejection>,
) -> Response {
    let Some(c) = app.verify(token, Kind::Unsubscribe) else {
        app.count("unsubscribe", "invalid");
        return not_found();
    };
    app.count("unsubscribe", "page");
    let lang = Lang::of(&uri, &headers);
    page(StatusCode::OK, lang, Page::Confirm, &c.to)
}

async fn unsubscribe(
    State(app): State<App>,
    uri: Uri,
    headers: HeaderMap,
    token: Result<Path<String>, PathRejection>,
    // Read (and so bounded by the body limit) but not needed: any POST to a valid token
    // unsubscribes, whether the page's button or an RFC 8058 `List-Unsubscribe=One-Click`.
    _body: Bytes,
) -> Response {
    let Some(c) = app.verify(token, Kind::Unsubscribe) else {
        app.count("unsubscribe", "invalid");
        return not_found();
    };
    let lang = Lang::of(&uri, &headers);
    let mut event = Event::new(EventKind::Unsubscribed, &c.id, &c.campaign, &c.to);
    event.variant = (!c.variant.is_empty()).then_some(c.variant.as_str());
    let event = event.to_json();
    let mut redis = app.redis.clone();
    let stats = app.keys.stats(&c.campaign);
    let variants = app.keys.variants(&c.campaign);
    let touches = app.keys.touches(&c.campaign);
    let mut cmd = eval(
        UNSUBSCRIBE,
        &[
            &app.keys.suppressed,
            &app.keys.events,
            &stats,
            &app.keys.optouts,
            &variants,
            &touches,
        ],
    );
    cmd.arg(c.to.to_lowercase())
        .arg(event)
        .arg(crate::queue::now_ms())
        .arg(app.keys.events_max_len)
        .arg(&c.variant)
        .arg(&c.touch);
    let mut p = redis::pipe();
    p.add_command(cmd);
    // Confirmed by the replicas before the page says so (`redis.ack_replicas`).
    let write = app
        .acks
        .write::<(i64,)>(&mut redis, &p, false, "unsubscribe");
    match tokio::time::timeout(UNSUBSCRIBE_TIMEOUT + app.acks.timeout(), write).await {
        Ok(Ok((first,))) => {
            app.count(
                "unsubscribe",
                if first == 1 { "unsubscribed" } else { "repeat" },
            );
            page(StatusCode::OK, lang, Page::Done, &c.to)
        }
        Ok(Err(e)) => {
            if matches!(e, AckError::Redis(_)) {
                app.metrics.redis_errors.inc();
            }
            app.count("unsubscribe", "error");
            tracing::warn!(error = %e, "unsubscribe not written");
            retry_later(page(
                StatusCode::SERVICE_UNAVAILABLE,
                lang,
                Page::Failed,
                &c.to,
            ))
        }
        Err(_) => {
            app.count("unsubscribe", "error");
            tracing::warn!("unsubscribe not written: Redis did not answer in time");
            retry_later(page(
                StatusCode::SERVICE_UNAVAILABLE,
                lang,
                Page::Failed,
                &c.to,
            ))
        }
    }
}

fn not_found() -> Response {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lang {
    En,
    Es,
}

impl Lang {
    /// `?lang=es|en` first, then the first language of Accept-Language; English otherwise.
    fn of(uri: &Uri, headers: &HeaderMap) -> Lang {
        let from = |s: &str| {
            let s = s.trim().to_ascii_lowercase();
            if s.starts_with("es") {
                Some(Lang::Es)
            } else if s.starts_with("en") {
                Some(Lang::En)
            } else {
                None
            }
        };
        let query = uri.query().unwrap_or("").split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k == "lang").then(|| from(v)).flatten()
        });
        query
            .or_else(|| {
                headers
                    .get(header::ACCEPT_LANGUAGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| (from(v) == Some(Lang::Es)).then_some(Lang::Es))
            })
            .unwrap_or(Lang::En)
    }
}

#[derive(Debug, Clone, Copy)]
enum Page {
    Confirm,
    Done,
    Failed,
}

fn page(status: StatusCode, lang: Lang, which: Page, to: &str) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            // The token in the URL is the recipient's key to this page.
            (header::REFERRER_POLICY, "no-referrer"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
            ),
        ],
        page_html(lang, which, to),
    )
        .into_response()
}

fn page_html(lang: Lang, which: Page, to: &str) -> String {
    let to = escape_html(to);
    let (code, title, body) = match (lang, which) {
        (Lang::En, Page::Confirm) => (
            "en",
            "Unsubscribe",
            format!(
                "<p>Stop sending emails to <strong>{to}</strong>?</p>\n\
                 <form method=\"post\"><input type=\"hidden\" name=\"List-Unsubscribe\" value=\"One-Click\">\
                 <button type=\"submit\">Unsubscribe</button></form>"
            ),
        ),
        (Lang::Es, Page::Confirm) => (
            "es",
            "Darse de baja",
            format!(
                "<p>¿Dejamos de enviar correos a <strong>{to}</strong>?</p>\n\
                 <form method=\"post\"><input type=\"hidden\" name=\"List-Unsubscribe\" value=\"One-Click\">\
                 <button type=\"submit\">Darme de baja</button></form>"
            ),
        ),
        (Lang::En, Page::Done) => (
            "en",
            "You are unsubscribed",
            format!("<p><strong>{to}</strong> will get no more emails from this list.</p>"),
        ),
        (Lang::Es, Page::Done) => (
            "es",
            "Te has dado de baja",
            format!("<p><strong>{to}</strong> no recibirá más correos de esta lista.</p>"),
        ),
        (Lang::En, Page::Failed) => (
            "en",
            "Please try again",
            "<p>We could not unsubscribe you just now. Please try again in a minute.</p>".into(),
        ),
        (Lang::Es, Page::Failed) => (
            "es",
            "Inténtalo de nuevo",
            "<p>No hemos podido darte de baja ahora mismo. Inténtalo de nuevo en un minuto.</p>"
                .into(),
        ),
    };
    format!(
        "<!DOCTYPE html>\n<html lang=\"{code}\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"robots\" content=\"noindex\">\n<title>{title}</title>\n\
         <style>body{{font-family:Helvetica,Arial,sans-serif;max-width:32em;margin:3em auto;padding:0 1em;color:#222}}\
         button{{padding:.6em 1.2em;font-size:1em}}</style>\n</head>\n<body>\n<h1>{title}</h1>\n{body}\n</body>\n</html>\n"
    )
}

fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeat_is_remembered_for_one_to_two_windows_and_no_longer() {
        use std::time::Instant;
        let w = Duration::from_secs(60);
        let r = Repeats::new(w);
        let t0 = Instant::now();
        assert!(!r.seen_at("c", "j1", "u", t0));
        assert!(r.seen_at("c", "j1", "u", t0 + Duration::from_secs(30)));
        // Machine and human hits, and other links, are apart.
        assert!(!r.seen_at("cm", "j1", "u", t0));
        assert!(!r.seen_at("c", "j1", "v", t0));
        // Still remembered in the previous generation…
        assert!(r.seen_at("c", "j1", "u", t0 + Duration::from_secs(70)));
        // …and after a quiet spell of two windows, forgotten: counted again.
        assert!(!r.seen_at("c", "j1", "u", t0 + Duration::from_secs(300)));
    }

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

    #[test]
    fn language_from_query_then_accept_language() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::ACCEPT_LANGUAGE, HeaderValue::from_str(v).unwrap());
            m
        };
        let u = |s: &str| s.parse::<Uri>().unwrap();
        assert_eq!(Lang::of(&u("/u/t"), &HeaderMap::new()), Lang::En);
        assert_eq!(Lang::of(&u("/u/t?lang=es"), &HeaderMap::new()), Lang::Es);
        assert_eq!(
            Lang::of(&u("/u/t"), &h("es-ES,es;q=0.9,en;q=0.5")),
            Lang::Es
        );
        assert_eq!(Lang::of(&u("/u/t"), &h("en-US,es;q=0.5")), Lang::En);
        assert_eq!(Lang::of(&u("/u/t?lang=en"), &h("es")), Lang::En);
        assert_eq!(
            Lang::of(&u("/u/t?x=1&lang=ES"), &HeaderMap::new()),
            Lang::Es
        );
    }

    #[test]
    fn pages_escape_the_address() {
        assert_eq!(
            escape_html("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        let html = page_html(Lang::Es, Page::Confirm, "a<b>\"@x.test");
        assert!(html.contains("a&lt;b&gt;&quot;@x.test"), "{html}");
        assert!(html.contains("<html lang=\"es\">") && html.contains("method=\"post\""));
        assert!(page_html(Lang::En, Page::Done, "a@x.test").contains("unsubscribed"));
    }
}

//! Delivery: SMTP sessions to the relay (or, in mx mode, to each domain's MX hosts). Speaks
//! [`crate::outcome`]; knows nothing of shaping (the pipeline asks `shape` before a send).

pub mod deadline;
pub mod mta_sts;
pub mod mx;
pub mod relay;
pub mod smtp;
pub mod verify;

pub use crate::outcome::Outcome;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::Certificate;
use lettre::transport::smtp::extension::ClientId;

use crate::config::{DeliveryMode, DeliverySettings};
use relay::Relay;
use smtp::{SessionConfig, Site};

/// How many sessions a destination may hold and how many messages each carries, asked of
/// the shaping rules when a site is first built (the pipeline passes `shape::Shaper`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiteLimits {
    pub connections: usize,
    pub messages_per_connection: u32,
}

/// Where a site's limits come from.
pub trait Limits: Send + Sync {
    /// The limits for a domain whose MX hosts are `hosts`.
    fn limits(&self, domain: &str, hosts: &[&str]) -> SiteLimits;
}

/// What the SMTP session tells the worker about the attempt it runs: the session code, deep
/// in a pool, reaches it as a task-local, so no handle is passed down through routing.
#[derive(Debug, Default)]
pub struct AttemptFlags {
    /// The body began to go out: the receiver may end up with the message, so the attempt
    /// is let run to its reply (under the data timeouts) rather than cut by
    /// `attempt_timeout`, which would defer a message the receiver has.
    committed: AtomicBool,
    /// The whole message went out and its reply never came (closed or timed out).
    reply_lost: AtomicBool,
}

tokio::task_local! {
    static ATTEMPT: Arc<AttemptFlags>;
}

impl AttemptFlags {
    /// Runs `f` (one job's attempt) with these flags as its task-local.
    pub fn scope<F: Future>(self: &Arc<Self>, f: F) -> impl Future<Output = F::Output> {
        ATTEMPT.scope(self.clone(), f)
    }

    pub fn committed(&self) -> bool {
        self.committed.load(Ordering::Relaxed)
    }

    pub fn reply_lost(&self) -> bool {
        self.reply_lost.load(Ordering::Relaxed)
    }

    /// Called by the session as the body starts (no-op outside a scope).
    pub(crate) fn mark_committed() {
        let _ = ATTEMPT.try_with(|a| a.committed.store(true, Ordering::Relaxed));
    }

    pub(crate) fn mark_reply_lost() {
        let _ = ATTEMPT.try_with(|a| a.reply_lost.store(true, Ordering::Relaxed));
    }
}

/// What a destination's sessions must prove about TLS beyond `delivery.tls`, decided per
/// route (mx mode). Part of the pool and site keys, so an enforced session is never shared
/// with an opportunistic one. DANE (RFC 7672, which needs a validating resolver) would be
/// another variant: TLSA records checked instead of the WebPKI name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TlsPolicy {
    /// As `delivery.tls` says (no policy, or a policy in `testing` or `none` mode).
    #[default]
    Configured,
    /// An MTA-STS policy in `enforce` mode: STARTTLS required, the certificate valid for
    /// the MX host name (public roots and `delivery.tls_ca_file`).
    MtaSts,
    /// An MTA-STS policy in `testing` mode: TLS as `delivery.tls` says, and a session that
    /// `enforce` would have refused (no STARTTLS, a certificate not valid for the MX host)
    /// counted, not refused (see [`verify`]).
    MtaStsTesting,
}

/// Where messages go.
pub enum Deliverer {
    /// Everything through one smarthost.
    Relay(Box<Relay>),
    /// Straight to each domain's MX hosts.
    Mx(Box<mx::MxRouter>),
}

/// Where one recipient domain's mail goes right now.
pub enum Route {
    Dest(Dest),
    /// Decided without a session: null MX or NXDOMAIN (bounce), DNS failure (defer).
    Final(Outcome),
}

#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error("delivery.relay {0:?}: {1}")]
    Relay(String, String),
    #[error("delivery.nameservers: {0}")]
    Resolver(String),
    #[error("delivery.tls_ca_file {0:?}: {1}")]
    CaFile(std::path::PathBuf, String),
}

/// The CA certificates of `delivery.tls_ca_file`, if set, checked once at start.
fn ca_roots(d: &DeliverySettings) -> Result<Option<Certificate>, DeliverError> {
    let Some(path) = &d.tls_ca_file else {
        return Ok(None);
    };
    let err = |m: String| DeliverError::CaFile(path.clone(), m);
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
        return Err(err(
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    Certificate::from_pem(&pem)
        .map(Some)
        .map_err(|e| err(e.to_string()))
}

/// The session settings shared by every destination.
pub fn session_config(
    d: &DeliverySettings,
    helo: &str,
    tls_name: String,
    messages_per_connection: u32,
) -> Result<SessionConfig, DeliverError> {
    Ok(SessionConfig {
        helo: ClientId::Domain(helo.to_string()),
        tls: d.tls,
        tls_name,
        ca: ca_roots(d)?,
        credentials: None,
        timeouts: timeouts(d),
        idle_timeout: d.idle_timeout.get(),
        messages_per_connection: messages_per_connection.max(1),
        bind: None,
        policy: TlsPolicy::Configured,
        policy_failures: None,
        verify_roots: None,
    })
}

/// The per-stage limits of `[delivery]`; the former single `timeout`, when set, caps the
/// stages before the message is sent (never the body or its final reply).
pub fn timeouts(d: &DeliverySettings) -> smtp::Timeouts {
    let cap = |t: crate::config::Dur| match d.timeout {
        Some(max) => t.get().min(max.get()),
        None => t.get(),
    };
    smtp::Timeouts {
        connect: cap(d.connect_timeout),
        greeting: cap(d.greeting_timeout),
        command: cap(d.command_timeout),
        data: cap(d.data_timeout),
        data_block: d.data_block_timeout.get(),
        data_done: d.data_done_timeout.get(),
    }
}

/// A destination: the relay, or a domain's MX site (per egress source, see
/// [`Deliverer::site`]).
pub enum Dest {
    Relay(Arc<Site>),
    Mx(Arc<mx::MxDest>),
}

impl Dest {
    /// The site's key (MX host names, or the relay's): what shaping and suspensions key by.
    pub fn key(&self) -> &str {
        match self {
            Dest::Relay(s) => &s.key,
            Dest::Mx(d) => &d.key,
        }
    }

    pub fn hosts(&self) -> &[String] {
        match self {
            Dest::Relay(s) => &s.hosts,
            Dest::Mx(d) => &d.hosts,
        }
    }
}

impl Deliverer {
    /// From `[delivery]` and the HELO name; `limits` sizes each MX site; `open` counts the
    /// SMTP sessions open (for the gauge); `sts` is what MTA-STS uses in mx mode (when
    /// `delivery.mta_sts`).
    pub async fn new(
        d: &DeliverySettings,
        helo: &str,
        limits: Arc<dyn Limits>,
        open: Arc<AtomicI64>,
        sts: mta_sts::Shared,
    ) -> Result<Self, DeliverError> {
        match d.mode {
            DeliveryMode::Relay => {
                let host = d
                    .relay
                    .rsplit_once(':')
                    .map_or(d.relay.as_str(), |(h, _)| h);
                let mut cfg = session_config(
                    d,
                    helo,
                    host.trim_matches(['[', ']']).to_string(),
                    d.messages_per_connection,
                )?;
                cfg.credentials = d.username.clone().map(|u| {
                    Credentials::new(
                        u,
                        d.password
                            .as_ref()
                            .map(|p| p.expose().to_string())
                            .unwrap_or_default(),
                    )
                });
                let relay =
                    Relay::new(&d.relay, || mx::resolver(d), cfg, d.connections, open).await?;
                Ok(Deliverer::Relay(Box::new(relay)))
            }
            DeliveryMode::Mx => {
                let router = mx::MxRouter::new(d, helo, limits, open)?;
                let router = if d.mta_sts {
                    router.with_mta_sts(d, sts)?
                } else {
                    router
                };
                Ok(Deliverer::Mx(Box::new(router)))
            }
        }
    }

    /// The route for a recipient domain.
    pub async fn route(&self, domain: &str) -> Route {
        match self {
            Deliverer::Relay(relay) => Route::Dest(Dest::Relay(relay.site().await)),
            Deliverer::Mx(router) => router.route(domain).await,
        }
    }

    /// The site `source` sends to `dest` through (relay mode has only the implicit source).
    pub fn site(&self, dest: &Dest, source: &crate::egress::Source) -> Result<Arc<Site>, Outcome> {
        match (self, dest) {
            (Deliverer::Mx(router), Dest::Mx(d)) => router.site_for(d, source),
            (_, Dest::Relay(site)) => Ok(site.clone()),
            (Deliverer::Relay(_), Dest::Mx(d)) => router_mismatch(d),
        }
    }

    pub async fn close(&self) {
        match self {
            Deliverer::Relay(relay) => relay.current().close_idle().await,
            Deliverer::Mx(router) => router.close_idle().await,
        }
    }

    /// Closes idle sessions past their timeout; in mx mode also forgets unused routes,
    /// sites and pools. Called every few seconds by the daemon.
    pub fn reap(&self) {
        match self {
            Deliverer::Relay(relay) => relay.current().reap_idle(),
            Deliverer::Mx(router) => router.reap(),
        }
    }
}

fn router_mismatch(d: &mx::MxDest) -> Result<Arc<Site>, Outcome> {
    Err(Outcome::Deferred {
        response: format!(
            "{}: an MX destination reached the relay (a paloma bug)",
            d.key
        ),
    })
}

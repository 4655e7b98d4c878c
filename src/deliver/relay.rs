//! Relay mode: everything through one smarthost. A relay given by name (a provider's
//! endpoint such as SES's, fronted by DNS that moves it between addresses) is resolved with
//! the delivery resolver (`delivery.nameservers`, or the system's), and resolved again when
//! the answer's TTL runs out (no sooner than [`MIN_TTL`]) and as soon as a send finds every
//! address of the last answer unreachable (no more than once per [`MIN_RETRY`]). The
//! relay's one [`Site`] stays, with its cap on sessions: only its pools change, and the pool
//! of an address that is still in the answer is kept with its idle sessions.
//!
//! A relay given as an address (`127.0.0.1:2525`, `[::1]:25`) is never resolved.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;

use super::smtp::{Pool, SessionConfig, Site};
use super::DeliverError;

/// The least time an answer is used for: a TTL of 0 (dnsmasq's default) must not cost a
/// DNS query per message.
pub const MIN_TTL: Duration = Duration::from_secs(5);
/// The most: a name whose TTL is a day is still looked at hourly.
const MAX_TTL: Duration = Duration::from_secs(3600);
/// Least time between two resolutions caused by unreachable addresses.
const MIN_RETRY: Duration = Duration::from_secs(1);
/// How long the last addresses are kept when the name cannot be resolved.
const DNS_RETRY: Duration = Duration::from_secs(5);

pub struct Relay {
    site: Arc<Site>,
    named: Option<Named>,
}

/// What a relay given by name needs to resolve it again.
struct Named {
    host: String,
    port: u16,
    resolver: TokioResolver,
    cfg: SessionConfig,
    open: Arc<AtomicI64>,
    state: Mutex<State>,
    /// One resolution at a time; sends go on with the current addresses meanwhile.
    resolving: AtomicBool,
}

struct State {
    pools: HashMap<SocketAddr, Arc<Pool>>,
    until: Instant,
    /// The site's unreachable count when last resolved.
    unreachable: u64,
    last: Instant,
}

impl Relay {
    /// Resolves `relay` (`host:port`) once; an error when it has no address now.
    pub async fn new(
        relay: &str,
        resolver: impl FnOnce() -> Result<TokioResolver, DeliverError>,
        cfg: SessionConfig,
        connections: usize,
        open: Arc<AtomicI64>,
    ) -> Result<Relay, DeliverError> {
        let err = |m: String| DeliverError::Relay(relay.to_string(), m);
        if let Ok(addr) = relay.parse::<SocketAddr>() {
            let pool = Pool::new(addr, cfg, open);
            let site = Site::new(
                relay.to_string(),
                vec![relay.to_string()],
                vec![pool],
                connections,
            );
            return Ok(Relay { site, named: None });
        }
        let (host, port) = relay
            .rsplit_once(':')
            .ok_or_else(|| err("is not host:port".into()))?;
        let port: u16 = port.parse().map_err(|_| err("is not host:port".into()))?;
        let named = Named {
            host: host.to_string(),
            port,
            resolver: resolver()?,
            cfg,
            open,
            state: Mutex::new(State {
                pools: HashMap::new(),
                until: Instant::now(),
                unreachable: 0,
                last: Instant::now(),
            }),
            resolving: AtomicBool::new(false),
        };
        let (addrs, until) = named.resolve().await.map_err(err)?;
        let site = Site::new(
            relay.to_string(),
            vec![relay.to_string()],
            Vec::new(),
            connections,
        );
        named.install(&site, addrs, until);
        Ok(Relay {
            site,
            named: Some(named),
        })
    }

    /// The relay's site, resolved again first when its answer is stale or its addresses
    /// stopped answering.
    pub async fn site(&self) -> Arc<Site> {
        if let Some(n) = &self.named {
            if n.due(&self.site) && !n.resolving.swap(true, Ordering::AcqRel) {
                n.refresh(&self.site).await;
                n.resolving.store(false, Ordering::Release);
            }
        }
        self.site.clone()
    }
}

impl Relay {
    /// The relay's site as it is (no resolution).
    pub fn current(&self) -> &Arc<Site> {
        &self.site
    }
}

impl Named {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn due(&self, site: &Site) -> bool {
        let s = self.state();
        let now = Instant::now();
        now >= s.until || (site.unreachable() != s.unreachable && now >= s.last + MIN_RETRY)
    }

    async fn refresh(&self, site: &Site) {
        let failed = site.unreachable() != self.state().unreachable;
        if failed {
            // The resolver's cache would answer the addresses that just failed until their
            // TTL: ask the server.
            self.resolver.clear_cache();
        }
        let seen = site.unreachable();
        match self.resolve().await {
            Ok((addrs, until)) => {
                self.install(site, addrs, until);
                self.state().unreachable = seen;
            }
            Err(e) => {
                tracing::warn!(relay = %site.key, error = %e, "resolving the relay failed; keeping its last addresses");
                let mut s = self.state();
                s.until = Instant::now() + DNS_RETRY;
                s.last = Instant::now();
                s.unreachable = seen;
            }
        }
    }

    /// The relay's addresses now and until when to use them.
    async fn resolve(&self) -> Result<(Vec<SocketAddr>, Instant), String> {
        let name = format!("{}.", self.host.trim_end_matches('.'));
        match self.resolver.lookup_ip(name.as_str()).await {
            Ok(ips) => {
                let now = Instant::now();
                let until = ips.valid_until().clamp(now + MIN_TTL, now + MAX_TTL);
                let addrs: Vec<SocketAddr> = ips
                    .iter()
                    .map(|ip| SocketAddr::new(ip, self.port))
                    .collect();
                if addrs.is_empty() {
                    return Err("resolves to no address".into());
                }
                Ok((addrs, until))
            }
            // Names the DNS does not know may still be the system's (/etc/hosts).
            Err(dns) => match tokio::net::lookup_host((self.host.as_str(), self.port)).await {
                Ok(addrs) => {
                    let addrs: Vec<SocketAddr> = addrs.collect();
                    if addrs.is_empty() {
                        return Err(format!("resolves to no address ({dns})"));
                    }
                    Ok((addrs, Instant::now() + MAX_TTL.min(Duration::from_secs(60))))
                }
                Err(_) => Err(dns.to_string()),
            },
        }
    }

    /// Points the site at `addrs`, keeping the pools of addresses it already had.
    fn install(&self, site: &Site, addrs: Vec<SocketAddr>, until: Instant) {
        let mut s = self.state();
        let mut pools = Vec::with_capacity(addrs.len());
        let mut kept = HashMap::with_capacity(addrs.len());
        let mut changed = false;
        for addr in &addrs {
            let pool = s.pools.remove(addr).unwrap_or_else(|| {
                changed = true;
                Pool::new(*addr, self.cfg.clone(), self.open.clone())
            });
            pools.push(pool.clone());
            kept.insert(*addr, pool);
        }
        if changed || !s.pools.is_empty() {
            tracing::info!(relay = %site.key, ?addrs, "relay resolved to other addresses");
        }
        // The pools of addresses no longer in the answer are dropped, with their idle
        // sessions, once the sends still on them finish.
        s.pools = kept;
        s.until = until;
        s.last = Instant::now();
        site.set_pools(pools);
    }
}

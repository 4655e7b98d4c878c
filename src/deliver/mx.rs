//! Direct delivery: MX resolution (hickory), routes cached for their DNS TTL, and sites
//! shared by every domain served by the same MX hosts.
//!
//! RFC 5321 §5.1: MX hosts in preference order, the next one tried when a host cannot be
//! reached; a domain without MX records is its own mail host (implicit MX, A/AAAA); RFC 7505:
//! a single `MX 0 .` (null MX) means the domain takes no mail.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;

use super::mta_sts::{self, Applied, MtaSts};
use super::smtp::{Pool, SessionConfig, Site};
use super::{session_config, DeliverError, Limits, Outcome, Route, SiteLimits, TlsPolicy};
use crate::config::{DeliverySettings, TlsMode};
use crate::egress::Source;
use crate::values::Networks;
use lettre::transport::smtp::extension::ClientId;

/// How long a negative answer (NXDOMAIN, null MX) is cached.
const NEGATIVE_TTL: Duration = Duration::from_secs(300);
/// Cap on the cached routes, so a campaign over millions of domains keeps memory flat.
const MAX_ROUTES: usize = 100_000;

enum Cached {
    Dest(Arc<MxDest>),
    Bounce(Outcome),
}

/// A destination site: the MX hosts (by preference) and addresses a set of domains share,
/// with one [`Site`] (session cap, pools) per egress source that sent to it.
pub struct MxDest {
    /// The MX host names joined by `,`: what shaping keys the site by.
    pub key: String,
    pub hosts: Vec<String>,
    addrs: Vec<(String, IpAddr)>,
    limits: SiteLimits,
    /// Whether MTA-STS requires verified TLS to it.
    tls: TlsPolicy,
    sites: Mutex<Vec<(String, Arc<Site>)>>,
}

impl MxDest {
    fn sites(&self) -> Vec<Arc<Site>> {
        self.sites
            .lock()
            .map(|s| s.iter().map(|(_, s)| s.clone()).collect())
            .unwrap_or_default()
    }
}

/// A pool's key: MX address, TLS name (the MX host), egress source, TLS policy.
type PoolKey = (SocketAddr, String, String, TlsPolicy);

pub struct MxRouter {
    resolver: TokioResolver,
    port: u16,
    base: SessionConfig,
    limits: Arc<dyn Limits>,
    open: Arc<AtomicI64>,
    routes: Mutex<HashMap<String, (Cached, Instant)>>,
    /// By MX set and TLS policy: domains with one MX set but different MTA-STS policies
    /// get different destinations (sharing the site key, so their shaping and suspension
    /// are shared).
    dests: Mutex<HashMap<(String, TlsPolicy), Arc<MxDest>>>,
    /// Keyed by address, TLS name, source and TLS policy: two MX names on one address get
    /// two pools, so one domain's certificate name is never checked for another's session;
    /// each source has sessions of its own (its address, its EHLO name); an enforced
    /// session never serves an opportunistic route or the reverse.
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    /// MTA-STS (`delivery.mta_sts`), when on.
    sts: Option<MtaSts>,
    /// Addresses never connected to (`delivery.prohibited_hosts`)…
    prohibited: Networks,
    /// …unless they are here (`delivery.allowed_hosts`).
    allowed: Networks,
    max_hosts: usize,
    max_addresses: usize,
}

/// The resolver of `delivery.nameservers` (the system's when empty), for MX hosts and a
/// relay given by name.
pub fn resolver(d: &DeliverySettings) -> Result<TokioResolver, DeliverError> {
    let mut opts = ResolverOpts::default();
    opts.timeout = Duration::from_secs(5);
    opts.attempts = 2;
    opts.cache_size = 10_000;
    opts.max_active_requests = 256;
    let builder = if d.nameservers.is_empty() {
        TokioResolver::builder_tokio().map_err(|e| DeliverError::Resolver(e.to_string()))?
    } else {
        let mut servers = Vec::new();
        for ns in &d.nameservers {
            let addr: SocketAddr = ns
                .parse()
                .or_else(|_| ns.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                .map_err(|_| DeliverError::Resolver(format!("{ns:?} is not ip or ip:port")))?;
            let mut cfg = NameServerConfig::udp_and_tcp(addr.ip());
            for c in &mut cfg.connections {
                c.port = addr.port();
            }
            servers.push(cfg);
        }
        TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
    };
    builder
        .with_options(opts)
        .build()
        .map_err(|e| DeliverError::Resolver(e.to_string()))
}

impl MxRouter {
    pub fn new(
        d: &DeliverySettings,
        helo: &str,
        limits: Arc<dyn Limits>,
        open: Arc<AtomicI64>,
    ) -> Result<Self, DeliverError> {
        let resolver = resolver(d)?;
        Ok(MxRouter {
            resolver,
            port: d.mx_port,
            base: session_config(d, helo, String::new(), d.messages_per_connection)?,
            limits,
            open,
            routes: Mutex::new(HashMap::new()),
            dests: Mutex::new(HashMap::new()),
            pools: Mutex::new(HashMap::new()),
            prohibited: Networks::new(
                d.prohibited_hosts
                    .iter()
                    .map(|n| {
                        Networks::parse_cidr(n).map_err(|e| DeliverError::Resolver(e.to_string()))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            allowed: Networks::new(
                d.allowed_hosts
                    .iter()
                    .map(|n| {
                        Networks::parse_cidr(n).map_err(|e| DeliverError::Resolver(e.to_string()))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            max_hosts: d.mx_max_hosts,
            max_addresses: d.mx_max_addresses,
            sts: None,
        })
    }

    /// With MTA-STS policies applied to every route, over the same resolver.
    pub fn with_mta_sts(
        mut self,
        d: &DeliverySettings,
        shared: mta_sts::Shared,
    ) -> Result<Self, DeliverError> {
        self.sts = Some(MtaSts::new(d, self.resolver.clone(), shared)?);
        Ok(self)
    }

    /// Whether an MX address may be connected to (`prohibited_hosts`, `allowed_hosts`).
    fn permitted(&self, ip: IpAddr) -> bool {
        !self.prohibited.contains(ip) || self.allowed.contains(ip)
    }

    pub async fn route(&self, domain: &str) -> Route {
        if let Some(r) = self.cached(domain) {
            return r;
        }
        match self.resolve(domain).await {
            Ok((cached, until)) => {
                let route = match &cached {
                    Cached::Dest(d) => Route::Dest(super::Dest::Mx(d.clone())),
                    Cached::Bounce(o) => Route::Final(o.clone()),
                };
                if let Ok(mut routes) = self.routes.lock() {
                    if routes.len() >= MAX_ROUTES {
                        let now = Instant::now();
                        routes.retain(|_, (_, t)| *t > now);
                        if routes.len() >= MAX_ROUTES {
                            routes.clear();
                        }
                    }
                    routes.insert(domain.to_string(), (cached, until));
                }
                route
            }
            Err(reason) => Route::Final(Outcome::Deferred { response: reason }),
        }
    }

    fn cached(&self, domain: &str) -> Option<Route> {
        let routes = self.routes.lock().ok()?;
        let (c, until) = routes.get(domain)?;
        if *until <= Instant::now() {
            return None;
        }
        Some(match c {
            Cached::Dest(d) => Route::Dest(super::Dest::Mx(d.clone())),
            Cached::Bounce(o) => Route::Final(o.clone()),
        })
    }

    /// MX hosts by preference, then their addresses. Err is a temporary DNS failure.
    async fn resolve(&self, domain: &str) -> Result<(Cached, Instant), String> {
        let fqdn = format!("{domain}.");
        let mut hosts: Vec<(u16, String)> = Vec::new();
        let mut until = Instant::now() + Duration::from_secs(3600);
        // The MTA-STS policy is looked up beside the MX records.
        let (mx, policy) = tokio::join!(self.resolver.mx_lookup(fqdn.as_str()), async {
            match &self.sts {
                Some(sts) => sts.policy(domain).await,
                None => None,
            }
        });
        match mx {
            Ok(lookup) => {
                until = until.min(lookup.valid_until());
                for r in lookup.answers() {
                    // Answers can carry the CNAME chain too.
                    if let RData::MX(mx) = &r.data {
                        hosts.push((
                            mx.preference,
                            mx.exchange
                                .to_ascii()
                                .trim_end_matches('.')
                                .to_ascii_lowercase(),
                        ));
                    }
                }
                if hosts.len() == 1 && hosts[0].1.is_empty() {
                    return Ok((
                        Cached::Bounce(Outcome::bounce(
                            556,
                            format!("556 5.1.10 {domain} does not accept mail (null MX)"),
                        )),
                        Instant::now() + NEGATIVE_TTL,
                    ));
                }
                hosts.retain(|(_, h)| !h.is_empty());
                if hosts.is_empty() {
                    hosts.push((0, domain.to_string()));
                }
            }
            Err(e) if e.is_nx_domain() => {
                return Ok((
                    Cached::Bounce(Outcome::bounce(
                        550,
                        format!("550 5.1.2 {domain}: domain does not exist (NXDOMAIN)"),
                    )),
                    Instant::now() + NEGATIVE_TTL,
                ));
            }
            // No MX records: the domain itself is the mail host (RFC 5321 §5.1).
            Err(e) if e.is_no_records_found() => hosts.push((0, domain.to_string())),
            Err(e) => return Err(format!("DNS MX lookup for {domain} failed: {e}")),
        }
        // By preference, then name: resolvers rotate hosts of equal preference, and the site
        // key (which names the site's shared rate in Redis) must not depend on that order.
        hosts.sort();
        hosts.dedup();
        // Enforce: only the MX hosts the policy names, before the most preferred are kept.
        let tls = match &self.sts {
            Some(sts) => match sts.apply(domain, policy.as_deref(), &mut hosts) {
                Applied::Hosts(tls) => tls,
                Applied::Refused(deferred) => {
                    return Ok((
                        Cached::Bounce(deferred),
                        until.min(Instant::now() + NEGATIVE_TTL),
                    ))
                }
            },
            None => TlsPolicy::Configured,
        };
        // A domain can list any number of MX hosts (a tarpit lists many slow ones): only the
        // most preferred few are tried.
        hosts.truncate(self.max_hosts);
        let mut addrs: Vec<(String, IpAddr)> = Vec::new();
        let mut dns_errors = Vec::new();
        for (_, host) in &hosts {
            match self.resolver.lookup_ip(format!("{host}.").as_str()).await {
                Ok(ips) => {
                    until = until.min(ips.valid_until());
                    addrs.extend(ips.iter().map(|ip| (host.clone(), ip)));
                }
                Err(e) if e.is_no_records_found() => {}
                Err(e) => dns_errors.push(format!("{host}: {e}")),
            }
        }
        // The recipient's DNS decides where we connect: never to loopback, link-local (cloud
        // metadata at 169.254.169.254), private networks or whatever else is prohibited.
        let before = addrs.len();
        addrs.retain(|(_, ip)| self.permitted(*ip));
        if addrs.is_empty() && before > 0 {
            return Ok((
                Cached::Bounce(Outcome::bounce(
                    550,
                    format!("550 5.4.4 {domain}: its MX hosts resolve only to prohibited addresses (delivery.prohibited_hosts)"),
                )),
                Instant::now() + NEGATIVE_TTL,
            ));
        }
        addrs.truncate(self.max_addresses);
        if addrs.is_empty() {
            if !dns_errors.is_empty() {
                return Err(format!(
                    "DNS address lookup for the MX hosts of {domain} failed: {}",
                    dns_errors.join("; ")
                ));
            }
            return Ok((
                Cached::Bounce(Outcome::bounce(
                    550,
                    format!("550 5.1.2 {domain}: no MX host has an address"),
                )),
                Instant::now() + NEGATIVE_TTL,
            ));
        }
        let names: Vec<&str> = hosts.iter().map(|(_, h)| h.as_str()).collect();
        let key = names.join(",");
        let dest = self.dest(&key, domain, &names, addrs, tls);
        Ok((
            Cached::Dest(dest),
            until.max(Instant::now() + Duration::from_secs(5)),
        ))
    }

    /// The destination of MX hosts `names` (shared by every domain they serve).
    fn dest(
        &self,
        key: &str,
        domain: &str,
        names: &[&str],
        addrs: Vec<(String, IpAddr)>,
        tls: TlsPolicy,
    ) -> Arc<MxDest> {
        let mut dests = self.dests.lock().expect("dests lock");
        if let Some(d) = dests.get(&(key.to_string(), tls)) {
            return d.clone();
        }
        let dest = Arc::new(MxDest {
            key: key.to_string(),
            hosts: names.iter().map(|n| n.to_string()).collect(),
            addrs,
            limits: self.limits.limits(domain, names),
            tls,
            sites: Mutex::new(Vec::new()),
        });
        dests.insert((key.to_string(), tls), dest.clone());
        dest
    }

    /// The site through which `source` sends to `dest`: its own session cap and pools,
    /// from its address with its EHLO name. Err when the source cannot reach any of the
    /// destination's addresses (an IPv4 source and only IPv6 MX addresses, say).
    pub fn site_for(&self, dest: &MxDest, source: &Source) -> Result<Arc<Site>, Outcome> {
        let mut sites = dest.sites.lock().expect("site list lock");
        if let Some((_, s)) = sites.iter().find(|(n, _)| *n == source.name) {
            return Ok(s.clone());
        }
        let reachable: Vec<&(String, IpAddr)> = dest
            .addrs
            .iter()
            .filter(|(_, ip)| source.bind.is_none_or(|b| b.is_ipv4() == ip.is_ipv4()))
            .collect();
        if reachable.is_empty() {
            return Err(Outcome::Deferred {
                response: format!(
                    "source {} ({}) cannot reach any address of {} (address family)",
                    source.name,
                    source.bind.map(|b| b.to_string()).unwrap_or_default(),
                    dest.key
                ),
            });
        }
        let mut pools = self.pools.lock().expect("pools lock");
        let list = reachable
            .into_iter()
            .map(|(host, ip)| {
                let addr = SocketAddr::new(*ip, self.port);
                pools
                    .entry((addr, host.clone(), source.name.clone(), dest.tls))
                    .or_insert_with(|| {
                        let mut cfg = self.base.clone();
                        cfg.tls_name = host.clone();
                        cfg.messages_per_connection = dest.limits.messages_per_connection;
                        cfg.helo = ClientId::Domain(source.helo.clone());
                        cfg.bind = source.bind;
                        if dest.tls == TlsPolicy::MtaSts {
                            cfg.tls = TlsMode::Required;
                            cfg.policy = dest.tls;
                            cfg.policy_failures = self.sts.as_ref().map(MtaSts::tls_failures);
                        }
                        if let (TlsPolicy::MtaStsTesting, Some(sts)) = (dest.tls, &self.sts) {
                            let (failures, roots) = sts.testing_check();
                            cfg.policy = dest.tls;
                            cfg.policy_failures = Some(failures);
                            cfg.verify_roots = Some(roots);
                        }
                        Pool::new(addr, cfg, self.open.clone())
                    })
                    .clone()
            })
            .collect();
        let site = Site::new(
            dest.key.clone(),
            dest.hosts.clone(),
            list,
            dest.limits.connections,
        );
        sites.push((source.name.clone(), site.clone()));
        Ok(site)
    }

    /// Housekeeping, every few seconds: expired routes go, idle sessions past their
    /// timeout are closed, and sites and pools nothing refers to any more (no route, no job)
    /// are forgotten — so a campaign over many small domains keeps neither sockets nor
    /// memory, and an MX whose addresses changed gets a new site once its routes expire.
    pub fn reap(&self) {
        let now = Instant::now();
        if let Ok(mut routes) = self.routes.lock() {
            routes.retain(|_, (_, until)| *until > now);
        }
        let Ok(mut dests) = self.dests.lock() else {
            return;
        };
        for d in dests.values() {
            for s in d.sites() {
                s.reap_idle();
            }
        }
        // Only this map holds it: no cached route, no job in flight. (A suspension is kept
        // by the shaper under the site's key, so it outlives the site.)
        dests.retain(|_, d| Arc::strong_count(d) > 1);
        drop(dests);
        if let Ok(mut pools) = self.pools.lock() {
            pools.retain(|_, p| Arc::strong_count(p) > 1);
        }
    }

    pub async fn close_idle(&self) {
        let sites: Vec<Arc<Site>> = self
            .dests
            .lock()
            .map(|d| d.values().flat_map(|d| d.sites()).collect())
            .unwrap_or_default();
        for s in sites {
            s.close_idle().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn router(delivery: &str) -> MxRouter {
        struct One;
        impl Limits for One {
            fn limits(&self, _: &str, _: &[&str]) -> super::super::SiteLimits {
                super::super::SiteLimits {
                    connections: 1,
                    messages_per_connection: 1,
                }
            }
        }
        let settings = Settings::from_toml(
            &format!("[sender]\nfrom = \"a@b.test\"\nhelo = \"h\"\n[tracking]\nsecret = \"0123456789abcdef0\"\n[delivery]\nmode = \"mx\"\nnameservers = [\"127.0.0.1:1\"]\n{delivery}"),
            Vec::new(),
        )
        .unwrap();
        MxRouter::new(
            &settings.delivery,
            &settings.sender.helo,
            Arc::new(One),
            Arc::new(AtomicI64::new(0)),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn private_networks_are_prohibited_by_default_and_easy_to_allow() {
        let r = router("");
        for ip in [
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.254",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.254",
            "fd00::25",
            "fc00::1",
            "127.0.0.1",
            "169.254.169.254",
        ] {
            assert!(!r.permitted(ip.parse().unwrap()), "{ip} is permitted");
        }
        for ip in [
            "172.32.0.1",
            "100.128.0.1",
            "192.0.2.1",
            "2001:db8::1",
            "8.8.8.8",
        ] {
            assert!(r.permitted(ip.parse().unwrap()), "{ip} is prohibited");
        }
        let r = router("allowed_hosts = [\"10.20.0.0/16\"]");
        assert!(r.permitted("10.20.3.4".parse().unwrap()));
        assert!(!r.permitted("10.21.3.4".parse().unwrap()));
    }

    #[tokio::test]
    async fn two_mx_names_on_one_address_never_share_a_pool_or_its_tls_name() {
        let settings = Settings::from_toml(
            "[sender]\nfrom = \"a@b.test\"\nhelo = \"h\"\n[tracking]\nsecret = \"0123456789abcdef0\"\n[delivery]\nmode = \"mx\"\nnameservers = [\"127.0.0.1:1\"]\n",
            Vec::new(),
        )
        .unwrap();
        struct One;
        impl Limits for One {
            fn limits(&self, _: &str, _: &[&str]) -> super::super::SiteLimits {
                super::super::SiteLimits {
                    connections: 1,
                    messages_per_connection: 1,
                }
            }
        }
        let router = MxRouter::new(
            &settings.delivery,
            &settings.sender.helo,
            Arc::new(One),
            Arc::new(AtomicI64::new(0)),
        )
        .unwrap();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let egress = crate::egress::Egress::new(&settings, None);
        let source = &egress.sources()[0];
        let a = router.dest(
            "mx.a.test",
            "a.test",
            &["mx.a.test"],
            vec![("mx.a.test".into(), ip)],
            TlsPolicy::Configured,
        );
        let b = router.dest(
            "mx.b.test",
            "b.test",
            &["mx.b.test"],
            vec![("mx.b.test".into(), ip)],
            TlsPolicy::Configured,
        );
        let a = router.site_for(&a, source).unwrap();
        let b = router.site_for(&b, source).unwrap();
        assert!(!Arc::ptr_eq(&a, &b));
        let pools = router.pools.lock().unwrap();
        assert_eq!(pools.len(), 2);
        let names: Vec<&str> = pools.keys().map(|(_, n, _, _)| n.as_str()).collect();
        assert!(names.contains(&"mx.a.test") && names.contains(&"mx.b.test"));
    }
}

//! MTA-STS (RFC 8461) in mx mode: whether a recipient domain asks that its mail go only to
//! MX hosts its policy names, over STARTTLS with a certificate valid for the MX host name.
//!
//! For each route resolution (once per domain per DNS TTL, see `mx::MxRouter`):
//! 1. the `_mta-sts.{domain}` TXT record (`v=STSv1; id=…;`, §3.1), through the resolver of
//!    `delivery.nameservers`;
//! 2. the policy cached under that id: in memory, then in Redis (`{prefix}mta_sts:{domain}`,
//!    shared by the fleet, expiring after the policy's `max_age`);
//! 3. when no cached policy carries the TXT record's id, the policy is fetched from
//!    `https://mta-sts.{domain}/.well-known/mta-sts.txt` (§3.3): the host's address from the
//!    same resolver and within `prohibited_hosts`/`allowed_hosts` as MX hosts are, the
//!    certificate verified (public roots and `delivery.tls_ca_file`), no redirect followed,
//!    at most [`MAX_POLICY_BYTES`] within [`FETCH_TIMEOUT`].
//!
//! No TXT record, or a fetch that fails, keeps an unexpired cached policy (§5.1, §10.2);
//! with none, the domain has no policy. [`MtaSts::apply`] then filters the MX hosts
//! (`enforce`) or counts what enforcing would have refused (`testing`). An enforced route's
//! sessions require verified STARTTLS ([`TlsPolicy::MtaSts`]); every failure defers, never
//! bounces.
//!
//! DANE (RFC 7672) would need a validating resolver: it would join [`TlsPolicy`] as another
//! variant, decided here beside MTA-STS, with the session checking TLSA records instead of
//! the WebPKI name.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;
use prometheus::IntCounterVec;

use super::{DeliverError, Outcome, TlsPolicy};
use crate::config::DeliverySettings;
use crate::store::RedisConn;
use crate::values::Networks;

/// Largest policy body read (RFC 8461 §3.3 suggests 64 KB).
pub const MAX_POLICY_BYTES: usize = 64 * 1024;
/// The whole policy fetch: connect, TLS, request and body.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `max_age` a policy may give (§3.2: about a year).
const MAX_AGE_LIMIT: u64 = 31_557_600;
/// Cap on the policies kept in memory (a campaign over millions of domains stays flat).
const MAX_MEMORY: usize = 100_000;
/// Bound on one Redis round trip of the policy cache: past it the cache is skipped.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// The `result` label values of `paloma_mta_sts_total`.
pub use crate::metrics::MTA_STS_RESULTS as RESULTS;

/// A policy's `mode` (§5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Testing,
    None,
}

/// A parsed policy (§3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// MX patterns, lower-cased: `mail.example.com` or `*.example.com`.
    pub mx: Vec<String>,
    /// Seconds the policy may be cached.
    pub max_age: u64,
}

/// Why a policy body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("no \"version: STSv1\"")]
    Version,
    #[error("no valid mode (enforce, testing or none)")]
    Mode,
    #[error("no valid max_age (0 to 31557600 seconds)")]
    MaxAge,
    #[error("mode {0} without any mx")]
    NoMx(&'static str),
    #[error("invalid mx pattern {0:?}")]
    Mx(String),
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        }
    }
}

/// The policy id of the TXT records of `_mta-sts.{domain}` (§3.1): records not starting
/// with `v=STSv1` are ignored; anything but exactly one left, or one that does not parse,
/// means no policy. Each record is given with its strings joined.
pub fn parse_txt(records: &[String]) -> Option<String> {
    // Zone-file quoting published literally (`"v=STSv1; id=1;"`, as some DNS consoles and
    // dnsmasq's command line leave it) is read as meant: the domain does publish a policy.
    let unquoted = records.iter().map(|r| {
        r.strip_prefix('"')
            .and_then(|r| r.strip_suffix('"'))
            .unwrap_or(r)
    });
    let mut sts = unquoted.filter(|r| {
        r.strip_prefix("v=STSv1")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([';', ' ', '\t']))
    });
    let record = sts.next()?;
    if sts.next().is_some() {
        return None;
    }
    let mut fields = record.split(';').map(|f| f.trim_matches([' ', '\t']));
    if fields.next() != Some("v=STSv1") {
        return None;
    }
    let mut id = None;
    for f in fields {
        if f.is_empty() {
            continue;
        }
        let (k, v) = f.split_once('=')?;
        if k == "id" {
            let valid =
                !v.is_empty() && v.len() <= 32 && v.bytes().all(|b| b.is_ascii_alphanumeric());
            if !valid {
                return None;
            }
            id.get_or_insert_with(|| v.to_string());
        } else {
            // Extensions: a name and a printable value without `;` or `=` (§3.1).
            let name_ok = !k.is_empty()
                && k.len() <= 32
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            let value_ok =
                !v.is_empty() && v.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b'=');
            if !name_ok || !value_ok {
                return None;
            }
        }
    }
    id
}

/// A policy body (§3.2): `key: value` lines (CRLF or LF), in any order; the first
/// `version` (which must be `STSv1`), `mode` and `max_age` count, every `mx` adds a
/// pattern, unknown keys are ignored.
pub fn parse_policy(text: &str) -> Result<Policy, PolicyError> {
    let lines = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.trim().is_empty());
    let field = |l: &str| {
        l.split_once(':').map(|(k, v)| {
            (
                k.trim().to_string(),
                v.trim_matches([' ', '\t']).to_string(),
            )
        })
    };
    let (mut version, mut mode, mut max_age, mut mx) = (None, None, None, Vec::new());
    for l in lines {
        let Some((k, v)) = field(l) else { continue };
        match k.as_str() {
            "version" if version.is_none() => version = Some(v == "STSv1"),
            "mode" if mode.is_none() => {
                mode = Some(match v.as_str() {
                    "enforce" => Mode::Enforce,
                    "testing" => Mode::Testing,
                    "none" => Mode::None,
                    _ => return Err(PolicyError::Mode),
                })
            }
            "max_age" if max_age.is_none() => {
                let n = (!v.is_empty() && v.len() <= 10 && v.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| v.parse::<u64>().ok())
                    .flatten()
                    .filter(|n| *n <= MAX_AGE_LIMIT)
                    .ok_or(PolicyError::MaxAge)?;
                max_age = Some(n);
            }
            "mx" => {
                let p = v.to_ascii_lowercase();
                if !valid_pattern(&p) {
                    return Err(PolicyError::Mx(v));
                }
                mx.push(p);
            }
            _ => {}
        }
    }
    if version != Some(true) {
        return Err(PolicyError::Version);
    }
    let mode = mode.ok_or(PolicyError::Mode)?;
    let max_age = max_age.ok_or(PolicyError::MaxAge)?;
    if mode != Mode::None && mx.is_empty() {
        return Err(PolicyError::NoMx(mode.as_str()));
    }
    Ok(Policy { mode, mx, max_age })
}

/// `host.example` or `*.example`: letters, digits, hyphens and dots, a wildcard only as
/// the whole leftmost label.
fn valid_pattern(p: &str) -> bool {
    let name = p.strip_prefix("*.").unwrap_or(p);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl Policy {
    /// Whether MX host `host` (lower-case, no trailing dot) is one the policy names (§4.1):
    /// exactly, or under a `*.` pattern that stands for exactly one leftmost label.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.');
        self.mx.iter().any(|p| match p.strip_prefix("*.") {
            Some(base) => host
                .split_once('.')
                .is_some_and(|(first, rest)| !first.is_empty() && rest.eq_ignore_ascii_case(base)),
            None => host.eq_ignore_ascii_case(p),
        })
    }
}

/// A policy as cached: the TXT id it was fetched under and when it expires.
#[derive(Debug, Clone)]
pub struct Cached {
    pub id: String,
    pub policy: Policy,
    /// Unix seconds.
    pub expires: u64,
}

/// The Redis form: `{"id", "expires", "policy"}` with the policy's own text, parsed again
/// when read (one format, the RFC's).
#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    id: String,
    expires: u64,
    policy: String,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What the TXT lookup found.
enum Txt {
    Id(String),
    /// No record, or none valid: no live policy (a cached one still applies).
    Absent,
    /// A temporary DNS failure: as absent, logged.
    Failed,
}

/// What MTA-STS takes from the daemon: the fleet's cache and the counter of results.
#[derive(Clone)]
pub struct Shared {
    pub redis: Option<RedisConn>,
    /// `Keys::mta_sts` of the configured prefix: the domain is appended.
    pub key_prefix: String,
    /// `paloma_mta_sts_total{result}`.
    pub results: IntCounterVec,
}

/// Policies of recipient domains: looked up, fetched, cached and applied.
pub struct MtaSts {
    resolver: TokioResolver,
    http: reqwest::Client,
    shared: Shared,
    /// Domain → its last policy seen. A std mutex: never held across an await.
    memory: Mutex<HashMap<String, Arc<Cached>>>,
    /// One fetch per domain at a time: routes resolved together wait for the first.
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The roots a `testing` route's sessions are checked against (public + tls_ca_file).
    roots: Arc<super::verify::Roots>,
}

/// A domain's place in the queue for fetching its policy; the last one out (or a route
/// dropped at `attempt_timeout`) removes the domain's entry.
struct Gate<'a> {
    map: &'a Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    domain: &'a str,
    gate: Arc<tokio::sync::Mutex<()>>,
}

impl<'a> Gate<'a> {
    fn enter(
        map: &'a Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
        domain: &'a str,
    ) -> Self {
        let gate = map
            .lock()
            .map(|mut m| m.entry(domain.to_string()).or_default().clone())
            .unwrap_or_default();
        Gate { map, domain, gate }
    }
}

impl Drop for Gate<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.map.lock() {
            // Only the map and this one hold it: nobody else waits.
            if Arc::strong_count(&self.gate) <= 2 {
                m.remove(self.domain);
            }
        }
    }
}

/// What [`MtaSts::apply`] decided for one route.
pub enum Applied {
    /// Deliver to these MX hosts with this TLS requirement.
    Hosts(TlsPolicy),
    /// Enforce mode and no MX host matches: defer with this outcome.
    Refused(Outcome),
}

impl MtaSts {
    /// From `[delivery]` (resolver, `tls_ca_file`, `prohibited_hosts`/`allowed_hosts`).
    pub fn new(
        d: &DeliverySettings,
        resolver: TokioResolver,
        shared: Shared,
    ) -> Result<Self, DeliverError> {
        let nets = |list: &[String]| {
            list.iter()
                .map(|n| Networks::parse_cidr(n).map_err(|e| DeliverError::Resolver(e.to_string())))
                .collect::<Result<Vec<_>, _>>()
                .map(Networks::new)
        };
        let hosts = PolicyHosts {
            resolver: resolver.clone(),
            prohibited: nets(&d.prohibited_hosts)?,
            allowed: nets(&d.allowed_hosts)?,
        };
        let mut b = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(FETCH_TIMEOUT)
            // §3.3: redirects are not followed, and only https.
            .redirect(reqwest::redirect::Policy::none())
            .https_only(true)
            // The policy host is reached at the address our resolver gives (and that
            // prohibited_hosts allows), never through a proxy that resolves it elsewhere.
            .no_proxy()
            .dns_resolver(Arc::new(hosts))
            .user_agent(concat!("paloma/", env!("CARGO_PKG_VERSION")));
        let mut ca_pem = None;
        if let Some(path) = &d.tls_ca_file {
            let err = |m: String| DeliverError::CaFile(path.clone(), m);
            let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
            ca_pem = Some(pem.clone());
            for cert in
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| err(e.to_string()))?
            {
                b = b.add_root_certificate(cert);
            }
        }
        let http = b
            .build()
            .map_err(|e| DeliverError::Resolver(format!("MTA-STS HTTPS client: {e}")))?;
        for r in RESULTS {
            shared.results.with_label_values(&[r]);
        }
        Ok(MtaSts {
            resolver,
            http,
            shared,
            memory: Mutex::new(HashMap::new()),
            fetching: Mutex::new(HashMap::new()),
            roots: Arc::new(super::verify::Roots::with_pem(ca_pem.as_deref())),
        })
    }

    /// What a `testing` route's sessions need: the counter of sessions `enforce` would have
    /// refused, and the roots their chains are checked against.
    pub fn testing_check(&self) -> (prometheus::IntCounter, Arc<super::verify::Roots>) {
        (
            self.shared
                .results
                .with_label_values(&["testing_tls_failed"]),
            self.roots.clone(),
        )
    }

    fn count(&self, result: &str) {
        self.shared.results.with_label_values(&[result]).inc();
    }

    /// The counter of sessions an enforced policy refused (no STARTTLS, a certificate not
    /// valid for the MX host), for the pools of enforced routes.
    pub fn tls_failures(&self) -> prometheus::IntCounter {
        self.shared.results.with_label_values(&["tls_failed"])
    }

    /// The policy that applies to `domain` now, if any (see the module doc).
    pub async fn policy(&self, domain: &str) -> Option<Arc<Cached>> {
        // Only host names: an address literal or anything odd has no policy host.
        let plain = domain.contains('.')
            && domain
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !plain {
            return None;
        }
        let txt = self.txt(domain).await;
        let fresh = |c: &Option<Arc<Cached>>| match (&txt, c) {
            (Txt::Id(id), Some(c)) => c.id == *id,
            (_, c) => c.is_some(),
        };
        let mut best = self.remembered(domain);
        if !fresh(&best) {
            if let Some(c) = self.stored(domain).await {
                self.remember(domain, c.clone());
                best = Some(c);
            }
        }
        let id = match txt {
            Txt::Id(id) if !fresh(&best) => id,
            _ => return best,
        };
        // One fetch per domain: whoever waited finds the policy remembered.
        let gate = Gate::enter(&self.fetching, domain);
        let _turn = gate.gate.lock().await;
        if let Some(c) = self.remembered(domain).filter(|c| c.id == id) {
            return Some(c);
        }
        match self.fetch(domain).await {
            Ok((text, policy)) => {
                let c = Arc::new(Cached {
                    id,
                    expires: unix_now() + policy.max_age,
                    policy,
                });
                self.store(domain, &c, text).await;
                self.remember(domain, c.clone());
                Some(c)
            }
            Err(why) => {
                self.count("fetch_failed");
                tracing::warn!(%domain, reason = %why, cached = best.is_some(), "MTA-STS policy fetch failed");
                best
            }
        }
    }

    /// Filters `hosts` (MX names by preference) by `policy` and says how sessions to them
    /// must go; counts the result.
    pub fn apply(
        &self,
        domain: &str,
        policy: Option<&Cached>,
        hosts: &mut Vec<(u16, String)>,
    ) -> Applied {
        let Some(c) = policy else {
            self.count("none");
            return Applied::Hosts(TlsPolicy::Configured);
        };
        let p = &c.policy;
        let any = hosts.iter().any(|(_, h)| p.matches(h));
        match p.mode {
            Mode::None => {
                self.count("none");
                Applied::Hosts(TlsPolicy::Configured)
            }
            Mode::Testing => {
                self.count(if any {
                    "testing"
                } else {
                    "testing_mx_mismatch"
                });
                Applied::Hosts(TlsPolicy::MtaStsTesting)
            }
            Mode::Enforce if !any => {
                self.count("mx_mismatch");
                let names: Vec<&str> = hosts.iter().map(|(_, h)| h.as_str()).collect();
                Applied::Refused(Outcome::Deferred {
                    response: format!(
                        "MTA-STS policy of {domain} (enforce) lists none of its MX hosts ({}): not delivered to them",
                        names.join(", ")
                    ),
                })
            }
            Mode::Enforce => {
                hosts.retain(|(_, h)| p.matches(h));
                self.count("enforce");
                Applied::Hosts(TlsPolicy::MtaSts)
            }
        }
    }

    async fn txt(&self, domain: &str) -> Txt {
        match self
            .resolver
            .txt_lookup(format!("_mta-sts.{domain}."))
            .await
        {
            Ok(lookup) => {
                let records: Vec<String> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        // A record's strings are joined (§3.1).
                        RData::TXT(t) => Some(
                            t.txt_data
                                .iter()
                                .map(|s| String::from_utf8_lossy(s))
                                .collect::<String>(),
                        ),
                        _ => None,
                    })
                    .collect();
                parse_txt(&records).map_or(Txt::Absent, Txt::Id)
            }
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => Txt::Absent,
            Err(e) => {
                tracing::debug!(%domain, error = %e, "MTA-STS TXT lookup failed");
                Txt::Failed
            }
        }
    }

    fn remembered(&self, domain: &str) -> Option<Arc<Cached>> {
        let now = unix_now();
        let m = self.memory.lock().ok()?;
        m.get(domain).filter(|c| c.expires > now).cloned()
    }

    fn remember(&self, domain: &str, c: Arc<Cached>) {
        if let Ok(mut m) = self.memory.lock() {
            if m.len() >= MAX_MEMORY {
                let now = unix_now();
                m.retain(|_, c| c.expires > now);
                if m.len() >= MAX_MEMORY {
                    m.clear();
                }
            }
            m.insert(domain.to_string(), c);
        }
    }

    /// The fleet's cached policy of `domain`, if Redis has an unexpired one.
    async fn stored(&self, domain: &str) -> Option<Arc<Cached>> {
        let mut conn = self.shared.redis.clone()?;
        let key = format!("{}{domain}", self.shared.key_prefix);
        let got = tokio::time::timeout(
            REDIS_TIMEOUT,
            redis::cmd("GET")
                .arg(&key)
                .query_async::<Option<String>>(&mut conn),
        )
        .await;
        let text = match got {
            Ok(Ok(t)) => t?,
            Ok(Err(e)) => {
                tracing::debug!(%key, error = %e, "reading the MTA-STS policy cache");
                return None;
            }
            Err(_) => return None,
        };
        let s: Stored = serde_json::from_str(&text).ok()?;
        let policy = parse_policy(&s.policy).ok()?;
        (s.expires > unix_now()).then(|| {
            Arc::new(Cached {
                id: s.id,
                policy,
                expires: s.expires,
            })
        })
    }

    async fn store(&self, domain: &str, c: &Cached, text: String) {
        let Some(mut conn) = self.shared.redis.clone() else {
            return;
        };
        if c.policy.max_age == 0 {
            return;
        }
        let key = format!("{}{domain}", self.shared.key_prefix);
        let value = serde_json::to_string(&Stored {
            id: c.id.clone(),
            expires: c.expires,
            policy: text,
        })
        .unwrap_or_default();
        let mut set = redis::cmd("SET");
        set.arg(&key).arg(value).arg("EX").arg(c.policy.max_age);
        match tokio::time::timeout(REDIS_TIMEOUT, set.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(%key, error = %e, "writing the MTA-STS policy cache"),
            Err(_) => tracing::debug!(%key, "writing the MTA-STS policy cache timed out"),
        }
    }

    /// GET of the policy (§3.3): 200 and text/plain only, at most [`MAX_POLICY_BYTES`].
    async fn fetch(&self, domain: &str) -> Result<(String, Policy), String> {
        let url = format!("https://mta-sts.{domain}/.well-known/mta-sts.txt");
        let mut resp = self.http.get(&url).send().await.map_err(|e| describe(&e))?;
        if resp.status() != reqwest::StatusCode::OK {
            return Err(format!("{url}: HTTP status {}", resp.status().as_u16()));
        }
        let text_plain = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/plain"))
            });
        if !text_plain {
            return Err(format!("{url}: not served as text/plain"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| describe(&e))? {
            if body.len() + chunk.len() > MAX_POLICY_BYTES {
                return Err(format!("{url}: larger than {MAX_POLICY_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        let text = String::from_utf8(body).map_err(|_| format!("{url}: not UTF-8"))?;
        let policy = parse_policy(&text).map_err(|e| format!("{url}: {e}"))?;
        Ok((text, policy))
    }
}

/// reqwest's error and its causes in one line.
fn describe(e: &reqwest::Error) -> String {
    let mut s = if e.is_timeout() {
        format!("no answer within {FETCH_TIMEOUT:?}")
    } else {
        e.to_string()
    };
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

/// reqwest's name lookups for policy hosts: the delivery resolver, and only addresses an
/// MX host could have (`prohibited_hosts`, `allowed_hosts`), so a domain's DNS cannot point
/// the fetch at internal services.
struct PolicyHosts {
    resolver: TokioResolver,
    prohibited: Networks,
    allowed: Networks,
}

impl reqwest::dns::Resolve for PolicyHosts {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let resolver = self.resolver.clone();
        let (prohibited, allowed) = (self.prohibited.clone(), self.allowed.clone());
        let host = format!("{}.", name.as_str());
        Box::pin(async move {
            let ips = resolver.lookup_ip(host.as_str()).await?;
            let addrs: Vec<SocketAddr> = ips
                .iter()
                .filter(|ip: &IpAddr| !prohibited.contains(*ip) || allowed.contains(*ip))
                .map(|ip| SocketAddr::new(ip, 0))
                .collect();
            if addrs.is_empty() {
                return Err(format!(
                    "{host} resolves only to prohibited addresses (delivery.prohibited_hosts)"
                )
                .into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txt(records: &[&str]) -> Option<String> {
        parse_txt(&records.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn txt_record_gives_the_policy_id() {
        assert_eq!(
            txt(&["v=STSv1; id=20160831085700Z;"]).as_deref(),
            Some("20160831085700Z")
        );
        assert_eq!(txt(&["v=STSv1;id=abc"]).as_deref(), Some("abc"));
        assert_eq!(txt(&["\"v=STSv1; id=q1;\""]).as_deref(), Some("q1"));
        assert_eq!(txt(&["v=STSv1; id=1; ext-x=yes"]).as_deref(), Some("1"));
        // Other TXT records beside it are ignored.
        assert_eq!(
            txt(&["v=spf1 -all", "v=STSv1; id=2;"]).as_deref(),
            Some("2")
        );
        for bad in [
            &["v=STSv1;"][..],
            &["v=STSv1; id=;"],
            &["v=STSv1; id=a-b;"],
            &["v=STSv1; id=123456789012345678901234567890123;"],
            &["v=STSv2; id=1;"],
            &["id=1; v=STSv1;"],
            &["v=STSv1; id=1;", "v=STSv1; id=2;"],
            &["v=STSv1id=1"],
            &["v=STSv1; id=1; junk"],
            &[],
        ] {
            assert_eq!(txt(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn policy_body_is_parsed_and_checked() {
        let p = parse_policy(
            "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.Example.net\r\nmax_age: 86400\r\n",
        )
        .unwrap();
        assert_eq!(
            p,
            Policy {
                mode: Mode::Enforce,
                mx: vec!["mail.example.com".into(), "*.example.net".into()],
                max_age: 86400
            }
        );
        // LF endings, any order, unknown keys, the first mode wins.
        let p = parse_policy(
            "mode: testing\nversion: STSv1\nmode: enforce\nfoo: bar\nmx: a.test\nmax_age:604800\n",
        )
        .unwrap();
        assert_eq!((p.mode, p.max_age), (Mode::Testing, 604800));
        // none needs no mx.
        assert_eq!(
            parse_policy("version: STSv1\nmode: none\nmax_age: 10")
                .unwrap()
                .mode,
            Mode::None
        );
        let bad = [
            (
                "mode: enforce\nmx: a.test\nmax_age: 1",
                PolicyError::Version,
            ),
            (
                "version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1",
                PolicyError::Version,
            ),
            (
                "version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1",
                PolicyError::Mode,
            ),
            ("version: STSv1\nmx: a.test\nmax_age: 1", PolicyError::Mode),
            (
                "version: STSv1\nmode: enforce\nmx: a.test",
                PolicyError::MaxAge,
            ),
            (
                "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 31557601",
                PolicyError::MaxAge,
            ),
            (
                "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1",
                PolicyError::MaxAge,
            ),
            (
                "version: STSv1\nmode: enforce\nmax_age: 5",
                PolicyError::NoMx("enforce"),
            ),
            (
                "version: STSv1\nmode: testing\nmx: a*.test\nmax_age: 5",
                PolicyError::Mx("a*.test".into()),
            ),
            (
                "version: STSv1\nmode: testing\nmx: *.*.test\nmax_age: 5",
                PolicyError::Mx("*.*.test".into()),
            ),
        ];
        for (text, e) in bad {
            assert_eq!(parse_policy(text), Err(e), "{text}");
        }
    }

    #[test]
    fn mx_patterns_match_whole_names_and_one_wildcard_label() {
        let p = Policy {
            mode: Mode::Enforce,
            mx: vec!["mail.example.com".into(), "*.example.net".into()],
            max_age: 1,
        };
        assert!(p.matches("mail.example.com"));
        assert!(p.matches("MAIL.example.com."));
        assert!(!p.matches("mail2.example.com"));
        assert!(!p.matches("x.mail.example.com"));
        assert!(p.matches("mx1.example.net"));
        assert!(!p.matches("example.net"));
        assert!(!p.matches("a.b.example.net"));
        assert!(!p.matches("mx1.example.network"));
    }

    fn counter() -> IntCounterVec {
        IntCounterVec::new(prometheus::Opts::new("t", "t"), &["result"]).unwrap()
    }

    fn sts() -> MtaSts {
        let d = DeliverySettings {
            nameservers: vec!["127.0.0.1:1".into()],
            ..Default::default()
        };
        let resolver = super::super::mx::resolver(&d).unwrap();
        MtaSts::new(
            &d,
            resolver,
            Shared {
                redis: None,
                key_prefix: "p:mta_sts:".into(),
                results: counter(),
            },
        )
        .unwrap()
    }

    #[tokio::test]
    async fn enforce_filters_hosts_or_defers_and_testing_only_counts() {
        let s = sts();
        let cached = |mode| Cached {
            id: "1".into(),
            policy: Policy {
                mode,
                mx: vec!["*.a.test".into()],
                max_age: 60,
            },
            expires: u64::MAX,
        };
        let hosts = || {
            vec![
                (10, "mx.a.test".to_string()),
                (20, "backup.other.test".to_string()),
            ]
        };
        let mut h = hosts();
        assert!(matches!(
            s.apply("a.test", Some(&cached(Mode::Enforce)), &mut h),
            Applied::Hosts(TlsPolicy::MtaSts)
        ));
        assert_eq!(h, vec![(10, "mx.a.test".to_string())]);
        let mut h = vec![(10, "mx.other.test".to_string())];
        match s.apply("a.test", Some(&cached(Mode::Enforce)), &mut h) {
            Applied::Refused(Outcome::Deferred { response }) => {
                assert!(
                    response.contains("MTA-STS") && response.contains("mx.other.test"),
                    "{response}"
                )
            }
            _ => panic!("not deferred"),
        }
        let mut h = vec![(10, "mx.other.test".to_string())];
        assert!(matches!(
            s.apply("a.test", Some(&cached(Mode::Testing)), &mut h),
            Applied::Hosts(TlsPolicy::MtaStsTesting)
        ));
        assert_eq!(h.len(), 1, "testing filters nothing");
        let mut h = hosts();
        assert!(matches!(
            s.apply("a.test", None, &mut h),
            Applied::Hosts(TlsPolicy::Configured)
        ));
        let r = &s.shared.results;
        for (label, n) in [
            ("enforce", 1),
            ("mx_mismatch", 1),
            ("testing_mx_mismatch", 1),
            ("none", 1),
            ("testing", 0),
        ] {
            assert_eq!(r.with_label_values(&[label]).get(), n, "{label}");
        }
    }
}

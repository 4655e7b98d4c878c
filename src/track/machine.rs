//! Telling machine hits from people: which opens and clicks were made by a proxy, a link
//! scanner or a bot rather than by the recipient reading the mail.
//!
//! A hit is a machine's when any of these holds (checked in this order; the first that
//! holds is the reason counted in `paloma_machine_hits_total{reason}`):
//!
//! 1. `agent`: its user agent is a known proxy, scanner, crawler or HTTP library (see
//!    [`machine_user_agent`]);
//! 2. `network`: it comes from a known proxy or scanner address range
//!    (`[tracking] scanner_networks`, by default [`SCANNER_NETWORKS`], plus the ranges listed
//!    in `scanner_networks_file`, e.g. Apple's published Private Relay egress list, which
//!    Mail Privacy Protection fetches through);
//! 3. `window`: it comes within `[tracking] machine_window` of the message being sent (the
//!    token carries the send time): security gateways fetch every link and image while the
//!    message is being delivered, people take longer. Off unless configured, because a
//!    transactional mail (a password reset) can be clicked within seconds;
//! 4. `burst` (clicks): the same recipient clicked several distinct links within moments
//!    (see [`Bursts`]).
//!
//! The client address is the connection's peer, or with `trust_forwarded = true` (the
//! tracking server behind a reverse proxy) the last address of `X-Forwarded-For`, the one
//! the proxy itself added.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Mutex;

pub use crate::values::Networks;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;

/// Address ranges of mail-security services and webmail image proxies that fetch links and
/// images on a recipient's behalf: Microsoft Exchange Online Protection (Safe Links and
/// Defender detonation), Google's image proxy and crawlers, Barracuda Email Security Service.
/// A starting point; `[tracking] scanner_networks` replaces it.
pub const SCANNER_NETWORKS: &[&str] = &[
    "40.92.0.0/15",
    "40.107.0.0/16",
    "52.100.0.0/14",
    "104.47.0.0/17",
    "2a01:111:f400::/48",
    "2a01:111:f403::/48",
    "66.102.0.0/20",
    "66.249.64.0/19",
    "64.235.144.0/20",
    "209.222.80.0/21",
];

/// Why a hit counts as a machine's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Agent,
    Network,
    Window,
    Burst,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Agent => "agent",
            Reason::Network => "network",
            Reason::Window => "window",
            Reason::Burst => "burst",
        }
    }
}

/// `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1` or `[2001:db8::1]:5678`.
fn forwarded_addr(a: &str) -> Option<IpAddr> {
    a.parse::<IpAddr>()
        .or_else(|_| a.parse::<SocketAddr>().map(|s| s.ip()))
        .ok()
        .or_else(|| a.strip_prefix('[')?.strip_suffix(']')?.parse().ok())
}

/// The tracking server's judge of machine hits.
#[derive(Debug)]
pub struct Detector {
    networks: Networks,
    window: Duration,
    trust_forwarded: bool,
    bursts: Mutex<Bursts>,
}

/// What is known about one hit.
pub struct Hit<'a> {
    pub user_agent: &'a str,
    pub ip: IpAddr,
    /// The token's send time (Unix seconds), when it carries one.
    pub sent: Option<i64>,
    /// Clicks: the recipient's job id and a hash of the link.
    pub click: Option<(&'a str, u64)>,
}

/// Why the machine-hit judge could not be built from `[tracking]`.
#[derive(Debug, thiserror::Error)]
pub enum DetectorError {
    #[error("tracking.scanner_networks: {0}")]
    Networks(crate::values::RangeError),
    #[error("tracking.scanner_networks_file: {0}")]
    File(crate::values::RangeFileError),
}

impl Detector {
    /// From `[tracking]`: `scanner_networks` (None: [`SCANNER_NETWORKS`]),
    /// `scanner_networks_file`, `machine_window`, `trust_forwarded`.
    pub fn new(
        networks: Option<&[String]>,
        file: Option<&Path>,
        window: Duration,
        trust_forwarded: bool,
    ) -> Result<Self, DetectorError> {
        let mut ranges = Vec::new();
        match networks {
            Some(list) => {
                for n in list {
                    ranges.push(Networks::parse_cidr(n).map_err(DetectorError::Networks)?);
                }
            }
            None => {
                for n in SCANNER_NETWORKS {
                    ranges.push(Networks::parse_cidr(n).map_err(DetectorError::Networks)?);
                }
            }
        }
        if let Some(f) = file {
            ranges.extend(Networks::read_file(f).map_err(DetectorError::File)?);
        }
        Ok(Detector {
            networks: Networks::new(ranges),
            window,
            trust_forwarded,
            bursts: Mutex::new(Bursts::default()),
        })
    }

    pub fn networks(&self) -> &Networks {
        &self.networks
    }

    /// The client's address: the peer, or behind a trusted proxy the last entry of the last
    /// `X-Forwarded-For` line — the one that proxy added (with or without a port). Earlier
    /// entries are the client's own words and never used; when the last one does not parse,
    /// the peer is.
    pub fn client_ip(&self, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
        if self.trust_forwarded {
            let last = headers
                .get_all("x-forwarded-for")
                .iter()
                .next_back()
                .map(|v| v.as_bytes())
                .and_then(|v| v.rsplit(|&c| c == b',').next())
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|a| forwarded_addr(a.trim()));
            if let Some(ip) = last {
                return ip;
            }
        }
        match peer.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            ip => ip,
        }
    }

    /// Is this hit a machine's, and why? `now` is Unix time in seconds.
    pub fn judge(&self, hit: &Hit<'_>, now: f64) -> Option<Reason> {
        // Every click is noted, so a burst is seen whatever flagged its first clicks.
        let burst = hit.click.is_some_and(|(id, link)| {
            let mut b = self.bursts.lock().unwrap_or_else(|p| p.into_inner());
            b.click(id, link, Instant::now())
        });
        if machine_user_agent(hit.user_agent) {
            Some(Reason::Agent)
        } else if self.networks.contains(hit.ip) {
            Some(Reason::Network)
        } else if !self.window.is_zero()
            && hit
                .sent
                .is_some_and(|s| now - (s as f64) < self.window.as_secs_f64())
        {
            Some(Reason::Window)
        } else if burst {
            Some(Reason::Burst)
        } else {
            None
        }
    }
}

/// Lower-case substrings of user agents that fetch on nobody's behalf: image proxies of
/// webmail providers, link scanners of mail-security gateways, crawlers and HTTP libraries,
/// and link-preview fetchers (Office's "existence discovery", chat apps).
const MACHINE_AGENTS: &[&str] = &[
    "googleimageproxy",
    "yahoomailproxy",
    "barracuda",
    "proofpoint",
    "mimecast",
    "urldefense",
    "safelinks",
    "bot",
    "crawler",
    "spider",
    "curl/",
    "wget/",
    "python-requests",
    "python-urllib",
    "aiohttp",
    "go-http-client",
    "java/",
    "okhttp",
    "libwww-perl",
    "httpclient",
    "headlesschrome",
    "phantomjs",
    "ms-office",
    "existence discovery",
    "protocol discovery",
    "bingpreview",
    "skypeuripreview",
    "facebookexternalhit",
    "whatsapp",
];

/// Is this request made by a machine rather than a person reading the mail?
///
/// - an empty or missing user agent (also one that is not valid header text);
/// - exactly `Mozilla/5.0` with nothing after it: what Apple Mail Privacy Protection's
///   proxy sends (a real browser always adds its platform);
/// - a user agent containing one of [`MACHINE_AGENTS`] (case-insensitive): webmail image
///   proxies (GoogleImageProxy, YahooMailProxy), security gateways that pre-fetch every link
///   (Barracuda, Proofpoint, Mimecast, urldefense, Microsoft SafeLinks), bots, crawlers,
///   spiders, HTTP libraries (curl, python-requests, Go-http-client, …), headless browsers,
///   and Office/chat link-preview fetchers.
///
/// Clicks also count as machine-made when they come in a burst: see [`Bursts`].
pub fn machine_user_agent(ua: &str) -> bool {
    let ua = ua.trim();
    if ua.is_empty() || ua == "Mozilla/5.0" {
        return true;
    }
    let lower = ua.to_ascii_lowercase();
    MACHINE_AGENTS.iter().any(|m| lower.contains(m))
}

/// "Several links clicked at once": a scanner that opens every link of a message does so
/// within moments, a person does not. A click is machine-made when, with it, the same
/// recipient (the token's job id) has clicked at least `THRESHOLD` distinct links within
/// `WINDOW`. The earlier clicks of such a burst were already recorded as human; the rule
/// flags the third and later ones.
///
/// Memory is bounded: at most `MAX_IDS` recipients are remembered (when full, stale ones
/// are pruned, and if none is stale the map starts over) and at most `MAX_LINKS` links each.
#[derive(Debug, Default)]
pub struct Bursts {
    recent: HashMap<String, Vec<(Instant, u64)>>,
}

impl Bursts {
    pub const WINDOW: Duration = Duration::from_secs(2);
    pub const THRESHOLD: usize = 3;
    const MAX_IDS: usize = 50_000;
    const MAX_LINKS: usize = 8;

    /// Notes a click of `link` (a hash of its URL) by job `id` at `now`; true when it
    /// completes a burst.
    pub fn click(&mut self, id: &str, link: u64, now: Instant) -> bool {
        let fresh = |t: &Instant| now.saturating_duration_since(*t) < Self::WINDOW;
        if self.recent.len() >= Self::MAX_IDS && !self.recent.contains_key(id) {
            self.recent
                .retain(|_, hits| hits.iter().any(|(t, _)| fresh(t)));
            if self.recent.len() >= Self::MAX_IDS {
                self.recent.clear();
            }
        }
        let hits = self.recent.entry(id.to_string()).or_default();
        hits.retain(|(t, l)| fresh(t) && *l != link);
        if hits.len() >= Self::MAX_LINKS {
            hits.remove(0);
        }
        hits.push((now, link));
        hits.len() >= Self::THRESHOLD
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_agents_are_machines_and_mail_clients_are_not() {
        for ua in [
            "",
            "   ",
            "Mozilla/5.0",
            "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)",
            "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html",
            "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
            "curl/8.5.0",
            "python-requests/2.31.0",
            "Go-http-client/1.1",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/120.0 Safari/537.36",
            "Mozilla/4.0 (compatible; ms-office; MSOffice 16)",
            "Microsoft Office Existence Discovery",
            "Barracuda Sentinel (EE)",
            "Proofpoint URL Defense",
            "Mimecast-Link-Scanner",
        ] {
            assert!(machine_user_agent(ua), "{ua:?} should be a machine");
        }
        for ua in [
            "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)",
            "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
            "Mozilla/5.0 (X11; Linux x86_64; rv:115.0) Gecko/20100101 Thunderbird/115.5.0",
            "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17029; Pro)",
        ] {
            assert!(!machine_user_agent(ua), "{ua:?} should be a person");
        }
    }

    #[test]
    fn three_distinct_links_within_two_seconds_are_a_burst() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut b = Bursts::default();
        assert!(!b.click("j1", 1, ms(0)));
        assert!(!b.click("j1", 1, ms(100)), "same link again is not a burst");
        assert!(!b.click("j1", 2, ms(200)));
        assert!(!b.click("j2", 3, ms(250)), "another recipient is separate");
        assert!(b.click("j1", 3, ms(300)), "third distinct link");
        assert!(b.click("j1", 4, ms(400)));

        let mut b = Bursts::default();
        assert!(!b.click("j", 1, ms(0)));
        assert!(!b.click("j", 2, ms(1500)));
        assert!(
            !b.click("j", 3, ms(3000)),
            "spread over more than the window"
        );
        assert!(b.click("j", 4, ms(3100)));
    }

    #[test]
    fn burst_memory_is_bounded() {
        let t0 = Instant::now();
        let mut b = Bursts::default();
        for i in 0..Bursts::MAX_IDS + 10 {
            b.click(&format!("id{i}"), 1, t0);
        }
        assert!(b.recent.len() <= Bursts::MAX_IDS);
        let later = t0 + Duration::from_secs(5);
        b.click("late", 1, later);
        for i in 0..100u64 {
            b.click("many", i, later);
        }
        assert!(b.recent["many"].len() <= Bursts::MAX_LINKS);
    }

    #[test]
    fn address_ranges_match_by_prefix() {
        let r = |s: &str| Networks::parse_cidr(s).unwrap();
        let n = Networks::new([
            r("203.0.113.0/24"),
            r("198.51.100.7"),
            r("2001:db8::/32"),
            r("203.0.113.128/25"),
        ]);
        assert_eq!(n.len(), 3, "overlapping ranges merge");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for yes in [
            "203.0.113.0",
            "203.0.113.255",
            "198.51.100.7",
            "2001:db8:1::5",
            "::ffff:203.0.113.9",
        ] {
            assert!(n.contains(ip(yes)), "{yes}");
        }
        for no in [
            "203.0.112.255",
            "203.0.114.0",
            "198.51.100.8",
            "2001:db9::1",
            "127.0.0.1",
            "::1",
        ] {
            assert!(!n.contains(ip(no)), "{no}");
        }
        assert!(Networks::parse_cidr("10.0.0.0/33").is_err());
        assert!(Networks::parse_cidr("nonsense/8").is_err());
        assert_eq!(r("0.0.0.0/0").1 - r("0.0.0.0/0").0, u32::MAX as u128);
        assert_eq!(r("::/0"), (0, u128::MAX));
        let all = Networks::new(SCANNER_NETWORKS.iter().map(|s| r(s)));
        assert!(all.contains(ip("40.107.22.5")) && !all.contains(ip("127.0.0.1")));
    }

    #[test]
    fn ranges_file_takes_csv_first_column() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("egress.csv");
        std::fs::write(&f, "# Apple egress\n172.224.226.0/27,GB,GB-EN,London,\n\n2a02:26f7:b3c0:4000::/64,GB,GB-EN,London,\n").unwrap();
        let v = Networks::read_file(&f).unwrap();
        assert_eq!(v.len(), 2);
        std::fs::write(&f, "10.0.0.0/8\nnot-a-range\n").unwrap();
        let e = Networks::read_file(&f).unwrap_err().to_string();
        assert!(e.contains(":2:"), "{e}");
    }

    #[test]
    fn detector_reasons_in_order() {
        let d = Detector::new(
            Some(&["203.0.113.0/24".to_string()]),
            None,
            Duration::from_secs(5),
            true,
        )
        .unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let ua = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)";
        let hit = |ua, ip, sent| Hit {
            user_agent: ua,
            ip,
            sent,
            click: None,
        };
        let now = 1_795_000_100.0;
        assert_eq!(
            d.judge(&hit(ua, ip("198.51.100.1"), Some(1_795_000_000)), now),
            None
        );
        assert_eq!(
            d.judge(&hit(ua, ip("198.51.100.1"), None), now),
            None,
            "old tokens carry no time"
        );
        assert_eq!(
            d.judge(&hit(ua, ip("198.51.100.1"), Some(1_795_000_097)), now),
            Some(Reason::Window)
        );
        assert_eq!(
            d.judge(&hit(ua, ip("203.0.113.40"), Some(1_795_000_000)), now),
            Some(Reason::Network)
        );
        assert_eq!(
            d.judge(&hit("curl/8", ip("203.0.113.40"), None), now),
            Some(Reason::Agent)
        );
        let off = Detector::new(Some(&[]), None, Duration::ZERO, false).unwrap();
        assert_eq!(
            off.judge(&hit(ua, ip("203.0.113.40"), Some(1_795_000_099)), now),
            None
        );

        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let xff = |lines: &[&str]| {
            let mut h = HeaderMap::new();
            for l in lines {
                h.append("x-forwarded-for", l.parse().unwrap());
            }
            h
        };
        let h = xff(&["40.107.0.1", "10.1.1.1, 203.0.113.9"]);
        assert_eq!(d.client_ip(peer, &h), ip("203.0.113.9"));
        assert_eq!(
            off.client_ip(peer, &h),
            ip("127.0.0.1"),
            "untrusted header ignored"
        );
        // The proxy's entry does not parse: the peer, never an earlier (client-written) entry.
        let h = xff(&["40.107.0.1, bogus"]);
        assert_eq!(d.client_ip(peer, &h), ip("127.0.0.1"));
        let h = xff(&["40.107.0.1, 198.51.100.4:4711"]);
        assert_eq!(d.client_ip(peer, &h), ip("198.51.100.4"));
        let h = xff(&["[2001:db8::7]:443"]);
        assert_eq!(d.client_ip(peer, &h), ip("2001:db8::7"));
        assert!(Networks::parse_cidr("::ffff:10.0.0.0/8").is_err());
        assert!(Networks::parse_cidr("::ffff:10.0.0.1").is_ok());
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:80".parse().unwrap();
        assert_eq!(off.client_ip(mapped, &HeaderMap::new()), ip("192.0.2.1"));
    }
}

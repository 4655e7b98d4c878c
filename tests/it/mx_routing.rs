//! Direct-to-MX routing against a real DNS server (dnsmasq) and smtp-sink instances on
//! 127.0.0.x: MX preference with fallback, implicit MX, null MX, NXDOMAIN.

use crate::common;

use std::time::Duration;

use common::mx::*;
use common::*;

#[test]
fn routing_preference_fallback_implicit_null_and_nxdomain() {
    let e = env(
        &[
            "mx-host=pref.test,mx1.pref.test,10",
            "mx-host=pref.test,mx2.pref.test,20",
            "host-record=mx1.pref.test,127.0.0.2",
            "host-record=mx2.pref.test,127.0.0.3",
            "host-record=amx.test,127.0.0.4",
            // RFC 7505 null MX: preference 0, root target.
            "dns-rr=null.test,15,000000",
        ],
        &[("127.0.0.3", &[]), ("127.0.0.4", &[])],
        "",
        "",
    );
    let mut conn = e.redis.conn();
    enqueue_raw(
        &mut conn,
        &e.setup.prefix,
        &jobs_to(
            "r",
            &["a@pref.test", "b@amx.test", "c@null.test", "d@nx.test"],
        ),
    );
    let daemon = Daemon::spawn(&e.setup.config);
    let evs = wait_terminal(
        &mut conn,
        &e.setup.prefix,
        4,
        Duration::from_secs(30),
        Some(&daemon),
    );

    // mx1 (127.0.0.2) refuses connections: delivered through mx2.
    assert_eq!(terminal(&evs, "r-0")["type"], "delivered");
    assert_eq!(
        e.sinks["127.0.0.3"].wait_count(1, Duration::from_secs(10)),
        1,
        "delivered by preference fallback to mx2"
    );
    // No MX but an A record: implicit MX.
    assert_eq!(terminal(&evs, "r-1")["type"], "delivered");
    assert_eq!(e.sinks["127.0.0.4"].count(), 1);
    let null = terminal(&evs, "r-2");
    assert_eq!(
        (null["type"].as_str(), null["enhanced"].as_str()),
        (Some("bounced"), Some("5.1.10")),
        "{null}"
    );
    let nx = terminal(&evs, "r-3");
    assert_eq!(
        (nx["type"].as_str(), nx["class"].as_str()),
        (Some("bounced"), Some("bad_domain")),
        "{nx}"
    );
}

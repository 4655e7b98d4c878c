//! The tracking server against real mail: a newsletter goes through smtp-sink, and the
//! links, pixel and List-Unsubscribe URL found in the captured messages are requested over
//! plain HTTP. Redirects go only where a verified token says; forged, tampered and garbage
//! requests get a 4xx; opens and clicks become events with `machine` set by user agent and
//! by bursts; unsubscribing takes a POST, is written once, and ends tracking.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use common::track::*;
use common::*;
use serde_json::{json, Value};

/// The template's tracked links, in order, for a job with one product.
const ORIGINAL_URLS: &[&str] = &[
    "https://shop.example/",
    "https://shop.example/new",
    "https://shop.example/women",
    "https://shop.example/men",
    "https://shop.example/sale",
    "https://shop.example/x?a=1&b=2",
    "https://shop.example/x?a=1&b=2",
    "https://shop.example/wishlist/add?item=0",
    "https://shop.example/pricing",
    "https://shop.example/stores",
    "https://shop.example/help/shipping",
    "https://shop.example/help/returns",
    "https://instagram.example/shop",
    "https://shop.example/blog",
    "https://shop.example/account/preferences",
    "https://shop.example/privacy",
];

/// Events are written in request order, so once a later marker event is stored, anything
/// the requests before it would have written is stored too.
/// Each barrier clicks another of the marker's links: a repeat would not be recorded.
fn barrier(conn: &mut redis::Connection, prefix: &str, port: u16, marker: &Mail, seen: &mut usize) {
    assert_eq!(get(port, &marker.clicks[*seen], MAIL_UA).status, 302);
    *seen += 1;
    wait_tracking(conn, prefix, "marker", *seen);
}

fn tamper(token: &str, at: usize) -> String {
    let mut b = token.as_bytes().to_vec();
    b[at] = if b[at] == b'A' { b'B' } else { b'A' };
    String::from_utf8(b).unwrap()
}

#[test]
fn links_pixel_and_unsubscribe_work_and_only_for_signed_tokens() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mport = free_port();
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        "",
        &format!("[metrics]\nlisten = \"127.0.0.1:{mport}\""),
    );
    // Setup writes the [tracking] section; point it at this test's server.
    let text = std::fs::read_to_string(&setup.config).unwrap().replace(
        "base_url = \"https://t.shop.test\"",
        &format!("base_url = \"{base}\"\nlisten = \"127.0.0.1:{port}\""),
    );
    std::fs::write(&setup.config, text).unwrap();
    let mut conn = redis.conn();
    let data = json!({"first_name": "A", "products": [{"name": "X", "price": "1", "url": "https://shop.example/x?a=1&b=2"}]});
    let recipients = [
        ("burst", "burst@example.test"),
        ("human", "Bea.Upper@Example.test"),
        ("proxy", "proxy@example.test"),
        ("head", "head@example.test"),
        ("marker", "marker@example.test"),
    ];
    let jobs: Vec<String> = recipients
        .iter()
        .map(|(id, to)| job(id, "spring", "newsletter", to, data.clone()))
        .collect();
    enqueue_raw(&mut conn, &setup.prefix, &jobs);
    let mut daemon = Daemon::spawn(&setup.config);
    wait_terminal(
        &mut conn,
        &setup.prefix,
        jobs.len(),
        Duration::from_secs(60),
        Some(&daemon),
    );
    wait_port("127.0.0.1", port, Duration::from_secs(10));
    assert!(daemon.log_text().contains("tracking endpoint listening"));

    let mails = captured(&sink, &base);
    assert_eq!(mails.len(), recipients.len());
    let (burst, human, proxy, head, marker) = (
        &mails["burst"],
        &mails["human"],
        &mails["proxy"],
        &mails["head"],
        &mails["marker"],
    );
    assert_eq!(burst.clicks.len(), ORIGINAL_URLS.len());
    let mut seen_marker = 0;

    // Every tracked link redirects to its original URL; all clicked within moments, so from
    // the third distinct link on they count as a machine's.
    for (path, url) in burst.clicks.iter().zip(ORIGINAL_URLS) {
        let r = get(port, path, MAIL_UA);
        assert_eq!(r.status, 302, "{path}");
        assert_eq!(r.header("location"), Some(*url));
        assert_eq!(r.header("cache-control"), Some("no-store"));
    }
    // The template links one URL twice: its second click is a repeat, not recorded.
    let distinct = ORIGINAL_URLS.len() - 1;
    let evs = wait_tracking(&mut conn, &setup.prefix, "burst", distinct);
    let machine: Vec<bool> = evs
        .iter()
        .map(|e| e["machine"].as_bool().unwrap())
        .collect();
    assert_eq!(&machine[..3], &[false, false, true], "{evs:?}");
    let product = evs.iter().find(|e| e["link"] == "product").unwrap();
    assert_eq!(product["url"], "https://shop.example/x?a=1&b=2");
    assert_eq!(product["type"], "clicked");
    assert_eq!(product["campaign"], "spring");
    assert_eq!(product["to"], "burst@example.test");
    assert!(evs
        .iter()
        .any(|e| e["link"] == "" && e["url"] == "https://shop.example/women"));

    // A person in a mail client: the pixel (also with .gif) and one link.
    let r = get(port, &human.pixel, MAIL_UA);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("image/gif"));
    assert_eq!(
        r.header("cache-control"),
        Some("no-store, no-cache, must-revalidate, private")
    );
    assert_eq!(r.header("pragma"), Some("no-cache"));
    assert!(r.body.starts_with(b"GIF89a") && r.body.len() == 43);
    assert_eq!(
        get(port, &format!("{}.gif", human.pixel), MAIL_UA).status,
        200
    );
    let pricing = &human.clicks[8];
    let r = get(port, pricing, MAIL_UA);
    assert_eq!(r.header("location"), Some("https://shop.example/pricing"));
    // The second fetch of the pixel is a repeat (tracking.repeat_window): answered, not
    // recorded.
    let evs = wait_tracking(&mut conn, &setup.prefix, "human", 2);
    assert_eq!(evs[0]["type"], "opened");
    assert_eq!(evs[0]["machine"], false);
    assert_eq!(evs[0]["to"], "Bea.Upper@example.test");
    assert!(evs[0]["at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(evs[1]["type"], "clicked");
    assert_eq!(evs[1]["machine"], false);
    assert_eq!(evs[1]["link"], "pricing");
    assert_eq!(evs[1]["url"], "https://shop.example/pricing");

    // An image proxy and a script.
    assert_eq!(get(port, &proxy.pixel, PROXY_UA).status, 200);
    assert_eq!(get(port, &proxy.clicks[0], "curl/8.5.0").status, 302);
    assert_eq!(get(port, &proxy.clicks[1], "").status, 302);
    let evs = wait_tracking(&mut conn, &setup.prefix, "proxy", 3);
    assert_eq!(evs[0]["type"], "opened");
    assert!(evs.iter().all(|e| e["machine"] == true), "{evs:?}");

    // HEAD answers like GET and records nothing.
    let r = request(port, "HEAD", &head.pixel, &[("User-Agent", MAIL_UA)], b"");
    assert_eq!(
        (r.status, r.header("content-type")),
        (200, Some("image/gif"))
    );
    let r = request(
        port,
        "HEAD",
        &head.clicks[0],
        &[("User-Agent", MAIL_UA)],
        b"",
    );
    assert_eq!(
        (r.status, r.header("location")),
        (302, Some("https://shop.example/"))
    );
    let r = request(
        port,
        "HEAD",
        &head.unsubscribe,
        &[("User-Agent", MAIL_UA)],
        b"",
    );
    assert_eq!(r.status, 200);

    // Forged, tampered and garbage requests: 4xx, never a redirect.
    let token = head.clicks[5].strip_prefix("/c/").unwrap();
    let (first_dot, last_dot) = (token.find('.').unwrap(), token.rfind('.').unwrap());
    let stranger =
        paloma::track::token::Signer::new("0", "somebody-elses-secret-0123456789", &HashMap::new());
    let forged = stranger.sign(
        paloma::track::token::Kind::Click,
        &[
            "head",
            "spring",
            "head@example.test",
            "https://evil.example/",
            "",
        ],
    );
    let open_token = head.pixel.strip_prefix("/o/").unwrap();
    let unsub_token = head.unsubscribe.strip_prefix("/u/").unwrap();
    let long = format!("/c/{}", "A".repeat(10 * 1024));
    let bad: Vec<String> = vec![
        format!("/c/{}", tamper(token, last_dot + 3)),
        format!("/c/{}", tamper(token, first_dot + 5)),
        format!("/c/{}", tamper(token, token.len() - 1)),
        format!("/c/{forged}"),
        "/c/https://evil.example".into(),
        "/c/https%3A%2F%2Fevil.example".into(),
        format!("/c/{open_token}"),
        format!("/c/{unsub_token}"),
        format!("/o/{token}"),
        format!("/u/{token}"),
        long,
        "/c/%FF%FE%FD".into(),
        "/c/%C0%AF".into(),
        "/o/%".into(),
        "/".into(),
        "/c/".into(),
        "/c".into(),
        "/x/y".into(),
        "/c/a.b.c".into(),
        "/../../etc/passwd".into(),
        "/c/..%2F..%2Fetc%2Fpasswd".into(),
        format!("/c/{token}/extra"),
    ];
    for target in &bad {
        let r = get(port, target, MAIL_UA);
        assert!((400..500).contains(&r.status), "{target}: {}", r.status);
        assert!(r.header("location").is_none(), "{target}");
    }
    let r = one_click(
        port,
        &format!(
            "/u/{}",
            tamper(unsub_token, unsub_token.rfind('.').unwrap() + 2)
        ),
    );
    assert!((400..500).contains(&r.status));
    let r = request(
        port,
        "POST",
        &head.unsubscribe,
        &[("Content-Type", "application/x-www-form-urlencoded")],
        &vec![b'a'; 64 * 1024],
    );
    assert!(
        (400..500).contains(&r.status),
        "oversized POST: {}",
        r.status
    );

    barrier(&mut conn, &setup.prefix, port, marker, &mut seen_marker);
    assert!(
        tracking_events(&mut conn, &setup.prefix, "head").is_empty(),
        "HEAD and refused requests record nothing"
    );
    let suppressed = format!("{}suppressed", setup.prefix);
    let hget = |conn: &mut redis::Connection, addr: &str| -> Option<String> {
        redis::cmd("HGET")
            .arg(&suppressed)
            .arg(addr)
            .query(conn)
            .unwrap()
    };
    assert_eq!(hget(&mut conn, "head@example.test"), None);

    // The unsubscribe page asks; it does not unsubscribe.
    let r = get(port, &human.unsubscribe, MAIL_UA);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    let page = r.text();
    assert!(
        page.contains("<html lang=\"en\">") && page.contains("method=\"post\""),
        "{page}"
    );
    assert!(page.contains("Bea.Upper@example.test"));
    let r = get(port, &format!("{}?lang=es", human.unsubscribe), MAIL_UA);
    assert!(r.text().contains("<html lang=\"es\">") && r.text().contains("Darme de baja"));
    let r = request(
        port,
        "GET",
        &human.unsubscribe,
        &[
            ("User-Agent", MAIL_UA),
            ("Accept-Language", "es-ES,es;q=0.9"),
        ],
        b"",
    );
    assert!(r.text().contains("<html lang=\"es\">"));
    assert_eq!(hget(&mut conn, "bea.upper@example.test"), None);

    // One-click POST unsubscribes; a second one changes nothing and writes no second event.
    let r = one_click(port, &human.unsubscribe);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("You are unsubscribed"));
    assert_eq!(
        hget(&mut conn, "bea.upper@example.test").as_deref(),
        Some("unsubscribed")
    );
    let r = request(
        port,
        "POST",
        &format!("{}?lang=es", human.unsubscribe),
        &[("Content-Type", "application/x-www-form-urlencoded")],
        b"List-Unsubscribe=One-Click",
    );
    assert_eq!(r.status, 200);
    assert!(r.text().contains("Te has dado de baja"));

    // After unsubscribing, links still work but nothing is tracked (a link not clicked
    // before, so that it is no repeat either).
    assert_eq!(get(port, &human.clicks[3], MAIL_UA).status, 302);
    barrier(&mut conn, &setup.prefix, port, marker, &mut seen_marker);
    let evs = tracking_events(&mut conn, &setup.prefix, "human");
    let unsubscribed: Vec<&Value> = evs.iter().filter(|e| e["type"] == "unsubscribed").collect();
    assert_eq!(unsubscribed.len(), 1, "{evs:?}");
    assert_eq!(unsubscribed[0]["to"], "Bea.Upper@example.test");
    assert_eq!(unsubscribed[0]["campaign"], "spring");
    assert_eq!(evs.len(), 3, "opened, clicked, unsubscribed: {evs:?}");

    // The page's own form post (any body) also unsubscribes.
    let r = request(
        port,
        "POST",
        &head.unsubscribe,
        &[("Content-Type", "application/x-www-form-urlencoded")],
        b"",
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        hget(&mut conn, "head@example.test").as_deref(),
        Some("unsubscribed")
    );

    let m = get(mport, "/metrics", "curl/8").text();
    assert_metrics(
        &m,
        &[
            "paloma_tracking_requests_total{kind=\"click\",result=\"human\"}",
            "paloma_tracking_requests_total{kind=\"click\",result=\"invalid\"}",
            "paloma_tracking_requests_total{kind=\"open\",result=\"machine\"}",
            "paloma_tracking_requests_total{kind=\"unsubscribe\",result=\"repeat\"} 1",
        ],
    );

    // SIGTERM stops the tracking server with the rest.
    daemon.term();
    assert!(!daemon.log_text().contains("panicked"));
}

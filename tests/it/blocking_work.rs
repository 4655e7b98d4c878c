//! CPU-heavy work off the async runtime. Two `POST /api/v1/sends` of 50,000 jobs each, at
//! once, are parsed and checked on blocking threads: meanwhile `/healthz` keeps answering
//! (on the runtime's two threads, two such parses would otherwise hold every request for as
//! long as they take). A message over the size limit is rendered and DKIM-signed on a
//! blocking thread, delivered with a signature that verifies, while small ones flow.

use crate::common;

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::{Duration, Instant};

use common::track::request;
use common::*;
use mail_auth::hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator};
use serde_json::{json, Value};

const TOKEN: &str = "api-token-0123456789abcdef";

#[test]
fn two_50000_job_requests_leave_healthz_answering() {
    let _machine = exclusive();
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let port = free_port();
    let metrics = free_port();
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        "",
        &format!(
            "[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n[api]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"{TOKEN}\"\n"
        ),
    );
    let daemon = Daemon::spawn(&setup.config);
    wait_port("127.0.0.1", port, Duration::from_secs(30));
    wait_port("127.0.0.1", metrics, Duration::from_secs(30));
    // Not due for a day: the intake parks them in the delayed set; nothing is sent.
    let later = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    let body = |tag: &str| {
        let jobs: Vec<String> = (0..50_000)
            .map(|i| {
                json!({"id": format!("{tag}-{i}"), "campaign": "bulk", "template": "receipt",
                    "to": format!("u{i}@bulk.test"), "send_at": later,
                    "data": {"name": "R", "order_id": i}})
                .to_string()
            })
            .collect();
        format!("[{}]", jobs.join(",")).into_bytes()
    };
    let bodies = [body("a"), body("b")];
    let auth = format!("Bearer {TOKEN}");

    let (answers, probes) = std::thread::scope(|s| {
        let posts: Vec<_> = bodies
            .iter()
            .map(|b| {
                let auth = auth.clone();
                s.spawn(move || {
                    let t = Instant::now();
                    let r = request(
                        port,
                        "POST",
                        "/api/v1/sends",
                        &[
                            ("Content-Type", "application/json"),
                            ("Authorization", &auth),
                        ],
                        b,
                    );
                    (r, t.elapsed())
                })
            })
            .collect();
        // /healthz, one request after another, for as long as either post is in flight.
        let mut probes = Vec::new();
        while posts.iter().any(|p| !p.is_finished()) {
            let t = Instant::now();
            let r = request(metrics, "GET", "/healthz", &[], b"");
            assert_eq!(r.status, 200);
            probes.push(t.elapsed());
        }
        let answers: Vec<_> = posts.into_iter().map(|p| p.join().unwrap()).collect();
        (answers, probes)
    });
    for (r, _) in &answers {
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["accepted"], 50_000);
        assert_eq!(v["results"].as_array().unwrap().len(), 50_000);
    }
    let post = answers.iter().map(|(_, d)| *d).min().unwrap();
    let worst = probes.iter().max().copied().unwrap_or_default();
    let mut sorted = probes.clone();
    sorted.sort();
    eprintln!(
        "two 50,000-job posts: {:?} and {:?}; /healthz {} probes meanwhile, median {:?}, worst {:?}",
        answers[0].1,
        answers[1].1,
        probes.len(),
        sorted.get(sorted.len() / 2).copied().unwrap_or_default(),
        worst
    );
    assert!(
        probes.len() >= 3,
        "too few probes ({}) to say",
        probes.len()
    );
    // Parsing on the runtime holds /healthz for about as long as the post itself takes;
    // off it, the worst answer is a small part of it.
    assert!(
        worst * 4 < post,
        "/healthz took up to {worst:?} while the posts took {post:?}\n{}",
        daemon.log_text()
    );
}

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "openssl {args:?}");
    out.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)] // the machine is held for the whole test
async fn a_large_message_is_signed_on_a_blocking_thread_and_small_ones_flow() {
    let _machine = exclusive();
    use base64::Engine;
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let keys = tempfile::tempdir().unwrap();
    let ed = keys.path().join("ed.pem");
    openssl(&[
        "genpkey",
        "-algorithm",
        "ed25519",
        "-out",
        ed.to_str().unwrap(),
    ]);
    let ed_pub = openssl(&[
        "pkey",
        "-in",
        ed.to_str().unwrap(),
        "-pubout",
        "-outform",
        "DER",
    ]);
    let p = base64::engine::general_purpose::STANDARD.encode(&ed_pub[ed_pub.len() - 32..]);
    let dns = Dns::start(&[format!(
        "txt-record=e1._domainkey.shop.test,v=DKIM1; k=ed25519; p={p}"
    )]);
    let metrics = free_port();
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        "",
        &format!(
            "[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n[[dkim]]\ndomain = \"shop.test\"\nselector = \"e1\"\nkey = \"{}\"\n",
            ed.display()
        ),
    );
    let mut conn = redis.conn();
    // About 180 KB of merge data (under the 256 KB job limit): 700 products with long
    // names, a message of over 256 KB.
    let products: Vec<Value> = (0..700)
        .map(|i| json!({"name": format!("Product {i} {}", "x".repeat(200)), "price": "9", "url": format!("https://shop.example/p{i}")}))
        .collect();
    let mut jobs = vec![
        json!({"id": "large", "campaign": "big", "template": "newsletter",
        "to": "large@dest.test", "data": {"first_name": "L", "products": products}})
        .to_string(),
    ];
    jobs.extend((0..50).map(|i| {
        job(
            &format!("small-{i}"),
            "big",
            "receipt",
            &format!("s{i}@dest.test"),
            json!({"name": "S", "order_id": i}),
        )
    }));
    enqueue_raw(&mut conn, &setup.prefix, &jobs);
    let daemon = Daemon::spawn(&setup.config);
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        51,
        Duration::from_secs(60),
        Some(&daemon),
    );
    let t = terminal_by_id(&evs);
    assert!(
        t.values()
            .all(|e| e.len() == 1 && e[0]["type"] == "delivered"),
        "{t:?}"
    );
    sink.wait_count(51, Duration::from_secs(10));
    assert_eq!(
        metric(metrics, "paloma_renders_blocking_total"),
        1.0,
        "only the large one"
    );

    let mut ns = NameServerConfig::udp_and_tcp(IpAddr::V4(Ipv4Addr::LOCALHOST));
    for c in &mut ns.connections {
        c.port = dns.port;
    }
    let auth = MessageAuthenticator::new(
        ResolverConfig::from_name_servers(vec![ns]),
        ResolverOpts::default(),
    )
    .unwrap();
    let large = sink
        .dumps()
        .into_iter()
        .find(|raw| raw.len() > 256 * 1024)
        .expect("the large message at the sink");
    eprintln!("the large message: {} bytes", large.len());
    let msg = AuthenticatedMessage::parse(&large).expect("parse");
    let out = auth.verify_dkim(&msg).await;
    assert_eq!(out.len(), 1, "one signature");
    assert_eq!(out[0].result(), &DkimResult::Pass, "{:?}", out[0].result());
}

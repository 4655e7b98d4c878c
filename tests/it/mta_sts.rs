//! MTA-STS (RFC 8461) in mx mode, against policies served over HTTPS by a private CA
//! (Python's http.server with TLS on 127.0.25.1:443, tests/peers/mta_sts_https.py) and
//! published by dnsmasq: an enforced policy delivers over verified STARTTLS to an MX host it
//! lists (aiosmtpd, tests/peers/starttls_smtpd.py) and defers, naming MTA-STS, for an MX
//! host it does not list or one without STARTTLS (smtp-sink); a testing policy delivers as
//! before and counts the mismatch; `mta_sts = false` ignores policies.

use crate::common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::mx::*;
use common::*;

/// A Python peer of tests/peers, up once it prints "ready" and `host:port` listens.
struct Peer {
    child: Child,
}

impl Peer {
    fn start(script: &str, args: &[&std::ffi::OsStr], host: &str, port: u16) -> Peer {
        require_tools();
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/peers")
            .join(script);
        let mut child = Command::new("/usr/bin/python3")
            .arg(script)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting a python peer");
        let mut line = String::new();
        let mut r = std::io::BufReader::new(child.stdout.take().unwrap());
        std::io::BufRead::read_line(&mut r, &mut line).unwrap();
        assert_eq!(line.trim(), "ready", "{host}:{port} did not start");
        wait_port(host, port, Duration::from_secs(10));
        Peer { child }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mx_port(setup: &Setup) -> u16 {
    std::fs::read_to_string(&setup.config)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("mx_port = ")?.trim().parse().ok())
        .expect("mx_port in the config")
}

fn policy(mode: &str, mx: &[&str]) -> String {
    let mut p = format!("version: STSv1\r\nmode: {mode}\r\n");
    for m in mx {
        p.push_str(&format!("mx: {m}\r\n"));
    }
    p.push_str("max_age: 86400\r\n");
    p
}

/// The first event of `type` for job `id`, once there.
fn wait_event(
    conn: &mut redis::Connection,
    prefix: &str,
    id: &str,
    kind: &str,
    daemon: &Daemon,
) -> serde_json::Value {
    wait_for_daemon(
        &format!("{kind} event of {id}"),
        Duration::from_secs(30),
        daemon,
        || {
            events(conn, prefix)
                .into_iter()
                .find(|e| e["id"] == id && e["type"] == kind)
        },
    )
}

#[test]
fn enforce_delivers_only_over_verified_tls_to_listed_mx_hosts_and_testing_counts() {
    let certs = tempfile::tempdir().unwrap();
    let (ca, leaves) = ca_and_leaves(
        certs.path(),
        &[
            (
                "policy",
                &[
                    "mta-sts.good.test",
                    "mta-sts.stray.test",
                    "mta-sts.plain.test",
                    "mta-sts.trial.test",
                    "mta-sts.trialok.test",
                    "mta-sts.wrongcert.test",
                ],
            ),
            ("mx", &["mx.good.test"]),
        ],
    );
    let policies = tempfile::tempdir().unwrap();
    for (domain, text) in [
        ("good", policy("enforce", &["mx.good.test"])),
        ("stray", policy("enforce", &["mx.elsewhere.test"])),
        ("plain", policy("enforce", &["*.plain.test"])),
        ("trial", policy("testing", &["mx.elsewhere.test"])),
        ("trialok", policy("testing", &["mx.good.test"])),
        ("wrongcert", policy("enforce", &["mx.wrongcert.test"])),
    ] {
        std::fs::write(policies.path().join(format!("{domain}.test.txt")), text).unwrap();
    }
    let https = Peer::start(
        "mta_sts_https.py",
        &[
            "127.0.25.1".as_ref(),
            leaves[0].0.as_os_str(),
            leaves[0].1.as_os_str(),
            policies.path().as_os_str(),
        ],
        "127.0.25.1",
        443,
    );
    let mut records = vec![
        "host-record=mx.good.test,127.0.25.2".to_string(),
        "host-record=mx.stray.test,127.0.25.3".into(),
        "host-record=mx.plain.test,127.0.25.4".into(),
        "host-record=mx.trial.test,127.0.25.5".into(),
        // The same server as mx.good.test, whose certificate does not name this host.
        "host-record=mx.wrongcert.test,127.0.25.2".into(),
        // A testing policy whose MX is the STARTTLS one with a valid certificate.
        "mx-host=trialok.test,mx.good.test,10".into(),
    ];
    for d in ["good", "stray", "plain", "trial", "wrongcert", "trialok"] {
        if d != "trialok" {
            records.push(format!("mx-host={d}.test,mx.{d}.test,10"));
        }
        records.push(format!("host-record=mta-sts.{d}.test,127.0.25.1"));
        // On dnsmasq's command line quotes stay in the text: one record as zone-file
        // quoting published literally, the others bare.
        records.push(if d == "good" {
            format!("txt-record=_mta-sts.{d}.test,\"v=STSv1; id=20260101T1;\"")
        } else {
            format!("txt-record=_mta-sts.{d}.test,v=STSv1; id=20260101T1;")
        });
    }
    let records: Vec<&str> = records.iter().map(String::as_str).collect();
    let metrics = free_port();
    let e = env(
        &records,
        &[
            ("127.0.25.3", &[]),
            ("127.0.25.4", &[]),
            ("127.0.25.5", &[]),
        ],
        &format!("tls_ca_file = \"{}\"", ca.display()),
        &format!("[metrics]\nlisten = \"127.0.0.1:{metrics}\""),
    );
    // Opportunistic TLS, as in production (the test configs say "none"): a testing policy's
    // sessions then try STARTTLS and are judged.
    let cfg = std::fs::read_to_string(&e.setup.config).unwrap();
    std::fs::write(
        &e.setup.config,
        cfg.replace("tls = \"none\"", "tls = \"opportunistic\""),
    )
    .unwrap();
    let port = mx_port(&e.setup);
    let mx_out = tempfile::tempdir().unwrap();
    let _mx = Peer::start(
        "starttls_smtpd.py",
        &[
            "127.0.25.2".as_ref(),
            port.to_string().as_ref(),
            leaves[1].0.as_os_str(),
            leaves[1].1.as_os_str(),
            mx_out.path().as_os_str(),
        ],
        "127.0.25.2",
        port,
    );
    let mut conn = e.redis.conn();
    enqueue_raw(
        &mut conn,
        &e.setup.prefix,
        &jobs_to(
            "s",
            &[
                "a@good.test",
                "b@stray.test",
                "c@plain.test",
                "d@trial.test",
                "e@wrongcert.test",
                "f@trialok.test",
            ],
        ),
    );
    let daemon = Daemon::spawn(&e.setup.config);

    // Enforced, listed, STARTTLS with a certificate for mx.good.test from the private CA.
    let good = wait_event(&mut conn, &e.setup.prefix, "s-0", "delivered", &daemon);
    assert_eq!(good["type"], "delivered", "{good}");
    let sessions = std::fs::read_to_string(mx_out.path().join("sessions.log")).unwrap_or_default();
    assert!(
        !sessions.is_empty() && sessions.lines().all(|l| l == "tls=True"),
        "delivered over TLS: {sessions}"
    );

    // Enforced, MX host not listed: deferred before any session, saying why.
    let stray = wait_event(&mut conn, &e.setup.prefix, "s-1", "deferred", &daemon);
    let why = stray["response"].as_str().unwrap();
    assert!(
        why.contains("MTA-STS") && why.contains("mx.stray.test"),
        "{stray}"
    );

    // Enforced, listed, but no STARTTLS (smtp-sink): deferred, naming MTA-STS.
    let plain = wait_event(&mut conn, &e.setup.prefix, "s-2", "deferred", &daemon);
    let why = plain["response"].as_str().unwrap();
    assert!(
        why.contains("MTA-STS") && why.contains("STARTTLS"),
        "{plain}"
    );

    // Enforced, listed, STARTTLS offered but the certificate names another host: deferred.
    let wrong = wait_event(&mut conn, &e.setup.prefix, "s-4", "deferred", &daemon);
    let why = wrong["response"].as_str().unwrap();
    assert!(why.contains("MTA-STS"), "{wrong}");

    // Testing, MX host not listed, and no STARTTLS there (smtp-sink): delivered as without
    // a policy; the mismatch and the session enforce would refuse are counted.
    let trial = wait_event(&mut conn, &e.setup.prefix, "s-3", "delivered", &daemon);
    assert_eq!(trial["type"], "delivered");
    // Testing, listed, STARTTLS with a valid certificate: delivered, nothing counted.
    let trialok = wait_event(&mut conn, &e.setup.prefix, "s-5", "delivered", &daemon);
    assert_eq!(trialok["type"], "delivered");
    assert_eq!(
        std::fs::read_to_string(mx_out.path().join("sessions.log"))
            .unwrap_or_default()
            .lines()
            .collect::<Vec<_>>(),
        ["tls=True", "tls=True"],
        "the enforced and the testing session to the STARTTLS MX, both over TLS"
    );
    assert_eq!(
        e.sinks["127.0.25.5"].wait_count(1, Duration::from_secs(10)),
        1
    );

    assert_eq!(
        e.sinks["127.0.25.3"].count(),
        0,
        "nothing to an unlisted MX"
    );
    assert_eq!(e.sinks["127.0.25.4"].count(), 0, "nothing in clear");
    let text = metrics_text(metrics);
    for (result, at_least) in [
        ("enforce", 3.0),
        ("mx_mismatch", 1.0),
        ("testing_mx_mismatch", 1.0),
        ("tls_failed", 2.0),
    ] {
        let v = metric_in(
            &text,
            &format!("paloma_mta_sts_total{{result=\"{result}\"}}"),
        )
        .unwrap_or(0.0);
        assert!(v >= at_least, "{result} = {v}:\n{text}");
    }
    assert_eq!(
        metric_in(&text, "paloma_mta_sts_total{result=\"fetch_failed\"}"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        metric_in(&text, "paloma_mta_sts_total{result=\"testing_tls_failed\"}"),
        Some(1.0),
        "only the testing session without STARTTLS: {text}"
    );

    // The policies are cached for the fleet, under their TXT id, for their max_age.
    let cached: String = redis::cmd("GET")
        .arg(format!("{}mta_sts:good.test", e.setup.prefix))
        .query(&mut conn)
        .unwrap();
    let cached: serde_json::Value = serde_json::from_str(&cached).unwrap();
    assert_eq!(cached["id"], "20260101T1", "{cached}");
    assert!(cached["policy"].as_str().unwrap().contains("mx.good.test"));
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("{}mta_sts:good.test", e.setup.prefix))
        .query(&mut conn)
        .unwrap();
    assert!((86_000..=86_400).contains(&ttl), "{ttl}");
    // One fetch per domain.
    let log = std::fs::read_to_string(policies.path().join("requests.log")).unwrap();
    assert_eq!(log.lines().count(), 6, "{log}");
    drop(https);
}

#[test]
fn mta_sts_off_delivers_as_before() {
    // An enforced policy naming another MX host, served and verifiable: with
    // mta_sts = false it is never fetched and the mail goes to the MX host as before.
    let certs = tempfile::tempdir().unwrap();
    let (ca, leaves) = ca_and_leaves(certs.path(), &[("policy", &["mta-sts.off.test"])]);
    let policies = tempfile::tempdir().unwrap();
    std::fs::write(
        policies.path().join("off.test.txt"),
        policy("enforce", &["mx.elsewhere.test"]),
    )
    .unwrap();
    let _https = Peer::start(
        "mta_sts_https.py",
        &[
            "127.0.25.7".as_ref(),
            leaves[0].0.as_os_str(),
            leaves[0].1.as_os_str(),
            policies.path().as_os_str(),
        ],
        "127.0.25.7",
        443,
    );
    let e = env(
        &[
            "mx-host=off.test,mx.off.test,10",
            "host-record=mx.off.test,127.0.25.6",
            "host-record=mta-sts.off.test,127.0.25.7",
            "txt-record=_mta-sts.off.test,\"v=STSv1; id=1;\"",
        ],
        &[("127.0.25.6", &[])],
        &format!("mta_sts = false\ntls_ca_file = \"{}\"", ca.display()),
        "",
    );
    let mut conn = e.redis.conn();
    enqueue_raw(&mut conn, &e.setup.prefix, &jobs_to("o", &["a@off.test"]));
    let daemon = Daemon::spawn(&e.setup.config);
    let evs = wait_terminal(
        &mut conn,
        &e.setup.prefix,
        1,
        Duration::from_secs(30),
        Some(&daemon),
    );
    assert_eq!(terminal(&evs, "o-0")["type"], "delivered", "{evs:?}");
    assert_eq!(
        e.sinks["127.0.25.6"].wait_count(1, Duration::from_secs(10)),
        1
    );
    assert!(
        !policies.path().join("requests.log").exists(),
        "the policy was fetched"
    );
}

//! Credentials go to a relay only over a verified session: a relay with a private CA
//! (`delivery.tls_ca_file`) gets AUTH over STARTTLS; without the CA the certificate does not
//! verify and no credential is sent; `tls = "opportunistic"` with a username is refused at
//! start. The relay is Python's aiosmtpd (STARTTLS and AUTH required).

use crate::common;

use std::time::Duration;

use common::*;

fn send_one(conn: &mut redis::Connection, prefix: &str, id: &str) {
    enqueue_raw(
        conn,
        prefix,
        &[job(
            id,
            "tls",
            "receipt",
            "a@x.test",
            serde_json::json!({"name": "A"}),
        )],
    );
}

#[test]
fn auth_goes_only_over_a_verified_session() {
    let redis = Redis::start();
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = private_ca(certs.path());
    let relay = AuthRelay::start(&cert, &key, "paloma", "s3cret-pass-77");
    let mut conn = redis.conn();

    // 1. tls = "required" with the private CA: verified, authenticated, delivered.
    let extra = format!("username = \"paloma\"\ntls_ca_file = \"{}\"", ca.display());
    let setup = Setup::new(&redis.url(), relay.port, &extra, "", "");
    let cfg = std::fs::read_to_string(&setup.config)
        .unwrap()
        .replace("tls = \"none\"", "tls = \"required\"");
    std::fs::write(&setup.config, cfg).unwrap();
    send_one(&mut conn, &setup.prefix, "v1");
    let mut daemon = Daemon::spawn_env(
        &setup.config,
        &[("PALOMA_DELIVERY__PASSWORD", "s3cret-pass-77")],
    );
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        1,
        Duration::from_secs(20),
        Some(&daemon),
    );
    assert_eq!(
        evs.iter().find(|e| e["id"] == "v1").unwrap()["type"],
        "delivered",
        "{evs:?}"
    );
    assert_eq!(relay.messages(), 1);
    assert_eq!(relay.auth_log().trim(), "paloma tls=True");
    daemon.kill9();

    // 2. The same without the CA: the certificate does not verify, the job defers, and the
    // relay never sees an AUTH.
    let setup = Setup::new(&redis.url(), relay.port, "username = \"paloma\"", "", "");
    let cfg = std::fs::read_to_string(&setup.config)
        .unwrap()
        .replace("tls = \"none\"", "tls = \"required\"");
    std::fs::write(&setup.config, cfg).unwrap();
    send_one(&mut conn, &setup.prefix, "u1");
    let daemon = Daemon::spawn_env(
        &setup.config,
        &[("PALOMA_DELIVERY__PASSWORD", "s3cret-pass-77")],
    );
    wait_until("a deferral", Duration::from_secs(20), || {
        events(&mut conn, &setup.prefix)
            .iter()
            .any(|e| e["type"] == "deferred")
    });
    let evs = events(&mut conn, &setup.prefix);
    let d = evs.iter().find(|e| e["type"] == "deferred").unwrap();
    assert!(
        d["response"].as_str().unwrap().contains("STARTTLS"),
        "{d} {}",
        daemon.log_text()
    );
    assert_eq!(relay.messages(), 1, "nothing more delivered");
    assert_eq!(
        relay.auth_log().lines().count(),
        1,
        "no AUTH over the unverified session"
    );
    assert!(!daemon.log_text().contains("s3cret-pass-77"));
    drop(daemon);

    // 3. opportunistic (unverified) with a username: refused at start, naming tls.
    let setup = Setup::new(&redis.url(), relay.port, "username = \"paloma\"", "", "");
    let cfg = std::fs::read_to_string(&setup.config)
        .unwrap()
        .replace("tls = \"none\"", "tls = \"opportunistic\"");
    std::fs::write(&setup.config, cfg).unwrap();
    let mut daemon = Daemon::spawn_env(
        &setup.config,
        &[("PALOMA_DELIVERY__PASSWORD", "s3cret-pass-77")],
    );
    let st = daemon.wait(Duration::from_secs(10)).expect("exits");
    assert!(!st.success());
    let log = daemon.log_text();
    assert!(
        log.contains("delivery.tls") && log.contains("required"),
        "{log}"
    );
    assert!(!log.contains("s3cret-pass-77"), "{log}");
}

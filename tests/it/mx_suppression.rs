//! Hard bounces from an MX feed the suppression list: later sends to the address are
//! suppressed, transactional ones too; operators add and remove entries with
//! `paloma suppress`, and an unsubscribe does not block transactional mail.

use crate::common;

use std::time::Duration;

use common::mx::*;
use common::*;
use serde_json::json;

#[test]
fn hard_bounces_are_suppressed_and_later_sends_to_them_too() {
    let e = env(
        &[
            "mx-host=hard.test,mx.hard.test,10",
            "host-record=mx.hard.test,127.0.0.5",
        ],
        &[("127.0.0.5", &["-f", "RCPT", "-B", "550 5.1.1 User unknown"])],
        "",
        "",
    );
    let mut conn = e.redis.conn();
    enqueue_raw(
        &mut conn,
        &e.setup.prefix,
        &jobs_to("h", &["Gone@hard.test"]),
    );
    let daemon = Daemon::spawn(&e.setup.config);
    let evs = wait_terminal(
        &mut conn,
        &e.setup.prefix,
        1,
        Duration::from_secs(30),
        Some(&daemon),
    );
    assert_eq!(terminal(&evs, "h-0")["class"], "invalid_recipient");
    let reason: Option<String> = redis::cmd("HGET")
        .arg(format!("{}suppressed", e.setup.prefix))
        .arg("gone@hard.test")
        .query(&mut conn)
        .unwrap();
    assert_eq!(reason.as_deref(), Some("bounced"));

    // A later campaign to the same address: suppressed, not sent; even when transactional.
    let later = vec![
        job("h2", "later", "receipt", "gone@hard.test", json!({})),
        json!({"id": "h3", "campaign": "later", "template": "receipt", "to": "gone@hard.test", "transactional": true}).to_string(),
    ];
    enqueue_raw(&mut conn, &e.setup.prefix, &later);
    let evs = wait_terminal(
        &mut conn,
        &e.setup.prefix,
        3,
        Duration::from_secs(30),
        Some(&daemon),
    );
    for id in ["h2", "h3"] {
        let t = terminal(&evs, id);
        assert_eq!(
            (t["type"].as_str(), t["reason"].as_str()),
            (Some("suppressed"), Some("bounced")),
            "{t}"
        );
    }

    // Operators manage the list: a manual entry blocks; an unsubscribe does not block
    // transactional mail.
    let cfg = e.setup.config.to_str().unwrap();
    let (st, _, err) = paloma(&["suppress", "--config", cfg, "add", "vip@hard.test"], None);
    assert!(st.success(), "{err}");
    let (st, _, err) = paloma(
        &[
            "suppress",
            "--config",
            cfg,
            "add",
            "--reason",
            "unsubscribed",
            "news@hard.test",
        ],
        None,
    );
    assert!(st.success(), "{err}");
    let (_, out, _) = paloma(&["suppress", "--config", cfg, "list"], None);
    assert!(
        out.contains("vip@hard.test manual") && out.contains("gone@hard.test bounced"),
        "{out}"
    );
    enqueue_raw(
        &mut conn,
        &e.setup.prefix,
        &[
            job("h4", "later", "receipt", "vip@hard.test", json!({})),
            json!({"id": "h5", "campaign": "later", "template": "receipt", "to": "news@hard.test", "transactional": true}).to_string(),
        ],
    );
    let evs = wait_terminal(
        &mut conn,
        &e.setup.prefix,
        5,
        Duration::from_secs(30),
        Some(&daemon),
    );
    assert_eq!(terminal(&evs, "h4")["reason"], "manual");
    // h5 went to the (rejecting) MX instead of being suppressed.
    assert_eq!(terminal(&evs, "h5")["type"], "bounced");
    let (st, _, _) = paloma(
        &["suppress", "--config", cfg, "remove", "vip@hard.test"],
        None,
    );
    assert!(st.success());
    let (_, out, _) = paloma(&["suppress", "--config", cfg, "list"], None);
    assert!(!out.contains("vip@hard.test"));
}

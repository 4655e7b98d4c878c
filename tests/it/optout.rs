//! A recipient's opt-out is always recorded, and kept: unsubscribing while the address is
//! already suppressed for another reason (a bounce, an operator's block) writes the
//! `unsubscribed` event, and removing that other reason later leaves the address suppressed
//! as `unsubscribed`, so marketing mail does not resume.

use crate::common;

use std::time::Duration;

use common::track::*;
use common::*;
use serde_json::json;

#[test]
fn an_opt_out_is_recorded_and_survives_removal_of_another_reason() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let (setup, port, base) = tracking_setup(&redis.url(), sink.port, "", "");
    let mut conn = redis.conn();
    let data = json!({"first_name": "A", "products": []});
    enqueue_raw(
        &mut conn,
        &setup.prefix,
        &[job(
            "n1",
            "spring",
            "newsletter",
            "ana@example.test",
            data.clone(),
        )],
    );
    let daemon = Daemon::spawn(&setup.config);
    wait_terminal(
        &mut conn,
        &setup.prefix,
        1,
        Duration::from_secs(30),
        Some(&daemon),
    );
    wait_port("127.0.0.1", port, Duration::from_secs(10));
    let mail = &captured(&sink, &base)["n1"];
    let cfg = setup.config.to_str().unwrap();

    // The address is suppressed as a bounce (as after a DSN, or by an operator).
    let (st, _, err) = paloma(
        &[
            "suppress",
            "--config",
            cfg,
            "add",
            "ana@example.test",
            "--reason",
            "bounced",
        ],
        None,
    );
    assert!(st.success(), "{err}");
    let r = one_click(port, &mail.unsubscribe);
    assert_eq!(r.status, 200);
    let evs = wait_tracking(&mut conn, &setup.prefix, "n1", 1);
    assert_eq!(evs[0]["type"], "unsubscribed", "{evs:?}");
    // A retried POST is no second event.
    assert_eq!(one_click(port, &mail.unsubscribe).status, 200);
    assert_eq!(stat(&mut conn, &setup.prefix, "spring", "unsubscribed"), 1);

    // Removing the bounce keeps the opt-out.
    let (st, _, err) = paloma(
        &["suppress", "--config", cfg, "remove", "ana@example.test"],
        None,
    );
    assert!(st.success(), "{err}");
    assert!(err.contains("kept 1 as unsubscribed"), "{err}");
    let reason: Option<String> = redis::cmd("HGET")
        .arg(format!("{}suppressed", setup.prefix))
        .arg("ana@example.test")
        .query(&mut conn)
        .unwrap();
    assert_eq!(reason.as_deref(), Some("unsubscribed"));
    // …so the next marketing send is suppressed, for the opt-out.
    enqueue_raw(
        &mut conn,
        &setup.prefix,
        &[job("n2", "summer", "newsletter", "ana@example.test", data)],
    );
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        2,
        Duration::from_secs(30),
        Some(&daemon),
    );
    let n2 = evs
        .iter()
        .find(|e| e["id"] == "n2" && is_terminal(e))
        .unwrap();
    assert_eq!(
        (n2["type"].as_str(), n2["reason"].as_str()),
        (Some("suppressed"), Some("unsubscribed")),
        "{n2}"
    );
    let unsubscribed = events(&mut conn, &setup.prefix)
        .iter()
        .filter(|e| e["type"] == "unsubscribed")
        .count();
    assert_eq!(unsubscribed, 1);
    assert_eq!(sink.count(), 1);

    // Removing the opt-out itself is the operator's explicit decision.
    let (st, _, err) = paloma(
        &["suppress", "--config", cfg, "remove", "ana@example.test"],
        None,
    );
    assert!(st.success() && err.contains("removed 1"), "{err}");
}

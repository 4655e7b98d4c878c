//! A rotation of `tracking.secret` (the old one kept in `old_secrets`) and late bounces, over
//! SMTP to the real daemon: DSNs to return paths made before the rotation still name their
//! jobs and suppress, a complaint naming a job by X-Paloma-Id still finds its record, and a
//! stale token quoted in a report voids nothing but itself.

use crate::common;

use common::bounce::*;
use common::*;

#[test]
fn tokens_made_before_a_secret_rotation_still_name_their_jobs() {
    let mut b = Bounces::start(3, "rot", "");
    let rp = b.return_paths();
    // Rotate: a new secret, the old one kept in old_secrets.
    b.restart_with(|text| {
        text.replace(
            &format!("secret = \"{SECRET}\""),
            &format!(
                "secret = \"rotated-9f8e7d6c5b4a39281706\"\nold_secrets = {{ \"1\" = \"{SECRET}\" }}"
            ),
        )
    });
    let mut c = Client::connect(b.port);
    // A DSN to the token rot-0 went out with.
    let r = c.send(
        "",
        &rp["rot-0"],
        dsn(
            "u0@example.test",
            "5.1.1",
            "550 5.1.1 user unknown",
            "mx.example.test",
            "",
        )
        .as_bytes(),
    );
    assert!(r.starts_with("250"), "{r}");
    // A DSN for rot-1 that also quotes a token no configured secret made.
    let stale = format!("b-{}@bounces.test", "0123456789abcdef".repeat(2));
    let r = c.send(
        "",
        &rp["rot-1"],
        dsn(
            "u1@example.test",
            "5.1.1",
            "550 5.1.1 user unknown",
            "mx.example.test",
            &format!("An earlier attempt came from <{stale}>."),
        )
        .as_bytes(),
    );
    assert!(r.starts_with("250"), "{r}");
    // A complaint to the feedback-loop address naming rot-2 by its X-Paloma-Id and
    // recipient only (its record is under the key of the old secret).
    let r = c.send(
        "",
        "fbl@bounces.test",
        arf("rot-2", "u2@example.test", "x@y.example").as_bytes(),
    );
    assert!(r.starts_with("250"), "{r}");
    assert!(c.cmd("QUIT").starts_with("221"));

    let returned = b.events_of("returned");
    let ids: Vec<&str> = returned.iter().filter_map(|e| e["id"].as_str()).collect();
    assert_eq!(ids, ["rot-0", "rot-1"], "{returned:?}");
    assert_eq!(b.suppressed("u0@example.test").as_deref(), Some("bounced"));
    assert_eq!(b.suppressed("u1@example.test").as_deref(), Some("bounced"));
    let complained = b.events_of("complained");
    assert_eq!(complained.len(), 1, "{complained:?}");
    assert_eq!(complained[0]["id"], "rot-2");
    assert_eq!(b.metric("paloma_reports_total{kind=\"forged\"}"), 0.0);
    // A token made under no configured secret is still a forgery.
    let r = c_send_forged(b.port);
    assert!(r.starts_with("250"), "{r}");
    assert_eq!(b.metric("paloma_reports_total{kind=\"forged\"}"), 1.0);
}

fn c_send_forged(port: u16) -> String {
    let mut c = Client::connect(port);
    let forged = format!("b-{}@bounces.test", "0".repeat(32));
    c.send(
        "",
        &forged,
        dsn(
            "u0@example.test",
            "5.1.1",
            "550 5.1.1 user unknown",
            "mx.example.test",
            "",
        )
        .as_bytes(),
    )
}

//! What the bounce listener records from reports under valid tokens, over SMTP to the real
//! daemon: fields cut to their documented sizes, however large the report, and statuses
//! taken only when they are RFC 3463 codes (a malformed one recorded as `malformed`,
//! suppressing nobody, whatever its diagnostic says).

use crate::common;

use common::bounce::*;

#[test]
fn report_fields_are_bounded_and_statuses_parsed_strictly() {
    let b = Bounces::start(6, "f", "");
    let rp = b.return_paths();
    let user_unknown = "550 5.1.1 <x@example.test>: Recipient address rejected: User unknown";
    let mut c = Client::connect(b.port);
    // A 5,000,000-byte Diagnostic-Code and a 5,000-byte Reporting-MTA.
    let huge = format!("550 5.1.1 user unknown {}", "x".repeat(5_000_000));
    let r = c.send(
        "",
        &rp["f-0"],
        dsn("u0@example.test", "5.1.1", &huge, &"m".repeat(5_000), "").as_bytes(),
    );
    assert!(r.starts_with("250"), "{r}");
    // Malformed statuses, with a diagnostic that names 5.1.1.
    let bad = [
        "5.1.1€",
        "-5.-1.-1",
        "99999999999999999999.1.1",
        "",
        "5.1.1.1",
    ];
    for (i, status) in bad.iter().enumerate() {
        let id = format!("f-{}", i + 1);
        let to = format!("u{}@example.test", i + 1);
        let r = c.send(
            "",
            &rp[&id],
            dsn(&to, status, user_unknown, "mx.example.test", "").as_bytes(),
        );
        assert!(r.starts_with("250"), "{status:?}: {r}");
    }
    assert!(c.cmd("QUIT").starts_with("221"));

    let returned = b.events_of("returned");
    assert_eq!(returned.len(), 6, "{returned:?}");
    let of = |id: &str| returned.iter().find(|e| e["id"] == id).unwrap().clone();
    let e = of("f-0");
    let diag = e["diagnostic"].as_str().unwrap();
    assert!(diag.len() <= 1000, "diagnostic of {} bytes", diag.len());
    assert!(diag.starts_with("550 5.1.1 user unknown"), "{diag}");
    assert!(e["reporting_mta"].as_str().unwrap().len() <= 255);
    assert_eq!(e["status"], "5.1.1");
    assert_eq!(e["class"], "invalid_recipient");
    assert_eq!(e["permanent"], true);
    assert_eq!(b.suppressed("u0@example.test").as_deref(), Some("bounced"));
    let event_bytes = serde_json::to_string(&e).unwrap().len();
    eprintln!("a 5,000,000-byte Diagnostic-Code became a {event_bytes}-byte event");
    for (i, status) in bad.iter().enumerate() {
        let e = of(&format!("f-{}", i + 1));
        assert_eq!(e["status"], "malformed", "{status:?}: {e}");
        assert_eq!(e["class"], "other", "{status:?}: {e}");
        assert_eq!(e["permanent"], false, "{status:?}: {e}");
        assert_eq!(
            b.suppressed(&format!("u{}@example.test", i + 1)),
            None,
            "{status:?} suppressed its address"
        );
    }
}

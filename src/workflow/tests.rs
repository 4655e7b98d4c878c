//! Rule matching, timer planning, follow-up jobs and job keeping, without Redis.

use serde_json::{json, Map, Value};

use super::*;
use crate::config::Settings;
use crate::queue::events::EventKind;

const BASE: &str = r#"
[sender]
from = "Shop <news@shop.example>"
helo = "mta.shop.example"
[tracking]
secret = "0123456789abcdef0123"
[webhooks]
secret = "webhook-secret-0123456789"
"#;

fn settings(rules: &str) -> Settings {
    Settings::from_toml(&format!("{BASE}\n{rules}"), Vec::new()).unwrap()
}

fn rules(text: &str) -> Rules {
    Rules::from_settings(&settings(text)).unwrap()
}

fn ev(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

fn event(kind: &str, id: &str, campaign: &str, extra: Value) -> Map<String, Value> {
    let mut m = ev(json!({
        "type": kind, "id": id, "campaign": campaign, "to": "Ann@example.test",
        "at": "2026-11-22T10:00:00.000Z",
    }));
    if let Value::Object(x) = extra {
        m.extend(x);
    }
    m
}

fn plan(r: &Rules, e: &Map<String, Value>) -> Plan {
    let mut p = Plan::default();
    assert!(r.plan(e, 0, &mut p));
    p
}

const PRICING: &str = r#"
[[workflows]]
name = "pricing"
campaign = "spring"
on = "clicked"
link = "pricing"
send = { template = "followup", campaign = "spring-2" }
"#;

#[test]
fn a_click_on_the_named_link_fires_and_nothing_else_does() {
    let r = rules(PRICING);
    let click = |link: &str, machine: bool, campaign: &str| {
        event(
            "clicked",
            "a",
            campaign,
            json!({"link": link, "url": "https://x/", "machine": machine}),
        )
    };
    let p = plan(&r, &click("pricing", false, "spring"));
    assert_eq!(p.firings.len(), 1);
    assert_eq!(p.firings[0].id, "a");
    assert_eq!(p.firings[0].body["link"], "pricing");
    assert!(p.timers.is_empty());
    for other in [
        click("home", false, "spring"),
        click("", false, "spring"),
        click("pricing", true, "spring"),
        click("pricing", false, "autumn"),
        event("opened", "a", "spring", json!({"machine": false})),
        event("delivered", "a", "spring", json!({})),
    ] {
        assert!(plan(&r, &other).firings.is_empty(), "{other:?}");
    }
    // A link-less click rule takes any human click; machine = true takes scanners too.
    let r = rules(
        r#"
[[workflows]]
name = "any"
on = "clicked"
machine = true
webhook = "http://127.0.0.1:9/h"
"#,
    );
    assert_eq!(plan(&r, &click("home", true, "autumn")).firings.len(), 1);
}

#[test]
fn a_rule_never_fires_for_its_own_follow_ups() {
    let r = rules(
        r#"
[[workflows]]
name = "again"
on = "delivered"
send = { template = "followup" }
[[workflows]]
name = "hook"
on = "delivered"
webhook = "http://127.0.0.1:9/h"
"#,
    );
    let fired = |id: &str| -> Vec<String> {
        plan(&r, &event("delivered", id, "c", json!({})))
            .firings
            .iter()
            .map(|f| r.0[f.rule].name.clone())
            .collect()
    };
    assert_eq!(fired("x"), ["again", "hook"]);
    assert_eq!(fired("wf:again:x"), ["hook"]);
    assert_eq!(fired("wf:other:wf:again:x"), ["hook"]);
    assert_eq!(fired("wf:againx:x"), ["again", "hook"]);
    assert_eq!(fired("wf:again"), ["again", "hook"]);
}

#[test]
fn negative_rules_arm_on_delivery_and_cancel_on_the_first_qualifying_event() {
    let r = rules(
        r#"
[[workflows]]
name = "remind"
campaign = "spring"
on = "not_opened"
within = "3d"
send = { template = "followup" }
[[workflows]]
name = "noclick"
campaign = "spring"
on = "not_clicked"
link = "pricing"
within = "1h"
webhook = "http://127.0.0.1:9/h"
"#,
    );
    let p = plan(&r, &event("delivered", "a", "spring", json!({})));
    assert!(p.firings.is_empty());
    let at = chrono::DateTime::parse_from_rfc3339("2026-11-22T10:00:00Z")
        .unwrap()
        .timestamp_millis();
    let m0 = timers::member("remind", "a", "Ann@example.test", "spring");
    let m1 = timers::member("noclick", "a", "Ann@example.test", "spring");
    assert_eq!(
        p.timers,
        [
            TimerOp::Arm {
                due: at + 3 * 86_400_000,
                member: m0.clone(),
                rule: 0
            },
            TimerOp::Arm {
                due: at + 3_600_000,
                member: m1.clone(),
                rule: 1
            },
        ]
    );
    assert!(plan(&r, &event("delivered", "a", "autumn", json!({})))
        .timers
        .is_empty());

    let cancelled = |e: Map<String, Value>| -> Vec<usize> {
        plan(&r, &e)
            .timers
            .iter()
            .map(|op| match op {
                TimerOp::Cancel { rule, member } => {
                    assert_eq!(member, [&m0, &m1][*rule]);
                    *rule
                }
                other => panic!("{other:?}"),
            })
            .collect()
    };
    assert_eq!(
        cancelled(event("opened", "a", "spring", json!({"machine": false}))),
        [0]
    );
    assert_eq!(
        cancelled(event("opened", "a", "spring", json!({"machine": true}))),
        Vec::<usize>::new()
    );
    // A click proves the mail was opened; only the named link counts as clicked.
    assert_eq!(
        cancelled(event(
            "clicked",
            "a",
            "spring",
            json!({"link": "pricing", "machine": false})
        )),
        [0, 1]
    );
    assert_eq!(
        cancelled(event(
            "clicked",
            "a",
            "spring",
            json!({"link": "home", "machine": false})
        )),
        [0]
    );
    assert_eq!(
        cancelled(event(
            "clicked",
            "a",
            "spring",
            json!({"link": "pricing", "machine": true})
        )),
        Vec::<usize>::new()
    );
    assert_eq!(
        cancelled(event("unsubscribed", "a", "spring", json!({}))),
        [0, 1]
    );
    assert_eq!(
        cancelled(event("bounced", "a", "spring", json!({}))),
        [0, 1]
    );
    assert_eq!(
        cancelled(event("deferred", "a", "spring", json!({}))),
        Vec::<usize>::new()
    );
}

#[test]
fn malformed_events_are_refused_not_planned() {
    let r = rules(PRICING);
    let mut p = Plan::default();
    for bad in [
        json!({}),
        json!({"type": "clicked", "id": "a", "campaign": "spring"}),
        json!({"type": "clicked", "id": 7, "campaign": "spring", "to": "a@b.c"}),
        json!({"type": "clicked", "id": "", "campaign": "spring", "to": "a@b.c"}),
    ] {
        assert!(!r.plan(&ev(bad.clone()), 0, &mut p), "{bad}");
    }
    assert!(p.firings.is_empty() && p.timers.is_empty());
    // A missing or odd `at` falls back to now for the timer.
    let r = rules(
        r#"
[[workflows]]
name = "remind"
on = "not_opened"
within = "2s"
webhook = "http://127.0.0.1:9/h"
"#,
    );
    let e = ev(json!({"type": "delivered", "id": "a", "campaign": "c", "to": "x@y.z", "at": "?"}));
    assert!(r.plan(&e, 1_000, &mut p));
    assert!(matches!(p.timers[0], TimerOp::Arm { due: 3_000, .. }));
}

#[test]
fn timer_members_round_trip_whatever_the_id_holds() {
    let m = timers::member("r", "a|b\"c", "x@y.z", "spring");
    assert_eq!(
        timers::parse_member(&m).unwrap(),
        ["r", "a|b\"c", "x@y.z", "spring"].map(String::from)
    );
    assert!(timers::parse_member("r|a|b").is_none());
}

#[test]
fn follow_up_jobs_carry_the_original_recipient_and_data() {
    let stored = json!({
        "id": "a", "campaign": "spring", "template": "newsletter", "to": "ann@example.test",
        "to_name": "Ann", "data": {"first_name": "Ann", "n": 12345678901234567890u64},
        "from": "Shop <news@shop.example>", "headers": {"X-Ref": "1"}, "transactional": true,
        "send_at": "2026-01-01T00:00:00Z",
    })
    .to_string();
    let job = follow_up_job(stored.as_bytes(), "wf:r:a", "spring-2", "followup", None).unwrap();
    let job: Value = serde_json::from_str(&job).unwrap();
    assert_eq!(
        job,
        json!({
            "id": "wf:r:a", "campaign": "spring-2", "template": "followup",
            "to": "ann@example.test", "to_name": "Ann",
            "data": {"first_name": "Ann", "n": 12345678901234567890u64},
            "from": "Shop <news@shop.example>",
        })
    );
    let job = follow_up_job(stored.as_bytes(), "wf:r:a", "c", "t", Some(0)).unwrap();
    assert!(
        job.contains(r#""send_at":"1970-01-01T00:00:00.000Z""#),
        "{job}"
    );
    assert!(follow_up_job(b"not json", "i", "c", "t", None).is_err());
    assert!(follow_up_job(br#"{"data":{}}"#, "i", "c", "t", None).is_err());
}

#[test]
fn jobs_are_kept_only_for_campaigns_a_send_rule_may_need() {
    let s = settings(
        r#"
[[workflows]]
name = "remind"
campaign = "spring"
on = "not_opened"
within = "3d"
delay = "1h"
send = { template = "followup" }
[[workflows]]
name = "hook"
on = "delivered"
webhook = "http://127.0.0.1:9/h"
[[workflows]]
name = "soft"
campaign = "autumn"
on = "bounced"
send = { template = "followup" }
"#,
    );
    let k = KeepJobs::new(&s);
    let (key, job, ttl) = k.store(EventKind::Delivered, "a", "spring", b"{}").unwrap();
    assert_eq!(key, "paloma:wfjob:a");
    assert_eq!(job, b"{}");
    assert_eq!(ttl, 3 * 86400 + 3600 + 7 * 86400);
    assert!(k
        .store(EventKind::Delivered, "a", "winter", b"{}")
        .is_none());
    assert!(k
        .store(EventKind::Delivered, "a", "autumn", b"{}")
        .is_none());
    assert!(k.store(EventKind::Bounced, "a", "autumn", b"{}").is_some());
    assert!(k.store(EventKind::Bounced, "a", "spring", b"{}").is_none());
    assert!(k.store(EventKind::Failed, "a", "spring", b"{}").is_none());
    // No send rule at all: nothing is ever kept.
    let k = KeepJobs::new(&settings(""));
    assert!(k
        .store(EventKind::Delivered, "a", "spring", b"{}")
        .is_none());
}

#[test]
fn config_checks_catch_rules_that_cannot_work() {
    let bad = |rule: &str, want: &str| {
        let text = format!("{BASE}\n[[workflows]]\n{rule}");
        let e = Settings::from_toml(&text, Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{rule}: {e}");
    };
    bad(
        "name = \"a b\"\non = \"opened\"\nwebhook = \"http://h/\"",
        "name must be",
    );
    bad(
        "name = \"a\"\non = \"opened\"\nlink = \"x\"\nwebhook = \"http://h/\"",
        "link applies",
    );
    bad(
        "name = \"a\"\non = \"opened\"\nwithin = \"1d\"\nwebhook = \"http://h/\"",
        "within applies",
    );
    bad(
        "name = \"a\"\non = \"unsubscribed\"\nsend = { template = \"t\" }",
        "use a webhook",
    );
    bad(
        "name = \"a\"\non = \"opened\"\nwebhook = \"ftp://h/\"",
        "http:// or https://",
    );
    bad(
        "name = \"a\"\non = \"opened\"\nsend = { template = \"t\", campaign = \"a b\" }",
        "send.campaign",
    );
    bad(
        "name = \"a\"\non = \"opened\"\nwebhook = \"http://h/\"\n[[workflows]]\nname = \"a\"\non = \"clicked\"\nwebhook = \"http://h/\"",
        "same name",
    );
    let text = "[sender]\nfrom = \"a@b.c\"\nhelo = \"h\"\n[tracking]\nsecret = \"0123456789abcdef0123\"\n[[workflows]]\nname = \"a\"\non = \"opened\"\nwebhook = \"http://h/\"\n";
    let e = Settings::from_toml(text, Vec::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("webhooks.secret"), "{e}");
}

#[test]
fn late_bounces_and_complaints_fire_webhook_rules_and_end_timers() {
    let r = rules(
        r#"
[[workflows]]
name = "crm-returned"
on = "returned"
webhook = "http://127.0.0.1:9/h"
[[workflows]]
name = "crm-complaint"
campaign = "spring"
on = "complained"
webhook = "http://127.0.0.1:9/h"
[[workflows]]
name = "remind"
on = "not_opened"
within = "3d"
webhook = "http://127.0.0.1:9/h"
"#,
    );
    let fired = |ev: Map<String, Value>| -> Vec<String> {
        plan(&r, &ev)
            .firings
            .iter()
            .map(|f| r.0[f.rule].name.clone())
            .collect()
    };
    let returned = event(
        "returned",
        "a",
        "spring",
        json!({"status": "5.1.1", "permanent": true}),
    );
    assert_eq!(fired(returned.clone()), ["crm-returned"]);
    assert_eq!(
        fired(event("complained", "a", "spring", json!({}))),
        ["crm-complaint"]
    );
    assert!(fired(event("complained", "a", "autumn", json!({}))).is_empty());
    // A late bounce or a complaint ends the message's not_opened timer.
    let cancels = |e: Map<String, Value>| {
        plan(&r, &e)
            .timers
            .iter()
            .any(|op| matches!(op, TimerOp::Cancel { rule: 2, .. }))
    };
    assert!(cancels(returned));
    assert!(cancels(event("complained", "a", "spring", json!({}))));
    assert!(!cancels(event("deferred", "a", "spring", json!({}))));
    // A send on them is refused at load: the address is suppressed.
    let bad = Settings::from_toml(
        &format!("{BASE}\n[[workflows]]\nname = \"x\"\non = \"complained\"\nsend = {{ template = \"t\" }}\n"),
        Vec::new(),
    );
    assert!(bad.is_err());
}

#[test]
fn a_guards_pause_fires_a_webhook_rule_though_it_belongs_to_no_job() {
    let r = rules(
        r#"
[[workflows]]
name = "ops"
on = "campaign_paused"
webhook = "http://127.0.0.1:9/h"
"#,
    );
    let mut ev = Map::new();
    ev.insert("type".into(), json!("campaign_paused"));
    ev.insert("campaign".into(), json!("spring"));
    ev.insert("reason".into(), json!("bounce_rate"));
    ev.insert("at".into(), json!("2026-12-01T12:00:00.000Z"));
    let p = plan(&r, &ev);
    assert_eq!(p.firings.len(), 1);
    assert_eq!(p.firings[0].body["reason"], "bounce_rate");
    // A job's event still needs its id and recipient.
    let mut bad = ev.clone();
    bad.insert("type".into(), json!("delivered"));
    let mut out = Plan::default();
    assert!(!r.plan(&bad, 0, &mut out), "malformed without id and to");
}

#[test]
fn converted_rules_filter_by_kind_and_a_purchase_ends_the_campaigns_timers() {
    let r = rules(
        r#"
[[workflows]]
name = "crm"
campaign = "spring"
on = "converted"
kind = "purchase"
webhook = "http://127.0.0.1:9/h"
[[workflows]]
name = "any-conversion"
on = "converted"
webhook = "http://127.0.0.1:9/h"
[[workflows]]
name = "noclick"
campaign = "spring"
on = "not_clicked"
link = "pricing"
within = "1h"
webhook = "http://127.0.0.1:9/h"
"#,
    );
    let conv = |kind: &str, campaign: &str| {
        event(
            "converted",
            "a",
            campaign,
            json!({"order": "o-1", "kind": kind, "value": 59.9, "currency": "EUR", "link": "home"}),
        )
    };
    let fired = |e: &Map<String, Value>| -> Vec<String> {
        plan(&r, e)
            .firings
            .iter()
            .map(|f| r.0[f.rule].name.clone())
            .collect()
    };
    assert_eq!(
        fired(&conv("purchase", "spring")),
        ["crm", "any-conversion"]
    );
    assert_eq!(fired(&conv("signup", "spring")), ["any-conversion"]);
    assert_eq!(fired(&conv("purchase", "autumn")), ["any-conversion"]);
    let p = plan(&r, &conv("purchase", "spring"));
    assert_eq!(p.firings[0].body["order"], "o-1");
    // A purchase ends the wait for a click on "pricing"; a sign-up does not.
    let cancels = |e: &Map<String, Value>| {
        plan(&r, e)
            .timers
            .iter()
            .filter(|op| matches!(op, TimerOp::Cancel { rule: 2, .. }))
            .count()
    };
    assert_eq!(cancels(&conv("purchase", "spring")), 1);
    assert_eq!(cancels(&conv("signup", "spring")), 0);
    assert_eq!(cancels(&conv("purchase", "autumn")), 0);
    // kind belongs to converted rules only.
    let bad = Settings::from_toml(
        &format!(
            "{BASE}\n[[workflows]]\nname = \"x\"\non = \"clicked\"\nkind = \"purchase\"\nwebhook = \"http://127.0.0.1:9/h\"\n"
        ),
        Vec::new(),
    );
    assert!(bad
        .unwrap_err()
        .to_string()
        .contains("kind applies to converted"));
}

//! Conversions and ROI: a campaign delivered to smtp-sink; people click (their redirects
//! carry `pc=<click id>`), a link scanner clicks another's link; the shop posts conversions
//! by click id and by address, with retries of the same order, a forged click id, the
//! scanner's click id, a transactional message's click id and an address that never
//! clicked. Revenue, counts and ROI come out exactly, each order is counted once, and one
//! `converted` event is written per attributed order; a workflow's `converted` webhook
//! (purchases only) reaches the CRM once per order.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use common::track::*;
use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "api-token-9c1e5a7b3d2f4e6a80";

/// The click id a redirect appended (`pc=…`), checking where it went in the URL.
fn click_id(location: &str) -> String {
    let (before, id) = location.split_once("pc=").expect("a pc parameter");
    assert!(before.ends_with('?') || before.ends_with('&'), "{location}");
    let id = id.split(['&', '#']).next().unwrap().to_string();
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
        "{id}"
    );
    id
}

/// Clicks `path` as `ua` from `from` (X-Forwarded-For) and returns the click id.
fn click(port: u16, path: &str, from: &str) -> String {
    let r = request(
        port,
        "GET",
        path,
        &[("User-Agent", MAIL_UA), ("X-Forwarded-For", from)],
        b"",
    );
    assert_eq!(r.status, 302, "{}", r.text());
    click_id(r.header("location").unwrap())
}

fn converted(conn: &mut redis::Connection, prefix: &str) -> Vec<Value> {
    events(conn, prefix)
        .into_iter()
        .filter(|e| e["type"] == "converted")
        .collect()
}

#[test]
fn conversions_are_attributed_once_each_with_exact_revenue_and_roi() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let (api, mport, crm) = (free_port(), free_port(), free_port());
    let crm_got = crate::webhooks::receiver(crm, 0);
    let (setup, port, base) = tracking_setup(
        &redis.url(),
        sink.port,
        "click_param = \"pc\"\nscanner_networks = [\"203.0.113.0/24\"]\ntrust_forwarded = true",
        &format!(
            "[api]\nlisten = \"127.0.0.1:{api}\"\ntoken = \"{TOKEN}\"\n\
             [metrics]\nlisten = \"127.0.0.1:{mport}\"\n\
             [conversions]\nwindow = \"7d\"\nmax_items = 20\n\
             [webhooks]\nsecret = \"{}\"\n\
             [[workflows]]\nname = \"crm\"\non = \"converted\"\nkind = \"purchase\"\n\
             webhook = \"http://127.0.0.1:{crm}/orders\"\n",
            crate::webhooks::HOOK_SECRET
        ),
    );
    let p = setup.prefix.clone();
    let cfg = setup.config.to_str().unwrap().to_string();
    let mut conn = redis.conn();
    enqueue_raw(
        &mut conn,
        &p,
        &[
            news("n-ann", "shop", "ann@conv.test"),
            news("n-bo", "shop", "bo@conv.test"),
            news("n-cy", "shop", "cy@conv.test"),
            news("n-dee", "shop", "dee@conv.test"),
            json!({"id": "r-eve", "campaign": "receipts", "template": "receipt", "to": "eve@conv.test", "transactional": true, "data": {"name": "Eve", "order_id": "A-1", "total": "7 EUR", "tracking_url": "https://parcels.example/t/A-1#status"}}).to_string(),
        ],
    );
    let daemon = Daemon::spawn(&setup.config);
    wait_terminal(&mut conn, &p, 5, Duration::from_secs(30), Some(&daemon));
    wait_port("127.0.0.1", port, Duration::from_secs(5));
    wait_port("127.0.0.1", api, Duration::from_secs(5));
    sink.wait_count(5, Duration::from_secs(10));
    let mails = captured(&sink, &base);

    // Ann clicks "pricing", Bo another link; a scanner (its address range) clicks Cy's;
    // Eve clicks her receipt's link. Dee never clicks.
    let person = "198.51.100.7";
    let ann = click(port, &mails["n-ann"].clicks[8], person);
    click(port, &mails["n-bo"].clicks[0], person);
    let scanner = click(port, &mails["n-cy"].clicks[0], "203.0.113.9");
    let eve = click(port, &mails["r-eve"].clicks[0], person);
    // The redirect keeps the target's own query and fragment, the id added before the fragment.
    let r = get(port, &mails["n-ann"].clicks[8], MAIL_UA);
    let loc = r.header("location").unwrap();
    assert!(
        !loc.contains('#') || loc.find("pc=") < loc.find('#'),
        "{loc}"
    );
    // Every click id differs, even of the same link.
    assert_ne!(click_id(loc), ann);
    // The people's clicks are recorded (the address attribution reads them).
    wait_tracking(&mut conn, &p, "n-ann", 1);
    wait_tracking(&mut conn, &p, "n-bo", 1);
    wait_tracking(&mut conn, &p, "n-cy", 1);

    // What the campaign cost: by the API (EUR) and the command line (USD).
    let a = api_call(
        api,
        "PUT",
        "/api/v1/campaigns/shop/cost",
        Some(TOKEN),
        br#"{"amount": 80, "currency": "EUR"}"#,
    );
    assert_eq!(a.status, 200, "{}", a.raw);
    assert_eq!(a.body["amount"], 80.0);
    let (st, _, err) = paloma(
        &["campaign", "cost", "--config", &cfg, "shop", "50", "USD"],
        None,
    );
    assert!(st.success(), "{err}");
    let bad = api_call(
        api,
        "PUT",
        "/api/v1/campaigns/shop/cost",
        Some(TOKEN),
        br#"{"amount": -5, "currency": "EUR"}"#,
    );
    assert_eq!(bad.status, 422, "{}", bad.raw);

    // A forged click id: Ann's, one character changed.
    let mut forged = ann.clone().into_bytes();
    let i = forged.len() - 5;
    forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    let body = json!([
        {"id": "o-1", "click": ann, "value": 59.90, "currency": "EUR"},
        {"id": "o-2", "to": "Bo@conv.test", "value": "40.10", "currency": "EUR"},
        {"id": "o-3", "click": scanner, "value": 10, "currency": "EUR"},
        {"id": "o-4", "click": forged, "value": 10, "currency": "EUR"},
        {"id": "o-5", "to": "dee@conv.test", "value": 5, "currency": "EUR"},
        {"id": "o-6", "click": eve, "value": 7, "currency": "EUR"},
        {"id": "o-7", "to": "bo@conv.test", "kind": "support_request"},
        {"id": "o-8", "to": "ann@conv.test", "value": 1000, "currency": "JPY"},
        {"id": "o-1", "click": ann, "value": 59.90, "currency": "EUR"},
        {"id": "bad-1", "to": "ann@conv.test", "value": 1, "currency": "EU"},
        {"id": "bad-2", "to": "ann@conv.test", "value": -1, "currency": "EUR"},
        {"id": "bad-3", "to": "ann@conv.test", "value": 1, "currency": "EUR", "at": "2099-01-01T00:00:00Z"},
        {"id": "bad-4", "to": "ann@conv.test", "value": 0.001, "currency": "EUR"},
    ])
    .to_string();
    let a = api_call(
        api,
        "POST",
        "/api/v1/conversions",
        Some(TOKEN),
        body.as_bytes(),
    );
    assert_eq!(a.status, 200, "{}", a.raw);
    let b = &a.body;
    assert_eq!(
        (b["accepted"].as_u64(), b["refused"].as_u64()),
        (Some(9), Some(4)),
        "{b:#}"
    );
    assert_eq!(
        (
            b["attributed"].as_u64(),
            b["unattributed"].as_u64(),
            b["duplicates"].as_u64()
        ),
        (Some(4), Some(4), Some(1)),
        "{b:#}"
    );
    let r: Vec<&Value> = b["results"].as_array().unwrap().iter().collect();
    assert_eq!(r[0]["status"], "attributed");
    assert_eq!(
        (&r[0]["by"], &r[0]["campaign"], &r[0]["job"], &r[0]["link"]),
        (
            &json!("click"),
            &json!("shop"),
            &json!("n-ann"),
            &json!("pricing")
        )
    );
    assert_eq!(r[0]["value"], 59.9);
    assert_eq!(r[0]["touch"], "1");
    assert_eq!(
        (&r[1]["status"], &r[1]["by"], &r[1]["job"]),
        (&json!("attributed"), &json!("to"), &json!("n-bo"))
    );
    let reasons: Vec<&Value> = [2, 3, 4, 5].iter().map(|&i| &r[i]["reason"]).collect();
    assert_eq!(
        reasons,
        vec![
            &json!("machine_click"),
            &json!("unknown_click"),
            &json!("no_click"),
            &json!("transactional")
        ]
    );
    assert!(r[2..6].iter().all(|x| x["status"] == "unattributed"));
    assert_eq!(
        (&r[6]["status"], &r[6]["kind"]),
        (&json!("attributed"), &json!("support_request"))
    );
    assert!(r[6].get("value").is_none());
    assert_eq!(
        (&r[7]["job"], &r[7]["currency"]),
        (&json!("n-ann"), &json!("JPY"))
    );
    assert_eq!(
        (&r[8]["duplicate"], &r[8]["job"]),
        (&json!(true), &json!("n-ann"))
    );
    for (i, why) in [
        (9, "ISO 4217"),
        (10, "negative"),
        (11, "future"),
        (12, "more decimals"),
    ] {
        assert_eq!(r[i]["accepted"], false);
        assert!(r[i]["error"].as_str().unwrap().contains(why), "{:#}", r[i]);
    }

    // The shop retries the whole request: nothing counted again, the same answers.
    let again = api_call(
        api,
        "POST",
        "/api/v1/conversions",
        Some(TOKEN),
        body.as_bytes(),
    );
    assert_eq!(again.status, 200, "{}", again.raw);
    assert_eq!(again.body["duplicates"], 9, "{:#}", again.body);
    assert_eq!(again.body["attributed"], 0);
    assert_eq!(again.body["results"][1]["by"], "to");
    assert_eq!(again.body["results"][2]["reason"], "machine_click");

    // The figures, exactly: 59.90 + 40.10 EUR, 1000 JPY; ROI (100 − 80) / 80 in EUR, and
    // −1 in USD (a cost, no revenue); none in JPY (no cost).
    let c = api_call(api, "GET", "/api/v1/campaigns/shop", Some(TOKEN), b"");
    assert_eq!(c.status, 200, "{}", c.raw);
    let f = &c.body["conversions"];
    assert_eq!(
        (f["count"].as_i64(), f["people"].as_i64()),
        (Some(4), Some(2)),
        "{f:#}"
    );
    assert_eq!(f["revenue"], json!({"EUR": 100.0, "JPY": 1000.0}), "{f:#}");
    assert_eq!(f["cost"], json!({"EUR": 80.0, "USD": 50.0}), "{f:#}");
    assert_eq!(f["roi"], json!({"EUR": 0.25, "USD": -1.0}), "{f:#}");
    // Ann's order by click and her JPY order by address both came through "pricing".
    assert_eq!(f["link"]["pricing"]["count"], 2, "{f:#}");
    assert_eq!(
        f["link"]["pricing"]["revenue"],
        json!({"EUR": 59.9, "JPY": 1000.0}),
        "{f:#}"
    );
    assert_eq!(f["kind"]["purchase"]["count"], 3, "{f:#}");
    assert_eq!(f["kind"]["support_request"]["count"], 1, "{f:#}");
    assert_eq!(f["touch"]["1"]["count"], 4, "{f:#}");
    // `paloma stats --json` and its text say the same.
    let (st, out, err) = paloma(&["stats", "--config", &cfg, "--json"], None);
    assert!(st.success(), "{err}");
    let o: Value = serde_json::from_str(&out).unwrap();
    let shop = o["campaigns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["campaign"] == "shop")
        .unwrap();
    assert_eq!(&shop["conversions"], f);
    let (_, text, _) = paloma(&["stats", "--config", &cfg], None);
    assert!(
        text.contains("100.00 EUR, 1000 JPY") && text.contains("25.0% EUR"),
        "{text}"
    );

    // Touches: the four conversions came from first touches (200 EUR… per delivered).
    let (st, out, err) = paloma(
        &[
            "stats",
            "--config",
            &cfg,
            "--touches",
            "--campaign",
            "shop",
            "--json",
        ],
        None,
    );
    assert!(st.success(), "{err}");
    let rows: Value = serde_json::from_str(&out).unwrap();
    let first = &rows[0];
    assert_eq!(
        (&first["bucket"], &first["recipients"]),
        (&json!("1"), &json!(4)),
        "{rows:#}"
    );
    assert_eq!(
        (&first["conversions"], &first["conversion_rate"]),
        (&json!(4), &json!(1.0))
    );
    assert_eq!(first["revenue"], json!({"EUR": 100.0, "JPY": 1000.0}));
    assert_eq!(
        first["revenue_per_delivered"],
        json!({"EUR": 25.0, "JPY": 250.0})
    );
    let (_, text, _) = paloma(&["stats", "--config", &cfg, "--touches"], None);
    assert!(text.contains("25.0000 EUR"), "{text}");

    // One `converted` event per attributed order, with the order's fields.
    let evs = converted(&mut conn, &p);
    let mut by_order: HashMap<String, Vec<&Value>> = HashMap::new();
    for e in &evs {
        by_order
            .entry(e["order"].as_str().unwrap().to_string())
            .or_default()
            .push(e);
    }
    assert_eq!(by_order.len(), 4, "{evs:#?}");
    assert!(by_order.values().all(|v| v.len() == 1), "{evs:#?}");
    let o1 = by_order["o-1"][0];
    assert_eq!(
        (
            &o1["id"],
            &o1["campaign"],
            &o1["to"],
            &o1["link"],
            &o1["kind"],
            &o1["value"],
            &o1["currency"]
        ),
        (
            &json!("n-ann"),
            &json!("shop"),
            &json!("ann@conv.test"),
            &json!("pricing"),
            &json!("purchase"),
            &json!(59.9),
            &json!("EUR")
        )
    );
    assert!(by_order["o-7"][0].get("value").is_none());
    assert!(!evs.iter().any(is_terminal));

    // The metrics.
    let m = metrics_text(mport);
    assert!(
        m.contains("paloma_conversions_total{campaign=\"shop\",kind=\"purchase\"} 3"),
        "{m}"
    );
    assert!(
        m.contains("paloma_revenue_total{campaign=\"shop\",currency=\"EUR\"} 100"),
        "{m}"
    );
    assert!(m.contains("paloma_conversions_unattributed_total{reason=\"machine_click\"} 1"));

    // The CRM hears of each purchase once (not of the support request), retries included.
    wait_until("the purchases' webhooks", Duration::from_secs(20), || {
        crm_got.lock().unwrap().len() >= 3
    });
    // Every converted event read and nothing waiting for a retry: no webhook is still to
    // come, so a duplicate would be here by now.
    wait_until(
        "the workflow engine caught up and no webhook waits",
        Duration::from_secs(20),
        || {
            rules_done(&mut conn, &p)
                && redis::cmd("ZCARD")
                    .arg(format!("{p}webhooks"))
                    .query::<usize>(&mut conn)
                    .unwrap()
                    == 0
        },
    );
    let hooks: Vec<Value> = crm_got
        .lock()
        .unwrap()
        .iter()
        .map(|(_, body)| serde_json::from_str(body).unwrap())
        .collect();
    let mut orders: Vec<&str> = hooks.iter().map(|h| h["order"].as_str().unwrap()).collect();
    orders.sort_unstable();
    assert_eq!(orders, ["o-1", "o-2", "o-8"], "{hooks:#?}");
    assert!(hooks
        .iter()
        .all(|h| h["type"] == "converted" && h["workflow"] == "crm" && h["kind"] == "purchase"));

    // Keys another tool wrote with another type: that conversion alone is refused (its
    // order key) or finds no click (the recipient's), the rest of the request is recorded.
    redis::cmd("HSET")
        .arg(format!("{p}conv:o-taken"))
        .arg("x")
        .arg("1")
        .query::<()>(&mut conn)
        .unwrap();
    redis::cmd("SET")
        .arg(format!("{p}r:odd@conv.test"))
        .arg("x")
        .query::<()>(&mut conn)
        .unwrap();
    let a = api_call(
        api,
        "POST",
        "/api/v1/conversions",
        Some(TOKEN),
        json!([
            {"id": "o-taken", "to": "bo@conv.test", "value": 1, "currency": "EUR"},
            {"id": "o-odd", "to": "odd@conv.test", "value": 1, "currency": "EUR"},
        ])
        .to_string()
        .as_bytes(),
    );
    assert_eq!(a.status, 200, "{}", a.raw);
    assert_eq!(a.body["results"][0]["accepted"], false, "{}", a.raw);
    assert!(a.body["results"][0]["error"]
        .as_str()
        .unwrap()
        .contains("WRONGTYPE"));
    assert_eq!(a.body["results"][1]["reason"], "no_click", "{}", a.raw);

    // Refusals of a whole request.
    let many: Vec<Value> = (0..21)
        .map(|i| json!({"id": format!("m-{i}"), "to": "ann@conv.test", "value": 1, "currency": "EUR"}))
        .collect();
    let a = api_call(
        api,
        "POST",
        "/api/v1/conversions",
        Some(TOKEN),
        json!(many).to_string().as_bytes(),
    );
    assert_eq!(a.status, 413, "{}", a.raw);
    let a = api_call(api, "POST", "/api/v1/conversions", Some(TOKEN), b"{oops");
    assert_eq!(a.status, 400, "{}", a.raw);
    let a = api_call(
        api,
        "POST",
        "/api/v1/conversions",
        Some(TOKEN),
        br#"{"id": "x", "to": "ann@conv.test"}"#,
    );
    assert_eq!(a.status, 422, "{}", a.raw);
    let a = api_call(api, "POST", "/api/v1/conversions", None, b"{}");
    assert_eq!(a.status, 401);
    drop(daemon);
}

/// An A/B test decided on revenue: variant b's readers buy often at about 50 EUR; a's
/// seldom, one of them a 5,000 EUR order that makes a's plain revenue the higher. The test
/// (on ln(1 + revenue) per delivered message) picks b, and the rest go out as b.
#[test]
fn an_experiment_is_decided_on_revenue_not_on_one_large_order() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let api = free_port();
    let (setup, port, base) = tracking_setup(
        &redis.url(),
        sink.port,
        "click_param = \"pc\"",
        &format!(
            "[api]\nlisten = \"127.0.0.1:{api}\"\ntoken = \"{TOKEN}\"\n\
             [[experiments]]\ncampaign = \"sale\"\n\
             variants = [ {{ name = \"a\" }}, {{ name = \"b\", subject = \"Last days\" }} ]\n\
             test_share = \"50%\"\ndecide_after = \"30s\"\nmetric = \"revenue\"\n\
             currency = \"EUR\"\nfallback = \"a\"\n"
        ),
    );
    let p = setup.prefix.clone();
    let n = 600;
    let to: Vec<String> = (0..n).map(|i| format!("p{i}@sale.test")).collect();
    let jobs: Vec<String> = to
        .iter()
        .enumerate()
        .map(|(i, t)| news(&format!("sale-{i}"), "sale", t))
        .collect();
    let daemon = Daemon::spawn(&setup.config);
    let mut conn = redis.conn();
    enqueue_raw(&mut conn, &p, &jobs);
    wait_until_daemon(
        "the test share delivered, the rest held",
        Duration::from_secs(60),
        &daemon,
        || {
            let d = stat(&mut conn, &p, "sale", "delivered");
            d > 0 && d as usize + held(&mut conn, &p, "sale") == n
        },
    );
    wait_port("127.0.0.1", api, Duration::from_secs(5));
    let delivered = stat(&mut conn, &p, "sale", "delivered") as usize;
    assert_eq!(
        sink.wait_count(delivered, Duration::from_secs(10)),
        delivered
    );
    let mails = captured(&sink, &base);
    let variant_of: HashMap<String, String> = events(&mut conn, &p)
        .into_iter()
        .filter(|e| e["type"] == "delivered")
        .map(|e| {
            (
                e["id"].as_str().unwrap().to_string(),
                e["variant"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut orders = Vec::new();
    let mut plain: HashMap<&str, f64> = HashMap::new();
    let mut whale = false;
    for (id, m) in &mails {
        let i: usize = id.trim_start_matches("sale-").parse().unwrap();
        let v = variant_of[id].as_str();
        let value = match v {
            "b" if i.is_multiple_of(2) => 45.0 + (i % 12) as f64,
            "a" if i.is_multiple_of(10) && !whale => {
                whale = true;
                5000.0
            }
            "a" if i.is_multiple_of(10) => 45.0 + (i % 12) as f64,
            _ => continue,
        };
        let pc = click(port, &m.clicks[0], "198.51.100.7");
        *plain.entry(if v == "a" { "a" } else { "b" }).or_default() += value;
        orders.push(
            json!({"id": format!("order-{i}"), "click": pc, "value": value, "currency": "EUR"}),
        );
    }
    assert!(whale && plain["a"] > plain["b"], "{plain:?}");
    for chunk in orders.chunks(20) {
        let a = api_call(
            api,
            "POST",
            "/api/v1/conversions",
            Some(TOKEN),
            json!(chunk).to_string().as_bytes(),
        );
        assert_eq!(a.status, 200, "{}", a.raw);
        assert_eq!(a.body["attributed"], chunk.len(), "{}", a.raw);
    }
    // The test's clock: the window started 31 s ago.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    redis::cmd("HSET")
        .arg(format!("{p}experiment:sale"))
        .arg("started")
        .arg(now - 31_000)
        .query::<()>(&mut conn)
        .unwrap();
    let d = wait_for_daemon(
        "experiment_decided",
        Duration::from_secs(20),
        &daemon,
        || {
            events(&mut conn, &p)
                .into_iter()
                .find(|e| e["type"] == "experiment_decided")
        },
    );
    assert_eq!(
        (&d["winner"], &d["significant"], &d["metric"]),
        (&json!("b"), &json!(true), &json!("revenue")),
        "{d:#}"
    );
    let a = d["variants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["variant"] == "a")
        .unwrap();
    let b = d["variants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["variant"] == "b")
        .unwrap();
    assert!(
        a["rate"].as_f64() > b["rate"].as_f64(),
        "a's plain revenue per delivered is the higher: {d:#}"
    );
    wait_until_daemon("all delivered", Duration::from_secs(60), &daemon, || {
        stat(&mut conn, &p, "sale", "delivered") == n as i64
    });
    // The figures per variant.
    let c = api_call(api, "GET", "/api/v1/campaigns/sale", Some(TOKEN), b"");
    let f = &c.body["conversions"]["variant"];
    let sum: f64 = ["a", "b"]
        .iter()
        .map(|v| f[*v]["revenue"]["EUR"].as_f64().unwrap())
        .sum();
    assert!((sum - (plain["a"] + plain["b"])).abs() < 1e-9, "{f:#}");
}

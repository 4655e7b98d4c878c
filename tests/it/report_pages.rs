//! The campaign report in a real browser: headless Chromium, driven over WebDriver by
//! chromedriver (Debian's chromium and chromium-driver, which `scripts/install-test-peers` installs), loads the
//! pages of a campaign this test has just sent (smtp-sink), clicked and opened (the
//! tracking server), and decided (an experiment picked by hand), with the shop's orders
//! by the people who clicked and the campaign's cost (revenue and ROI). It signs in through the
//! form with the read-only report token, checks what each page shows, and keeps a
//! screenshot of each in target/report-screenshots/. Over plain HTTP: a page without a
//! session goes to the form, a forged cookie opens nothing, the report token opens no API
//! route, and every page forbids scripts.

use crate::common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::track::{api_call, captured, request, MAIL_UA};
use common::*;
use fantoccini::{Client, ClientBuilder, Locator};

const TOKEN: &str = "report-api-token-61d0f3b2a9c4e857";
const REPORT: &str = "report-read-only-9e2b7c41d8a6f053";

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn shots_dir() -> std::path::PathBuf {
    let d = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/report-screenshots");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Types `token` into the sign-in form and submits it; returns the text of `next`, an element
/// only the page it leads to has (each navigation is waited for by such an element).
async fn sign_in(c: &Client, token: &str, next: &str) -> String {
    c.find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys(token)
        .await
        .unwrap();
    c.find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.wait()
        .for_element(Locator::Css(next))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The text of the element `css` on the page shown now.
async fn text_of(c: &Client, css: impl AsRef<str>) -> String {
    c.find(Locator::Css(css.as_ref()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[test]
fn a_person_reads_the_campaign_report_in_a_browser() {
    require(BROWSER);
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let (track, api) = (free_port(), free_port());
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        "",
        &format!(
            r#"listen = "127.0.0.1:{track}"
[api]
listen = "127.0.0.1:{api}"
token = "{TOKEN}"
report_token = "{REPORT}"
[[experiments]]
campaign = "spring"
variants = [ {{ name = "a" }}, {{ name = "b", subject = "Last days, {{{{first_name}}}}" }} ]
test_share = "50%"
decide_after = "1h"
fallback = "a"
"#
        ),
    );
    let p = setup.prefix.clone();
    let cfg = setup.config.to_str().unwrap().to_string();
    let daemon = Daemon::spawn(&setup.config);
    let mut conn = redis.conn();
    let domains = ["north.test", "south.test", "east.test"];
    let jobs: Vec<String> = (0..60)
        .map(|i| {
            job(
                &format!("spring-{i}"),
                "spring",
                "newsletter",
                &format!("p{i}@{}", domains[i % 3]),
                newsletter_data("Ana"),
            )
        })
        .collect();
    enqueue_raw(&mut conn, &p, &jobs);
    // The test half goes out; b is picked by hand; the rest follows.
    wait_until_daemon(
        "the test half out",
        Duration::from_secs(60),
        &daemon,
        || {
            held(&mut conn, &p, "spring") > 0
                && terminal_events(&mut conn, &p).len() + held(&mut conn, &p, "spring") == 60
        },
    );
    let (st, _, err) = paloma(
        &["experiment", "pick", "--config", &cfg, "spring", "b"],
        None,
    );
    assert!(st.success(), "{err}");
    let evs = wait_terminal(&mut conn, &p, 60, Duration::from_secs(60), Some(&daemon));
    assert_eq!(evs.iter().filter(|e| e["type"] == "delivered").count(), 60);
    sink.wait_count(60, Duration::from_secs(30));
    // People open 20 and click a named link in 12.
    let mails = captured(&sink, "https://t.shop.test");
    for i in 0..20 {
        let m = &mails[&format!("spring-{i}")];
        assert_eq!(
            request(track, "GET", &m.pixel, &[("User-Agent", MAIL_UA)], b"").status,
            200
        );
        if i < 12 {
            let link = m.clicks.iter().find(|c| !c.is_empty()).unwrap();
            assert_eq!(
                request(track, "GET", link, &[("User-Agent", MAIL_UA)], b"").status,
                302
            );
        }
    }
    wait_until_daemon(
        "opens and clicks recorded",
        Duration::from_secs(20),
        &daemon,
        || {
            let evs = events(&mut conn, &p);
            evs.iter().filter(|e| e["type"] == "opened").count() == 20
                && evs.iter().filter(|e| e["type"] == "clicked").count() == 12
        },
    );
    // The twelve who clicked buy for 25.00 EUR each; the campaign cost 100 EUR.
    let orders: Vec<serde_json::Value> = (0..12)
        .map(|i| {
            serde_json::json!({"id": format!("r-{i}"), "to": format!("p{i}@{}", domains[i % 3]),
                "value": "25.00", "currency": "EUR"})
        })
        .collect();
    let a = api_call(
        api,
        "POST",
        "/api/v1/conversions",
        Some(TOKEN),
        serde_json::json!(orders).to_string().as_bytes(),
    );
    assert_eq!(a.body["attributed"], 12, "{}", a.raw);
    let a = api_call(
        api,
        "PUT",
        "/api/v1/campaigns/spring/cost",
        Some(TOKEN),
        br#"{"amount": 100, "currency": "EUR"}"#,
    );
    assert_eq!(a.status, 200, "{}", a.raw);

    // Over plain HTTP first.
    let r = request(api, "GET", "/campaigns/spring", &[], b"");
    assert_eq!(r.status, 303);
    assert_eq!(r.header("location"), Some("/login?next=/campaigns/spring"));
    let forged = request(
        api,
        "GET",
        "/campaigns",
        &[("Cookie", "paloma_report=00ff")],
        b"",
    );
    assert_eq!(forged.status, 303);
    let raw = request(
        api,
        "GET",
        "/campaigns",
        &[("Authorization", &format!("Bearer {REPORT}"))],
        b"",
    );
    assert_eq!(raw.status, 200);
    assert!(raw
        .header("content-security-policy")
        .unwrap()
        .contains("default-src 'none'"));
    assert!(!raw.text().contains("<script"), "no script on a page");
    let api_with_report = request(
        api,
        "GET",
        "/api/v1/campaigns",
        &[("Authorization", &format!("Bearer {REPORT}"))],
        b"",
    );
    assert_eq!(
        api_with_report.status, 401,
        "the report token opens no API route"
    );
    let bad = request(
        api,
        "POST",
        "/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        b"token=wrong&next=%2Fcampaigns",
    );
    assert_eq!(bad.status, 401);

    // In the browser.
    let port = free_port();
    let _driver = Driver(
        Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver"),
    );
    wait_port("127.0.0.1", port, Duration::from_secs(30));
    let profile = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1100,1800",
                    format!("--user-data-dir={}", profile.path().display())],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let c = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a WebDriver session");
        let base = format!("http://127.0.0.1:{api}");

        // No session: the form. A wrong token first, then the report token.
        c.goto(&format!("{base}/campaigns")).await.unwrap();
        c.wait().for_element(Locator::Css("#token")).await.unwrap();
        assert!(c.current_url().await.unwrap().path().starts_with("/login"));
        let alert = sign_in(&c, "not-the-token", "[role=alert]").await;
        assert!(alert.contains("does not open"), "{alert}");
        let table = sign_in(&c, REPORT, "#campaigns").await;
        // The spring row: 60 enqueued and 60 delivered, as cells of that row.
        let row: Vec<&str> = table
            .lines()
            .find(|l| l.starts_with("spring"))
            .unwrap_or_else(|| panic!("no spring row: {table}"))
            .split_whitespace()
            .collect();
        assert!(row.iter().filter(|w| **w == "60").count() >= 2, "{row:?}");
        // tracking.base_url is https here: the browser holds the session as Secure (and
        // would never send it over plain HTTP to another host).
        let session = c.get_named_cookie("paloma_report").await.unwrap();
        assert_eq!(
            (session.secure(), session.http_only()),
            (Some(true), Some(true)),
            "{session:?}"
        );
        std::fs::write(
            shots_dir().join("campaigns.png"),
            c.screenshot().await.unwrap(),
        )
        .unwrap();

        c.find(Locator::LinkText("spring"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        c.wait().for_element(Locator::Css("#funnel")).await.unwrap();
        assert_eq!(c.current_url().await.unwrap().path(), "/campaigns/spring");
        let step = |name: &str| text_of(&c, format!("#funnel [data-step={name}] .n"));
        assert_eq!(step("enqueued").await, "60");
        assert!(step("delivered").await.starts_with("60"));
        assert!(
            step("opened").await.starts_with("20"),
            "{}",
            step("opened").await
        );
        assert!(
            step("clicked").await.starts_with("12 (20.0%)"),
            "{}",
            step("clicked").await
        );
        assert!(
            step("converted").await.starts_with("12 (20.0%)"),
            "{}",
            step("converted").await
        );
        let revenue = text_of(&c, "#revenue").await;
        assert!(revenue.contains("300.00 EUR"), "{revenue}");
        let roi = text_of(&c, "#roi").await;
        assert!(roi.contains("200.0% EUR"), "{roi}");
        let timeline = c.find(Locator::Css("#timeline svg")).await.unwrap();
        assert!(timeline.html(false).await.unwrap().contains("opens"));
        let links = text_of(&c, "#links").await;
        // The clicked link with its 12 people's clicks, as a cell of its row.
        assert!(
            links
                .lines()
                .any(|l| l.split_whitespace().any(|w| w == "12")),
            "{links}"
        );
        let variants = text_of(&c, "#variants").await;
        assert!(variants.contains("b ★ winner"), "{variants}");
        let decision = text_of(&c, "#decision").await;
        assert!(decision.contains("Decided: b (manual)"), "{decision}");
        let domains = text_of(&c, "#domains").await;
        for d in ["north.test", "south.test", "east.test"] {
            assert!(domains.contains(&format!("{d} 20")), "{domains}");
        }
        let touches = c.find(Locator::Css("#touches")).await.unwrap();
        // Everyone was at their first touch: the "1" bucket holds the 60 recipients.
        let touch_text = touches.text().await.unwrap();
        assert!(
            touch_text.lines().any(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.first() == Some(&"1") && w.contains(&"60")
            }),
            "{touch_text}"
        );
        assert!(touches.find(Locator::Css("svg")).await.is_ok());
        // Readable on a phone: nothing wider than the screen but the scrolling tables.
        c.set_window_size(390, 844).await.unwrap();
        let overflow = c
            .execute(
                "return document.documentElement.scrollWidth <= window.innerWidth + 1;",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(
            overflow,
            serde_json::Value::Bool(true),
            "the page overflows a phone's width"
        );
        std::fs::write(
            shots_dir().join("campaign-phone.png"),
            c.screenshot().await.unwrap(),
        )
        .unwrap();
        c.set_window_size(1100, 1800).await.unwrap();
        std::fs::write(
            shots_dir().join("campaign.png"),
            c.screenshot().await.unwrap(),
        )
        .unwrap();
        c.close().await.unwrap();
    });
}

//! Contact pressure against a real daemon, Redis, smtp-sink and the tracking server: four
//! campaigns, one after another, reach 40, 30, 20 and 10 of the same people, so each
//! campaign's sends are their recipients' 1st, 2nd, 3rd and 4th marketing message of the
//! year. People click in the 4th, unsubscribe in the 3rd; `paloma stats --touches` shows
//! each level with its recipients and rates, a transactional message counts for nothing,
//! and clicks are counted at the level of the send they came from.

use crate::common;

use std::time::Duration;

use common::track::{captured, one_click, request, stat, MAIL_UA};
use common::*;
use serde_json::Value;

fn row<'a>(rows: &'a Value, bucket: &str) -> &'a Value {
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["bucket"] == bucket)
        .unwrap()
}

#[test]
fn the_curve_counts_each_send_at_its_level_of_contact_pressure() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let track = free_port();
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        "",
        &format!("listen = \"127.0.0.1:{track}\"\n"),
    );
    let p = setup.prefix.clone();
    let cfg = setup.config.to_str().unwrap().to_string();
    let daemon = Daemon::spawn(&setup.config);
    let mut conn = redis.conn();
    // A receipt first: transactional mail is not marketing pressure.
    let receipt = serde_json::json!({"id": "r-0", "campaign": "receipts", "template": "receipt",
        "to": "p0@people.test", "transactional": true, "data": {"name": "R", "order_id": 1}});
    enqueue_raw(&mut conn, &p, &[receipt.to_string()]);
    wait_until_daemon("the receipt", Duration::from_secs(30), &daemon, || {
        stat(&mut conn, &p, "receipts", "delivered") == 1
    });
    for (k, n) in [(1, 40), (2, 30), (3, 20), (4, 10)] {
        let campaign = format!("c{k}");
        let jobs: Vec<String> = (0..n)
            .map(|i| {
                job(
                    &format!("{campaign}-{i}"),
                    &campaign,
                    "newsletter",
                    &format!("p{i}@people.test"),
                    newsletter_data("Ana"),
                )
            })
            .collect();
        enqueue_raw(&mut conn, &p, &jobs);
        wait_until_daemon(
            &format!("{campaign} delivered"),
            Duration::from_secs(60),
            &daemon,
            || stat(&mut conn, &p, &campaign, "delivered") == n,
        );
    }
    sink.wait_count(101, Duration::from_secs(30));
    let mails = captured(&sink, "https://t.shop.test");
    // Half the 4th campaign's people click; two of the 3rd's unsubscribe.
    for i in 0..5 {
        let m = &mails[&format!("c4-{}", i * 2)];
        let r = request(track, "GET", &m.clicks[0], &[("User-Agent", MAIL_UA)], b"");
        assert_eq!(r.status, 302);
    }
    for i in [1, 7] {
        let m = &mails[&format!("c3-{i}")];
        assert_eq!(one_click(track, &m.unsubscribe).status, 200);
    }
    wait_until_daemon(
        "clicks and unsubscribes recorded",
        Duration::from_secs(20),
        &daemon,
        || {
            let evs = events(&mut conn, &p);
            evs.iter().filter(|e| e["type"] == "clicked").count() == 5
                && evs.iter().filter(|e| e["type"] == "unsubscribed").count() == 2
        },
    );

    let (st, out, err) = paloma(&["stats", "--config", &cfg, "--touches", "--json"], None);
    assert!(st.success(), "{err}");
    let rows: Value = serde_json::from_str(&out).unwrap();
    for (bucket, recipients) in [
        ("1", 40),
        ("2", 30),
        ("3", 20),
        ("4-6", 10),
        ("7-12", 0),
        ("13+", 0),
    ] {
        assert_eq!(
            row(&rows, bucket)["recipients"],
            recipients,
            "{bucket}: {rows}"
        );
    }
    assert_eq!(row(&rows, "4-6")["clicked"], 5, "{rows}");
    assert_eq!(row(&rows, "4-6")["click_rate"], 0.5);
    assert_eq!(row(&rows, "1")["clicked"], 0);
    assert_eq!(row(&rows, "3")["unsubscribed"], 2);
    assert_eq!(row(&rows, "3")["unsubscribe_rate"], 0.1);
    // One campaign alone.
    let (_, out, _) = paloma(
        &[
            "stats",
            "--config",
            &cfg,
            "--touches",
            "--campaign",
            "c2",
            "--json",
        ],
        None,
    );
    let rows: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(row(&rows, "2")["recipients"], 30);
    assert_eq!(row(&rows, "1")["recipients"], 0);
    // The table, and the recipient's own counter (the receipt not in it).
    let (st, out, _) = paloma(&["stats", "--config", &cfg, "--touches"], None);
    assert!(
        st.success() && out.contains("4-6") && out.contains("50.00%"),
        "{out}"
    );
    // (The hash also holds text: the person's last human click, for conversions.)
    let months: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(format!("{p}r:p0@people.test"))
        .query(&mut conn)
        .unwrap();
    let sent: i64 = months
        .iter()
        .filter(|(k, _)| k.starts_with("t:"))
        .map(|(_, v)| v.parse::<i64>().unwrap())
        .sum();
    assert_eq!(sent, 4, "{months:?}");
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("{p}r:p0@people.test"))
        .query(&mut conn)
        .unwrap();
    assert!(ttl > 30_000_000, "the recipient's hash is kept: {ttl}");

    // A recipient key that another tool wrote as a string neither stalls the claim nor
    // loses its batch-mates' counts: its job goes out at level 1, p0's counts on.
    let _: () = redis::cmd("SET")
        .arg(format!("{p}r:odd@people.test"))
        .arg("not a hash")
        .query(&mut conn)
        .unwrap();
    let jobs: Vec<String> = ["odd@people.test", "p0@people.test"]
        .iter()
        .enumerate()
        .map(|(i, to)| {
            job(
                &format!("c5-{i}"),
                "c5",
                "newsletter",
                to,
                newsletter_data("Ana"),
            )
        })
        .collect();
    enqueue_raw(&mut conn, &p, &jobs);
    wait_until_daemon("c5 delivered", Duration::from_secs(30), &daemon, || {
        stat(&mut conn, &p, "c5", "delivered") == 2
    });
    let (_, out, _) = paloma(
        &[
            "stats",
            "--config",
            &cfg,
            "--touches",
            "--campaign",
            "c5",
            "--json",
        ],
        None,
    );
    let rows: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(row(&rows, "1")["recipients"], 1, "{rows}");
    assert_eq!(row(&rows, "4-6")["recipients"], 1, "{rows}");
    // (The hash also holds text: the person's last human click, for conversions.)
    let months: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(format!("{p}r:p0@people.test"))
        .query(&mut conn)
        .unwrap();
    let sent: i64 = months
        .iter()
        .filter(|(k, _)| k.starts_with("t:"))
        .map(|(_, v)| v.parse::<i64>().unwrap())
        .sum();
    assert_eq!(sent, 5, "{months:?}");
}

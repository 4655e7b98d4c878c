//! Operator controls end to end (issue #25): `paloma queue` shows what waits by reason,
//! campaign and destination (scheduled `send_at` jobs, retries after a receiver's 4xx,
//! shaping, a paused campaign's parked jobs), as text, `--json` and `GET /api/v1/queue`;
//! `paloma bounce` counts without `--yes`, ends every matching waiting job with exactly
//! one `bounced` event of class `admin` with `--yes` (never suppressing the address, the
//! others untouched and later delivered), and with `--for` bounces new matching jobs
//! before they reach the receiver until the directive is lifted; `POST /api/v1/bounces`
//! does the same, and refuses a body naming neither or both.

use crate::common;

use std::time::Duration;

use common::track::api_call;
use common::*;
use serde_json::Value;

const TOKEN: &str = "ops-token-0c5a9e2f7b31d4886a";

fn zcard(conn: &mut redis::Connection, key: &str) -> usize {
    redis::cmd("ZCARD").arg(key).query(conn).unwrap()
}

fn in_an_hour() -> String {
    (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339()
}

/// A receipt job `id` of `campaign` to `to`, with a `send_at` when given.
fn job_at(id: &str, campaign: &str, to: &str, send_at: Option<&str>) -> String {
    let mut j = serde_json::json!({
        "id": id, "campaign": campaign, "template": "receipt", "to": to,
        "data": {"name": "R", "order_id": 1},
    });
    if let Some(t) = send_at {
        j["send_at"] = Value::from(t);
    }
    j.to_string()
}

fn queue_json(cfg: &str, extra: &[&str]) -> Value {
    let mut args = vec!["queue", "--config", cfg, "--json"];
    args.extend_from_slice(extra);
    let (st, out, err) = paloma(&args, None);
    assert!(st.success(), "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn group<'a>(v: &'a Value, list: &str, name: &str) -> &'a Value {
    v[list]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {list}: {v}"))
}

fn bounced_admin(evs: &[Value]) -> Vec<&Value> {
    evs.iter()
        .filter(|e| e["type"] == "bounced" && e["class"] == "admin")
        .collect()
}

#[test]
fn queue_and_admin_bounce_end_to_end() {
    let redis = Redis::start();
    // Every RCPT answered 4xx: a job attempted now waits for its retry.
    let mut sink = Sink::start(&["-r", "RCPT"]);
    let port = free_port();
    let metrics = free_port();
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "retry_intervals = [\"1h\"]\nmax_age = \"1d\"",
        "",
        &format!(
            "[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n[api]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"{TOKEN}\"\n[[domains]]\nmatch = \"g.test\"\nrate = \"1/h\"\n"
        ),
    );
    let p = setup.prefix.clone();
    let cfg = setup.config.to_str().unwrap().to_string();
    let scheduled = format!("{p}scheduled");
    let mut conn = redis.conn();
    // A paused campaign's job parks.
    let (st, _, err) = paloma(&["campaign", "pause", "--config", &cfg, "winter"], None);
    assert!(st.success(), "{err}");
    let daemon = Daemon::spawn(&setup.config);
    wait_port("127.0.0.1", port, Duration::from_secs(30));

    let later = in_an_hour();
    let mut all = Vec::new();
    for i in 0..3 {
        all.push(job_at(
            &format!("sp-{i}"),
            "spring",
            &format!("u{i}@a.test"),
            Some(&later),
        ));
    }
    for i in 0..2 {
        all.push(job_at(
            &format!("au-{i}"),
            "autumn",
            &format!("u{i}@b.test"),
            Some(&later),
        ));
    }
    for i in 0..2 {
        all.push(job_at(
            &format!("su-{i}"),
            "summer",
            &format!("u{i}@c.test"),
            None,
        ));
    }
    for i in 0..3 {
        all.push(job_at(
            &format!("ga-{i}"),
            "gamma",
            &format!("u{i}@g.test"),
            None,
        ));
    }
    all.push(job_at("wi-0", "winter", "w@a.test", None));
    enqueue_raw(&mut conn, &p, &all);
    wait_until_daemon(
        "ten jobs in the delayed set and one parked",
        Duration::from_secs(30),
        &daemon,
        || {
            zcard(&mut conn, &scheduled) == 10
                && zcard(&mut conn, &format!("{p}parked:winter")) == 1
        },
    );
    assert!(
        events(&mut conn, &p).iter().all(|e| !is_terminal(e)),
        "nothing ended yet"
    );

    // paloma queue, as JSON.
    let v = queue_json(&cfg, &[]);
    assert_eq!(v["waiting"], 11, "{v}");
    assert_eq!(v["reasons"]["scheduled"], 5, "{v}");
    assert_eq!(v["reasons"]["paused"], 1, "{v}");
    let retry = v["reasons"]["retry"].as_u64().unwrap_or(0);
    let shaping = v["reasons"]["shaping"].as_u64().unwrap_or(0);
    assert!(retry >= 3 && shaping >= 1 && retry + shaping == 5, "{v}");
    assert_eq!(group(&v, "campaigns", "spring")["reasons"]["scheduled"], 3);
    assert_eq!(group(&v, "campaigns", "summer")["reasons"]["retry"], 2);
    assert_eq!(group(&v, "campaigns", "winter")["reasons"]["paused"], 1);
    assert!(group(&v, "campaigns", "gamma")["reasons"]["shaping"].as_u64() >= Some(1));
    let a = group(&v, "destinations", "a.test");
    assert_eq!(
        (a["waiting"].as_u64(), a["reasons"]["paused"].as_u64()),
        (Some(4), Some(1))
    );
    assert_eq!(group(&v, "destinations", "g.test")["waiting"], 3);
    assert!(v["earliest_due"].as_str().unwrap().ends_with('Z'));
    assert_eq!(v["ready"], 0);
    // --limit: the top destinations, the rest counted.
    let top = queue_json(&cfg, &["--limit", "1"]);
    assert_eq!(top["destinations"].as_array().unwrap().len(), 1);
    assert_eq!(top["destinations"][0]["name"], "a.test");
    assert_eq!(top["destinations_omitted"], 3);
    assert_eq!(top["destinations_omitted_jobs"], 7);
    // The text.
    let (st, text, err) = paloma(&["queue", "--config", &cfg], None);
    assert!(st.success(), "{err}");
    for want in [
        "waiting: 11",
        "scheduled 5",
        "paused 1",
        "spring",
        "g.test",
        "shaping",
    ] {
        assert!(text.contains(want), "{want:?} not in:\n{text}");
    }
    // The API answers the same.
    let api = api_call(port, "GET", "/api/v1/queue", Some(TOKEN), b"");
    assert_eq!(api.status, 200, "{}", api.raw);
    assert_eq!(api.body["reasons"], v["reasons"]);
    assert_eq!(api.body["campaigns"], v["campaigns"]);
    assert_eq!(
        api_call(port, "GET", "/api/v1/queue", None, b"").status,
        401
    );

    // A dry run changes nothing.
    let (st, out, err) = paloma(&["bounce", "--config", &cfg, "--domain", "a.test"], None);
    assert!(st.success(), "{err}");
    assert!(out.contains("would bounce 4"), "{out}");
    assert!(err.contains("--yes"), "{err}");
    assert_eq!(zcard(&mut conn, &scheduled), 10);
    assert!(bounced_admin(&events(&mut conn, &p)).is_empty());

    // --yes: every waiting job to a.test (delayed and parked) ends bounced, admin, once.
    let (st, out, err) = paloma(
        &["bounce", "--config", &cfg, "--domain", "A.test", "--yes"],
        None,
    );
    assert!(st.success(), "{err}");
    assert!(
        out.contains("bounced (admin) 4 waiting jobs (3 delayed, 1 parked, 0 held)"),
        "{out}"
    );
    let evs = events(&mut conn, &p);
    let b = bounced_admin(&evs);
    assert_eq!(b.len(), 4, "{evs:?}");
    for e in &b {
        assert!(e["to"].as_str().unwrap().ends_with("@a.test"), "{e}");
        assert_eq!(e["code"], 550);
        assert_eq!(
            e["response"],
            "550 5.0.0 bounced by an operator (paloma bounce --domain a.test)"
        );
    }
    assert_eq!(zcard(&mut conn, &scheduled), 7);
    assert_eq!(zcard(&mut conn, &format!("{p}parked:winter")), 0);
    let suppressed: Option<String> = redis::cmd("HGET")
        .arg(format!("{p}suppressed"))
        .arg("u0@a.test")
        .query(&mut conn)
        .unwrap();
    assert_eq!(suppressed, None, "an admin bounce never suppresses");
    let stats: std::collections::HashMap<String, i64> = redis::cmd("HGETALL")
        .arg(format!("{p}stats:spring"))
        .query(&mut conn)
        .unwrap();
    assert_eq!(
        (stats.get("bounced"), stats.get("accepted")),
        (Some(&3), Some(&3))
    );
    // Again: nothing left to bounce.
    let (st, out, _) = paloma(
        &["bounce", "--config", &cfg, "--domain", "a.test", "--yes"],
        None,
    );
    assert!(st.success() && out.contains("bounced (admin) 0"), "{out}");
    assert_eq!(bounced_admin(&events(&mut conn, &p)).len(), 4);

    // The API: a body naming neither or both is refused; a campaign is bounced.
    for body in [&b"{}"[..], br#"{"domain":"b.test","campaign":"autumn"}"#] {
        let r = api_call(port, "POST", "/api/v1/bounces", Some(TOKEN), body);
        assert_eq!(r.status, 422, "{}", r.raw);
        assert!(
            r.body["error"].as_str().unwrap().contains("exactly one"),
            "{}",
            r.raw
        );
    }
    let r = api_call(port, "POST", "/api/v1/bounces", Some(TOKEN), b"{nope");
    assert_eq!(r.status, 400, "{}", r.raw);
    let r = api_call(
        port,
        "POST",
        "/api/v1/bounces",
        Some(TOKEN),
        br#"{"campaign":"autumn","for":"10m"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(
        (r.body["total"].as_u64(), r.body["delayed"].as_u64()),
        (Some(2), Some(2)),
        "{}",
        r.raw
    );
    assert!(r.body["until"].as_str().unwrap().ends_with('Z'));
    assert_eq!(bounced_admin(&events(&mut conn, &p)).len(), 6);

    // --for: new jobs to d.test end bounced before they reach the receiver.
    let (st, out, err) = paloma(
        &[
            "bounce", "--config", &cfg, "--domain", "d.test", "--for", "10m", "--yes",
        ],
        None,
    );
    assert!(st.success(), "{err}");
    assert!(out.contains("bounced until"), "{out}");
    let (st, out, _) = paloma(&["bounce", "--config", &cfg, "--list"], None);
    assert!(st.success());
    assert!(
        out.contains("domain d.test until") && out.contains("campaign autumn until"),
        "{out}"
    );
    wait_until_daemon(
        "the daemon sees both directives",
        Duration::from_secs(10),
        &daemon,
        || metric(metrics, "paloma_bounce_directives") == 2.0,
    );
    // The receiver is healthy from now on: what is not bounced is delivered.
    sink.restart(&[]);
    enqueue_raw(
        &mut conn,
        &p,
        &[
            job_at("new-d", "fresh", "x@d.test", None),
            job_at("new-au", "autumn", "x@e.test", None),
            job_at("new-e", "fresh", "y@e.test", None),
        ],
    );
    let evs = wait_for_daemon(
        "the three new jobs end",
        Duration::from_secs(30),
        &daemon,
        || {
            let evs = events(&mut conn, &p);
            let by_id = terminal_by_id(&evs);
            ["new-d", "new-au", "new-e"]
                .iter()
                .all(|id| by_id.contains_key(*id))
                .then_some(evs)
        },
    );
    let by_id = terminal_by_id(&evs);
    assert_eq!(by_id["new-d"][0]["class"], "admin", "{:?}", by_id["new-d"]);
    assert_eq!(
        by_id["new-au"][0]["class"], "admin",
        "{:?}",
        by_id["new-au"]
    );
    assert!(by_id["new-au"][0]["response"]
        .as_str()
        .unwrap()
        .contains("--campaign autumn"));
    assert_eq!(by_id["new-e"][0]["type"], "delivered");
    assert_eq!(
        sink.wait_count(1, Duration::from_secs(10)),
        1,
        "only new-e reached the receiver"
    );

    // Lifted: d.test is sent to again.
    let (st, _, err) = paloma(
        &["bounce", "--config", &cfg, "--domain", "d.test", "--cancel"],
        None,
    );
    assert!(st.success() && err.contains("lifted"), "{err}");
    wait_until_daemon(
        "the daemon sees one directive",
        Duration::from_secs(10),
        &daemon,
        || metric(metrics, "paloma_bounce_directives") == 1.0,
    );
    enqueue_raw(
        &mut conn,
        &p,
        &[job_at("new-d2", "fresh", "z@d.test", None)],
    );

    // The untouched waiting jobs (retries, shaping) go out once due: brought forward here.
    let members: Vec<Vec<u8>> = redis::cmd("ZRANGE")
        .arg(&scheduled)
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .unwrap();
    assert_eq!(members.len(), 5, "summer's two retries and gamma's three");
    for m in &members {
        let _: () = redis::cmd("ZADD")
            .arg(&scheduled)
            .arg("XX")
            .arg(0)
            .arg(m.as_slice())
            .query(&mut conn)
            .unwrap();
    }
    // 4 + 2 + 2 bounced by hand or directive, new-e, new-d2, summer's 2 (gamma's three
    // are paced by its 1/h rate: one at most goes now).
    let evs = wait_for_daemon(
        "summer's retries and new-d2 delivered",
        Duration::from_secs(30),
        &daemon,
        || {
            let evs = events(&mut conn, &p);
            let by_id = terminal_by_id(&evs);
            ["su-0", "su-1", "new-d2"]
                .iter()
                .all(|id| by_id.get(*id).is_some_and(|t| t[0]["type"] == "delivered"))
                .then_some(evs)
        },
    );
    let by_id = terminal_by_id(&evs);
    assert!(
        by_id.values().all(|t| t.len() == 1),
        "one terminal event per job: {by_id:?}"
    );
    assert_eq!(bounced_admin(&evs).len(), 8);
    // The API lists and lifts the directive left.
    let list = api_call(port, "GET", "/api/v1/bounces", Some(TOKEN), b"");
    assert_eq!(list.status, 200, "{}", list.raw);
    assert_eq!(
        list.body["directives"].as_array().unwrap().len(),
        1,
        "{}",
        list.raw
    );
    assert_eq!(list.body["directives"][0]["target"], "autumn");
    let body = br#"{"campaign":"autumn"}"#;
    let r = api_call(port, "DELETE", "/api/v1/bounces", Some(TOKEN), body);
    assert_eq!(
        (r.status, r.body["lifted"].as_bool()),
        (200, Some(true)),
        "{}",
        r.raw
    );
    let r = api_call(port, "DELETE", "/api/v1/bounces", Some(TOKEN), body);
    assert_eq!(r.body["lifted"], false, "{}", r.raw);
    let list = api_call(port, "GET", "/api/v1/bounces", Some(TOKEN), b"");
    assert_eq!(list.body["directives"], serde_json::json!([]));
    assert!(by_id
        .keys()
        .all(|id| !id.starts_with("ga-") || by_id[id][0]["type"] == "delivered"));
}

/// `paloma bounce` racing the daemons that move the same jobs out of the delayed set as
/// they fall due: each job ends exactly once, delivered or bounced (admin), and no bounced
/// job reaches the receiver.
#[test]
fn a_bounce_racing_the_scheduler_ends_each_job_once() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let setup = Setup::new(&redis.url(), sink.port, "", "", "");
    let p = setup.prefix.clone();
    let cfg = setup.config.to_str().unwrap().to_string();
    let mut conn = redis.conn();
    let daemons: Vec<Daemon> = (0..2).map(|_| Daemon::spawn(&setup.config)).collect();
    // 1,500 jobs falling due over about three seconds, from two seconds on.
    let start = chrono::Utc::now() + chrono::Duration::seconds(2);
    let n = 1500;
    let all: Vec<String> = (0..n)
        .map(|i| {
            let at = (start + chrono::Duration::milliseconds(2 * i as i64)).to_rfc3339();
            job_at(
                &format!("r-{i}"),
                "race",
                &format!("u{i}@race.test"),
                Some(&at),
            )
        })
        .collect();
    enqueue_raw(&mut conn, &p, &all);
    wait_until_daemon(
        "the first deliveries",
        Duration::from_secs(30),
        &daemons[0],
        || {
            events(&mut conn, &p)
                .iter()
                .any(|e| e["type"] == "delivered")
        },
    );
    let (st, out, err) = paloma(
        &["bounce", "--config", &cfg, "--domain", "race.test", "--yes"],
        None,
    );
    assert!(st.success(), "{err}");
    let evs = wait_terminal(&mut conn, &p, n, Duration::from_secs(60), Some(&daemons[0]));
    let by_id = terminal_by_id(&evs);
    assert_eq!(by_id.len(), n);
    assert!(
        by_id.values().all(|t| t.len() == 1),
        "one terminal event per job"
    );
    let bounced = bounced_admin(&evs).len();
    let delivered = evs.iter().filter(|e| e["type"] == "delivered").count();
    assert_eq!(bounced + delivered, n, "{out}");
    eprintln!("race: {delivered} delivered, {bounced} bounced");
    assert!(
        out.contains(&format!("bounced (admin) {bounced} ")),
        "{out} vs {bounced}"
    );
    assert_eq!(
        sink.wait_count(delivered, Duration::from_secs(10)),
        delivered,
        "only the delivered ones reached the receiver"
    );
    assert_eq!(zcard(&mut conn, &format!("{p}scheduled")), 0);
}

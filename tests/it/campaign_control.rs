//! Campaign control across a fleet: three daemons on one Redis deliver two campaigns,
//! paced by a shared rate. `spring` is paused mid-way (nothing of it reaches the sink past
//! the pause's grace, its remaining jobs park), then resumed (the rest delivered, each
//! exactly once); `autumn` is cancelled mid-way (every job not yet sent ends `suppressed`
//! with reason `cancelled`, none delivered after, and the counts add up).

use crate::common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn of(evs: &[Value], campaign: &str) -> Vec<Value> {
    evs.iter()
        .filter(|e| e["campaign"] == campaign)
        .cloned()
        .collect()
}

fn count(evs: &[Value], kind: &str) -> usize {
    evs.iter().filter(|e| e["type"] == kind).count()
}

fn parked(conn: &mut redis::Connection, prefix: &str, campaign: &str) -> usize {
    redis::cmd("ZCARD")
        .arg(format!("{prefix}parked:{campaign}"))
        .query::<usize>(conn)
        .unwrap()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn pause_resume_and_cancel_across_three_daemons() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        "",
        "[[domains]]\nmatch = \"spring.test\"\nrate = \"40/s\"\n[[domains]]\nmatch = \"autumn.test\"\nrate = \"20/s\"\n",
    );
    let cfg = setup.config.to_str().unwrap().to_string();
    let daemons: Vec<Daemon> = (0..3).map(|_| Daemon::spawn(&setup.config)).collect();
    let mut conn = redis.conn();
    let mut all = jobs(200, "spring", "spring.test");
    all.extend(jobs(100, "autumn", "autumn.test"));
    enqueue_raw(&mut conn, &setup.prefix, &all);

    // Pause spring once some of it is out.
    wait_for_daemon(
        "40 spring deliveries",
        Duration::from_secs(60),
        &daemons[0],
        || {
            (count(
                &of(&events(&mut conn, &setup.prefix), "spring"),
                "delivered",
            ) >= 40)
                .then_some(())
        },
    );
    let (st, _, err) = paloma(&["campaign", "pause", "--config", &cfg, "spring"], None);
    assert!(st.success(), "{err}");
    let paused_at = now_ms();
    // Cancel autumn too, mid-way.
    let (st, _, err) = paloma(&["campaign", "cancel", "--config", &cfg, "autumn"], None);
    assert!(
        !st.success(),
        "cancel without --yes and no terminal asks first"
    );
    assert!(err.contains("--yes"), "{err}");
    let (st, _, err) = paloma(
        &["campaign", "cancel", "--config", &cfg, "autumn", "--yes"],
        None,
    );
    assert!(st.success(), "{err}");
    let cancelled_at = now_ms();

    // Every spring job is now delivered or parked; every autumn job has ended.
    let t = Instant::now();
    wait_for_daemon(
        "spring parked, autumn ended",
        Duration::from_secs(60),
        &daemons[0],
        || {
            let evs = events(&mut conn, &setup.prefix);
            let spring = count(&of(&evs, "spring"), "delivered");
            let autumn = of(&evs, "autumn").iter().filter(|e| is_terminal(e)).count();
            (spring + parked(&mut conn, &setup.prefix, "spring") == 200 && autumn == 100)
                .then_some(())
        },
    );
    let evs = events(&mut conn, &setup.prefix);
    let grace = 2_000;
    for e in of(&evs, "spring")
        .iter()
        .filter(|e| e["type"] == "delivered")
    {
        assert!(
            at_ms(e) <= paused_at + grace,
            "a spring message went out after the pause: {e}"
        );
    }
    let delivered_before = count(&of(&evs, "spring"), "delivered");
    assert!(delivered_before < 200, "the pause came mid-way");
    assert_eq!(
        sink.wait_count(
            delivered_before + count(&of(&evs, "autumn"), "delivered"),
            Duration::from_secs(10)
        ),
        delivered_before + count(&of(&evs, "autumn"), "delivered"),
        "the sink saw exactly what was delivered"
    );
    let autumn = of(&evs, "autumn");
    let cancelled: Vec<&Value> = autumn
        .iter()
        .filter(|e| e["type"] == "suppressed" && e["reason"] == "cancelled")
        .collect();
    assert!(!cancelled.is_empty(), "autumn was cancelled mid-way");
    assert_eq!(
        cancelled.len() + count(&autumn, "delivered"),
        100,
        "every autumn job delivered before the cancel or cancelled"
    );
    for e in autumn.iter().filter(|e| e["type"] == "delivered") {
        assert!(
            at_ms(e) <= cancelled_at + grace,
            "an autumn message went out after the cancel: {e}"
        );
    }
    // A job enqueued for the cancelled campaign ends the same way.
    enqueue_raw(
        &mut conn,
        &setup.prefix,
        &[job(
            "autumn-late",
            "autumn",
            "receipt",
            "late@autumn.test",
            serde_json::json!({"name": "R", "order_id": 1}),
        )],
    );
    let late = wait_for_daemon(
        "the late autumn job ends",
        Duration::from_secs(30),
        &daemons[0],
        || {
            events(&mut conn, &setup.prefix)
                .into_iter()
                .find(|e| e["id"] == "autumn-late" && is_terminal(e))
        },
    );
    assert_eq!(late["type"], "suppressed");
    assert_eq!(late["reason"], "cancelled");
    let (st, out, _) = paloma(&["campaign", "list", "--config", &cfg, "--json"], None);
    assert!(st.success());
    let list: Vec<Value> = serde_json::from_str(&out).unwrap();
    let row = |c: &str| list.iter().find(|r| r["campaign"] == c).cloned().unwrap();
    assert_eq!(row("spring")["state"], "paused");
    assert_eq!(
        row("spring")["parked"].as_u64().unwrap() as usize,
        200 - delivered_before
    );
    assert_eq!(row("autumn")["state"], "cancelled");
    assert_eq!(
        row("autumn")["accepted"].as_i64().unwrap(),
        row("autumn")["delivered"].as_i64().unwrap()
            + row("autumn")["suppressed"].as_i64().unwrap(),
        "autumn's counts add up"
    );

    // Resume spring: the rest goes out, each job exactly once.
    let (st, _, err) = paloma(&["campaign", "resume", "--config", &cfg, "spring"], None);
    assert!(st.success(), "{err}");
    assert!(
        err.contains(&format!("{} parked jobs", 200 - delivered_before)),
        "{err}"
    );
    wait_for_daemon(
        "every spring job delivered",
        Duration::from_secs(90),
        &daemons[0],
        || {
            (count(
                &of(&events(&mut conn, &setup.prefix), "spring"),
                "delivered",
            ) >= 200)
                .then_some(())
        },
    );
    let evs = events(&mut conn, &setup.prefix);
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for e in of(&evs, "spring").iter().filter(|e| is_terminal(e)) {
        assert_eq!(e["type"], "delivered", "{e}");
        *per_id
            .entry(e["id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(per_id.len(), 200);
    assert!(
        per_id.values().all(|&n| n == 1),
        "one terminal event per job"
    );
    let expected = 200 + count(&of(&evs, "autumn"), "delivered");
    assert_eq!(sink.wait_count(expected, Duration::from_secs(10)), expected);
    let mut ids = sink.ids();
    ids.sort();
    let before = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), before, "no message twice at the sink");
    assert_eq!(parked(&mut conn, &setup.prefix, "spring"), 0);
    let _ = t;
}

/// A parked job's age start moves forward by the time it spent parked: `max_age` counts only
/// while its campaign is active.
#[test]
fn resuming_shifts_a_parked_jobs_age_by_the_time_it_waited() {
    let redis = Redis::start();
    let setup = Setup::new(&redis.url(), free_port(), "", "", "");
    let cfg = setup.config.to_str().unwrap().to_string();
    let mut conn = redis.conn();
    let job = r#"{"id":"p-1","campaign":"winter"}"#;
    let parked_at = now_ms() - 3_600_000; // parked an hour ago
    let _: () = redis::cmd("ZADD")
        .arg(format!("{}parked:winter", setup.prefix))
        .arg(parked_at)
        .arg(format!("2|1000|{job}"))
        .query(&mut conn)
        .unwrap();
    let (st, _, err) = paloma(&["campaign", "resume", "--config", &cfg, "winter"], None);
    assert!(st.success(), "{err}");
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("{}scheduled", setup.prefix))
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .unwrap();
    assert_eq!(members.len(), 1);
    let parts: Vec<&str> = members[0].splitn(3, '|').collect();
    assert_eq!(parts[0], "2", "attempts kept");
    assert_eq!(parts[2], job);
    let first_at: i64 = parts[1].parse().unwrap();
    assert!(
        (1000 + 3_600_000..1000 + 3_600_000 + 60_000).contains(&first_at),
        "age start moved by the hour parked: {first_at}"
    );
}

/// Issue 21, point 1: a delayed set that holds only other campaigns' jobs (and an empty
/// one) made `campaign cancel` send an empty pipeline and exit 1 ("empty command") although
/// the campaign was cancelled. Now: exit 0, the counts, and the other jobs left alone.
#[test]
fn cancel_with_no_delayed_job_of_the_campaign_exits_zero() {
    let redis = Redis::start();
    let setup = Setup::new(&redis.url(), free_port(), "", "", "");
    let cfg = setup.config.to_str().unwrap().to_string();
    let mut conn = redis.conn();
    let cancel = |campaign: &str| {
        paloma(
            &["campaign", "cancel", "--config", &cfg, campaign, "--yes"],
            None,
        )
    };
    // Empty Redis: nothing delayed at all.
    let (st, out, err) = cancel("winter");
    assert!(st.success(), "cancel on an empty Redis: {out}{err}");
    // A delayed set of 2,500 jobs (more than one scan page), none of them the campaign's.
    let key = format!("{}scheduled", setup.prefix);
    let due = now_ms() + 3_600_000;
    for chunk in (0..2500).collect::<Vec<_>>().chunks(500) {
        let mut p = redis::pipe();
        for i in chunk {
            let job = job(
                &format!("o-{i}"),
                "other",
                "newsletter",
                &format!("r{i}@other.test"),
                newsletter_data("R"),
            );
            p.cmd("ZADD")
                .arg(&key)
                .arg(due)
                .arg(format!("1|{due}|{job}"));
        }
        p.query::<()>(&mut conn).unwrap();
    }
    let (st, out, err) = cancel("spring");
    assert!(
        st.success(),
        "cancel with only other campaigns delayed: {out}{err}"
    );
    assert!(err.contains("cancelled spring"), "{err}");
    assert!(err.contains("0 delayed brought forward"), "{err}");
    // The other campaign's jobs keep their due time.
    let early: usize = redis::cmd("ZCOUNT")
        .arg(&key)
        .arg("-inf")
        .arg(due - 1)
        .query(&mut conn)
        .unwrap();
    assert_eq!(early, 0, "no job of another campaign was brought forward");
    let state: Option<String> = redis::cmd("HGET")
        .arg(format!("{}campaign_states", setup.prefix))
        .arg("spring")
        .query(&mut conn)
        .unwrap();
    assert_eq!(state.as_deref(), Some("cancelled"));
}

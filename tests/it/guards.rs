//! Guards: a storm of 550 5.1.1 from one destination (smtp-sink `-f RCPT`) trips the bounce
//! guard of the campaign sending there, which pauses by itself once, with a
//! `campaign_paused` event naming the reason and the rate; its remaining jobs park; a
//! campaign to a healthy destination sending at the same time is not paused and ends.
//! (That a resume takes a new baseline is `control::guards`' unit test; that a
//! `campaign_paused` event can tell the CRM is the workflow webhook tests'.)

use crate::common;

use std::time::Duration;

use common::mx::env;
use common::*;

#[test]
fn a_bounce_storm_pauses_only_the_campaign_it_hits() {
    let e = env(
        &[
            "mx-host=storm.test,mx.storm.test,10",
            "host-record=mx.storm.test,127.0.0.6",
            "mx-host=fine.test,mx.fine.test,10",
            "host-record=mx.fine.test,127.0.0.7",
        ],
        &[
            ("127.0.0.6", &["-f", "RCPT", "-B", "550 5.1.1 User unknown"]),
            ("127.0.0.7", &[]),
        ],
        "",
        "[[guards]]\ncampaign = \"*\"\nbounce_rate = \"5%\"\ncomplaint_rate = \"0.3%\"\nmin_sent = 50\n\
         [[domains]]\nmatch = \"storm.test\"\nrate = \"100/s\"\n[[domains]]\nmatch = \"fine.test\"\nrate = \"100/s\"\n",
    );
    let cfg = e.setup.config.to_str().unwrap().to_string();
    let prefix = e.setup.prefix.clone();
    let daemon = Daemon::spawn(&e.setup.config);
    let mut conn = e.redis.conn();
    let mut all = jobs(1000, "storm", "storm.test");
    all.extend(jobs(300, "fine", "fine.test"));
    enqueue_raw(&mut conn, &prefix, &all);
    let paused = wait_for_daemon("the guard trips", Duration::from_secs(60), &daemon, || {
        events(&mut conn, &prefix)
            .into_iter()
            .find(|e| e["type"] == "campaign_paused")
    });
    assert_eq!(paused["campaign"], "storm");
    assert_eq!(paused["reason"], "bounce_rate");
    assert!(paused["bounce_rate"].as_f64().unwrap() > 0.05, "{paused}");
    assert!(paused["attempted"].as_i64().unwrap() >= 50);
    assert!(paused.get("id").is_none(), "it belongs to no job");
    // fine goes on to the end; storm's remaining jobs park.
    wait_for_daemon(
        "fine delivered, storm parked",
        Duration::from_secs(60),
        &daemon,
        || {
            let evs = events(&mut conn, &prefix);
            let fine = evs
                .iter()
                .filter(|e| e["campaign"] == "fine" && e["type"] == "delivered")
                .count();
            let storm_ended = evs
                .iter()
                .filter(|e| e["campaign"] == "storm" && is_terminal(e))
                .count();
            let parked: usize = redis::cmd("ZCARD")
                .arg(format!("{prefix}parked:storm"))
                .query(&mut conn)
                .unwrap();
            (fine == 300 && storm_ended + parked == 1000 && parked > 0).then_some(())
        },
    );
    let evs = events(&mut conn, &prefix);
    assert_eq!(
        evs.iter()
            .filter(|e| e["type"] == "campaign_paused")
            .count(),
        1,
        "paused once"
    );
    let (st, out, _) = paloma(&["campaign", "list", "--config", &cfg, "--json"], None);
    assert!(st.success());
    let list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let state = |c: &str| {
        list.iter()
            .find(|r| r["campaign"] == c)
            .map(|r| r["state"].clone())
            .unwrap()
    };
    assert_eq!(state("storm"), "paused");
    assert_eq!(state("fine"), "active");
    drop(daemon);
}

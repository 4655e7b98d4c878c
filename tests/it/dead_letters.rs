//! Every kind of bad job is dead-lettered with its reason, gets exactly one `dead` event,
//! and the good jobs around it go through.

use crate::common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[test]
fn bad_jobs_are_dead_lettered_while_good_ones_deliver() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let setup = Setup::new(&redis.url(), sink.port, "", "max_job_bytes = 4096", "");
    let mut conn = redis.conn();
    let good = |i: usize| {
        job(
            &format!("good-{i}"),
            "c1",
            "receipt",
            &format!("g{i}@ok.test"),
            json!({"name": "G", "order_id": i}),
        )
    };
    let bad: Vec<(String, &str)> = vec![
        ("{this is not json".into(), "malformed JSON"),
        (r#"["an","array"]"#.into(), "malformed JSON"),
        (json!({"campaign": "c1", "template": "receipt", "to": "a@ok.test"}).to_string(), "missing field `id`"),
        (json!({"id": "b-tpl", "campaign": "c1", "template": "nope", "to": "a@ok.test"}).to_string(), "unknown template"),
        (json!({"id": "b-trav", "campaign": "c1", "template": "../../etc", "to": "a@ok.test"}).to_string(), "invalid `template`"),
        (json!({"id": "b-addr", "campaign": "c1", "template": "receipt", "to": "not an address"}).to_string(), "invalid `to`"),
        (json!({"id": "b-name", "campaign": "c1", "template": "receipt", "to": "a@ok.test", "to_name": "A\r\nBcc: victim@x.test"}).to_string(), "header injection"),
        (json!({"id": "b-hdr", "campaign": "c1", "template": "receipt", "to": "a@ok.test", "headers": {"X-Evil": "1\r\nBcc: victim@x.test"}}).to_string(), "header injection"),
        (json!({"id": "b-from", "campaign": "c1", "template": "receipt", "to": "a@ok.test", "from": "x@y.test\nBcc: v@x.test"}).to_string(), "invalid `from`"),
        (json!({"id": "b-subj", "campaign": "c1", "template": "receipt", "to": "a@ok.test", "data": {"order_id": "1\r\nBcc: v@x.test"}}).to_string(), "header injection"),
        (json!({"id": "b-big", "campaign": "c1", "template": "receipt", "to": "a@ok.test", "data": {"pad": "x".repeat(5000)}}).to_string(), "oversize"),
        (json!({"id": "", "campaign": "c1", "template": "receipt", "to": "a@ok.test"}).to_string(), "invalid `id`"),
    ];
    let mut jobs = Vec::new();
    for (i, (b, _)) in bad.iter().enumerate() {
        jobs.push(good(i));
        jobs.push(b.clone());
    }
    jobs.push(good(bad.len()));
    enqueue_raw(&mut conn, &setup.prefix, &jobs);
    let daemon = Daemon::spawn(&setup.config);
    let total = bad.len() * 2 + 1;
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        total,
        Duration::from_secs(60),
        Some(&daemon),
    );

    let dead_events: Vec<_> = evs.iter().filter(|e| e["type"] == "dead").collect();
    assert_eq!(dead_events.len(), bad.len(), "one dead event per bad job");
    let delivered = evs.iter().filter(|e| e["type"] == "delivered").count();
    assert_eq!(delivered, bad.len() + 1, "every good job delivered");
    assert_eq!(sink.count(), bad.len() + 1);

    let letters = dead_letters(&mut conn, &setup.prefix);
    assert_eq!(letters.len(), bad.len());
    for (job, want) in &bad {
        // Intake-time and render-time rejections land in different orders: match by content.
        let (_, error) = letters
            .iter()
            .find(|(got, _)| got == job)
            .unwrap_or_else(|| panic!("no dead letter keeps the job as received: {job:.80}"));
        assert!(
            error.contains(want),
            "job {job:.60}: error {error:?} should say {want:?}"
        );
    }
    // The injection attempts never reached the wire.
    for raw in sink.dumps() {
        let s = String::from_utf8_lossy(&raw);
        assert!(
            !s.contains("victim@x.test"),
            "injected header reached the sink"
        );
    }
    let e = evs.iter().find(|e| e["id"] == "b-addr").unwrap();
    assert_eq!(e["type"], "dead");
    assert_eq!(e["campaign"], "c1");
    assert!(e["error"].as_str().unwrap().contains("invalid `to`"));

    // The daemon is still alive and serving.
    let more = vec![good(100)];
    enqueue_raw(&mut conn, &setup.prefix, &more);
    wait_terminal(
        &mut conn,
        &setup.prefix,
        total + 1,
        Duration::from_secs(20),
        Some(&daemon),
    );
}

#[test]
fn a_suppression_entry_that_is_not_utf8_does_not_stall_intake() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let setup = Setup::new(&redis.url(), sink.port, "", "", "");
    let mut conn = redis.conn();
    // Written by some other tool: not UTF-8.
    redis::cmd("HSET")
        .arg(format!("{}suppressed", setup.prefix))
        .arg("odd@ok.test")
        .arg(&b"\xff\xfe"[..])
        .query::<()>(&mut conn)
        .unwrap();
    let jobs: Vec<String> = ["a@ok.test", "odd@ok.test", "b@ok.test"]
        .iter()
        .enumerate()
        .map(|(i, to)| job(&format!("u{i}"), "c1", "receipt", to, json!({"name": "U"})))
        .collect();
    enqueue_raw(&mut conn, &setup.prefix, &jobs);
    let daemon = Daemon::spawn(&setup.config);
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        3,
        Duration::from_secs(20),
        Some(&daemon),
    );
    let t = terminal_by_id(&evs);
    assert_eq!(t["u0"][0]["type"], "delivered");
    assert_eq!(t["u2"][0]["type"], "delivered");
    assert_eq!(
        (t["u1"][0]["type"].as_str(), t["u1"][0]["reason"].as_str()),
        (Some("suppressed"), Some("manual")),
        "{evs:?}"
    );
}

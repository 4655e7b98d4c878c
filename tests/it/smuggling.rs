//! SMTP smuggling: merge data holding bare CR or LF (`\r.\r`, the shape that receivers
//! accepting `<CR>.<CR>` take for the end of data) never reaches the wire as such. Every
//! line ending paloma sends in DATA is CRLF, checked on the bytes between paloma and a real
//! smtp-sink.

use crate::common;

use std::time::Duration;

use common::*;

#[test]
fn bare_cr_and_lf_in_merge_data_never_reach_the_wire() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let tap = WireTap::start(sink.port);
    let templates =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/templates");
    let setup = Setup::new(&redis.url(), tap.port, "", "", "");
    let cfg = std::fs::read_to_string(&setup.config).unwrap().replace(
        &repo_templates().display().to_string(),
        &templates.display().to_string(),
    );
    std::fs::write(&setup.config, cfg).unwrap();
    let mut conn = redis.conn();
    let hostile = [
        "a\r.\rMAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\nforged",
        "lone\rcr and lone\nlf and \n.\n dot",
        "\r\n.\r\nQUIT\r\n",
        "tail ends in a bare CR\r",
    ];
    let jobs: Vec<String> = hostile
        .iter()
        .enumerate()
        .map(|(i, b)| {
            job(
                &format!("s{i}"),
                "smuggle",
                "raw",
                &format!("r{i}@x.test"),
                serde_json::json!({"body": b, "line": "x"}),
            )
        })
        .collect();
    enqueue_raw(&mut conn, &setup.prefix, &jobs);
    let daemon = Daemon::spawn(&setup.config);
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        jobs.len(),
        Duration::from_secs(20),
        Some(&daemon),
    );
    for e in evs.iter().filter(|e| is_terminal(e)) {
        assert_eq!(e["type"], "delivered", "{e}");
    }
    assert_eq!(
        sink.count(),
        jobs.len(),
        "one message each, nothing smuggled"
    );
    let wire: Vec<u8> = tap.sent().concat();
    assert!(!wire.is_empty());
    for (i, &b) in wire.iter().enumerate() {
        if b == b'\r' {
            assert_eq!(
                wire.get(i + 1),
                Some(&b'\n'),
                "bare CR at {i}: {:?}",
                String::from_utf8_lossy(&wire[i.saturating_sub(40)..(i + 40).min(wire.len())])
            );
        }
        if b == b'\n' {
            assert!(
                i > 0 && wire[i - 1] == b'\r',
                "bare LF at {i}: {:?}",
                String::from_utf8_lossy(&wire[i.saturating_sub(40)..(i + 40).min(wire.len())])
            );
        }
    }
    // Each message ended where paloma ended it: the forged terminator became a stuffed
    // dot, so the sink got exactly one transaction per job and none for the victim.
    let text = String::from_utf8_lossy(&wire);
    assert_eq!(
        text.matches("\r\n.\r\n").count(),
        jobs.len(),
        "one end of data per message"
    );
    assert!(
        text.contains("\r\n..\r\nMAIL FROM:<evil@x.test>"),
        "the hostile line is data, dot-stuffed"
    );
}

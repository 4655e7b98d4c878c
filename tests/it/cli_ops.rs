//! The command line and the operations endpoint: `paloma enqueue` (JSON lines from stdin,
//! CSV from a file), `paloma stats`, `/metrics`, `/healthz`, `/readyz`; relay options
//! (TLS required against a server without STARTTLS; SMTP AUTH).

use crate::common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;

fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    (code, out)
}

#[test]
fn enqueue_stats_and_metrics() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let mport = free_port();
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        "",
        &format!("[metrics]\nlisten = \"127.0.0.1:{mport}\""),
    );
    let cfg = setup.config.to_str().unwrap();

    // JSON lines on stdin; one line is not JSON: reported with its number, exit code 1.
    let lines = (0..5)
        .map(|i| {
            job(
                &format!("j{i}"),
                "jsonl",
                "receipt",
                &format!("j{i}@x.test"),
                serde_json::json!({"name": "J", "order_id": i}),
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    let (st, _, err) = paloma(
        &["enqueue", "--config", cfg, "-"],
        // A byte-order mark before the first line (spreadsheet exports) is not an error.
        Some(&format!("\u{feff}{lines}\n{{broken\n")),
    );
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(
        err.contains("line 6") && err.contains("enqueued 5 jobs, rejected 1"),
        "{err}"
    );

    // CSV: the email column is `to`, the others are data; ids are campaign:email, or
    // campaign:sha256(email) where that would pass 200 characters. The file starts with a
    // byte-order mark.
    let csv = setup.path("list.csv");
    let long = format!(
        "{}@{}.{}.{}.test",
        "l".repeat(64),
        "a".repeat(60),
        "b".repeat(60),
        "c".repeat(60)
    );
    std::fs::write(
        &csv,
        format!("\u{feff}\"email\",\"name\",order_id\nana@x.test,Ana,A1\n\"bo@x.test\",\"Bo, Jr.\",B2\n{long},Long,C3\n"),
    )
    .unwrap();
    let (st, _, err) = paloma(
        &[
            "enqueue",
            "--config",
            cfg,
            "--csv",
            "--campaign",
            "csv",
            "--template",
            "receipt",
            csv.to_str().unwrap(),
        ],
        None,
    );
    assert!(st.success(), "{err}");
    let (st, _, err) = paloma(
        &["enqueue", "--config", cfg, "--csv", csv.to_str().unwrap()],
        None,
    );
    assert!(
        !st.success(),
        "--csv without --campaign/--template is refused: {err}"
    );

    let daemon = Daemon::spawn(&setup.config);
    let mut conn = redis.conn();
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        8,
        Duration::from_secs(30),
        Some(&daemon),
    );
    let long_id = evs
        .iter()
        .find(|e| e["to"] == long.as_str())
        .expect("the long address was enqueued")["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        long_id.len() == 4 + 64 && long_id.starts_with("csv:"),
        "{long_id}"
    );
    let bo = evs
        .iter()
        .find(|e| e["id"] == "csv:bo@x.test")
        .expect("deterministic CSV id");
    assert_eq!(bo["type"], "delivered");
    let dumps = sink.dumps();
    assert!(
        dumps
            .iter()
            .any(|d| String::from_utf8_lossy(d).contains("Hi Bo, Jr.,")),
        "CSV columns became data"
    );

    let (st, out, _) = paloma(&["stats", "--config", cfg], None);
    assert!(st.success());
    let row = out
        .lines()
        .find(|l| l.starts_with("jsonl"))
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        row.split_whitespace().collect::<Vec<_>>(),
        ["jsonl", "0", "5", "0", "0", "0", "0", "0"],
        "{out}"
    );

    wait_port("127.0.0.1", mport, Duration::from_secs(5));
    let (code, body) = http_get(mport, "/metrics");
    assert_eq!(code, 200);
    for m in [
        "paloma_jobs_read_total 8",
        "paloma_messages_total{campaign=\"csv\",outcome=\"delivered\"} 3",
        "paloma_render_seconds_bucket",
        "paloma_smtp_seconds_bucket",
        "paloma_in_flight",
        "paloma_queue_lag_seconds",
    ] {
        assert!(body.contains(m), "/metrics lacks {m}:\n{body}");
    }
    assert_eq!(http_get(mport, "/healthz").0, 200);
    assert_eq!(http_get(mport, "/readyz").0, 200);
    assert_eq!(http_get(mport, "/nope").0, 404);
}

#[test]
fn enqueue_reports_each_bad_row_with_its_line_and_enqueues_the_good_ones() {
    let redis = Redis::start();
    let setup = Setup::new(&redis.url(), free_port(), "", "", "");
    let cfg = setup.config.to_str().unwrap();
    let csv = setup.path("bad-rows.csv");
    std::fs::write(
        &csv,
        "email,name,order_id\nok1@x.test,A,1\nnot-an-address,B,2\nok2@x.test,C\nok3@x.test,D,4\n",
    )
    .unwrap();
    let (st, _, err) = paloma(
        &[
            "enqueue",
            "--config",
            cfg,
            "--csv",
            "--campaign",
            "rows",
            "--template",
            "receipt",
            csv.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(st.code(), Some(1), "{err}");
    let line = |n: usize| {
        err.lines()
            .find(|l| l.starts_with(&format!("line {n}:")))
            .unwrap_or_else(|| panic!("no report of line {n}: {err}"))
            .to_string()
    };
    assert!(line(3).contains("`to`"), "the invalid address: {err}");
    assert!(
        line(4).contains("2 column(s), the header row has 3"),
        "the missing column: {err}"
    );
    assert!(
        !err.contains("line 2:") && !err.contains("line 5:"),
        "{err}"
    );
    assert!(err.contains("enqueued 2 jobs, rejected 2"), "{err}");

    // JSON lines: a template the templates directory lacks, and an address the intake
    // would refuse, are reported with their lines; the good job is enqueued.
    let lines = [
        job(
            "t1",
            "rows",
            "no-such-template",
            "a@x.test",
            serde_json::json!({}),
        ),
        job(
            "t2",
            "rows",
            "receipt",
            "b@x.test",
            serde_json::json!({"name": "B"}),
        ),
        job("t3", "rows", "receipt", "c@@x", serde_json::json!({})),
    ]
    .join("\n");
    let (st, _, err) = paloma(&["enqueue", "--config", cfg, "-"], Some(&lines));
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(
        err.contains("line 1: unknown template \"no-such-template\"") && err.contains("receipt"),
        "{err}"
    );
    assert!(err.contains("line 3:") && err.contains("`to`"), "{err}");
    assert!(err.contains("enqueued 1 jobs, rejected 2"), "{err}");

    let mut conn = redis.conn();
    let ids: Vec<String> = redis::cmd("XRANGE")
        .arg(format!("{}sends", setup.prefix))
        .arg("-")
        .arg("+")
        .query::<Vec<(String, Vec<(String, String)>)>>(&mut conn)
        .unwrap()
        .into_iter()
        .map(|(_, f)| {
            let v: serde_json::Value = serde_json::from_str(&f[0].1).unwrap();
            v["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids, ["rows:ok1@x.test", "rows:ok3@x.test", "t2"]);
}

/// With no redis-server to be found and no way to install one, `paloma demo` stops at once
/// with one line that says what to run.
#[test]
fn the_demo_says_how_to_get_redis_when_it_cannot_install_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_paloma"))
        .args(["demo", "--dir"])
        .arg(dir.path().join("demo"))
        .env("PATH", dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("redis-server is not installed")
            && err.contains("apt-get install redis-server")
            && err.contains("--redis-url"),
        "{err}"
    );
}

#[test]
fn tls_required_defers_when_the_relay_offers_no_starttls() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let setup = Setup::new(&redis.url(), sink.port, "", "", "");
    let cfg = std::fs::read_to_string(&setup.config)
        .unwrap()
        .replace("tls = \"none\"", "tls = \"required\"");
    std::fs::write(&setup.config, cfg).unwrap();
    let mut conn = redis.conn();
    enqueue_raw(
        &mut conn,
        &setup.prefix,
        &[job(
            "t1",
            "tls",
            "receipt",
            "a@x.test",
            serde_json::json!({}),
        )],
    );
    let daemon = Daemon::spawn(&setup.config);
    let e = wait_for_daemon("a deferral", Duration::from_secs(15), &daemon, || {
        events(&mut conn, &setup.prefix)
            .into_iter()
            .find(|e| e["type"] == "deferred")
    });
    assert!(
        e["response"]
            .as_str()
            .unwrap()
            .contains("STARTTLS required"),
        "{e}"
    );
    assert_eq!(sink.count(), 0, "nothing sent in clear text");
}

#[test]
fn smtp_auth_credentials_come_from_config_or_environment() {
    let redis = Redis::start();
    // aiosmtpd, requiring AUTH but not TLS: a relay on the same host, `tls = "none"`.
    let certs = tempfile::tempdir().unwrap();
    let (_, cert, key) = private_ca(certs.path());
    let relay = AuthRelay::start_clear(&cert, &key, "paloma", "s3cret-pass");
    let setup = Setup::new(&redis.url(), relay.port, "username = \"paloma\"", "", "");
    let mut conn = redis.conn();
    enqueue_raw(
        &mut conn,
        &setup.prefix,
        &[job(
            "a1",
            "auth",
            "receipt",
            "a@x.test",
            serde_json::json!({"name": "A"}),
        )],
    );
    // The password only in the environment, as an operator would pass a secret.
    let daemon = Daemon::spawn_env(
        &setup.config,
        &[("PALOMA_DELIVERY__PASSWORD", "s3cret-pass")],
    );
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        1,
        Duration::from_secs(20),
        Some(&daemon),
    );
    assert_eq!(
        evs.iter().find(|e| is_terminal(e)).unwrap()["type"],
        "delivered",
        "{evs:?}"
    );
    assert_eq!(relay.auth_log().trim(), "paloma tls=False");
    let texts = relay.message_texts();
    assert_eq!(texts.len(), 1);
    assert!(texts[0].contains("Hi A,"), "{}", texts[0]);
    assert!(
        !daemon.log_text().contains("s3cret-pass"),
        "no secret in the logs"
    );
}

//! Redis Cluster (`redis.cluster_nodes`): three masters started by the test; the daemon and
//! `paloma enqueue` talk to the cluster, every job ends in one terminal event in the node that
//! serves the prefix's slot. A prefix without a hash tag is refused with a clear message.

use crate::common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Cluster {
    nodes: Vec<(u16, Child)>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Cluster {
    fn start() -> Cluster {
        require_tools();
        let mut nodes = Vec::new();
        let mut dirs = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            // The bus port is given too: by default it is port + 10,000, which may land in
            // the ephemeral range and be taken by some outgoing connection.
            let bus = free_port();
            let dir = tempfile::tempdir().unwrap();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-port", &bus.to_string()])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .args(["--cluster-config-file", "nodes.conf"])
                .arg("--dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server");
            wait_port("127.0.0.1", port, Duration::from_secs(10));
            nodes.push((port, child));
            dirs.push(dir);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|(p, _)| format!("127.0.0.1:{p}"))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "creating the cluster: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let c = Cluster { nodes, _dirs: dirs };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.ports().iter().all(|p| {
            redis::cmd("CLUSTER")
                .arg("INFO")
                .query::<String>(&mut c.node(*p))
                .is_ok_and(|i| i.contains("cluster_state:ok"))
        }) {
            assert!(Instant::now() < deadline, "the cluster did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|(p, _)| *p).collect()
    }

    fn node(&self, port: u16) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// The node serving `key`'s slot (the others answer MOVED).
    fn owner(&self, key: &str) -> redis::Connection {
        for p in self.ports() {
            let mut c = self.node(p);
            if redis::cmd("EXISTS").arg(key).query::<i64>(&mut c).is_ok() {
                return c;
            }
        }
        panic!("no node serves {key}");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, c) in &mut self.nodes {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A config for the cluster: `cluster_nodes` instead of `url`, and `prefix`.
fn cluster_setup(cluster: &Cluster, sink_port: u16, prefix: &str) -> Setup {
    let mut setup = Setup::new("redis://127.0.0.1:1/", sink_port, "", "", "");
    let nodes: Vec<String> = cluster
        .ports()
        .iter()
        .map(|p| format!("\"redis://127.0.0.1:{p}/\""))
        .collect();
    let toml = std::fs::read_to_string(&setup.config)
        .unwrap()
        .replace(
            "url = \"redis://127.0.0.1:1/\"",
            &format!("cluster_nodes = [{}]", nodes.join(", ")),
        )
        .replace(
            &format!("prefix = \"{}\"", setup.prefix),
            &format!("prefix = \"{prefix}\""),
        );
    std::fs::write(&setup.config, toml).unwrap();
    setup.prefix = prefix.to_string();
    setup
}

#[test]
fn jobs_flow_through_a_redis_cluster() {
    let cluster = Cluster::start();
    let sink = Sink::start(&[]);
    let prefix = format!("{{c{}}}:", free_port());
    let setup = cluster_setup(&cluster, sink.port, &prefix);
    let cfg = setup.config.to_str().unwrap();
    let n = 20;
    let lines: Vec<String> = (0..n)
        .map(|i| {
            job(
                &format!("cl-{i}"),
                "cluster",
                "receipt",
                &format!("r{i}@cluster.test"),
                serde_json::json!({"name": "C", "order_id": i}),
            )
        })
        .collect();
    // One job due in a second: through the delayed set and the scheduler's script, which
    // also writes the job's idempotency key.
    let later = (chrono::Utc::now() + chrono::Duration::seconds(1)).to_rfc3339();
    let mut lines = lines;
    lines.push(
        serde_json::json!({"id": "cl-later", "campaign": "cluster", "template": "receipt",
            "to": "later@cluster.test", "send_at": later, "data": {"name": "L", "order_id": 99}})
        .to_string(),
    );
    let n = n + 1;
    let (st, _, err) = paloma(&["enqueue", "--config", cfg, "-"], Some(&lines.join("\n")));
    assert!(st.success(), "enqueue to the cluster: {err}");
    let daemon = Daemon::spawn(&setup.config);
    let mut conn = cluster.owner(&format!("{prefix}sends"));
    let evs = wait_terminal(
        &mut conn,
        &setup.prefix,
        n,
        Duration::from_secs(60),
        Some(&daemon),
    );
    let by_id = terminal_by_id(&evs);
    assert_eq!(by_id.len(), n);
    assert!(by_id
        .values()
        .all(|t| t.len() == 1 && t[0]["type"] == "delivered"));
    assert_eq!(sink.count(), n);
    let (st, out, err) = paloma(&["stats", "--config", cfg, "--campaign", "cluster"], None);
    assert!(st.success(), "{err}");
    let row: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with("cluster "))
        .unwrap_or_else(|| panic!("no cluster row: {out}"))
        .split_whitespace()
        .collect();
    let n = n.to_string();
    assert_eq!(
        row,
        ["cluster", "0", n.as_str(), "0", "0", "0", "0", "0"],
        "queued, delivered, deferred, bounced, failed, suppressed, dead: {out}"
    );
}

#[test]
fn a_cluster_prefix_without_a_hash_tag_is_refused() {
    let cluster = Cluster::start();
    let setup = cluster_setup(&cluster, free_port(), "paloma-plain:");
    let mut daemon = Daemon::spawn(&setup.config);
    let status = daemon
        .wait(Duration::from_secs(20))
        .expect("the daemon exits");
    assert!(!status.success());
    let log = daemon.log_text();
    assert!(log.contains("hash tag"), "{log}");
}

//! Replicated Redis for the failover tests: redis-server primaries and replicas, three
//! Sentinels (`redis-server <conf> --sentinel`), and a Redis Cluster with replicas, all real
//! processes on free loopback ports, with the signals a test sends them (SIGSTOP for a
//! replica that falls behind, SIGKILL for a primary that dies) and the questions it asks
//! (who is primary now, is a replica caught up).

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_port, require_tools, wait_for, wait_port, wait_until};

/// How long a question to one server may take: a stopped server answers nothing.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// One redis-server (data node or Sentinel) with its own directory.
pub struct Server {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    stopped: bool,
}

impl Server {
    /// A data node: persistence on (AOF, fsync every second), `extra` appended.
    pub fn start(extra: &[&str]) -> Server {
        require_tools();
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
            ])
            .arg("--dir")
            .arg(dir.path())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server");
        wait_port("127.0.0.1", port, Duration::from_secs(10));
        Server {
            child: Some(child),
            port,
            dir,
            stopped: false,
        }
    }

    /// A replica of the server on `primary` (`--replicaof`).
    pub fn replica_of(primary: u16) -> Server {
        Self::start(&["--replicaof", "127.0.0.1", &primary.to_string()])
    }

    /// A Sentinel watching the primary on `primary` as `service`, with a quorum of 2, a
    /// primary down after 1 s, and a failover timeout of 5 s. Sentinel rewrites its config
    /// file, so each has its own, in its own directory.
    pub fn sentinel(service: &str, primary: u16) -> Server {
        require_tools();
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir \"{}\"\n\
                 sentinel monitor {service} 127.0.0.1 {primary} 2\n\
                 sentinel down-after-milliseconds {service} 1000\n\
                 sentinel failover-timeout {service} 5000\n\
                 sentinel parallel-syncs {service} 1\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server --sentinel");
        wait_port("127.0.0.1", port, Duration::from_secs(10));
        Server {
            child: Some(child),
            port,
            dir,
            stopped: false,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A connection whose every answer must come within a few seconds.
    pub fn try_conn(&self) -> Option<redis::Connection> {
        conn_to(self.port)
    }

    pub fn conn(&self) -> redis::Connection {
        self.try_conn()
            .unwrap_or_else(|| panic!("no connection to redis-server on {}", self.port))
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on the pid of a child this process started and has not reaped.
            let rc = unsafe { libc::kill(c.id() as libc::pid_t, sig) };
            assert_eq!(rc, 0, "kill({}, {sig})", c.id());
        }
    }

    /// SIGSTOP: the process keeps its sockets but answers nothing (a busy or partitioned
    /// replica, as its primary sees it).
    pub fn stop(&mut self) {
        self.signal(libc::SIGSTOP);
        self.stopped = true;
    }

    /// SIGCONT after [`Server::stop`].
    pub fn cont(&mut self) {
        self.signal(libc::SIGCONT);
        self.stopped = false;
    }

    /// SIGKILL, and reaped: the machine is gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.stopped {
            self.cont();
        }
        self.kill();
    }
}

/// A connection to 127.0.0.1:`port` with short connect and read timeouts, or None.
pub fn conn_to(port: u16) -> Option<redis::Connection> {
    let c = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .ok()?
        .get_connection_with_timeout(ASK_TIMEOUT)
        .ok()?;
    c.set_read_timeout(Some(ASK_TIMEOUT)).ok()?;
    c.set_write_timeout(Some(ASK_TIMEOUT)).ok()?;
    Some(c)
}

/// `INFO replication` of the server on `port` as field → value; empty when it does not answer.
pub fn replication_info(port: u16) -> HashMap<String, String> {
    let Some(mut c) = conn_to(port) else {
        return HashMap::new();
    };
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query(&mut c)
        .unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// The first element of `ROLE`: "master", "slave" or "sentinel"; None when it does not answer.
pub fn role(port: u16) -> Option<String> {
    let mut c = conn_to(port)?;
    let v: redis::Value = redis::cmd("ROLE").query(&mut c).ok()?;
    match v {
        redis::Value::Array(items) => match items.first()? {
            redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
            redis::Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// True when the server on `replica` replicates from `primary` with its link up.
pub fn replicating_from(replica: u16, primary: u16) -> bool {
    let info = replication_info(replica);
    info.get("role").map(String::as_str) == Some("slave")
        && info.get("master_port") == Some(&primary.to_string())
        && info.get("master_link_status").map(String::as_str) == Some("up")
}

/// Writes `key` on the primary on `primary` and waits (Redis' `WAIT`) until `replicas`
/// replicas have it, and with it everything the primary had before: a replica is caught up.
/// Panics after `timeout`.
pub fn wait_caught_up(primary: u16, key: &str, replicas: usize, timeout: Duration) {
    wait_until(
        &format!("{replicas} replica(s) of 127.0.0.1:{primary} caught up"),
        timeout,
        || {
            let Some(mut c) = conn_to(primary) else {
                return false;
            };
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let set: redis::RedisResult<()> = redis::cmd("SET")
                .arg(key)
                .arg(super::free_port())
                .query(&mut c);
            if set.is_err() {
                return false;
            }
            let got: redis::RedisResult<usize> =
                redis::cmd("WAIT").arg(replicas).arg(1000).query(&mut c);
            got.is_ok_and(|n| n >= replicas)
        },
    );
}

/// `SENTINEL MASTER <service>` of the Sentinel on `port`, as field → value.
pub fn sentinel_master(port: u16, service: &str) -> HashMap<String, String> {
    let Some(mut c) = conn_to(port) else {
        return HashMap::new();
    };
    redis::cmd("SENTINEL")
        .arg("MASTER")
        .arg(service)
        .query(&mut c)
        .unwrap_or_default()
}

/// The port of the primary that the Sentinel on `port` names for `service`.
pub fn sentinel_primary(port: u16, service: &str) -> Option<u16> {
    let mut c = conn_to(port)?;
    let addr: Option<(String, String)> = redis::cmd("SENTINEL")
        .arg("GET-MASTER-ADDR-BY-NAME")
        .arg(service)
        .query(&mut c)
        .ok()?;
    addr?.1.parse().ok()
}

/// A primary, its replicas, and three Sentinels watching it as `service`.
pub struct SentinelSet {
    pub service: String,
    /// The data nodes: the first starts as the primary, the others as its replicas.
    pub nodes: Vec<Server>,
    pub sentinels: Vec<Server>,
}

impl SentinelSet {
    /// A primary, `replicas` replicas and three Sentinels; returns once every replica is
    /// in sync and every Sentinel knows the other two and every replica (before that a
    /// failover could not be agreed on).
    pub fn start(service: &str, replicas: usize) -> SentinelSet {
        let primary = Server::start(&[]);
        let mut nodes = vec![primary];
        for _ in 0..replicas {
            nodes.push(Server::replica_of(nodes[0].port));
        }
        let p = nodes[0].port;
        for r in &nodes[1..] {
            wait_until(
                &format!("replica {} in sync with {p}", r.port),
                Duration::from_secs(30),
                || replicating_from(r.port, p),
            );
        }
        let sentinels: Vec<Server> = (0..3).map(|_| Server::sentinel(service, p)).collect();
        for s in &sentinels {
            wait_until(
                &format!(
                    "Sentinel {} knowing 2 other Sentinels and {replicas} replicas",
                    s.port
                ),
                Duration::from_secs(60),
                || {
                    let m = sentinel_master(s.port, service);
                    m.get("num-other-sentinels").map(String::as_str) == Some("2")
                        && m.get("num-slaves") == Some(&replicas.to_string())
                },
            );
        }
        SentinelSet {
            service: service.to_string(),
            nodes,
            sentinels,
        }
    }

    /// `["redis://127.0.0.1:S1", …]` as a TOML array.
    pub fn sentinel_urls_toml(&self) -> String {
        let urls: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("\"redis://127.0.0.1:{}\"", s.port))
            .collect();
        format!("[{}]", urls.join(", "))
    }

    /// The node on `port`.
    pub fn node(&mut self, port: u16) -> &mut Server {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node on {port}"))
    }

    /// The port every Sentinel names as the primary, when they agree.
    pub fn agreed_primary(&self) -> Option<u16> {
        let named: Vec<Option<u16>> = self
            .sentinels
            .iter()
            .map(|s| sentinel_primary(s.port, &self.service))
            .collect();
        let first = (*named.first()?)?;
        named.iter().all(|n| *n == Some(first)).then_some(first)
    }

    /// Waits until the Sentinels agree on a primary other than `old`, and that node says
    /// it is a primary (`ROLE`); returns its port.
    pub fn wait_promotion(&self, old: u16, timeout: Duration) -> u16 {
        wait_for(
            &format!("the Sentinels promoting a replica of {old}"),
            timeout,
            || {
                let p = self.agreed_primary().filter(|p| *p != old)?;
                (role(p).as_deref() == Some("master")).then_some(p)
            },
        )
    }
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct NodeLine {
    pub id: String,
    pub port: u16,
    pub flags: Vec<String>,
    /// The primary's id, for a replica ("-" for a primary).
    pub master: String,
    /// Slot ranges served (primaries).
    pub slots: Vec<(u16, u16)>,
}

impl NodeLine {
    pub fn is_primary(&self) -> bool {
        self.flags.iter().any(|f| f == "master")
    }
    pub fn failed(&self) -> bool {
        self.flags.iter().any(|f| f == "fail" || f == "fail?")
    }
    pub fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))
    }
}

/// `CLUSTER NODES` as the node on `port` sees the cluster; empty when it does not answer.
pub fn cluster_nodes(port: u16) -> Vec<NodeLine> {
    let Some(mut c) = conn_to(port) else {
        return Vec::new();
    };
    let text: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query(&mut c)
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            // ip:port@cport[,hostname]
            let port = f[1].split('@').next()?.rsplit(':').next()?.parse().ok()?;
            let slots = f[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|x| (x, x)),
                })
                .collect();
            Some(NodeLine {
                id: f[0].to_string(),
                port,
                flags: f[2].split(',').map(str::to_string).collect(),
                master: f[3].to_string(),
                slots,
            })
        })
        .collect()
}

/// The slot of `key` (`CLUSTER KEYSLOT`), asked of the node on `port`.
pub fn keyslot(port: u16, key: &str) -> u16 {
    let mut c = conn_to(port).expect("a cluster node answers");
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query(&mut c)
        .unwrap()
}

/// True when the node on `port` says `cluster_state:ok`.
pub fn cluster_ok(port: u16) -> bool {
    conn_to(port).is_some_and(|mut c| {
        redis::cmd("CLUSTER")
            .arg("INFO")
            .query::<String>(&mut c)
            .is_ok_and(|i| i.contains("cluster_state:ok"))
    })
}

/// What a node is in one node's view: port, primary or not, slots served.
type Role = (u16, bool, Vec<(u16, u16)>);

/// A Redis Cluster of primaries and replicas (`--cluster-replicas`), node timeout 2 s.
pub struct ReplicatedCluster {
    pub nodes: Vec<Server>,
}

/// A cluster node: node timeout 2 s, and its bus on a free port of its own (the default,
/// port + 10000, can be in the ephemeral range and taken by an outgoing connection).
fn cluster_node() -> Server {
    let bus = free_port().to_string();
    Server::start(&[
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        "2000",
        "--cluster-port",
        &bus,
    ])
}

impl ReplicatedCluster {
    /// `primaries` primaries with `replicas` replicas each, created by
    /// `redis-cli --cluster create … --cluster-replicas`; returns once every node says
    /// `cluster_state:ok` and every replica's link to its primary is up.
    pub fn start(primaries: usize, replicas: usize) -> ReplicatedCluster {
        let nodes: Vec<Server> = (0..primaries * (1 + replicas))
            .map(|_| cluster_node())
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "creating the cluster: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let c = ReplicatedCluster { nodes };
        c.wait_settled(primaries * replicas, Duration::from_secs(60));
        c
    }

    /// Waits until every running node says `cluster_state:ok`, sees as many replicas with
    /// a live link as `replicas`, and agrees on who serves what.
    pub fn wait_settled(&self, replicas: usize, timeout: Duration) {
        wait_until(
            &format!("the cluster settled with {replicas} replicas in sync"),
            timeout,
            || {
                let running: Vec<u16> = self
                    .nodes
                    .iter()
                    .filter(|n| n.is_running())
                    .map(|n| n.port)
                    .collect();
                let views: Vec<Vec<NodeLine>> = running.iter().map(|p| cluster_nodes(*p)).collect();
                let linked = running
                    .iter()
                    .filter(|p| {
                        let i = replication_info(**p);
                        i.get("role").map(String::as_str) == Some("slave")
                            && i.get("master_link_status").map(String::as_str) == Some("up")
                    })
                    .count();
                let shape = |v: &Vec<NodeLine>| {
                    let mut s: Vec<Role> = v
                        .iter()
                        .filter(|n| running.contains(&n.port))
                        .map(|n| (n.port, n.is_primary(), n.slots.clone()))
                        .collect();
                    s.sort();
                    s
                };
                running.iter().all(|p| cluster_ok(*p))
                    && linked == replicas
                    && views.iter().all(|v| shape(v) == shape(&views[0]))
            },
        );
    }

    /// `["redis://127.0.0.1:P/", …]` of every node, as a TOML array.
    pub fn urls_toml(&self) -> String {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("\"{}\"", n.url()))
            .collect();
        format!("[{}]", urls.join(", "))
    }

    /// A running node's port, to ask.
    fn any_running(&self) -> u16 {
        self.nodes
            .iter()
            .find(|n| n.is_running())
            .expect("a running node")
            .port
    }

    /// The primary serving `key`'s slot, as a running node sees the cluster now (None
    /// while none does: between a primary's failure and a replica's promotion).
    pub fn primary_of(&self, key: &str) -> Option<NodeLine> {
        let p = self.any_running();
        let slot = keyslot(p, key);
        cluster_nodes(p)
            .into_iter()
            .find(|n| n.is_primary() && !n.failed() && n.serves(slot))
    }

    /// The replicas of the primary with id `id`.
    pub fn replicas_of(&self, id: &str) -> Vec<NodeLine> {
        cluster_nodes(self.any_running())
            .into_iter()
            .filter(|n| n.master == id)
            .collect()
    }

    /// Adds a new node as a replica of the primary with id `id`
    /// (`redis-cli --cluster add-node … --cluster-slave --cluster-master-id`).
    pub fn add_replica(&mut self, id: &str) -> u16 {
        let node = cluster_node();
        let port = node.port;
        let via = self.any_running();
        let out = Command::new("redis-cli")
            .args(["--cluster", "add-node"])
            .arg(format!("127.0.0.1:{port}"))
            .arg(format!("127.0.0.1:{via}"))
            .args(["--cluster-slave", "--cluster-master-id", id])
            .output()
            .expect("redis-cli --cluster add-node");
        assert!(
            out.status.success(),
            "adding a replica: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self.nodes.push(node);
        port
    }

    pub fn node(&mut self, port: u16) -> &mut Server {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node on {port}"))
    }
}

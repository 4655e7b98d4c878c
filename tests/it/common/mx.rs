//! Direct-to-MX test environments: dnsmasq answering for `.test`, smtp-sink instances on
//! 127.0.0.x, all on one port (the config's `mx_port`), and a config in `mode = "mx"`.

use std::collections::HashMap;

use serde_json::Value;

use super::{terminal_by_id, Dns, Redis, Setup, Sink};

pub struct MxEnv {
    pub redis: Redis,
    _dns: Dns,
    pub sinks: HashMap<&'static str, Sink>,
    pub setup: Setup,
    /// The port every MX host listens on (`mx_port`).
    pub port: u16,
}

/// dnsmasq answering for `.test` only (unknown names: NXDOMAIN), sinks on the given
/// loopback addresses, all on one port (the config's `mx_port`).
pub fn env(
    records: &[&str],
    sinks: &[(&'static str, &[&str])],
    delivery_extra: &str,
    extra: &str,
) -> MxEnv {
    let redis = Redis::start();
    let port = super::free_port();
    let mut recs: Vec<String> = vec!["local=/test/".into()];
    recs.extend(records.iter().map(|r| r.to_string()));
    let dns = Dns::start(&recs);
    let sinks = sinks
        .iter()
        .map(|(ip, args)| (*ip, Sink::start_on(ip, port, args)))
        .collect();
    let setup = Setup::new(
        &redis.url(),
        port,
        &format!(
            "mx_port = {port}\nnameservers = [\"127.0.0.1:{}\"]\nprohibited_hosts = []\n{delivery_extra}",
            dns.port
        ),
        "",
        extra,
    );
    let cfg = std::fs::read_to_string(&setup.config)
        .unwrap()
        .replace("mode = \"relay\"", "mode = \"mx\"");
    std::fs::write(&setup.config, cfg).unwrap();
    MxEnv {
        redis,
        _dns: dns,
        sinks,
        setup,
        port,
    }
}

/// The one terminal event of job `id`.
pub fn terminal(evs: &[Value], id: &str) -> Value {
    let t = terminal_by_id(evs);
    assert_eq!(t.get(id).map(Vec::len), Some(1), "{id}: {evs:?}");
    t[id][0].clone()
}

/// Python's aiosmtpd on `host:port` recording each message's client address and EHLO name
/// (tests/peers/recording_smtpd.py); `mode`: "ok" or "throttle-once".
pub struct Recorder {
    child: std::process::Child,
    pub out: tempfile::TempDir,
}

/// One kept message: who sent it.
#[derive(Debug, Clone)]
pub struct Kept {
    pub client: String,
    pub ehlo: String,
    pub rcpt: String,
    pub at: f64,
}

impl Recorder {
    pub fn start(host: &str, port: u16, mode: &str) -> Recorder {
        let out = tempfile::tempdir().unwrap();
        let args = [
            std::ffi::OsStr::new(host),
            out.path().as_os_str(),
            std::ffi::OsStr::new(mode),
        ];
        let child = super::python_peer_on(host, "recording_smtpd.py", port, &args);
        Recorder { child, out }
    }

    pub fn kept(&self) -> Vec<Kept> {
        std::fs::read_to_string(self.out.path().join("log.tsv"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                Some(Kept {
                    client: f.first()?.to_string(),
                    ehlo: f.get(1)?.to_string(),
                    rcpt: f.get(2)?.to_string(),
                    at: f.get(3)?.parse().ok()?,
                })
            })
            .collect()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

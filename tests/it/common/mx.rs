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
    }
}

/// The one terminal event of job `id`.
pub fn terminal(evs: &[Value], id: &str) -> Value {
    let t = terminal_by_id(evs);
    assert_eq!(t.get(id).map(Vec::len), Some(1), "{id}: {evs:?}");
    t[id][0].clone()
}

//! A relay given by name (a DNS-fronted smarthost, as SES's endpoints are) follows its DNS
//! without a restart: dnsmasq answers the relay's name with one loopback address, then with
//! another, and deliveries reach the smtp-sink at the new one — when the old answer's TTL
//! runs out (the old sink still up), and at once when the old address stops answering (the
//! TTL an hour away).

use crate::common;

use std::time::Duration;

use common::*;

const NAME: &str = "relay.paloma.test";

fn dns_answering(port: u16, ip: &str, ttl: u32) -> Dns {
    Dns::start_on(
        port,
        &[
            format!("host-record={NAME},{ip}"),
            format!("local-ttl={ttl}"),
        ],
    )
}

/// Enqueues a job every round until `sink` has a message; returns how many were enqueued.
fn until_one_reaches(
    conn: &mut redis::Connection,
    prefix: &str,
    tag: &str,
    sink: &Sink,
    daemon: &Daemon,
) -> usize {
    let mut n = 0;
    wait_until_daemon(
        &format!("a {tag} job at the new address"),
        Duration::from_secs(30),
        daemon,
        || {
            if sink.count() > 0 {
                return true;
            }
            enqueue_raw(
                conn,
                prefix,
                &jobs_to(&format!("{tag}{n}"), &[format!("u{n}@dest.test")]),
            );
            n += 1;
            false
        },
    );
    n
}

#[test]
fn a_relay_name_is_resolved_again_on_ttl_and_when_its_address_stops_answering() {
    let redis = Redis::start();
    let port = free_port();
    let dns_port = free_port();
    let first = Sink::start_on("127.0.0.2", port, &[]);
    let mut dns = dns_answering(dns_port, "127.0.0.2", 0);
    let setup = Setup::new(
        &redis.url(),
        port,
        &format!("nameservers = [\"127.0.0.1:{dns_port}\"]\nretry_intervals = [\"1s\"]"),
        "",
        "",
    );
    let config = std::fs::read_to_string(&setup.config).unwrap().replace(
        &format!("relay = \"127.0.0.1:{port}\""),
        &format!("relay = \"{NAME}:{port}\""),
    );
    std::fs::write(&setup.config, config).unwrap();
    let mut conn = redis.conn();
    let daemon = Daemon::spawn(&setup.config);

    enqueue_raw(&mut conn, &setup.prefix, &jobs(3, "one", "dest.test"));
    wait_terminal(
        &mut conn,
        &setup.prefix,
        3,
        Duration::from_secs(30),
        Some(&daemon),
    );
    assert_eq!(first.wait_count(3, Duration::from_secs(10)), 3);

    // The record moves; the old relay still answers. Its answer had TTL 0: within the
    // least time an answer is used for (5 s), mail goes to the new address.
    drop(dns);
    let second = Sink::start_on("127.0.0.3", port, &[]);
    dns = dns_answering(dns_port, "127.0.0.3", 3600);
    until_one_reaches(&mut conn, &setup.prefix, "two", &second, &daemon);

    // The record moves again, but the answer now holds for an hour: the old address
    // going dark is what makes the daemon ask again.
    drop(dns);
    let third = Sink::start_on("127.0.0.4", port, &[]);
    let _dns = dns_answering(dns_port, "127.0.0.4", 3600);
    drop(second);
    enqueue_raw(&mut conn, &setup.prefix, &jobs(5, "three", "dest.test"));
    third.wait_count(5, Duration::from_secs(30));
    for i in 0..5 {
        let id = format!("three-{i}");
        wait_until_daemon(
            &format!("{id} delivered"),
            Duration::from_secs(30),
            &daemon,
            || {
                terminal_by_id(&events(&mut conn, &setup.prefix))
                    .get(&id)
                    .is_some_and(|t| t.len() == 1 && t[0]["type"] == "delivered")
            },
        );
    }
    assert!(
        daemon
            .log_text()
            .contains("relay resolved to other addresses"),
        "{}",
        daemon.log_text()
    );
}

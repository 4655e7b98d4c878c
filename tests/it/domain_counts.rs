//! The campaign report's per-domain counters (src/pipeline/scripts/domains.lua) stay a bounded
//! hash: once it holds its most fields, a domain not yet in it is counted under "(other)",
//! while the domains already in it keep counting — checked against a real Redis, with a
//! bound of 3 instead of the daemon's 600.

use crate::common;

use common::*;

fn count(conn: &mut redis::Connection, max: usize, triples: &[(&str, &str, i64)]) {
    let script = redis::Script::new(include_str!("../../src/pipeline/scripts/domains.lua"));
    let mut inv = script.key("domains:c");
    inv.arg(max);
    for (domain, outcome, n) in triples {
        inv.arg(*domain).arg(*outcome).arg(*n);
    }
    let _: i64 = inv.invoke(conn).unwrap();
}

#[test]
fn a_full_domain_hash_counts_new_domains_under_other() {
    let redis = Redis::start();
    let mut conn = redis.conn();
    // One batch fills the hash (3 fields) and overflows within the same call.
    count(
        &mut conn,
        3,
        &[
            ("a.test", "delivered", 5),
            ("a.test", "bounced", 1),
            ("b.test", "delivered", 2),
            ("c.test", "delivered", 4),
        ],
    );
    // Later batches: known fields keep counting, new ones go to "(other)".
    count(
        &mut conn,
        3,
        &[
            ("b.test", "delivered", 3),
            ("a.test", "bounced", 1),
            ("d.test", "deferred", 7),
            ("c.test", "delivered", 1),
        ],
    );
    let mut h: Vec<(String, i64)> = redis::cmd("HGETALL")
        .arg("domains:c")
        .query(&mut conn)
        .unwrap();
    h.sort();
    let want: Vec<(String, i64)> = [
        ("(other):deferred", 7),
        ("(other):delivered", 5),
        ("a.test:bounced", 2),
        ("a.test:delivered", 5),
        ("b.test:delivered", 5),
    ]
    .iter()
    .map(|(f, n)| (f.to_string(), *n))
    .collect();
    assert_eq!(h, want);
}

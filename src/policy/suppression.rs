//! The suppression list: the hash `{prefix}suppressed`, field = lower-cased address,
//! value = reason (`unsubscribed`, `bounced`, `complained`, `manual`). Hard bounces and
//! unsubscribes add to it; operators manage it with `paloma suppress`. A recipient's own
//! opt-out is also kept in `{prefix}optouts`, so that it survives the removal of a bounce or
//! an operator's block.

use crate::store::keys::Keys;
use crate::store::replication::{eval, AckError, Acks};
use crate::store::RedisConn;

pub const REASONS: [&str; 4] = ["unsubscribed", "bounced", "complained", "manual"];

/// Does `reason` stop this job? Transactional mail ignores marketing opt-outs, never a hard
/// bounce or an operator's block.
pub fn blocks(reason: &str, transactional: bool) -> bool {
    !transactional || matches!(reason, "bounced" | "manual")
}

/// The field of `addr` in the suppression list ([`crate::values::address_key`]).
pub fn field(addr: &str) -> String {
    crate::values::address_key(addr)
}

/// Adds `addrs` for `reason`, acknowledged as [`Acks`] says (`path` names the answer).
pub async fn add(
    conn: &mut RedisConn,
    keys: &Keys,
    acks: &Acks,
    path: &'static str,
    addrs: &[String],
    reason: &str,
) -> Result<u64, AckError> {
    if addrs.is_empty() {
        return Ok(0);
    }
    let mut p = redis::pipe();
    let cmd = p.cmd("HSET").arg(keys.suppressed.as_str());
    for a in addrs {
        cmd.arg(field(a)).arg(reason);
    }
    let (added,): (u64,) = acks.write(conn, &p, false, path).await?;
    Ok(added)
}

/// Removes addresses from the list. A recipient's own opt-out outlives the removal of another
/// reason: an address suppressed as `bounced` or `manual` that also opted out stays, as
/// `unsubscribed`. Removing an address listed as `unsubscribed` removes the opt-out too (the
/// operator's explicit decision, e.g. the person subscribed again).
/// KEYS: suppressed, optouts; ARGV: addresses. Returns {removed, kept as unsubscribed}.
const REMOVE: &str = include_str!("scripts/remove.lua");

/// What [`remove`] did: addresses taken off the list, and addresses kept as `unsubscribed`.
pub async fn remove(
    conn: &mut RedisConn,
    keys: &Keys,
    acks: &Acks,
    path: &'static str,
    addrs: &[String],
) -> Result<(u64, u64), AckError> {
    if addrs.is_empty() {
        return Ok((0, 0));
    }
    let mut cmd = eval(REMOVE, &[&keys.suppressed, &keys.optouts]);
    for a in addrs {
        cmd.arg(field(a));
    }
    let mut p = redis::pipe();
    p.add_command(cmd);
    let (done,): ((u64, u64),) = acks.write(conn, &p, false, path).await?;
    Ok(done)
}

/// Every entry, via HSCAN (no blocking HGETALL on a large list).
pub async fn list(
    conn: &mut RedisConn,
    keys: &Keys,
    mut each: impl FnMut(&str, &str),
) -> redis::RedisResult<u64> {
    let mut cursor = 0u64;
    let mut n = 0;
    loop {
        let (next, items): (u64, Vec<String>) = redis::cmd("HSCAN")
            .arg(keys.suppressed.as_str())
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        for kv in items.chunks(2) {
            if let [k, v] = kv {
                each(k, v);
                n += 1;
            }
        }
        if next == 0 {
            return Ok(n);
        }
        cursor = next;
    }
}

//! The delayed set: retries and `send_at` jobs wait in `{prefix}scheduled` (score = due
//! time in ms) and are moved back into the sends stream when due, by a Lua script, so the
//! move is atomic and any number of daemons can run it.
//!
//! A member is `{attempt}|{first_at ms}|{job JSON}`.

use std::sync::Arc;
use std::time::Duration;

use redis::Script;
use tokio::sync::watch;

use super::{now_ms, Keys};
use crate::metrics::Metrics;
use crate::store::RedisConn;

const MOVE_DUE: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(due) do
  local a = string.find(m, '|', 1, true)
  local b = a and string.find(m, '|', a + 1, true)
  if b then
    local raw = string.sub(m, b + 1)
    local eid = redis.call('XADD', KEYS[2], '*', 'job', raw,
      'attempt', string.sub(m, 1, a - 1), 'first_at', string.sub(m, a + 1, b - 1))
    local ok, job = pcall(cjson.decode, raw)
    if ok and type(job) == 'table' and type(job.id) == 'string' then
      redis.call('SET', ARGV[3] .. job.id, 'p:' .. eid, 'EX', tonumber(ARGV[4]))
    end
  end
  redis.call('ZREM', KEYS[1], m)
end
return #due
"#;

pub fn member(attempt: u32, first_at: i64, job: &[u8]) -> String {
    let mut m = format!("{attempt}|{first_at}|");
    m.push_str(&String::from_utf8_lossy(job));
    m
}

/// Moves due jobs every `tick` until `stop` turns true.
pub async fn run(
    mut conn: RedisConn,
    keys: Keys,
    idem_ttl: Duration,
    tick: Duration,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let script = Script::new(MOVE_DUE);
    let idem_prefix = format!("{}idem:", keys.prefix);
    loop {
        loop {
            let moved: redis::RedisResult<u64> = script
                .key(&keys.scheduled)
                .key(&keys.sends)
                .arg(now_ms())
                .arg(500)
                .arg(&idem_prefix)
                .arg(idem_ttl.as_secs().max(1))
                .invoke_async(&mut conn)
                .await;
            match moved {
                Ok(n) => {
                    metrics.scheduled_moved.inc_by(n);
                    if n < 500 {
                        break;
                    }
                }
                Err(e) => {
                    metrics.redis_errors.inc();
                    tracing::warn!(error = %e, "moving due jobs failed; will retry");
                    break;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = stop.changed() => return,
        }
    }
}

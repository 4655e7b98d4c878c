//! Acknowledged means kept: what paloma answers the outside with a success (an API 2xx, a
//! one-click unsubscribe, the bounce listener's 250, a provider webhook's 2xx, a CLI's exit
//! 0) is on `redis.ack_replicas` replicas as well as on the primary.
//!
//! Redis replicates asynchronously: a write the primary has answered is lost when the
//! primary dies before a replica got it, and the replica is promoted without it. So each
//! such write is followed by `WAIT n timeout`, in the same pipeline on the same connection
//! (a WAIT on another connection, or after a reconnect, would not cover it). WAIT blocks
//! the connection it is sent on, so these writes have a connection of their own, and they
//! are committed as a group: the writes that arrive while one WAIT is out go together in
//! the next pipeline, with one WAIT for all (a request waits at most about two
//! `ack_timeout`s, however many come at once, and the rest of paloma never waits). Fewer than `n`
//! confirmations within `redis.ack_timeout` and the answer is a refusal that asks to retry
//! (503 with `Retry-After`, 451, a non-zero exit): the write may still be on the primary,
//! and a retry writes it again, which every path here tolerates (idempotent writes, or an
//! idempotency key). Counted in `paloma_ack_timeouts_total{path}`.
//!
//! WAIT makes the loss of acknowledged writes far less likely; it does not make Redis
//! strongly consistent (a failover may still pick a replica that had not confirmed, and
//! without `appendfsync always` a replica's copy lives in its memory). The delivery path
//! does not wait: a lost outcome, acknowledgement or idempotency record means a job is sent
//! again, never lost.
//!
//! Operations of several steps (campaign control) end with a barrier: a small write and
//! WAIT on the same primary, which confirms everything written there before it, as the
//! replication stream is one sequence.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::{Cmd, FromRedisValue, Pipeline, Value};

use crate::metrics::Metrics;

use super::checks::Health;
use super::RedisConn;

/// `Retry-After` (seconds) of a refusal for want of confirmations (API, tracking, webhooks):
/// a lagging replica catches up, or a failover ends, within seconds.
pub const RETRY_AFTER: u32 = 5;

/// Why an acknowledgement was refused.
#[derive(Debug)]
pub enum AckError {
    /// Redis itself failed: nothing or part of it may be written.
    Redis(redis::RedisError),
    /// Written on the primary, but fewer replicas than wanted confirmed in time.
    Unconfirmed {
        wanted: u32,
        got: i64,
        timeout: Duration,
    },
}

impl std::fmt::Display for AckError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AckError::Redis(e) => write!(f, "{e}"),
            AckError::Unconfirmed {
                wanted,
                got,
                timeout,
            } => write!(
                f,
                "Redis replicas did not confirm the write: {got} of {wanted} (redis.ack_replicas) within {timeout:?} (redis.ack_timeout); it is not acknowledged and may be lost in a failover, try again"
            ),
        }
    }
}

impl std::error::Error for AckError {}

impl From<redis::RedisError> for AckError {
    fn from(e: redis::RedisError) -> Self {
        AckError::Redis(e)
    }
}

/// The acknowledgement policy and what the last writes found, shared by every answering
/// part of a daemon (or one CLI command).
pub struct Acks {
    want: u32,
    timeout: Duration,
    /// A key in paloma's slot for barriers and probes.
    barrier_key: String,
    metrics: Arc<Metrics>,
    health: Option<Arc<Health>>,
    /// The last write or probe was not confirmed (and none was since).
    failing: AtomicBool,
    /// Replicas online at the last look (INFO replication).
    online: AtomicU32,
    /// To the group committer, when replicas are waited for.
    group: Option<tokio::sync::mpsc::Sender<Pending>>,
}

/// A write waiting for the next group commit.
struct Pending {
    cmds: Pipeline,
    atomic: bool,
    reply: tokio::sync::oneshot::Sender<Result<(Value, Option<Value>), AckError>>,
}

/// The path of the watcher's probe, which is never refused in advance.
const PROBE: &str = "probe";

/// Writes waiting for a commit, at most; the rest wait for room.
const QUEUE: usize = 4096;
/// Writes in one commit, at most.
const GROUP: usize = 256;

/// Adds `cmds` to `p`, inside MULTI/EXEC when `atomic`.
fn add(p: &mut Pipeline, cmds: &Pipeline, atomic: bool) {
    if atomic {
        p.cmd("MULTI");
    }
    for c in cmds.cmd_iter() {
        p.add_command(c.clone());
    }
    if atomic {
        p.cmd("EXEC");
    }
}

/// The value of one write's replies (all of them, taken off the end of `replies`): the
/// EXEC reply when atomic, else the array; an error reply is the write's error.
fn take(replies: &mut Vec<Value>, atomic: bool) -> Result<Value, AckError> {
    for r in replies.iter() {
        if let Value::ServerError(e) = r {
            return Err(AckError::Redis(e.clone().into()));
        }
    }
    if atomic {
        return match replies.pop() {
            Some(Value::Nil) | None => Err(AckError::Redis(redis::RedisError::from((
                redis::ErrorKind::Client,
                "the transaction was aborted",
            )))),
            Some(v) => Ok(v),
        };
    }
    Ok(Value::Array(std::mem::take(replies)))
}

/// Commits the writes of `rx` in groups on `conn`: each group one pipeline (errors kept per
/// write), then WAIT `want` `timeout`; each write gets its replies and WAIT's count.
async fn commit(
    mut conn: RedisConn,
    want: u32,
    timeout: Duration,
    mut rx: tokio::sync::mpsc::Receiver<Pending>,
) {
    let mut group = Vec::with_capacity(GROUP);
    while rx.recv_many(&mut group, GROUP).await > 0 {
        let mut p = redis::pipe();
        p.ignore_errors();
        let mut lens = Vec::with_capacity(group.len());
        for w in &group {
            let before = p.len();
            add(&mut p, &w.cmds, w.atomic);
            lens.push(p.len() - before);
        }
        p.cmd("WAIT")
            .arg(want)
            .arg(timeout.as_millis().clamp(1, u64::MAX as u128) as u64);
        let replies: Result<Vec<Value>, redis::RedisError> = p.query_async(&mut conn).await;
        match replies {
            Ok(mut replies) if replies.len() == lens.iter().sum::<usize>() + 1 => {
                let confirmed = replies.pop();
                let mut rest = replies.into_iter();
                for (w, n) in group.drain(..).zip(lens) {
                    let mut mine: Vec<Value> = rest.by_ref().take(n).collect();
                    let r = take(&mut mine, w.atomic).map(|v| (v, confirmed.clone()));
                    let _ = w.reply.send(r);
                }
            }
            Ok(replies) => {
                let e = redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "unexpected number of replies",
                    format!(
                        "{} for {} commands",
                        replies.len(),
                        lens.iter().sum::<usize>() + 1
                    ),
                ));
                for w in group.drain(..) {
                    let _ = w.reply.send(Err(AckError::Redis(e.clone())));
                }
            }
            Err(e) => {
                for w in group.drain(..) {
                    let _ = w.reply.send(Err(AckError::Redis(e.clone())));
                }
            }
        }
    }
}

impl Acks {
    /// `ack_replicas` as configured, or else 1 when the primary has a replica connected now
    /// (online or still syncing) and 0 when it has none (a deployment without replicas
    /// waits for nothing). When it waits, the writes are committed in groups by a task of
    /// their own, on a connection of their own to `target` (a daemon: a WAIT blocks the
    /// connection it is on), or on `conn` when `target` is None (a CLI command, which does
    /// nothing else meanwhile and need not pay for a second connection).
    pub async fn start(
        target: Option<&super::RedisTarget>,
        conn: &mut RedisConn,
        settings: &crate::config::RedisSettings,
        metrics: Arc<Metrics>,
        health: Option<Arc<Health>>,
    ) -> anyhow::Result<Acks> {
        use anyhow::Context;
        let look = replication(conn, &settings.prefix)
            .await
            .context("reading the Redis primary's replicas (INFO replication)")?;
        let want = settings
            .ack_replicas
            .unwrap_or(u32::from(look.connected > 0));
        let timeout = settings.ack_timeout.get();
        let group = if want > 0 {
            tracing::info!(
                replicas = want,
                online = look.online,
                timeout = ?timeout,
                "acknowledging writes once Redis replicas confirm them (redis.ack_replicas)"
            );
            let own = match target {
                Some(t) => super::connect(t, timeout + Duration::from_secs(10)).await?,
                None => conn.clone(),
            };
            let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
            tokio::spawn(commit(own, want, timeout, rx));
            Some(tx)
        } else {
            None
        };
        let acks = Acks {
            want,
            timeout,
            barrier_key: format!("{}acks", settings.prefix),
            metrics,
            health,
            failing: AtomicBool::new(false),
            online: AtomicU32::new(look.online),
            group,
        };
        acks.show(&look);
        Ok(acks)
    }

    /// Waits for no replica (a part built without a Redis look, e.g. in unit tests).
    pub fn none(metrics: Arc<Metrics>) -> Acks {
        Acks {
            want: 0,
            timeout: Duration::from_secs(1),
            barrier_key: String::new(),
            metrics,
            health: None,
            failing: AtomicBool::new(false),
            online: AtomicU32::new(0),
            group: None,
        }
    }

    /// Replicas each acknowledged write waits for.
    pub fn want(&self) -> u32 {
        self.want
    }

    /// How long a write waits for them.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs `cmds` (inside MULTI/EXEC when `atomic`) and then, when replicas are wanted,
    /// WAIT, in one pipeline on the acknowledging connection (with the other writes that
    /// wait at the same time); returns the commands' replies in order (the reply of EXEC
    /// when atomic), as `T`. Without replicas to wait for, it runs on `conn`. `path` names
    /// the answer for the metric.
    pub async fn write<T: FromRedisValue>(
        &self,
        conn: &mut RedisConn,
        cmds: &Pipeline,
        atomic: bool,
        path: &'static str,
    ) -> Result<T, AckError> {
        let value = match &self.group {
            None => {
                let mut p = redis::pipe();
                add(&mut p, cmds, atomic);
                let mut replies: Vec<Value> = p.query_async(conn).await?;
                take(&mut replies, atomic)?
            }
            // While the replicas are known not to confirm (the last commit or probe), a
            // write is refused at once, before anything is written: nobody queues for a
            // WAIT bound to fail. The probe finds when they confirm again.
            Some(_) if self.failing.load(Ordering::Relaxed) && path != PROBE => {
                return Err(self.refuse(0, path));
            }
            Some(tx) => {
                let (reply, rx) = tokio::sync::oneshot::channel();
                let gone = || {
                    AckError::Redis(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "the acknowledging connection is gone",
                    )))
                };
                tx.send(Pending {
                    cmds: cmds.clone(),
                    atomic,
                    reply,
                })
                .await
                .map_err(|_| gone())?;
                let (value, confirmed) = rx.await.map_err(|_| gone())??;
                self.judge(confirmed, path)?;
                value
            }
        };
        T::from_redis_value(value).map_err(|e| AckError::Redis(e.into()))
    }

    /// Confirms everything written to the primary so far (a small write, then WAIT), for
    /// an operation of several steps.
    pub async fn barrier(&self, conn: &mut RedisConn, path: &'static str) -> Result<(), AckError> {
        if self.want == 0 {
            return Ok(());
        }
        let mut p = redis::pipe();
        p.cmd("INCR").arg(&self.barrier_key);
        let _: (i64,) = self.write(conn, &p, false, path).await?;
        Ok(())
    }

    fn judge(&self, got: Option<Value>, path: &'static str) -> Result<(), AckError> {
        let got = match got {
            Some(Value::Int(n)) => n,
            _ => -1,
        };
        if got >= i64::from(self.want) {
            if self.failing.swap(false, Ordering::Relaxed) {
                tracing::info!(
                    replicas = got,
                    "Redis replicas confirm writes again: acknowledging"
                );
                self.update_health();
            }
            return Ok(());
        }
        Err(self.refuse(got, path))
    }

    /// Counts and logs a refusal for want of confirmations, and marks the replicas failing.
    /// (The probe's own failures are no refusal: not counted, logged when the state turns.)
    fn refuse(&self, got: i64, path: &'static str) -> AckError {
        let e = AckError::Unconfirmed {
            wanted: self.want,
            got: got.max(0),
            timeout: self.timeout,
        };
        if path != PROBE {
            self.metrics
                .replication
                .ack_timeouts
                .with_label_values(&[path])
                .inc();
            tracing::warn!(path, "{e}");
        }
        if !self.failing.swap(true, Ordering::Relaxed) {
            tracing::warn!("Redis replicas stopped confirming writes: writes are refused (503, 451, CLI errors) until they do");
            self.update_health();
        }
        e
    }

    /// Why this daemon is not ready for want of replicas, if it is not.
    pub fn not_ready(&self) -> Option<String> {
        if self.want == 0 {
            return None;
        }
        let online = self.online.load(Ordering::Relaxed);
        if online < self.want {
            return Some(format!(
                "Redis has {online} replica(s) online, redis.ack_replicas = {}: writes are not acknowledged",
                self.want
            ));
        }
        self.failing.load(Ordering::Relaxed).then(|| {
            format!(
                "Redis replicas do not confirm writes within redis.ack_timeout ({:?}): writes are not acknowledged",
                self.timeout
            )
        })
    }

    fn update_health(&self) {
        if let Some(h) = &self.health {
            h.set_replication(self.not_ready());
        }
    }

    fn show(&self, look: &Replicas) {
        let r = &self.metrics.replication;
        r.replicas.set(i64::from(look.online));
        r.lag_seconds.set(look.max_lag as i64);
        self.online.store(look.online, Ordering::Relaxed);
        let ok = self.not_ready().is_none();
        self.metrics
            .redis_check
            .with_label_values(&["replication"])
            .set(i64::from(ok));
        self.update_health();
    }
}

/// `EVAL` of `src` over `keys`, to which the caller adds ARGV: a script inside an
/// acknowledged pipeline (Redis caches the compiled script by its hash).
pub fn eval(src: &str, keys: &[&str]) -> Cmd {
    let mut c = redis::cmd("EVAL");
    c.arg(src).arg(keys.len());
    for k in keys {
        c.arg(*k);
    }
    c
}

/// What the primary says of its replicas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replicas {
    /// Replicas connected, in any state (syncing or online).
    pub connected: u32,
    /// Replicas in state `online`.
    pub online: u32,
    /// The largest `lag` of those (seconds since its last REPLCONF ACK).
    pub max_lag: u64,
}

/// Reads `INFO replication` from the primary that serves `prefix`.
pub async fn replication(conn: &mut RedisConn, prefix: &str) -> redis::RedisResult<Replicas> {
    let mut cmd = redis::cmd("INFO");
    cmd.arg("replication");
    let info: String = conn.on_primary(cmd, prefix).await?;
    Ok(parse_replicas(&info))
}

fn parse_replicas(info: &str) -> Replicas {
    let mut r = Replicas::default();
    for line in info.lines() {
        let Some((name, fields)) = line.split_once(':') else {
            continue;
        };
        if !(name.starts_with("slave") && name[5..].bytes().all(|b| b.is_ascii_digit())) {
            continue;
        }
        let field = |k: &str| {
            fields
                .split(',')
                .find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
        };
        r.connected += 1;
        if field("state") == Some("online") {
            r.online += 1;
            let lag = field("lag")
                .and_then(|l| l.trim().parse().ok())
                .unwrap_or(0);
            r.max_lag = r.max_lag.max(lag);
        }
    }
    r
}

/// Every `every` until `stop`: reads the replicas (the gauges, `/readyz`), and when writes
/// wait for replicas, probes with a barrier so that readiness comes back once they
/// confirm again (and goes when they stop, even with no traffic).
pub async fn watch(
    mut conn: RedisConn,
    acks: Arc<Acks>,
    prefix: String,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        // Sooner while writes are refused: they are taken again once a probe confirms.
        let pause = match acks.failing.load(Ordering::Relaxed) {
            true => every.min(Duration::from_millis(500)),
            false => every,
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match replication(&mut conn, &prefix).await {
            Ok(look) => acks.show(&look),
            Err(e) => tracing::debug!(error = %e, "reading Redis replication failed"),
        }
        if acks.want > 0 {
            if let Err(AckError::Redis(e)) = acks.barrier(&mut conn, PROBE).await {
                tracing::debug!(error = %e, "probing Redis replication failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_online_and_their_lag_are_read_from_info() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:3\r\n\
            slave0:ip=127.0.0.1,port=7001,state=online,offset=4410,lag=0\r\n\
            slave1:ip=127.0.0.1,port=7002,state=online,offset=4410,lag=7\r\n\
            slave2:ip=127.0.0.1,port=7003,state=wait_bgsave,offset=0,lag=0\r\n\
            slave_expires_tracked_keys:0\r\nmaster_repl_offset:4410\r\n";
        assert_eq!(
            parse_replicas(info),
            Replicas {
                connected: 3,
                online: 2,
                max_lag: 7
            }
        );
        assert_eq!(
            parse_replicas("role:master\r\nconnected_slaves:0\r\n"),
            Replicas::default()
        );
    }

    #[test]
    fn a_short_count_is_a_refusal_that_says_what_to_do() {
        let acks = Acks {
            want: 1,
            timeout: Duration::from_millis(500),
            barrier_key: "p:acks".into(),
            metrics: Arc::new(Metrics::new()),
            health: Some(Arc::new(Health::default())),
            failing: AtomicBool::new(false),
            online: AtomicU32::new(1),
            group: None,
        };
        assert!(acks.judge(Some(Value::Int(1)), "api_sends").is_ok());
        assert!(acks.not_ready().is_none());
        let e = acks.judge(Some(Value::Int(0)), "api_sends").unwrap_err();
        assert!(e.to_string().contains("redis.ack_replicas"), "{e}");
        assert!(acks.not_ready().is_some());
        assert!(acks.health.as_ref().unwrap().not_ready().is_some());
        assert_eq!(
            acks.metrics
                .replication
                .ack_timeouts
                .with_label_values(&["api_sends"])
                .get(),
            1
        );
        assert!(acks.judge(Some(Value::Int(2)), "api_sends").is_ok());
        assert!(acks.health.as_ref().unwrap().not_ready().is_none());
    }
}

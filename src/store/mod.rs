//! The Redis connection every part of paloma uses: one server (`redis.url`, through a
//! reconnecting `ConnectionManager`) or a Redis Cluster (`redis.cluster_nodes`, through the
//! cluster client, which follows slot moves and failovers), or the primary that Redis
//! Sentinel names (`redis.sentinels`, followed across failovers: `sentinel`).
//!
//! In a cluster, a job's outcome is one transaction over several keys (event stream, stream
//! acknowledgement, idempotency, stats), and Lua scripts touch several keys: all of paloma's
//! keys must share a hash slot. They all start with `redis.prefix`, so the prefix carries a
//! hash tag (`{paloma}:`), and a cluster configuration without one is refused.

pub mod checks;
pub mod clock;
pub mod keys;
pub mod replication;
pub mod sentinel;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::config::Settings;
use crate::values::RedisUrl;

/// True when Redis answered with an error that comes again however often the same
/// command is sent (WRONGTYPE: another tool wrote a key of another type; a script's own
/// error), as against an outage (no connection, a timeout, loading, a failover, out of
/// memory), which waiting mends. Writers bound their retries of the first kind only.
pub fn is_refusal(e: &redis::RedisError) -> bool {
    matches!(e.code(), Some("WRONGTYPE" | "ERR" | "EXECABORT"))
}

/// Where Redis is: a server, a cluster, or a primary found through Sentinel.
pub enum RedisTarget {
    Single(redis::Client),
    Cluster(Box<ClusterClient>),
    Sentinel(Arc<sentinel::SentinelTarget>),
}

/// A connection to any of them; cheap to clone (each multiplexes one set of sockets).
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(sentinel::SentinelConn),
}

impl RedisConn {
    /// Whether it talks to a Redis Cluster (server commands such as INFO then answer for
    /// one node of several).
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(_))
    }

    /// Sends a command that names no key to the primary that serves `key`'s slot (in a
    /// cluster; elsewhere there is one primary).
    pub async fn on_primary<T: redis::FromRedisValue>(
        &mut self,
        cmd: Cmd,
        key: &str,
    ) -> redis::RedisResult<T> {
        use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};
        let v = match self {
            RedisConn::Cluster(c) => {
                let route = Route::with_slot(Slot::for_key(key), SlotAddr::Master);
                c.route_command(
                    cmd,
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                )
                .await?
            }
            other => cmd.query_async::<Value>(other).await?,
        };
        T::from_redis_value(v).map_err(Into::into)
    }
}

impl From<ConnectionManager> for RedisConn {
    fn from(c: ConnectionManager) -> Self {
        RedisConn::Single(c)
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
            RedisConn::Sentinel(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Sentinel(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
            RedisConn::Sentinel(c) => c.get_db(),
        }
    }
}

/// Whether `prefix` holds a hash tag (`{…}` with something inside), which puts every key
/// under it in one cluster slot.
pub fn has_hash_tag(prefix: &str) -> bool {
    prefix
        .find('{')
        .and_then(|open| prefix[open + 1..].find('}'))
        .is_some_and(|len| len > 0)
}

pub async fn redis_target(settings: &Settings) -> anyhow::Result<RedisTarget> {
    let r = &settings.redis;
    if !r.sentinels.is_empty() {
        return sentinel::SentinelTarget::new(&r.sentinels, &r.service_name, &r.url)
            .map(|t| RedisTarget::Sentinel(Arc::new(t)))
            .with_context(|| {
                format!(
                    "redis.sentinels {:?} are not valid Redis URLs (or redis.url {:?} is not)",
                    r.sentinels, r.url
                )
            });
    }
    if r.cluster_nodes.is_empty() {
        return redis::Client::open(r.url.expose())
            .map(RedisTarget::Single)
            .with_context(|| format!("redis.url {:?} is not a valid Redis URL", r.url));
    }
    if !has_hash_tag(&r.prefix) {
        anyhow::bail!(
            "redis.cluster_nodes: redis.prefix {:?} has no hash tag; in a cluster every paloma key must share a slot (outcomes are written in one transaction): use e.g. prefix = \"{{paloma}}:\"",
            r.prefix
        );
    }
    ClusterClient::builder(r.cluster_nodes.iter().map(RedisUrl::expose))
        .connection_timeout(Duration::from_secs(5))
        // No resending: a transaction whose reply was lost or late would run twice (events
        // and stats doubled). As with one server, a failed request is an error, and each
        // writer decides (the recorder checks its batch marker first). MOVED still makes
        // the client refresh its slot map.
        .retries(0)
        .build()
        .map(|c| RedisTarget::Cluster(Box::new(c)))
        .with_context(|| {
            format!(
                "redis.cluster_nodes {:?} are not valid Redis URLs",
                r.cluster_nodes
            )
        })
}

/// A connection whose commands time out after `response_timeout` (blocking reads need more
/// than the others), reconnecting on its own.
pub async fn connect(
    target: &RedisTarget,
    response_timeout: Duration,
) -> anyhow::Result<RedisConn> {
    let conn = match target {
        RedisTarget::Single(client) => {
            let cfg = ConnectionManagerConfig::new()
                .set_response_timeout(Some(response_timeout))
                .set_connection_timeout(Some(Duration::from_secs(5)))
                .set_number_of_retries(6)
                .set_max_delay(Duration::from_secs(2));
            client
                .get_connection_manager_with_config(cfg)
                .await
                .map(RedisConn::Single)
                .context("cannot connect to Redis (is it running at redis.url?)")
        }
        RedisTarget::Sentinel(target) => {
            let cfg = ConnectionManagerConfig::new()
                .set_response_timeout(Some(response_timeout))
                .set_connection_timeout(Some(Duration::from_secs(5)))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_secs(1));
            sentinel::SentinelConn::connect(target.clone(), cfg)
                .await
                .map(RedisConn::Sentinel)
                .context("cannot reach the Redis primary through Sentinel (redis.sentinels, redis.service_name)")
        }
        RedisTarget::Cluster(client) => {
            let cfg = redis::cluster::ClusterConfig::new()
                .set_response_timeout(response_timeout)
                .set_connection_timeout(Duration::from_secs(5));
            client
                .get_async_connection_with_config(cfg)
                .await
                .map(RedisConn::Cluster)
                .context("cannot connect to the Redis Cluster (redis.cluster_nodes)")
        }
    }?;
    // Due times written through it (a daemon's retries, a CLI's `campaign resume`) follow
    // the server's clock (`clock`); a server that does not answer TIME leaves the offset.
    if let Err(e) = clock::sync(&mut conn.clone()).await {
        tracing::debug!(error = %e, "reading the Redis server's TIME failed");
    }
    Ok(conn)
}

/// Connects, and waits until the server answers commands (it may be starting, or loading
/// its AOF after a restart: `LOADING`), for at most `patience`. A daemon started together
/// with Redis, or right after Redis restarts, then comes up instead of exiting.
pub async fn connect_when_serving(
    target: &RedisTarget,
    response_timeout: Duration,
    probe_key: &str,
    patience: Duration,
) -> anyhow::Result<RedisConn> {
    let deadline = Instant::now() + patience;
    let mut said = Instant::now() - Duration::from_secs(10);
    loop {
        let attempt = async {
            let mut conn = connect(target, response_timeout).await?;
            redis::cmd("EXISTS")
                .arg(probe_key)
                .query_async::<i64>(&mut conn)
                .await
                .context("Redis does not answer commands yet")?;
            anyhow::Ok(conn)
        };
        match attempt.await {
            Ok(conn) => return Ok(conn),
            Err(e) if Instant::now() < deadline => {
                if said.elapsed() >= Duration::from_secs(5) {
                    tracing::warn!(error = format!("{e:#}"), "waiting for Redis");
                    said = Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e.context(format!("Redis did not answer within {patience:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hash_tags() {
        assert!(super::has_hash_tag("{paloma}:"));
        assert!(super::has_hash_tag("app:{p}:"));
        assert!(!super::has_hash_tag("paloma:"));
        assert!(!super::has_hash_tag("{}paloma:"));
        assert!(!super::has_hash_tag("{paloma:"));
    }
}

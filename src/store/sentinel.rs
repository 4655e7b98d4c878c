//! A connection to the primary that Redis Sentinel names for `redis.service_name`, which
//! follows a failover without a restart.
//!
//! The commands go through a `ConnectionManager` to the primary's address. When one fails
//! in a way a failover explains (the connection refused or dropped, a timeout, `READONLY`
//! from a demoted primary, `MASTERDOWN`), the Sentinels are asked again; when they name
//! another address, the next command goes there. The failed command is not sent again
//! (whether it ran is unknown): it is returned as an error, and each writer decides, as
//! with one server (the recorder checks its batch marker, the intake retries its claim).
//!
//! After a promotion the new primary has what the old one had replicated to it; what it
//! lacks is what `redis.ack_replicas` guards against (`store::replication`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Cmd, ConnectionAddr, IntoConnectionInfo, Pipeline, RedisFuture, RedisResult, Value};

use crate::values::RedisUrl;

/// Where to ask: the Sentinels, the name they monitor, and the primary's credentials.
pub struct SentinelTarget {
    client: tokio::sync::Mutex<SentinelClient>,
}

impl SentinelTarget {
    /// `url` gives the primary's username, password and database (its host is not used).
    pub fn new(sentinels: &[RedisUrl], service_name: &str, url: &RedisUrl) -> RedisResult<Self> {
        let primary = url.expose().into_connection_info()?;
        let node = SentinelNodeConnectionInfo::default()
            .set_redis_connection_info(primary.redis_settings().clone());
        let infos = sentinels
            .iter()
            .map(|s| s.expose().into_connection_info())
            .collect::<RedisResult<Vec<_>>>()?;
        let client = SentinelClient::build(
            infos,
            service_name.to_string(),
            Some(node),
            SentinelServerType::Master,
        )?;
        Ok(Self {
            client: tokio::sync::Mutex::new(client),
        })
    }

    /// The current primary, as the Sentinels name it (and it confirms with ROLE).
    async fn primary(&self) -> RedisResult<redis::Client> {
        self.client.lock().await.async_get_client().await
    }
}

/// A reconnecting connection to the current primary; cheap to clone.
#[derive(Clone)]
pub struct SentinelConn {
    inner: Arc<Inner>,
}

struct Inner {
    target: Arc<SentinelTarget>,
    config: ConnectionManagerConfig,
    current: Mutex<(ConnectionManager, ConnectionAddr)>,
    /// When the Sentinels were last asked: at most one look per `LOOK_EVERY`.
    looked: tokio::sync::Mutex<Instant>,
}

/// Bounds how often a run of failing commands asks the Sentinels.
const LOOK_EVERY: Duration = Duration::from_millis(250);

impl SentinelConn {
    pub async fn connect(
        target: Arc<SentinelTarget>,
        config: ConnectionManagerConfig,
    ) -> RedisResult<Self> {
        let client = target.primary().await?;
        let addr = client.get_connection_info().addr().clone();
        let manager = client
            .get_connection_manager_with_config(config.clone())
            .await?;
        tracing::debug!(primary = %addr, "Redis primary found through Sentinel");
        Ok(Self {
            inner: Arc::new(Inner {
                target,
                config,
                current: Mutex::new((manager, addr)),
                looked: tokio::sync::Mutex::new(Instant::now()),
            }),
        })
    }

    fn manager(&self) -> ConnectionManager {
        self.inner
            .current
            .lock()
            .map(|g| g.0.clone())
            .unwrap_or_else(|p| p.into_inner().0.clone())
    }

    /// Asks the Sentinels where the primary is now, and moves there when it moved.
    async fn look_again(&self) {
        let mut looked = self.inner.looked.lock().await;
        if looked.elapsed() < LOOK_EVERY {
            return;
        }
        *looked = Instant::now();
        let client = match self.inner.target.primary().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "asking the Sentinels for the primary failed");
                return;
            }
        };
        let addr = client.get_connection_info().addr().clone();
        let same = self
            .inner
            .current
            .lock()
            .map(|g| g.1 == addr)
            .unwrap_or(false);
        if same {
            return;
        }
        match client
            .get_connection_manager_with_config(self.inner.config.clone())
            .await
        {
            Ok(manager) => {
                tracing::warn!(primary = %addr, "Redis primary moved (Sentinel failover): following it");
                if let Ok(mut g) = self.inner.current.lock() {
                    *g = (manager, addr);
                }
            }
            Err(e) => {
                tracing::warn!(primary = %addr, error = %e, "cannot connect to the new Redis primary yet")
            }
        }
    }
}

/// Whether `e` may mean the primary is gone or demoted.
fn points_to_failover(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(e.code(), Some("READONLY" | "MASTERDOWN" | "LOADING"))
        || e.clone()
            .into_server_errors()
            .is_some_and(|errs| errs.iter().any(|(_, s)| s.code() == "READONLY"))
}

impl ConnectionLike for SentinelConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let r = self.manager().req_packed_command(cmd).await;
            if let Err(e) = &r {
                if points_to_failover(e) {
                    self.look_again().await;
                }
            }
            r
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let r = self
                .manager()
                .req_packed_commands(pipeline, offset, count)
                .await;
            if let Err(e) = &r {
                if points_to_failover(e) {
                    self.look_again().await;
                }
            }
            r
        })
    }

    fn get_db(&self) -> i64 {
        self.manager().get_db()
    }
}

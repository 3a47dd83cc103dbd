//! Which Redis the store talks to: one server, or the master that Sentinel names, followed
//! across failovers.
//!
//! Under Sentinel a task asks the Sentinels for the master every [`FOLLOW_EVERY`] (the redis
//! crate's `SentinelClient`, which also checks the named server's `ROLE`), and when the master
//! changed swaps in a connection to the new one. Calls made meanwhile go to the old master and
//! fail (it is dead, or refuses writes as a replica): callers see `UNAVAILABLE` and retry, and no
//! call is ever answered by a replica.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::SentinelClient;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How often the Sentinels are asked where the master is.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);

/// The master in use: a client of it, and the shared connection to it.
#[derive(Clone)]
pub struct Current {
    client: redis::Client,
    conn: ConnectionManager,
}

impl std::fmt::Debug for Current {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Current")
            .field(
                "addr",
                &self.client.get_connection_info().addr().to_string(),
            )
            .finish_non_exhaustive()
    }
}

/// The Redis the store uses now.
#[derive(Clone)]
pub struct Target {
    current: tokio::sync::watch::Sender<Option<Current>>,
    /// How long a call waits for the first master to be known.
    wait: Duration,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let known = self
            .current
            .borrow()
            .as_ref()
            .map(|c| c.client.get_connection_info().addr().to_string());
        f.debug_struct("Target").field("master", &known).finish()
    }
}

fn not_yet() -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "no redis master known yet"))
}

impl Target {
    /// One Redis server.
    pub fn fixed(
        client: redis::Client,
        config: ConnectionManagerConfig,
    ) -> redis::RedisResult<Self> {
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
        Ok(Self {
            current: tokio::sync::watch::Sender::new(Some(Current { client, conn })),
            wait: Duration::ZERO,
        })
    }

    /// The master `sentinel` names, followed by a task until `shutdown`.
    pub fn following(
        sentinel: SentinelClient,
        config: ConnectionManagerConfig,
        timeout: Duration,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        let this = Self {
            current: tokio::sync::watch::Sender::new(None),
            wait: timeout,
        };
        tasks.spawn(this.clone().follow(sentinel, config, timeout, shutdown));
        this
    }

    async fn follow(
        self,
        mut sentinel: SentinelClient,
        config: ConnectionManagerConfig,
        timeout: Duration,
        shutdown: CancellationToken,
    ) {
        let mut failing = false;
        loop {
            match tokio::time::timeout(timeout, sentinel.async_get_client()).await {
                Ok(Ok(client)) => {
                    failing = false;
                    let addr = client.get_connection_info().addr().to_string();
                    let known = self
                        .read()
                        .map(|c| c.client.get_connection_info().addr().to_string());
                    if known.as_deref() != Some(addr.as_str()) {
                        match ConnectionManager::new_lazy_with_config(
                            client.clone(),
                            config.clone(),
                        ) {
                            Ok(conn) => {
                                tracing::info!(master = %addr, previous = ?known, "redis master (from sentinel)");
                                self.current.send_replace(Some(Current { client, conn }));
                            }
                            Err(error) => {
                                tracing::warn!(%error, "cannot set up the redis master's connection")
                            }
                        }
                    }
                }
                outcome => {
                    if !failing {
                        let error = match outcome {
                            Ok(Err(e)) => e.to_string(),
                            _ => "timed out".to_owned(),
                        };
                        tracing::warn!(%error, "sentinel did not name a redis master; asking again");
                        failing = true;
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(FOLLOW_EVERY) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    fn read(&self) -> Option<Current> {
        self.current.borrow().clone()
    }

    /// The current master; before the first one is known, waits for it (within the call's
    /// time bound).
    async fn known(&self) -> redis::RedisResult<Current> {
        if let Some(current) = self.read() {
            return Ok(current);
        }
        let mut changes = self.current.subscribe();
        match tokio::time::timeout(self.wait, changes.wait_for(Option::is_some)).await {
            Ok(Ok(current)) => current.clone().ok_or_else(not_yet),
            _ => Err(not_yet()),
        }
    }

    /// Tells when another master is named.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<Option<Current>> {
        self.current.subscribe()
    }

    /// The shared multiplexed connection to the current master.
    pub async fn conn(&self) -> redis::RedisResult<ConnectionManager> {
        self.known().await.map(|c| c.conn)
    }

    /// A client of the current master (for pub/sub and the audit writer's connections).
    pub async fn client(&self) -> redis::RedisResult<redis::Client> {
        self.known().await.map(|c| c.client)
    }
}

//! Which Redis the store talks to: one server, the master that Sentinel names (followed
//! across failovers), or a Redis Cluster.
//!
//! Under Cluster the redis crate's cluster connection routes each command to the master of its
//! key's slot and follows slot moves and failovers (`MOVED`, reconnects, topology refreshes);
//! it is set up at the first call (and again after a call that could not set it up), so the
//! store starts while the cluster is away.
//!
//! Under Sentinel a task asks the Sentinels for the master every [`FOLLOW_EVERY`] (the redis
//! crate's `SentinelClient`, which also checks the named server's `ROLE`), and when the master
//! changed swaps in a connection to the new one. Calls made meanwhile go to the old master and
//! fail (it is dead, or refuses writes as a replica): callers see `UNAVAILABLE` and retry, and no
//! call is ever answered by a replica.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::SentinelClient;
use redis::{Cmd, Pipeline, RedisFuture, Value};
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

/// A connection to where the store's keys are: the (current) master, or the whole cluster.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Single(_) => "Conn::Single",
            Self::Cluster(_) => "Conn::Cluster",
        })
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// A Redis Cluster: its client, and the shared connection once it is set up.
struct Cluster {
    client: ClusterClient,
    /// Set once, at the first call that reaches the cluster (no lock on the hot path after).
    conn: tokio::sync::OnceCell<ClusterConnection>,
}

/// The Redis the store uses now.
#[derive(Clone)]
pub struct Target {
    current: tokio::sync::watch::Sender<Option<Current>>,
    /// Set under Cluster (and then `current` stays empty).
    cluster: Option<std::sync::Arc<Cluster>>,
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
        f.debug_struct("Target")
            .field("master", &known)
            .field("cluster", &self.cluster.is_some())
            .finish()
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
            cluster: None,
            wait: Duration::ZERO,
        })
    }

    /// A Redis Cluster; calls wait up to `timeout` for its connection to be set up.
    pub fn cluster(client: ClusterClient, timeout: Duration) -> Self {
        Self {
            current: tokio::sync::watch::Sender::new(None),
            cluster: Some(std::sync::Arc::new(Cluster {
                client,
                conn: tokio::sync::OnceCell::new(),
            })),
            wait: timeout,
        }
    }

    /// Whether the keys live in a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
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
            cluster: None,
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

    /// The shared multiplexed connection to the current master, or to the cluster.
    pub async fn conn(&self) -> redis::RedisResult<Conn> {
        let Some(cluster) = &self.cluster else {
            return self.known().await.map(|c| Conn::Single(c.conn));
        };
        let conn = cluster
            .conn
            .get_or_try_init(|| async {
                let conn = tokio::time::timeout(self.wait, cluster.client.get_async_connection())
                    .await
                    .map_err(|_| {
                        redis::RedisError::from((
                            redis::ErrorKind::Io,
                            "redis cluster not reachable",
                        ))
                    })??;
                tracing::info!("redis cluster connected");
                Ok::<_, redis::RedisError>(conn)
            })
            .await?;
        Ok(Conn::Cluster(conn.clone()))
    }

    /// A connection of its own (for the audit writer, whose long reads should not queue in
    /// front of the floor's calls): to the current master, or to the cluster.
    pub async fn dedicated(&self) -> redis::RedisResult<Conn> {
        match &self.cluster {
            Some(cluster) => Ok(Conn::Cluster(
                tokio::time::timeout(
                    self.wait.max(Duration::from_secs(1)),
                    cluster.client.get_async_connection(),
                )
                .await
                .map_err(|_| {
                    redis::RedisError::from((redis::ErrorKind::Io, "redis cluster not reachable"))
                })??,
            )),
            None => {
                let client = self.known().await?.client;
                Ok(Conn::Single(ConnectionManager::new(client).await?))
            }
        }
    }

    /// A client of the current master (for pub/sub and the audit writer's connections); not
    /// under Cluster, whose nodes are reached through [`Target::conn`].
    pub async fn client(&self) -> redis::RedisResult<redis::Client> {
        if self.cluster.is_some() {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "a redis cluster has no single master",
            )));
        }
        self.known().await.map(|c| c.client)
    }
}

impl Conn {
    /// The keys matching `pattern`: on one server one `SCAN`, under Cluster one on every master.
    pub async fn scan_keys(&mut self, pattern: &str) -> redis::RedisResult<Vec<String>> {
        match self {
            Self::Single(conn) => {
                let mut found = Vec::new();
                let mut iter: redis::AsyncIter<String> =
                    redis::AsyncCommands::scan_match(conn, pattern).await?;
                while let Some(key) = iter.next_item().await {
                    found.push(key?);
                }
                Ok(found)
            }
            Self::Cluster(conn) => {
                let mut found = Vec::new();
                for (host, port) in cluster_masters(conn).await? {
                    let mut cursor = 0u64;
                    loop {
                        let route = redis::cluster_routing::RoutingInfo::SingleNode(
                            redis::cluster_routing::SingleNodeRoutingInfo::ByAddress {
                                host: host.clone(),
                                port,
                            },
                        );
                        let mut cmd = redis::cmd("SCAN");
                        cmd.arg(cursor)
                            .arg("MATCH")
                            .arg(pattern)
                            .arg("COUNT")
                            .arg(1000);
                        let reply = conn.route_command(cmd, route).await?;
                        let (next, keys): (u64, Vec<String>) = redis::from_redis_value(reply)?;
                        found.extend(keys);
                        if next == 0 {
                            break;
                        }
                        cursor = next;
                    }
                }
                Ok(found)
            }
        }
    }
}

/// The masters of a cluster that serve slots, from `CLUSTER NODES`.
async fn cluster_masters(conn: &mut ClusterConnection) -> redis::RedisResult<Vec<(String, u16)>> {
    let reply = conn
        .route_command(
            redis::cmd("CLUSTER").arg("NODES").to_owned(),
            redis::cluster_routing::RoutingInfo::SingleNode(
                redis::cluster_routing::SingleNodeRoutingInfo::Random,
            ),
        )
        .await?;
    let text: String = redis::from_redis_value(reply)?;
    Ok(parse_cluster_masters(&text))
}

/// `host:port` of every line of `CLUSTER NODES` that is a master, not failed, with slots.
pub fn parse_cluster_masters(text: &str) -> Vec<(String, u16)> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = fields.get(2)?;
            let serving = flags.split(',').any(|f| f == "master")
                && !flags
                    .split(',')
                    .any(|f| f == "fail" || f == "fail?" || f == "noaddr")
                && fields.len() > 8;
            if !serving {
                return None;
            }
            // `ip:port@cport[,hostname]`
            let addr = fields.get(1)?.split('@').next()?;
            let (host, port) = addr.rsplit_once(':')?;
            Some((host.to_owned(), port.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::parse_cluster_masters;

    #[test]
    fn cluster_nodes_masters_with_slots_only() {
        let text = "\
a1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:30002@40002 master - 0 1 2 connected 5461-10922
c3 127.0.0.1:30003@40003 master,fail - 0 1 3 disconnected 10923-16383
d4 127.0.0.1:30004@40004 slave b2 0 1 2 connected
e5 127.0.0.1:30005@40005 master - 0 1 5 connected
";
        assert_eq!(
            parse_cluster_masters(text),
            vec![
                ("127.0.0.1".to_owned(), 30001),
                ("127.0.0.1".to_owned(), 30002)
            ]
        );
    }
}

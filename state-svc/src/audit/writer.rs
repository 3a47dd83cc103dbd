//! The audit writer: copies the audit streams into PostgreSQL.
//!
//! - Idempotent: rows are keyed by (stream, entry id) and inserted with `ON CONFLICT DO
//!   NOTHING`, so copying an entry twice (a retry, two replicas) leaves one row.
//! - Nothing lost while PostgreSQL is down: entries are read through a consumer group and
//!   acknowledged only after the transaction that holds them commits; unacknowledged entries
//!   stay pending in Redis and are read again (pending first) when PostgreSQL is back. Each
//!   replica reads as its own consumer; entries another consumer has held unacknowledged for
//!   [`STALE_PENDING`] (a replica that died mid-copy) are claimed and copied, and consumers
//!   idle for [`IDLE_CONSUMER`] with nothing pending are removed.
//! - Which streams have news: the channel events the same scripts publish (pattern
//!   subscription), plus a periodic `SCAN` that also finds streams with only denials (which
//!   publish nothing).
//! - Copied entries are trimmed from the stream once none is pending, checked and trimmed in
//!   one atomic step ([`TRIM_COPIED`]), and only then: with the writer on, the floor scripts
//!   cap nothing but denials (rate-limited per channel, and refused past the backlog ceiling),
//!   so an outage grows the streams by grants and releases instead of losing history.
//!   `ptt_audit_backlog_entries` says how much waits. A fully copied stream of a sync session
//!   that is gone, or of a channel idle for [`IDLE_STREAM`], is removed with its cursor row.
//! - Rows older than the retention are deleted at start and every [`RETENTION_EVERY`].
//! - Schema migrations run at start, under an advisory lock, recorded in `schema_migrations`.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use redis::AsyncCommands;
use redis::streams::{StreamReadOptions, StreamReadReply};
use tokio_util::sync::CancellationToken;

use super::migrations::migrate;
use crate::domain::Topic;
use crate::store::redis::Keys;
use crate::store::redis::scripts::TRIM_COPIED;

/// The consumer group every replica reads through.
const GROUP: &str = "audit-writer";
/// Entries another consumer has held this long without acknowledging them are claimed.
const STALE_PENDING: Duration = Duration::from_secs(30);
/// A channel's audit stream with nothing appended this long, all of it copied, is removed
/// (with its cursor row): a channel id pressed once does not keep a stream forever.
const IDLE_STREAM: Duration = Duration::from_secs(600);
/// How often rows past the retention are deleted (and once at every start).
const RETENTION_EVERY: Duration = Duration::from_secs(600);
/// Rows deleted per statement.
const RETENTION_BATCH: u64 = 10_000;
/// Consumers idle this long with nothing pending are removed from the group.
const IDLE_CONSUMER: Duration = Duration::from_secs(600);

/// Entries in the audit streams not yet copied to PostgreSQL (pending and undelivered), as of
/// the writer's last look.
pub static AUDIT_BACKLOG: std::sync::LazyLock<prometheus_client::metrics::gauge::Gauge> =
    std::sync::LazyLock::new(prometheus_client::metrics::gauge::Gauge::default);
/// Under Redis Cluster (no pattern subscriptions on sharded pub/sub), how often at least every
/// master is swept for audit streams with news.
const CLUSTER_SWEEP: Duration = Duration::from_secs(1);
/// Entries copied per transaction.
const BATCH: usize = 500;
const BACKOFF: [u64; 6] = [1, 2, 4, 8, 16, 30];

#[derive(Debug, thiserror::Error)]
enum AuditError {
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("{0}")]
    Lost(&'static str),
}

/// One sync-session stream entry as a row.
#[derive(Debug)]
struct SyncRow {
    entry_id: String,
    session_id: String,
    version: i64,
    action: String,
    at_ms: i64,
    state: String,
}

/// One floor stream entry as a row.
#[derive(Debug)]
struct Row {
    entry_id: String,
    channel: String,
    event: String,
    session: Option<String>,
    user: Option<String>,
    epoch: Option<String>,
    at_ms: i64,
    held_ms: Option<i64>,
    fields: serde_json::Value,
}

fn field(map: &std::collections::HashMap<String, redis::Value>, k: &str) -> Option<String> {
    map.get(k).and_then(|v| match v {
        redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        redis::Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    })
}

fn sync_row(
    entry_id: String,
    session_id: &crate::domain::SyncId,
    map: &std::collections::HashMap<String, redis::Value>,
) -> SyncRow {
    let text = |k: &str| field(map, k);
    SyncRow {
        entry_id,
        session_id: session_id.to_string(),
        version: text("version")
            .and_then(|s| s.parse().ok())
            .unwrap_or_default(),
        action: text("action").unwrap_or_default(),
        at_ms: text("at").and_then(|s| s.parse().ok()).unwrap_or_default(),
        state: text("state").unwrap_or_else(|| "{}".to_owned()),
    }
}

fn row(entry_id: String, map: &std::collections::HashMap<String, redis::Value>) -> Row {
    let text = |k: &str| field(map, k);
    let fields: BTreeMap<&String, String> =
        map.keys().filter_map(|k| Some((k, text(k)?))).collect();
    Row {
        entry_id,
        channel: text("ch").unwrap_or_default(),
        event: text("ev").unwrap_or_default(),
        session: text("sid").filter(|s| !s.is_empty()),
        user: text("uid").filter(|s| !s.is_empty()),
        epoch: text("epoch").filter(|s| !s.is_empty()),
        at_ms: text("at").and_then(|s| s.parse().ok()).unwrap_or_default(),
        held_ms: text("held_ms").and_then(|s| s.parse().ok()),
        fields: serde_json::to_value(fields).unwrap_or_default(),
    }
}

/// Records the last entry copied from `stream`, in the transaction that copied it.
async fn advance_cursor(
    tx: &tokio_postgres::Transaction<'_>,
    stream: &str,
    last: &str,
) -> Result<u64, tokio_postgres::Error> {
    tx.execute(
        "INSERT INTO audit_cursor (stream, last_id) VALUES ($1, $2)
         ON CONFLICT (stream) DO UPDATE SET last_id = EXCLUDED.last_id, updated_at = now()",
        &[&stream, &last],
    )
    .await
}

/// The writer's settings.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    pub postgres: crate::connect::PostgresConnect,
    /// How often every audit stream is looked at, whatever the events say.
    pub sweep: Duration,
    /// How long rows are kept in the audit database.
    pub retention: Duration,
}

pub struct AuditWriter {
    redis: crate::store::redis::Target,
    keys: Keys,
    settings: AuditSettings,
    /// This replica's consumer name in the group.
    consumer: String,
}

impl std::fmt::Debug for AuditWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditWriter")
            .field("sweep", &self.settings.sweep)
            .finish_non_exhaustive()
    }
}

impl AuditWriter {
    pub fn new(redis: crate::store::redis::Target, keys: Keys, settings: AuditSettings) -> Self {
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty() && h.len() <= 64 && h.chars().all(|c| c.is_ascii_graphic()))
            .unwrap_or_else(|| "state-svc".to_owned());
        let consumer = format!("{host}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        Self {
            redis,
            keys,
            settings,
            consumer,
        }
    }

    /// Counts what waits to be copied ([`AUDIT_BACKLOG`]); Redis only, so it also runs while
    /// PostgreSQL is away.
    async fn measure_backlog(&self) -> Result<u64, AuditError> {
        let mut conn = self.redis.dedicated().await?;
        let mut backlog = 0u64;
        for stream in self.scan(&mut conn).await? {
            backlog += match group_info(&mut conn, &stream).await? {
                Some(group) => {
                    let int = |field: &str| match group.get(field) {
                        Some(redis::Value::Int(n)) => u64::try_from(*n).ok(),
                        _ => None,
                    };
                    match int("lag") {
                        Some(lag) => lag + int("pending").unwrap_or(0),
                        // Redis cannot tell the lag (entries deleted in between): all of it.
                        None => conn.xlen::<_, u64>(&stream).await?,
                    }
                }
                None => conn.xlen::<_, u64>(&stream).await?,
            };
        }
        AUDIT_BACKLOG.set(i64::try_from(backlog).unwrap_or(i64::MAX));
        Ok(backlog)
    }

    /// Copies until shutdown, reconnecting to PostgreSQL and Redis with backoff 1-30 s.
    pub async fn run(self, shutdown: CancellationToken) {
        futures::future::join(self.copy_loop(&shutdown), self.backlog_loop(&shutdown)).await;
    }

    /// Measures the backlog every sweep interval, whether or not PostgreSQL is reachable.
    async fn backlog_loop(&self, shutdown: &CancellationToken) {
        let mut tick = tokio::time::interval(self.settings.sweep);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            if let Err(error) = self.measure_backlog().await {
                tracing::debug!(%error, "audit backlog not measured");
            }
        }
    }

    async fn copy_loop(&self, shutdown: &CancellationToken) {
        let mut attempt = 0usize;
        loop {
            let error = tokio::select! {
                result = self.session(shutdown) => match result {
                    Ok(()) => return,
                    Err(error) => error,
                },
                () = shutdown.cancelled() => return,
            };
            let wait = Duration::from_secs(BACKOFF[attempt.min(BACKOFF.len() - 1)]);
            attempt += 1;
            tracing::warn!(
                %error,
                retry_in_s = wait.as_secs(),
                backlog = AUDIT_BACKLOG.get(),
                "audit writer interrupted; the backlog waits in redis"
            );
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// One connected period: migrate, then copy whatever is marked or swept.
    async fn session(&self, shutdown: &CancellationToken) -> Result<(), AuditError> {
        let (mut pg, connection) = self.settings.postgres.connect().await?;
        let (lost_tx, mut lost) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let _ = lost_tx.send(connection.await);
        });
        migrate(&mut pg).await?;
        self.expire_rows(&pg).await?;
        let mut retention = tokio::time::interval(RETENTION_EVERY);
        retention.tick().await;
        let mut conn = self.redis.dedicated().await?;
        // News of changes: the channels' and sync sessions' events. Sharded pub/sub (under
        // Cluster) has no patterns: there the writer sweeps every master at least every
        // CLUSTER_SWEEP instead.
        let (mut events, sweep_every) = if self.redis.is_cluster() {
            let none: futures::stream::BoxStream<'static, redis::Msg> =
                futures::stream::pending().boxed();
            (none, self.settings.sweep.min(CLUSTER_SWEEP))
        } else {
            let mut pubsub = self.redis.client().await?.get_async_pubsub().await?;
            pubsub
                .psubscribe(self.keys.channel_events_pattern())
                .await?;
            pubsub.psubscribe(self.keys.sync_events_pattern()).await?;
            (pubsub.into_on_message().boxed(), self.settings.sweep)
        };
        tracing::info!("audit writer connected");
        // Everything once at the start: the backlog of an outage included.
        let mut dirty: HashSet<String> = self.scan(&mut conn).await?;
        let mut sweep = tokio::time::interval(sweep_every);
        sweep.tick().await;
        loop {
            for stream in std::mem::take(&mut dirty) {
                self.copy(&mut conn, &mut pg, &stream).await?;
            }
            tokio::select! {
                message = events.next() => {
                    let Some(message) = message else {
                        return Err(AuditError::Lost("redis pub/sub connection lost"));
                    };
                    let name = message.get_channel_name();
                    match self.keys.parse_topic_events(name) {
                        Some(Topic::Channel(ch)) => {
                            dirty.insert(self.keys.channel(&ch).audit);
                        }
                        Some(Topic::Sync(id)) => {
                            let audit = self.keys.sync(&id).audit;
                            dirty.insert(audit);
                        }
                        Some(Topic::User(_)) | None => {}
                    }
                }
                _ = sweep.tick() => dirty = self.scan(&mut conn).await?,
                _ = retention.tick() => self.expire_rows(&pg).await?,
                outcome = &mut lost => {
                    let error = match outcome {
                        Ok(Err(e)) => e.to_string(),
                        _ => "connection closed".to_owned(),
                    };
                    tracing::warn!(%error, "postgres connection lost");
                    return Err(AuditError::Lost("postgres connection lost"));
                }
                () = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    /// Deletes rows past the retention, a batch at a time (no long lock on a large table).
    async fn expire_rows(&self, pg: &tokio_postgres::Client) -> Result<(), AuditError> {
        let retention = i64::try_from(self.settings.retention.as_millis()).unwrap_or(i64::MAX);
        let cutoff = talkgroup_proto::clock::now_ms().saturating_sub(retention);
        let mut deleted = 0;
        for table in ["floor_events", "sync_events"] {
            let sql = format!(
                "DELETE FROM {table} WHERE ctid IN
                 (SELECT ctid FROM {table} WHERE at_ms < $1 LIMIT {RETENTION_BATCH})"
            );
            loop {
                let n = pg.execute(&sql, &[&cutoff]).await?;
                deleted += n;
                if n < RETENTION_BATCH {
                    break;
                }
            }
        }
        if deleted > 0 {
            tracing::info!(rows = deleted, "audit rows past their retention deleted");
        }
        Ok(())
    }

    /// Every channel audit stream in Redis.
    async fn scan(
        &self,
        conn: &mut crate::store::redis::Conn,
    ) -> Result<HashSet<String>, AuditError> {
        let mut found = HashSet::new();
        for pattern in self.keys.audit_patterns() {
            found.extend(conn.scan_keys(&pattern).await?);
        }
        Ok(found)
    }

    /// Copies one stream: entries pending from an earlier try first, then new ones.
    async fn copy(
        &self,
        conn: &mut crate::store::redis::Conn,
        pg: &mut tokio_postgres::Client,
        stream: &str,
    ) -> Result<(), AuditError> {
        let created: redis::RedisResult<()> = conn.xgroup_create(stream, GROUP, "0").await;
        if let Err(e) = created
            && e.code() != Some("BUSYGROUP")
        {
            return Err(e.into());
        }
        self.claim_stale(conn, stream).await?;
        let mut start = "0";
        loop {
            let options = StreamReadOptions::default()
                .group(GROUP, &self.consumer)
                .count(BATCH);
            let reply: StreamReadReply = conn.xread_options(&[stream], &[start], &options).await?;
            let entries: Vec<redis::streams::StreamId> =
                reply.keys.into_iter().flat_map(|k| k.ids).collect();
            if entries.is_empty() {
                if start == ">" {
                    break;
                }
                // Pending ones done: now the new ones.
                start = ">";
                continue;
            }
            let last = entries.last().map(|e| e.id.clone()).unwrap_or_default();
            match self.keys.parse_sync_audit(stream) {
                Some(session) => {
                    let rows: Vec<SyncRow> = entries
                        .iter()
                        .map(|e| sync_row(e.id.clone(), &session, &e.map))
                        .collect();
                    self.insert_sync(pg, stream, &rows, &last).await?;
                }
                None => {
                    let rows: Vec<Row> =
                        entries.iter().map(|e| row(e.id.clone(), &e.map)).collect();
                    self.insert(pg, stream, &rows, &last).await?;
                }
            }
            let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
            let _: i64 = conn.xack(stream, GROUP, &ids).await?;
            tracing::debug!(stream, copied = entries.len(), "audit entries copied");
        }
        // Trim what every replica has copied (nothing may be pending), and drop the stream
        // of a sync session that is gone or of a channel idle for IDLE_STREAM.
        let mut trim = TRIM_COPIED.prepare_invoke();
        trim.key(stream);
        if let Some(id) = self.keys.parse_sync_audit(stream) {
            trim.key(self.keys.sync(&id).state);
        }
        trim.arg(GROUP).arg(IDLE_STREAM.as_millis() as u64);
        let trimmed: i64 = trim.invoke_async(conn).await?;
        if trimmed == 2 {
            pg.execute("DELETE FROM audit_cursor WHERE stream = $1", &[&stream])
                .await?;
            tracing::debug!(
                stream,
                "copied audit stream of an ended channel or sync session removed"
            );
        }
        Ok(())
    }

    /// Takes over entries other consumers have held unacknowledged for [`STALE_PENDING`] (a
    /// replica that died mid-copy), so this copy reads them as its own pending ones; removes
    /// consumers long idle with nothing pending.
    async fn claim_stale(
        &self,
        conn: &mut crate::store::redis::Conn,
        stream: &str,
    ) -> Result<(), AuditError> {
        let min_idle = u64::try_from(STALE_PENDING.as_millis()).unwrap_or(u64::MAX);
        let mut cursor = "0-0".to_owned();
        loop {
            let (next, claimed, _deleted): (String, Vec<String>, Vec<String>) =
                redis::cmd("XAUTOCLAIM")
                    .arg(stream)
                    .arg(GROUP)
                    .arg(&self.consumer)
                    .arg(min_idle)
                    .arg(&cursor)
                    .arg("COUNT")
                    .arg(BATCH)
                    .arg("JUSTID")
                    .query_async(conn)
                    .await?;
            if !claimed.is_empty() {
                tracing::info!(
                    stream,
                    claimed = claimed.len(),
                    "audit entries of a stalled writer claimed"
                );
            }
            if next == "0-0" {
                break;
            }
            cursor = next;
        }
        let consumers: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(stream)
            .arg(GROUP)
            .query_async(conn)
            .await?;
        let idle_ms = i64::try_from(IDLE_CONSUMER.as_millis()).unwrap_or(i64::MAX);
        for consumer in consumers {
            let (Some(redis::Value::BulkString(name)), Some(redis::Value::Int(0))) =
                (consumer.get("name"), consumer.get("pending"))
            else {
                continue;
            };
            let idle = matches!(consumer.get("idle"), Some(redis::Value::Int(i)) if *i > idle_ms);
            if idle && name.as_slice() != self.consumer.as_bytes() {
                let _: i64 = redis::cmd("XGROUP")
                    .arg("DELCONSUMER")
                    .arg(stream)
                    .arg(GROUP)
                    .arg(name.as_slice())
                    .query_async(conn)
                    .await?;
            }
        }
        Ok(())
    }

    async fn insert_sync(
        &self,
        pg: &mut tokio_postgres::Client,
        stream: &str,
        rows: &[SyncRow],
        last: &str,
    ) -> Result<(), tokio_postgres::Error> {
        let tx = pg.transaction().await?;
        let statement = tx
            .prepare(
                "INSERT INTO sync_events (stream, entry_id, session_id, version, action, at_ms, state)
                 VALUES ($1, $2, $3, $4, $5, $6, $7::text::jsonb)
                 ON CONFLICT (stream, entry_id) DO NOTHING",
            )
            .await?;
        for r in rows {
            tx.execute(
                &statement,
                &[
                    &stream,
                    &r.entry_id,
                    &r.session_id,
                    &r.version,
                    &r.action,
                    &r.at_ms,
                    &r.state,
                ],
            )
            .await?;
        }
        advance_cursor(&tx, stream, last).await?;
        tx.commit().await
    }

    async fn insert(
        &self,
        pg: &mut tokio_postgres::Client,
        stream: &str,
        rows: &[Row],
        last: &str,
    ) -> Result<(), tokio_postgres::Error> {
        let tx = pg.transaction().await?;
        let statement = tx
            .prepare(
                "INSERT INTO floor_events
                   (stream, entry_id, channel_id, event, session_id, user_id, epoch, at_ms, held_ms, fields)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::text::jsonb)
                 ON CONFLICT (stream, entry_id) DO NOTHING",
            )
            .await?;
        for r in rows {
            let fields = r.fields.to_string();
            tx.execute(
                &statement,
                &[
                    &stream,
                    &r.entry_id,
                    &r.channel,
                    &r.event,
                    &r.session,
                    &r.user,
                    &r.epoch,
                    &r.at_ms,
                    &r.held_ms,
                    &fields,
                ],
            )
            .await?;
        }
        advance_cursor(&tx, stream, last).await?;
        tx.commit().await
    }
}

/// The writer's group on `stream`, as `XINFO GROUPS` describes it.
async fn group_info(
    conn: &mut crate::store::redis::Conn,
    stream: &str,
) -> Result<Option<std::collections::HashMap<String, redis::Value>>, redis::RedisError> {
    let groups: Vec<std::collections::HashMap<String, redis::Value>> = match redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await
    {
        Ok(groups) => groups,
        // The stream went away in between.
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError) => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    Ok(groups.into_iter().find(
        |g| matches!(g.get("name"), Some(redis::Value::BulkString(n)) if n == GROUP.as_bytes()),
    ))
}

//! The audit database's schema: each migration once, in order, under an advisory lock,
//! recorded in `schema_migrations`.

/// Each migration once, in order.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE floor_events (
        stream text NOT NULL,
        entry_id text NOT NULL,
        channel_id text NOT NULL,
        event text NOT NULL,
        session_id text,
        user_id text,
        epoch text,
        at_ms bigint NOT NULL,
        held_ms bigint,
        fields jsonb NOT NULL,
        PRIMARY KEY (stream, entry_id)
     );
     CREATE INDEX floor_events_channel_at ON floor_events (channel_id, at_ms);
     CREATE INDEX floor_events_user_at ON floor_events (user_id, at_ms);
     CREATE TABLE audit_cursor (
        stream text PRIMARY KEY,
        last_id text NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now()
     );",
    ),
    (
        2,
        "CREATE TABLE sync_events (
            stream text NOT NULL,
            entry_id text NOT NULL,
            session_id text NOT NULL,
            version bigint NOT NULL,
            action text NOT NULL,
            at_ms bigint NOT NULL,
            state jsonb NOT NULL,
            PRIMARY KEY (stream, entry_id)
         );
         CREATE INDEX sync_events_session_version ON sync_events (session_id, version);",
    ),
    (
        3,
        "CREATE INDEX floor_events_at ON floor_events (at_ms);
         CREATE INDEX sync_events_at ON sync_events (at_ms);",
    ),
];

/// Applies the migrations not yet applied.
pub async fn migrate(pg: &mut tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    let tx = pg.transaction().await?;
    // One replica migrates at a time.
    tx.execute("SELECT pg_advisory_xact_lock(7210551)", &[])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version integer PRIMARY KEY,
            applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    for (version, sql) in MIGRATIONS {
        let done = tx
            .query_opt(
                "SELECT 1 FROM schema_migrations WHERE version = $1",
                &[version],
            )
            .await?
            .is_some();
        if !done {
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)",
                &[version],
            )
            .await?;
            tracing::info!(version, "audit schema migrated");
        }
    }
    tx.commit().await
}

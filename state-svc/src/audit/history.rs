//! Talk and sync history from the audit database, for the admin API.

/// One floor event from the audit database.
#[derive(Debug, Clone)]
pub struct TalkRecord {
    pub channel_id: String,
    pub event: String,
    pub user_id: String,
    pub session_id: String,
    pub epoch: String,
    pub at_ms: i64,
    pub held_ms: Option<i64>,
    /// Who cut in (pre-emptions).
    pub by: Option<String>,
}

/// One change of a sync session from the audit database.
#[derive(Debug, Clone)]
pub struct SyncRecord {
    pub version: i64,
    pub action: String,
    pub at_ms: i64,
    pub status: String,
}

/// Queries over the audit database for the admin API, on one lazily (re)connected client.
pub struct History {
    postgres: crate::connect::PostgresConnect,
    client: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History").finish_non_exhaustive()
    }
}

fn unavailable(error: &tokio_postgres::Error) -> crate::error::StoreError {
    crate::error::StoreError::Unavailable(format!("audit database: {error}"))
}

impl History {
    pub fn new(postgres: crate::connect::PostgresConnect) -> Self {
        Self {
            postgres,
            client: tokio::sync::Mutex::new(None),
        }
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, crate::error::StoreError> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(tokio_postgres::Client::is_closed) {
            let (client, connection) =
                self.postgres.connect().await.map_err(|e| unavailable(&e))?;
            tokio::spawn(connection);
            *guard = Some(client);
        }
        let client = guard
            .as_ref()
            .ok_or_else(|| crate::error::StoreError::Unavailable("audit database".into()))?;
        client.query(sql, params).await.map_err(|e| unavailable(&e))
    }

    /// Floor events of a channel and/or a user between two instants, oldest first.
    pub async fn talk(
        &self,
        channel: Option<&str>,
        user: Option<&str>,
        from_ms: i64,
        to_ms: i64,
        limit: i64,
    ) -> Result<Vec<TalkRecord>, crate::error::StoreError> {
        let rows = self
            .query(
                "SELECT channel_id, event, coalesce(user_id, ''), coalesce(session_id, ''),
                        coalesce(epoch, ''), at_ms, held_ms, fields->>'by'
                 FROM floor_events
                 WHERE ($1::text IS NULL OR channel_id = $1)
                   AND ($2::text IS NULL OR user_id = $2)
                   AND at_ms >= $3 AND at_ms < $4
                 ORDER BY at_ms, entry_id
                 LIMIT $5",
                &[&channel, &user, &from_ms, &to_ms, &limit],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| TalkRecord {
                channel_id: r.get(0),
                event: r.get(1),
                user_id: r.get(2),
                session_id: r.get(3),
                epoch: r.get(4),
                at_ms: r.get(5),
                held_ms: r.get(6),
                by: r.get(7),
            })
            .collect())
    }

    /// A sync session's changes, oldest first.
    pub async fn sync(
        &self,
        session_id: &str,
        limit: i64,
    ) -> Result<Vec<SyncRecord>, crate::error::StoreError> {
        let rows = self
            .query(
                "SELECT version, action, at_ms, coalesce(state->>'status', '')
                 FROM sync_events WHERE session_id = $1
                 ORDER BY version, entry_id LIMIT $2",
                &[&session_id, &limit],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| SyncRecord {
                version: r.get(0),
                action: r.get(1),
                at_ms: r.get(2),
                status: r.get(3),
            })
            .collect())
    }
}

//! The Redis store: sync sessions.

use super::*;
use crate::store::SyncStore;

impl SyncStore for RedisStore {
    async fn sync_get(&self, id: &SyncId) -> Result<Option<SyncSession>, StoreError> {
        let [key, _, _] = self.keys.sync(id);
        let mut conn = self.conn.clone();
        let raw: Option<String> = self.bounded(conn.get(key)).await?;
        raw.map(|r| parse::<SyncSession>(&r, "sync session"))
            .transpose()
    }

    async fn sync_put(
        &self,
        session: &SyncSession,
        expected: Option<u64>,
        action: &str,
    ) -> Result<(), StoreError> {
        let [key, audit, events] = self.keys.sync(&session.session_id);
        let doc =
            serde_json::to_string(session).map_err(|e| StoreError::Internal(e.to_string()))?;
        let mut invocation = scripts::SYNC_PUT.prepare_invoke();
        invocation
            .key(key)
            .key(audit)
            .key(events)
            .arg(expected.map(|v| v.to_string()).unwrap_or_default())
            .arg(doc)
            .arg(session.version)
            .arg(action)
            .arg(session.ttl_ms().map(|t| t.to_string()).unwrap_or_default())
            .arg(&self.audit_maxlen);
        let mut conn = self.conn.clone();
        let (outcome, version): (String, u64) =
            self.bounded(invocation.invoke_async(&mut conn)).await?;
        if outcome != "ok" {
            return Err(StoreError::Conflict {
                expected: expected.unwrap_or(0),
                actual: version,
            });
        }
        self.set_sync_deadline(&session.session_id, session.deadline())
            .await
    }

    async fn sync_delete(&self, id: &SyncId, expected: Option<u64>) -> Result<u64, StoreError> {
        let [key, audit, events] = self.keys.sync(id);
        let mut invocation = scripts::SYNC_DELETE.prepare_invoke();
        invocation
            .key(key)
            .key(audit)
            .key(events)
            .arg(expected.map(|v| v.to_string()).unwrap_or_default())
            .arg(id.as_str())
            .arg(&self.audit_maxlen);
        let mut conn = self.conn.clone();
        let (outcome, version): (String, u64) =
            self.bounded(invocation.invoke_async(&mut conn)).await?;
        match outcome.as_str() {
            "ok" => {
                self.set_sync_deadline(id, None).await?;
                Ok(version)
            }
            "missing" => Err(StoreError::NotFound("sync session")),
            _ => Err(StoreError::Conflict {
                expected: expected.unwrap_or(0),
                actual: version,
            }),
        }
    }

    async fn sync_due(&self, now: i64, limit: usize) -> Result<Vec<SyncId>, StoreError> {
        let mut conn = self.conn.clone();
        let due: Vec<String> = self
            .bounded(conn.zrangebyscore_limit(
                self.keys.sync_deadlines(),
                "-inf",
                now,
                0,
                isize::try_from(limit).unwrap_or(isize::MAX),
            ))
            .await?;
        // An entry that is not a valid id was never written by this store: skip it.
        Ok(due.iter().filter_map(|id| SyncId::parse(id).ok()).collect())
    }

    async fn sync_reschedule(&self, id: &SyncId) -> Result<(), StoreError> {
        let deadline = self.sync_get(id).await?.and_then(|s| s.deadline());
        self.set_sync_deadline(id, deadline).await
    }
}

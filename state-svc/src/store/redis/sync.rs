//! The Redis store: sync sessions.

use super::keys::SyncKeys;
use super::*;
use crate::store::SyncStore;

impl SyncStore for RedisStore {
    async fn sync_get(&self, id: &SyncId) -> Result<Option<SyncSession>, StoreError> {
        let key = self.keys.sync(id).state;
        let mut conn = self.conn().await?;
        let raw: Option<String> = self.bounded(conn.get(key)).await?;
        raw.map(|r| parse::<SyncSession>(&r, "sync session"))
            .transpose()
    }

    async fn sync_put(
        &self,
        session: &SyncSession,
        expected: Option<u64>,
        action: &str,
        previous: Option<&SyncSession>,
    ) -> Result<(), StoreError> {
        let SyncKeys {
            state: key,
            audit,
            events,
        } = self.keys.sync(&session.session_id);
        let doc =
            serde_json::to_string(session).map_err(|e| StoreError::Internal(e.to_string()))?;
        // The audit stream keeps the whole session once, then what each change changed.
        let audited = match previous {
            Some(previous) => session.audit_change(previous).to_string(),
            None => doc.clone(),
        };
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
            .arg(&self.audit_maxlen)
            .arg(audited);
        let mut conn = self.conn().await?;
        let (outcome, version): (String, u64) =
            self.bounded(invocation.invoke_async(&mut conn)).await?;
        match Verdict::parse(&outcome)? {
            Verdict::Ok => {}
            Verdict::Conflict => {
                return Err(StoreError::Conflict {
                    expected: expected.unwrap_or(0),
                    actual: version,
                });
            }
            other => return Err(other.unexpected("sync")),
        }
        if expected.is_none() {
            // A new session joins the indexes its caps count in.
            // (Two slots under Cluster: a call each.)
            let sid = session.session_id.as_str();
            if let Some(ch) = &session.channel_id {
                self.bounded(
                    conn.sadd::<_, _, ()>(self.keys.sync_index(&format!("channel:{ch}")), sid),
                )
                .await?;
            }
            if let Some(owner) = &session.owner {
                self.bounded(
                    conn.sadd::<_, _, ()>(self.keys.sync_index(&format!("owner:{owner}")), sid),
                )
                .await?;
            }
        }
        self.set_sync_deadline(&session.session_id, session.deadline())
            .await
    }

    async fn sync_delete(&self, id: &SyncId, expected: Option<u64>) -> Result<u64, StoreError> {
        let SyncKeys {
            state: key,
            audit,
            events,
        } = self.keys.sync(id);
        let mut invocation = scripts::SYNC_DELETE.prepare_invoke();
        invocation
            .key(key)
            .key(audit)
            .key(events)
            .arg(expected.map(|v| v.to_string()).unwrap_or_default())
            .arg(id.as_str())
            .arg(&self.audit_maxlen);
        let mut conn = self.conn().await?;
        let (outcome, version): (String, u64) =
            self.bounded(invocation.invoke_async(&mut conn)).await?;
        match Verdict::parse(&outcome)? {
            Verdict::Ok => {
                self.set_sync_deadline(id, None).await?;
                Ok(version)
            }
            Verdict::Missing => Err(StoreError::NotFound("sync session")),
            Verdict::Conflict => Err(StoreError::Conflict {
                expected: expected.unwrap_or(0),
                actual: version,
            }),
            other => Err(other.unexpected("sync")),
        }
    }

    async fn sync_open_counts(
        &self,
        channel: Option<&ChannelId>,
        owner: Option<&UserId>,
    ) -> Result<(usize, usize), StoreError> {
        let open = |sessions: Vec<SyncSession>| sessions.iter().filter(|s| s.open()).count();
        let in_channel = match channel {
            Some(ch) => open(self.in_index(&format!("channel:{ch}")).await?),
            None => 0,
        };
        let by_owner = match owner {
            Some(uid) => open(self.in_index(&format!("owner:{uid}")).await?),
            None => 0,
        };
        Ok((in_channel, by_owner))
    }

    async fn channel_syncs(&self, channel: &ChannelId) -> Result<Vec<SyncSession>, StoreError> {
        self.in_index(&format!("channel:{channel}")).await
    }

    async fn sync_due(&self, now: i64, limit: usize) -> Result<Vec<SyncId>, StoreError> {
        let mut conn = self.conn().await?;
        let mut due: Vec<String> = Vec::new();
        for shard in self.keys.sync_deadlines_all() {
            if due.len() >= limit {
                break;
            }
            let some: Vec<String> = self
                .bounded(conn.zrangebyscore_limit(
                    shard,
                    "-inf",
                    now,
                    0,
                    isize::try_from(limit - due.len()).unwrap_or(isize::MAX),
                ))
                .await?;
            due.extend(some);
        }
        // An entry that is not a valid id was never written by this store: skip it.
        Ok(due.iter().filter_map(|id| SyncId::parse(id).ok()).collect())
    }

    async fn sync_reschedule(&self, id: &SyncId) -> Result<(), StoreError> {
        let deadline = self.sync_get(id).await?.and_then(|s| s.deadline());
        self.set_sync_deadline(id, deadline).await
    }
}

impl RedisStore {
    /// The sessions listed in a sync index; ids of sessions that are gone leave it.
    async fn in_index(&self, what: &str) -> Result<Vec<SyncSession>, StoreError> {
        let index = self.keys.sync_index(what);
        let mut conn = self.conn().await?;
        let ids: Vec<String> = self.bounded(conn.smembers(&index)).await?;
        let ids: Vec<SyncId> = ids.iter().filter_map(|id| SyncId::parse(id).ok()).collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.keys.sync(id).state).collect();
        let docs: Vec<Option<String>> = self
            .bounded(redis::cmd("MGET").arg(&keys).query_async(&mut conn))
            .await?;
        let mut sessions = Vec::new();
        let mut gone = Vec::new();
        for (id, doc) in ids.iter().zip(docs) {
            match doc.map(|d| parse::<SyncSession>(&d, "sync session")) {
                Some(Ok(session)) => sessions.push(session),
                // Unreadable: counted as nothing, kept for an operator to look at.
                Some(Err(_)) => {}
                None => gone.push(id.as_str().to_owned()),
            }
        }
        if !gone.is_empty() {
            let _: () = self.bounded(conn.srem(&index, gone)).await?;
        }
        Ok(sessions)
    }
}

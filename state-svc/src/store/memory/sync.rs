//! The in-memory store: sync sessions.

use super::*;
use crate::store::SyncStore;

impl SyncStore for MemoryStore {
    async fn sync_get(&self, id: &SyncId) -> Result<Option<SyncSession>, StoreError> {
        let mut inner = self.lock();
        let now = self.now_ms();
        if inner
            .syncs
            .get(id)
            .is_some_and(|(_, exp)| exp.is_some_and(|e| e <= now))
        {
            inner.syncs.remove(id);
        }
        Ok(inner.syncs.get(id).map(|(s, _)| s.clone()))
    }

    async fn sync_put(
        &self,
        session: &SyncSession,
        expected: Option<u64>,
        _action: &str,
        _previous: Option<&SyncSession>,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let actual = inner.syncs.get(&session.session_id).map(|(s, _)| s.version);
        if actual != expected {
            return Err(StoreError::Conflict {
                expected: expected.unwrap_or(0),
                actual: actual.unwrap_or(0),
            });
        }
        let expires = session.ttl_ms().map(|ttl| self.now_ms() + ttl);
        inner
            .syncs
            .insert(session.session_id.clone(), (session.clone(), expires));
        drop(inner);
        self.hub.publish(SyncEvent::changed(session.clone()));
        Ok(())
    }

    async fn sync_open_counts(
        &self,
        channel: Option<&ChannelId>,
        owner: Option<&UserId>,
    ) -> Result<(usize, usize), StoreError> {
        let now = self.now_ms();
        let inner = self.lock();
        let open = inner
            .syncs
            .values()
            .filter(|(s, exp)| s.open() && exp.is_none_or(|e| e > now))
            .map(|(s, _)| s);
        let (mut in_channel, mut by_owner) = (0, 0);
        for s in open {
            if channel.is_some_and(|c| s.channel_id.as_deref() == Some(c.as_str())) {
                in_channel += 1;
            }
            if owner.is_some_and(|o| s.owner.as_deref() == Some(o.as_str())) {
                by_owner += 1;
            }
        }
        Ok((in_channel, by_owner))
    }

    async fn sync_delete(&self, id: &SyncId, expected: Option<u64>) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let (actual, channel_id) = inner
            .syncs
            .get(id)
            .map(|(s, _)| (s.version, crate::domain::topic::channel_of(s)))
            .ok_or(not_found("sync session"))?;
        if expected.is_some_and(|e| e != actual) {
            return Err(StoreError::Conflict {
                expected: expected.unwrap_or(0),
                actual,
            });
        }
        inner.syncs.remove(id);
        drop(inner);
        self.hub.publish(SyncEvent {
            session_id: id.clone(),
            version: actual + 1,
            channel_id,
            state: None,
        });
        Ok(actual + 1)
    }

    async fn channel_syncs(&self, channel: &ChannelId) -> Result<Vec<SyncSession>, StoreError> {
        let now = self.now_ms();
        let inner = self.lock();
        Ok(inner
            .syncs
            .values()
            .filter(|(s, exp)| {
                exp.is_none_or(|e| e > now) && s.channel_id.as_deref() == Some(channel.as_str())
            })
            .map(|(s, _)| s.clone())
            .collect())
    }

    async fn sync_due(&self, now: i64, limit: usize) -> Result<Vec<SyncId>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .syncs
            .values()
            .filter(|(s, _)| s.deadline().is_some_and(|d| d <= now))
            .map(|(s, _)| s.session_id.clone())
            .take(limit)
            .collect())
    }

    async fn sync_reschedule(&self, _id: &SyncId) -> Result<(), StoreError> {
        // Deadlines are computed from the stored sessions on every scan.
        Ok(())
    }
}

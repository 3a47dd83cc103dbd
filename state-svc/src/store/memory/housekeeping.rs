//! The in-memory store: the sweep, the listener and the health ping.

use super::*;
use crate::store::Housekeeping;

impl Housekeeping for MemoryStore {
    async fn sweep(&self) -> Result<SweepReport, StoreError> {
        let mut inner = self.lock();
        let now = self.now_ms();
        let mut report = SweepReport::default();
        let expired: Vec<SessionId> = inner
            .sessions
            .values()
            .filter(|s| !rules::session_live(s, now))
            .map(|s| s.session_id.clone())
            .collect();
        for sid in expired {
            self.remove_locked(&mut inner, &sid);
            report.sessions_expired += 1;
        }
        let due: Vec<ChannelId> = inner
            .channels
            .iter()
            .filter(|(_, c)| c.floor.as_ref().is_some_and(|h| rules::lapsed(h, now)))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let step = self.step(&id);
            if let Some(ch) = inner.channels.get_mut(&id) {
                step.live_holder(ch);
                report.floors_expired += 1;
            }
        }
        Ok(report)
    }

    async fn listen(&self) -> Result<(), StoreError> {
        // Events are dispatched to the hub directly; nothing to subscribe to.
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

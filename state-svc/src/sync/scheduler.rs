//! The deadline scheduler: expires running sync sessions when their time runs out.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::SyncAction;
use crate::domain::Clock;
use crate::error::StoreError;
use crate::store::Store;

/// Expires running sessions whose time has run out, until shutdown. Every replica runs one;
/// the compare-and-set makes a second expiry of the same session a no-op.
pub async fn run_scheduler<S: Store>(
    store: Arc<S>,
    every: Duration,
    clock: Clock,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let now = clock.now_ms();
        let due = match store.sync_due(now, 256).await {
            Ok(due) => due,
            Err(error) => {
                tracing::warn!(%error, "sync deadline scan failed");
                continue;
            }
        };
        for id in due {
            match crate::store::sync_mutate(&*store, &id, None, &SyncAction::Expire, now).await {
                Ok(session) => {
                    tracing::info!(session_id = %id, version = session.version, "sync session expired");
                }
                Err(StoreError::FailedPrecondition(_) | StoreError::NotFound(_)) => {
                    // Changed meanwhile (paused, switched, ended): the index is rewritten.
                    let _ = store.sync_reschedule(&id).await;
                }
                Err(error) => tracing::warn!(%error, session_id = %id, "sync expiry failed"),
            }
        }
    }
}

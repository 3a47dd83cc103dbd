//! The Redis store: the sweep, the listener and the health ping.

use super::*;
use crate::store::Housekeeping;

impl Housekeeping for RedisStore {
    async fn sweep(&self) -> Result<SweepReport, StoreError> {
        let now = now_ms();
        Ok(SweepReport {
            floors_expired: self.sweep_floors(now).await?,
            sessions_expired: self.sweep_sessions(now).await?,
            channels_moved: self.sweep_nodes().await?,
        })
    }

    async fn listen(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.listener
            .send(tx)
            .await
            .map_err(|_| StoreError::Unavailable("pub/sub listener stopped".into()))?;
        match tokio::time::timeout(self.timeout * 2, rx).await {
            Ok(Ok(result)) => result,
            _ => Err(StoreError::Unavailable(
                "pub/sub subscribe timed out".into(),
            )),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        self.bounded(redis::cmd("PING").query_async::<String>(&mut conn))
            .await
            .map(drop)
    }
}

//! The sweeper: expires floors whose lease or maximum talk time passed without anyone touching
//! the channel, and sessions whose gateway stopped touching them. Every replica runs one; the
//! store's steps are idempotent, so they never double-announce.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::store::Store;

pub async fn run<S: Store>(store: Arc<S>, every: Duration, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match store.sweep().await {
            Ok(report) => {
                if failing {
                    tracing::info!("sweeper recovered");
                    failing = false;
                }
                if report.floors_expired > 0 || report.sessions_expired > 0 {
                    tracing::debug!(
                        floors = report.floors_expired,
                        sessions = report.sessions_expired,
                        "swept"
                    );
                }
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(%error, "sweep failed; retrying");
                    failing = true;
                }
            }
        }
    }
}

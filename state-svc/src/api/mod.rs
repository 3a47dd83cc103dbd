//! The gRPC edge of state-svc: one handle, [`Api`], implementing the four `ptt.state.v1`
//! services over any [`Store`]. Requests are validated and converted into domain types here
//! (`convert`); replies are converted back. Nothing below this module sees protobuf.

mod access;
pub mod admin;
pub mod convert;
mod floor;
mod registry;
mod session;
pub mod sync;
mod watch;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::domain::Clock;
use crate::hub::Hub;
use crate::metrics::StateMetrics;
use crate::store::{Store, StoreSettings};

/// Topics one subscribe or unsubscribe request may name.
pub const MAX_TOPICS_PER_REQUEST: usize = 1_000;
/// Topics one watch stream may follow.
pub const MAX_TOPICS_PER_WATCH: usize = 10_000;

/// Cheap-to-clone handle shared by every service.
#[derive(Debug)]
pub struct Api<S> {
    store: Arc<S>,
    hub: Arc<Hub>,
    settings: Arc<StoreSettings>,
    metrics: Arc<StateMetrics>,
    /// What the API reads the time from (sync sessions' clocks, reply timestamps).
    clock: Clock,
    shutdown: CancellationToken,
    /// The server's tasks: every stream's feeding task runs under it.
    tasks: TaskTracker,
}

impl<S> Clone for Api<S> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            hub: Arc::clone(&self.hub),
            settings: Arc::clone(&self.settings),
            metrics: Arc::clone(&self.metrics),
            clock: self.clock.clone(),
            shutdown: self.shutdown.clone(),
            tasks: self.tasks.clone(),
        }
    }
}

impl<S: Store> Api<S> {
    pub fn new(
        store: Arc<S>,
        hub: Arc<Hub>,
        settings: StoreSettings,
        metrics: Arc<StateMetrics>,
        clock: Clock,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Self {
        Self {
            store,
            hub,
            settings: Arc::new(settings),
            metrics,
            clock,
            shutdown,
            tasks,
        }
    }

    fn settings(&self) -> &StoreSettings {
        &self.settings
    }
}

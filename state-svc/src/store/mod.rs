//! The state store: one trait, two implementations.
//!
//! - [`redis::RedisStore`] is the production store: every floor change is one Lua script that
//!   also publishes the event and appends the audit entry, so any number of state-svc replicas
//!   can share one Redis.
//! - [`memory::MemoryStore`] is the embedded default for a single instance with no Redis.
//!
//! Both are driven through [`Store`] and checked by one contract test suite
//! (`tests/contract.rs`), so they behave the same.

use std::future::Future;

use crate::domain::{
    AcquireOutcome, ChannelConfig, ChannelId, ChannelState, LeaveOutcome, MediaNode, NewSession,
    NodeId, NodeRegistration, Placement, ReleaseOutcome, RemoveOutcome, RenewOutcome, Session,
    SessionId, UserId,
};
use crate::error::StoreError;

pub mod memory;
pub mod redis;

/// Deployment defaults the stores apply.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// Floor lease; the holder's gateway renews it about every third of it.
    pub lease_ms: u32,
    /// Maximum talk time of one grant.
    pub max_talk_ms: u32,
    /// Session time to live without a touch.
    pub session_ttl_ms: u32,
    /// A media node without a heartbeat for this long is dead.
    pub node_dead_after_ms: u32,
    /// How often media nodes are asked to heartbeat.
    pub node_heartbeat_ms: u32,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            lease_ms: 5_000,
            max_talk_ms: 60_000,
            session_ttl_ms: 60_000,
            node_dead_after_ms: 5_000,
            node_heartbeat_ms: 2_000,
        }
    }
}

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub floors_expired: u32,
    pub sessions_expired: u32,
}

type Res<T> = Result<T, StoreError>;

/// Everything state-svc keeps. Methods take validated domain types; each floor change is
/// atomic in the store and emits its event to the hub in the same step.
pub trait Store: Send + Sync + 'static {
    // ---- floor ----
    fn acquire_floor(
        &self,
        ch: &ChannelId,
        sid: &SessionId,
        priority: u32,
    ) -> impl Future<Output = Res<AcquireOutcome>> + Send;
    fn renew_floor(
        &self,
        ch: &ChannelId,
        sid: &SessionId,
        epoch: u64,
    ) -> impl Future<Output = Res<RenewOutcome>> + Send;
    /// `epoch: None` releases whatever grant this session holds.
    fn release_floor(
        &self,
        ch: &ChannelId,
        sid: &SessionId,
        epoch: Option<u64>,
    ) -> impl Future<Output = Res<ReleaseOutcome>> + Send;
    fn force_release_floor(
        &self,
        ch: &ChannelId,
        epoch: Option<u64>,
    ) -> impl Future<Output = Res<ReleaseOutcome>> + Send;

    // ---- channels ----
    fn channel_state(&self, ch: &ChannelId) -> impl Future<Output = Res<ChannelState>> + Send;
    fn channel_config(&self, ch: &ChannelId) -> impl Future<Output = Res<ChannelConfig>> + Send;
    fn set_channel_config(
        &self,
        ch: &ChannelId,
        config: ChannelConfig,
    ) -> impl Future<Output = Res<ChannelConfig>> + Send;

    // ---- sessions and membership ----
    fn create_session(&self, new: NewSession) -> impl Future<Output = Res<Session>> + Send;
    fn touch_session(&self, sid: &SessionId) -> impl Future<Output = Res<Session>> + Send;
    fn session(&self, sid: &SessionId) -> impl Future<Output = Res<Session>> + Send;
    fn user_sessions(&self, uid: &UserId) -> impl Future<Output = Res<Vec<Session>>> + Send;
    fn join_channel(
        &self,
        sid: &SessionId,
        ch: &ChannelId,
    ) -> impl Future<Output = Res<ChannelState>> + Send;
    fn leave_channel(
        &self,
        sid: &SessionId,
        ch: &ChannelId,
    ) -> impl Future<Output = Res<LeaveOutcome>> + Send;
    /// Leaves every channel (releasing floors, reason `disconnected`) and deletes the session.
    fn remove_session(&self, sid: &SessionId) -> impl Future<Output = Res<RemoveOutcome>> + Send;

    // ---- media registry ----
    fn register_node(&self, node: NodeRegistration) -> impl Future<Output = Res<()>> + Send;
    /// Returns whether the node is draining; `NotFound` when it must register again.
    fn heartbeat(&self, node: &NodeId, load: u32) -> impl Future<Output = Res<bool>> + Send;
    fn drain_node(&self, node: &NodeId) -> impl Future<Output = Res<MediaNode>> + Send;
    fn deregister_node(&self, node: &NodeId) -> impl Future<Output = Res<()>> + Send;
    fn list_nodes(&self) -> impl Future<Output = Res<Vec<MediaNode>>> + Send;
    fn place_channel(&self, ch: &ChannelId) -> impl Future<Output = Res<Placement>> + Send;
    fn placement(&self, ch: &ChannelId) -> impl Future<Output = Res<Option<MediaNode>>> + Send;

    // ---- housekeeping ----
    /// Expires floors whose lease or maximum talk time has passed and sessions that were not
    /// touched in time. Safe to run on every replica at once.
    fn sweep(&self) -> impl Future<Output = Res<SweepReport>> + Send;
    /// Makes the store deliver events of every channel the hub's subscribers want; returns
    /// once new subscriptions are active.
    fn listen(&self) -> impl Future<Output = Res<()>> + Send;
    /// A cheap round trip to the backing store, for health checks.
    fn ping(&self) -> impl Future<Output = Res<()>> + Send;
}

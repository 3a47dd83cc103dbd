//! The state store: focused traits, two implementations.
//!
//! - [`redis::RedisStore`] is the production store: every floor change is one Lua script that
//!   also publishes the event and appends the audit entry, so any number of state-svc replicas
//!   can share one Redis.
//! - [`memory::MemoryStore`] is the embedded default for a single instance with no Redis.
//!
//! Each concern is a trait of its own ([`FloorStore`], [`SessionStore`], [`RegistryStore`],
//! [`AccessStore`], [`SyncStore`], [`Housekeeping`]); [`Store`] is all of them, the bound the
//! API takes. Each backend implements each trait in a file of that name (`memory/floor.rs`,
//! `redis/floor.rs`, ...). Both are checked by one contract test suite (`tests/contract.rs`),
//! so they behave the same.

use std::future::Future;

use crate::domain::{
    AcquireOutcome, ChannelConfig, ChannelId, ChannelState, EmergencyHolder, EventId, EventInfo,
    GrantChange, GrantsUpdate, LeaveOutcome, MediaNode, NewSession, NodeId, NodeRegistration,
    Placement, ReleaseOutcome, RemoveOutcome, RenewOutcome, Resume, Session, SessionId, Speaker,
    SyncId, UserGrants, UserId,
};
use crate::error::StoreError;
use crate::sync::{SyncAction, SyncSession};

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
    /// A dead node with no channels left is dropped from the registry after this long.
    pub node_forget_after_ms: u32,
    /// Maximum talk time of an emergency broadcast's grants.
    pub emergency_max_ms: u32,
    /// Live sessions one user may have (sockets, across gateways).
    pub max_sessions_per_user: u32,
    /// Open sync sessions per channel, and per user who created them.
    pub max_syncs_per_channel: u32,
    pub max_syncs_per_user: u32,
    /// Channels one user may be in, across their sessions.
    pub max_channels_per_user: u32,
    /// Members one channel may have.
    pub max_members_per_channel: u32,
    /// How long a session whose socket went away waits for a resume.
    pub resume_grace_ms: u32,
    /// The most transports a media node may say it takes: what it registers is clamped to
    /// this, so one node cannot attract every new channel.
    pub max_node_capacity: u32,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            lease_ms: 5_000,
            max_talk_ms: 60_000,
            session_ttl_ms: 60_000,
            node_dead_after_ms: 3_000,
            node_heartbeat_ms: 1_000,
            node_forget_after_ms: 600_000,
            emergency_max_ms: 600_000,
            max_sessions_per_user: 10,
            max_syncs_per_channel: 16,
            max_syncs_per_user: 32,
            max_channels_per_user: 200,
            max_members_per_channel: 1_000,
            resume_grace_ms: 20_000,
            max_node_capacity: 20_000,
        }
    }
}

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub floors_expired: u32,
    pub sessions_expired: u32,
    /// Channels moved off dead or draining media nodes.
    pub channels_moved: u32,
}

type Res<T> = Result<T, StoreError>;

/// Validates an event's channel list: at most `MAX_CHANNELS_PER_EVENT`, duplicates dropped,
/// order kept.
pub fn event_channel_list(channels: &[ChannelId]) -> Res<Vec<ChannelId>> {
    if channels.len() > crate::domain::MAX_CHANNELS_PER_EVENT {
        return Err(StoreError::InvalidArgument(
            "too many channels in the event",
        ));
    }
    let mut seen = std::collections::HashSet::new();
    Ok(channels
        .iter()
        .filter(|c| seen.insert((*c).clone()))
        .cloned()
        .collect())
}

/// Floors and channel configuration. Each floor change is atomic in the store and emits its
/// event to the hub in the same step.
pub trait FloorStore: Send + Sync + 'static {
    /// A grant's epoch is above `min_epoch` (the highest the caller has seen).
    fn acquire_floor(
        &self,
        ch: &ChannelId,
        sid: &SessionId,
        priority: u32,
        min_epoch: u64,
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

    fn channel_state(&self, ch: &ChannelId) -> impl Future<Output = Res<ChannelState>> + Send;
    fn channel_config(&self, ch: &ChannelId) -> impl Future<Output = Res<ChannelConfig>> + Send;
    fn set_channel_config(
        &self,
        ch: &ChannelId,
        config: ChannelConfig,
    ) -> impl Future<Output = Res<ChannelConfig>> + Send;
}

/// Sessions and channel membership, and the admin listings of them.
pub trait SessionStore: Send + Sync + 'static {
    fn create_session(&self, new: NewSession) -> impl Future<Output = Res<Session>> + Send;
    fn touch_session(&self, sid: &SessionId) -> impl Future<Output = Res<Session>> + Send;
    /// Keeps a session whose socket went away for the resume grace period, unless a socket
    /// of a later generation holds it (then `NotFound`, as for a session that is gone).
    fn park_session(
        &self,
        sid: &SessionId,
        generation: u64,
    ) -> impl Future<Output = Res<Session>> + Send;
    /// Takes a session over: checks the user and the token's digest, stores the next digest,
    /// moves the session to the new gateway under the next generation (live again, its time
    /// to live from now), and tells every replica so the older socket closes. Refusals are
    /// `PermissionDenied`, whatever their cause; a session that is gone is `NotFound`.
    fn resume_session(&self, resume: Resume) -> impl Future<Output = Res<Session>> + Send;
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
    /// Leaves every channel (releasing floors, reason `disconnected`) and deletes the session;
    /// with a `generation`, only while the session is still at it (`FailedPrecondition` once
    /// another socket has resumed it).
    fn remove_session(
        &self,
        sid: &SessionId,
        generation: Option<u64>,
    ) -> impl Future<Output = Res<RemoveOutcome>> + Send;
    /// Channels that have members (a channel that just emptied may still be listed).
    fn list_channels(&self) -> impl Future<Output = Res<Vec<ChannelId>>> + Send;
    /// Live sessions, oldest deadline first, at most `limit`.
    fn list_sessions(&self, limit: usize) -> impl Future<Output = Res<Vec<Session>>> + Send;
    /// Removes every session of the user (releasing floors, reason `disconnected`) and tells
    /// grant watchers on every replica, so gateways close the user's sockets. Returns how many
    /// sessions were removed.
    fn kick_user(&self, uid: &UserId, reason: &str) -> impl Future<Output = Res<u32>> + Send;
}

/// The media-node registry and channel placement.
pub trait RegistryStore: Send + Sync + 'static {
    fn register_node(&self, node: NodeRegistration) -> impl Future<Output = Res<()>> + Send;
    /// Returns whether the node is draining; `NotFound` when it must register again.
    fn heartbeat(&self, node: &NodeId, load: u32) -> impl Future<Output = Res<bool>> + Send;
    fn drain_node(&self, node: &NodeId) -> impl Future<Output = Res<MediaNode>> + Send;
    fn deregister_node(&self, node: &NodeId) -> impl Future<Output = Res<()>> + Send;
    fn list_nodes(&self) -> impl Future<Output = Res<Vec<MediaNode>>> + Send;
    fn place_channel(&self, ch: &ChannelId) -> impl Future<Output = Res<Placement>> + Send;
    fn placement(&self, ch: &ChannelId) -> impl Future<Output = Res<Option<MediaNode>>> + Send;
}

/// Grants, events and emergency broadcasts.
pub trait AccessStore: Send + Sync + 'static {
    fn user_grants(&self, uid: &UserId) -> impl Future<Output = Res<UserGrants>> + Send;
    /// Applies a grant change atomically; reports `Changed` (and tells grant watchers on every
    /// replica) only when an entry actually changed. Fails when the result would exceed
    /// `MAX_GRANTS_PER_USER`.
    fn update_grants(
        &self,
        uid: &UserId,
        change: &GrantChange,
    ) -> impl Future<Output = Res<GrantsUpdate>> + Send;
    /// Sets an event's channels (validated, at most `MAX_CHANNELS_PER_EVENT`); each channel
    /// leaves any other event. Empty deletes the event. Refused while its emergency is active.
    fn set_event_channels(
        &self,
        eid: &EventId,
        channels: &[ChannelId],
    ) -> impl Future<Output = Res<EventInfo>> + Send;
    fn event(&self, eid: &EventId) -> impl Future<Output = Res<Option<EventInfo>>> + Send;
    fn channel_event(&self, ch: &ChannelId) -> impl Future<Output = Res<Option<EventId>>> + Send;
    /// Marks the event's emergency as `by`'s. Refused with the current holder when another
    /// session's emergency of equal or higher priority is active, unless `force`.
    fn claim_emergency(
        &self,
        eid: &EventId,
        by: &Speaker,
        force: bool,
    ) -> impl Future<Output = Res<Result<EventInfo, EmergencyHolder>>> + Send;
    /// Clears the event's emergency if it is `sid`'s (anyone's when `None`); returns who held it.
    fn clear_emergency(
        &self,
        eid: &EventId,
        sid: Option<&SessionId>,
    ) -> impl Future<Output = Res<Option<EmergencyHolder>>> + Send;
    /// One channel of an emergency, in one atomic step: marks the channel as under `eid`'s
    /// emergency (normal requests are denied while the mark stands) and grants the session the
    /// floor at `priority`, pre-empting any lower holder. The session must be a member.
    fn emergency_take(
        &self,
        ch: &ChannelId,
        sid: &SessionId,
        eid: &EventId,
        priority: u32,
    ) -> impl Future<Output = Res<AcquireOutcome>> + Send;
    /// Ends `eid`'s emergency in the channel if it is `sid`'s (anyone's when `None`) and frees
    /// the floor the broadcast holds there (reason `emergency_ended`).
    fn emergency_release(
        &self,
        ch: &ChannelId,
        sid: Option<&SessionId>,
        eid: &EventId,
    ) -> impl Future<Output = Res<ReleaseOutcome>> + Send;
}

/// Sync sessions (see `crate::sync`), each change one compare-and-set on its version.
pub trait SyncStore: Send + Sync + 'static {
    fn sync_get(&self, id: &SyncId) -> impl Future<Output = Res<Option<SyncSession>>> + Send;
    /// Writes `session` if the stored version is `expected` (`None`: only if absent), in one
    /// atomic step that also publishes it and appends `action` to the session's audit stream
    /// (the whole session on creation, what changed from `previous` otherwise). Keeps the
    /// deadline index and the TTL in step. `Conflict` carries the stored version.
    fn sync_put(
        &self,
        session: &SyncSession,
        expected: Option<u64>,
        action: &str,
        previous: Option<&SyncSession>,
    ) -> impl Future<Output = Res<()>> + Send;
    fn sync_delete(
        &self,
        id: &SyncId,
        expected: Option<u64>,
    ) -> impl Future<Output = Res<u64>> + Send;
    /// How many sessions that can still change (pending, running, paused) belong to
    /// `channel`, and how many to `owner`.
    fn sync_open_counts(
        &self,
        channel: Option<&ChannelId>,
        owner: Option<&UserId>,
    ) -> impl Future<Output = Res<(usize, usize)>> + Send;
    /// The stored sessions bound to `channel` (for a channel topic's resynchronisation).
    fn channel_syncs(
        &self,
        channel: &ChannelId,
    ) -> impl Future<Output = Res<Vec<SyncSession>>> + Send;
    /// Sessions whose deadline has passed, at most `limit`.
    fn sync_due(&self, now: i64, limit: usize) -> impl Future<Output = Res<Vec<SyncId>>> + Send;
    /// Re-reads the session and sets its deadline entry from what is stored.
    fn sync_reschedule(&self, id: &SyncId) -> impl Future<Output = Res<()>> + Send;
}

/// What keeps the store healthy: the sweep, the listener, the health ping.
pub trait Housekeeping: Send + Sync + 'static {
    /// Expires floors whose lease or maximum talk time has passed and sessions that were not
    /// touched in time. Safe to run on every replica at once.
    fn sweep(&self) -> impl Future<Output = Res<SweepReport>> + Send;
    /// Makes the store deliver events of every channel the hub's subscribers want; returns
    /// once new subscriptions are active.
    fn listen(&self) -> impl Future<Output = Res<()>> + Send;
    /// A cheap round trip to the backing store, for health checks.
    fn ping(&self) -> impl Future<Output = Res<()>> + Send;
}

/// Everything state-svc keeps, as one bound: every focused trait. Methods take validated
/// domain types.
pub trait Store:
    FloorStore + SessionStore + RegistryStore + AccessStore + SyncStore + Housekeeping
{
}

impl<T> Store for T where
    T: FloorStore + SessionStore + RegistryStore + AccessStore + SyncStore + Housekeeping
{
}

/// Applies a sync action as one compare-and-set. With `expected`, a stored version other than
/// it is a `Conflict`; without, a concurrent change is retried on the fresh state.
pub async fn sync_mutate<S: Store>(
    store: &S,
    id: &SyncId,
    expected: Option<u64>,
    action: &SyncAction,
    now: i64,
) -> Res<SyncSession> {
    for _ in 0..16 {
        let current = store
            .sync_get(id)
            .await?
            .ok_or(StoreError::NotFound("sync session"))?;
        if let Some(expected) = expected
            && expected != current.version
        {
            return Err(StoreError::Conflict {
                expected,
                actual: current.version,
            });
        }
        let next = current.apply(action, now)?;
        match store
            .sync_put(&next, Some(current.version), action.name(), Some(&current))
            .await
        {
            Ok(()) => return Ok(next),
            Err(StoreError::Conflict { actual, .. }) => {
                if let Some(expected) = expected {
                    return Err(StoreError::Conflict { expected, actual });
                }
            }
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Unavailable("sync session kept changing".into()))
}

//! The event plane's vocabulary: the topics a watcher follows and the events published on
//! them. A store publishes a [`Published`]; the hub hands it to the subscribers of each of its
//! [`Published::topics`].

use super::{ChannelId, Event, SessionId, SyncId, UserGrants, UserId};
use crate::sync::SyncSession;

/// What a watcher follows.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Topic {
    /// A channel: floor, members, placement, and its sync sessions' changes.
    Channel(ChannelId),
    /// A user: grants, kicks, session takeovers.
    User(UserId),
    /// One sync session.
    Sync(SyncId),
}

impl Topic {
    /// The kind, as metrics and logs name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Channel(_) => "channel",
            Self::User(_) => "user",
            Self::Sync(_) => "sync",
        }
    }
}

/// An event of a user's topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserEvent {
    /// The user's stored grants changed.
    Grants(UserGrants),
    /// An admin disconnected the user: gateways close the user's sockets.
    Kicked { user_id: UserId, reason: String },
    /// A socket of generation `generation` took the session over: older sockets close
    /// without ending it.
    Resumed {
        user_id: UserId,
        session_id: SessionId,
        generation: u64,
    },
}

impl UserEvent {
    pub fn user_id(&self) -> &UserId {
        match self {
            Self::Grants(g) => &g.user_id,
            Self::Kicked { user_id, .. } | Self::Resumed { user_id, .. } => user_id,
        }
    }
}

/// A sync session changed (`state` is `None` when it was deleted).
#[derive(Debug, Clone)]
pub struct SyncEvent {
    pub session_id: SyncId,
    pub version: u64,
    /// The channel the session is bound to, if any (also for a deletion).
    pub channel_id: Option<ChannelId>,
    pub state: Option<SyncSession>,
}

impl SyncEvent {
    /// The change of a stored session.
    pub fn changed(state: SyncSession) -> Self {
        Self {
            session_id: state.session_id.clone(),
            version: state.version,
            channel_id: channel_of(&state),
            state: Some(state),
        }
    }
}

/// The channel a sync session is bound to, if any.
pub fn channel_of(state: &SyncSession) -> Option<ChannelId> {
    state
        .channel_id
        .as_deref()
        .and_then(|c| ChannelId::parse(c).ok())
}

/// One event on the event plane.
#[derive(Debug, Clone)]
pub enum Published {
    Channel(Event),
    User(UserEvent),
    Sync(SyncEvent),
}

impl Published {
    /// The topics whose subscribers receive it: its own, and for a sync session's change also
    /// the channel it is bound to.
    pub fn topics(&self) -> impl Iterator<Item = Topic> {
        let (first, second) = match self {
            Self::Channel(e) => (Topic::Channel(e.channel_id().clone()), None),
            Self::User(e) => (Topic::User(e.user_id().clone()), None),
            Self::Sync(e) => (
                Topic::Sync(e.session_id.clone()),
                e.channel_id.clone().map(Topic::Channel),
            ),
        };
        std::iter::once(first).chain(second)
    }
}

impl From<Event> for Published {
    fn from(event: Event) -> Self {
        Self::Channel(event)
    }
}

impl From<UserEvent> for Published {
    fn from(event: UserEvent) -> Self {
        Self::User(event)
    }
}

impl From<SyncEvent> for Published {
    fn from(event: SyncEvent) -> Self {
        Self::Sync(event)
    }
}

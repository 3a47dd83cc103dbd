//! Who is connected here: the connections, their users and the channels each follows, and
//! the delivery of what the hub hands them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use axum::extract::ws::{Message, Utf8Bytes};
use talkgroup_proto::state::v1 as pb;
use tokio::sync::mpsc;

use crate::outbox::{Failure, Outbox, Outgoing};

/// Events a connection may have queued before the hub closes it rather than drop one.
pub const CONNECTION_EVENTS: usize = 256;

/// A floor change, with its `speaker-changed` push encoded once for every member.
#[derive(Debug)]
pub struct FloorPush {
    pub change: pb::FloorChanged,
    pub speaker_changed: Utf8Bytes,
}

impl FloorPush {
    /// Whether `session` is the new holder or the one that lost the floor.
    pub fn concerns(&self, session: &str) -> bool {
        let holder = self.change.holder.as_ref().and_then(|h| h.speaker.as_ref());
        [holder, self.change.previous.as_ref()]
            .into_iter()
            .flatten()
            .any(|s| s.session_id == session)
    }
}

/// What goes to every member of a channel.
#[derive(Debug, Clone)]
pub enum Fanout {
    Floor(Arc<FloorPush>),
    /// A push that is the same for every member (`channel-state`, `members-changed`,
    /// `sync-state`), encoded once.
    Push(Utf8Bytes),
    /// The channel moved to another media node: every member acts on it.
    Moved(Arc<pb::ChannelMoved>),
}

/// What a connection itself receives (pushes that need nothing of it go to its outbox).
#[derive(Debug, Clone)]
pub enum HubEvent {
    /// A floor change of a channel whose floor it holds, or that names its session.
    Floor(Arc<FloorPush>),
    /// The user's stored grants (applied when newer than the connection's).
    Grants(pb::UserGrants),
    /// Events of the user may have been missed (a kick among them): check the session.
    Resync,
    /// An admin disconnected the user (the reason is shown to them).
    Kicked(String),
    /// A socket of generation `generation` took session `session` over: an older socket of
    /// it closes without ending it.
    Resumed { session: String, generation: u64 },
    /// A channel it follows moved to another media node.
    Moved(Arc<pb::ChannelMoved>),
}

/// A local connection as the hub sees it.
#[derive(Debug)]
struct Member {
    /// Events the connection itself must act on.
    events: mpsc::Sender<HubEvent>,
    /// Its socket's outbox: pushes that need nothing of the connection go straight in.
    out: Outbox,
    user: String,
    session: String,
    /// Channels it follows.
    channels: HashSet<String>,
    /// Channels whose floor it holds: their changes go through the connection.
    holding: HashSet<String>,
}

impl Member {
    /// Queues a push on its socket without waiting; false if the outbox is full (it has then
    /// failed, and the connection closes) or closed.
    fn push(&self, text: &Utf8Bytes) -> bool {
        self.out
            .push(Outgoing::Message(Message::Text(text.clone())))
    }

    /// Hands the connection an event without waiting. One it cannot take in time closes it
    /// (through its outbox) rather than be dropped: a kick or a floor change is never lost on
    /// an open socket.
    fn event(&self, event: HubEvent) -> bool {
        if self.events.try_send(event).is_ok() {
            return true;
        }
        self.out.fail(Failure::Overflow);
        false
    }
}

/// What an unregistered connection left behind.
#[derive(Debug, Default)]
pub struct Left {
    /// Its user, when it was the user's last connection here.
    pub last_of_user: Option<String>,
    /// The channels nobody here follows any more.
    pub emptied: Vec<String>,
}

#[derive(Debug, Default)]
pub struct Registry {
    next_id: u64,
    conns: HashMap<u64, Member>,
    by_user: HashMap<String, HashSet<u64>>,
    by_channel: HashMap<String, HashSet<u64>>,
}

impl Registry {
    /// A new connection; true as well when it is the user's first here.
    pub fn register(
        &mut self,
        user: &str,
        session: &str,
        out: Outbox,
    ) -> (u64, mpsc::Receiver<HubEvent>, bool) {
        let (tx, rx) = mpsc::channel(CONNECTION_EVENTS);
        self.next_id += 1;
        let id = self.next_id;
        self.conns.insert(
            id,
            Member {
                events: tx,
                out,
                user: user.to_owned(),
                session: session.to_owned(),
                channels: HashSet::new(),
                holding: HashSet::new(),
            },
        );
        let conns = self.by_user.entry(user.to_owned()).or_default();
        conns.insert(id);
        (id, rx, conns.len() == 1)
    }

    pub fn unregister(&mut self, conn: u64) -> Left {
        let Some(member) = self.conns.remove(&conn) else {
            return Left::default();
        };
        let mut left = Left::default();
        if let Some(ids) = self.by_user.get_mut(&member.user) {
            ids.remove(&conn);
            if ids.is_empty() {
                self.by_user.remove(&member.user);
                left.last_of_user = Some(member.user.clone());
            }
        }
        for channel in &member.channels {
            if self.unlink(conn, channel) {
                left.emptied.push(channel.clone());
            }
        }
        left
    }

    pub fn follows(&self, channel: &str) -> bool {
        self.by_channel.contains_key(channel)
    }

    /// `conn` follows `channel`.
    pub fn follow(&mut self, conn: u64, channel: &str) {
        if let Some(member) = self.conns.get_mut(&conn) {
            member.channels.insert(channel.to_owned());
            self.by_channel
                .entry(channel.to_owned())
                .or_default()
                .insert(conn);
        }
    }

    /// `conn` no longer follows `channel`; true when nobody here does any more.
    pub fn unfollow(&mut self, conn: u64, channel: &str) -> bool {
        if let Some(member) = self.conns.get_mut(&conn) {
            member.channels.remove(channel);
        }
        self.unlink(conn, channel)
    }

    fn unlink(&mut self, conn: u64, channel: &str) -> bool {
        let Some(set) = self.by_channel.get_mut(channel) else {
            return false;
        };
        set.remove(&conn);
        if !set.is_empty() {
            return false;
        }
        self.by_channel.remove(channel);
        true
    }

    pub fn holding(&mut self, conn: u64, channel: &str, holds: bool) {
        if let Some(member) = self.conns.get_mut(&conn) {
            if holds {
                member.holding.insert(channel.to_owned());
            } else {
                member.holding.remove(channel);
            }
        }
    }

    /// Hands `event` to every connection following `channel`, never waiting on a slow one.
    pub fn deliver(&self, channel: &str, event: &Fanout) {
        let Some(ids) = self.by_channel.get(channel) else {
            return;
        };
        for id in ids {
            let Some(member) = self.conns.get(id) else {
                continue;
            };
            // A push that needs nothing of the connection goes straight to its socket's
            // outbox: one task wake-up per member instead of two.
            let sent = match event {
                Fanout::Floor(push)
                    if member.holding.contains(channel) || push.concerns(&member.session) =>
                {
                    member.event(HubEvent::Floor(Arc::clone(push)))
                }
                Fanout::Floor(push) => member.push(&push.speaker_changed),
                Fanout::Push(text) => member.push(text),
                Fanout::Moved(moved) => member.event(HubEvent::Moved(Arc::clone(moved))),
            };
            if !sent {
                tracing::info!(conn = id, "connection too slow for its pushes; closing it");
            }
        }
    }

    /// Hands `event` to the user's connections (only those of `session`, if given).
    pub fn to_user(&self, user: &str, session: Option<&str>, event: &HubEvent) {
        let Some(ids) = self.by_user.get(user) else {
            return;
        };
        for id in ids {
            let Some(member) = self.conns.get(id) else {
                continue;
            };
            if session.is_some_and(|s| s != member.session) {
                continue;
            }
            if !member.event(event.clone()) {
                tracing::info!(
                    conn = id,
                    "connection too slow for a user event; closing it"
                );
            }
        }
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    pub fn channel_count(&self) -> usize {
        self.by_channel.len()
    }
}

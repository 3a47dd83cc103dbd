//! The gateway's `Watch` streams on state-svc, shared by all its connections.
//!
//! Connections say which channels they are in; the hub subscribes exactly those, keeps each
//! channel's state (snapshot, then floor changes last-epoch-wins and membership changes), and
//! hands every change to the local connections in the channel. Because the events come from
//! state-svc, a change made through any gateway replica reaches clients on every replica. After
//! a reconnect (backoff 1, 2, 4, 8, 16, 30 s) state-svc sends fresh snapshots, which reach the
//! clients as `channel-state`.
//!
//! The channels are spread over several streams (shards), each kept well under state-svc's
//! per-stream cap: a channel is assigned to the first shard with room when a connection first
//! follows it, and leaves its shard when nobody here follows it any more. When every shard is
//! full the follow is refused (the join gets `LIMIT_EXCEEDED`), so no number of joins can
//! break a stream that other users' channels share.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use axum::extract::ws::{Message, Utf8Bytes};
use talkgroup_proto::state::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::outbox::{Failure, Outbox};
use crate::protocol::push::{MemberChange, MembersChanged, SpeakerChanged};
use crate::protocol::sync::{SyncChanged, SyncEnvelope};
use crate::protocol::{ChannelState, Frame, Push, User, reason};

/// Events a connection may have queued before the hub drops its events.
pub const CONNECTION_EVENTS: usize = 256;
/// Membership changes of a channel within this window reach its members as one
/// `members-changed` push.
const MEMBERSHIP_COALESCE: Duration = Duration::from_millis(25);
const BACKOFF: [u64; 6] = [1, 2, 4, 8, 16, 30];

/// Floor changes a local request caused wait at most this long for the request's reply.
const HOLD_BACK_AT_MOST: Duration = Duration::from_millis(250);

/// A floor change, with its `speaker-changed` push encoded once for every member.
#[derive(Debug)]
pub struct FloorPush {
    pub change: pb::FloorChanged,
    pub speaker_changed: Utf8Bytes,
}

impl FloorPush {
    /// Whether `session` is the new holder or the one that lost the floor.
    fn concerns(&self, session: &str) -> bool {
        let holder = self.change.holder.as_ref().and_then(|h| h.speaker.as_ref());
        [holder, self.change.previous.as_ref()]
            .into_iter()
            .flatten()
            .any(|s| s.session_id == session)
    }
}

/// What goes to every member of a channel.
#[derive(Debug, Clone)]
enum Fanout {
    Floor(Arc<FloorPush>),
    /// A push that is the same for every member (`channel-state`, `sync-state`), encoded once.
    Push(Utf8Bytes),
    /// The channel moved to another media node: every member acts on it.
    Moved(Arc<pb::ChannelMoved>),
}

/// What a connection itself receives (pushes that need nothing of it go to its outbox).
#[derive(Debug, Clone)]
pub enum HubEvent {
    /// A floor change of a channel whose floor it holds, or that names its session.
    Floor(Arc<FloorPush>),
    /// The user's stored grants changed.
    Grants(pb::UserGrants),
    /// Grant changes may have been missed: re-read the user's grants.
    GrantsResync,
    /// An admin disconnected the user (the reason is shown to them).
    Kicked(String),
    /// A socket of generation `generation` took session `session` over: an older socket of
    /// it closes without ending it.
    Resumed { session: String, generation: u64 },
    /// A channel it follows moved to another media node.
    Moved(Arc<pb::ChannelMoved>),
}

/// What the writer task is given, in order.
#[derive(Debug)]
pub enum Outgoing {
    Message(Message),
    /// Dropped by the writer once the frames queued before it (the request's reply) are
    /// written.
    Written(FloorRequest),
}

/// A floor request in flight: the hub holds back the floor change it causes until this is
/// dropped, once the reply is on the socket.
#[derive(Debug)]
pub struct FloorRequest {
    hub: Arc<Hub>,
    channel: String,
    session: String,
}

impl FloorRequest {
    pub fn start(hub: &Arc<Hub>, channel: &str, session: &str) -> Self {
        hub.request_started(channel, session);
        Self {
            hub: Arc::clone(hub),
            channel: channel.to_owned(),
            session: session.to_owned(),
        }
    }
}

impl Drop for FloorRequest {
    fn drop(&mut self) {
        self.hub.request_done(&self.channel, &self.session);
    }
}

/// A local connection as the hub sees it.
#[derive(Debug)]
struct Member {
    /// Events the connection itself must act on.
    events: mpsc::Sender<HubEvent>,
    /// Its socket's outbox: pushes that need nothing of the connection go straight in.
    out: Outbox,
    session: String,
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

/// Events of a channel waiting for a requester's reply.
#[derive(Debug)]
struct HeldBack {
    /// The session whose request caused the first of them.
    session: String,
    hold: u64,
    events: Vec<Fanout>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    conns: HashMap<u64, Member>,
    by_user: HashMap<String, HashSet<u64>>,
    /// The channel of each sync session seen, to route its deletion.
    sync_channels: HashMap<String, String>,
    /// The last state of each sync session pushed to a followed channel (as serialized), so
    /// the next push can be the change from it.
    sync_pushed: HashMap<String, serde_json::Value>,
    /// Per channel, the membership changes about to go out as one `members-changed`.
    pending_changes: HashMap<String, Vec<MemberChange>>,
    by_channel: HashMap<String, HashSet<u64>>,
    cache: HashMap<String, pb::ChannelState>,
    /// Local sessions with a floor request (`ptt-start`, `ptt-stop`) awaiting its reply, by
    /// channel.
    requests: HashMap<String, HashSet<String>>,
    /// Per channel, the events held back until the reply to the request that caused the first
    /// of them has gone out.
    held_back: HashMap<String, HeldBack>,
    /// Numbers the holds, so a hold's time limit never releases a later one.
    holds: u64,
    /// WebRTC transports each user holds through this gateway, across their sockets.
    user_transports: HashMap<String, usize>,
    /// The stream (shard) each followed channel is on, and how many each has.
    shard_of: HashMap<String, usize>,
    shard_load: Vec<usize>,
}

/// The connections of a user.
fn user_conns(inner: &Inner, user_id: &str) -> Vec<u64> {
    inner
        .by_user
        .get(user_id)
        .map(|ids| ids.iter().copied().collect())
        .unwrap_or_default()
}

/// Hands `event` to every connection following `channel`, never waiting on a slow one; behind
/// the channel's held-back events, if it has some.
fn send_to_channel(inner: &mut Inner, channel: &str, event: Fanout) {
    if let Some(held) = inner.held_back.get_mut(channel) {
        held.events.push(event);
        return;
    }
    deliver(inner, channel, &event);
}

fn deliver(inner: &Inner, channel: &str, event: &Fanout) {
    let Some(ids) = inner.by_channel.get(channel) else {
        return;
    };
    for id in ids {
        let Some(member) = inner.conns.get(id) else {
            continue;
        };
        // A push that needs nothing of the connection goes straight to its socket's outbox:
        // one task wake-up per member instead of two.
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

/// Sends what `channel` held back, in order, if it is still the hold `only` (any hold if
/// `None`).
fn release_held(inner: &mut Inner, channel: &str, only: Option<u64>) {
    if only.is_some_and(|hold| inner.held_back.get(channel).is_none_or(|h| h.hold != hold)) {
        return;
    }
    if let Some(held) = inner.held_back.remove(channel) {
        for event in &held.events {
            deliver(inner, channel, event);
        }
    }
}

/// The `channel-state` push of a channel.
fn state_push(state: &pb::ChannelState) -> Option<Utf8Bytes> {
    Frame::from(Push::ChannelState(ChannelState::from(state))).encode()
}

/// A stream that ran at least this long restarts the backoff from its first step.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);

/// Runs `session` (one connected stream, `Ok` on shutdown) until shutdown, reconnecting with
/// backoff 1, 2, 4, 8, 16, 30 s; a session that lasted a while starts the backoff over.
async fn reconnecting<F, Fut>(what: &'static str, shutdown: &CancellationToken, mut session: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), tonic::Status>>,
{
    let mut attempt = 0usize;
    loop {
        let started = tokio::time::Instant::now();
        let error = match session().await {
            Ok(()) => return,
            Err(error) => error,
        };
        if started.elapsed() >= HEALTHY_SESSION {
            attempt = 0;
        }
        let wait = Duration::from_secs(BACKOFF[attempt.min(BACKOFF.len() - 1)]);
        attempt += 1;
        tracing::warn!(code = ?error.code(), retry_in_s = wait.as_secs(), "{what} interrupted");
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// How the hub spreads its channels over streams.
#[derive(Debug, Clone, Copy)]
pub struct Shards {
    /// Streams at most.
    pub streams: usize,
    /// Channels one stream follows at most (state-svc refuses more than 10,000).
    pub channels_per_stream: usize,
}

impl Default for Shards {
    fn default() -> Self {
        Self {
            streams: 16,
            channels_per_stream: 5_000,
        }
    }
}

#[derive(Debug)]
pub struct Hub {
    inner: Mutex<Inner>,
    shards: Shards,
    /// The channels each stream follows.
    wanted: Vec<watch::Sender<HashSet<String>>>,
    /// Itself, for the delayed membership flushes.
    me: Weak<Hub>,
}

impl Hub {
    pub fn new() -> Arc<Self> {
        Self::with_shards(Shards::default())
    }

    pub fn with_shards(shards: Shards) -> Arc<Self> {
        let shards = Shards {
            streams: shards.streams.max(1),
            channels_per_stream: shards.channels_per_stream.max(1),
        };
        Arc::new_cyclic(|me| Self {
            inner: Mutex::new(Inner {
                shard_load: vec![0; shards.streams],
                ..Inner::default()
            }),
            shards,
            wanted: (0..shards.streams)
                .map(|_| watch::Sender::new(HashSet::new()))
                .collect(),
            me: me.clone(),
        })
    }

    /// Sends a channel's membership changes of the last moment to its connections.
    fn flush_changes(&self, channel: &str) {
        let mut inner = self.lock();
        let Some(changes) = inner.pending_changes.remove(channel) else {
            return;
        };
        let push = Push::MembersChanged(MembersChanged {
            channel_id: channel.to_owned(),
            changes,
        });
        if let Some(text) = Frame::from(push).encode() {
            send_to_channel(&mut inner, channel, Fanout::Push(text));
        }
    }

    /// A local session asks for or gives up `channel`'s floor: a floor change naming it waits
    /// until [`Hub::request_done`], so the requester reads its reply before the members'
    /// `speaker-changed` fan-out (hundreds of frames in a large channel) takes the CPU.
    pub fn request_started(&self, channel: &str, session: &str) {
        self.lock()
            .requests
            .entry(channel.to_owned())
            .or_default()
            .insert(session.to_owned());
    }

    /// The reply to the session's floor request has been queued: what it held back goes out.
    pub fn request_done(&self, channel: &str, session: &str) {
        let mut inner = self.lock();
        if let Some(sessions) = inner.requests.get_mut(channel) {
            sessions.remove(session);
            if sessions.is_empty() {
                inner.requests.remove(channel);
            }
        }
        if inner
            .held_back
            .get(channel)
            .is_some_and(|h| h.session == session)
        {
            release_held(&mut inner, channel, None);
        }
    }

    /// Holds back a floor change of `channel` caused by `session`, for at most
    /// [`HOLD_BACK_AT_MOST`] whatever happens to the request.
    fn hold_back(&self, inner: &mut Inner, channel: &str, session: &str, event: Fanout) {
        inner.holds += 1;
        let hold = inner.holds;
        let held = HeldBack {
            session: session.to_owned(),
            hold,
            events: vec![event],
        };
        inner.held_back.insert(channel.to_owned(), held);
        if let Some(hub) = self.me.upgrade() {
            let channel = channel.to_owned();
            tokio::spawn(async move {
                tokio::time::sleep(HOLD_BACK_AT_MOST).await;
                release_held(&mut hub.lock(), &channel, Some(hold));
            });
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A new connection of `user_id` with session `session`, whose socket's outbox is `out`.
    pub fn register(
        &self,
        user_id: &str,
        session: &str,
        out: Outbox,
    ) -> (u64, mpsc::Receiver<HubEvent>) {
        let (tx, rx) = mpsc::channel(CONNECTION_EVENTS);
        let mut inner = self.lock();
        inner.next_id += 1;
        let id = inner.next_id;
        let member = Member {
            events: tx,
            out,
            session: session.to_owned(),
            holding: HashSet::new(),
        };
        inner.conns.insert(id, member);
        inner
            .by_user
            .entry(user_id.to_owned())
            .or_default()
            .insert(id);
        (id, rx)
    }

    /// Whether a connection could follow `channel` now (it is followed already, or a stream
    /// has room for it).
    pub fn has_room_for(&self, channel: &str) -> bool {
        let inner = self.lock();
        inner.by_channel.contains_key(channel)
            || inner
                .shard_load
                .iter()
                .any(|load| *load < self.shards.channels_per_stream)
    }

    /// Connection `conn` follows `channel`; false (nothing changed) when the channel is new
    /// here and every stream is full.
    pub fn follow(&self, conn: u64, channel: &str) -> bool {
        let mut inner = self.lock();
        if !inner.by_channel.contains_key(channel) {
            let per_stream = self.shards.channels_per_stream;
            let Some(shard) = inner.shard_load.iter().position(|load| *load < per_stream) else {
                return false;
            };
            inner.shard_load[shard] += 1;
            inner.shard_of.insert(channel.to_owned(), shard);
            self.wanted[shard].send_modify(|set| {
                set.insert(channel.to_owned());
            });
        }
        inner
            .by_channel
            .entry(channel.to_owned())
            .or_default()
            .insert(conn);
        true
    }

    pub fn unfollow(&self, conn: u64, channel: &str) {
        let mut inner = self.lock();
        self.unfollow_locked(&mut inner, conn, channel);
    }

    fn unfollow_locked(&self, inner: &mut Inner, conn: u64, channel: &str) {
        let Some(set) = inner.by_channel.get_mut(channel) else {
            return;
        };
        set.remove(&conn);
        if !set.is_empty() {
            return;
        }
        inner.by_channel.remove(channel);
        inner.cache.remove(channel);
        let ended: Vec<String> = inner
            .sync_channels
            .iter()
            .filter(|(_, ch)| ch.as_str() == channel)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ended {
            inner.sync_pushed.remove(&id);
        }
        if let Some(shard) = inner.shard_of.remove(channel) {
            inner.shard_load[shard] -= 1;
            self.wanted[shard].send_modify(|set| {
                set.remove(channel);
            });
        }
    }

    pub fn unregister(&self, conn: u64) {
        let mut inner = self.lock();
        inner.conns.remove(&conn);
        inner.by_user.retain(|_, ids| {
            ids.remove(&conn);
            !ids.is_empty()
        });
        let channels: Vec<String> = inner
            .by_channel
            .iter()
            .filter(|(_, ids)| ids.contains(&conn))
            .map(|(ch, _)| ch.clone())
            .collect();
        for ch in channels {
            self.unfollow_locked(&mut inner, conn, &ch);
        }
    }

    /// Whether connection `conn` holds `channel`'s floor (its changes then go through it).
    pub fn holding(&self, conn: u64, channel: &str, holds: bool) {
        if let Some(member) = self.lock().conns.get_mut(&conn) {
            if holds {
                member.holding.insert(channel.to_owned());
            } else {
                member.holding.remove(channel);
            }
        }
    }

    /// Takes a transport place for `user`, unless they hold `max` through this gateway.
    pub fn take_transport(&self, user: &str, max: usize) -> bool {
        let mut inner = self.lock();
        let held = inner.user_transports.entry(user.to_owned()).or_default();
        if *held >= max {
            return false;
        }
        *held += 1;
        true
    }

    /// The highest floor epoch this gateway has seen for `channel` (0: none), for acquires to
    /// carry: a grant is always above it, whatever the store lost.
    pub fn known_epoch(&self, channel: &str) -> u64 {
        self.lock()
            .cache
            .get(channel)
            .map_or(0, |state| state.epoch)
    }

    /// Counts `count` transports `user` brought along (a resumed session's), over the limit if
    /// need be: they exist already.
    pub fn add_transports(&self, user: &str, count: usize) {
        if count > 0 {
            *self
                .lock()
                .user_transports
                .entry(user.to_owned())
                .or_default() += count;
        }
    }

    /// Gives back `count` of `user`'s transport places.
    pub fn give_transports(&self, user: &str, count: usize) {
        let mut inner = self.lock();
        if let Some(held) = inner.user_transports.get_mut(user) {
            *held = held.saturating_sub(count);
            if *held == 0 {
                inner.user_transports.remove(user);
            }
        }
    }

    pub fn connection_count(&self) -> usize {
        self.lock().conns.len()
    }

    /// Channels some local connection follows.
    pub fn channel_count(&self) -> usize {
        self.lock().by_channel.len()
    }

    fn dispatch(&self, event: pb::watch_event::Event) {
        let mut inner = self.lock();
        let (channel, out) = match event {
            pb::watch_event::Event::Snapshot(state) => {
                let Some(text) = state_push(&state) else {
                    return;
                };
                let channel = state.channel_id.clone();
                inner.cache.insert(channel.clone(), state);
                (channel, Fanout::Push(text))
            }
            pb::watch_event::Event::Floor(change) => {
                let Some(state) = inner.cache.get_mut(&change.channel_id) else {
                    return;
                };
                if change.epoch < state.epoch {
                    return;
                }
                state.epoch = change.epoch;
                state.holder.clone_from(&change.holder);
                state.busy = change.holder.is_some();
                let push = Push::SpeakerChanged(SpeakerChanged {
                    channel_id: change.channel_id.clone(),
                    speaker: User::speaking(change.holder.as_ref()),
                    epoch: change.epoch,
                    reason: reason(change.reason()),
                });
                let Some(speaker_changed) = Frame::from(push).encode() else {
                    return;
                };
                let channel = change.channel_id.clone();
                let push = Arc::new(FloorPush {
                    change,
                    speaker_changed,
                });
                let requester = inner
                    .requests
                    .get(&channel)
                    .and_then(|sessions| sessions.iter().find(|s| push.concerns(s)).cloned());
                let event = Fanout::Floor(push);
                match requester {
                    Some(session) if !inner.held_back.contains_key(&channel) => {
                        self.hold_back(&mut inner, &channel, &session, event);
                        return;
                    }
                    _ => (channel, event),
                }
            }
            pb::watch_event::Event::Moved(moved) => {
                if let Some(state) = inner.cache.get_mut(&moved.channel_id) {
                    state.media_node_id = moved
                        .node
                        .as_ref()
                        .map(|n| n.node_id.clone())
                        .unwrap_or_default();
                }
                (moved.channel_id.clone(), Fanout::Moved(Arc::new(moved)))
            }
            pb::watch_event::Event::Membership(change) => {
                let Some(state) = inner.cache.get_mut(&change.channel_id) else {
                    return;
                };
                let Some(member) = change.member.clone() else {
                    return;
                };
                // In order from one stream; a change not newer than the snapshot is in it.
                if change.version <= state.members_version {
                    return;
                }
                state.members_version = change.version;
                let user_present =
                    |members: &[pb::Member]| members.iter().any(|m| m.user_id == member.user_id);
                let was_present = user_present(&state.members);
                state.members.retain(|m| m.session_id != member.session_id);
                if change.change() == pb::MembershipChange::Joined {
                    state.members.push(member.clone());
                }
                // Members are listed once per user: a user's second socket is no change.
                let delta = match (was_present, user_present(&state.members)) {
                    (false, true) => MemberChange {
                        version: change.version,
                        joined: Some(User {
                            user_id: member.user_id.clone(),
                            user_name: member.user_name.clone(),
                        }),
                        left: None,
                    },
                    (true, false) => MemberChange {
                        version: change.version,
                        joined: None,
                        left: Some(member.user_id.clone()),
                    },
                    _ => return,
                };
                let channel = change.channel_id.clone();
                let pending = inner.pending_changes.entry(channel.clone()).or_default();
                pending.push(delta);
                if pending.len() == 1
                    && let Some(hub) = self.me.upgrade()
                {
                    tokio::spawn(async move {
                        tokio::time::sleep(MEMBERSHIP_COALESCE).await;
                        hub.flush_changes(&channel);
                    });
                }
                return;
            }
        };
        send_to_channel(&mut inner, &channel, out);
    }

    /// Hands a grant change to the connections of its user.
    fn dispatch_grants(&self, event: pb::grants_event::Event) {
        let inner = self.lock();
        let (ids, out): (Vec<u64>, HubEvent) = match event {
            pb::grants_event::Event::Changed(grants) => (
                user_conns(&inner, &grants.user_id),
                HubEvent::Grants(grants),
            ),
            pb::grants_event::Event::Resync(_) => (
                inner.conns.keys().copied().collect(),
                HubEvent::GrantsResync,
            ),
            pb::grants_event::Event::Kicked(kick) => (
                user_conns(&inner, &kick.user_id),
                HubEvent::Kicked(kick.reason),
            ),
            pb::grants_event::Event::Resumed(resumed) => (
                user_conns(&inner, &resumed.user_id)
                    .into_iter()
                    .filter(|id| {
                        inner
                            .conns
                            .get(id)
                            .is_some_and(|m| m.session == resumed.session_id)
                    })
                    .collect(),
                HubEvent::Resumed {
                    session: resumed.session_id,
                    generation: resumed.generation,
                },
            ),
        };
        for id in ids {
            if let Some(member) = inner.conns.get(&id)
                && !member.event(out.clone())
            {
                tracing::info!(
                    conn = id,
                    "connection too slow for a grant change; closing it"
                );
            }
        }
    }

    /// Hands a sync session change to the connections following its channel: the change from
    /// the last state pushed when there is one a version before, the whole session otherwise.
    fn dispatch_sync(&self, state: pb::SyncState) {
        let mut inner = self.lock();
        let channel = if state.deleted {
            inner.sync_channels.remove(&state.session_id)
        } else if state.channel_id.is_empty() {
            None
        } else {
            inner
                .sync_channels
                .insert(state.session_id.clone(), state.channel_id.clone());
            Some(state.channel_id.clone())
        };
        let Some(channel) = channel else {
            return;
        };
        if !inner.by_channel.contains_key(&channel) {
            // Nobody here follows it: nothing to push, nothing to diff against later.
            inner.sync_pushed.remove(&state.session_id);
            return;
        }
        let envelope = SyncEnvelope::from(&state);
        let live = envelope.live_json();
        let previous = match &live {
            Some(now) => inner
                .sync_pushed
                .insert(state.session_id.clone(), now.clone()),
            None => inner.sync_pushed.remove(&state.session_id),
        };
        let delta = match (&previous, &live) {
            (Some(before), Some(after))
                if before["version"].as_u64().map(|v| v + 1) == Some(state.version) =>
            {
                SyncChanged::between(before, after, envelope.server_time())
            }
            _ => None,
        };
        let push = match delta {
            Some(delta) => Push::SyncChanged(Box::new(delta)),
            None => Push::SyncState(Box::new(envelope)),
        };
        if let Some(text) = Frame::from(push).encode() {
            send_to_channel(&mut inner, &channel, Fanout::Push(text));
        }
    }

    /// Keeps the sync watch open until shutdown, reconnecting with backoff 1-30 s.
    pub async fn run_syncs(self: Arc<Self>, state: Channel, shutdown: CancellationToken) {
        let stop = shutdown.clone();
        reconnecting("sync watch", &stop, move || {
            let (hub, state, shutdown) = (Arc::clone(&self), state.clone(), shutdown.clone());
            async move { hub.syncs_once(state, &shutdown).await }
        })
        .await;
    }

    async fn syncs_once(
        &self,
        state: Channel,
        shutdown: &CancellationToken,
    ) -> Result<(), tonic::Status> {
        let mut client = pb::sync_service_client::SyncServiceClient::new(state);
        let mut stream = client
            .watch_all_syncs(pb::WatchAllSyncsRequest {})
            .await?
            .into_inner();
        loop {
            tokio::select! {
                event = stream.next() => match event {
                    Some(Ok(state)) => self.dispatch_sync(state),
                    Some(Err(status)) => return Err(status),
                    None => return Err(tonic::Status::unavailable("sync watch ended")),
                },
                () = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    /// Keeps the grant watch open until shutdown, reconnecting with backoff 1, 2, 4, 8, 16,
    /// 30 s. Every (re)connection makes every connection re-read its user's grants, since
    /// changes may have been missed while the watch was down.
    pub async fn run_grants(self: Arc<Self>, state: Channel, shutdown: CancellationToken) {
        let stop = shutdown.clone();
        reconnecting("grant watch", &stop, move || {
            let (hub, state, shutdown) = (Arc::clone(&self), state.clone(), shutdown.clone());
            async move { hub.grants_once(state, &shutdown).await }
        })
        .await;
    }

    async fn grants_once(
        &self,
        state: Channel,
        shutdown: &CancellationToken,
    ) -> Result<(), tonic::Status> {
        let mut client = pb::access_service_client::AccessServiceClient::new(state);
        let mut stream = client
            .watch_grants(pb::WatchGrantsRequest {})
            .await?
            .into_inner();
        self.dispatch_grants(pb::grants_event::Event::Resync(pb::GrantsResync {}));
        loop {
            tokio::select! {
                event = stream.next() => match event {
                    Some(Ok(pb::GrantsEvent { event: Some(event) })) => self.dispatch_grants(event),
                    Some(Ok(_)) => {}
                    Some(Err(status)) => return Err(status),
                    None => return Err(tonic::Status::unavailable("grant watch ended")),
                },
                () = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    /// Keeps every stream open until shutdown, each reconnecting with backoff on its own; a
    /// stream connects once it has a channel to follow.
    pub async fn run(self: Arc<Self>, state: Channel, shutdown: CancellationToken) {
        let streams = (0..self.wanted.len()).map(|shard| {
            let (hub, state, shutdown) = (Arc::clone(&self), state.clone(), shutdown.clone());
            async move {
                let mut wanted = hub.wanted[shard].subscribe();
                tokio::select! {
                    found = wanted.wait_for(|set| !set.is_empty()) => if found.is_err() { return },
                    () = shutdown.cancelled() => return,
                }
                let stop = shutdown.clone();
                reconnecting("state watch", &stop, move || {
                    let (hub, state, shutdown) =
                        (Arc::clone(&hub), state.clone(), shutdown.clone());
                    async move { hub.watch_once(shard, state, &shutdown).await }
                })
                .await;
            }
        });
        futures::future::join_all(streams).await;
    }

    async fn watch_once(
        &self,
        shard: usize,
        state: Channel,
        shutdown: &CancellationToken,
    ) -> Result<(), tonic::Status> {
        let mut client = pb::channel_service_client::ChannelServiceClient::new(state);
        let (tx, rx) = mpsc::channel(64);
        let mut stream = client
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        let mut wanted = self.wanted[shard].subscribe();
        let mut subscribed: HashSet<String> = HashSet::new();
        loop {
            let now = wanted.borrow_and_update().clone();
            let add: Vec<String> = now.difference(&subscribed).cloned().collect();
            let remove: Vec<String> = subscribed.difference(&now).cloned().collect();
            for chunk in add.chunks(500) {
                let action = pb::watch_request::Action::Subscribe(pb::ChannelSet {
                    channel_ids: chunk.to_vec(),
                });
                tx.send(pb::WatchRequest {
                    action: Some(action),
                })
                .await
                .map_err(|_| tonic::Status::unavailable("watch closed"))?;
            }
            for chunk in remove.chunks(500) {
                let action = pb::watch_request::Action::Unsubscribe(pb::ChannelSet {
                    channel_ids: chunk.to_vec(),
                });
                tx.send(pb::WatchRequest {
                    action: Some(action),
                })
                .await
                .map_err(|_| tonic::Status::unavailable("watch closed"))?;
            }
            subscribed = now;
            tokio::select! {
                changed = wanted.changed() => if changed.is_err() { return Ok(()) },
                event = stream.next() => match event {
                    Some(Ok(pb::WatchEvent { event: Some(event) })) => self.dispatch(event),
                    Some(Ok(_)) => {}
                    Some(Err(status)) => return Err(status),
                    None => return Err(tonic::Status::unavailable("watch ended")),
                },
                () = shutdown.cancelled() => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn floor(channel: &str, session: &str, epoch: u64) -> pb::watch_event::Event {
        let speaker = pb::Speaker {
            session_id: session.to_owned(),
            user_id: format!("u-{session}"),
            user_name: session.to_owned(),
            priority: 0,
        };
        pb::watch_event::Event::Floor(pb::FloorChanged {
            channel_id: channel.to_owned(),
            holder: Some(pb::FloorHolder {
                speaker: Some(speaker),
                epoch,
                ..Default::default()
            }),
            epoch,
            reason: pb::FloorReason::Granted.into(),
            ..Default::default()
        })
    }

    /// The epoch of a `speaker-changed` push in a member's outbox.
    fn epoch_of(out: Outgoing) -> u64 {
        match out {
            Outgoing::Message(Message::Text(text)) => {
                let frame: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
                assert_eq!(frame["type"], "speaker-changed");
                frame["data"]["epoch"].as_u64().unwrap()
            }
            other => panic!("a speaker-changed push, not {other:?}"),
        }
    }

    /// A member's outbox, read as the writer would.
    struct Reader(crate::outbox::OutboxReader);

    impl Reader {
        fn try_recv(&mut self) -> Result<Outgoing, ()> {
            futures::FutureExt::now_or_never(self.recv())
                .flatten()
                .ok_or(())
        }

        async fn recv(&mut self) -> Option<Outgoing> {
            let (item, receipt) = self.0.recv().await?;
            self.0.written(receipt);
            Some(item)
        }
    }

    /// A member following "ch" that the changes below do not concern: its pushes go straight
    /// to its outbox.
    fn member(hub: &Hub) -> (mpsc::Receiver<HubEvent>, Reader) {
        let (out, outbox) = crate::outbox::outbox(1 << 20);
        let mut outbox = Reader(outbox);
        let (conn, events) = hub.register("u-listener", "s-listener", out);
        hub.follow(conn, "ch");
        hub.dispatch(pb::watch_event::Event::Snapshot(pb::ChannelState {
            channel_id: "ch".into(),
            ..Default::default()
        }));
        assert!(matches!(
            outbox.try_recv(),
            Ok(Outgoing::Message(Message::Text(_)))
        ));
        (events, outbox)
    }

    #[tokio::test]
    async fn a_change_waits_for_its_requesters_reply_and_later_ones_queue_behind() {
        let hub = Hub::new();
        let (mut events, mut rx) = member(&hub);

        hub.request_started("ch", "s-ana");
        hub.dispatch(floor("ch", "s-ana", 5));
        hub.dispatch(floor("ch", "s-bo", 6));
        hub.request_done("ch", "s-someone-else");
        assert!(rx.try_recv().is_err(), "held until Ana's reply is out");
        hub.request_done("ch", "s-ana");
        assert_eq!(epoch_of(rx.try_recv().unwrap()), 5);
        assert_eq!(epoch_of(rx.try_recv().unwrap()), 6);

        // A change nobody here asked for goes out at once.
        hub.dispatch(floor("ch", "s-cai", 7));
        assert_eq!(epoch_of(rx.try_recv().unwrap()), 7);
        assert!(
            events.try_recv().is_err(),
            "nothing for the connection itself"
        );
    }

    #[tokio::test]
    async fn changes_of_a_held_floor_go_through_the_connection() {
        let hub = Hub::new();
        let (out, _outbox) = crate::outbox::outbox(1 << 20);
        let (conn, mut events) = hub.register("u-ana", "s-ana", out);
        hub.follow(conn, "ch");
        hub.dispatch(pb::watch_event::Event::Snapshot(pb::ChannelState {
            channel_id: "ch".into(),
            ..Default::default()
        }));
        // Named in the change: the connection acts on it.
        hub.dispatch(floor("ch", "s-ana", 5));
        assert!(matches!(events.try_recv(), Ok(HubEvent::Floor(_))));
        // Holding the floor, a change naming others still goes through it.
        hub.holding(conn, "ch", true);
        hub.dispatch(floor("ch", "s-bo", 6));
        assert!(matches!(events.try_recv(), Ok(HubEvent::Floor(_))));
        hub.holding(conn, "ch", false);
        hub.dispatch(floor("ch", "s-cai", 7));
        assert!(events.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_requester_that_never_finishes_holds_back_only_for_a_moment() {
        let hub = Hub::new();
        let (_events, mut rx) = member(&hub);
        hub.request_started("ch", "s-ana");
        let started = tokio::time::Instant::now();
        hub.dispatch(floor("ch", "s-ana", 5));
        let event = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(epoch_of(event), 5);
        assert!(started.elapsed() >= HOLD_BACK_AT_MOST);
    }

    #[tokio::test]
    async fn an_event_the_connection_cannot_take_closes_it_instead_of_being_dropped() {
        let hub = Hub::new();
        let (out, _outbox) = crate::outbox::outbox(1 << 20);
        let (_conn, mut events) = hub.register("u-ana", "s-ana", out.clone());
        for _ in 0..CONNECTION_EVENTS {
            hub.dispatch_grants(pb::grants_event::Event::Kicked(pb::UserKicked {
                user_id: "u-ana".into(),
                reason: "bye".into(),
            }));
        }
        assert!(out.failure().is_none(), "the queue holds them all");
        hub.dispatch_grants(pb::grants_event::Event::Kicked(pb::UserKicked {
            user_id: "u-ana".into(),
            reason: "bye".into(),
        }));
        assert_eq!(out.failure(), Some(crate::outbox::Failure::Overflow));
        assert!(matches!(events.try_recv(), Ok(HubEvent::Kicked(_))));
    }

    #[tokio::test]
    async fn channels_spread_over_streams_and_a_full_hub_refuses_new_ones() {
        let hub = Hub::with_shards(Shards {
            streams: 2,
            channels_per_stream: 3,
        });
        let (out, _outbox) = crate::outbox::outbox(1 << 20);
        let (a, _) = hub.register("u-a", "s-a", out.clone());
        let (b, _) = hub.register("u-b", "s-b", out);
        for ch in ["c1", "c2", "c3", "c4"] {
            assert!(hub.follow(a, ch));
        }
        assert!(hub.follow(b, "c1"), "a followed channel takes no room");
        assert!(hub.follow(b, "c5") && hub.follow(b, "c6"));
        assert!(!hub.has_room_for("c7"));
        assert!(!hub.follow(b, "c7"), "every stream is full");
        assert!(hub.has_room_for("c1"));
        let sets: Vec<HashSet<String>> = hub.wanted.iter().map(|w| w.borrow().clone()).collect();
        assert!(sets.iter().all(|s| s.len() == 3), "{sets:?}");
        assert!(sets[0].is_disjoint(&sets[1]));
        // A channel nobody follows any more frees its room; a channel still followed does not.
        hub.unfollow(a, "c1");
        assert!(!hub.has_room_for("c7"), "b still follows c1");
        hub.unregister(b);
        assert!(hub.follow(a, "c7"));
        let followed: usize = hub.wanted.iter().map(|w| w.borrow().len()).sum();
        assert_eq!(followed, 4, "c2, c3, c4 and c7");
    }

    fn membership(
        session: &str,
        user: &str,
        change: pb::MembershipChange,
        version: u64,
    ) -> pb::watch_event::Event {
        pb::watch_event::Event::Membership(pb::MembershipChanged {
            channel_id: "ch".into(),
            member: Some(pb::Member {
                session_id: session.into(),
                user_id: user.into(),
                user_name: user.into(),
                ..Default::default()
            }),
            change: change.into(),
            version,
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn membership_changes_go_out_as_versioned_per_user_deltas() {
        use pb::MembershipChange::{Joined, Left};
        let hub = Hub::new();
        let (out, outbox) = crate::outbox::outbox(1 << 20);
        let mut outbox = Reader(outbox);
        let (conn, _events) = hub.register("u-l", "s-l", out);
        hub.follow(conn, "ch");
        hub.dispatch(pb::watch_event::Event::Snapshot(pb::ChannelState {
            channel_id: "ch".into(),
            members_version: 10,
            ..Default::default()
        }));
        assert!(outbox.try_recv().is_ok(), "the snapshot's channel-state");
        // Already in the snapshot: ignored. Ana's two sockets are one arrival; Bo comes and
        // goes; all within the coalescing window: one push.
        hub.dispatch(membership("s-old", "u-old", Joined, 9));
        hub.dispatch(membership("s-a1", "u-ana", Joined, 11));
        hub.dispatch(membership("s-a2", "u-ana", Joined, 12));
        hub.dispatch(membership("s-b", "u-bo", Joined, 13));
        hub.dispatch(membership("s-b", "u-bo", Left, 14));
        hub.dispatch(membership("s-a1", "u-ana", Left, 15));
        let pushed = tokio::time::timeout(Duration::from_secs(5), outbox.recv()).await;
        let Ok(Some(Outgoing::Message(Message::Text(text)))) = pushed else {
            panic!("a members-changed push");
        };
        let push: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
        assert_eq!(push["type"], "members-changed");
        assert_eq!(
            push["data"]["changes"],
            serde_json::json!([
                {"version": 11, "joined": {"userId": "u-ana", "userName": "u-ana"}},
                {"version": 13, "joined": {"userId": "u-bo", "userName": "u-bo"}},
                {"version": 14, "left": "u-bo"}
            ]),
            "Ana's second socket and her first one leaving change nothing: she is still there"
        );
        assert!(outbox.try_recv().is_err());
    }
}

//! The gateway's side of the event plane: its `Watch` streams on state-svc, shared by all its
//! connections, and the fan-out of what they bring.
//!
//! The hub is a set of owners under one lock, each in its own module:
//! - [`registry`]: connections, their users and channels, and delivery to them;
//! - [`streams`]: which topics (channels, users) each stream follows, and the streams;
//! - [`channels`]: each followed channel's state, floor changes last-epoch-wins and
//!   membership deltas;
//! - [`floor_order`]: floor changes held back behind the requester's reply;
//! - [`syncs`]: sync session changes as typed deltas.
//!
//! [`Hub::dispatch`] hands each event kind to its handler below. Because the events come from
//! state-svc, a change made through any gateway replica reaches clients on every replica;
//! after a reconnect state-svc sends each topic's state again, which reaches the clients as
//! `channel-state` (and grants as `permission-update` when they changed).

mod channels;
mod floor_order;
mod registry;
mod streams;
mod syncs;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use talkgroup_proto::state::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use self::channels::{ChannelCache, MEMBERSHIP_COALESCE};
use self::floor_order::{FloorOrder, HOLD_BACK_AT_MOST};
use self::registry::{Fanout, Registry};
use self::streams::{Placement, Topic};
use self::syncs::SyncPushes;
use crate::outbox::Outbox;

pub use self::floor_order::FloorRequest;
pub use self::registry::{CONNECTION_EVENTS, FloorPush, HubEvent};
pub use self::streams::Shards;

/// The kind of topic an event from state-svc came on, for `ptt_gateway_topic_events_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicKind {
    pub kind: &'static str,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    placement: Placement,
    channels: ChannelCache,
    floors: FloorOrder,
    syncs: SyncPushes,
}

impl Inner {
    /// Sends `event` to the channel's members, behind its held-back events if it has some.
    fn send_to_channel(&mut self, channel: &str, event: Fanout) {
        if let Some(event) = self.floors.queue_behind(channel, event) {
            self.registry.deliver(channel, &event);
        }
    }

    fn deliver_all(&self, channel: &str, events: Vec<Fanout>) {
        for event in &events {
            self.registry.deliver(channel, event);
        }
    }
}

#[derive(Debug)]
pub struct Hub {
    inner: Mutex<Inner>,
    /// The topics each stream follows.
    wanted: Vec<watch::Sender<HashSet<Topic>>>,
    /// Events received from state-svc, by topic kind.
    received: Family<TopicKind, Counter>,
    /// Its counters of channel, user and sync events, looked up once.
    counted: [Counter; 3],
    /// Itself, for the delayed flushes and hold limits.
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
        let received = Family::<TopicKind, Counter>::default();
        let counted = ["channel", "user", "sync"]
            .map(|kind| received.get_or_create(&TopicKind { kind }).clone());
        Arc::new_cyclic(|me| Self {
            inner: Mutex::new(Inner {
                registry: Registry::default(),
                placement: Placement::new(shards),
                channels: ChannelCache::default(),
                floors: FloorOrder::default(),
                syncs: SyncPushes::default(),
            }),
            wanted: streams::wanted_sets(shards),
            received,
            counted,
            me: me.clone(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves only plain maps behind; keep serving.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Events received from state-svc by topic kind (`channel`, `user`, `sync`).
    pub fn received(&self) -> Family<TopicKind, Counter> {
        self.received.clone()
    }

    fn want(&self, shard: usize, topic: Topic, wanted: bool) {
        self.wanted[shard].send_modify(|set| {
            if wanted {
                set.insert(topic);
            } else {
                set.remove(&topic);
            }
        });
    }

    /// A new connection of `user_id` with session `session`, whose socket's outbox is `out`;
    /// the hub follows the user's topic while it has a connection here.
    pub fn register(
        &self,
        user_id: &str,
        session: &str,
        out: Outbox,
    ) -> (u64, mpsc::Receiver<HubEvent>) {
        let mut inner = self.lock();
        let (id, rx, first) = inner.registry.register(user_id, session, out);
        if first {
            let topic = Topic::User(user_id.to_owned());
            if let Some(shard) = inner.placement.place(&topic) {
                self.want(shard, topic, true);
            }
        }
        (id, rx)
    }

    pub fn unregister(&self, conn: u64) {
        let mut inner = self.lock();
        let left = inner.registry.unregister(conn);
        for channel in left.emptied {
            self.forget_channel(&mut inner, &channel);
        }
        if let Some(user) = left.last_of_user {
            let topic = Topic::User(user);
            if let Some(shard) = inner.placement.remove(&topic) {
                self.want(shard, topic, false);
            }
        }
    }

    /// Whether a connection could follow `channel` now (it is followed already, or a stream
    /// has room for it).
    pub fn has_room_for(&self, channel: &str) -> bool {
        let inner = self.lock();
        inner.registry.follows(channel) || inner.placement.has_room_for_a_channel()
    }

    /// Connection `conn` follows `channel`; false (nothing changed) when the channel is new
    /// here and every stream is full.
    pub fn follow(&self, conn: u64, channel: &str) -> bool {
        let mut inner = self.lock();
        if !inner.registry.follows(channel) {
            let topic = Topic::Channel(channel.to_owned());
            let Some(shard) = inner.placement.place(&topic) else {
                return false;
            };
            self.want(shard, topic, true);
        }
        inner.registry.follow(conn, channel);
        true
    }

    pub fn unfollow(&self, conn: u64, channel: &str) {
        let mut inner = self.lock();
        if inner.registry.unfollow(conn, channel) {
            self.forget_channel(&mut inner, channel);
        }
    }

    fn forget_channel(&self, inner: &mut Inner, channel: &str) {
        inner.channels.forget(channel);
        inner.syncs.forget_channel(channel);
        let topic = Topic::Channel(channel.to_owned());
        if let Some(shard) = inner.placement.remove(&topic) {
            self.want(shard, topic, false);
        }
    }

    /// Whether connection `conn` holds `channel`'s floor (its changes then go through it).
    pub fn holding(&self, conn: u64, channel: &str, holds: bool) {
        self.lock().registry.holding(conn, channel, holds);
    }

    /// The highest floor epoch this gateway has seen for `channel` (0: none), for acquires to
    /// carry: a grant is always above it, whatever the store lost.
    pub fn known_epoch(&self, channel: &str) -> u64 {
        self.lock().channels.known_epoch(channel)
    }

    pub fn connection_count(&self) -> usize {
        self.lock().registry.connection_count()
    }

    /// Channels some local connection follows.
    pub fn channel_count(&self) -> usize {
        self.lock().registry.channel_count()
    }

    /// A local session asks for or gives up `channel`'s floor: a floor change naming it waits
    /// until [`Hub::request_done`] (see [`floor_order`]).
    pub fn request_started(&self, channel: &str, session: &str) {
        self.lock().floors.started(channel, session);
    }

    /// The reply to the session's floor request has been queued: what it held back goes out.
    pub fn request_done(&self, channel: &str, session: &str) {
        let mut inner = self.lock();
        let released = inner.floors.done(channel, session);
        inner.deliver_all(channel, released);
    }

    /// Keeps every stream open until shutdown, each reconnecting with backoff on its own.
    pub async fn run(self: Arc<Self>, state: Channel, shutdown: CancellationToken) {
        streams::run(self, state, shutdown).await;
    }

    /// A stream of `shard` (re)connected: its users may have missed events.
    fn users_may_have_missed_events(&self, shard: usize) {
        let users: Vec<String> = self.wanted[shard]
            .borrow()
            .iter()
            .filter_map(|t| match t {
                Topic::User(u) => Some(u.clone()),
                Topic::Channel(_) => None,
            })
            .collect();
        let inner = self.lock();
        for user in users {
            inner.registry.to_user(&user, None, &HubEvent::Resync);
        }
    }

    /// Hands one event from state-svc to its kind's handler.
    fn dispatch(&self, event: pb::watch_event::Event) {
        use pb::watch_event::Event;
        let kind = match &event {
            Event::Snapshot(_) | Event::Floor(_) | Event::Membership(_) | Event::Moved(_) => 0,
            Event::Grants(_) | Event::Kicked(_) | Event::Resumed(_) | Event::UserResync(_) => 1,
            Event::Sync(_) => 2,
        };
        self.counted[kind].inc();
        match event {
            Event::Snapshot(state) => self.on_snapshot(state),
            Event::Floor(change) => self.on_floor(change),
            Event::Membership(change) => self.on_membership(&change),
            Event::Moved(moved) => self.on_moved(moved),
            Event::Grants(grants) => {
                self.to_user(&grants.user_id.clone(), None, HubEvent::Grants(grants))
            }
            Event::Kicked(kick) => self.to_user(&kick.user_id, None, HubEvent::Kicked(kick.reason)),
            Event::Resumed(r) => self.to_user(
                &r.user_id,
                Some(&r.session_id),
                HubEvent::Resumed {
                    session: r.session_id.clone(),
                    generation: r.generation,
                },
            ),
            Event::UserResync(r) => self.to_user(&r.user_id, None, HubEvent::Resync),
            Event::Sync(state) => self.on_sync(&state),
        }
    }

    fn on_snapshot(&self, state: pb::ChannelState) {
        let mut inner = self.lock();
        let channel = state.channel_id.clone();
        if let Some(text) = inner.channels.snapshot(state) {
            inner.send_to_channel(&channel, Fanout::Push(text));
        }
    }

    fn on_floor(&self, change: pb::FloorChanged) {
        let mut inner = self.lock();
        let channel = change.channel_id.clone();
        let Some(push) = inner.channels.floor(change) else {
            return;
        };
        let push = Arc::new(push);
        match inner.floors.hold_if_requested(&channel, &push) {
            Some(hold) => self.release_after(channel, hold),
            None => inner.send_to_channel(&channel, Fanout::Floor(push)),
        }
    }

    /// Sends what the hold `hold` of `channel` kept back after [`HOLD_BACK_AT_MOST`], whatever
    /// happened to the request.
    fn release_after(&self, channel: String, hold: u64) {
        if let Some(hub) = self.me.upgrade() {
            tokio::spawn(async move {
                tokio::time::sleep(HOLD_BACK_AT_MOST).await;
                let mut inner = hub.lock();
                let released = inner.floors.release(&channel, Some(hold));
                inner.deliver_all(&channel, released);
            });
        }
    }

    fn on_moved(&self, moved: pb::ChannelMoved) {
        let mut inner = self.lock();
        inner.channels.moved(&moved);
        let channel = moved.channel_id.clone();
        inner.send_to_channel(&channel, Fanout::Moved(Arc::new(moved)));
    }

    fn on_membership(&self, change: &pb::MembershipChanged) {
        if !self.lock().channels.membership(change) {
            return;
        }
        if let Some(hub) = self.me.upgrade() {
            let channel = change.channel_id.clone();
            tokio::spawn(async move {
                tokio::time::sleep(MEMBERSHIP_COALESCE).await;
                hub.flush_changes(&channel);
            });
        }
    }

    /// Sends a channel's membership changes of the last moment to its connections.
    fn flush_changes(&self, channel: &str) {
        let mut inner = self.lock();
        if let Some(text) = inner.channels.flush(channel) {
            inner.send_to_channel(channel, Fanout::Push(text));
        }
    }

    fn to_user(&self, user: &str, session: Option<&str>, event: HubEvent) {
        self.lock().registry.to_user(user, session, &event);
    }

    /// Hands a sync session change to the connections following its channel.
    fn on_sync(&self, state: &pb::SyncState) {
        let mut inner = self.lock();
        if state.channel_id.is_empty() || !inner.registry.follows(&state.channel_id) {
            return;
        }
        if let Some(text) = inner.syncs.push_for(state) {
            inner.send_to_channel(&state.channel_id, Fanout::Push(text));
        }
    }
}

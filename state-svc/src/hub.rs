//! Fan-out of store events to local watchers.
//!
//! Each state-svc process has one hub. The store feeds it (the Redis store from its pub/sub
//! connection, the memory store directly) and each `Watch` stream holds a [`Subscription`] for
//! the channels it asked for. Delivery never blocks the store: every subscriber has a bounded
//! queue, and a subscriber that falls behind is marked lagged and told to resynchronise (re-read
//! the state of its channels) instead of stalling everyone else.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, broadcast, mpsc};

use crate::domain::{ChannelId, Event, GrantsEvent, SyncId};
use crate::sync::SyncSession;

/// A sync session changed (`state` is `None` when it was deleted).
#[derive(Debug, Clone)]
pub struct SyncEvent {
    pub session_id: SyncId,
    pub version: u64,
    pub state: Option<SyncSession>,
}

/// Events a subscriber may have queued before it is marked lagged.
const SUBSCRIBER_QUEUE: usize = 1024;
/// Grant changes a grant watcher may lag behind before it is told to resynchronise.
const GRANTS_QUEUE: usize = 1024;
/// Control-plane membership updates waiting to be applied before new ones are dropped.
pub const MEMBERSHIP_QUEUE: usize = 1024;

/// What a subscriber receives.
#[derive(Debug, Clone)]
pub enum Delivery {
    Event(Arc<Event>),
    /// Events may have been missed: re-read the state of every subscribed channel.
    Resync,
}

#[derive(Debug)]
pub struct Hub {
    inner: Mutex<Inner>,
    /// Woken whenever the set of wanted channels changes (the Redis listener reconciles).
    wanted_changed: Notify,
    /// Grant changes of every user, for `WatchGrants` streams.
    grants: broadcast::Sender<Arc<GrantsEvent>>,
    /// Sync session changes, for `WatchSync` streams.
    sync: broadcast::Sender<Arc<SyncEvent>>,
    /// Raw control-plane membership updates, applied by one task (`access::run_membership`).
    membership_tx: mpsc::Sender<String>,
    membership_rx: Mutex<Option<mpsc::Receiver<String>>>,
}

impl Default for Hub {
    fn default() -> Self {
        let (membership_tx, membership_rx) = mpsc::channel(MEMBERSHIP_QUEUE);
        Self {
            inner: Mutex::default(),
            wanted_changed: Notify::new(),
            grants: broadcast::Sender::new(GRANTS_QUEUE),
            sync: broadcast::Sender::new(GRANTS_QUEUE),
            membership_tx,
            membership_rx: Mutex::new(Some(membership_rx)),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    subs: HashMap<u64, Subscriber>,
    by_channel: HashMap<ChannelId, HashSet<u64>>,
}

#[derive(Debug)]
struct Subscriber {
    tx: mpsc::Sender<Delivery>,
    channels: HashSet<ChannelId>,
    lagged: Arc<AtomicBool>,
}

impl Subscriber {
    fn deliver(&self, delivery: Delivery) {
        if self.tx.try_send(delivery).is_err() {
            self.lagged.store(true, Ordering::Release);
        }
    }
}

impl Hub {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves only plain maps behind; keep serving.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A new subscriber with no channels yet.
    pub fn subscribe(self: &Arc<Self>) -> Subscription {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        let lagged = Arc::new(AtomicBool::new(false));
        let mut inner = self.lock();
        inner.next_id += 1;
        let id = inner.next_id;
        inner.subs.insert(
            id,
            Subscriber {
                tx,
                channels: HashSet::new(),
                lagged: Arc::clone(&lagged),
            },
        );
        Subscription {
            id,
            hub: Arc::clone(self),
            rx,
            lagged,
        }
    }

    /// Delivers an event to every subscriber of its channel.
    pub fn dispatch(&self, event: Event) {
        let inner = self.lock();
        let Some(ids) = inner.by_channel.get(event.channel_id()) else {
            return;
        };
        let event = Arc::new(event);
        for id in ids {
            if let Some(sub) = inner.subs.get(id) {
                sub.deliver(Delivery::Event(Arc::clone(&event)));
            }
        }
    }

    /// Tells every subscriber to re-read its channels and grants (after a gap in the event
    /// source).
    pub fn resync_all(&self) {
        let inner = self.lock();
        for sub in inner.subs.values() {
            sub.deliver(Delivery::Resync);
        }
        drop(inner);
        let _ = self.grants.send(Arc::new(GrantsEvent::Resync));
    }

    /// Hands a grant change to every grant watcher of this process.
    pub fn grants_changed(&self, event: GrantsEvent) {
        // No receiver is fine: no gateway is watching this replica.
        let _ = self.grants.send(Arc::new(event));
    }

    /// Hands a sync session change to every `WatchSync` stream of this process.
    pub fn sync_changed(&self, event: SyncEvent) {
        let _ = self.sync.send(Arc::new(event));
    }

    pub fn watch_sync(&self) -> broadcast::Receiver<Arc<SyncEvent>> {
        self.sync.subscribe()
    }

    /// A stream of grant changes from now on.
    pub fn watch_grants(&self) -> broadcast::Receiver<Arc<GrantsEvent>> {
        self.grants.subscribe()
    }

    /// Queues a raw control-plane membership update; false when the queue is full (dropped).
    pub fn membership_update(&self, raw: String) -> bool {
        self.membership_tx.try_send(raw).is_ok()
    }

    /// The receiving end of membership updates; `None` after the first call.
    pub fn take_membership_updates(&self) -> Option<mpsc::Receiver<String>> {
        self.membership_rx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Every channel some local subscriber wants.
    pub fn wanted_channels(&self) -> HashSet<ChannelId> {
        self.lock().by_channel.keys().cloned().collect()
    }

    /// Resolves when the wanted set may have changed.
    pub async fn wanted_changed(&self) {
        self.wanted_changed.notified().await;
    }

    /// Number of live subscribers.
    pub fn subscriber_count(&self) -> usize {
        self.lock().subs.len()
    }

    fn add(&self, id: u64, channels: &[ChannelId]) {
        let mut inner = self.lock();
        let Inner {
            subs, by_channel, ..
        } = &mut *inner;
        let Some(sub) = subs.get_mut(&id) else { return };
        for ch in channels {
            if sub.channels.insert(ch.clone()) {
                by_channel.entry(ch.clone()).or_default().insert(id);
            }
        }
        drop(inner);
        self.wanted_changed.notify_one();
    }

    fn remove(&self, id: u64, channels: &[ChannelId]) {
        let mut inner = self.lock();
        let Inner {
            subs, by_channel, ..
        } = &mut *inner;
        let Some(sub) = subs.get_mut(&id) else { return };
        for ch in channels {
            if sub.channels.remove(ch) {
                unlink(by_channel, ch, id);
            }
        }
        drop(inner);
        self.wanted_changed.notify_one();
    }

    fn drop_subscriber(&self, id: u64) {
        let mut inner = self.lock();
        if let Some(sub) = inner.subs.remove(&id) {
            for ch in &sub.channels {
                unlink(&mut inner.by_channel, ch, id);
            }
        }
        drop(inner);
        self.wanted_changed.notify_one();
    }
}

fn unlink(by_channel: &mut HashMap<ChannelId, HashSet<u64>>, ch: &ChannelId, id: u64) {
    if let Some(set) = by_channel.get_mut(ch) {
        set.remove(&id);
        if set.is_empty() {
            by_channel.remove(ch);
        }
    }
}

/// One watcher's view of the hub. Dropping it unsubscribes everything.
#[derive(Debug)]
pub struct Subscription {
    id: u64,
    hub: Arc<Hub>,
    rx: mpsc::Receiver<Delivery>,
    lagged: Arc<AtomicBool>,
}

impl Subscription {
    pub fn add(&self, channels: &[ChannelId]) {
        self.hub.add(self.id, channels);
    }

    pub fn remove(&self, channels: &[ChannelId]) {
        self.hub.remove(self.id, channels);
    }

    /// The next delivery; `Resync` if events were dropped since the last call.
    pub async fn recv(&mut self) -> Option<Delivery> {
        if self.lagged.swap(false, Ordering::AcqRel) {
            return Some(Delivery::Resync);
        }
        let delivery = self.rx.recv().await?;
        if self.lagged.swap(false, Ordering::AcqRel) {
            return Some(Delivery::Resync);
        }
        Some(delivery)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.drop_subscriber(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{FloorChanged, FloorReason};

    fn floor_event(ch: &ChannelId, epoch: u64) -> Event {
        Event::Floor(FloorChanged {
            channel_id: ch.clone(),
            holder: None,
            previous: None,
            epoch,
            reason: FloorReason::Released,
            previous_duration_ms: 0,
            at_ms: 0,
        })
    }

    #[tokio::test]
    async fn delivers_only_subscribed_channels_and_resyncs_laggards() {
        let hub = Hub::new();
        let a = ChannelId::parse("a").unwrap();
        let b = ChannelId::parse("b").unwrap();
        let mut sub = hub.subscribe();
        sub.add(std::slice::from_ref(&a));
        assert_eq!(hub.wanted_channels().len(), 1);
        hub.dispatch(floor_event(&b, 1));
        hub.dispatch(floor_event(&a, 2));
        match sub.recv().await {
            Some(Delivery::Event(e)) => assert_eq!(e.channel_id(), &a),
            other => panic!("unexpected {other:?}"),
        }
        for epoch in 0..(SUBSCRIBER_QUEUE as u64 + 5) {
            hub.dispatch(floor_event(&a, epoch));
        }
        assert!(matches!(sub.recv().await, Some(Delivery::Resync)));
        drop(sub);
        assert!(hub.wanted_channels().is_empty());
        assert_eq!(hub.subscriber_count(), 0);
    }
}

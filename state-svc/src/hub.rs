//! The event plane inside one state-svc process: fan-out of published events to local
//! watchers, by topic.
//!
//! Each state-svc process has one hub. The store feeds it (the Redis store from its pub/sub
//! connection, the memory store directly) and each watch stream holds a [`Subscription`] for
//! the topics it asked for (channels, users, sync sessions). Delivery never blocks the store:
//! every subscriber has a bounded queue, and a subscriber that falls behind is marked lagged
//! and told to resynchronise (re-read the state of its topics): one policy for every topic, so
//! no watcher ever misses a change silently.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, mpsc};

use crate::domain::{Published, Topic};

/// Events a subscriber may have queued before it is marked lagged.
const SUBSCRIBER_QUEUE: usize = 1024;
/// Control-plane membership updates waiting to be applied before new ones are dropped.
pub const MEMBERSHIP_QUEUE: usize = 1024;

/// What a subscriber receives.
#[derive(Debug, Clone)]
pub enum Delivery {
    Event(Arc<Published>),
    /// Events may have been missed: re-read the state of every subscribed topic.
    Resync,
}

#[derive(Debug)]
pub struct Hub {
    inner: Mutex<Inner>,
    /// Woken whenever the set of wanted topics changes (the Redis listener reconciles).
    wanted_changed: Notify,
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
            membership_tx,
            membership_rx: Mutex::new(Some(membership_rx)),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    subs: HashMap<u64, Subscriber>,
    by_topic: HashMap<Topic, HashSet<u64>>,
}

#[derive(Debug)]
struct Subscriber {
    tx: mpsc::Sender<Delivery>,
    topics: HashSet<Topic>,
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

    /// A new subscriber with no topics yet.
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
                topics: HashSet::new(),
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

    /// Delivers an event to every subscriber of one of its topics, once each.
    pub fn publish(&self, event: impl Into<Published>) {
        let event = event.into();
        let inner = self.lock();
        let mut reached: Vec<u64> = Vec::new();
        for topic in event.topics() {
            if let Some(ids) = inner.by_topic.get(&topic) {
                reached.extend(ids);
            }
        }
        if reached.is_empty() {
            return;
        }
        reached.sort_unstable();
        reached.dedup();
        let event = Arc::new(event);
        for id in reached {
            if let Some(sub) = inner.subs.get(&id) {
                sub.deliver(Delivery::Event(Arc::clone(&event)));
            }
        }
    }

    /// Tells every subscriber to re-read its topics (after a gap in the event source).
    pub fn resync_all(&self) {
        let inner = self.lock();
        for sub in inner.subs.values() {
            sub.deliver(Delivery::Resync);
        }
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

    /// Every topic some local subscriber wants.
    pub fn wanted_topics(&self) -> HashSet<Topic> {
        self.lock().by_topic.keys().cloned().collect()
    }

    /// Resolves when the wanted set may have changed.
    pub async fn wanted_changed(&self) {
        self.wanted_changed.notified().await;
    }

    /// Number of live subscribers.
    pub fn subscriber_count(&self) -> usize {
        self.lock().subs.len()
    }

    fn add(&self, id: u64, topics: &[Topic]) {
        let mut inner = self.lock();
        let Inner { subs, by_topic, .. } = &mut *inner;
        let Some(sub) = subs.get_mut(&id) else { return };
        for topic in topics {
            if sub.topics.insert(topic.clone()) {
                by_topic.entry(topic.clone()).or_default().insert(id);
            }
        }
        drop(inner);
        self.wanted_changed.notify_one();
    }

    fn remove(&self, id: u64, topics: &[Topic]) {
        let mut inner = self.lock();
        let Inner { subs, by_topic, .. } = &mut *inner;
        let Some(sub) = subs.get_mut(&id) else { return };
        for topic in topics {
            if sub.topics.remove(topic) {
                unlink(by_topic, topic, id);
            }
        }
        drop(inner);
        self.wanted_changed.notify_one();
    }

    fn drop_subscriber(&self, id: u64) {
        let mut inner = self.lock();
        if let Some(sub) = inner.subs.remove(&id) {
            for topic in &sub.topics {
                unlink(&mut inner.by_topic, topic, id);
            }
        }
        drop(inner);
        self.wanted_changed.notify_one();
    }
}

fn unlink(by_topic: &mut HashMap<Topic, HashSet<u64>>, topic: &Topic, id: u64) {
    if let Some(set) = by_topic.get_mut(topic) {
        set.remove(&id);
        if set.is_empty() {
            by_topic.remove(topic);
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
    pub fn add(&self, topics: &[Topic]) {
        self.hub.add(self.id, topics);
    }

    pub fn remove(&self, topics: &[Topic]) {
        self.hub.remove(self.id, topics);
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
    use crate::domain::{ChannelId, Event, FloorChanged, FloorReason, SyncEvent, SyncId, UserId};
    use crate::domain::{UserEvent, UserGrants};

    fn floor_event(ch: &ChannelId, epoch: u64) -> Published {
        Published::Channel(Event::Floor(FloorChanged {
            channel_id: ch.clone(),
            holder: None,
            previous: None,
            epoch,
            reason: FloorReason::Released,
            previous_duration_ms: 0,
            at_ms: 0,
        }))
    }

    fn id<T>(parse: fn(&str) -> Result<T, crate::error::StoreError>, raw: &str) -> T {
        parse(raw).expect("a valid id")
    }

    #[tokio::test]
    async fn delivers_only_subscribed_channels_and_resyncs_laggards() {
        let hub = Hub::new();
        let a = id(ChannelId::parse, "a");
        let b = id(ChannelId::parse, "b");
        let mut sub = hub.subscribe();
        sub.add(&[Topic::Channel(a.clone())]);
        assert_eq!(hub.wanted_topics().len(), 1);
        hub.publish(floor_event(&b, 1));
        hub.publish(floor_event(&a, 2));
        match sub.recv().await {
            Some(Delivery::Event(e)) => {
                assert!(matches!(&*e, Published::Channel(c) if c.channel_id() == &a))
            }
            other => panic!("unexpected {other:?}"),
        }
        for epoch in 0..(SUBSCRIBER_QUEUE as u64 + 5) {
            hub.publish(floor_event(&a, epoch));
        }
        assert!(matches!(sub.recv().await, Some(Delivery::Resync)));
        drop(sub);
        assert!(hub.wanted_topics().is_empty());
        assert_eq!(hub.subscriber_count(), 0);
    }

    #[tokio::test]
    async fn user_and_sync_events_reach_only_their_topics_once() {
        let hub = Hub::new();
        let ana = id(UserId::parse, "ana");
        let ch = id(ChannelId::parse, "ops");
        let sync = id(SyncId::parse, "clock");
        let mut users = hub.subscribe();
        users.add(&[Topic::User(ana.clone())]);
        let mut both = hub.subscribe();
        both.add(&[Topic::Channel(ch.clone()), Topic::Sync(sync.clone())]);
        let grants = |uid: &UserId| {
            Published::User(UserEvent::Grants(UserGrants {
                user_id: uid.clone(),
                version: 1,
                grants: Default::default(),
            }))
        };
        hub.publish(grants(&id(UserId::parse, "bo")));
        hub.publish(grants(&ana));
        hub.publish(Published::Sync(SyncEvent {
            session_id: sync.clone(),
            version: 2,
            channel_id: Some(ch),
            state: None,
        }));
        let Some(Delivery::Event(first)) = users.recv().await else {
            panic!("ana's grants")
        };
        assert!(matches!(&*first, Published::User(e) if e.user_id() == &ana));
        assert!(
            futures::FutureExt::now_or_never(users.recv()).is_none(),
            "nothing else"
        );
        let Some(Delivery::Event(sync_event)) = both.recv().await else {
            panic!("the sync change")
        };
        assert!(matches!(&*sync_event, Published::Sync(s) if s.session_id == sync));
        assert!(
            futures::FutureExt::now_or_never(both.recv()).is_none(),
            "once, though two of its topics match"
        );
    }
}

//! The Redis pub/sub listener: one connection per process that subscribes to exactly the
//! topics local watchers want (channels, users) and feeds their events to the hub.
//!
//! Pub/sub is at-most-once. Whenever the connection is (re)established, every local subscriber
//! is told to resynchronise, so it re-reads the state it may have missed. Each topic has one
//! name in its own hash tag (`Keys::topic_events`), parsed back once (`parse_topic_events`);
//! its payload is decoded once (`wire::decode_event`).
//!
//! Sync sessions change seldom and are followed by channel: their events come on one pattern
//! subscription for the whole process, and the hub hands each to the watchers of the
//! session's topic and of its channel's.
//!
//! Under Redis Cluster the listener uses the cluster connection (RESP3, pushes): each
//! channel's and user's events are a sharded subscription (`SSUBSCRIBE`) at the master of the
//! topic's slot, while the control-plane membership name and the sync pattern stay classic
//! subscriptions. The connection resubscribes by itself after a node is lost; every loss makes
//! the watchers re-read, once the subscriptions are back.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::keys::Keys;
use super::wire::decode_event;
use crate::domain::Topic;
use crate::error::StoreError;
use crate::hub::Hub;

/// A request to make the subscriptions match the hub, answered once they do.
pub type ReconcileRequest = oneshot::Sender<Result<(), StoreError>>;

/// Pending reconcile requests the listener accepts before callers wait.
pub const RECONCILE_QUEUE: usize = 256;
/// Topics per SUBSCRIBE command.
const SUBSCRIBE_BATCH: usize = 256;
/// Largest control-plane membership update accepted; bigger ones are dropped unread.
pub const MAX_MEMBERSHIP_UPDATE_BYTES: usize = 64 * 1024;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Under Cluster, how long after a node's pub/sub connection was lost watchers re-read even
/// if no resubscription was confirmed.
const RESYNC_WITHOUT_CONFIRMATION: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Listener {
    /// How to reach Redis (the cluster listener builds its own cluster client).
    pub connect: crate::connect::RedisConnect,
    pub target: super::Target,
    pub keys: Keys,
    pub hub: Arc<Hub>,
    /// Pub/sub channel of control-plane membership updates.
    pub membership_channel: String,
    pub timeout: Duration,
    pub requests: mpsc::Receiver<ReconcileRequest>,
    pub shutdown: CancellationToken,
}

impl Listener {
    pub async fn run(mut self) {
        if self.target.is_cluster() {
            return self.run_cluster().await;
        }
        let mut backoff = BACKOFF_MIN;
        loop {
            let connected = tokio::select! {
                c = tokio::time::timeout(self.timeout, async {
                    self.target.client().await?.get_async_pubsub().await
                }) => c,
                () = self.shutdown.cancelled() => return,
            };
            let pubsub = match connected {
                Ok(Ok(p)) => p,
                outcome => {
                    let error = match outcome {
                        Ok(Err(e)) => e.to_string(),
                        _ => "connect timed out".to_owned(),
                    };
                    tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "redis pub/sub connect failed");
                    if self.wait_refusing(backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            backoff = BACKOFF_MIN;
            tracing::info!("redis pub/sub connected");
            let (mut sink, mut stream) = pubsub.split();
            let mut subscribed = HashSet::new();
            let fixed = vec![self.membership_channel.clone()];
            let sync_pattern = self.keys.sync_events_pattern();
            let mut healthy = self.bounded(sink.subscribe(fixed)).await.is_ok()
                && self.bounded(sink.psubscribe(sync_pattern)).await.is_ok()
                && self.reconcile(&mut sink, &mut subscribed).await.is_ok();
            // Anything published while we were away is lost: make watchers re-read.
            self.hub.resync_all();
            while healthy {
                tokio::select! {
                    msg = stream.next() => match msg {
                        Some(msg) => self.deliver(&msg),
                        None => healthy = false,
                    },
                    Some(reply) = self.requests.recv() => {
                        let result = self.reconcile(&mut sink, &mut subscribed).await;
                        healthy = result.is_ok();
                        let _ = reply.send(result);
                    }
                    () = self.hub.wanted_changed() => {
                        healthy = self.reconcile(&mut sink, &mut subscribed).await.is_ok();
                    }
                    () = self.shutdown.cancelled() => return,
                }
            }
            tracing::warn!("redis pub/sub connection lost; reconnecting");
        }
    }

    /// The listener under Redis Cluster.
    async fn run_cluster(mut self) {
        let (tx, mut pushes) = mpsc::unbounded_channel();
        let client = match self.connect.cluster_client(self.timeout, Some(tx)) {
            Ok(Some(client)) => client,
            _ => {
                tracing::error!("redis cluster pub/sub cannot be set up");
                return;
            }
        };
        let mut backoff = BACKOFF_MIN;
        let mut conn = loop {
            let connected = tokio::select! {
                c = tokio::time::timeout(self.timeout, client.get_async_connection()) => c,
                () = self.shutdown.cancelled() => return,
            };
            match connected {
                Ok(Ok(conn)) => break conn,
                outcome => {
                    let error = match outcome {
                        Ok(Err(e)) => e.to_string(),
                        _ => "connect timed out".to_owned(),
                    };
                    tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "redis cluster pub/sub connect failed");
                    if self.wait_refusing(backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        };
        tracing::info!("redis cluster pub/sub connected");
        let fixed = [self.membership_channel.clone()];
        let mut subscribed = HashSet::new();
        // Until every subscription is in place (and after a failed one), try again soon.
        let mut retry = tokio::time::interval(BACKOFF_MIN * 5);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut fixed_done = false;
        // Since when a node's connection was lost and the subscriptions not yet all back:
        // watchers re-read once they are (reading earlier fails, and ends their watches).
        let mut lost: Option<tokio::time::Instant> = Some(tokio::time::Instant::now());
        loop {
            tokio::select! {
                push = pushes.recv() => {
                    let Some(push) = push else { return };
                    if push.kind == redis::PushKind::Disconnection {
                        // The lost node's slots move to a replica; the connection does not
                        // move our subscriptions by itself until it refreshes its slot map,
                        // so subscribe everything again: each call goes to the slot's master
                        // as the connection knows it, failing until the failover is done.
                        tracing::warn!("a redis cluster node's pub/sub connection was lost; subscribing again");
                        lost.get_or_insert_with(tokio::time::Instant::now);
                        subscribed.clear();
                        fixed_done = false;
                    } else if let Some(msg) = redis::Msg::from_push_info(push) {
                        self.deliver(&msg);
                    }
                }
                Some(reply) = self.requests.recv() => {
                    let _ = reply.send(self.reconcile_sharded(&mut conn, &mut subscribed).await);
                }
                () = self.hub.wanted_changed() => {
                    let _ = self.reconcile_sharded(&mut conn, &mut subscribed).await;
                }
                _ = retry.tick() => {
                    if !fixed_done {
                        fixed_done = self.bounded(conn.subscribe(&fixed)).await.is_ok()
                            && self
                                .bounded(conn.psubscribe(self.keys.sync_events_pattern()))
                                .await
                                .is_ok();
                    }
                    if fixed_done && subscribed != self.wanted() {
                        let _ = self.reconcile_sharded(&mut conn, &mut subscribed).await;
                    }
                    let back = fixed_done && subscribed == self.wanted();
                    if lost.is_some_and(|at| back || at.elapsed() >= RESYNC_WITHOUT_CONFIRMATION) {
                        lost = None;
                        self.hub.resync_all();
                    }
                }
                () = self.shutdown.cancelled() => return,
            }
        }
    }

    /// The topics that need a subscription of their own: every wanted channel and user (sync
    /// sessions come on the pattern).
    fn wanted(&self) -> HashSet<Topic> {
        let mut wanted = self.hub.wanted_topics();
        wanted.retain(|t| !matches!(t, Topic::Sync(_)));
        wanted
    }

    /// Makes the sharded subscriptions match the hub, one topic per call (each at its slot's
    /// master, concurrently). What failed is tried again at the next reconcile.
    async fn reconcile_sharded(
        &self,
        conn: &mut redis::cluster_async::ClusterConnection,
        subscribed: &mut HashSet<Topic>,
    ) -> Result<(), StoreError> {
        let wanted = self.wanted();
        let add: Vec<Topic> = wanted.difference(subscribed).cloned().collect();
        let remove: Vec<Topic> = subscribed.difference(&wanted).cloned().collect();
        let mut outcome = Ok(());
        for (topics, subscribe) in [(add, true), (remove, false)] {
            for batch in topics.chunks(SUBSCRIBE_BATCH) {
                let calls = batch.iter().map(|topic| {
                    let mut conn = conn.clone();
                    let name = self.keys.topic_events(topic);
                    async move {
                        let call = if subscribe {
                            self.bounded(conn.ssubscribe(name)).await
                        } else {
                            self.bounded(conn.sunsubscribe(name)).await
                        };
                        (topic, call)
                    }
                });
                for (topic, result) in futures::future::join_all(calls).await {
                    match result {
                        Ok(()) if subscribe => {
                            subscribed.insert(topic.clone());
                        }
                        Ok(()) => {
                            subscribed.remove(topic);
                        }
                        Err(e) => outcome = Err(e),
                    }
                }
            }
        }
        outcome
    }

    /// Waits `delay` before the next connect, or less when another master is named meanwhile
    /// (under Sentinel), refusing reconcile requests; true on shutdown.
    async fn wait_refusing(&mut self, delay: Duration) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        let mut masters = self.target.changes();
        loop {
            tokio::select! {
                () = &mut sleep => return false,
                Ok(()) = masters.changed() => return false,
                Some(reply) = self.requests.recv() => {
                    let _ = reply.send(Err(StoreError::Unavailable("pub/sub not connected".into())));
                }
                () = self.shutdown.cancelled() => return true,
            }
        }
    }

    async fn reconcile(
        &self,
        sink: &mut redis::aio::PubSubSink,
        subscribed: &mut HashSet<Topic>,
    ) -> Result<(), StoreError> {
        let wanted = self.wanted();
        let add: Vec<Topic> = wanted.difference(subscribed).cloned().collect();
        let remove: Vec<Topic> = subscribed.difference(&wanted).cloned().collect();
        for batch in add.chunks(SUBSCRIBE_BATCH) {
            let names: Vec<String> = batch.iter().map(|t| self.keys.topic_events(t)).collect();
            self.bounded(sink.subscribe(names)).await?;
            subscribed.extend(batch.iter().cloned());
        }
        for batch in remove.chunks(SUBSCRIBE_BATCH) {
            let names: Vec<String> = batch.iter().map(|t| self.keys.topic_events(t)).collect();
            self.bounded(sink.unsubscribe(names)).await?;
            for topic in batch {
                subscribed.remove(topic);
            }
        }
        Ok(())
    }

    async fn bounded(
        &self,
        fut: impl Future<Output = redis::RedisResult<()>>,
    ) -> Result<(), StoreError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(result) => result.map_err(|e| StoreError::redis(&e)),
            Err(_) => Err(StoreError::Unavailable("subscribe timed out".into())),
        }
    }

    fn deliver(&self, msg: &redis::Msg) {
        let name = msg.get_channel_name();
        let payload = msg.get_payload_bytes();
        if name == self.membership_channel {
            // Published by an external control plane: hostile until validated (`access`).
            match std::str::from_utf8(payload) {
                Ok(raw) if payload.len() <= MAX_MEMBERSHIP_UPDATE_BYTES => {
                    if !self.hub.membership_update(raw.to_owned()) {
                        tracing::warn!("membership update queue full; update dropped");
                    }
                }
                _ => tracing::warn!(
                    bytes = payload.len(),
                    "membership update refused: not utf-8 or too large"
                ),
            }
            return;
        }
        let Some(topic) = self.keys.parse_topic_events(name) else {
            return;
        };
        match decode_event(&topic, payload) {
            Ok(event) => self.hub.publish(event),
            Err(error) => {
                tracing::warn!(%error, topic = topic.kind(), "dropped unreadable event");
            }
        }
    }
}

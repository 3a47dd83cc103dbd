//! The Redis pub/sub listener: one connection per process that subscribes to exactly the
//! channels local watchers want and feeds their events to the hub.
//!
//! Pub/sub is at-most-once. Whenever the connection is (re)established, every local subscriber
//! is told to resynchronise, so it re-reads the state it may have missed. Subscriptions use
//! one name per channel, so moving to sharded pub/sub (`SSUBSCRIBE`) changes nothing here but
//! the command.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::keys::Keys;
use super::wire::{WireEvent, WireGrants, WireKick, WireResumed, parse};
use crate::domain::{ChannelId, GrantsEvent, SessionId, UserId};
use crate::error::StoreError;
use crate::hub::Hub;

/// A request to make the subscriptions match the hub, answered once they do.
pub type ReconcileRequest = oneshot::Sender<Result<(), StoreError>>;

/// Pending reconcile requests the listener accepts before callers wait.
pub const RECONCILE_QUEUE: usize = 256;
/// Channels per SUBSCRIBE command.
const SUBSCRIBE_BATCH: usize = 256;
/// Largest control-plane membership update accepted; bigger ones are dropped unread.
pub const MAX_MEMBERSHIP_UPDATE_BYTES: usize = 64 * 1024;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Listener {
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
            let fixed = vec![
                self.keys.grants_events(),
                self.keys.kicks(),
                self.keys.resumes(),
                self.membership_channel.clone(),
            ];
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

    /// Sleeps for `delay` while answering reconcile requests with `Unavailable`. Returns true
    /// on shutdown.
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
        subscribed: &mut HashSet<ChannelId>,
    ) -> Result<(), StoreError> {
        let wanted = self.hub.wanted_channels();
        let add: Vec<ChannelId> = wanted.difference(subscribed).cloned().collect();
        let remove: Vec<ChannelId> = subscribed.difference(&wanted).cloned().collect();
        for batch in add.chunks(SUBSCRIBE_BATCH) {
            let names: Vec<String> = batch.iter().map(|c| self.keys.channel_events(c)).collect();
            self.bounded(sink.subscribe(names)).await?;
            subscribed.extend(batch.iter().cloned());
        }
        for batch in remove.chunks(SUBSCRIBE_BATCH) {
            let names: Vec<String> = batch.iter().map(|c| self.keys.channel_events(c)).collect();
            self.bounded(sink.unsubscribe(names)).await?;
            for ch in batch {
                subscribed.remove(ch);
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
        if let Some(session_id) = self.keys.parse_sync_events(name) {
            let event = std::str::from_utf8(payload)
                .ok()
                .and_then(|raw| serde_json::from_str::<serde_json::Value>(raw).ok());
            let Some(event) = event else {
                tracing::warn!(%session_id, "dropped unreadable sync event");
                return;
            };
            let version = event["version"].as_u64().unwrap_or_default();
            let state = if event["deleted"] == true {
                None
            } else {
                match serde_json::from_value::<crate::sync::SyncSession>(event) {
                    Ok(state) => Some(state),
                    Err(error) => {
                        tracing::warn!(%error, %session_id, "dropped unreadable sync event");
                        return;
                    }
                }
            };
            self.hub.sync_changed(crate::hub::SyncEvent {
                session_id,
                version,
                state,
            });
            return;
        }
        if name == self.keys.kicks() {
            let kick = std::str::from_utf8(payload)
                .map_err(|_| StoreError::Internal("kick is not utf-8".into()))
                .and_then(|raw| parse::<WireKick>(raw, "kick"))
                .and_then(|k| {
                    let user_id = UserId::parse(&k.uid)?;
                    Ok(GrantsEvent::Kicked {
                        user_id,
                        reason: k.reason,
                    })
                });
            match kick {
                Ok(kick) => self.hub.grants_changed(kick),
                Err(error) => tracing::warn!(%error, "dropped unreadable kick"),
            }
            return;
        }
        if name == self.keys.resumes() {
            let resumed = std::str::from_utf8(payload)
                .map_err(|_| StoreError::Internal("resume is not utf-8".into()))
                .and_then(|raw| parse::<WireResumed>(raw, "resume"))
                .and_then(|r| {
                    Ok(GrantsEvent::Resumed {
                        user_id: UserId::parse(&r.uid)?,
                        session_id: SessionId::parse(&r.sid)?,
                        generation: r.generation,
                    })
                });
            match resumed {
                Ok(resumed) => self.hub.grants_changed(resumed),
                Err(error) => tracing::warn!(%error, "dropped unreadable resume"),
            }
            return;
        }
        if name == self.keys.grants_events() {
            let grants = std::str::from_utf8(payload)
                .map_err(|_| StoreError::Internal("grants are not utf-8".into()))
                .and_then(|raw| parse::<WireGrants>(raw, "grants"))
                .and_then(WireGrants::into_published);
            match grants {
                Ok(grants) => self.hub.grants_changed(GrantsEvent::Changed(grants)),
                Err(error) => tracing::warn!(%error, "dropped unreadable grants change"),
            }
            return;
        }
        if self.keys.parse_channel_events(name).is_none() {
            return;
        }
        let event = std::str::from_utf8(payload)
            .map_err(|_| StoreError::Internal("event is not utf-8".into()))
            .and_then(|raw| parse::<WireEvent>(raw, "event"))
            .and_then(WireEvent::into_domain);
        match event {
            Ok(event) => self.hub.dispatch(event),
            Err(error) => tracing::warn!(%error, channel = name, "dropped unreadable event"),
        }
    }
}

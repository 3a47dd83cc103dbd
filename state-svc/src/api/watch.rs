//! `ptt.state.v1.ChannelService`: channel state, configuration and the `Watch` stream, the
//! event plane's one subscription RPC.
//!
//! Each `Watch` call runs one task that owns a hub [`Subscription`]: it applies the caller's
//! subscribe/unsubscribe requests for topics (channels, users, sync sessions), answers each new
//! topic with its state (read after the store's subscription is active, so no change falls
//! between the two), forwards events, and re-sends every topic's state whenever the hub
//! reports a gap. The stream ends on shutdown. Media nodes may follow channels only: users'
//! and sync sessions' topics are the gateways'.
//!
//! A gap is reported when pub/sub is back, which can be a moment before the store answers
//! again (under Cluster, a replica serves a dead master's subscriptions before it is
//! promoted): re-sending snapshots is then retried for up to [`RESYNC_PATIENCE`] instead of
//! ending the stream, while events keep flowing.

use std::collections::HashSet;
use std::pin::Pin;

use futures::{Stream, StreamExt};
use talkgroup_proto::state::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::convert::{self, channel_id, sync_id, user_id};
use super::{Api, MAX_TOPICS_PER_REQUEST, MAX_TOPICS_PER_WATCH};
use crate::domain::{Published, SyncEvent, Topic, UserEvent};
use crate::hub::{Delivery, Subscription};
use crate::store::Store;

/// Replies buffered per watch stream before the task waits for the client to read.
const WATCH_OUTBOX: usize = 256;
/// How long a watch keeps retrying its snapshots after a gap while the store is unavailable.
const RESYNC_PATIENCE: std::time::Duration = std::time::Duration::from_secs(15);
/// Between those tries.
const RESYNC_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl<S: Store> pb::channel_service_server::ChannelService for Api<S> {
    async fn get_channel_state(
        &self,
        request: Request<pb::GetChannelStateRequest>,
    ) -> Result<Response<pb::ChannelState>, Status> {
        Ok(Response::new(
            self.get_channel_state_impl(request.into_inner()).await?,
        ))
    }

    async fn get_channel_config(
        &self,
        request: Request<pb::GetChannelConfigRequest>,
    ) -> Result<Response<pb::ChannelConfig>, Status> {
        Ok(Response::new(
            self.get_channel_config_impl(request.into_inner()).await?,
        ))
    }

    async fn set_channel_config(
        &self,
        request: Request<pb::SetChannelConfigRequest>,
    ) -> Result<Response<pb::ChannelConfig>, Status> {
        Ok(Response::new(
            self.set_channel_config_impl(request.into_inner()).await?,
        ))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let media_node = match talkgroup_common::authz::caller(&request) {
            Some(talkgroup_common::tls::Identity::Media(id)) => Some(
                crate::domain::NodeId::parse(id)
                    .map_err(|_| Status::permission_denied("not a media node id"))?,
            ),
            _ => None,
        };
        let channels_only = media_node.is_some();
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(WATCH_OUTBOX);
        let task = WatchTask {
            api: self.clone(),
            subscription: self.hub.subscribe(),
            topics: HashSet::new(),
            channels_only,
            media_node,
            out: tx,
        };
        self.tasks.spawn(task.run(inbound));
        Ok(Response::new(ReceiverStream::new(rx).boxed()))
    }
}

struct WatchTask<S> {
    api: Api<S>,
    subscription: Subscription,
    topics: HashSet<Topic>,
    /// The caller is a media node: it may follow channels only.
    channels_only: bool,
    /// That node: it may follow only the channels placed on it.
    media_node: Option<crate::domain::NodeId>,
    out: mpsc::Sender<Result<pb::WatchEvent, Status>>,
}

/// Why a watch stream ended early.
enum End {
    /// The client went away; nothing to say.
    Gone,
    /// Tell the client why.
    Error(Status),
}

impl From<crate::error::StoreError> for End {
    fn from(error: crate::error::StoreError) -> Self {
        Self::Error(error.into())
    }
}

impl<S: Store> WatchTask<S> {
    async fn run(mut self, mut inbound: Streaming<pb::WatchRequest>) {
        let shutdown = self.api.shutdown.clone();
        // A resync the store could not answer yet: (first failure, next try).
        let mut pending: Option<(tokio::time::Instant, tokio::time::Instant)> = None;
        let result = loop {
            let retry_due = async {
                match pending {
                    Some((_, next)) => tokio::time::sleep_until(next).await,
                    None => std::future::pending().await,
                }
            };
            let step = tokio::select! {
                request = inbound.next() => match request {
                    Some(Ok(request)) => self.apply(request).await,
                    Some(Err(_)) | None => Err(End::Gone),
                },
                delivery = self.subscription.recv() => match delivery {
                    Some(Delivery::Event(event)) => self.forward(&event).await,
                    Some(Delivery::Resync) => {
                        let first = pending.map_or_else(tokio::time::Instant::now, |(f, _)| f);
                        self.patient_resync(first, &mut pending).await
                    }
                    None => Err(End::Gone),
                },
                () = retry_due => {
                    let first = pending.map_or_else(tokio::time::Instant::now, |(f, _)| f);
                    self.patient_resync(first, &mut pending).await
                }
                () = self.out.closed() => Err(End::Gone),
                () = shutdown.cancelled() => Err(End::Error(Status::unavailable("server shutting down"))),
            };
            if let Err(end) = step {
                break end;
            }
        };
        if let End::Error(status) = result {
            let _ = self.out.send(Err(status)).await;
        }
    }

    async fn apply(&mut self, request: pb::WatchRequest) -> Result<(), End> {
        match request.action {
            Some(pb::watch_request::Action::Subscribe(set)) => {
                let new: Vec<Topic> = self
                    .parse_set(&set)?
                    .into_iter()
                    .filter(|t| !self.topics.contains(t))
                    .collect();
                let new = self.own_channels(new).await?;
                if self.topics.len() + new.len() > MAX_TOPICS_PER_WATCH {
                    return Err(End::Error(Status::resource_exhausted(
                        "too many topics on one watch",
                    )));
                }
                self.subscription.add(&new);
                self.topics.extend(new.iter().cloned());
                self.api.store.listen().await?;
                for topic in &new {
                    self.state_of(topic, false).await?;
                }
                Ok(())
            }
            Some(pb::watch_request::Action::Unsubscribe(set)) => {
                let topics = self.parse_set(&set)?;
                self.subscription.remove(&topics);
                for topic in &topics {
                    self.topics.remove(topic);
                }
                Ok(())
            }
            None => Err(End::Error(Status::invalid_argument(
                "watch request without action",
            ))),
        }
    }

    /// Sends a topic's state: a channel's snapshot (after a gap, with its sync sessions), a
    /// user's grants, a sync session.
    async fn state_of(&self, topic: &Topic, after_gap: bool) -> Result<(), End> {
        let store = &self.api.store;
        match topic {
            Topic::Channel(ch) => {
                let state = store.channel_state(ch).await?;
                self.send(convert::snapshot(&state)).await?;
                if after_gap && !self.channels_only {
                    for sync in store.channel_syncs(ch).await? {
                        self.send(self.sync_event(&SyncEvent::changed(sync)))
                            .await?;
                    }
                }
                Ok(())
            }
            Topic::User(uid) => {
                let grants = store.user_grants(uid).await?;
                let event = pb::watch_event::Event::Grants(super::access::user_grants(&grants));
                self.send(pb::WatchEvent { event: Some(event) }).await?;
                if after_gap {
                    let event = pb::watch_event::Event::UserResync(pb::UserResync {
                        user_id: uid.to_string(),
                    });
                    self.send(pb::WatchEvent { event: Some(event) }).await?;
                }
                Ok(())
            }
            Topic::Sync(id) => match store.sync_get(id).await? {
                Some(sync) => self.send(self.sync_event(&SyncEvent::changed(sync))).await,
                // Not there (any more): nothing to say until it is created.
                None => Ok(()),
            },
        }
    }

    async fn forward(&self, event: &Published) -> Result<(), End> {
        let event = match event {
            // A media node has no use for a channel's sync sessions.
            Published::Sync(_) if self.channels_only => return Ok(()),
            Published::Channel(e) => convert::event(e),
            Published::User(e) => pb::WatchEvent {
                event: Some(user_event(e)),
            },
            Published::Sync(e) => self.sync_event(e),
        };
        self.send(event).await
    }

    fn sync_event(&self, event: &SyncEvent) -> pb::WatchEvent {
        let now = self.api.clock.now_ms();
        let state = match &event.state {
            Some(s) => super::sync::sync_state(s, now),
            None => pb::SyncState {
                session_id: event.session_id.to_string(),
                channel_id: event
                    .channel_id
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                version: event.version,
                deleted: true,
                server_time_ms: now,
                ..Default::default()
            },
        };
        pb::WatchEvent {
            event: Some(pb::watch_event::Event::Sync(state)),
        }
    }

    /// Re-sends the topics' state; while the store is unavailable and [`RESYNC_PATIENCE`]
    /// since `first` has not passed, schedules another try in `pending` instead of failing.
    async fn patient_resync(
        &self,
        first: tokio::time::Instant,
        pending: &mut Option<(tokio::time::Instant, tokio::time::Instant)>,
    ) -> Result<(), End> {
        match self.resync().await {
            Err(End::Error(status))
                if status.code() == tonic::Code::Unavailable
                    && first.elapsed() < RESYNC_PATIENCE =>
            {
                tracing::debug!("watch resync waits for the store");
                *pending = Some((first, tokio::time::Instant::now() + RESYNC_RETRY));
                Ok(())
            }
            outcome => {
                *pending = None;
                outcome
            }
        }
    }

    async fn resync(&self) -> Result<(), End> {
        tracing::debug!(topics = self.topics.len(), "watch resynchronising");
        for topic in &self.topics {
            self.state_of(topic, true).await?;
        }
        Ok(())
    }

    async fn send(&self, event: pb::WatchEvent) -> Result<(), End> {
        self.out.send(Ok(event)).await.map_err(|_| End::Gone)
    }

    /// A media node follows only channels placed on it: another channel's floor changes are
    /// none of its business. Others in its request are left out (and logged), not refused
    /// with the whole request: a draining node whose channel just moved away resubscribes
    /// everything it hosts after a reconnect, and must keep its other channels.
    async fn own_channels(&self, topics: Vec<Topic>) -> Result<Vec<Topic>, End> {
        let Some(node) = &self.media_node else {
            return Ok(topics);
        };
        let mut own = Vec::with_capacity(topics.len());
        for topic in topics {
            if let Topic::Channel(ch) = &topic {
                let placed = self.api.store.placement(ch).await?;
                if placed.is_none_or(|n| n.node_id != *node) {
                    tracing::warn!(%node, channel = %ch, "a media node asked to follow a channel not placed on it; left out");
                    continue;
                }
            }
            own.push(topic);
        }
        Ok(own)
    }

    /// The topics of a request, validated; users and sync sessions refused to media nodes.
    fn parse_set(&self, set: &pb::TopicSet) -> Result<Vec<Topic>, End> {
        let count = set.channel_ids.len() + set.user_ids.len() + set.sync_ids.len();
        if count > MAX_TOPICS_PER_REQUEST {
            return Err(End::Error(Status::invalid_argument(
                "too many topics in one request",
            )));
        }
        if self.channels_only && count > set.channel_ids.len() {
            return Err(End::Error(Status::permission_denied(
                "media nodes follow channels only",
            )));
        }
        let channels = set
            .channel_ids
            .iter()
            .map(|c| channel_id(c).map(Topic::Channel));
        let users = set.user_ids.iter().map(|u| user_id(u).map(Topic::User));
        let syncs = set.sync_ids.iter().map(|s| sync_id(s).map(Topic::Sync));
        Ok(channels
            .chain(users)
            .chain(syncs)
            .collect::<Result<_, _>>()?)
    }
}

/// A user topic's event on the wire.
fn user_event(event: &UserEvent) -> pb::watch_event::Event {
    match event {
        UserEvent::Grants(g) => pb::watch_event::Event::Grants(super::access::user_grants(g)),
        UserEvent::Kicked { user_id, reason } => pb::watch_event::Event::Kicked(pb::UserKicked {
            user_id: user_id.to_string(),
            reason: reason.clone(),
        }),
        UserEvent::Resumed {
            user_id,
            session_id,
            generation,
        } => pb::watch_event::Event::Resumed(pb::SessionResumed {
            user_id: user_id.to_string(),
            session_id: session_id.to_string(),
            generation: *generation,
        }),
    }
}

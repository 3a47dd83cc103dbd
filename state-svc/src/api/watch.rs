//! `ptt.state.v1.ChannelService`: channel state, configuration and the `Watch` stream.
//!
//! Each `Watch` call runs one task that owns a hub [`Subscription`]: it applies the caller's
//! subscribe/unsubscribe requests, answers each new channel with a snapshot (taken after the
//! store's subscription is active, so no change falls between the two), forwards events, and
//! re-sends snapshots whenever the hub reports a gap. The stream ends on shutdown.
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

use super::convert::{self, channel_id};
use super::{Api, MAX_CHANNELS_PER_REQUEST, MAX_CHANNELS_PER_WATCH};
use crate::domain::ChannelId;
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
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(WATCH_OUTBOX);
        let task = WatchTask {
            api: self.clone(),
            subscription: self.hub.subscribe(),
            channels: HashSet::new(),
            out: tx,
        };
        self.tasks.spawn(task.run(inbound));
        Ok(Response::new(ReceiverStream::new(rx).boxed()))
    }
}

struct WatchTask<S> {
    api: Api<S>,
    subscription: Subscription,
    channels: HashSet<ChannelId>,
    out: mpsc::Sender<Result<pb::WatchEvent, Status>>,
}

/// Why a watch stream ended early.
enum End {
    /// The client went away; nothing to say.
    Gone,
    /// Tell the client why.
    Error(Status),
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
                    Some(Delivery::Event(event)) => self.send(convert::event(&event)).await,
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
                let ids = parse_set(&set)?;
                let new: Vec<ChannelId> = ids
                    .into_iter()
                    .filter(|c| !self.channels.contains(c))
                    .collect();
                if self.channels.len() + new.len() > MAX_CHANNELS_PER_WATCH {
                    return Err(End::Error(Status::resource_exhausted(
                        "too many channels on one watch",
                    )));
                }
                self.subscription.add(&new);
                self.channels.extend(new.iter().cloned());
                self.api
                    .store
                    .listen()
                    .await
                    .map_err(|e| End::Error(e.into()))?;
                for ch in &new {
                    self.snapshot(ch).await?;
                }
                Ok(())
            }
            Some(pb::watch_request::Action::Unsubscribe(set)) => {
                let ids = parse_set(&set)?;
                self.subscription.remove(&ids);
                for ch in &ids {
                    self.channels.remove(ch);
                }
                Ok(())
            }
            None => Err(End::Error(Status::invalid_argument(
                "watch request without action",
            ))),
        }
    }

    async fn snapshot(&self, ch: &ChannelId) -> Result<(), End> {
        let state = self
            .api
            .store
            .channel_state(ch)
            .await
            .map_err(|e| End::Error(e.into()))?;
        self.send(convert::snapshot(&state)).await
    }

    /// Re-sends the snapshots; while the store is unavailable and [`RESYNC_PATIENCE`] since
    /// `first` has not passed, schedules another try in `pending` instead of failing.
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
        tracing::debug!(channels = self.channels.len(), "watch resynchronising");
        for ch in &self.channels {
            self.snapshot(ch).await?;
        }
        Ok(())
    }

    async fn send(&self, event: pb::WatchEvent) -> Result<(), End> {
        self.out.send(Ok(event)).await.map_err(|_| End::Gone)
    }
}

fn parse_set(set: &pb::ChannelSet) -> Result<Vec<ChannelId>, End> {
    if set.channel_ids.len() > MAX_CHANNELS_PER_REQUEST {
        return Err(End::Error(Status::invalid_argument(
            "too many channels in one request",
        )));
    }
    set.channel_ids
        .iter()
        .map(|c| channel_id(c).map_err(|e| End::Error(e.into())))
        .collect()
}

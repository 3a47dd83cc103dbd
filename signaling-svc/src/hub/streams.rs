//! The gateway's `Watch` streams on state-svc: which topics each follows, and one generic
//! reconnecting stream per shard.
//!
//! A gateway follows the channels its connections are in and the users it holds sockets
//! for, so a user's events (grants, kicks, takeovers) reach only the gateways that hold that
//! user. Topics are spread over several streams (shards), each kept under state-svc's
//! per-stream cap: a channel goes to the first shard with room when a connection first
//! follows it (when every shard is full the follow is refused and the join gets
//! `LIMIT_EXCEEDED`, so no number of joins can break a stream that other users' channels
//! share); a user goes to the shard with the fewest users. A topic leaves its shard when
//! nobody here needs it any more.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use talkgroup_proto::state::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::Hub;

const BACKOFF: [u64; 6] = [1, 2, 4, 8, 16, 30];
/// A stream that ran at least this long restarts the backoff from its first step.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);
/// Topics per subscribe or unsubscribe request (state-svc takes up to 1,000).
const TOPICS_PER_REQUEST: usize = 500;

/// A topic the gateway follows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    Channel(String),
    User(String),
}

/// How the hub spreads its topics over streams.
#[derive(Debug, Clone, Copy)]
pub struct Shards {
    /// Streams at most.
    pub streams: usize,
    /// Channels one stream follows at most (state-svc refuses more than 10,000 topics a
    /// stream; users take the rest: a gateway's connections over its streams).
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

/// Which shard each followed topic is on.
#[derive(Debug)]
pub struct Placement {
    shards: Shards,
    shard_of: HashMap<Topic, usize>,
    channels: Vec<usize>,
    users: Vec<usize>,
}

impl Placement {
    pub fn new(shards: Shards) -> Self {
        Self {
            shards,
            shard_of: HashMap::new(),
            channels: vec![0; shards.streams],
            users: vec![0; shards.streams],
        }
    }

    pub fn has_room_for_a_channel(&self) -> bool {
        self.channels
            .iter()
            .any(|load| *load < self.shards.channels_per_stream)
    }

    /// Puts a new topic on a shard; `None` when it is a channel and every shard is full.
    pub fn place(&mut self, topic: &Topic) -> Option<usize> {
        let shard = match topic {
            Topic::Channel(_) => {
                let per_stream = self.shards.channels_per_stream;
                let shard = self.channels.iter().position(|load| *load < per_stream)?;
                self.channels[shard] += 1;
                shard
            }
            Topic::User(_) => {
                let (shard, _) = self.users.iter().enumerate().min_by_key(|(_, l)| **l)?;
                self.users[shard] += 1;
                shard
            }
        };
        self.shard_of.insert(topic.clone(), shard);
        Some(shard)
    }

    /// Takes a topic off its shard; the shard it was on.
    pub fn remove(&mut self, topic: &Topic) -> Option<usize> {
        let shard = self.shard_of.remove(topic)?;
        let load = match topic {
            Topic::Channel(_) => &mut self.channels[shard],
            Topic::User(_) => &mut self.users[shard],
        };
        *load -= 1;
        Some(shard)
    }
}

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

/// Keeps every stream open until shutdown, each reconnecting with backoff on its own; a
/// stream connects once it has a topic to follow.
pub async fn run(hub: Arc<Hub>, state: Channel, shutdown: CancellationToken) {
    let streams = (0..hub.wanted.len()).map(|shard| {
        let (hub, state, shutdown) = (Arc::clone(&hub), state.clone(), shutdown.clone());
        async move {
            let mut wanted = hub.wanted[shard].subscribe();
            tokio::select! {
                found = wanted.wait_for(|set| !set.is_empty()) => if found.is_err() { return },
                () = shutdown.cancelled() => return,
            }
            let stop = shutdown.clone();
            reconnecting("state watch", &stop, move || {
                let (hub, state, shutdown) = (Arc::clone(&hub), state.clone(), shutdown.clone());
                async move { watch_once(&hub, shard, state, &shutdown).await }
            })
            .await;
        }
    });
    futures::future::join_all(streams).await;
}

/// The subscribe and unsubscribe requests that take `from` to `to`.
fn requests(from: &HashSet<Topic>, to: &HashSet<Topic>) -> Vec<pb::WatchRequest> {
    let mut out = Vec::new();
    for (topics, subscribe) in [
        (to.difference(from).collect::<Vec<_>>(), true),
        (from.difference(to).collect::<Vec<_>>(), false),
    ] {
        for chunk in topics.chunks(TOPICS_PER_REQUEST) {
            let mut set = pb::TopicSet::default();
            for topic in chunk {
                match topic {
                    Topic::Channel(c) => set.channel_ids.push(c.clone()),
                    Topic::User(u) => set.user_ids.push(u.clone()),
                }
            }
            let action = if subscribe {
                pb::watch_request::Action::Subscribe(set)
            } else {
                pb::watch_request::Action::Unsubscribe(set)
            };
            out.push(pb::WatchRequest {
                action: Some(action),
            });
        }
    }
    out
}

/// One connected stream of `shard`: follows its wanted set and hands every event to the hub.
async fn watch_once(
    hub: &Hub,
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
    let mut wanted = hub.wanted[shard].subscribe();
    let mut subscribed: HashSet<Topic> = HashSet::new();
    // Events of this shard's users may have been missed while it was down.
    hub.users_may_have_missed_events(shard);
    loop {
        let now = wanted.borrow_and_update().clone();
        for request in requests(&subscribed, &now) {
            tx.send(request)
                .await
                .map_err(|_| tonic::Status::unavailable("watch closed"))?;
        }
        subscribed = now;
        tokio::select! {
            changed = wanted.changed() => if changed.is_err() { return Ok(()) },
            event = stream.next() => match event {
                Some(Ok(pb::WatchEvent { event: Some(event) })) => hub.dispatch(event),
                Some(Ok(_)) => {}
                Some(Err(status)) => return Err(status),
                None => return Err(tonic::Status::unavailable("watch ended")),
            },
            () = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// The wanted sets of the streams, one per shard.
pub fn wanted_sets(shards: Shards) -> Vec<watch::Sender<HashSet<Topic>>> {
    (0..shards.streams)
        .map(|_| watch::Sender::new(HashSet::new()))
        .collect()
}

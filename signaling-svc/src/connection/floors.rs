//! The floors one connection holds, and everything that keeps them true: the grant flow, the
//! renewals, the connection's producers and where its channels' media is.
//!
//! A grant is only told to the client after the channel's media node forwards the new holder
//! (its first words must not be lost); a node that cannot be told gives the floor back. While
//! the socket lives, each held floor is renewed every third of its lease, and each renewal
//! moves the media node's expiry too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use talkgroup_proto::state::v1 as spb;
use tokio::task::JoinHandle;

use super::placement::{FloorEnd, place, set_floor};
use super::{Conn, Result};
use crate::access::Role;
use crate::app_state::AppState;
use crate::protocol::reply::{Denied, Done, FloorAnswer, Granted, Queued};
use crate::protocol::{Code, err};

impl Conn {
    /// `ptt-start` (at most `priority` the role allows) and `priority-ptt-start`.
    pub(super) async fn press(
        &mut self,
        channel: &str,
        least: Role,
        priority: u32,
    ) -> Result<FloorAnswer> {
        self.require_joined(channel)?;
        let role = self.require_role(channel, least)?;
        if priority > role.max_priority() {
            return Err(err(Code::Forbidden, "priority not allowed for this user"));
        }
        self.limits.press()?;
        self.floors.acquire(channel, priority).await
    }

    /// `ptt-stop` and `priority-ptt-stop`.
    pub(super) async fn release(&mut self, channel: &str) -> Result<Done> {
        self.require_joined(channel)?;
        self.floors.release(channel).await?;
        Ok(Done {})
    }
}

/// A producer of this connection: its id and the media node it is on.
#[derive(Debug, Clone)]
struct Produced {
    producer: String,
    node: String,
}

/// The connection's producers by channel. Shared with the renewal tasks, so a renewal names
/// the producer made after the grant.
#[derive(Debug, Clone, Default)]
struct Producers(Arc<Mutex<HashMap<String, Produced>>>);

impl Producers {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Produced>> {
        // A panic elsewhere cannot leave the map half-written: every use is one call.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, channel: &str) -> Option<Produced> {
        self.lock().get(channel).cloned()
    }

    /// The producer to forward in `channel` (empty: none yet).
    fn producer_id(&self, channel: &str) -> String {
        self.get(channel).map(|p| p.producer).unwrap_or_default()
    }
}

#[derive(Debug)]
struct Held {
    epoch: u64,
    /// Lease end, moved on by each renewal (shared with the renewal task): what a producer
    /// made later (a new node's, after a move) is forwarded until.
    end: Arc<Mutex<FloorEnd>>,
    renewal: JoinHandle<()>,
}

/// The lock of a shared lease end (every use is one read or one write).
fn lock(end: &Mutex<FloorEnd>) -> MutexGuard<'_, FloorEnd> {
    end.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The lease a grant leaves, from its expiry and the server's clock at the grant; at least
/// 300 ms, so renewals never spin.
fn lease_ms(expires_at_ms: i64, server_now_ms: i64) -> i64 {
    (expires_at_ms - server_now_ms).max(300)
}

#[derive(Debug)]
pub(super) struct Floors {
    app: Arc<AppState>,
    conn: u64,
    session: String,
    held: HashMap<String, Held>,
    producers: Producers,
    /// Media nodes of channels this socket pressed in without a producer there (signalling-only
    /// presses), so each press does not place the channel again. Forgotten when the node does
    /// not take a floor change, or the socket leaves the channel.
    placed: HashMap<String, String>,
}

impl Floors {
    pub(super) fn new(app: Arc<AppState>, conn: u64, session: String) -> Self {
        Self {
            app,
            conn,
            session,
            held: HashMap::new(),
            producers: Producers::default(),
            placed: HashMap::new(),
        }
    }

    /// The channels whose floor this connection holds.
    pub(super) fn held_channels(&self) -> Vec<String> {
        self.held.keys().cloned().collect()
    }

    /// Asks state-svc for the floor and, when granted, has the media node forward this
    /// connection before answering.
    pub(super) async fn acquire(&mut self, channel: &str, priority: u32) -> Result<FloorAnswer> {
        let mut floors = self.app.floors();
        let acquire = floors.acquire_floor(spb::AcquireFloorRequest {
            channel_id: channel.to_owned(),
            session_id: self.session.clone(),
            priority,
            min_epoch: self.app.hub.known_epoch(channel),
        });
        // Where the channel's media is does not depend on the grant: when this socket has no
        // producer there to say so, ask at the same time as for the floor.
        let (reply, node) = match self.known_node(channel) {
            Some(node) => (acquire.await?, Ok(node)),
            None => {
                let (reply, node) = tokio::join!(acquire, place(&self.app, channel));
                if let Ok(node) = &node {
                    self.placed.insert(channel.to_owned(), node.clone());
                }
                (reply?, node)
            }
        };
        let reply = reply.into_inner();
        let holder = reply.holder.clone().unwrap_or_default();
        match reply.outcome() {
            spb::AcquireOutcome::Granted => {
                let (epoch, expires) = (holder.epoch, holder.expires_at_ms);
                let end = FloorEnd::from_store(expires, reply.server_time_ms);
                if let Err(e) = self.tell_media_at(channel, node, epoch, end).await {
                    // Nobody would hear the speaker: give the floor back rather than hold it mute.
                    let release = spb::ReleaseFloorRequest {
                        channel_id: channel.to_owned(),
                        session_id: self.session.clone(),
                        epoch,
                    };
                    let _ = self.app.floors().release_floor(release).await;
                    return Err(e);
                }
                self.hold(channel, epoch, end, lease_ms(expires, reply.server_time_ms));
                if reply.preempted.is_some() {
                    self.app.metrics.floor_preemptions.inc();
                }
                Ok(FloorAnswer::Granted(Granted::new(
                    epoch,
                    expires,
                    reply.max_talk_ms,
                )))
            }
            spb::AcquireOutcome::Queued => Ok(FloorAnswer::Queued(Queued::new(
                reply.queue_position,
                crate::protocol::speaking(Some(&holder)),
            ))),
            _ => Ok(FloorAnswer::Denied(Denied::new(
                crate::protocol::speaking(Some(&holder)),
                reply.retry_after_ms.max(0),
            ))),
        }
    }

    /// Gives up the floor of `channel` (only the holder's release releases) and cuts its media
    /// at once.
    pub(super) async fn release(&mut self, channel: &str) -> Result<()> {
        let epoch = self.stop_holding(channel).unwrap_or(0);
        let released = self
            .app
            .floors()
            .release_floor(spb::ReleaseFloorRequest {
                channel_id: channel.to_owned(),
                session_id: self.session.clone(),
                epoch,
            })
            .await?
            .into_inner();
        if released.released {
            // Cut at once with the release's epoch; the watch says so too, a moment later.
            self.cut_media(channel, released.epoch).await;
        }
        Ok(())
    }

    /// Takes up a floor state-svc granted without a press of this connection (an emergency
    /// broadcast): tells the media node, then holds and renews it. A node that cannot be told
    /// is told again by the next renewal.
    pub(super) async fn take_up(&mut self, channel: &str, holder: &spb::FloorHolder, now_ms: i64) {
        let (epoch, expires) = (holder.epoch, holder.expires_at_ms);
        let end = FloorEnd::from_store(expires, now_ms);
        if let Err(e) = self.tell_media(channel, epoch, end).await {
            tracing::warn!(%channel, error = %e, "media node not told of the floor");
        }
        self.hold(channel, epoch, end, lease_ms(expires, now_ms));
    }

    /// Follows a floor change of a channel this connection is in or holds: a floor taken over
    /// by a later epoch is no longer held; one granted to this session from the queue is taken
    /// up as if just granted.
    pub(super) async fn follow(&mut self, change: &spb::FloorChanged) {
        let channel = change.channel_id.as_str();
        let mine = change
            .holder
            .as_ref()
            .and_then(|h| h.speaker.as_ref())
            .is_some_and(|s| s.session_id == self.session);
        if let Some(held) = self.held.get(channel)
            && held.epoch < change.epoch
            && !mine
        {
            self.stop_holding(channel);
        }
        if mine
            && let Some(h) = &change.holder
            && !self.held.contains_key(channel)
            && self
                .tell_media(
                    channel,
                    h.epoch,
                    FloorEnd::from_store(h.expires_at_ms, change.at_ms),
                )
                .await
                .is_ok()
        {
            let lease = lease_ms(h.expires_at_ms, change.at_ms);
            let end = FloorEnd::from_store(h.expires_at_ms, change.at_ms);
            self.hold(channel, h.epoch, end, lease);
        }
    }

    /// A new producer of this connection in `channel` on `node`. Already talking (pressed
    /// before producing): the node forwards it now rather than at the next renewal.
    pub(super) async fn produced(
        &mut self,
        channel: &str,
        producer: String,
        node: String,
    ) -> Result<()> {
        let produced = Produced { producer, node };
        self.producers
            .lock()
            .insert(channel.to_owned(), produced.clone());
        if let Some(held) = self.held.get(channel) {
            let (epoch, expires) = (held.epoch, *lock(&held.end));
            let node = produced.node;
            set_floor(&self.app, &node, channel, produced.producer, epoch, expires).await?;
        }
        Ok(())
    }

    /// The channel's media moved to `node`: a producer elsewhere is gone (the next one,
    /// made on `node`, is forwarded at once if the floor is held), and so is the remembered
    /// placement.
    pub(super) fn moved(&mut self, channel: &str, node: &str) {
        let mut producers = self.producers.lock();
        if producers.get(channel).is_some_and(|p| p.node != node) {
            producers.remove(channel);
        }
        drop(producers);
        self.placed.remove(channel);
    }

    /// Forgets the producer of `channel` (its send transport closed).
    pub(super) fn unproduced(&mut self, channel: &str) {
        self.producers.lock().remove(channel);
    }

    /// Forgets everything of `channel` but the producer (which goes with its transport): the
    /// connection left it.
    pub(super) fn leave(&mut self, channel: &str) {
        self.stop_holding(channel);
        self.placed.remove(channel);
    }

    /// Stops every renewal (the connection ends; its session's removal releases the floors).
    pub(super) fn stop_all(&mut self) {
        for (_, held) in self.held.drain() {
            held.renewal.abort();
        }
    }

    /// Tells the channel's media node to forward nobody from `epoch` on.
    pub(super) async fn cut_media(&self, channel: &str, epoch: u64) {
        if let Ok(node) = place(&self.app, channel).await
            && let Err(e) = set_floor(
                &self.app,
                &node,
                channel,
                String::new(),
                epoch,
                FloorEnd::cleared(),
            )
            .await
        {
            tracing::warn!(error = %e, "media node did not take the release");
        }
    }

    /// The channel's media node as this socket knows it: where its producer is, or where its
    /// last press placed the channel.
    fn known_node(&self, channel: &str) -> Option<String> {
        self.producers
            .get(channel)
            .map(|p| p.node)
            .or_else(|| self.placed.get(channel).cloned())
    }

    /// Tells the channel's media node (known, or placed now) about a grant.
    async fn tell_media(&mut self, channel: &str, epoch: u64, end: FloorEnd) -> Result<()> {
        let node = match self.known_node(channel) {
            Some(node) => Ok(node),
            None => place(&self.app, channel).await.inspect(|node| {
                self.placed.insert(channel.to_owned(), node.clone());
            }),
        };
        self.tell_media_at(channel, node, epoch, end).await
    }

    /// Tells `node` about a grant. A remembered placement can be stale (its node died and the
    /// channel moved on the next join): then the channel is placed again, once.
    async fn tell_media_at(
        &mut self,
        channel: &str,
        node: Result<String>,
        epoch: u64,
        end: FloorEnd,
    ) -> Result<()> {
        let producer = self.producers.producer_id(channel);
        let mut told = match node {
            Ok(node) => set_floor(&self.app, &node, channel, producer.clone(), epoch, end).await,
            Err(e) => Err(e),
        };
        if told.is_err() && self.placed.remove(channel).is_some() {
            told = match place(&self.app, channel).await {
                Ok(node) => {
                    self.placed.insert(channel.to_owned(), node.clone());
                    set_floor(&self.app, &node, channel, producer, epoch, end).await
                }
                Err(e) => Err(e),
            };
        }
        if told.is_err() {
            self.placed.remove(channel);
        }
        told
    }

    fn hold(&mut self, channel: &str, epoch: u64, end: FloorEnd, lease_ms: i64) {
        self.stop_holding(channel);
        self.app.hub.holding(self.conn, channel, true);
        let every = Duration::from_millis(u64::try_from(lease_ms / 3).unwrap_or(1_000).max(100));
        let end = Arc::new(Mutex::new(end));
        let renewal = self.app.tracker.spawn(renew(
            Arc::clone(&self.app),
            self.producers.clone(),
            Renewing {
                channel: channel.to_owned(),
                session: self.session.clone(),
                epoch,
                every,
                end: Arc::clone(&end),
            },
        ));
        let held = Held {
            epoch,
            end,
            renewal,
        };
        self.held.insert(channel.to_owned(), held);
    }

    /// Stops holding `channel`'s floor here; the epoch it was held with.
    pub(super) fn stop_holding(&mut self, channel: &str) -> Option<u64> {
        self.held.remove(channel).map(|held| {
            self.app.hub.holding(self.conn, channel, false);
            held.renewal.abort();
            held.epoch
        })
    }
}

/// What a renewal task renews.
struct Renewing {
    channel: String,
    session: String,
    epoch: u64,
    every: Duration,
    end: Arc<Mutex<FloorEnd>>,
}

/// Renews a held floor until it is refused (released, revoked, expired) or aborted.
async fn renew(app: Arc<AppState>, producers: Producers, renewing: Renewing) {
    let Renewing {
        channel,
        session,
        epoch,
        every,
        end,
    } = renewing;
    loop {
        tokio::time::sleep(every).await;
        let renewed = app
            .floors()
            .renew_floor(spb::RenewFloorRequest {
                channel_id: channel.clone(),
                session_id: session.clone(),
                epoch,
            })
            .await;
        match renewed.map(tonic::Response::into_inner) {
            Ok(r) if r.renewed => {
                let renewed_end = FloorEnd::from_store(r.expires_at_ms, r.server_time_ms);
                *lock(&end) = renewed_end;
                if let Some(p) = producers.get(&channel) {
                    let moved = set_floor(&app, &p.node, &channel, p.producer, epoch, renewed_end);
                    let _ = moved.await;
                }
            }
            Ok(_) => return,
            Err(status) => {
                tracing::warn!(code = ?status.code(), %channel, "floor renewal failed; retrying")
            }
        }
    }
}

//! The media node: the registry of its transports (who owns them, which channel, what they
//! carry) in front of the worker pool that runs them. The gRPC service and the link to
//! state-svc both drive it through [`Node`].

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::engine::{Candidate, Engine, EngineError, PeerSpec, PeerState};
use crate::router::{Floor, FloorApplied, Listener, Rewriter};
use crate::worker::{Demux, Listen, PoolStats, WorkerPool, Workers};

/// Transports one session may hold: a dispatcher monitoring 50 channels holds a receive
/// transport for each and a send transport for those it talks on. Transports share the node's
/// port, so this bounds memory and CPU per session, not ports.
pub const MAX_TRANSPORTS_PER_SESSION: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Send,
    Recv,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    FailedPrecondition(&'static str),
    #[error("{0}")]
    Exhausted(&'static str),
    #[error("node is draining")]
    Draining,
    #[error("node is stopping")]
    Stopping,
    #[error("transport setup failed: {0}")]
    Engine(#[from] EngineError),
}

/// What the node needs to know about its network.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub node_id: String,
    /// Written into candidates instead of the bound address, when set.
    pub announced_ip: Option<IpAddr>,
    /// Transports the node accepts in all.
    pub capacity: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Role {
    None,
    Producer(String),
    Consumer(String),
}

#[derive(Debug)]
struct Entry {
    key: u64,
    session: String,
    channel: String,
    direction: Direction,
    ssrc: u32,
    role: Role,
    created: Instant,
    /// ICE and DTLS completed (the peer reported `Connected`).
    connected: bool,
}

#[derive(Debug, Default)]
struct Registry {
    transports: HashMap<String, Entry>,
    /// Transport ids by worker key, for the workers' peer reports.
    by_key: HashMap<u64, String>,
    by_session: HashMap<String, HashSet<String>>,
    /// Transports per channel: the channels this node hosts.
    by_channel: HashMap<String, usize>,
}

pub struct Node {
    settings: NodeSettings,
    pool: WorkerPool,
    registry: Mutex<Registry>,
    next_key: AtomicU64,
    draining: AtomicBool,
    /// The channels hosted, for the state-svc link to watch.
    channels_tx: watch::Sender<HashSet<String>>,
    /// The workers' peer reports, until [`Node::reap`] takes them.
    peer_states: Mutex<Option<mpsc::UnboundedReceiver<(u64, PeerState)>>>,
    /// Transports closed by the node itself, by why.
    reaped: Reaped,
}

/// Why the node closed transports on its own, counted for `/metrics`.
#[derive(Debug, Default)]
pub struct Reaped {
    /// The peer failed or closed: ICE consent lost, DTLS failed, the client went away.
    pub failed: AtomicU64,
    /// Not connected within the connect deadline of its creation.
    pub never_connected: AtomicU64,
    /// Its session left the channel, or ended, in state-svc.
    pub session_ended: AtomicU64,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("settings", &self.settings)
            .field("transports", &self.transport_count())
            .field("draining", &self.is_draining())
            .finish_non_exhaustive()
    }
}

/// What a new transport hands back.
#[derive(Debug, Clone)]
pub struct CreatedTransport {
    pub transport_id: String,
    pub offer: String,
}

/// When a grant ends on this node's monotonic clock: `lease_ms` from now when given (a
/// duration: nothing is compared across clocks), otherwise `expires_at_ms` (the state store's
/// clock) against this node's wall clock; `None` for no grant.
pub fn floor_end(lease_ms: u32, expires_at_ms: i64) -> Option<Instant> {
    if lease_ms > 0 {
        return Some(Instant::now() + Duration::from_millis(u64::from(lease_ms)));
    }
    (expires_at_ms > 0).then(|| {
        let left = expires_at_ms.saturating_sub(wall_ms()).max(0);
        Instant::now() + Duration::from_millis(u64::try_from(left).unwrap_or(0))
    })
}

/// One of a session's transports, as listed for a gateway taking the session over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionTransport {
    pub transport_id: String,
    pub channel: String,
    pub direction: Direction,
    /// Its producer's id (send) or consumer's id (recv); empty when it has none.
    pub producer: String,
    pub consumer: String,
    pub ssrc: u32,
}

/// Node-wide numbers.
#[derive(Debug, Clone, Default)]
pub struct NodeStats {
    pub transports: u32,
    pub pool: PoolStats,
}

impl Node {
    /// A node serving every transport on the shared UDP address `udp` (port 0: an ephemeral
    /// one) and, when set, the shared ICE/TCP address `tcp`, with `workers` forwarding workers.
    pub fn new<E: Engine>(
        engine: E,
        settings: NodeSettings,
        (udp, tcp): (SocketAddr, Option<SocketAddr>),
        workers: &Workers,
    ) -> Result<Arc<Self>, EngineError> {
        let listen = Listen {
            udp,
            tcp,
            announced: settings.announced_ip,
        };
        let (pool, peer_states) = WorkerPool::start(workers, Arc::new(engine), listen)?;
        Ok(Arc::new(Self {
            settings,
            pool,
            registry: Mutex::new(Registry::default()),
            next_key: AtomicU64::new(1),
            draining: AtomicBool::new(false),
            channels_tx: watch::Sender::new(HashSet::new()),
            peer_states: Mutex::new(Some(peer_states)),
            reaped: Reaped::default(),
        }))
    }

    /// The node's shared media addresses.
    pub fn addresses(&self) -> crate::engine::Addresses {
        self.pool.addresses()
    }

    /// What the shared port refused, and the paths it knows.
    pub fn demux(&self) -> &Demux {
        self.pool.demux()
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn settings(&self) -> &NodeSettings {
        &self.settings
    }

    /// The channels hosted, as they change.
    pub fn channels(&self) -> watch::Receiver<HashSet<String>> {
        self.channels_tx.subscribe()
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn transport_count(&self) -> usize {
        self.registry().transports.len()
    }

    fn publish_channels(&self, registry: &Registry) {
        let channels: HashSet<String> = registry.by_channel.keys().cloned().collect();
        self.channels_tx.send_if_modified(|current| {
            if *current == channels {
                false
            } else {
                *current = channels;
                true
            }
        });
    }

    pub async fn create_transport(
        &self,
        session: &str,
        channel: &str,
        direction: Direction,
    ) -> Result<CreatedTransport, NodeError> {
        {
            let registry = self.registry();
            if self.is_draining() && !registry.by_channel.contains_key(channel) {
                return Err(NodeError::Draining);
            }
            if registry.transports.len() >= self.settings.capacity as usize {
                return Err(NodeError::Exhausted("node at capacity"));
            }
            if registry
                .by_session
                .get(session)
                .is_some_and(|s| s.len() >= MAX_TRANSPORTS_PER_SESSION)
            {
                return Err(NodeError::Exhausted("too many transports for this session"));
            }
        }
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let ssrc: u32 = rand::random();
        let spec = match direction {
            Direction::Send => PeerSpec::Send,
            Direction::Recv => PeerSpec::Recv { ssrc },
        };
        let offer = match self.pool.create_peer(key, spec).await {
            Some(Ok(offer)) => offer,
            Some(Err(e)) => return Err(e.into()),
            None => return Err(NodeError::Stopping),
        };
        let transport_id = uuid::Uuid::new_v4().simple().to_string();
        let entry = Entry {
            key,
            session: session.to_owned(),
            channel: channel.to_owned(),
            direction,
            ssrc,
            role: Role::None,
            created: Instant::now(),
            connected: false,
        };
        let mut registry = self.registry();
        registry.transports.insert(transport_id.clone(), entry);
        registry.by_key.insert(key, transport_id.clone());
        registry
            .by_session
            .entry(session.to_owned())
            .or_default()
            .insert(transport_id.clone());
        *registry.by_channel.entry(channel.to_owned()).or_default() += 1;
        self.publish_channels(&registry);
        tracing::debug!(%transport_id, channel, ?direction, "transport created");
        Ok(CreatedTransport {
            transport_id,
            offer,
        })
    }

    /// The transport's worker key and channel, if it exists and belongs to `session` (another
    /// session's transport is as good as absent).
    fn lookup(
        &self,
        transport_id: &str,
        session: &str,
    ) -> Result<(u64, String, Direction, u32, Role), NodeError> {
        let registry = self.registry();
        registry
            .transports
            .get(transport_id)
            .filter(|e| e.session == session)
            .map(|e| {
                (
                    e.key,
                    e.channel.clone(),
                    e.direction,
                    e.ssrc,
                    e.role.clone(),
                )
            })
            .ok_or(NodeError::NotFound("transport"))
    }

    pub async fn apply_answer(
        &self,
        transport_id: &str,
        session: &str,
        sdp: String,
    ) -> Result<(), NodeError> {
        let (key, ..) = self.lookup(transport_id, session)?;
        let result = self.pool.apply_answer(key, sdp).await;
        result.ok_or(NodeError::Stopping)?.map_err(Into::into)
    }

    /// Restarts a transport's ICE (fresh credentials, same DTLS and SRTP): its new offer, to be
    /// answered through [`Node::apply_answer`].
    pub async fn restart_ice(
        &self,
        transport_id: &str,
        session: &str,
    ) -> Result<String, NodeError> {
        let (key, ..) = self.lookup(transport_id, session)?;
        let result = self.pool.restart_ice(key).await;
        result.ok_or(NodeError::Stopping)?.map_err(Into::into)
    }

    pub async fn add_candidate(
        &self,
        transport_id: &str,
        session: &str,
        candidate: Candidate,
    ) -> Result<(), NodeError> {
        let (key, ..) = self.lookup(transport_id, session)?;
        let result = self.pool.add_candidate(key, candidate).await;
        result.ok_or(NodeError::Stopping)?.map_err(Into::into)
    }

    /// Claims a role for the transport; answers the existing id when it already has that role.
    fn claim(
        &self,
        transport_id: &str,
        make: impl FnOnce(String) -> Role,
        same: impl Fn(&Role) -> Option<String>,
    ) -> Result<(String, bool), NodeError> {
        let mut registry = self.registry();
        let entry = registry
            .transports
            .get_mut(transport_id)
            .ok_or(NodeError::NotFound("transport"))?;
        if let Some(existing) = same(&entry.role) {
            return Ok((existing, false));
        }
        if entry.role != Role::None {
            return Err(NodeError::FailedPrecondition(
                "transport already has another role",
            ));
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        entry.role = make(id.clone());
        Ok((id, true))
    }

    pub async fn produce(
        &self,
        transport_id: &str,
        session: &str,
        channel: &str,
    ) -> Result<String, NodeError> {
        let (key, own_channel, direction, ..) = self.lookup(transport_id, session)?;
        if direction != Direction::Send || own_channel != channel {
            return Err(NodeError::FailedPrecondition(
                "not a send transport of this channel",
            ));
        }
        let (producer, new) = self.claim(transport_id, Role::Producer, |r| match r {
            Role::Producer(p) => Some(p.clone()),
            _ => None,
        })?;
        if new {
            self.pool
                .add_producer(&own_channel, producer.clone(), session.to_owned())
                .await
                .ok_or(NodeError::Stopping)?;
            self.pool
                .route(key, &own_channel, &producer)
                .await
                .ok_or(NodeError::Stopping)?;
        }
        Ok(producer)
    }

    /// Attaches a recv transport to the channel's floor stream; returns the consumer id and
    /// the SSRC the listener receives for the stream's whole life.
    pub async fn consume(
        &self,
        transport_id: &str,
        session: &str,
        channel: &str,
    ) -> Result<(String, u32), NodeError> {
        let (key, own_channel, direction, ssrc, _) = self.lookup(transport_id, session)?;
        if direction != Direction::Recv || own_channel != channel {
            return Err(NodeError::FailedPrecondition(
                "not a receive transport of this channel",
            ));
        }
        let (consumer, new) = self.claim(transport_id, Role::Consumer, |r| match r {
            Role::Consumer(c) => Some(c.clone()),
            _ => None,
        })?;
        if new {
            let payload_type = self
                .pool
                .payload_type(key)
                .await
                .ok_or(NodeError::Stopping)?;
            let listener = Listener {
                session: session.to_owned(),
                rewriter: Rewriter::new(ssrc, payload_type),
                peer: key,
            };
            self.pool
                .add_listener(&own_channel, consumer.clone(), listener)
                .await
                .ok_or(NodeError::Stopping)?;
        }
        Ok((consumer, ssrc))
    }

    /// Names the producer to forward (or nobody), fenced by epoch. `expires_at_ms` is wall-clock
    /// time; 0 means no expiry. `only_newer` applies a strictly higher epoch only.
    pub async fn set_floor(
        &self,
        channel: &str,
        producer: Option<String>,
        epoch: u64,
        expires_at: Option<Instant>,
        only_newer: bool,
    ) -> FloorApplied {
        self.pool
            .set_floor(
                channel,
                Floor {
                    epoch,
                    producer,
                    expires_at,
                },
                only_newer,
            )
            .await
    }

    /// The producer a session has in a channel, if any.
    pub fn producer_of(&self, channel: &str, session: &str) -> Option<String> {
        let registry = self.registry();
        let ids = registry.by_session.get(session)?;
        ids.iter()
            .filter_map(|id| registry.transports.get(id))
            .find_map(|e| match &e.role {
                Role::Producer(p) if e.channel == channel => Some(p.clone()),
                _ => None,
            })
    }

    pub async fn close_transport(
        &self,
        transport_id: &str,
        session: &str,
    ) -> Result<(), NodeError> {
        let entry = {
            let mut registry = self.registry();
            if registry
                .transports
                .get(transport_id)
                .is_none_or(|e| e.session != session)
            {
                return Err(NodeError::NotFound("transport"));
            }
            // Invariant: checked just above under the same lock.
            #[allow(clippy::expect_used)]
            let entry = registry.transports.remove(transport_id).expect("present");
            registry.by_key.remove(&entry.key);
            if let Some(ids) = registry.by_session.get_mut(session) {
                ids.remove(transport_id);
                if ids.is_empty() {
                    registry.by_session.remove(session);
                }
            }
            if let Some(count) = registry.by_channel.get_mut(&entry.channel) {
                *count -= 1;
                if *count == 0 {
                    registry.by_channel.remove(&entry.channel);
                }
            }
            self.publish_channels(&registry);
            entry
        };
        match entry.role {
            Role::Producer(producer) => {
                self.pool.remove_producer(&entry.channel, producer).await;
            }
            Role::Consumer(consumer) => {
                self.pool.remove_listener(&entry.channel, consumer).await;
            }
            Role::None => {}
        }
        self.pool.close_peer(entry.key).await;
        tracing::debug!(%transport_id, "transport closed");
        Ok(())
    }

    /// `session`'s transports on this node, sorted by id: what a gateway taking the session
    /// over needs to serve them.
    pub fn session_transports(&self, session: &str) -> Vec<SessionTransport> {
        let registry = self.registry();
        let mut listed: Vec<SessionTransport> = registry
            .by_session
            .get(session)
            .into_iter()
            .flatten()
            .filter_map(|id| {
                let entry = registry.transports.get(id)?;
                let (producer, consumer) = match &entry.role {
                    Role::Producer(p) => (p.clone(), String::new()),
                    Role::Consumer(c) => (String::new(), c.clone()),
                    Role::None => (String::new(), String::new()),
                };
                Some(SessionTransport {
                    transport_id: id.clone(),
                    channel: entry.channel.clone(),
                    direction: entry.direction,
                    producer,
                    consumer,
                    ssrc: entry.ssrc,
                })
            })
            .collect();
        listed.sort_by(|a, b| a.transport_id.cmp(&b.transport_id));
        listed
    }

    pub async fn close_session(&self, session: &str) -> u32 {
        let ids: Vec<String> = self
            .registry()
            .by_session
            .get(session)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        let mut closed = 0;
        for id in ids {
            if self.close_transport(&id, session).await.is_ok() {
                closed += 1;
            }
        }
        closed
    }

    /// Closes `session`'s transports in `channel` (it left the channel, or its session ended);
    /// how many.
    pub async fn close_member(&self, channel: &str, session: &str) -> u32 {
        let ids: Vec<String> = {
            let registry = self.registry();
            registry
                .by_session
                .get(session)
                .into_iter()
                .flatten()
                .filter(|id| {
                    registry
                        .transports
                        .get(*id)
                        .is_some_and(|e| e.channel == channel)
                })
                .cloned()
                .collect()
        };
        self.close_ended(ids, &self.reaped.session_ended).await
    }

    /// Closes the transports in `channel` whose session is not among `members` (state-svc's
    /// member list of the channel, from a snapshot); how many.
    pub async fn keep_members(&self, channel: &str, members: &HashSet<&str>) -> u32 {
        let ids: Vec<String> = self
            .registry()
            .transports
            .iter()
            .filter(|(_, e)| e.channel == channel && !members.contains(e.session.as_str()))
            .map(|(id, _)| id.clone())
            .collect();
        self.close_ended(ids, &self.reaped.session_ended).await
    }

    /// Closes transports the node decided to end itself, counting them under `why`.
    async fn close_ended(&self, ids: Vec<String>, why: &AtomicU64) -> u32 {
        let mut closed = 0;
        for id in ids {
            let session = self
                .registry()
                .transports
                .get(&id)
                .map(|e| e.session.clone());
            if let Some(session) = session
                && self.close_transport(&id, &session).await.is_ok()
            {
                closed += 1;
                why.fetch_add(1, Ordering::Relaxed);
            }
        }
        closed
    }

    /// Until `shutdown`, closes the transports that should not live on: those whose peer
    /// failed or closed (ICE consent lost, DTLS failed) and those not connected within
    /// `connect_timeout` of their creation (never answered, never reached). Their places under
    /// the session's and the node's caps come back.
    pub async fn reap(self: Arc<Self>, connect_timeout: Duration, shutdown: CancellationToken) {
        let Some(mut states) = self
            .peer_states
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        else {
            return;
        };
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                Some((key, state)) = states.recv() => self.on_peer_state(key, state).await,
                _ = tick.tick() => {
                    let now = Instant::now();
                    let late: Vec<String> = self
                        .registry()
                        .transports
                        .iter()
                        .filter(|(_, e)| !e.connected && now >= e.created + connect_timeout)
                        .map(|(id, _)| id.clone())
                        .collect();
                    if !late.is_empty() {
                        let closed = self.close_ended(late, &self.reaped.never_connected).await;
                        tracing::info!(closed, "closed transports that never connected");
                    }
                }
                () = shutdown.cancelled() => return,
            }
        }
    }

    async fn on_peer_state(&self, key: u64, state: PeerState) {
        let id = {
            let mut registry = self.registry();
            let Some(id) = registry.by_key.get(&key).cloned() else {
                return;
            };
            if state == PeerState::Connected {
                if let Some(entry) = registry.transports.get_mut(&id) {
                    entry.connected = true;
                }
                return;
            }
            id
        };
        tracing::info!(transport_id = %id, ?state, "peer ended; closing its transport");
        self.close_ended(vec![id], &self.reaped.failed).await;
    }

    /// Cancelled once a worker died (panicked): the node can no longer do all its work.
    pub fn failed(&self) -> CancellationToken {
        self.pool.failed()
    }

    /// Transports the node closed on its own so far.
    pub fn reaped(&self) -> &Reaped {
        &self.reaped
    }

    /// Node-wide numbers; `reset_latency` starts a new latency measuring window.
    pub async fn stats(&self, reset_latency: bool) -> NodeStats {
        let transports = u32::try_from(self.transport_count()).unwrap_or(u32::MAX);
        NodeStats {
            transports,
            pool: self.pool.stats(reset_latency).await,
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.pool.stop();
    }
}

/// True when `epoch` could have come from state-svc's epoch clock at `now_ms` (this node's
/// wall clock): the one rule of `talkgroup_proto::epoch`. An epoch far ahead would make the
/// node refuse every real decision for the channel until it restarts (only a higher epoch
/// applies), so no single call may set one.
pub fn plausible_epoch(epoch: u64, now_ms: i64) -> bool {
    talkgroup_proto::epoch::plausible(epoch, now_ms)
}

/// Wall-clock milliseconds since the Unix epoch (the one read, `talkgroup_proto::clock`).
pub fn wall_ms() -> i64 {
    talkgroup_proto::clock::now_ms()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::engine::listener::ListenerPeer;
    use crate::engine::rtc_peer::{RtcEngine, RtcPeer};

    #[test]
    fn a_lease_given_as_a_duration_ignores_the_stores_clock() {
        let now = Instant::now();
        // The store's clock an hour behind this node's: its expiry is long past here, yet a
        // lease of 30 s holds 30 s.
        let skewed = wall_ms() - 3_600_000;
        let end = floor_end(30_000, skewed).unwrap();
        assert!(
            end >= now + Duration::from_secs(29) && end <= Instant::now() + Duration::from_secs(30)
        );
        // Without a duration the old comparison of clocks applies: expired at once.
        assert!(floor_end(0, skewed).unwrap() <= Instant::now());
        assert_eq!(floor_end(0, 0), None);
    }

    /// The real engine, except that making a listener transport panics (a bug in a worker).
    struct PanicsOnListener(RtcEngine);

    impl Engine for PanicsOnListener {
        type Speaker = RtcPeer;
        type Listener = ListenerPeer;

        fn speaker(
            &self,
            local: &crate::engine::Addresses,
            now: Instant,
        ) -> Result<RtcPeer, EngineError> {
            self.0.speaker(local, now)
        }

        fn listener(
            &self,
            _ssrc: u32,
            _local: &crate::engine::Addresses,
        ) -> Result<ListenerPeer, EngineError> {
            panic!("a bug in the worker");
        }
    }

    #[test]
    fn epochs_from_the_epoch_clock_pass_and_absurd_ones_do_not() {
        let now = 1_764_000_000_000_i64;
        let epoch_now = u64::try_from(now).unwrap() * 1000;
        assert!(plausible_epoch(1, now));
        assert!(plausible_epoch(epoch_now, now));
        assert!(
            plausible_epoch(epoch_now + 5 * 60_000 * 1000, now),
            "five minutes of skew"
        );
        assert!(!plausible_epoch(epoch_now + 11 * 60_000 * 1000, now));
        assert!(!plausible_epoch(u64::MAX, now));
    }

    #[tokio::test]
    async fn a_panicking_worker_is_reported_not_left_half_working() {
        let settings = NodeSettings {
            node_id: "n".into(),
            announced_ip: None,
            capacity: 10,
        };
        let node = Node::new(
            PanicsOnListener(RtcEngine::new().unwrap()),
            settings,
            ("127.0.0.1:0".parse().unwrap(), None),
            &Workers::new(1, Some(false)),
        )
        .unwrap();
        assert!(!node.failed().is_cancelled());
        node.create_transport("s1", "ch", Direction::Send)
            .await
            .unwrap();
        let refused = node.create_transport("s2", "ch", Direction::Recv).await;
        assert!(matches!(refused, Err(NodeError::Stopping)), "{refused:?}");
        tokio::time::timeout(Duration::from_secs(5), node.failed().cancelled())
            .await
            .expect("the failure is reported");
    }

    #[tokio::test]
    async fn a_peer_that_failed_or_connected_is_handled_by_its_report() {
        let settings = NodeSettings {
            node_id: "n".into(),
            announced_ip: None,
            capacity: 10,
        };
        let node = Node::new(
            RtcEngine::new().unwrap(),
            settings,
            ("127.0.0.1:0".parse().unwrap(), None),
            &Workers::new(1, Some(false)),
        )
        .unwrap();
        let kept = node
            .create_transport("s1", "ch", Direction::Recv)
            .await
            .unwrap();
        let failed = node
            .create_transport("s2", "ch", Direction::Recv)
            .await
            .unwrap();
        let key_of = |id: &str| node.registry().transports.get(id).map(|e| e.key).unwrap();
        let (kept_key, failed_key) = (key_of(&kept.transport_id), key_of(&failed.transport_id));
        node.on_peer_state(kept_key, PeerState::Connected).await;
        node.on_peer_state(failed_key, PeerState::Failed).await;
        assert_eq!(
            node.transport_count(),
            1,
            "the failed peer's transport is closed"
        );
        {
            let registry = node.registry();
            assert!(
                registry
                    .transports
                    .get(&kept.transport_id)
                    .is_some_and(|e| e.connected)
            );
            assert!(!registry.by_key.contains_key(&failed_key));
        }
        assert_eq!(node.reaped().failed.load(Ordering::Relaxed), 1);
        // A report for a transport already gone changes nothing.
        node.on_peer_state(failed_key, PeerState::Closed).await;
        assert_eq!(node.reaped().failed.load(Ordering::Relaxed), 1);
    }
}

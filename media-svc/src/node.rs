//! The media node: its transports, producers and consumers, and the worker pool that hosts its
//! channels. The gRPC service and the link to state-svc both drive it through [`Node`].

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rtc::rtp;
use tokio::sync::watch;

use crate::engine::{Candidate, Engine, EngineError, PacketSink, Transport, TransportSpec};
use crate::ports::PortPool;
use crate::router::{Floor, FloorApplied, Listener, ListenerSink, Rewriter};
use crate::worker::{Command, PoolStats, WorkerPool};

/// Transports one session may hold (a send and a receive transport per channel, a few channels).
pub const MAX_TRANSPORTS_PER_SESSION: usize = 16;

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

/// The worker pool, channel and producer a send transport's packets are routed to.
type Route = (WorkerPool, Arc<str>, Arc<str>);

/// Where a send transport's packets go once it produces.
#[derive(Default)]
struct ProducerSink {
    target: Mutex<Option<Route>>,
    /// Packets that arrived before `produce` (a producer starts paused).
    unrouted: AtomicU64,
}

impl PacketSink for ProducerSink {
    fn on_rtp(&self, packet: rtp::Packet) {
        let target = self
            .target
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*target {
            Some((pool, channel, producer)) => pool.packet(channel, producer, packet),
            None => {
                self.unrouted.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Role {
    None,
    Producer(String),
    Consumer(String),
}

struct Entry<T> {
    session: String,
    channel: String,
    direction: Direction,
    transport: Arc<T>,
    addr: std::net::SocketAddr,
    ssrc: u32,
    sink: Arc<ProducerSink>,
    role: Mutex<Role>,
}

impl<T> Entry<T> {
    fn role(&self) -> MutexGuard<'_, Role> {
        self.role
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[derive(Default)]
struct Registry<T> {
    transports: HashMap<String, Arc<Entry<T>>>,
    by_session: HashMap<String, HashSet<String>>,
    /// Transports per channel: the channels this node hosts.
    by_channel: HashMap<String, usize>,
}

pub struct Node<E: Engine> {
    engine: E,
    settings: NodeSettings,
    ports: PortPool,
    pool: WorkerPool,
    registry: Mutex<Registry<E::Transport>>,
    draining: AtomicBool,
    /// The channels hosted, for the state-svc link to watch.
    channels_tx: watch::Sender<HashSet<String>>,
    write_errors: Arc<AtomicU64>,
}

impl<E: Engine> std::fmt::Debug for Node<E> {
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

/// Node-wide numbers.
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeStats {
    pub transports: u32,
    pub pool: PoolStats,
    pub dropped_busy: u64,
    pub unrouted: u64,
    pub write_errors: u64,
}

impl<E: Engine> Node<E> {
    pub fn new(engine: E, settings: NodeSettings, ports: PortPool, workers: usize) -> Arc<Self> {
        Arc::new(Self {
            engine,
            settings,
            ports,
            pool: WorkerPool::start(workers),
            registry: Mutex::new(Registry {
                transports: HashMap::new(),
                by_session: HashMap::new(),
                by_channel: HashMap::new(),
            }),
            draining: AtomicBool::new(false),
            channels_tx: watch::Sender::new(HashSet::new()),
            write_errors: Arc::default(),
        })
    }

    fn registry(&self) -> MutexGuard<'_, Registry<E::Transport>> {
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

    fn publish_channels(&self, registry: &Registry<E::Transport>) {
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
        let addr = self
            .ports
            .take()
            .ok_or(NodeError::Exhausted("no free media port"))?;
        let sink = Arc::new(ProducerSink::default());
        let ssrc: u32 = rand::random();
        let spec = match direction {
            Direction::Send => TransportSpec::Send {
                sink: Arc::clone(&sink) as Arc<dyn PacketSink>,
            },
            Direction::Recv => TransportSpec::Recv { ssrc },
        };
        let transport = match self
            .engine
            .create(spec, addr, self.settings.announced_ip)
            .await
        {
            Ok(t) => t,
            Err(e) => {
                self.ports.release(addr);
                return Err(e.into());
            }
        };
        let offer = transport.offer().to_owned();
        let transport_id = uuid::Uuid::new_v4().simple().to_string();
        let entry = Arc::new(Entry {
            session: session.to_owned(),
            channel: channel.to_owned(),
            direction,
            transport: Arc::new(transport),
            addr,
            ssrc,
            sink,
            role: Mutex::new(Role::None),
        });
        let mut registry = self.registry();
        registry.transports.insert(transport_id.clone(), entry);
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

    fn entry(
        &self,
        transport_id: &str,
        session: &str,
    ) -> Result<Arc<Entry<E::Transport>>, NodeError> {
        let registry = self.registry();
        registry
            .transports
            .get(transport_id)
            // Another session's transport is as good as absent.
            .filter(|e| e.session == session)
            .cloned()
            .ok_or(NodeError::NotFound("transport"))
    }

    pub async fn apply_answer(
        &self,
        transport_id: &str,
        session: &str,
        sdp: String,
    ) -> Result<(), NodeError> {
        let entry = self.entry(transport_id, session)?;
        entry.transport.apply_answer(sdp).await?;
        Ok(())
    }

    pub async fn add_candidate(
        &self,
        transport_id: &str,
        session: &str,
        candidate: Candidate,
    ) -> Result<(), NodeError> {
        let entry = self.entry(transport_id, session)?;
        entry.transport.add_candidate(candidate).await?;
        Ok(())
    }

    pub async fn produce(
        &self,
        transport_id: &str,
        session: &str,
        channel: &str,
    ) -> Result<String, NodeError> {
        let entry = self.entry(transport_id, session)?;
        if entry.direction != Direction::Send || entry.channel != channel {
            return Err(NodeError::FailedPrecondition(
                "not a send transport of this channel",
            ));
        }
        let producer = {
            let mut role = entry.role();
            match &*role {
                Role::Producer(id) => return Ok(id.clone()),
                Role::Consumer(_) => {
                    return Err(NodeError::FailedPrecondition("transport already consumes"));
                }
                Role::None => {}
            }
            let id = uuid::Uuid::new_v4().simple().to_string();
            *role = Role::Producer(id.clone());
            id
        };
        self.pool
            .send(
                channel,
                Command::AddProducer {
                    channel: channel.to_owned(),
                    producer: producer.clone(),
                    session: session.to_owned(),
                },
            )
            .await;
        *entry
            .sink
            .target
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((
            self.pool.clone(),
            Arc::from(channel),
            Arc::from(producer.as_str()),
        ));
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
        let entry = self.entry(transport_id, session)?;
        if entry.direction != Direction::Recv || entry.channel != channel {
            return Err(NodeError::FailedPrecondition(
                "not a receive transport of this channel",
            ));
        }
        let consumer = {
            let mut role = entry.role();
            match &*role {
                Role::Consumer(id) => return Ok((id.clone(), entry.ssrc)),
                Role::Producer(_) => {
                    return Err(NodeError::FailedPrecondition("transport already produces"));
                }
                Role::None => {}
            }
            let id = uuid::Uuid::new_v4().simple().to_string();
            *role = Role::Consumer(id.clone());
            id
        };
        let payload_type = entry.transport.payload_type().await;
        let sink = TransportSink {
            transport: Arc::clone(&entry.transport),
            refused: Arc::clone(&self.write_errors),
        };
        let listener = Listener {
            session: session.to_owned(),
            rewriter: Rewriter::new(entry.ssrc, payload_type),
            out: Arc::new(sink),
        };
        self.pool
            .send(
                channel,
                Command::AddListener {
                    channel: channel.to_owned(),
                    consumer: consumer.clone(),
                    listener,
                },
            )
            .await;
        Ok((consumer, entry.ssrc))
    }

    /// Names the producer to forward (or nobody), fenced by epoch. `expires_at_ms` is wall-clock
    /// time; 0 means no expiry.
    pub async fn set_floor(
        &self,
        channel: &str,
        producer: Option<String>,
        epoch: u64,
        expires_at_ms: i64,
        only_newer: bool,
    ) -> FloorApplied {
        let expires_at = (expires_at_ms > 0).then(|| {
            let left = expires_at_ms.saturating_sub(wall_ms()).max(0);
            Instant::now() + Duration::from_millis(u64::try_from(left).unwrap_or(0))
        });
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
            .find_map(|e| match &*e.role() {
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
            let entry = registry
                .transports
                .get(transport_id)
                .filter(|e| e.session == session)
                .cloned()
                .ok_or(NodeError::NotFound("transport"))?;
            registry.transports.remove(transport_id);
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
        *entry
            .sink
            .target
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        let role = entry.role().clone();
        match role {
            Role::Producer(producer) => {
                self.pool
                    .send(
                        &entry.channel,
                        Command::RemoveProducer {
                            channel: entry.channel.clone(),
                            producer,
                        },
                    )
                    .await;
            }
            Role::Consumer(consumer) => {
                self.pool
                    .send(
                        &entry.channel,
                        Command::RemoveListener {
                            channel: entry.channel.clone(),
                            consumer,
                        },
                    )
                    .await;
            }
            Role::None => {}
        }
        entry.transport.close().await;
        self.ports.release(entry.addr);
        tracing::debug!(%transport_id, "transport closed");
        Ok(())
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

    pub async fn stats(&self) -> NodeStats {
        let (transports, unrouted) = {
            let registry = self.registry();
            let unrouted = registry
                .transports
                .values()
                .map(|e| e.sink.unrouted.load(Ordering::Relaxed))
                .sum();
            (
                u32::try_from(registry.transports.len()).unwrap_or(u32::MAX),
                unrouted,
            )
        };
        NodeStats {
            transports,
            pool: self.pool.stats().await,
            dropped_busy: self.pool.dropped_busy(),
            unrouted,
            write_errors: self.write_errors.load(Ordering::Relaxed),
        }
    }
}

/// Feeds one listener's transport straight from the router: the transport's own bounded send
/// queue is the listener's queue, so no task sits between them and a full queue drops only
/// this listener's packet.
struct TransportSink<T> {
    transport: Arc<T>,
    refused: Arc<AtomicU64>,
}

impl<T: Transport> ListenerSink for TransportSink<T> {
    fn try_send(&self, packet: rtp::Packet) -> bool {
        let queued = self.transport.try_write_rtp(packet);
        if !queued {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        queued
    }
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn wall_ms() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

//! The worker pool. Each channel lives on exactly one worker, chosen by hashing its id, and that
//! worker owns everything of the channel: the router and the sans-IO peer connections of its
//! speakers and listeners. Forwarding a packet is therefore a loop inside one task: decrypt from
//! the speaker's peer, route, rewrite, encrypt into each listener's peer and hand the datagram
//! to that listener's socket with a non-blocking send. Nothing waits for a listener: a socket
//! whose send buffer is full loses that packet (counted) and the loop moves on.
//!
//! Everything else reaches a worker as a message on its bounded queue. Datagrams are read by one
//! small task per socket and queued to the worker (the only per-peer task; inbound traffic of a
//! listener is a few RTCP and STUN packets a second).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::engine::{Candidate, Engine, EngineError, Peer, PeerSpec, PeerState};
use crate::router::{Floor, FloorApplied, Listener, Rewriter, Router, RouterStats};

/// Control messages a worker may have queued.
pub const WORKER_QUEUE: usize = 4096;
/// Datagrams a worker may have queued from its sockets.
pub const INBOUND_QUEUE: usize = 8192;
/// Largest datagram read.
const MAX_DATAGRAM: usize = 2048;

pub type Reply<T> = oneshot::Sender<T>;

#[derive(Debug)]
pub enum Command {
    CreatePeer {
        key: u64,
        spec: PeerSpec,
        local: SocketAddr,
        announced: Option<IpAddr>,
        reply: Reply<Result<String, EngineError>>,
    },
    Answer { key: u64, sdp: String, reply: Reply<Result<(), EngineError>> },
    AddCandidate { key: u64, candidate: Candidate, reply: Reply<Result<(), EngineError>> },
    Produce { key: u64, channel: String, producer: String, session: String, reply: Reply<()> },
    Consume { key: u64, channel: String, consumer: String, session: String, ssrc: u32, reply: Reply<()> },
    ClosePeer { key: u64, channel: String, producer: Option<String>, consumer: Option<String>, reply: Reply<()> },
    SetFloor { channel: String, floor: Floor, only_newer: bool, reply: Reply<FloorApplied> },
    Stats { reply: Reply<PoolStats> },
}

/// Totals over the routers and peers of one worker (or the whole pool).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub channels: u32,
    pub producers: u32,
    pub consumers: u32,
    pub peers: u32,
    pub router: RouterStats,
    /// Datagrams a full socket send buffer refused.
    pub send_dropped: u64,
}

impl PoolStats {
    fn add(&mut self, o: &PoolStats) {
        self.channels += o.channels;
        self.producers += o.producers;
        self.consumers += o.consumers;
        self.peers += o.peers;
        self.router.forwarded += o.router.forwarded;
        self.router.dropped_not_floor += o.router.dropped_not_floor;
        self.router.dropped_slow_listener += o.router.dropped_slow_listener;
        self.send_dropped += o.send_dropped;
    }
}

#[derive(Debug, Clone)]
pub struct WorkerPool {
    workers: Arc<[mpsc::Sender<Command>]>,
    hasher: RandomState,
}

impl WorkerPool {
    /// Starts `count` workers (at least one) on the current runtime.
    pub fn start<E: Engine>(count: usize, engine: Arc<E>) -> Self {
        let workers: Vec<_> = (0..count.max(1))
            .map(|index| {
                let (tx, rx) = mpsc::channel(WORKER_QUEUE);
                let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
                let worker = Worker {
                    engine: Arc::clone(&engine),
                    routers: HashMap::new(),
                    epochs: HashMap::new(),
                    retired: RouterStats::default(),
                    peers: HashMap::new(),
                    timers: BinaryHeap::new(),
                    inbound_tx,
                    send_dropped: 0,
                };
                tokio::spawn(worker.run(index, rx, inbound_rx));
                tx
            })
            .collect();
        Self { workers: workers.into(), hasher: RandomState::new() }
    }

    fn worker(&self, channel: &str) -> &mpsc::Sender<Command> {
        let index = self.hasher.hash_one(channel) as usize % self.workers.len();
        &self.workers[index]
    }

    /// Sends a command to the channel's worker and waits for its reply. `None` only if the
    /// worker has stopped (the runtime is shutting down).
    pub async fn request<T>(&self, channel: &str, make: impl FnOnce(Reply<T>) -> Command) -> Option<T> {
        let (reply, rx) = oneshot::channel();
        self.worker(channel).send(make(reply)).await.ok()?;
        rx.await.ok()
    }

    pub async fn set_floor(&self, channel: &str, floor: Floor, only_newer: bool) -> FloorApplied {
        self.request(channel, |reply| Command::SetFloor { channel: channel.to_owned(), floor, only_newer, reply })
            .await
            .unwrap_or(FloorApplied { applied: false, current_epoch: 0 })
    }

    pub async fn stats(&self) -> PoolStats {
        let mut total = PoolStats::default();
        for worker in self.workers.iter() {
            let (reply, rx) = oneshot::channel();
            if worker.send(Command::Stats { reply }).await.is_ok()
                && let Ok(stats) = rx.await
            {
                total.add(&stats);
            }
        }
        total
    }
}

struct Datagram {
    key: u64,
    data: BytesMut,
    from: SocketAddr,
    at: Instant,
}

struct Slot<P> {
    peer: P,
    socket: Arc<UdpSocket>,
    reader: JoinHandle<()>,
    channel: String,
    /// Set once the peer produces.
    producer: Option<String>,
    /// The earliest timer entry pending for this peer.
    deadline: Option<Instant>,
}

struct Worker<E: Engine> {
    engine: Arc<E>,
    routers: HashMap<String, Router>,
    /// Highest epoch of channels whose router was dropped, so a stale decision stays stale.
    epochs: HashMap<String, u64>,
    /// Counters of routers already dropped.
    retired: RouterStats,
    peers: HashMap<u64, Slot<E::Peer>>,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    inbound_tx: mpsc::Sender<Datagram>,
    send_dropped: u64,
}

/// Sends what the peer has queued; false when the socket refused a datagram.
fn flush<P: Peer>(slot: &mut Slot<P>, send_dropped: &mut u64) -> bool {
    let mut all_sent = true;
    while let Some((data, to)) = slot.peer.poll_datagram() {
        if slot.socket.try_send_to(&data, to).is_err() {
            *send_dropped += 1;
            all_sent = false;
        }
    }
    all_sent
}

/// Arms the peer's next timer if it is earlier than the one pending.
fn schedule<P: Peer>(key: u64, slot: &mut Slot<P>, timers: &mut BinaryHeap<Reverse<(Instant, u64)>>) {
    if let Some(at) = slot.peer.poll_timeout()
        && slot.deadline.is_none_or(|pending| at < pending)
    {
        slot.deadline = Some(at);
        timers.push(Reverse((at, key)));
    }
}

impl<E: Engine> Worker<E> {
    async fn run(mut self, index: usize, mut commands: mpsc::Receiver<Command>, mut inbound: mpsc::Receiver<Datagram>) {
        tracing::debug!(worker = index, "media worker started");
        loop {
            let next = self.timers.peek().map(|Reverse((at, _))| *at);
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.handle(cmd),
                    None => break,
                },
                Some(datagram) = inbound.recv() => self.on_datagram(datagram),
                () = sleep => self.on_timers(Instant::now()),
            }
        }
        for (_, slot) in self.peers.drain() {
            slot.reader.abort();
        }
    }

    fn on_datagram(&mut self, d: Datagram) {
        let Some(slot) = self.peers.get_mut(&d.key) else { return };
        slot.peer.handle_datagram(d.data, d.from, d.at);
        self.after_input(d.key, d.at);
    }

    fn on_timers(&mut self, now: Instant) {
        while let Some(Reverse((at, key))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(slot) = self.peers.get_mut(&key) else { continue };
            if slot.deadline != Some(at) {
                continue;
            }
            slot.deadline = None;
            slot.peer.handle_timeout(now);
            self.after_input(key, now);
        }
    }

    /// After a peer took input: send its datagrams, route the RTP it decrypted, note state
    /// changes, re-arm its timer.
    fn after_input(&mut self, key: u64, now: Instant) {
        let Worker { routers, peers, timers, send_dropped, .. } = self;
        let Some(slot) = peers.get_mut(&key) else { return };
        flush(slot, send_dropped);
        while let Some(state) = slot.peer.poll_state() {
            match state {
                PeerState::Connected => tracing::debug!(peer = key, "peer connected"),
                PeerState::Failed | PeerState::Closed => tracing::info!(peer = key, ?state, "peer connection ended"),
            }
        }
        let mut packets = Vec::new();
        while let Some(packet) = slot.peer.poll_rtp() {
            packets.push(packet);
        }
        schedule(key, slot, timers);
        if packets.is_empty() {
            return;
        }
        let (Some(producer), channel) = (slot.producer.clone(), slot.channel.clone()) else { return };
        let Some(router) = routers.get_mut(&channel) else { return };
        let mut touched: Vec<u64> = Vec::new();
        for packet in &packets {
            let mut deliver = |peer: u64, out: rtc::rtp::Packet| -> bool {
                let Some(listener) = peers.get_mut(&peer) else { return false };
                if !listener.peer.write_rtp(out, now) {
                    return false;
                }
                touched.push(peer);
                flush(listener, send_dropped)
            };
            router.on_packet(&producer, packet, now, &mut deliver);
        }
        for peer in touched {
            if let Some(listener) = peers.get_mut(&peer) {
                schedule(peer, listener, timers);
            }
        }
    }

    fn router(&mut self, channel: &str) -> &mut Router {
        if !self.routers.contains_key(channel) {
            let mut router = Router::new();
            if let Some(epoch) = self.epochs.remove(channel) {
                router.set_floor(Floor { epoch, producer: None, expires_at: None });
            }
            self.routers.insert(channel.to_owned(), router);
        }
        // Invariant: inserted just above when missing.
        #[allow(clippy::expect_used)]
        self.routers.get_mut(channel).expect("router present")
    }

    fn retire_if_empty(&mut self, channel: &str) {
        if self.routers.get(channel).is_some_and(Router::is_empty)
            && let Some(router) = self.routers.remove(channel)
        {
            self.epochs.insert(channel.to_owned(), router.floor().epoch);
            let s = router.stats();
            self.retired.forwarded += s.forwarded;
            self.retired.dropped_not_floor += s.dropped_not_floor;
            self.retired.dropped_slow_listener += s.dropped_slow_listener;
        }
    }

    fn create_peer(&mut self, key: u64, spec: PeerSpec, local: SocketAddr, announced: Option<IpAddr>, channel: String) -> Result<String, EngineError> {
        let std_socket = std::net::UdpSocket::bind(local).map_err(|e| EngineError::Setup(format!("bind {local}: {e}")))?;
        std_socket.set_nonblocking(true).map_err(|e| EngineError::Setup(e.to_string()))?;
        let bound = std_socket.local_addr().map_err(|e| EngineError::Setup(e.to_string()))?;
        let socket = Arc::new(UdpSocket::from_std(std_socket).map_err(|e| EngineError::Setup(e.to_string()))?);
        let peer = self.engine.create(spec, bound, announced, Instant::now())?;
        let offer = peer.offer().to_owned();
        let reader = tokio::spawn(read_loop(key, Arc::clone(&socket), self.inbound_tx.clone()));
        let mut slot = Slot { peer, socket, reader, channel, producer: None, deadline: None };
        schedule(key, &mut slot, &mut self.timers);
        self.peers.insert(key, slot);
        Ok(offer)
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::CreatePeer { key, spec, local, announced, reply } => {
                // The channel is learned when the peer produces or consumes; until then the
                // peer only negotiates.
                let _ = reply.send(self.create_peer(key, spec, local, announced, String::new()));
            }
            Command::Answer { key, sdp, reply } => {
                let result = match self.peers.get_mut(&key) {
                    Some(slot) => slot.peer.apply_answer(sdp, Instant::now()),
                    None => Err(EngineError::BadDescription),
                };
                self.after_input(key, Instant::now());
                let _ = reply.send(result);
            }
            Command::AddCandidate { key, candidate, reply } => {
                let result = match self.peers.get_mut(&key) {
                    Some(slot) => slot.peer.add_candidate(candidate),
                    None => Err(EngineError::BadCandidate),
                };
                self.after_input(key, Instant::now());
                let _ = reply.send(result);
            }
            Command::Produce { key, channel, producer, session, reply } => {
                if let Some(slot) = self.peers.get_mut(&key) {
                    slot.channel.clone_from(&channel);
                    slot.producer = Some(producer.clone());
                }
                self.router(&channel).add_producer(producer, session);
                let _ = reply.send(());
            }
            Command::Consume { key, channel, consumer, session, ssrc, reply } => {
                let payload_type = match self.peers.get_mut(&key) {
                    Some(slot) => {
                        slot.channel.clone_from(&channel);
                        slot.peer.payload_type()
                    }
                    None => crate::engine::OPUS_PAYLOAD_TYPE,
                };
                let listener = Listener { session, rewriter: Rewriter::new(ssrc, payload_type), peer: key };
                self.router(&channel).add_listener(consumer, listener);
                let _ = reply.send(());
            }
            Command::ClosePeer { key, channel, producer, consumer, reply } => {
                if let Some(mut slot) = self.peers.remove(&key) {
                    slot.reader.abort();
                    slot.peer.close();
                    flush(&mut slot, &mut self.send_dropped);
                }
                if let Some(router) = self.routers.get_mut(&channel) {
                    if let Some(p) = producer {
                        router.remove_producer(&p);
                    }
                    if let Some(c) = consumer {
                        router.remove_listener(&c);
                    }
                }
                self.retire_if_empty(&channel);
                let _ = reply.send(());
            }
            Command::SetFloor { channel, floor, only_newer, reply } => {
                let router = self.router(&channel);
                let applied = if only_newer && floor.epoch <= router.floor().epoch {
                    FloorApplied { applied: false, current_epoch: router.floor().epoch }
                } else {
                    router.set_floor(floor)
                };
                self.retire_if_empty(&channel);
                let _ = reply.send(applied);
            }
            Command::Stats { reply } => {
                let mut stats = PoolStats {
                    router: self.retired,
                    peers: u32::try_from(self.peers.len()).unwrap_or(u32::MAX),
                    send_dropped: self.send_dropped,
                    ..Default::default()
                };
                for router in self.routers.values() {
                    let s = router.stats();
                    stats.channels += 1;
                    stats.producers += u32::try_from(router.producer_count()).unwrap_or(u32::MAX);
                    stats.consumers += u32::try_from(router.listener_count()).unwrap_or(u32::MAX);
                    stats.router.forwarded += s.forwarded;
                    stats.router.dropped_not_floor += s.dropped_not_floor;
                    stats.router.dropped_slow_listener += s.dropped_slow_listener;
                }
                let _ = reply.send(stats);
            }
        }
    }
}

/// Reads one peer's socket into the worker's inbound queue.
async fn read_loop(key: u64, socket: Arc<UdpSocket>, inbound: mpsc::Sender<Datagram>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((n, from)) => {
                let datagram = Datagram { key, data: BytesMut::from(&buf[..n]), from, at: Instant::now() };
                if inbound.send(datagram).await.is_err() {
                    return;
                }
            }
            // Unconnected UDP sockets report little; a transient error must not end the reader.
            Err(error) => {
                tracing::trace!(peer = key, %error, "socket read");
                tokio::task::yield_now().await;
            }
        }
    }
}

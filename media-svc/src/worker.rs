//! The worker pool: one worker per core, each a thread with its own event loop owning its share
//! of the node.
//!
//! - A channel's **router** lives on exactly one worker (chosen by hashing the channel id).
//! - **Peer connections** are spread over all workers (by their key), so the expensive part of
//!   forwarding, encrypting and sending one copy per listener, runs on every core.
//!
//! A packet from a speaker is decrypted by the worker owning the speaker's peer, handed to the
//! channel's worker, routed and rewritten there, and handed in one batch per worker to the
//! workers owning the listeners' peers, which encrypt and send each copy with a non-blocking
//! UDP send. Nothing waits for a listener: a full socket buffer or a full worker queue loses
//! that copy (counted). Everything reaches a worker as a message on its bounded queue;
//! datagrams are read by one small task per socket.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use hdrhistogram::Histogram;
use rtc::rtp;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::engine::{Candidate, Engine, EngineError, Peer, PeerSpec, PeerState};
use crate::router::{Floor, FloorApplied, Listener, Router, RouterStats};

/// Messages a worker may have queued.
pub const WORKER_QUEUE: usize = 8192;
/// Datagrams a worker may have queued from its sockets.
pub const INBOUND_QUEUE: usize = 8192;
/// Largest datagram read.
const MAX_DATAGRAM: usize = 2048;
/// A copy still unsent this long after its packet arrived is dropped: late audio is useless to
/// a listener's jitter buffer, and shedding it keeps an overloaded node from building delay.
pub const MAX_FORWARD_AGE: std::time::Duration = std::time::Duration::from_millis(200);

pub type Reply<T> = oneshot::Sender<T>;

#[derive(Debug)]
pub enum Command {
    // Handled by the worker owning the peer.
    CreatePeer {
        key: u64,
        spec: PeerSpec,
        local: SocketAddr,
        announced: Option<IpAddr>,
        reply: Reply<Result<String, EngineError>>,
    },
    Answer {
        key: u64,
        sdp: String,
        reply: Reply<Result<(), EngineError>>,
    },
    AddCandidate {
        key: u64,
        candidate: Candidate,
        reply: Reply<Result<(), EngineError>>,
    },
    PayloadType {
        key: u64,
        reply: Reply<u8>,
    },
    /// Where the peer's incoming RTP goes: (channel, producer).
    Route {
        key: u64,
        route: (String, String),
        reply: Reply<()>,
    },
    ClosePeer {
        key: u64,
        reply: Reply<()>,
    },
    Deliver {
        batch: Vec<(u64, rtp::Packet)>,
        at: Instant,
    },
    // Handled by the worker owning the channel's router.
    AddProducer {
        channel: String,
        producer: String,
        session: String,
        reply: Reply<()>,
    },
    AddListener {
        channel: String,
        consumer: String,
        listener: Listener,
        reply: Reply<()>,
    },
    RemoveProducer {
        channel: String,
        producer: String,
        reply: Reply<()>,
    },
    RemoveListener {
        channel: String,
        consumer: String,
        reply: Reply<()>,
    },
    Packet {
        channel: String,
        producer: String,
        packet: rtp::Packet,
        at: Instant,
    },
    SetFloor {
        channel: String,
        floor: Floor,
        only_newer: bool,
        reply: Reply<FloorApplied>,
    },
    Stats {
        reset_latency: bool,
        reply: Reply<PoolStats>,
    },
}

/// Totals over the routers and peers of one worker (or the whole pool).
#[derive(Debug, Clone, Default)]
pub struct PoolStats {
    pub channels: u32,
    pub producers: u32,
    pub consumers: u32,
    pub peers: u32,
    pub router: RouterStats,
    /// Copies lost to a full socket send buffer, a full worker queue, or lateness.
    pub send_dropped: u64,
    /// Microseconds from a speaker's packet arriving to each copy's send.
    pub forward_latency: Option<Histogram<u64>>,
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
        if let Some(h) = &o.forward_latency {
            match &mut self.forward_latency {
                Some(total) => {
                    let _ = total.add(h);
                }
                None => self.forward_latency = Some(h.clone()),
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct WorkerPool {
    workers: Arc<[mpsc::Sender<Command>]>,
    hasher: RandomState,
    stop: CancellationToken,
}

impl WorkerPool {
    /// Starts `count` workers (at least one) on the current runtime.
    pub fn start<E: Engine>(count: usize, engine: Arc<E>) -> Self {
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..count.max(1))
            .map(|_| mpsc::channel(WORKER_QUEUE))
            .unzip();
        let pool = Self {
            workers: senders.into(),
            hasher: RandomState::new(),
            stop: CancellationToken::new(),
        };
        for (index, rx) in receivers.into_iter().enumerate() {
            let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
            let worker = Worker {
                index,
                pool: pool.clone(),
                engine: Arc::clone(&engine),
                routers: HashMap::new(),
                epochs: HashMap::new(),
                retired: RouterStats::default(),
                peers: HashMap::new(),
                timers: BinaryHeap::new(),
                inbound_tx,
                send_dropped: 0,
                latency: new_histogram(),
            };
            // A thread of its own per worker, with its own event loop that also reads its
            // peers' sockets (as mediasoup runs a process per worker). As tasks of one shared
            // runtime, a batch one worker handed another was run on the *same* thread after
            // the sender's own share (the runtime runs a task woken by a running task next, on
            // its thread), so a packet's copies went out one worker after the other.
            let spawned = std::thread::Builder::new()
                .name(format!("media-worker-{index}"))
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime.block_on(worker.run(rx, inbound_rx)),
                        Err(error) => {
                            tracing::error!(worker = index, %error, "media worker could not start")
                        }
                    }
                });
            if let Err(error) = spawned {
                tracing::error!(worker = index, %error, "media worker thread could not start");
            }
        }
        pool
    }

    fn channel_worker(&self, channel: &str) -> usize {
        self.hasher.hash_one(channel) as usize % self.workers.len()
    }

    fn peer_worker(&self, key: u64) -> usize {
        (key % self.workers.len() as u64) as usize
    }

    async fn request_at<T>(
        &self,
        index: usize,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> Option<T> {
        let (reply, rx) = oneshot::channel();
        self.workers[index].send(make(reply)).await.ok()?;
        rx.await.ok()
    }

    /// Asks the worker owning `channel`'s router; `None` only when the pool has stopped.
    pub async fn request<T>(
        &self,
        channel: &str,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> Option<T> {
        self.request_at(self.channel_worker(channel), make).await
    }

    /// Asks the worker owning peer `key`.
    pub async fn request_peer<T>(
        &self,
        key: u64,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> Option<T> {
        self.request_at(self.peer_worker(key), make).await
    }

    pub async fn set_floor(&self, channel: &str, floor: Floor, only_newer: bool) -> FloorApplied {
        self.request(channel, |reply| Command::SetFloor {
            channel: channel.to_owned(),
            floor,
            only_newer,
            reply,
        })
        .await
        .unwrap_or(FloorApplied {
            applied: false,
            current_epoch: 0,
        })
    }

    pub async fn stats(&self, reset_latency: bool) -> PoolStats {
        let mut total = PoolStats::default();
        for index in 0..self.workers.len() {
            if let Some(stats) = self
                .request_at(index, |reply| Command::Stats {
                    reset_latency,
                    reply,
                })
                .await
            {
                total.add(&stats);
            }
        }
        total
    }

    /// Stops every worker (their peers' sockets close).
    pub fn stop(&self) {
        self.stop.cancel();
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
    socket: Arc<AsyncFd<std::net::UdpSocket>>,
    reader: JoinHandle<()>,
    /// Where incoming RTP goes, once the peer produces: (channel, producer).
    route: Option<(String, String)>,
    /// The earliest timer entry pending for this peer.
    deadline: Option<Instant>,
}

struct Worker<E: Engine> {
    index: usize,
    pool: WorkerPool,
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
    latency: Histogram<u64>,
}

/// A histogram of microseconds, 1 µs to 10 s, 3 significant digits.
fn new_histogram() -> Histogram<u64> {
    // Invariant: constant, valid bounds.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, 10_000_000, 3).expect("valid histogram bounds")
}

/// Sends what the peer has queued; false when the socket refused a datagram.
fn flush<P: Peer>(slot: &mut Slot<P>, send_dropped: &mut u64) -> bool {
    let mut all_sent = true;
    while let Some((data, to)) = slot.peer.poll_datagram() {
        // A plain non-blocking send: the socket is registered for reading only (see
        // `create_peer`), and a full send buffer loses the copy rather than waiting.
        if slot.socket.get_ref().send_to(&data, to).is_err() {
            *send_dropped += 1;
            all_sent = false;
        }
    }
    all_sent
}

/// Arms the peer's next timer if it is earlier than the one pending.
fn schedule<P: Peer>(
    key: u64,
    slot: &mut Slot<P>,
    timers: &mut BinaryHeap<Reverse<(Instant, u64)>>,
) {
    if let Some(at) = slot.peer.poll_timeout()
        && slot.deadline.is_none_or(|pending| at < pending)
    {
        slot.deadline = Some(at);
        timers.push(Reverse((at, key)));
    }
}

/// Where copies go out and what their sending is measured into.
struct Out<'a, P> {
    peers: &'a mut HashMap<u64, Slot<P>>,
    send_dropped: &'a mut u64,
    latency: &'a mut Histogram<u64>,
}

/// Encrypts and sends one copy to a listener's peer; false if it could not go out. `at` is
/// when the speaker's packet arrived.
fn deliver_to<P: Peer>(out: &mut Out<'_, P>, key: u64, packet: rtp::Packet, at: Instant) -> bool {
    if at.elapsed() > MAX_FORWARD_AGE {
        *out.send_dropped += 1;
        return false;
    }
    let Some(slot) = out.peers.get_mut(&key) else {
        return false;
    };
    if !slot.peer.write_rtp(packet, Instant::now()) {
        return false;
    }
    // No timer to re-arm: a listener transport starts none by sending, and its consent and
    // DTLS timers stay armed from the last input.
    let sent = flush(slot, out.send_dropped);
    let micros = u64::try_from(at.elapsed().as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    out.latency.saturating_record(micros);
    sent
}

impl<E: Engine> Worker<E> {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut inbound: mpsc::Receiver<Datagram>,
    ) {
        tracing::debug!(worker = self.index, "media worker started");
        let stop = self.pool.stop.clone();
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
                () = stop.cancelled() => break,
                Some(cmd) = commands.recv() => self.handle(cmd),
                Some(datagram) = inbound.recv() => self.on_datagram(datagram),
                () = sleep => self.on_timers(Instant::now()),
            }
        }
        for (_, mut slot) in self.peers.drain() {
            slot.reader.abort();
            slot.peer.close();
        }
    }

    fn on_datagram(&mut self, d: Datagram) {
        let Some(slot) = self.peers.get_mut(&d.key) else {
            return;
        };
        slot.peer.handle_datagram(d.data, d.from, d.at);
        self.after_input(d.key, d.at);
    }

    fn on_timers(&mut self, now: Instant) {
        while let Some(Reverse((at, key))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(slot) = self.peers.get_mut(&key) else {
                continue;
            };
            if slot.deadline != Some(at) {
                continue;
            }
            slot.deadline = None;
            slot.peer.handle_timeout(now);
            self.after_input(key, now);
        }
    }

    /// After a peer took input: send its datagrams, note state changes, re-arm its timer and
    /// pass the RTP it decrypted to the channel's router.
    fn after_input(&mut self, key: u64, now: Instant) {
        let Some(slot) = self.peers.get_mut(&key) else {
            return;
        };
        flush(slot, &mut self.send_dropped);
        while let Some(state) = slot.peer.poll_state() {
            match state {
                PeerState::Connected => tracing::debug!(peer = key, "peer connected"),
                PeerState::Failed | PeerState::Closed => {
                    tracing::info!(peer = key, ?state, "peer connection ended")
                }
            }
        }
        let mut packets = Vec::new();
        while let Some(packet) = slot.peer.poll_rtp() {
            packets.push(packet);
        }
        schedule(key, slot, &mut self.timers);
        let Some((channel, producer)) = slot.route.clone() else {
            return;
        };
        let router_worker = self.pool.channel_worker(&channel);
        for packet in packets {
            if router_worker == self.index {
                self.route(&channel, &producer, &packet, now);
            } else {
                let cmd = Command::Packet {
                    channel: channel.clone(),
                    producer: producer.clone(),
                    packet,
                    at: now,
                };
                if self.pool.workers[router_worker].try_send(cmd).is_err() {
                    self.send_dropped += 1;
                }
            }
        }
    }

    /// Routes one packet of `channel`: copies for listeners on this worker go out at once, the
    /// others in one batch per worker.
    fn route(&mut self, channel: &str, producer: &str, packet: &rtp::Packet, at: Instant) {
        let Worker {
            index,
            pool,
            routers,
            peers,
            send_dropped,
            latency,
            ..
        } = self;
        let Some(router) = routers.get_mut(channel) else {
            return;
        };
        // Every copy is rewritten first, and the other workers get their batches before this
        // one sends its own share, so all workers encrypt and send at the same time: the last
        // copy leaves after 1/workers of the fan-out, not after all of this worker's share.
        let mut batches: Vec<Vec<(u64, rtp::Packet)>> =
            (0..pool.workers.len()).map(|_| Vec::new()).collect();
        router.on_packet(producer, packet, at, &mut |peer, out| {
            batches[pool.peer_worker(peer)].push((peer, out));
            true
        });
        let own = std::mem::take(&mut batches[*index]);
        for (owner, batch) in batches.into_iter().enumerate() {
            if batch.is_empty() {
                continue;
            }
            let lost = batch.len() as u64;
            if pool.workers[owner]
                .try_send(Command::Deliver { batch, at })
                .is_err()
            {
                *send_dropped += lost;
            }
        }
        let mut local = Out {
            peers,
            send_dropped,
            latency,
        };
        for (peer, out) in own {
            deliver_to(&mut local, peer, out, at);
        }
    }

    fn router(&mut self, channel: &str) -> &mut Router {
        if !self.routers.contains_key(channel) {
            let mut router = Router::new();
            if let Some(epoch) = self.epochs.remove(channel) {
                router.set_floor(Floor {
                    epoch,
                    producer: None,
                    expires_at: None,
                });
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

    fn create_peer(
        &mut self,
        key: u64,
        spec: PeerSpec,
        local: SocketAddr,
        announced: Option<IpAddr>,
    ) -> Result<String, EngineError> {
        let std_socket = std::net::UdpSocket::bind(local)
            .map_err(|e| EngineError::Setup(format!("bind {local}: {e}")))?;
        std_socket
            .set_nonblocking(true)
            .map_err(|e| EngineError::Setup(e.to_string()))?;
        let bound = std_socket
            .local_addr()
            .map_err(|e| EngineError::Setup(e.to_string()))?;
        // Registered for readability only: with write interest too, the kernel would queue an
        // epoll event (and the runtime a wake-up) each time a sent datagram is freed, one per
        // forwarded copy.
        // `with_interest` is deprecated because a type could change the descriptor its
        // `as_raw_fd` returns; a `std::net::UdpSocket` owns one descriptor for its whole life,
        // which is what the non-deprecated (`unsafe`) constructor asks the caller to promise.
        #[allow(deprecated)]
        let socket = Arc::new(
            AsyncFd::with_interest(std_socket, Interest::READABLE)
                .map_err(|e| EngineError::Setup(e.to_string()))?,
        );
        let peer = self.engine.create(spec, bound, announced, Instant::now())?;
        let offer = peer.offer().to_owned();
        let reader = tokio::spawn(read_loop(key, Arc::clone(&socket), self.inbound_tx.clone()));
        let mut slot = Slot {
            peer,
            socket,
            reader,
            route: None,
            deadline: None,
        };
        schedule(key, &mut slot, &mut self.timers);
        self.peers.insert(key, slot);
        Ok(offer)
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::CreatePeer {
                key,
                spec,
                local,
                announced,
                reply,
            } => {
                let _ = reply.send(self.create_peer(key, spec, local, announced));
            }
            Command::Answer { key, sdp, reply } => {
                let result = match self.peers.get_mut(&key) {
                    Some(slot) => slot.peer.apply_answer(sdp, Instant::now()),
                    None => Err(EngineError::BadDescription),
                };
                self.after_input(key, Instant::now());
                let _ = reply.send(result);
            }
            Command::AddCandidate {
                key,
                candidate,
                reply,
            } => {
                let result = match self.peers.get_mut(&key) {
                    Some(slot) => slot.peer.add_candidate(candidate),
                    None => Err(EngineError::BadCandidate),
                };
                self.after_input(key, Instant::now());
                let _ = reply.send(result);
            }
            Command::PayloadType { key, reply } => {
                let pt = self
                    .peers
                    .get_mut(&key)
                    .map_or(crate::engine::OPUS_PAYLOAD_TYPE, |s| s.peer.payload_type());
                let _ = reply.send(pt);
            }
            Command::Route { key, route, reply } => {
                if let Some(slot) = self.peers.get_mut(&key) {
                    slot.route = Some(route);
                }
                let _ = reply.send(());
            }
            Command::ClosePeer { key, reply } => {
                if let Some(mut slot) = self.peers.remove(&key) {
                    slot.reader.abort();
                    slot.peer.close();
                    flush(&mut slot, &mut self.send_dropped);
                }
                let _ = reply.send(());
            }
            Command::Deliver { batch, at } => {
                let Worker {
                    peers,
                    send_dropped,
                    latency,
                    ..
                } = self;
                let mut out = Out {
                    peers,
                    send_dropped,
                    latency,
                };
                for (peer, packet) in batch {
                    deliver_to(&mut out, peer, packet, at);
                }
            }
            Command::AddProducer {
                channel,
                producer,
                session,
                reply,
            } => {
                self.router(&channel).add_producer(producer, session);
                let _ = reply.send(());
            }
            Command::AddListener {
                channel,
                consumer,
                listener,
                reply,
            } => {
                self.router(&channel).add_listener(consumer, listener);
                let _ = reply.send(());
            }
            Command::RemoveProducer {
                channel,
                producer,
                reply,
            } => {
                if let Some(router) = self.routers.get_mut(&channel) {
                    router.remove_producer(&producer);
                }
                self.retire_if_empty(&channel);
                let _ = reply.send(());
            }
            Command::RemoveListener {
                channel,
                consumer,
                reply,
            } => {
                if let Some(router) = self.routers.get_mut(&channel) {
                    router.remove_listener(&consumer);
                }
                self.retire_if_empty(&channel);
                let _ = reply.send(());
            }
            Command::Packet {
                channel,
                producer,
                packet,
                at,
            } => {
                if at.elapsed() > MAX_FORWARD_AGE {
                    self.send_dropped += 1;
                } else {
                    self.route(&channel, &producer, &packet, at);
                }
            }
            Command::SetFloor {
                channel,
                floor,
                only_newer,
                reply,
            } => {
                let router = self.router(&channel);
                let applied = if only_newer && floor.epoch <= router.floor().epoch {
                    FloorApplied {
                        applied: false,
                        current_epoch: router.floor().epoch,
                    }
                } else {
                    router.set_floor(floor)
                };
                self.retire_if_empty(&channel);
                let _ = reply.send(applied);
            }
            Command::Stats {
                reset_latency,
                reply,
            } => {
                let mut stats = PoolStats {
                    router: self.retired,
                    peers: u32::try_from(self.peers.len()).unwrap_or(u32::MAX),
                    send_dropped: self.send_dropped,
                    forward_latency: Some(self.latency.clone()),
                    ..Default::default()
                };
                if reset_latency {
                    self.latency.reset();
                }
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

/// Reads one peer's socket into its worker's inbound queue.
async fn read_loop(
    key: u64,
    socket: Arc<AsyncFd<std::net::UdpSocket>>,
    inbound: mpsc::Sender<Datagram>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let read = match socket.readable().await {
            Ok(mut ready) => match ready.try_io(|s| s.get_ref().recv_from(&mut buf)) {
                Ok(read) => read,
                // Spurious readiness: wait again.
                Err(_would_block) => continue,
            },
            Err(error) => Err(error),
        };
        match read {
            Ok((n, from)) => {
                let datagram = Datagram {
                    key,
                    data: BytesMut::from(&buf[..n]),
                    from,
                    at: Instant::now(),
                };
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

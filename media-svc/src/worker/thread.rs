//! One worker: a thread with its own event loop, owning its share of the node's peers and the
//! routers of its channels. Everything reaches it as a message ([`Command`]) on its bounded
//! queue, datagrams on its inbound queue, and its peers' timers from one heap.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use hdrhistogram::Histogram;
use rtc::rtp;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::socket::{self, Datagram, PeerSocket};
use super::{Command, INBOUND_QUEUE, MAX_FORWARD_AGE, PoolStats, WorkerPool};
use crate::engine::{
    Candidate, Engine, EngineError, ListenerTransport, OPUS_PAYLOAD_TYPE, Peer, PeerSpec,
    PeerState, SpeakerTransport,
};
use crate::router::{Floor, FloorApplied, Router, RouterStats};

/// Answers a request; a requester that stopped waiting is no error.
fn respond<T>(reply: super::Reply<T>, value: T) {
    let _ = reply.send(value);
}

/// Starts worker `index` of `pool` on a thread of its own.
pub(super) fn spawn<E: Engine>(
    index: usize,
    pool: WorkerPool,
    engine: Arc<E>,
    commands: mpsc::Receiver<Command>,
) {
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
                Ok(runtime) => {
                    // A panic ends the worker and loses its peers and routers: the pool
                    // reports it, so the node stops taking work and says so (not a silent
                    // half-node whose calls to this worker all fail).
                    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        runtime.block_on(worker.run(commands, inbound_rx));
                    }));
                    if ran.is_err() {
                        tracing::error!(worker = index, "media worker panicked");
                        pool.failed.cancel();
                    }
                }
                Err(error) => {
                    tracing::error!(worker = index, %error, "media worker could not start");
                    pool.failed.cancel();
                }
            }
        });
    if let Err(error) = spawned {
        tracing::error!(worker = index, %error, "media worker thread could not start");
    }
}

struct Slot<S, L> {
    peer: Peer<S, L>,
    socket: PeerSocket,
    reader: JoinHandle<()>,
    /// Where incoming RTP goes, once the peer produces: (channel, producer).
    route: Option<(String, String)>,
    /// The earliest timer entry pending for this peer.
    deadline: Option<Instant>,
}

/// A worker's peers: the engine's two kinds of transport, each in its slot.
type Peers<E> = HashMap<u64, Slot<<E as Engine>::Speaker, <E as Engine>::Listener>>;

pub(super) struct Worker<E: Engine> {
    index: usize,
    pool: WorkerPool,
    engine: Arc<E>,
    routers: HashMap<String, Router>,
    /// Highest epoch of channels whose router was dropped, so a stale decision stays stale.
    epochs: HashMap<String, u64>,
    /// Counters of routers already dropped.
    retired: RouterStats,
    peers: Peers<E>,
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
fn flush<S: SpeakerTransport, L: ListenerTransport>(
    slot: &mut Slot<S, L>,
    send_dropped: &mut u64,
) -> bool {
    let mut all_sent = true;
    let transport = slot.peer.transport();
    while let Some((data, to)) = transport.poll_datagram() {
        if !socket::send(&slot.socket, &data, to) {
            *send_dropped += 1;
            all_sent = false;
        }
    }
    all_sent
}

/// Arms the peer's next timer if it is earlier than the one pending.
fn schedule<S: SpeakerTransport, L: ListenerTransport>(
    key: u64,
    slot: &mut Slot<S, L>,
    timers: &mut BinaryHeap<Reverse<(Instant, u64)>>,
) {
    if let Some(at) = slot.peer.transport().poll_timeout()
        && slot.deadline.is_none_or(|pending| at < pending)
    {
        slot.deadline = Some(at);
        timers.push(Reverse((at, key)));
    }
}

/// Where copies go out and what their sending is measured into.
struct Out<'a, S, L> {
    peers: &'a mut HashMap<u64, Slot<S, L>>,
    send_dropped: &'a mut u64,
    latency: &'a mut Histogram<u64>,
}

/// Encrypts and sends one copy to a listener's peer; false if it could not go out. `at` is
/// when the speaker's packet arrived.
fn deliver_to<S: SpeakerTransport, L: ListenerTransport>(
    out: &mut Out<'_, S, L>,
    key: u64,
    packet: &rtp::Packet,
    at: Instant,
) -> bool {
    if at.elapsed() > MAX_FORWARD_AGE {
        *out.send_dropped += 1;
        return false;
    }
    let Some(slot) = out.peers.get_mut(&key) else {
        return false;
    };
    let Peer::Listener(listener) = &mut slot.peer else {
        return false;
    };
    if !listener.write_rtp(packet) {
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
            slot.peer.transport().close();
        }
    }

    fn on_datagram(&mut self, d: Datagram) {
        let Some(slot) = self.peers.get_mut(&d.key) else {
            return;
        };
        slot.peer.transport().handle_datagram(d.data, d.from, d.at);
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
            slot.peer.transport().handle_timeout(now);
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
        while let Some(state) = slot.peer.transport().poll_state() {
            match state {
                PeerState::Connected => tracing::debug!(peer = key, "peer connected"),
                PeerState::Failed | PeerState::Closed => {
                    tracing::info!(peer = key, ?state, "peer connection ended")
                }
            }
            // The node closes the transport of a peer that ended, and stops counting a
            // connected one against the connect deadline.
            self.pool.peer_state(key, state);
        }
        let mut packets = Vec::new();
        if let Peer::Speaker(speaker) = &mut slot.peer {
            while let Some(packet) = speaker.poll_rtp() {
                packets.push(packet);
            }
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
            deliver_to(&mut local, peer, &out, at);
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
        let (socket, bound) = socket::bind(local)?;
        let peer = Peer::create(&*self.engine, spec, bound, announced, Instant::now())?;
        let offer = peer.offer().to_owned();
        let reader = tokio::spawn(socket::read_loop(
            key,
            Arc::clone(&socket),
            self.inbound_tx.clone(),
        ));
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

    fn answer(&mut self, key: u64, sdp: &str) -> Result<(), EngineError> {
        let now = Instant::now();
        let result = match self.peers.get_mut(&key) {
            Some(slot) => slot.peer.transport().apply_answer(sdp, now),
            None => Err(EngineError::BadDescription),
        };
        self.after_input(key, now);
        result
    }

    fn add_candidate(&mut self, key: u64, candidate: &Candidate) -> Result<(), EngineError> {
        let result = match self.peers.get_mut(&key) {
            Some(slot) => slot.peer.transport().add_candidate(candidate),
            None => Err(EngineError::BadCandidate),
        };
        self.after_input(key, Instant::now());
        result
    }

    fn payload_type(&self, key: u64) -> u8 {
        match self.peers.get(&key).map(|s| &s.peer) {
            Some(Peer::Listener(listener)) => listener.payload_type(),
            _ => OPUS_PAYLOAD_TYPE,
        }
    }

    fn set_route(&mut self, key: u64, route: (String, String)) {
        if let Some(slot) = self.peers.get_mut(&key) {
            slot.route = Some(route);
        }
    }

    fn close_peer(&mut self, key: u64) {
        if let Some(mut slot) = self.peers.remove(&key) {
            slot.reader.abort();
            slot.peer.transport().close();
            flush(&mut slot, &mut self.send_dropped);
        }
    }

    /// Sends a batch of copies another worker routed.
    fn deliver(&mut self, batch: Vec<(u64, rtp::Packet)>, at: Instant) {
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
            deliver_to(&mut out, peer, &packet, at);
        }
    }

    fn remove_producer(&mut self, channel: &str, producer: &str) {
        if let Some(router) = self.routers.get_mut(channel) {
            router.remove_producer(producer);
        }
        self.retire_if_empty(channel);
    }

    fn remove_listener(&mut self, channel: &str, consumer: &str) {
        if let Some(router) = self.routers.get_mut(channel) {
            router.remove_listener(consumer);
        }
        self.retire_if_empty(channel);
    }

    /// A packet another worker decrypted, for this worker's router of `channel`.
    fn on_packet(&mut self, channel: &str, producer: &str, packet: &rtp::Packet, at: Instant) {
        if at.elapsed() > MAX_FORWARD_AGE {
            self.send_dropped += 1;
        } else {
            self.route(channel, producer, packet, at);
        }
    }

    fn set_floor(&mut self, channel: &str, floor: Floor, only_newer: bool) -> FloorApplied {
        let router = self.router(channel);
        let applied = if only_newer && floor.epoch <= router.floor().epoch {
            FloorApplied {
                applied: false,
                current_epoch: router.floor().epoch,
            }
        } else {
            router.set_floor(floor)
        };
        self.retire_if_empty(channel);
        applied
    }

    fn stats(&mut self, reset_latency: bool) -> PoolStats {
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
        stats
    }

    /// The command table: each command handed to the method that carries it out.
    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::CreatePeer {
                key,
                spec,
                local,
                announced,
                reply,
            } => respond(reply, self.create_peer(key, spec, local, announced)),
            Command::Answer { key, sdp, reply } => respond(reply, self.answer(key, &sdp)),
            Command::AddCandidate {
                key,
                candidate,
                reply,
            } => respond(reply, self.add_candidate(key, &candidate)),
            Command::PayloadType { key, reply } => respond(reply, self.payload_type(key)),
            Command::Route { key, route, reply } => {
                self.set_route(key, route);
                respond(reply, ());
            }
            Command::ClosePeer { key, reply } => {
                self.close_peer(key);
                respond(reply, ());
            }
            Command::Deliver { batch, at } => self.deliver(batch, at),
            Command::AddProducer {
                channel,
                producer,
                session,
                reply,
            } => {
                self.router(&channel).add_producer(producer, session);
                respond(reply, ());
            }
            Command::AddListener {
                channel,
                consumer,
                listener,
                reply,
            } => {
                self.router(&channel).add_listener(consumer, listener);
                respond(reply, ());
            }
            Command::RemoveProducer {
                channel,
                producer,
                reply,
            } => {
                self.remove_producer(&channel, &producer);
                respond(reply, ());
            }
            Command::RemoveListener {
                channel,
                consumer,
                reply,
            } => {
                self.remove_listener(&channel, &consumer);
                respond(reply, ());
            }
            Command::Packet {
                channel,
                producer,
                packet,
                at,
            } => self.on_packet(&channel, &producer, &packet, at),
            Command::SetFloor {
                channel,
                floor,
                only_newer,
                reply,
            } => respond(reply, self.set_floor(&channel, floor, only_newer)),
            Command::Stats {
                reset_latency,
                reply,
            } => respond(reply, self.stats(reset_latency)),
        }
    }
}

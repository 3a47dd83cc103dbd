//! One worker: a thread with its own event loop, owning its share of the node's peers and the
//! routers of its channels, and its own socket on the node's shared UDP port. Everything
//! reaches it as a message ([`Command`]) on its bounded queue, datagrams from its socket or
//! (read by other workers for its peers) on its inbound queue, and its peers' timers from one
//! heap.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::UdpSocket;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use hdrhistogram::Histogram;
use rtc::rtp;
use tokio::io::Interest;
use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};
use tokio::sync::mpsc;

use super::net::{self, BATCH, Batch, Drop};
use super::{Command, Datagram, MAX_DATAGRAM, MAX_FORWARD_AGE, PoolStats, Route, WorkerPool};
use crate::engine::{
    Candidate, Engine, EngineError, ListenerTransport, OPUS_PAYLOAD_TYPE, Path, Peer, PeerSpec,
    PeerState, Proto, SpeakerTransport,
};
use crate::router::{Floor, FloorApplied, Rewritten, Router, RouterStats};

/// Datagrams read from the socket per wake-up, so a flood cannot starve the rest of the loop.
const READS_PER_WAKE: usize = 64;

/// The next connection on the worker's ICE/TCP listener; never, without one.
async fn accept(
    listener: Option<&tokio::net::TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// A worker's two queues.
pub(super) struct Queues {
    pub(super) commands: mpsc::Receiver<Command>,
    pub(super) inbound: mpsc::Receiver<Datagram>,
}

/// Answers a request; a requester that stopped waiting is no error.
fn respond<T>(reply: super::Reply<T>, value: T) {
    let _ = reply.send(value);
}

/// Starts worker `index` of `pool` on a thread of its own (pinned to `cpu`, if given),
/// serving `socket` (and accepting ICE/TCP connections on `tcp`).
pub(super) fn spawn<E: Engine>(
    index: usize,
    cpu: Option<usize>,
    pool: WorkerPool,
    engine: Arc<E>,
    queues: Queues,
    socket: UdpSocket,
    tcp: Option<std::net::TcpListener>,
) {
    // A thread of its own per worker, with its own event loop that also reads its
    // peers' sockets (as mediasoup runs a process per worker). As tasks of one shared
    // runtime, a batch one worker handed another was run on the *same* thread after
    // the sender's own share (the runtime runs a task woken by a running task next, on
    // its thread), so a packet's copies went out one worker after the other.
    let spawned = std::thread::Builder::new()
        .name(format!("media-worker-{index}"))
        .spawn(move || {
            if let Some(cpu) = cpu {
                pin(index, cpu);
            }
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => {
                    // A panic ends the worker and loses its peers and routers: the pool
                    // reports it, so the node stops taking work and says so (not a silent
                    // half-node whose calls to this worker all fail).
                    let worker_pool = pool.clone();
                    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        runtime.block_on(async move {
                            let registered = register(socket).and_then(|udp| {
                                let tcp = tcp.map(tokio::net::TcpListener::from_std).transpose()?;
                                Ok((udp, tcp))
                            });
                            match registered {
                                Ok((udp, tcp)) => {
                                    Worker::new(index, worker_pool, engine, udp)
                                        .run(queues, tcp)
                                        .await;
                                }
                                Err(error) => {
                                    tracing::error!(worker = index, %error, "media socket");
                                    worker_pool.failed.cancel();
                                }
                            }
                        });
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

/// Pins the calling thread (worker `index`) to `cpu`; a refusal leaves it where the scheduler
/// puts it.
fn pin(index: usize, cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    let pinned = set
        .set(cpu)
        .and_then(|()| nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set));
    if let Err(error) = pinned {
        tracing::warn!(worker = index, cpu, %error, "media worker not pinned to its CPU");
    }
}

/// Registers a worker's shared socket with its event loop, for reading only: with write
/// interest too, the kernel would queue an epoll event (and the runtime a wake-up) each time a
/// sent datagram is freed, one per forwarded copy.
fn register(socket: UdpSocket) -> std::io::Result<Arc<AsyncFd<UdpSocket>>> {
    // `with_interest` is deprecated because a type could change the descriptor its
    // `as_raw_fd` returns; a `std::net::UdpSocket` owns one descriptor for its whole life,
    // which is what the non-deprecated (`unsafe`) constructor asks the caller to promise.
    #[allow(deprecated)]
    AsyncFd::with_interest(socket, Interest::READABLE).map(Arc::new)
}

struct Slot<S, L> {
    peer: Peer<S, L>,
    /// Where incoming RTP goes, once the peer produces.
    route: Option<Route>,
    /// The SSRCs a speaker's answer declared; RTP with another is dropped before decryption.
    /// `None` when the answer declared none (then SRTP authentication alone decides).
    ssrcs: Option<Vec<u32>>,
    /// The earliest timer entry pending for this peer.
    deadline: Option<Instant>,
}

/// A worker's side of the shared ports: its UDP socket, the copies waiting to leave in a
/// batch, and (through the demultiplexer) the node's ICE/TCP connections.
struct Net {
    udp: Arc<AsyncFd<UdpSocket>>,
    demux: Arc<net::Demux>,
    batch: Batch,
    /// The arrival time of the speaker's packet whose copies are in `batch`.
    batch_at: Option<Instant>,
}

impl Net {
    /// Sends one datagram at once (ICE and DTLS replies, copies on TCP paths); false if it
    /// could not go out.
    fn send(&mut self, data: BytesMut, to: Path) -> bool {
        match to.proto {
            Proto::Udp => net::send_one(self.udp.get_ref(), &data, to.remote),
            Proto::Tcp => self.demux.send_tcp(data, to.remote),
        }
    }
}

/// Hashes peer keys: numbers the node hands out in sequence itself (never a client's choice),
/// so one multiplication spreads them over a table's buckets. SipHash, the default, was a
/// measurable part of a copy's cost (a lookup per copy).
#[derive(Debug, Default, Clone, Copy)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(self.0.rotate_left(8) ^ u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing: odd, so a bijection on every number of low bits.
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A map keyed by peer key.
type KeyMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<KeyHasher>>;

/// A worker's peers: the engine's two kinds of transport, each in a slot of its own. Boxed, so
/// the table stays dense (16 bytes an entry): with slots inline, a fan-out's lookup per copy
/// landed on a page of its own, and that miss was most of the copy's user-space time.
type Peers<E> = KeyMap<Box<Slot<<E as Engine>::Speaker, <E as Engine>::Listener>>>;

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
    net: Net,
    read_buf: Vec<u8>,
    send_dropped: u64,
    latency: Histogram<u64>,
}

/// A histogram of microseconds, 1 µs to 10 s, 3 significant digits.
fn new_histogram() -> Histogram<u64> {
    // Invariant: constant, valid bounds.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, 10_000_000, 3).expect("valid histogram bounds")
}

/// Sends what the peer has queued at once (ICE and DTLS replies).
fn flush<S: SpeakerTransport, L: ListenerTransport>(
    slot: &mut Slot<S, L>,
    net: &mut Net,
    send_dropped: &mut u64,
) {
    let transport = slot.peer.transport();
    while let Some((data, to)) = transport.poll_datagram() {
        if !net.send(data, to) {
            *send_dropped += 1;
        }
    }
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
    peers: &'a mut KeyMap<Box<Slot<S, L>>>,
    net: &'a mut Net,
    send_dropped: &'a mut u64,
    latency: &'a mut Histogram<u64>,
}

/// Copies whose listeners are looked up together before any is sealed: see [`deliver_all`].
const WARM_GROUP: usize = 8;

/// Seals and sends a worker's share of a packet's copies, then sends what is left in the
/// batch. A listener's state is not in cache 20 ms after the last packet, so each copy starts
/// with misses (its table entry, its transport, its key); looking up a group of listeners
/// first, with nothing depending on the loads, lets the processor wait for their misses at
/// once instead of one after the other.
fn deliver_all<S: SpeakerTransport, L: ListenerTransport>(
    out: &mut Out<'_, S, L>,
    copies: &[(u64, Rewritten)],
    payload: &[u8],
    at: Instant,
) {
    for group in copies.chunks(WARM_GROUP) {
        let mut warm = 0usize;
        for (key, _) in group {
            if let Some(slot) = out.peers.get(key)
                && let Peer::Listener(listener) = &slot.peer
            {
                warm ^= usize::from(listener.ready());
            }
        }
        std::hint::black_box(warm);
        for (key, header) in group {
            deliver_to(out, *key, header, payload, at);
        }
    }
    send_batch(out.net, out.send_dropped, out.latency);
}

/// Encrypts one copy (a listener's `header` and the shared `payload`) for a listener's peer
/// and queues it in the worker's batch, sending the batch when full. `at` is when the
/// speaker's packet arrived; copies of a packet older than [`MAX_FORWARD_AGE`] are dropped
/// (checked when a batch starts, not per copy: reading the clock is a measurable part of a
/// copy's cost).
fn deliver_to<S: SpeakerTransport, L: ListenerTransport>(
    out: &mut Out<'_, S, L>,
    key: u64,
    header: &Rewritten,
    payload: &[u8],
    at: Instant,
) {
    if out.net.batch.len() == 0 && at.elapsed() > MAX_FORWARD_AGE {
        *out.send_dropped += 1;
        return;
    }
    let Some(slot) = out.peers.get_mut(&key) else {
        return;
    };
    let Peer::Listener(listener) = &mut slot.peer else {
        return;
    };
    // Sealed in place in the batch. No timer to re-arm: a listener transport starts none by
    // sending, and its consent and DTLS timers stay armed from the last input.
    let Some((len, to)) = listener.seal_rtp(header, payload, out.net.batch.space()) else {
        return;
    };
    match to.proto {
        Proto::Udp => {
            out.net.batch.commit(len, to.remote);
            out.net.batch_at = Some(at);
            if out.net.batch.len() >= BATCH {
                send_batch(out.net, out.send_dropped, out.latency);
            }
        }
        Proto::Tcp => {
            let data = BytesMut::from(&out.net.batch.space()[..len]);
            if out.net.send(data, to) {
                record(out.latency, at, 1);
            } else {
                *out.send_dropped += 1;
            }
        }
    }
}

/// Sends the copies queued in the worker's batch, and measures when they left.
fn send_batch(net: &mut Net, send_dropped: &mut u64, latency: &mut Histogram<u64>) {
    let queued = net.batch.len();
    if queued == 0 {
        return;
    }
    let lost = net.batch.flush(net.udp.get_ref());
    *send_dropped += lost as u64;
    if let Some(at) = net.batch_at.take() {
        record(latency, at, (queued - lost) as u64);
    }
}

/// Records `count` copies sent now of a packet that arrived at `at`.
fn record(latency: &mut Histogram<u64>, at: Instant, count: u64) {
    let micros = u64::try_from(at.elapsed().as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    latency.saturating_record_n(micros, count);
}

/// The SSRC of an RTP (not RTCP) datagram (RFC 7983: first byte 128-191; RFC 5761: RTCP
/// packet types 192-223 in the second byte).
fn rtp_ssrc(data: &[u8]) -> Option<u32> {
    if data.len() < 12 || !(128..=191).contains(&data[0]) || (192..=223).contains(&data[1]) {
        return None;
    }
    Some(u32::from_be_bytes([data[8], data[9], data[10], data[11]]))
}

/// The SSRCs an SDP declares (`a=ssrc:<n> ...`), `None` when it declares none.
fn declared_ssrcs(sdp: &str) -> Option<Vec<u32>> {
    let mut ssrcs: Vec<u32> = sdp
        .lines()
        .filter_map(|l| l.strip_prefix("a=ssrc:"))
        .filter_map(|rest| rest.split(' ').next()?.trim().parse().ok())
        .collect();
    ssrcs.sort_unstable();
    ssrcs.dedup();
    (!ssrcs.is_empty()).then_some(ssrcs)
}

impl<E: Engine> Worker<E> {
    fn new(index: usize, pool: WorkerPool, engine: Arc<E>, udp: Arc<AsyncFd<UdpSocket>>) -> Self {
        let demux = Arc::clone(&pool.demux);
        Self {
            index,
            pool,
            engine,
            routers: HashMap::new(),
            epochs: HashMap::new(),
            retired: RouterStats::default(),
            peers: KeyMap::default(),
            timers: BinaryHeap::new(),
            net: Net {
                udp,
                demux,
                batch: Batch::new(),
                batch_at: None,
            },
            read_buf: vec![0u8; MAX_DATAGRAM],
            send_dropped: 0,
            latency: new_histogram(),
        }
    }

    async fn run(mut self, queues: Queues, tcp: Option<tokio::net::TcpListener>) {
        let Queues {
            mut commands,
            mut inbound,
        } = queues;
        tracing::debug!(worker = self.index, "media worker started");
        let stop = self.pool.stop.clone();
        let udp = Arc::clone(&self.net.udp);
        loop {
            let next = self.timers.peek().map(|Reverse((at, _))| *at);
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            // Timers before the socket: a flood of datagrams cannot hold back consent and
            // DTLS timers, and reads are capped per wake-up.
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                Some(cmd) = commands.recv() => self.handle(cmd),
                () = sleep => self.on_timers(Instant::now()),
                Some(datagram) = inbound.recv() => self.on_datagram(datagram),
                ready = udp.readable() => match ready {
                    Ok(mut guard) => self.read_udp(&mut guard),
                    Err(error) => {
                        tracing::warn!(worker = self.index, %error, "media socket");
                        tokio::task::yield_now().await;
                    }
                },
                accepted = accept(tcp.as_ref()) => match accepted {
                    Ok((stream, remote)) => self.serve_tcp(stream, remote),
                    Err(error) => {
                        // Out of descriptors, say: the listener stays; try again shortly.
                        tracing::warn!(worker = self.index, %error, "ICE/TCP accept");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
            }
        }
        for (key, mut slot) in self.peers.drain() {
            self.pool.demux.unregister(key);
            slot.peer.transport().close();
        }
    }

    /// Serves an accepted ICE/TCP connection on this worker's event loop; its frames go to the
    /// workers owning their transports.
    fn serve_tcp(&mut self, stream: tokio::net::TcpStream, remote: std::net::SocketAddr) {
        let pool = self.pool.clone();
        let demux = Arc::clone(&self.pool.demux);
        tokio::spawn(net::serve_tcp(
            stream,
            remote,
            demux,
            move |key, data, at| {
                let owner = pool.peer_worker(key);
                let datagram = Datagram {
                    key,
                    data,
                    from: Path::tcp(remote),
                    at,
                };
                if pool.inbound[owner].try_send(datagram).is_err() {
                    pool.demux.count(Drop::QueueFull);
                }
            },
        ));
    }

    /// Reads what the shared socket holds, up to [`READS_PER_WAKE`] datagrams.
    fn read_udp(&mut self, guard: &mut AsyncFdReadyGuard<'_, UdpSocket>) {
        for _ in 0..READS_PER_WAKE {
            let mut buf = std::mem::take(&mut self.read_buf);
            let read = guard.try_io(|socket| socket.get_ref().recv_from(&mut buf));
            let datagram = match read {
                Ok(Ok((n, from))) => Some((BytesMut::from(&buf[..n]), from)),
                // Unconnected UDP sockets report little; a transient error is no reason to stop.
                Ok(Err(error)) => {
                    tracing::trace!(%error, "media socket read");
                    None
                }
                Err(_would_block) => {
                    self.read_buf = buf;
                    return;
                }
            };
            self.read_buf = buf;
            if let Some((data, from)) = datagram {
                self.on_udp(data, from, Instant::now());
            }
        }
    }

    /// A datagram from the shared socket: to the transport its path leads to, or (from an
    /// unknown address) to the transport a valid check names, or dropped and counted.
    fn on_udp(&mut self, data: BytesMut, from: std::net::SocketAddr, at: Instant) {
        let path = Path::udp(from);
        let demux = &self.pool.demux;
        let key = match demux.lookup(&path) {
            Some(key) => key,
            None => match demux.admit(&data, path) {
                Ok(key) => {
                    tracing::debug!(peer = key, remote = %from, "path opened");
                    key
                }
                Err(cause) => {
                    tracing::trace!(remote = %from, ?cause, "datagram refused");
                    demux.count(cause);
                    return;
                }
            },
        };
        self.dispatch(Datagram {
            key,
            data,
            from: path,
            at,
        });
    }

    /// Hands a datagram to the worker owning its transport.
    fn dispatch(&mut self, datagram: Datagram) {
        let owner = self.pool.peer_worker(datagram.key);
        if owner == self.index {
            self.on_datagram(datagram);
        } else if self.pool.inbound[owner].try_send(datagram).is_err() {
            self.pool.demux.count(Drop::QueueFull);
        }
    }

    fn on_datagram(&mut self, d: Datagram) {
        let Some(slot) = self.peers.get_mut(&d.key) else {
            return;
        };
        if let Some(ssrc) = rtp_ssrc(&d.data) {
            match &slot.peer {
                // A listener sends no media; only its RTCP and checks matter.
                Peer::Listener(_) => return,
                Peer::Speaker(_) => {
                    if slot.ssrcs.as_ref().is_some_and(|s| !s.contains(&ssrc)) {
                        self.pool.demux.count(Drop::UnknownSsrc);
                        return;
                    }
                }
            }
        }
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
        flush(slot, &mut self.net, &mut self.send_dropped);
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
        let Some(route) = slot.route.clone() else {
            return;
        };
        let router_worker = self.pool.channel_worker(&route.channel);
        for packet in packets {
            if router_worker == self.index {
                self.route(&route.channel, &route.producer, &packet, now);
            } else {
                let cmd = Command::Packet {
                    route: route.clone(),
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
            net,
            send_dropped,
            latency,
            ..
        } = self;
        let Some(router) = routers.get_mut(channel) else {
            return;
        };
        // Every copy's header is rewritten first, and the other workers get their batches
        // before this one sends its own share, so all workers encrypt and send at the same
        // time: the last copy leaves after 1/workers of the fan-out, not after all of this
        // worker's share. A batch carries the payload once, shared, and a 16-byte header per
        // copy, so no per-copy reference count is touched by two cores.
        let mut batches: Vec<Vec<(u64, Rewritten)>> = (0..pool.workers.len())
            .map(|_| Vec::with_capacity(router.listener_count() / pool.workers.len() + 1))
            .collect();
        router.on_packet(producer, &packet.header, at, &mut |peer, out| {
            batches[pool.peer_worker(peer)].push((peer, out));
            true
        });
        let own = std::mem::take(&mut batches[*index]);
        for (owner, copies) in batches.into_iter().enumerate() {
            if copies.is_empty() {
                continue;
            }
            let lost = copies.len() as u64;
            let deliver = Command::Deliver {
                payload: packet.payload.clone(),
                copies,
                at,
            };
            if pool.workers[owner].try_send(deliver).is_err() {
                *send_dropped += lost;
            }
        }
        let mut local = Out {
            peers,
            net,
            send_dropped,
            latency,
        };
        deliver_all(&mut local, &own, &packet.payload, at);
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

    fn create_peer(&mut self, key: u64, spec: PeerSpec) -> Result<String, EngineError> {
        let addresses = self.pool.addresses;
        let peer = Peer::create(&*self.engine, spec, &addresses, Instant::now())?;
        let offer = peer.offer().to_owned();
        let (ufrag, pwd) = peer.ice_credentials();
        self.pool.demux.register(key, ufrag, pwd);
        let mut slot = Slot {
            peer,
            route: None,
            ssrcs: None,
            deadline: None,
        };
        schedule(key, &mut slot, &mut self.timers);
        self.peers.insert(key, Box::new(slot));
        Ok(offer)
    }

    fn answer(&mut self, key: u64, sdp: &str) -> Result<(), EngineError> {
        let now = Instant::now();
        let result = match self.peers.get_mut(&key) {
            Some(slot) => {
                if matches!(slot.peer, Peer::Speaker(_)) {
                    slot.ssrcs = declared_ssrcs(sdp);
                }
                slot.peer.transport().apply_answer(sdp, now)
            }
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

    fn restart_ice(&mut self, key: u64) -> Result<String, EngineError> {
        let now = Instant::now();
        let Some(slot) = self.peers.get_mut(&key) else {
            return Err(EngineError::BadDescription);
        };
        slot.peer.transport().restart_ice(now)?;
        let offer = slot.peer.offer().to_owned();
        let (ufrag, pwd) = slot.peer.ice_credentials();
        self.pool.demux.renew(key, ufrag, pwd);
        self.after_input(key, now);
        Ok(offer)
    }

    fn payload_type(&self, key: u64) -> u8 {
        match self.peers.get(&key).map(|s| &s.peer) {
            Some(Peer::Listener(listener)) => listener.payload_type(),
            _ => OPUS_PAYLOAD_TYPE,
        }
    }

    fn set_route(&mut self, key: u64, route: Route) {
        if let Some(slot) = self.peers.get_mut(&key) {
            slot.route = Some(route);
        }
    }

    fn close_peer(&mut self, key: u64) {
        if let Some(mut slot) = self.peers.remove(&key) {
            self.pool.demux.unregister(key);
            slot.peer.transport().close();
            flush(&mut slot, &mut self.net, &mut self.send_dropped);
        }
    }

    /// Sends a batch of copies another worker routed.
    fn deliver(&mut self, payload: &[u8], copies: Vec<(u64, Rewritten)>, at: Instant) {
        let Worker {
            peers,
            net,
            send_dropped,
            latency,
            ..
        } = self;
        let mut out = Out {
            peers,
            net,
            send_dropped,
            latency,
        };
        deliver_all(&mut out, &copies, payload, at);
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
            Command::CreatePeer { key, spec, reply } => {
                respond(reply, self.create_peer(key, spec));
            }
            Command::Answer { key, sdp, reply } => respond(reply, self.answer(key, &sdp)),
            Command::AddCandidate {
                key,
                candidate,
                reply,
            } => respond(reply, self.add_candidate(key, &candidate)),
            Command::RestartIce { key, reply } => respond(reply, self.restart_ice(key)),
            Command::PayloadType { key, reply } => respond(reply, self.payload_type(key)),
            Command::Route { key, route, reply } => {
                self.set_route(key, route);
                respond(reply, ());
            }
            Command::ClosePeer { key, reply } => {
                self.close_peer(key);
                respond(reply, ());
            }
            Command::Deliver {
                payload,
                copies,
                at,
            } => self.deliver(&payload, copies, at),
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
            Command::Packet { route, packet, at } => {
                self.on_packet(&route.channel, &route.producer, &packet, at)
            }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn rtp_is_told_from_rtcp_and_its_ssrc_read_from_the_clear_header() {
        let mut rtp = vec![
            0x80u8, 111, 0, 1, 0, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3,
        ];
        assert_eq!(rtp_ssrc(&rtp), Some(0xdead_beef));
        rtp[1] = 0x80 | 111; // marker bit set
        assert_eq!(rtp_ssrc(&rtp), Some(0xdead_beef));
        let rtcp = [0x81u8, 201, 0, 7, 0, 0, 0, 1, 0, 0, 0, 2];
        assert_eq!(rtp_ssrc(&rtcp), None, "receiver report");
        assert_eq!(rtp_ssrc(&[0x80, 111, 0]), None, "too short");
        assert_eq!(rtp_ssrc(&[22u8; 20]), None, "DTLS");
    }

    #[test]
    fn an_answer_s_declared_ssrcs_are_read() {
        let sdp = "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=ssrc:42 cname:x\r\na=ssrc:42 msid:a b\r\na=ssrc:7 cname:y\r\n";
        assert_eq!(declared_ssrcs(sdp), Some(vec![7, 42]));
        assert_eq!(declared_ssrcs("m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"), None);
    }
}

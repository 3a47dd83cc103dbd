//! The worker pool: one worker per core, each a thread with its own event loop owning its share
//! of the node.
//!
//! - A channel's **router** lives on exactly one worker (chosen by hashing the channel id).
//! - **Peer connections** are spread over all workers (by their key), so the expensive part of
//!   forwarding, encrypting and sending one copy per listener, runs on every core.
//!
//! A packet from a speaker is decrypted by the worker owning the speaker's peer, handed to the
//! channel's worker, routed and rewritten there, and handed in one batch per worker to the
//! workers owning the listeners' peers, which encrypt each copy and send them in batches
//! (`sendmmsg`). Nothing waits for a listener: a full socket buffer or a full worker queue
//! loses that copy (counted). Everything reaches a worker as a message on its bounded queue.
//!
//! All transports share the node's one UDP port: each worker reads and writes its own socket
//! bound to it (`SO_REUSEPORT`), and a datagram the kernel hands to one worker for a transport
//! another owns goes to that worker's inbound queue (see [`net`]).
//!
//! - this module: the pool's typed handle (each method builds its worker command) and stats;
//! - [`thread`]: one worker, its event loop, peers and routers;
//! - [`net`]: the shared sockets, the demultiplexer and batched sends;
//! - [`calibrate`]: the node's capacity from the measured cost of a copy and its cores.

pub mod calibrate;
pub mod net;
mod thread;

use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use hdrhistogram::Histogram;
use rtc::rtp;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::engine::{Addresses, Candidate, Engine, EngineError, Path, PeerSpec, PeerState};
use crate::router::{Floor, FloorApplied, Listener, Rewritten, RouterStats};
pub use net::{Demux, Drop};

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
enum Command {
    // Handled by the worker owning the peer.
    CreatePeer {
        key: u64,
        spec: PeerSpec,
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
    RestartIce {
        key: u64,
        reply: Reply<Result<String, EngineError>>,
    },
    PayloadType {
        key: u64,
        reply: Reply<u8>,
    },
    /// Where the peer's incoming RTP goes.
    Route {
        key: u64,
        route: Route,
        reply: Reply<()>,
    },
    ClosePeer {
        key: u64,
        reply: Reply<()>,
    },
    /// Copies of one packet for this worker's listeners: the payload they share, and each
    /// listener's rewritten header.
    Deliver {
        payload: bytes::Bytes,
        copies: Vec<(u64, Rewritten)>,
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
        route: Route,
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

/// Where a speaker's incoming RTP goes: one producer of one channel. Every packet carries it
/// to the channel's worker, so its names are shared, not copied.
#[derive(Debug, Clone)]
pub struct Route {
    pub channel: Arc<str>,
    pub producer: Arc<str>,
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

/// A datagram for a transport, read by one worker for the worker owning the transport.
#[derive(Debug)]
struct Datagram {
    key: u64,
    data: BytesMut,
    from: Path,
    at: Instant,
}

/// How many workers the pool runs, and the CPUs they run on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Workers {
    pub count: usize,
    /// Worker `i` is pinned to `cpus[i % cpus.len()]`; empty: the scheduler places them.
    pub cpus: Vec<usize>,
}

impl Workers {
    /// `count` workers (0: one per CPU this process may use), each pinned to a CPU of its own
    /// when `pin` says so; by default (`None`), when the process owns its CPUs: the CPUs it may
    /// run on are no more than its workers (a container's own CPU set, `taskset`, a machine of
    /// its own). A process allowed on more CPUs than it runs workers (a CPU quota on a shared
    /// machine) is left to the scheduler, as the other processes on those CPUs are.
    ///
    /// Why pin: a packet's copies are split between the workers so that every core encrypts
    /// and sends at once, and the worker routing a packet wakes the others with their share.
    /// Left to itself, the scheduler often runs the woken worker on the waker's core, after
    /// it, so the fan-out ran on one core at a time: at 1000 listeners on 2 cores, pinning
    /// took the node's added latency from about 5 to about 3 ms at p99, and from about 2.3 to
    /// 1.3 ms at p50, in alternated runs (docs/benchmarks.md).
    pub fn new(count: usize, pin: Option<bool>) -> Self {
        let parallelism = std::thread::available_parallelism()
            .ok()
            .map(std::num::NonZero::get);
        Self::plan(count, pin, allowed_cpus(), parallelism)
    }

    /// [`Workers::new`] for the CPUs `allowed` and the `parallelism` the process is given
    /// (fewer than its CPUs under a CPU quota).
    fn plan(
        count: usize,
        pin: Option<bool>,
        allowed: Vec<usize>,
        parallelism: Option<usize>,
    ) -> Self {
        let count = match count {
            0 => parallelism.unwrap_or(allowed.len()).max(1),
            n => n,
        };
        let pin = pin.unwrap_or(allowed.len() <= count) && !allowed.is_empty();
        Self {
            count,
            cpus: if pin { allowed } else { Vec::new() },
        }
    }

    /// The CPU worker `index` is pinned to, if any.
    fn cpu(&self, index: usize) -> Option<usize> {
        (!self.cpus.is_empty()).then(|| self.cpus[index % self.cpus.len()])
    }
}

/// The CPUs this process may run on (its affinity mask: a container's CPU set, or `taskset`).
fn allowed_cpus() -> Vec<usize> {
    let Ok(set) = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) else {
        return Vec::new();
    };
    (0..nix::sched::CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect()
}

/// Where the node's media is served.
#[derive(Debug, Clone, Copy)]
pub struct Listen {
    /// The UDP address every transport shares (port 0: an ephemeral port).
    pub udp: SocketAddr,
    /// The ICE/TCP address every transport shares; no ICE/TCP when `None`.
    pub tcp: Option<SocketAddr>,
    /// Written into candidates instead of the bound IP.
    pub announced: Option<std::net::IpAddr>,
}

#[derive(Debug, Clone)]
pub struct WorkerPool {
    workers: Arc<[mpsc::Sender<Command>]>,
    /// Each worker's queue of datagrams other workers read for its transports.
    inbound: Arc<[mpsc::Sender<Datagram>]>,
    demux: Arc<Demux>,
    addresses: Addresses,
    hasher: RandomState,
    stop: CancellationToken,
    /// Cancelled when a worker ends without being asked to (it panicked): its peers and
    /// routers are gone, and the node must stop taking work.
    failed: CancellationToken,
    /// Where workers report their peers' connection states, by peer key.
    peer_states: mpsc::UnboundedSender<(u64, PeerState)>,
}

impl WorkerPool {
    /// Binds the node's shared UDP port and starts the workers (at least one) on threads of
    /// their own. The receiver gets every peer's connection state as it changes (connected,
    /// failed, closed), by peer key.
    pub fn start<E: Engine>(
        workers: &Workers,
        engine: Arc<E>,
        listen: Listen,
    ) -> Result<(Self, mpsc::UnboundedReceiver<(u64, PeerState)>), EngineError> {
        let count = workers.count.max(1);
        let (sockets, udp) = net::bind_shared(listen.udp, count)?;
        let (listeners, tcp) = match listen.tcp {
            Some(addr) => {
                let (listeners, bound) = net::listen_shared(addr, count)?;
                (listeners.into_iter().map(Some).collect(), Some(bound))
            }
            None => ((0..count).map(|_| None).collect::<Vec<_>>(), None),
        };
        tracing::info!(
            %udp,
            tcp = ?tcp,
            workers = count,
            pinned = ?workers.cpus.get(..count.min(workers.cpus.len())),
            send_buffer = sockets.first().map_or(0, net::send_buffer),
            "media ports bound"
        );
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..count).map(|_| mpsc::channel(WORKER_QUEUE)).unzip();
        let (inbound, inbound_rx): (Vec<_>, Vec<_>) =
            (0..count).map(|_| mpsc::channel(INBOUND_QUEUE)).unzip();
        let (peer_states, states) = mpsc::unbounded_channel();
        let pool = Self {
            workers: senders.into(),
            inbound: inbound.into(),
            demux: Arc::new(Demux::new()?),
            addresses: Addresses {
                udp,
                tcp,
                announced: listen.announced,
            },
            hasher: RandomState::new(),
            stop: CancellationToken::new(),
            failed: CancellationToken::new(),
            peer_states,
        };
        for (index, (((commands, inbound), socket), listener)) in receivers
            .into_iter()
            .zip(inbound_rx)
            .zip(sockets)
            .zip(listeners)
            .enumerate()
        {
            thread::spawn(
                index,
                workers.cpu(index),
                pool.clone(),
                Arc::clone(&engine),
                thread::Queues { commands, inbound },
                socket,
                listener,
            );
        }
        Ok((pool, states))
    }

    /// The node's shared media addresses (as bound).
    pub fn addresses(&self) -> Addresses {
        self.addresses
    }

    /// The demultiplexer: paths known and datagrams dropped by cause.
    pub fn demux(&self) -> &Demux {
        &self.demux
    }

    /// A worker reports a peer's new connection state.
    fn peer_state(&self, key: u64, state: PeerState) {
        let _ = self.peer_states.send((key, state));
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
    async fn request<T>(&self, channel: &str, make: impl FnOnce(Reply<T>) -> Command) -> Option<T> {
        self.request_at(self.channel_worker(channel), make).await
    }

    /// Asks the worker owning peer `key`.
    async fn request_peer<T>(&self, key: u64, make: impl FnOnce(Reply<T>) -> Command) -> Option<T> {
        self.request_at(self.peer_worker(key), make).await
    }

    /// Creates peer `key` on the node's shared addresses; its offer.
    pub async fn create_peer(
        &self,
        key: u64,
        spec: PeerSpec,
    ) -> Option<Result<String, EngineError>> {
        self.request_peer(key, |reply| Command::CreatePeer { key, spec, reply })
            .await
    }

    pub async fn apply_answer(&self, key: u64, sdp: String) -> Option<Result<(), EngineError>> {
        self.request_peer(key, |reply| Command::Answer { key, sdp, reply })
            .await
    }

    pub async fn add_candidate(
        &self,
        key: u64,
        candidate: Candidate,
    ) -> Option<Result<(), EngineError>> {
        self.request_peer(key, |reply| Command::AddCandidate {
            key,
            candidate,
            reply,
        })
        .await
    }

    /// Restarts peer `key`'s ICE: its new offer.
    pub async fn restart_ice(&self, key: u64) -> Option<Result<String, EngineError>> {
        self.request_peer(key, |reply| Command::RestartIce { key, reply })
            .await
    }

    /// The payload type the client accepted for a listener peer's track.
    pub async fn payload_type(&self, key: u64) -> Option<u8> {
        self.request_peer(key, |reply| Command::PayloadType { key, reply })
            .await
    }

    /// Routes peer `key`'s incoming RTP to `producer` of `channel`.
    pub async fn route(&self, key: u64, channel: &str, producer: &str) -> Option<()> {
        let route = Route {
            channel: channel.into(),
            producer: producer.into(),
        };
        self.request_peer(key, |reply| Command::Route { key, route, reply })
            .await
    }

    pub async fn close_peer(&self, key: u64) -> Option<()> {
        self.request_peer(key, |reply| Command::ClosePeer { key, reply })
            .await
    }

    pub async fn add_producer(
        &self,
        channel: &str,
        producer: String,
        session: String,
    ) -> Option<()> {
        let channel_id = channel.to_owned();
        self.request(channel, |reply| Command::AddProducer {
            channel: channel_id,
            producer,
            session,
            reply,
        })
        .await
    }

    pub async fn add_listener(
        &self,
        channel: &str,
        consumer: String,
        listener: Listener,
    ) -> Option<()> {
        let channel_id = channel.to_owned();
        self.request(channel, |reply| Command::AddListener {
            channel: channel_id,
            consumer,
            listener,
            reply,
        })
        .await
    }

    pub async fn remove_producer(&self, channel: &str, producer: String) -> Option<()> {
        let channel_id = channel.to_owned();
        self.request(channel, |reply| Command::RemoveProducer {
            channel: channel_id,
            producer,
            reply,
        })
        .await
    }

    pub async fn remove_listener(&self, channel: &str, consumer: String) -> Option<()> {
        let channel_id = channel.to_owned();
        self.request(channel, |reply| Command::RemoveListener {
            channel: channel_id,
            consumer,
            reply,
        })
        .await
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

    /// Cancelled once a worker has died (panicked).
    pub fn failed(&self) -> CancellationToken {
        self.failed.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_are_pinned_by_default_only_where_the_node_owns_its_cpus() {
        // A machine or CPU set of its own: one worker per CPU, each on its own.
        let own = Workers::plan(0, None, vec![4, 5], Some(2));
        assert_eq!((own.count, own.cpu(0), own.cpu(1)), (2, Some(4), Some(5)));
        // A CPU quota of 2 on a 64-CPU machine: two workers, left to the scheduler.
        let quota = Workers::plan(0, None, (0..64).collect(), Some(2));
        assert_eq!((quota.count, quota.cpu(0)), (2, None));
        // Asked for: pinned anyway, or never.
        let asked = Workers::plan(0, Some(true), (0..64).collect(), Some(2));
        assert_eq!((asked.cpu(0), asked.cpu(1)), (Some(0), Some(1)));
        assert_eq!(
            Workers::plan(0, Some(false), vec![0, 1], Some(2)).cpu(0),
            None
        );
        // More workers than CPUs share them in turn.
        let more = Workers::plan(3, None, vec![0, 1], Some(2));
        assert_eq!(
            (more.cpu(0), more.cpu(1), more.cpu(2)),
            (Some(0), Some(1), Some(0))
        );
        // An unknown affinity pins nothing.
        assert_eq!(
            Workers::plan(0, Some(true), Vec::new(), Some(2)).cpu(0),
            None
        );
    }
}

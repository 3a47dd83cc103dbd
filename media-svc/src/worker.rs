//! The worker pool: each channel's router lives on exactly one worker, chosen by hashing the
//! channel id, and workers own their routers exclusively (no locks on the media path). Everything
//! reaches a worker as a message on its bounded queue; packets are offered with `try_send` and
//! dropped (and counted) when a worker is saturated, control messages wait for room.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rtc::rtp;
use tokio::sync::{mpsc, oneshot};

use crate::router::{Floor, FloorApplied, Listener, Router, RouterStats};

/// Messages a worker may have queued.
pub const WORKER_QUEUE: usize = 8192;

#[derive(Debug)]
pub enum Command {
    Packet {
        channel: Arc<str>,
        producer: Arc<str>,
        packet: rtp::Packet,
        at: Instant,
    },
    /// `only_newer`: apply only a strictly higher epoch (decisions relayed from state-svc events,
    /// which must never undo a renewal the gateway applied at the same epoch).
    SetFloor {
        channel: String,
        floor: Floor,
        only_newer: bool,
        reply: oneshot::Sender<FloorApplied>,
    },
    AddProducer {
        channel: String,
        producer: String,
        session: String,
    },
    RemoveProducer {
        channel: String,
        producer: String,
    },
    AddListener {
        channel: String,
        consumer: String,
        listener: Listener,
    },
    RemoveListener {
        channel: String,
        consumer: String,
    },
    Stats {
        reply: oneshot::Sender<PoolStats>,
    },
}

/// Totals over the routers of one worker (or the whole pool).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub channels: u32,
    pub producers: u32,
    pub consumers: u32,
    pub router: RouterStats,
}

impl PoolStats {
    fn add(&mut self, other: &PoolStats) {
        self.channels += other.channels;
        self.producers += other.producers;
        self.consumers += other.consumers;
        self.router.forwarded += other.router.forwarded;
        self.router.dropped_not_floor += other.router.dropped_not_floor;
        self.router.dropped_slow_listener += other.router.dropped_slow_listener;
    }
}

#[derive(Debug, Clone)]
pub struct WorkerPool {
    workers: Arc<[mpsc::Sender<Command>]>,
    hasher: RandomState,
    /// Packets refused because a worker's queue was full.
    dropped_busy: Arc<AtomicU64>,
}

impl WorkerPool {
    /// Starts `count` workers (at least one) on the current runtime.
    pub fn start(count: usize) -> Self {
        let workers: Vec<_> = (0..count.max(1))
            .map(|index| {
                let (tx, rx) = mpsc::channel(WORKER_QUEUE);
                tokio::spawn(Worker::default().run(index, rx));
                tx
            })
            .collect();
        Self {
            workers: workers.into(),
            hasher: RandomState::new(),
            dropped_busy: Arc::default(),
        }
    }

    fn worker(&self, channel: &str) -> &mpsc::Sender<Command> {
        let index = self.hasher.hash_one(channel) as usize % self.workers.len();
        &self.workers[index]
    }

    /// Offers a packet; drops it when the worker is saturated.
    pub fn packet(&self, channel: &Arc<str>, producer: &Arc<str>, packet: rtp::Packet) {
        let cmd = Command::Packet {
            channel: Arc::clone(channel),
            producer: Arc::clone(producer),
            packet,
            at: Instant::now(),
        };
        if self.worker(channel).try_send(cmd).is_err() {
            self.dropped_busy.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub async fn send(&self, channel: &str, cmd: Command) {
        // A worker only stops when the runtime does.
        let _ = self.worker(channel).send(cmd).await;
    }

    pub async fn set_floor(&self, channel: &str, floor: Floor, only_newer: bool) -> FloorApplied {
        let (reply, rx) = oneshot::channel();
        self.send(
            channel,
            Command::SetFloor {
                channel: channel.to_owned(),
                floor,
                only_newer,
                reply,
            },
        )
        .await;
        rx.await.unwrap_or(FloorApplied {
            applied: false,
            current_epoch: 0,
        })
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

    pub fn dropped_busy(&self) -> u64 {
        self.dropped_busy.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
struct Worker {
    routers: HashMap<String, Router>,
    /// Highest epoch of channels whose router was dropped, so a stale decision stays stale.
    epochs: HashMap<String, u64>,
    /// Counters of routers already dropped.
    retired: RouterStats,
}

impl Worker {
    async fn run(mut self, index: usize, mut rx: mpsc::Receiver<Command>) {
        tracing::debug!(worker = index, "media worker started");
        while let Some(cmd) = rx.recv().await {
            self.handle(cmd);
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

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Packet {
                channel,
                producer,
                packet,
                at,
            } => {
                if let Some(router) = self.routers.get_mut(&*channel) {
                    router.on_packet(&producer, &packet, at);
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
            Command::AddProducer {
                channel,
                producer,
                session,
            } => {
                self.router(&channel).add_producer(producer, session);
            }
            Command::RemoveProducer { channel, producer } => {
                if let Some(router) = self.routers.get_mut(&channel) {
                    router.remove_producer(&producer);
                }
                self.retire_if_empty(&channel);
            }
            Command::AddListener {
                channel,
                consumer,
                listener,
            } => {
                self.router(&channel).add_listener(consumer, listener);
            }
            Command::RemoveListener { channel, consumer } => {
                if let Some(router) = self.routers.get_mut(&channel) {
                    router.remove_listener(&consumer);
                }
                self.retire_if_empty(&channel);
            }
            Command::Stats { reply } => {
                let mut stats = PoolStats {
                    router: self.retired,
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

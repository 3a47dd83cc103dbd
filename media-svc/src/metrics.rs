//! media-svc's Prometheus metrics, served on `--metrics-listen` as `/metrics`.
//!
//! The node's figures live in its workers; a sampler asks for them once a second (the same
//! `stats` call gRPC `GetNodeStats` uses) and moves the gauges and counters, so a scrape never
//! waits on the workers.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use talkgroup_common::metrics::Exposition;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::node::Node;

/// How often the sampler reads the workers' figures.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct MediaMetrics {
    channels: Gauge,
    peer_connections: Gauge,
    producers: Gauge,
    consumers: Gauge,
    load_ratio: Gauge<f64, std::sync::atomic::AtomicU64>,
    draining: Gauge,
    forwarded: Counter,
    dropped_not_floor: Counter,
    dropped_slow: Counter,
    dropped_send: Counter,
    reaped: Family<ReapReason, Counter>,
    refused: Family<DropCause, Counter>,
    tcp_connections: Gauge,
    paths: Gauge,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropCause {
    cause: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReapReason {
    reason: &'static str,
}

/// Registers the node's metrics and starts the sampler; returns what `/metrics` serves.
pub fn start(
    node: Arc<Node>,
    capacity: u32,
    refusals: &talkgroup_common::authz::Refusals,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) -> Exposition {
    let m = Arc::new(MediaMetrics::default());
    let mut r = Registry::default();
    refusals.register(&mut r);
    r.register(
        "ptt_media_channels",
        "Channels routed on this node",
        m.channels.clone(),
    );
    r.register(
        "ptt_media_peer_connections",
        "WebRTC peer connections (transports) open on this node",
        m.peer_connections.clone(),
    );
    r.register(
        "ptt_media_producers",
        "Producers (senders)",
        m.producers.clone(),
    );
    r.register(
        "ptt_media_consumers",
        "Consumers (listener streams)",
        m.consumers.clone(),
    );
    r.register(
        "ptt_media_load_ratio",
        "Peer connections over the node's capacity: the autoscaling signal",
        m.load_ratio.clone(),
    );
    r.register(
        "ptt_media_draining",
        "1 while the node drains (takes no new channels)",
        m.draining.clone(),
    );
    r.register(
        "ptt_media_packets_forwarded",
        "Audio packets copied to listeners (one per listener per packet)",
        m.forwarded.clone(),
    );
    r.register(
        "ptt_media_packets_dropped_not_floor",
        "Packets dropped because their producer did not hold the floor",
        m.dropped_not_floor.clone(),
    );
    r.register(
        "ptt_media_packets_dropped_slow_listener",
        "Copies dropped because a listener's queue was full",
        m.dropped_slow.clone(),
    );
    r.register(
        "ptt_media_packets_dropped_send",
        "Copies dropped at send: full socket buffer, full worker queue or too late",
        m.dropped_send.clone(),
    );
    r.register(
        "ptt_media_transports_reaped",
        "Transports the node closed on its own: failed (consent lost, DTLS failed), never-connected, session-ended (left the channel or ended in state-svc)",
        m.reaped.clone(),
    );
    r.register(
        "ptt_media_datagrams_refused",
        "Datagrams the shared media port dropped before any transport saw them, by cause: unknown_address (not a check, from an address no check opened), dtls_unchecked, unknown_ufrag, bad_integrity (a check not signed with the transport's password), unknown_ssrc, queue_full",
        m.refused.clone(),
    );
    r.register(
        "ptt_media_ice_tcp_connections",
        "ICE/TCP connections open on the node's shared TCP port",
        m.tcp_connections.clone(),
    );
    r.register(
        "ptt_media_paths",
        "Client paths (address and protocol) the shared ports know, each opened by a valid check",
        m.paths.clone(),
    );
    let sampler = Arc::clone(&m);
    tasks.spawn(async move {
        let mut last = [0u64; 4];
        let mut last_reaped = [0u64; 3];
        let mut last_refused = [0u64; crate::worker::Drop::ALL.len()];
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            let stats = node.stats(false).await;
            let pool = &stats.pool;
            sampler.channels.set(i64::from(pool.channels));
            sampler.peer_connections.set(i64::from(stats.transports));
            sampler.producers.set(i64::from(pool.producers));
            sampler.consumers.set(i64::from(pool.consumers));
            sampler
                .load_ratio
                .set(f64::from(stats.transports) / f64::from(capacity.max(1)));
            sampler.draining.set(i64::from(node.is_draining()));
            let now = [
                pool.router.forwarded,
                pool.router.dropped_not_floor,
                pool.router.dropped_slow_listener,
                pool.send_dropped,
            ];
            let counters = [
                &sampler.forwarded,
                &sampler.dropped_not_floor,
                &sampler.dropped_slow,
                &sampler.dropped_send,
            ];
            for ((counter, now), last) in counters.into_iter().zip(now).zip(last.iter_mut()) {
                counter.inc_by(now.saturating_sub(*last));
                *last = now.max(*last);
            }
            let reaped = node.reaped();
            let reasons = [
                ("failed", &reaped.failed),
                ("never-connected", &reaped.never_connected),
                ("session-ended", &reaped.session_ended),
            ];
            for ((reason, count), last) in reasons.into_iter().zip(last_reaped.iter_mut()) {
                let now = count.load(std::sync::atomic::Ordering::Relaxed);
                let counter = sampler.reaped.get_or_create(&ReapReason { reason });
                counter.inc_by(now.saturating_sub(*last));
                *last = now;
            }
            let demux = node.demux();
            sampler
                .tcp_connections
                .set(i64::try_from(demux.tcp_connections()).unwrap_or(i64::MAX));
            sampler
                .paths
                .set(i64::try_from(demux.path_count()).unwrap_or(i64::MAX));
            for ((cause, now), last) in demux.drops().into_iter().zip(last_refused.iter_mut()) {
                let counter = sampler.refused.get_or_create(&DropCause {
                    cause: cause.label(),
                });
                counter.inc_by(now.saturating_sub(*last));
                *last = now;
            }
        }
    });
    Exposition::new(r, || {})
}

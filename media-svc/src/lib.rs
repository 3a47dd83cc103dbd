//! media-svc: the SFU worker pool that forwards the floor holder's Opus audio.
//!
//! Layout:
//! - [`router`]: one channel's forwarding decision and per-listener stream rewriting (sans-IO).
//! - [`engine`]: sans-IO WebRTC transports behind the project's own traits, one per kind
//!   (speakers' full `rtc` 0.21 peer connections, listeners' lean ICE-lite + DTLS-SRTP path).
//! - [`worker`]: the worker pool, one thread per core: a channel's router lives on one worker,
//!   peers are spread over all of them, and the routing worker hands each the copies for its
//!   peers; everything reaches a worker by bounded queues, through the pool's typed handle.
//! - [`node`]: the registry of transports, producers and consumers.
//! - [`grpc`]: `ptt.media.v1.MediaService`; [`link`]: registration and floor watch on state-svc.
//! - [`run`]: the server, taking a bound listener and a shutdown token; SIGTERM drains.

pub mod config;
pub mod engine;
pub mod grpc;
pub mod link;
pub mod metrics;
pub mod node;
pub mod router;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use talkgroup_proto::media::v1 as pb;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic_health::ServingStatus;

pub use crate::config::Config;
use talkgroup_common::authz::{AuthorizeLayer, Policy, Refusals};
use talkgroup_common::grpc::Security;
use talkgroup_common::metrics::Probes;
use talkgroup_common::tls::{Identity, PeerKind};

use crate::engine::rtc_peer::RtcEngine;
use crate::node::{Node, NodeSettings};

/// The gRPC service this server reports health for.
pub const SERVICE_NAME: &str = "ptt.media.v1.MediaService";

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("grpc server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("listener has no local address, or metrics cannot listen: {0}")]
    Listener(#[from] std::io::Error),
    #[error("media engine: {0}")]
    Engine(#[from] crate::engine::EngineError),
}

/// Serves until `shutdown`, then drains: health NOT_SERVING, no new channels, and exit once the
/// last transport closes or the drain timeout passes.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    config.validate().map_err(RunError::Config)?;
    let addr = listener.local_addr()?;
    let security = config
        .tls
        .security("media-svc", |id| matches!(id, Identity::Media(_)))
        .map_err(RunError::Config)?;
    let node_id = config.node_id(&security).map_err(RunError::Config)?;
    if let Security::Mtls(tls) = &security {
        tls.spawn_reload(shutdown.clone());
    }
    let refusals = Refusals::new();
    let workers = crate::worker::Workers::new(config.workers, config.pin_workers);
    if config.port_range.is_some() {
        tracing::warn!(
            udp = %config.udp_addr(),
            "--port-range is deprecated: every transport shares one port (--rtc-udp-port)"
        );
    }
    let capacity = if config.capacity == 0 {
        let c = crate::worker::calibrate::measure(workers.count)?;
        tracing::info!(
            copy_cost_ns = c.copy_cost.as_nanos() as u64,
            measured_core_ns = c.core_cost.as_nanos() as u64,
            cores = c.cores,
            capacity = c.capacity,
            "capacity from the CPU (set --capacity to override)"
        );
        c.capacity
    } else {
        config.capacity
    };
    let settings = NodeSettings {
        node_id: node_id.clone(),
        announced_ip: config.announced_ip,
        capacity,
    };
    let node = Node::new(RtcEngine::new()?, settings, config.media_addrs(), &workers)?;
    let tasks = TaskTracker::new();
    let side_stop = CancellationToken::new();
    tasks.spawn(Arc::clone(&node).reap(
        Duration::from_millis(config.connect_timeout_ms),
        side_stop.clone(),
    ));
    let probes = Probes::default();
    if let Some(metrics_addr) = config.process.metrics_listen {
        let exposition = metrics::start(
            Arc::clone(&node),
            capacity,
            &refusals,
            &tasks,
            side_stop.clone(),
        );
        talkgroup_common::metrics::serve(
            metrics_addr,
            exposition,
            probes.clone(),
            side_stop.clone(),
        )
        .await?;
    }
    let standard = talkgroup_common::grpc::standard_services();
    let health = Health {
        reporter: standard.reporter.clone(),
        probes,
    };
    health.serving(ServingStatus::Serving).await;
    health.live(ServingStatus::Serving).await;
    tasks.spawn(fail_on_worker_death(
        Arc::clone(&node),
        health.clone(),
        side_stop.clone(),
    ));
    if let Some(url) = config.state_url.clone() {
        let me = registration(&config, &node_id, addr, capacity);
        tasks.spawn(link::run(
            Arc::clone(&node),
            url,
            security.clone(),
            me,
            side_stop.clone(),
        ));
    }
    let stop_serving = CancellationToken::new();
    let timeout = Duration::from_millis(config.drain_timeout_ms);
    let drain = tasks.spawn(drain_on_shutdown(
        Arc::clone(&node),
        health,
        timeout,
        shutdown,
        stop_serving.clone(),
    ));

    let incoming = talkgroup_common::grpc::incoming(listener, security, refusals.clone());
    tracing::info!(%addr, %node_id, workers = workers.count, "media-svc listening");
    let policy = if config.grpc_reflection {
        policy().with_reflection()
    } else {
        policy()
    };
    let served = talkgroup_common::grpc::server()
        .trace_fn(talkgroup_common::telemetry::server_span)
        .layer(AuthorizeLayer::new(policy, refusals))
        .add_service(standard.health)
        .add_optional_service(config.grpc_reflection.then_some(standard.reflection_v1))
        .add_optional_service(
            config
                .grpc_reflection
                .then_some(standard.reflection_v1alpha),
        )
        .add_service(
            pb::media_service_server::MediaServiceServer::new(grpc::MediaApi::new(Arc::clone(
                &node,
            )))
            .max_decoding_message_size(64 * 1024),
        )
        .serve_with_incoming_shutdown(incoming, stop_serving.cancelled_owned())
        .await;
    // Deregisters and stops the metrics sampler.
    side_stop.cancel();
    // The drain waits for a shutdown that never comes when serving failed on its own.
    drain.abort();
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(5), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("deregistration did not finish in time");
    }
    tracing::info!("media-svc stopped");
    Ok(served?)
}

/// What the node registers with state-svc as.
/// Who may call the node: gateways drive its media; admins (and their consoles) may read its
/// statistics. Nothing else, so a pod that reaches the port cannot consume a channel, inject
/// audio or move a floor.
pub fn policy() -> Policy {
    Policy::default()
        .allow("/ptt.media.v1.MediaService/", &[PeerKind::Gateway])
        .allow(
            "/ptt.media.v1.MediaService/GetNodeStats",
            &[PeerKind::Admin],
        )
}

fn registration(
    config: &Config,
    node_id: &str,
    addr: std::net::SocketAddr,
    capacity: u32,
) -> link::Registration {
    link::Registration {
        node_id: node_id.to_owned(),
        grpc_url: config
            .advertise_url
            .clone()
            .unwrap_or_else(|| format!("http://{addr}")),
        announced_ip: config
            .announced_ip
            .unwrap_or(config.rtc_bind_ip)
            .to_string(),
        capacity,
    }
}

/// The node's health as gRPC health (`""`, the media service, and [`LIVENESS`]) and as the
/// HTTP probes on the metrics listener.
#[derive(Clone)]
struct Health {
    reporter: tonic_health::server::HealthReporter,
    probes: Probes,
}

impl Health {
    /// Readiness: whether new channels may come here.
    async fn serving(&self, status: ServingStatus) {
        for name in [SERVICE_NAME, ""] {
            self.reporter.set_service_status(name, status).await;
        }
        self.probes.set_ready(status == ServingStatus::Serving);
    }

    /// Liveness: whether the node works at all.
    async fn live(&self, status: ServingStatus) {
        self.reporter.set_service_status(LIVENESS, status).await;
        self.probes.set_live(status == ServingStatus::Serving);
    }
}

/// The health service name the liveness probe asks for: NOT_SERVING only when the node is
/// broken (a worker died), not while it drains.
pub const LIVENESS: &str = "talkgroup.media.Liveness";

/// A worker that panicked took its peers and channels with it: the node reports NOT_SERVING
/// (readiness and liveness, so Kubernetes replaces it) and drains (the registry places no new
/// channels on it, and gateways move new joins elsewhere).
async fn fail_on_worker_death(node: Arc<Node>, health: Health, stop: CancellationToken) {
    let failed = node.failed();
    tokio::select! {
        () = failed.cancelled() => {}
        () = stop.cancelled() => return,
    }
    tracing::error!("a media worker died; the node reports NOT_SERVING and takes no new channels");
    health.serving(ServingStatus::NotServing).await;
    health.live(ServingStatus::NotServing).await;
    node.set_draining();
}

/// On shutdown: NOT_SERVING, no new channels, then stop serving once the last transport
/// closed or `timeout` passed.
async fn drain_on_shutdown(
    node: Arc<Node>,
    health: Health,
    timeout: Duration,
    shutdown: CancellationToken,
    stop_serving: CancellationToken,
) {
    shutdown.cancelled().await;
    health.serving(ServingStatus::NotServing).await;
    node.set_draining();
    tracing::info!(
        transports = node.transport_count(),
        "draining: no new channels"
    );
    let deadline = tokio::time::Instant::now() + timeout;
    while node.transport_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::info!(left = node.transport_count(), "drained");
    stop_serving.cancel();
}

//! state-svc: the shared state of Talkgroup behind gRPC (`ptt.state.v1`).
//!
//! It owns floor control (lease + fencing epoch), channel state and its event stream, sessions
//! and membership, and the media-node registry with channel placement. It keeps no state of
//! its own beyond caches: run any number of replicas on one Redis.
//!
//! Layout:
//! - [`domain`]: validated ids and records, and the event plane's topics; [`error`]: the one
//!   error type and its mapping to the typed reasons callers decode, and the configuration
//!   error.
//! - [`store`]: the store's focused traits ([`store::Store`] is all of them) with the Redis and
//!   in-memory stores; [`sync`]: the sync session model and its deadline scheduler;
//!   [`connect`]: how to reach Redis and PostgreSQL.
//! - [`hub`]: the event plane in this process: published events handed to the local watch
//!   streams that follow their topics.
//! - [`audit`]: the audit trail's copy to PostgreSQL and the history queries.
//! - [`access`]: control-plane membership updates and the emergency broadcast, built from
//!   per-channel store steps.
//! - [`api`]: the gRPC services; [`sweeper`]: expiry of floors and sessions.
//! - [`run`]: the server, taking an already-bound listener and a shutdown token.

pub mod access;
pub mod api;
pub mod audit;
pub mod config;
pub mod connect;
pub mod domain;
pub mod error;
pub mod hub;
pub mod metrics;
pub mod store;
pub mod sweeper;
pub mod sync;

use std::sync::Arc;
use std::time::Duration;

use talkgroup_proto::state::v1 as pb;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic_health::ServingStatus;

pub use crate::config::{Config, ConfigError, StoreKind};
use talkgroup_common::authz::{AuthorizeLayer, Policy};
use talkgroup_common::grpc::Security;
use talkgroup_common::metrics::Probes;
use talkgroup_common::tls::{Identity, PeerKind};

use crate::hub::Hub;
use crate::store::Store;
use crate::store::memory::MemoryStore;
use crate::store::redis::RedisStore;

/// Largest request message accepted, so hostile callers cannot make the server buffer much.
const MAX_REQUEST_BYTES: usize = 256 * 1024;

/// The gRPC services this server reports health for.
pub const SERVICE_NAMES: [&str; 7] = [
    "ptt.state.v1.SyncService",
    "ptt.state.v1.FloorService",
    "ptt.state.v1.ChannelService",
    "ptt.state.v1.SessionService",
    "ptt.state.v1.MediaRegistryService",
    "ptt.state.v1.AccessService",
    "ptt.admin.v1.AdminService",
];

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot set up the store: {0}")]
    Store(#[from] error::StoreError),
    #[error("grpc server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("listener has no local address, or metrics cannot listen: {0}")]
    Listener(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
}

/// Serves until `shutdown` is cancelled, then drains within the configured grace period.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    config.validate()?;
    let postgres = config.postgres()?;
    let hub = Hub::new();
    let tracker = TaskTracker::new();
    match config.store_kind() {
        StoreKind::Memory => {
            let store = MemoryStore::new(
                config.store_settings(),
                Arc::clone(&hub),
                config.clock.clone(),
            );
            let history = None;
            serve(
                Arc::new(store),
                hub,
                &config,
                history,
                listener,
                tracker,
                shutdown,
            )
            .await
        }
        StoreKind::Redis => {
            let options = config.redis_options()?;
            tracing::info!(
                url = %options.connect.shown(),
                tls = options.connect.tls(),
                prefix = %options.key_prefix,
                "using redis store"
            );
            let store = RedisStore::connect(
                &options,
                config.store_settings(),
                Arc::clone(&hub),
                &tracker,
                shutdown.child_token(),
            )?;
            if let Some(postgres) = &postgres {
                tracing::info!(tls = postgres.tls(), "audit trail copied to postgresql");
                let writer = audit::AuditWriter::new(
                    store.target().clone(),
                    store.keys().clone(),
                    audit::AuditSettings {
                        postgres: postgres.clone(),
                        sweep: Duration::from_millis(u64::from(config.audit_sweep_ms)),
                        retention: Duration::from_secs(
                            u64::from(config.audit_retention_days) * 86_400,
                        ),
                    },
                );
                tracker.spawn(writer.run(shutdown.child_token()));
            }
            let history = postgres.map(|pg| Arc::new(audit::History::new(pg)));
            serve(
                Arc::new(store),
                hub,
                &config,
                history,
                listener,
                tracker,
                shutdown,
            )
            .await
        }
    }
}

async fn serve<S: Store>(
    store: Arc<S>,
    hub: Arc<Hub>,
    config: &Config,
    history: Option<Arc<audit::History>>,
    listener: TcpListener,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let addr = listener.local_addr()?;
    let metrics = metrics::StateMetrics::new();
    let probes = Probes::default();
    if let Some(addr) = config.process.metrics_listen {
        let exposition = metrics.exposition(Arc::clone(&hub));
        talkgroup_common::metrics::serve(addr, exposition, probes.clone(), shutdown.clone())
            .await?;
    }
    spawn_background(&tracker, &store, &hub, &metrics, config, &shutdown);
    let refusals = metrics.refusals.clone();
    let api = api::Api::new(
        store,
        hub,
        config.store_settings(),
        metrics,
        config.clock.clone(),
        shutdown.clone(),
        tracker.clone(),
    );
    let security = security(config, &shutdown)?;
    let policy = if config.grpc_reflection {
        policy().with_reflection()
    } else {
        policy()
    };
    let standard = talkgroup_common::grpc::standard_services();
    let reporter = standard.reporter.clone();
    set_serving(&reporter, ServingStatus::Serving).await;
    probes.set_ready(true);
    let router = talkgroup_common::grpc::server()
        .trace_fn(talkgroup_common::telemetry::server_span)
        .layer(AuthorizeLayer::new(policy.clone(), refusals.clone()))
        .add_service(standard.health)
        .add_optional_service(config.grpc_reflection.then_some(standard.reflection_v1))
        .add_optional_service(
            config
                .grpc_reflection
                .then_some(standard.reflection_v1alpha),
        );
    let router = add_services(router, api, config, history);
    tracing::info!(%addr, store = ?config.store_kind(), "state-svc listening");
    let drain = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            set_serving(&reporter, ServingStatus::NotServing).await;
            probes.set_ready(false);
            tracing::info!("draining");
        }
    };
    let grace = Duration::from_millis(u64::from(config.shutdown_grace_ms));
    let incoming = talkgroup_common::grpc::incoming(listener, security, refusals);
    let served = router.serve_with_incoming_shutdown(incoming, drain);
    tokio::pin!(served);
    let result = tokio::select! {
        result = &mut served => result,
        () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!("grace period over; closing remaining calls");
            Ok(())
        }
    };
    tracker.close();
    tracker.wait().await;
    tracing::info!("state-svc stopped");
    Ok(result?)
}

/// How the server speaks gRPC; with mutual TLS, its certificate reloaded as it rotates.
fn security(config: &Config, shutdown: &CancellationToken) -> Result<Security, RunError> {
    let security = config
        .tls
        .security("state-svc", |id| *id == Identity::State)
        .map_err(RunError::Tls)?;
    if let Security::Mtls(tls) = &security {
        tls.spawn_reload(shutdown.clone());
    }
    Ok(security)
}

/// What every replica runs beside the API until shutdown: the sweeper, the sync deadline
/// scheduler and the control plane's membership updates.
fn spawn_background<S: Store>(
    tracker: &TaskTracker,
    store: &Arc<S>,
    hub: &Arc<Hub>,
    metrics: &Arc<metrics::StateMetrics>,
    config: &Config,
    shutdown: &CancellationToken,
) {
    let every = Duration::from_millis(u64::from(config.sweep_interval_ms));
    tracker.spawn(sweeper::run(Arc::clone(store), every, shutdown.clone()));
    tracker.spawn(sync::run_scheduler(
        Arc::clone(store),
        every,
        config.clock.clone(),
        shutdown.clone(),
    ));
    tracker.spawn(access::run_membership(
        Arc::clone(store),
        Arc::clone(hub),
        Arc::clone(metrics),
        shutdown.clone(),
    ));
}

async fn set_serving(reporter: &tonic_health::server::HealthReporter, status: ServingStatus) {
    for name in SERVICE_NAMES.into_iter().chain([""]) {
        reporter.set_service_status(name, status).await;
    }
}

/// Every `ptt.state.v1` service and the admin API (behind its token), each with the request
/// size limit.
/// Who may call what (see docs/operations.md, "Service identities"): gateways serve clients,
/// media nodes keep their own registration and follow floors, admins administer. Writes to
/// grants and events come only through the admin identity; nobody else can grant itself a role.
pub fn policy() -> Policy {
    const GATEWAY: &[PeerKind] = &[PeerKind::Gateway];
    const MEDIA: &[PeerKind] = &[PeerKind::Media];
    const ADMIN: &[PeerKind] = &[PeerKind::Admin];
    const GATEWAY_OR_ADMIN: &[PeerKind] = &[PeerKind::Gateway, PeerKind::Admin];
    const FOLLOWERS: &[PeerKind] = &[PeerKind::Gateway, PeerKind::Media];
    const ACCESS: &str = "/ptt.state.v1.AccessService/";
    let policy = Policy::default()
        .allow("/ptt.admin.v1.AdminService/", ADMIN)
        .allow("/ptt.state.v1.FloorService/", GATEWAY)
        .allow("/ptt.state.v1.SessionService/", GATEWAY)
        .allow("/ptt.state.v1.SyncService/", GATEWAY)
        .allow("/ptt.state.v1.ChannelService/Watch", FOLLOWERS)
        .allow(
            "/ptt.state.v1.ChannelService/GetChannelState",
            GATEWAY_OR_ADMIN,
        )
        .allow(
            "/ptt.state.v1.ChannelService/GetChannelConfig",
            GATEWAY_OR_ADMIN,
        )
        .allow("/ptt.state.v1.ChannelService/SetChannelConfig", ADMIN)
        .allow("/ptt.state.v1.MediaRegistryService/RegisterNode", MEDIA)
        .allow("/ptt.state.v1.MediaRegistryService/Heartbeat", MEDIA)
        .allow("/ptt.state.v1.MediaRegistryService/DrainNode", MEDIA)
        .allow("/ptt.state.v1.MediaRegistryService/DeregisterNode", MEDIA)
        .allow(
            "/ptt.state.v1.MediaRegistryService/ListNodes",
            GATEWAY_OR_ADMIN,
        )
        .allow("/ptt.state.v1.MediaRegistryService/PlaceChannel", GATEWAY)
        .allow(
            "/ptt.state.v1.MediaRegistryService/GetPlacement",
            GATEWAY_OR_ADMIN,
        );
    [
        ("GetUserGrants", GATEWAY_OR_ADMIN),
        ("GetEvent", GATEWAY_OR_ADMIN),
        ("GetChannelEvent", GATEWAY_OR_ADMIN),
        ("EventSpeakers", GATEWAY_OR_ADMIN),
        ("StartEmergency", GATEWAY),
        ("StopEmergency", GATEWAY_OR_ADMIN),
        ("SetUserGrants", ADMIN),
        ("ApplyMembershipUpdate", ADMIN),
        ("SetEventChannels", ADMIN),
        ("PauseEvent", ADMIN),
    ]
    .into_iter()
    .fold(policy, |policy, (method, roles)| {
        policy.allow(format!("{ACCESS}{method}"), roles)
    })
}

type Router =
    tonic::transport::server::Router<tower_layer::Stack<AuthorizeLayer, tower_layer::Identity>>;

fn add_services<S: Store>(
    router: Router,
    api: api::Api<S>,
    config: &Config,
    history: Option<Arc<audit::History>>,
) -> Router {
    let auth = api::admin::AdminAuth::new(config.admin_token.as_deref());
    if config.admin_token.is_none() {
        tracing::warn!("no --admin-token: the admin API refuses every call");
    }
    let admin = talkgroup_proto::admin::v1::admin_service_server::AdminServiceServer::new(
        api::admin::AdminApi::new(api.clone(), history),
    )
    .max_decoding_message_size(MAX_REQUEST_BYTES);
    router
        .add_service(
            pb::floor_service_server::FloorServiceServer::new(api.clone())
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            pb::channel_service_server::ChannelServiceServer::new(api.clone())
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            pb::session_service_server::SessionServiceServer::new(api.clone())
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            pb::media_registry_service_server::MediaRegistryServiceServer::new(api.clone())
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            pb::access_service_server::AccessServiceServer::new(api.clone())
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            pb::sync_service_server::SyncServiceServer::new(api)
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(tonic::service::interceptor::InterceptedService::new(
            admin,
            move |request| auth.check(request),
        ))
}

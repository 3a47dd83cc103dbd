//! What every handler and connection of the gateway shares: its configuration, the clients of
//! state-svc and of the media nodes, the hub, the metrics and the shutdown signal.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use talkgroup_common::grpc::Security;
use talkgroup_common::telemetry::Inject;
use talkgroup_common::tls::{Expect, Identity};
use talkgroup_proto::media::v1 as mpb;
use talkgroup_proto::state::v1 as spb;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::hub::{Hub, Shards};
use crate::metrics;
use talkgroup_common::source::SourceBudget;

/// Every call to state-svc ends within this (the streams have a channel of their own).
const STATE_DEADLINE: Duration = Duration::from_secs(5);
/// Every call to a media node ends within this.
const MEDIA_DEADLINE: Duration = Duration::from_secs(5);
/// Media nodes (urls) the gateway remembers a client and an id for; past this the maps
/// start over (clients are made again on demand), so nodes long gone are not kept for ever.
const MAX_MEDIA_NODES: usize = 1024;

/// A gRPC channel whose calls carry the current trace context.
pub type Traced = InterceptedService<Channel, Inject>;

/// Everything the handlers share.
#[derive(Debug)]
pub struct AppState {
    pub config: Config,
    pub gateway_id: String,
    pub auth: Authenticator,
    pub state: Channel,
    /// How gRPC to state-svc and the media nodes is secured.
    pub security: Security,
    pub hub: Arc<Hub>,
    pub metrics: Arc<metrics::GatewayMetrics>,
    /// A client per media node, keyed by (url, node id).
    media: Mutex<HashMap<(String, String), mpb::media_service_client::MediaServiceClient<Traced>>>,
    /// The node id the registry last named for each media url: the id the node's certificate
    /// must name when the gateway dials it.
    media_ids: Mutex<HashMap<String, String>>,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    /// Sockets held per client address.
    pub addresses: Arc<SourceBudget>,
    /// WebRTC transports held per user.
    pub transports: crate::quota::TransportQuota,
    /// TURN relays and their shared secret, when configured.
    pub turn: Option<crate::turn::Turn>,
    /// The wall clock, as `pong` and TURN credentials read it (a manual one in tests).
    pub clock: talkgroup_proto::clock::Clock,
    pub(crate) started: Instant,
    /// The live media nodes `/health` last counted, and when: one state-svc call a second
    /// at most, however often `/health` is asked (it is unauthenticated).
    pub(crate) health: tokio::sync::Mutex<Option<(Instant, Option<usize>)>>,
}

impl AppState {
    pub fn floors(&self) -> spb::floor_service_client::FloorServiceClient<Traced> {
        spb::floor_service_client::FloorServiceClient::with_interceptor(self.state.clone(), Inject)
    }

    pub fn sessions(&self) -> spb::session_service_client::SessionServiceClient<Traced> {
        spb::session_service_client::SessionServiceClient::with_interceptor(
            self.state.clone(),
            Inject,
        )
    }

    pub fn channel_service(&self) -> spb::channel_service_client::ChannelServiceClient<Traced> {
        spb::channel_service_client::ChannelServiceClient::with_interceptor(
            self.state.clone(),
            Inject,
        )
    }

    pub fn syncs(&self) -> spb::sync_service_client::SyncServiceClient<Traced> {
        spb::sync_service_client::SyncServiceClient::with_interceptor(self.state.clone(), Inject)
    }

    pub fn access(&self) -> spb::access_service_client::AccessServiceClient<Traced> {
        spb::access_service_client::AccessServiceClient::with_interceptor(
            self.state.clone(),
            Inject,
        )
    }

    pub fn registry(
        &self,
    ) -> spb::media_registry_service_client::MediaRegistryServiceClient<Traced> {
        spb::media_registry_service_client::MediaRegistryServiceClient::with_interceptor(
            self.state.clone(),
            Inject,
        )
    }

    /// A client for the media node at `url` (one HTTP/2 connection per node, reused).
    /// Remembers which node the registry says serves `node.grpc_addr`; every placement the
    /// gateway reads passes here before it dials the node.
    pub fn learn_node(&self, node: &spb::MediaNode) {
        let mut ids = self
            .media_ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if ids.len() >= MAX_MEDIA_NODES && !ids.contains_key(&node.grpc_addr) {
            ids.clear();
        }
        ids.insert(node.grpc_addr.clone(), node.node_id.clone());
    }

    /// A client of the media node at `url`, which must present the certificate of the node
    /// the registry named for it ([`Self::learn_node`]): a node's certificate for another
    /// address is refused. `None` when no placement named the url, or it cannot be dialled.
    pub fn media(
        &self,
        url: &str,
    ) -> Option<mpb::media_service_client::MediaServiceClient<Traced>> {
        let id = self
            .media_ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(url)?
            .clone();
        let key = (url.to_owned(), id);
        let mut media = self
            .media
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(client) = media.get(&key) {
            return Some(client.clone());
        }
        let channel = talkgroup_common::grpc::channel(
            url,
            Some(MEDIA_DEADLINE),
            &self.security,
            Expect::Exactly(Identity::Media(key.1.clone())),
        )
        .ok()?;
        let client =
            mpb::media_service_client::MediaServiceClient::with_interceptor(channel, Inject);
        // Clients of nodes long gone are not kept for ever.
        if media.len() >= MAX_MEDIA_NODES {
            media.clear();
        }
        media.insert(key, client.clone());
        Some(client)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("server failed: {0}")]
    Serve(#[from] std::io::Error),
}

/// Builds the shared state; fails on configuration that cannot work.
pub fn app_state(config: Config, shutdown: CancellationToken) -> Result<Arc<AppState>, RunError> {
    config.validate().map_err(RunError::Config)?;
    let auth = Authenticator::from_config(&config).map_err(RunError::Config)?;
    let turn = crate::turn::Turn::from_config(
        &config.turn_urls,
        config.turn_secret_file.as_deref(),
        config.turn_ttl_s,
    )
    .map_err(RunError::Config)?;
    let security = config
        .tls
        .security("signaling-svc", |id| *id == Identity::Gateway)
        .map_err(RunError::Config)?;
    let state = talkgroup_common::grpc::channel(
        &config.state_url,
        Some(STATE_DEADLINE),
        &security,
        Expect::Exactly(Identity::State),
    )
    .map_err(|_| RunError::Config("invalid state-svc url".into()))?;
    let shards = Shards {
        streams: config.watch_streams,
        channels_per_stream: config.watch_channels_per_stream,
    };
    Ok(Arc::new(AppState {
        gateway_id: config.gateway_id(),
        config,
        auth,
        state,
        security,
        hub: Hub::with_shards(shards),
        metrics: metrics::GatewayMetrics::new(),
        media: Mutex::default(),
        media_ids: Mutex::default(),
        shutdown,
        tracker: TaskTracker::new(),
        addresses: Arc::default(),
        transports: crate::quota::TransportQuota::default(),
        turn,
        clock: talkgroup_proto::clock::Clock::system(),
        started: Instant::now(),
        health: tokio::sync::Mutex::default(),
    }))
}

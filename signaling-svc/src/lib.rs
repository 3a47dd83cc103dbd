//! signaling-svc: the authenticated WebSocket gateway clients speak to.
//!
//! Layout:
//! - [`auth`]: JWT checks before the upgrade; [`protocol`]: the server's side of the wire (the
//!   types are the `talkgroup-wire` crate's): parsing, encoding, building from state-svc's
//!   messages; [`client_addr`]: a client's address and the sockets per address.
//! - [`access`]: roles per channel, from the token and from state-svc's stored grants.
//! - [`connection`]: one WebSocket: its requests, pushes, floor renewal and cleanup, one file per
//!   concern.
//! - [`app_state`]: what every handler and connection shares (config, clients of the other
//!   services, the hub, metrics, shutdown).
//! - [`hub`]: the gateway's side of the event plane: its `Watch` streams on state-svc (the
//!   topics of its channels and users), fanned out to its connections.
//! - [`quota`]: gateway-wide quotas of a user; [`turn`]: TURN credentials.
//! - [`metrics`]: the Prometheus figures on `/metrics`.
//! - [`listener`]: the TCP listener: a global connection limit and a deadline for each request
//!   head; [`outbox`]: a socket's byte-bounded queue of frames to write.
//! - [`app`] builds the axum router (`/ws`, `/health`, `/metrics`, the browser client); [`run`]
//!   serves it until shutdown.

pub mod access;
pub mod app_state;
pub mod auth;
pub mod client_addr;
pub mod config;
pub mod connection;
pub mod hub;
pub mod listener;
pub mod metrics;
pub mod outbox;
pub mod protocol;
pub mod quota;
pub mod turn;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Query, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use serde::{Deserialize, Serialize};
use talkgroup_common::grpc::Security;
use talkgroup_common::tls::{Expect, Identity};
use talkgroup_proto::state::v1 as spb;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use crate::app_state::{AppState, RunError, Traced, app_state};
pub use crate::config::Config;

/// The HTTP routes.
pub fn app(state: Arc<AppState>) -> Router {
    let router = Router::new()
        .route(
            "/",
            get(|| async { web_file(INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/app.js",
            get(|| async { web_file(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/style.css",
            get(|| async { web_file(STYLE_CSS, "text/css; charset=utf-8") }),
        )
        .route("/ws", get(ws))
        .route("/health", get(health));
    let router = if state.config.dev_tokens {
        tracing::warn!("development token endpoint enabled: anyone can sign in as anyone");
        router.route("/dev/token", axum::routing::post(dev_token))
    } else {
        router
    };
    router.with_state(state)
}

// The browser client (plain ES module, no build step), compiled into the binary.
const INDEX_HTML: &str = include_str!("../web/index.html");
const APP_JS: &str = include_str!("../web/app.js");
const STYLE_CSS: &str = include_str!("../web/style.css");

/// Content Security Policy of the client: its own scripts and styles only, WebSockets to this
/// origin, and no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   media-src 'self' blob: mediastream:; img-src 'self'; frame-ancestors 'none'; \
                   base-uri 'none'; form-action 'none'";

fn web_file(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (axum::http::header::CONTENT_TYPE, content_type),
            (axum::http::header::CONTENT_SECURITY_POLICY, CSP),
            (axum::http::header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (axum::http::header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct DevTokenRequest {
    name: String,
}

#[derive(Debug, Serialize)]
struct DevClaims<'a> {
    sub: &'a str,
    name: &'a str,
    exp: u64,
    grants: std::collections::BTreeMap<&'a str, access::Role>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct DevToken<'a> {
    token: String,
    user_id: &'a str,
    name: &'a str,
}

/// Development only (`--dev-tokens`): a 12-hour token for a display name. The user id is the
/// name made into a slug, so the same name signs in as the same user.
async fn dev_token(
    State(app): State<Arc<AppState>>,
    body: axum::Json<DevTokenRequest>,
) -> Response {
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
        let refused = protocol::err(
            protocol::Code::BadRequest,
            "name must be 1 to 64 characters",
        );
        return (StatusCode::BAD_REQUEST, axum::Json(refused.body())).into_response();
    }
    let slug: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let user_id = format!("dev-{slug}");
    let now = std::time::Duration::from_millis(
        u64::try_from(talkgroup_proto::clock::now_ms()).unwrap_or(0),
    );
    // Development users may talk in the configured channels.
    let grants = app
        .config
        .channels
        .iter()
        .map(|c| (c.as_str(), access::Role::Talk))
        .collect();
    let claims = DevClaims {
        sub: &user_id,
        name,
        exp: now.as_secs() + 12 * 3600,
        grants,
    };
    let Some(secret) = app.config.jwt_secret.as_deref() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    match jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key) {
        Ok(token) => axum::Json(DevToken {
            token,
            user_id: &user_id,
            name,
        })
        .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct WsQuery {
    token: Option<String>,
    /// The resume token of the session this socket takes over.
    resume: Option<String>,
}

async fn ws(
    State(app): State<Arc<AppState>>,
    Query(query): Query<WsQuery>,
    headers: HeaderMap,
    slot: Option<Extension<listener::ConnectionSlot>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    if app.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    // The per-address cap comes before the token is even looked at: it also bounds what
    // unauthenticated attempts cost.
    let address = match peer {
        Some(Extension(ConnectInfo(peer))) => {
            let addr = client_addr::client_addr(
                peer.ip(),
                &headers,
                &app.config.trusted_proxies,
                app.config.trusted_proxy_hops,
            );
            let max = client_addr::budget_for(
                addr,
                &app.config.source_allowances,
                app.config.max_sockets_per_address,
            );
            let Some(held) = app.addresses.take(addr, max) else {
                app.metrics.refused("sockets-per-address");
                tracing::info!(%addr, "refused connection: too many sockets from this address");
                return (StatusCode::TOO_MANY_REQUESTS, "too many connections").into_response();
            };
            Some(held)
        }
        None => None,
    };
    let (claims, via_subprotocol) = match app.auth.authenticate(&headers, query.token.as_deref()) {
        Ok(ok) => ok,
        Err(error) => {
            tracing::info!(%error, "refused connection");
            return (StatusCode::UNAUTHORIZED, "unauthenticated").into_response();
        }
    };
    // Frames are small: a 4 KiB read buffer instead of the default 128 KiB, which the
    // WebSocket library zero-fills on every read (a fifth of the gateway's CPU at 500 clients).
    let upgrade = upgrade
        .read_buffer_size(protocol::READ_BUFFER_BYTES)
        .max_frame_size(protocol::HARD_FRAME_LIMIT)
        .max_message_size(protocol::HARD_FRAME_LIMIT);
    let upgrade = if via_subprotocol {
        upgrade.protocols([auth::SUBPROTOCOL])
    } else {
        upgrade
    };
    let tracker = app.tracker.clone();
    upgrade.on_upgrade(move |socket| {
        tracker.track_future(async move {
            // The socket keeps its TCP connection's place under the listener's limit, and its
            // place in its address's count.
            let _slot = (slot, address);
            connection::run(app, claims, query.resume, socket).await;
        })
    })
}

/// `GET /health`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Health {
    status: &'static str,
    uptime_ms: u64,
    connections: usize,
    media_nodes: Option<usize>,
}

/// How long `/health` reuses its count of live media nodes.
const HEALTH_FRESH: Duration = Duration::from_secs(1);

/// Live media nodes, from state-svc at most once per [`HEALTH_FRESH`]: callers that come
/// while one asks wait for its answer. `None` when state-svc does not answer.
async fn live_nodes(app: &AppState) -> Option<usize> {
    let mut cached = app.health.lock().await;
    if let Some((at, nodes)) = *cached
        && at.elapsed() < HEALTH_FRESH
    {
        return nodes;
    }
    let nodes = tokio::time::timeout(
        Duration::from_millis(500),
        app.registry().list_nodes(spb::ListNodesRequest {}),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .map(|r| r.into_inner().nodes.iter().filter(|n| n.live).count());
    *cached = Some((Instant::now(), nodes));
    nodes
}

async fn health(State(app): State<Arc<AppState>>) -> Response {
    let nodes = live_nodes(&app).await;
    let status = if app.shutdown.is_cancelled() {
        "draining"
    } else if nodes.is_some() {
        "ok"
    } else {
        "degraded"
    };
    let code = if status == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Health {
        status,
        uptime_ms: u64::try_from(app.started.elapsed().as_millis()).unwrap_or(u64::MAX),
        connections: app.hub.connection_count(),
        media_nodes: nodes,
    };
    (code, axum::Json(body)).into_response()
}

/// Re-reads the JWT key set when its file changes (a rotated ConfigMap or Secret), until
/// shutdown. A file that does not read as a key set is logged and the old keys stay.
async fn watch_key_set(app: Arc<AppState>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_millis(app.config.jwt_jwks_check_ms));
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match app.auth.reload_if_changed() {
            Ok(Some(keys)) => {
                app.metrics.key_set_reload("ok");
                tracing::info!(keys, "JWT key set reloaded");
            }
            Ok(None) => {}
            Err(error) => {
                app.metrics.key_set_reload("failed");
                tracing::warn!(%error, "JWT key set not reloaded; the old keys stay");
            }
        }
    }
}

/// Serves until `shutdown`, then closes every socket with 1001 after releasing its floors, within
/// the grace period. `/metrics` is served on `--metrics-listen`, if set.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let metrics = match config.process.metrics_listen {
        Some(addr) => Some(TcpListener::bind(addr).await?),
        None => None,
    };
    run_with_metrics(config, listener, metrics, shutdown).await
}

/// [`run`] with the metrics listener already bound (tests bind port 0 and read its address).
pub async fn run_with_metrics(
    config: Config,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    let https = match (&config.https_cert, &config.https_key) {
        (Some(cert), Some(key)) => {
            let cert = talkgroup_common::tls::ServerCert::load(cert, key, &[b"http/1.1"])
                .map_err(|e| RunError::Config(format!("HTTPS: {e}")))?;
            cert.spawn_reload(shutdown.clone());
            Some(cert)
        }
        _ => None,
    };
    let app_state = app_state(config, shutdown.clone())?;
    if let Some(metrics) = metrics {
        let exposition = app_state.metrics.exposition(Arc::clone(&app_state.hub));
        talkgroup_common::metrics::serve_on(
            metrics,
            exposition,
            talkgroup_common::metrics::Probes::ready(),
            shutdown.clone(),
        )?;
    }
    let addr = listener.local_addr()?;
    // The event streams get their own HTTP/2 connection, so a burst of events never queues
    // in front of a floor request's reply.
    let watches = talkgroup_common::grpc::channel(
        &app_state.config.state_url,
        None,
        &app_state.security,
        Expect::Exactly(Identity::State),
    )
    .map_err(|_| RunError::Config("invalid state-svc url".into()))?;
    if let Security::Mtls(tls) = &app_state.security {
        tls.spawn_reload(shutdown.clone());
    }
    let tracker = app_state.tracker.clone();
    let hub = &app_state.hub;
    tracker.spawn(Arc::clone(hub).run(watches, shutdown.clone()));
    if app_state.auth.has_key_set() {
        tracker.spawn(watch_key_set(Arc::clone(&app_state), shutdown.clone()));
    }
    tracing::info!(
        %addr,
        gateway_id = %app_state.gateway_id,
        https = https.is_some(),
        "signaling-svc listening"
    );
    let limits = listener::Limits {
        max_connections: app_state.config.max_connections,
        header_timeout: Duration::from_millis(app_state.config.header_timeout_ms),
        send_buffer: app_state.config.socket_send_buffer,
        https,
        max_connections_per_address: app_state.config.max_connections_per_address,
        trusted_proxies: app_state.config.trusted_proxies.clone(),
        allowances: app_state.config.source_allowances.clone(),
    };
    let metrics = Arc::clone(&app_state.metrics);
    listener::serve(listener, app(app_state), limits, metrics, shutdown, grace).await;
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!("grace period over; closing remaining connections");
    }
    tracing::info!("signaling-svc stopped");
    Ok(())
}

//! Prometheus metrics: each service fills a [`Registry`] with its counters, gauges and
//! histograms (every one with help text) and exposes it as text on `GET /metrics`, either on
//! its own HTTP listener ([`serve`], for the gRPC services) or on a route of an existing axum
//! router ([`route`], for the gateway). Gauges that mirror live state are set by a `refresh`
//! callback just before each scrape, so nothing has to keep them in step.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The OpenMetrics text content type Prometheus asks for.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A registry with the callback that brings its gauges up to date.
#[derive(Clone)]
pub struct Exposition {
    registry: Arc<Registry>,
    refresh: Arc<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for Exposition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exposition").finish_non_exhaustive()
    }
}

impl Exposition {
    pub fn new(registry: Registry, refresh: impl Fn() + Send + Sync + 'static) -> Self {
        Self {
            registry: Arc::new(registry),
            refresh: Arc::new(refresh),
        }
    }

    /// The current text exposition.
    pub fn render(&self) -> String {
        (self.refresh)();
        let mut out = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(%error, "cannot encode metrics");
        }
        out
    }
}

/// A router with `GET /metrics` only.
pub fn route(exposition: Exposition) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let exposition = exposition.clone();
            async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], exposition.render()).into_response() }
        }),
    )
}

/// Readiness and liveness for Kubernetes' HTTP probes (`/readyz`, `/livez` beside `/metrics`):
/// the kubelet's gRPC probes speak plaintext, which a server that requires mutual TLS refuses.
/// A service flips these where it flips its gRPC health status.
#[derive(Clone, Debug)]
pub struct Probes {
    ready: Arc<AtomicBool>,
    live: Arc<AtomicBool>,
}

impl Default for Probes {
    /// Not ready, alive.
    fn default() -> Self {
        Self {
            ready: Arc::new(AtomicBool::new(false)),
            live: Arc::new(AtomicBool::new(true)),
        }
    }
}

impl Probes {
    /// Ready and alive, for a service whose probes live elsewhere (the gateway's `/health`).
    pub fn ready() -> Self {
        let probes = Self::default();
        probes.set_ready(true);
        probes
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn set_live(&self, live: bool) {
        self.live.store(live, Ordering::Relaxed);
    }

    fn router(&self) -> Router {
        let answer = |flag: Arc<AtomicBool>, yes: &'static str, no: &'static str| {
            move || {
                let up = flag.load(Ordering::Relaxed);
                async move {
                    if up {
                        (StatusCode::OK, yes)
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, no)
                    }
                }
            }
        };
        Router::new()
            .route(
                "/readyz",
                get(answer(Arc::clone(&self.ready), "ready\n", "not ready\n")),
            )
            .route(
                "/livez",
                get(answer(Arc::clone(&self.live), "live\n", "not live\n")),
            )
    }
}

/// Serves `/metrics`, `/readyz` and `/livez` on `addr` until `shutdown`; returns the bound
/// address (logged as "metrics listening").
pub async fn serve(
    addr: SocketAddr,
    exposition: Exposition,
    probes: Probes,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    serve_on(TcpListener::bind(addr).await?, exposition, probes, shutdown)
}

/// [`serve`] on a bound listener.
pub fn serve_on(
    listener: TcpListener,
    exposition: Exposition,
    probes: Probes,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "metrics listening");
    tokio::spawn(async move {
        let served = axum::serve(listener, route(exposition).merge(probes.router()))
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::warn!(%error, "metrics endpoint failed");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    async fn status(addr: SocketAddr, path: &str) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(request.as_bytes()).await.unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).await.unwrap();
        reply.split(' ').nth(1).unwrap().parse().unwrap()
    }

    #[tokio::test]
    async fn probes_follow_the_service() {
        let probes = Probes::default();
        let stop = CancellationToken::new();
        let exposition = Exposition::new(Registry::default(), || {});
        let addr = serve(
            "127.0.0.1:0".parse().unwrap(),
            exposition,
            probes.clone(),
            stop.clone(),
        )
        .await
        .unwrap();
        assert_eq!(
            status(addr, "/readyz").await,
            503,
            "not ready before it serves"
        );
        assert_eq!(status(addr, "/livez").await, 200);
        probes.set_ready(true);
        assert_eq!(status(addr, "/readyz").await, 200);
        probes.set_ready(false);
        probes.set_live(false);
        assert_eq!(status(addr, "/readyz").await, 503, "draining");
        assert_eq!(status(addr, "/livez").await, 503, "broken");
        assert_eq!(status(addr, "/metrics").await, 200);
        stop.cancel();
    }

    #[test]
    fn renders_help_and_values() {
        let mut registry = Registry::default();
        let grants = Counter::<u64>::default();
        registry.register("ptt_floor_grants", "Floor grants", grants.clone());
        grants.inc();
        let text = Exposition::new(registry, || {}).render();
        assert!(
            text.contains("# HELP ptt_floor_grants Floor grants."),
            "{text}"
        );
        assert!(text.contains("ptt_floor_grants_total 1"), "{text}");
    }
}

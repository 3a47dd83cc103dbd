//! Prometheus metrics: each service fills a [`Registry`] with its counters, gauges and
//! histograms (every one with help text) and exposes it as text on `GET /metrics`, either on
//! its own HTTP listener ([`serve`], for the gRPC services) or on a route of an existing axum
//! router ([`route`], for the gateway). Gauges that mirror live state are set by a `refresh`
//! callback just before each scrape, so nothing has to keep them in step.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::header;
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

/// Serves `/metrics` on `addr` until `shutdown`; returns the bound address (logged as
/// "metrics listening").
pub async fn serve(
    addr: SocketAddr,
    exposition: Exposition,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "metrics listening");
    tokio::spawn(async move {
        let served = axum::serve(listener, route(exposition))
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

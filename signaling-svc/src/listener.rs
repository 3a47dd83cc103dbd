//! The gateway's TCP listener: every connection under one global limit, each served with
//! HTTP/1.1 and a deadline for its request head.
//!
//! axum's own `serve` has neither: a connection that sends nothing, or half a request head,
//! would stay open for good, and nothing bounds how many there are. Here:
//! - at most `--max-connections` TCP connections are held at once (a WebSocket keeps its slot
//!   until it closes); one more is closed as soon as it is accepted, and counted;
//! - at most `--max-connections-per-address` of them from one source (an IPv4 address, an
//!   IPv6 /64; more for an allowance), counted at accept, so one host's idle or keep-alive
//!   connections cannot take every slot; a trusted proxy's connections are not counted here
//!   (its clients are, per socket, by their forwarded address);
//! - each connection's kernel send buffer is fixed (`--socket-send-buffer`), so a client that
//!   stops reading holds at most that in the kernel, besides its outbox in the gateway;
//! - a connection must send a whole request head within `--header-timeout-ms` of its accept,
//!   and again between keep-alive requests (hyper's header read timeout, which needs a timer);
//! - with `--https-cert`, each connection first completes a TLS handshake (HTTP/1.1 over TLS,
//!   so `wss://` too), within the same deadline;
//! - every request carries the peer address ([`ConnectInfo`]) and the connection's slot
//!   ([`ConnectionSlot`]), which the WebSocket upgrade takes along.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

use talkgroup_common::tls::ServerCert;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::client_addr::{self, Allowance, Cidr};
use crate::metrics::GatewayMetrics;
use talkgroup_common::source::SourceBudget;

/// A TCP connection's place under the global limit, held as long as any clone is.
#[derive(Debug, Clone)]
pub struct ConnectionSlot(#[allow(dead_code)] Arc<OwnedSemaphorePermit>);

/// How the listener bounds its connections, and whether it speaks TLS.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    /// `SO_SNDBUF` of each connection; 0 leaves the kernel's autotuning.
    pub send_buffer: usize,
    /// Serve HTTPS with this certificate instead of plain HTTP.
    pub https: Option<Arc<ServerCert>>,
    /// Connections one source may hold, unless an allowance says more.
    pub max_connections_per_address: usize,
    /// Proxies whose connections are not counted per source.
    pub trusted_proxies: Vec<Cidr>,
    pub allowances: Vec<Allowance>,
}

/// Accepts and serves connections until `shutdown`; then asks each open HTTP connection to
/// finish its request and waits for them, at most `grace`. Upgraded sockets are not waited
/// for here: they end with the application's own shutdown.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    metrics: Arc<GatewayMetrics>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let per_source = Arc::new(SourceBudget::default());
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors, or a connection reset before its accept: wait a moment
                // instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            metrics.refused("max-connections");
            tracing::debug!(%peer, "connection limit reached; closing a new connection");
            drop(stream);
            continue;
        };
        let source_slot = if client_addr::is_trusted(peer.ip(), &limits.trusted_proxies) {
            None
        } else {
            let max = client_addr::budget_for(
                peer.ip(),
                &limits.allowances,
                limits.max_connections_per_address,
            );
            let Some(held) = per_source.take(peer.ip(), max) else {
                metrics.refused("connections-per-address");
                tracing::debug!(%peer, "connection limit of this source reached; closing");
                drop(stream);
                continue;
            };
            Some(held)
        };
        // Small frames both ways: never hold one back for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        if limits.send_buffer > 0 {
            let _ = socket2::SockRef::from(&stream).set_send_buffer_size(limits.send_buffer);
        }
        let slot = ConnectionSlot(Arc::new(slot));
        let router = router.clone();
        let stop = shutdown.clone();
        let https = limits.https.clone();
        let header_timeout = limits.header_timeout;
        let metrics = Arc::clone(&metrics);
        connections.spawn(async move {
            // The source's place is given back when the connection ends.
            let _source_slot = source_slot;
            let Some(cert) = https else {
                return serve_connection(stream, peer, slot, router, header_timeout, stop).await;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(cert.config());
            match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    serve_connection(stream, peer, slot, router, header_timeout, stop).await;
                }
                Ok(Err(error)) => {
                    metrics.refused("tls-handshake");
                    tracing::debug!(%peer, %error, "TLS handshake failed");
                }
                Err(_) => {
                    metrics.refused("tls-handshake");
                    tracing::debug!(%peer, "TLS handshake timed out");
                }
            }
        });
    }
    connections.close();
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        tracing::debug!("HTTP connections still open after the grace period");
    }
}

/// Serves one connection (plain or TLS) with HTTP/1.1 and upgrades until it ends, or until
/// `stop`, when it is asked to finish its request.
async fn serve_connection<IO>(
    io: IO,
    peer: std::net::SocketAddr,
    slot: ConnectionSlot,
    router: Router,
    header_timeout: Duration,
    stop: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        request.extensions_mut().insert(slot.clone());
        let mut router = router.clone();
        async move { Ok::<_, Infallible>(router.call(request).await.unwrap_or_else(|e| match e {})) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let connection = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "connection ended");
    }
}

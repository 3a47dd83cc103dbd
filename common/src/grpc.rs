//! The standard services of every Talkgroup gRPC server: `grpc.health.v1` and reflection
//! (both `v1` and `v1alpha`, since common grpcurl builds speak only `v1alpha`), and the
//! connections both ways: mutual TLS (see [`crate::tls`]) unless plaintext was asked for,
//! with the caller's identity handed to the server's authorisation ([`crate::authz`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic_health::server::HealthReporter;

use crate::authz::{Auth, Peer, Refusals};
pub use crate::tls::Security;
use crate::tls::{Expect, Identity, Tls};

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How many handshakes a server runs at once; further connections wait in the kernel's
/// accept queue, so a flood of slow handshakes cannot exhaust memory.
const MAX_HANDSHAKES: usize = 256;

/// A server connection: plain TCP or TLS, with who is calling.
#[derive(Debug)]
pub enum Conn {
    Plain(TcpStream, Peer),
    /// With the caller's place under the budget of connections without a trusted identity,
    /// when it has none.
    Tls(
        Box<tokio_rustls::server::TlsStream<TcpStream>>,
        Peer,
        Option<AnonymousSlot>,
    ),
}

/// Connections that completed TLS without a trusted client certificate (they get
/// UNAUTHENTICATED, or PERMISSION_DENIED, for every call, which is why they are kept at all):
/// at most this many per server...
const MAX_ANONYMOUS: usize = 64;
/// ...and this many per source (an IPv4 address, an IPv6 /64), so that one host cannot hold
/// them all.
const MAX_ANONYMOUS_PER_SOURCE: usize = 4;

/// A connection's place under the budget of connections without a trusted identity.
#[derive(Debug)]
pub struct AnonymousSlot {
    _total: tokio::sync::OwnedSemaphorePermit,
    _source: crate::source::SourceSlot,
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Peer {
        match self {
            Self::Plain(_, peer) | Self::Tls(_, peer, _) => peer.clone(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s, _) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s, ..) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s, _) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s, ..) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s, _) => Pin::new(s).poll_flush(cx),
            Self::Tls(s, ..) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s, _) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s, ..) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s, _) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s, ..) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s, _) => s.is_write_vectored(),
            Self::Tls(s, ..) => s.is_write_vectored(),
        }
    }
}

/// The connections of an already-bound listener, for `serve_with_incoming_shutdown`, with
/// `TCP_NODELAY` set (the services exchange small request/response messages and must never
/// wait for Nagle's algorithm). Under mutual TLS each connection's handshake runs in its own
/// task, bounded in time and in number, so a slow or hostile client never holds up the
/// others; a failed handshake is counted in `refusals` and dropped. The stream ends, and the
/// listener closes, once the server stops taking connections.
pub fn incoming(
    listener: TcpListener,
    security: Security,
    refusals: Refusals,
) -> impl tokio_stream::Stream<Item = std::io::Result<Conn>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Conn>>(64);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let anonymous_total = Arc::new(tokio::sync::Semaphore::new(MAX_ANONYMOUS));
    let anonymous_sources = Arc::new(crate::source::SourceBudget::default());
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (stream, remote) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: keep serving the connections
                    // that exist, and try again shortly.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            match &security {
                Security::Plaintext => {
                    let peer = Peer {
                        remote: Some(remote),
                        auth: Auth::Plaintext,
                    };
                    if tx.send(Ok(Conn::Plain(stream, peer))).await.is_err() {
                        return;
                    }
                }
                Security::Mtls(tls) => {
                    let Ok(permit) = Arc::clone(&handshakes).acquire_owned().await else {
                        return;
                    };
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
                    let acceptor_tls = Arc::clone(tls);
                    let tx = tx.clone();
                    let refusals = refusals.clone();
                    let anonymous_total = Arc::clone(&anonymous_total);
                    let anonymous_sources = Arc::clone(&anonymous_sources);
                    tokio::spawn(async move {
                        let _permit = permit;
                        let handshake =
                            tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
                        match handshake {
                            Ok(Ok(tls)) => {
                                let peer = Peer {
                                    remote: Some(remote),
                                    auth: authenticated(&acceptor_tls, &tls),
                                };
                                let slot = if matches!(peer.auth, Auth::Identified(_)) {
                                    None
                                } else {
                                    let total = Arc::clone(&anonymous_total).try_acquire_owned();
                                    let source = anonymous_sources
                                        .take(remote.ip(), MAX_ANONYMOUS_PER_SOURCE);
                                    let (Ok(total), Some(source)) = (total, source) else {
                                        refusals.anonymous();
                                        tracing::debug!(%remote, "too many connections without a client certificate; closed");
                                        return;
                                    };
                                    Some(AnonymousSlot {
                                        _total: total,
                                        _source: source,
                                    })
                                };
                                let _ = tx.send(Ok(Conn::Tls(Box::new(tls), peer, slot))).await;
                            }
                            Ok(Err(error)) => {
                                refusals.handshake();
                                tracing::debug!(%remote, %error, "TLS handshake refused");
                            }
                            Err(_) => {
                                refusals.handshake();
                                tracing::debug!(%remote, "TLS handshake timed out");
                            }
                        }
                    });
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn authenticated(tls: &Tls, stream: &tokio_rustls::server::TlsStream<TcpStream>) -> Auth {
    let Some(chain) = stream.get_ref().1.peer_certificates() else {
        return Auth::Anonymous;
    };
    if !tls.trusts_client(chain) {
        return Auth::Untrusted;
    }
    match chain
        .first()
        .and_then(|leaf| Identity::from_certificate(leaf))
    {
        Some(identity) => Auth::Identified(identity),
        None => Auth::Unnamed,
    }
}

/// How long a connection attempt to another service may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 pings on every internal connection, both ways: a peer that died without closing
/// its TCP connection (a killed pod, a cut network) is found within interval + timeout instead
/// of the kernel's TCP keepalive (hours), and its streams fail so callers reconnect.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A client endpoint for `url` as every Talkgroup service dials another: connect timeout,
/// `TCP_NODELAY`, HTTP/2 keepalive while idle. `deadline` bounds every call made on it; `None`
/// for the channels that carry long-lived streams (bound each unary call on those itself).
pub fn endpoint(
    url: &str,
    deadline: Option<Duration>,
) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    Ok(match deadline {
        Some(deadline) => endpoint.timeout(deadline),
        None => endpoint,
    })
}

/// A lazily connected channel to `url`, as [`endpoint`] configures it, over mutual TLS when
/// `security` says so: the server must present a certificate from the CA that names an
/// identity `expect` accepts. The URL's scheme does not choose TLS; `security` does.
pub fn channel(
    url: &str,
    deadline: Option<Duration>,
    security: &Security,
    expect: Expect,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let endpoint = endpoint(url, deadline)?;
    Ok(match security {
        Security::Plaintext => endpoint.connect_lazy(),
        Security::Mtls(tls) => endpoint.connect_with_connector_lazy(Connector {
            tls: Arc::clone(tls),
            expect,
        }),
    })
}

/// Dials TCP and runs the client side of mutual TLS.
#[derive(Clone, Debug)]
struct Connector {
    tls: Arc<Tls>,
    expect: Expect,
}

type TlsIo = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tower_service::Service<http::Uri> for Connector {
    type Response = TlsIo;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<TlsIo>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let tls = Arc::clone(&self.tls);
        let expect = self.expect.clone();
        Box::pin(async move {
            let invalid =
                |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_owned());
            let host = uri
                .host()
                .ok_or_else(|| invalid("no host in the url"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri
                .port_u16()
                .ok_or_else(|| invalid("no port in the url"))?;
            let config = tls.client_config(expect).map_err(std::io::Error::other)?;
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|_| invalid("the url's host is not a valid name"))?;
            let stream = TcpStream::connect((host.as_str(), port)).await?;
            let _ = stream.set_nodelay(true);
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// A server builder as every Talkgroup gRPC server starts: HTTP/2 pings to its clients (a
/// dead gateway's `Watch` stream ends within seconds, not at the next write), TCP keepalive,
/// and a bound on concurrent streams per connection.
pub fn server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .max_concurrent_streams(Some(4_096))
}

/// Health and reflection services, ready to be added to a tonic router.
#[derive(Debug)]
pub struct StandardServices<H, R1, R2> {
    pub reporter: HealthReporter,
    pub health: H,
    pub reflection_v1: R1,
    pub reflection_v1alpha: R2,
}

/// Builds the health reporter (everything starts NOT_SERVING until the caller says otherwise)
/// and reflection over every Talkgroup contract.
///
/// # Panics
/// Never in practice: the descriptor set is produced by the build script from the same
/// contracts, so it always decodes.
#[allow(clippy::type_complexity)]
pub fn standard_services() -> StandardServices<
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
> {
    let (reporter, health) = tonic_health::server::health_reporter();
    #[allow(clippy::expect_used)] // invariant: the descriptor set is built from our own contracts
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(talkgroup_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("descriptor set built from our own contracts decodes");
    #[allow(clippy::expect_used)] // invariant: as above
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(talkgroup_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("descriptor set built from our own contracts decodes");
    StandardServices {
        reporter,
        health,
        reflection_v1,
        reflection_v1alpha,
    }
}

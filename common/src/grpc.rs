//! The standard services of every Talkgroup gRPC server: `grpc.health.v1` and reflection
//! (both `v1` and `v1alpha`, since common grpcurl builds speak only `v1alpha`).

use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::server::HealthReporter;

/// The connections of an already-bound listener, for `serve_with_incoming_shutdown`, with
/// `TCP_NODELAY` set: the services exchange small request/response messages and must never
/// wait for Nagle's algorithm.
pub fn incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<TcpStream>> {
    TcpListenerStream::new(listener).map(|conn| {
        conn.inspect(|stream| {
            let _ = stream.set_nodelay(true);
        })
    })
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

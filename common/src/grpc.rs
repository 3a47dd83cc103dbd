//! The standard services of every Talkgroup gRPC server: `grpc.health.v1` and reflection
//! (both `v1` and `v1alpha`, since common grpcurl builds speak only `v1alpha`).

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

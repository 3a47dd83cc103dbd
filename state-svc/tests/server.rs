//! The server around the services: health, reflection and graceful shutdown.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::{Backend, TestServer};
use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

#[tokio::test]
async fn health_reports_every_service_serving() {
    let server = TestServer::start(Backend::Memory.config("health")).await;
    let channel = server.channel_as(&talkgroup_common::tls::Identity::Gateway);
    let mut health = HealthClient::new(channel);
    for service in state_svc::SERVICE_NAMES.into_iter().chain([""]) {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{service}");
    }
    server.stop().await;
}

#[tokio::test]
async fn reflection_is_off_unless_enabled() {
    let server = TestServer::start(Backend::Memory.config("no-reflection")).await;
    let channel = server.channel_as(&talkgroup_common::tls::Identity::Gateway);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let refused = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap_err();
    // The authorisation policy allows reflection only when it is on: the call is refused
    // before it could reach a (missing) reflection service.
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    server.stop().await;
}

#[tokio::test]
async fn reflection_lists_the_contracts() {
    let mut config = Backend::Memory.config("reflection");
    config.grpc_reflection = true;
    let server = TestServer::start(config).await;
    let channel = server.channel_as(&talkgroup_common::tls::Identity::Gateway);
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for wanted in state_svc::SERVICE_NAMES
        .into_iter()
        .chain(["grpc.health.v1.Health"])
    {
        assert!(names.contains(&wanted), "{wanted} missing from {names:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn shutdown_ends_watch_streams_and_returns() {
    let server = TestServer::start(Backend::Memory.config("shutdown")).await;
    let mut c = server.clients().await;
    let mut watch = c.watch(&["ops"]).await;
    server.shutdown.cancel();
    let outcome = tokio::time::timeout(Duration::from_secs(5), server.handle).await;
    assert!(
        matches!(outcome, Ok(Ok(Ok(())))),
        "server stopped cleanly within the grace period"
    );
    drop(watch.next_or_end().await);
}

/// A TLS connection without a client certificate, as a scanner would open: the handshake
/// completes (so a caller gets a clear UNAUTHENTICATED), and the server keeps the connection
/// if it sends its HTTP/2 preface, or closes it at once.
fn anonymous_connection(
    addr: std::net::SocketAddr,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let pki = talkgroup_common::devcerts::TestPki::global();
    let ca = std::fs::read(pki.files(&talkgroup_common::tls::Identity::State).ca).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    rustls::StreamOwned::new(tls, tcp)
}

/// Connections that complete TLS without a client certificate serve nobody; one source keeps
/// at most four of them (the fifth and sixth are closed at once), and a caller with a
/// certificate is served all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_client_certificate_are_capped_per_source() {
    use std::io::Read;
    let server = TestServer::start(Backend::Memory.config("anonymous")).await;
    let addr = server.addr;
    let kept = tokio::task::spawn_blocking(move || {
        let mut held = Vec::new();
        let mut kept = Vec::new();
        for _ in 0..6 {
            let mut stream = anonymous_connection(addr);
            let mut first = [0u8; 9];
            // The server's HTTP/2 SETTINGS frame, or the end of the connection.
            let served = matches!(stream.read(&mut first), Ok(n) if n > 0);
            kept.push(served);
            held.push(stream);
        }
        kept
    })
    .await
    .unwrap();
    assert_eq!(kept, [true, true, true, true, false, false]);
    let mut health =
        HealthClient::new(server.channel_as(&talkgroup_common::tls::Identity::Gateway));
    health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    server.stop().await;
}

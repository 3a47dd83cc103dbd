//! Mutual TLS end to end on loopback: a real tonic server behind `incoming` and the
//! authorisation layer, real clients dialling it through `channel`, certificates from a
//! throwaway CA. Who may call is decided by the certificate's identity; a certificate from
//! another CA, or one naming an identity the policy does not allow, is refused with a stable
//! code and counted; a rotated certificate is served without a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use talkgroup_common::authz::{AuthorizeLayer, Policy, Refusals};
use talkgroup_common::devcerts::DevCa;
use talkgroup_common::grpc::{self, Security};
use talkgroup_common::tls::{Expect, Identity, PeerKind, Tls};
use tokio_util::sync::CancellationToken;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

struct Server {
    url: String,
    refusals: Refusals,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A health server whose policy lets only admins call it.
async fn serve(tls: std::sync::Arc<Tls>) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let refusals = Refusals::new();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let policy = Policy::new().allow("/grpc.health.v1.Health/", &[PeerKind::Admin]);
    let stop = CancellationToken::new();
    let incoming = grpc::incoming(listener, Security::Mtls(tls), refusals.clone());
    let router = grpc::server()
        .layer(AuthorizeLayer::new(policy, refusals.clone()))
        .add_service(health);
    tokio::spawn(router.serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned()));
    Server {
        url,
        refusals,
        stop,
    }
}

async fn check(url: &str, tls: &std::sync::Arc<Tls>, expect: Expect) -> Result<(), tonic::Status> {
    let channel = grpc::channel(
        url,
        Some(Duration::from_secs(3)),
        &Security::Mtls(std::sync::Arc::clone(tls)),
        expect,
    )
    .unwrap();
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ())
}

#[tokio::test]
async fn identities_decide_who_may_call() {
    let dir = std::env::temp_dir().join(format!("mtls-test-{}", std::process::id()));
    let ca = DevCa::new("test CA").unwrap();
    let rogue_ca = DevCa::new("someone else's CA").unwrap();
    let state = Tls::load(ca.write(&dir, "state", &Identity::State, &[]).unwrap()).unwrap();
    let admin = Tls::load(ca.write(&dir, "admin", &Identity::Admin, &[]).unwrap()).unwrap();
    let gateway = Tls::load(ca.write(&dir, "gw", &Identity::Gateway, &[]).unwrap()).unwrap();
    let rogue_dir = dir.join("rogue");
    let rogue = {
        // A client certificate from another CA, but trusting ours (so the client side of the
        // handshake succeeds and the server's judgement is what is tested).
        let files = rogue_ca
            .write(&rogue_dir, "admin", &Identity::Admin, &[])
            .unwrap();
        std::fs::copy(dir.join("ca.crt"), &files.ca).unwrap();
        Tls::load(files).unwrap()
    };
    let server = serve(std::sync::Arc::clone(&state)).await;
    let expect_state = Expect::Exactly(Identity::State);

    check(&server.url, &admin, expect_state.clone())
        .await
        .unwrap();

    let denied = check(&server.url, &gateway, expect_state.clone())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert_eq!(server.refusals.total("permission_denied"), 1);

    let untrusted = check(&server.url, &rogue, expect_state.clone())
        .await
        .unwrap_err();
    assert_eq!(
        untrusted.code(),
        tonic::Code::Unauthenticated,
        "{untrusted:?}"
    );
    assert_eq!(server.refusals.total("unauthenticated"), 1);
    assert!(
        !untrusted.message().contains("CA"),
        "no internals in the reply: {untrusted:?}"
    );

    // The client refuses a server that is not the one it expects.
    let wrong_server = check(&server.url, &admin, Expect::Kind(PeerKind::Media))
        .await
        .unwrap_err();
    assert_eq!(
        wrong_server.code(),
        tonic::Code::Unavailable,
        "{wrong_server:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let dir = std::env::temp_dir().join(format!("mtls-rotate-{}", std::process::id()));
    let ca = DevCa::new("test CA").unwrap();
    let files = ca.write(&dir, "state", &Identity::State, &[]).unwrap();
    let state = Tls::load(files.clone()).unwrap();
    let admin = Tls::load(ca.write(&dir, "admin", &Identity::Admin, &[]).unwrap()).unwrap();
    let server = serve(std::sync::Arc::clone(&state)).await;
    let first = std::fs::read(&files.cert).unwrap();
    check(&server.url, &admin, Expect::Exactly(Identity::State))
        .await
        .unwrap();

    // Unchanged files: nothing to do. A broken file: the old certificate stays.
    assert!(!state.reload().unwrap());
    std::fs::write(&files.key, "not a key").unwrap();
    assert!(state.reload().is_err());
    check(&server.url, &admin, Expect::Exactly(Identity::State))
        .await
        .unwrap();

    // A rotation: the new certificate (a new CA too, as when the CA itself rotates: the
    // bundle holds both) is what the next connection sees.
    let next_ca = DevCa::new("next CA").unwrap();
    let next = next_ca
        .write(&dir.join("next"), "state", &Identity::State, &[])
        .unwrap();
    std::fs::copy(&next.cert, &files.cert).unwrap();
    std::fs::copy(&next.key, &files.key).unwrap();
    std::fs::write(&files.ca, format!("{}{}", ca.ca_pem(), next_ca.ca_pem())).unwrap();
    assert!(state.reload().unwrap());
    assert_ne!(std::fs::read(&files.cert).unwrap(), first);
    // The admin trusts only the old CA, so a fresh connection now fails on the client's
    // side: the server really presents the new certificate.
    let stale = check(&server.url, &admin, Expect::Exactly(Identity::State))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), tonic::Code::Unavailable, "{stale:?}");
    let admin_files = talkgroup_common::tls::TlsFiles {
        ca: files.ca.clone(),
        ..ca.write(&dir.join("admin2"), "admin", &Identity::Admin, &[])
            .unwrap()
    };
    let admin = Tls::load(admin_files).unwrap();
    check(&server.url, &admin, Expect::Exactly(Identity::State))
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_public_server_certificate_is_reloaded_and_a_bad_one_is_not() {
    use talkgroup_common::tls::ServerCert;
    let dir = std::env::temp_dir().join(format!("server-cert-{}", std::process::id()));
    let ca = DevCa::new("public test CA").unwrap();
    let files = ca
        .write(&dir, "https", &Identity::Gateway, &["127.0.0.1"])
        .unwrap();
    let cert = ServerCert::load(&files.cert, &files.key, &[b"http/1.1"]).unwrap();
    let first = cert.config();
    assert_eq!(first.alpn_protocols, vec![b"http/1.1".to_vec()]);
    assert!(
        !cert.reload().unwrap(),
        "unchanged files are not a rotation"
    );

    // A half-written rotation (a certificate without its key) keeps the old configuration.
    let other = ca.issue(&Identity::Gateway, &["127.0.0.1"]).unwrap();
    std::fs::write(&files.cert, &other.cert_pem).unwrap();
    assert!(cert.reload().is_err());
    assert!(std::sync::Arc::ptr_eq(&first, &cert.config()));

    // The whole rotation is taken.
    std::fs::write(&files.key, &other.key_pem).unwrap();
    assert!(cert.reload().unwrap());
    assert!(!std::sync::Arc::ptr_eq(&first, &cert.config()));
    let _ = std::fs::remove_dir_all(&dir);
}

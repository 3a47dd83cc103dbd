//! The trust boundary between the services, on a running stack where every gRPC hop is mutual
//! TLS: each server authorises by the caller's certificate identity. A media node cannot
//! register another node's id; a gateway cannot grant roles; nobody but a gateway can drive a
//! media node; a certificate from another CA is refused. Every refusal changes nothing and is
//! counted on the server's `/metrics`. A rotated certificate is picked up without a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use talkgroup_common::devcerts::DevCa;
use talkgroup_common::grpc::Security;
use talkgroup_common::tls::{Expect, Identity, Tls};
use talkgroup_e2e::{Stack, Topology, http_get};
use talkgroup_proto::media::v1 as mpb;
use talkgroup_proto::state::v1 as spb;
use tonic::Code;

fn register(node_id: &str, port: u16) -> spb::RegisterNodeRequest {
    spb::RegisterNodeRequest {
        node: Some(spb::MediaNode {
            node_id: node_id.to_owned(),
            grpc_addr: format!("http://127.0.0.1:{port}"),
            announced_ip: "127.0.0.1".into(),
            capacity: 1_000_000,
            ..spb::MediaNode::default()
        }),
    }
}

async fn metric(addr: std::net::SocketAddr, name: &str) -> String {
    let (_, body) = http_get(addr, "/metrics").await.unwrap();
    body.lines()
        .filter(|l| l.starts_with(name))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_authorised_by_the_callers_certificate() {
    let stack = Stack::start(Topology::default()).await.unwrap();
    stack.ready().await.unwrap();

    // A media node may register itself, never another id (here: a node that does not exist,
    // with a huge capacity, so new channels would be placed on it).
    let media_1 = Identity::Media("media-1".into());
    let mut as_media = spb::media_registry_service_client::MediaRegistryServiceClient::new(
        stack.state_channel(0, &media_1).unwrap(),
    );
    let spoofed = as_media
        .register_node(register("media-0", 1))
        .await
        .unwrap_err();
    assert_eq!(spoofed.code(), Code::PermissionDenied, "{spoofed:?}");
    let drained = as_media
        .drain_node(spb::DrainNodeRequest {
            node_id: "media-0".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(drained.code(), Code::PermissionDenied, "{drained:?}");
    let nodes = stack.nodes().await.unwrap();
    assert_eq!(nodes.len(), 1, "nothing registered: {nodes:?}");
    assert!(!nodes[0].draining, "nothing drained");
    // ...nor list sessions or take floors.
    let mut media_floors = spb::floor_service_client::FloorServiceClient::new(
        stack.state_channel(0, &media_1).unwrap(),
    );
    let floor = media_floors
        .get_floor(spb::GetFloorRequest {
            channel_id: "ops".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(floor.code(), Code::PermissionDenied);

    // Nor grant anyone a role.
    let mut media_access = spb::access_service_client::AccessServiceClient::new(
        stack.state_channel(0, &media_1).unwrap(),
    );
    let escalation = media_access
        .set_user_grants(spb::SetUserGrantsRequest {
            user_id: "u-mallory".into(),
            grants: vec![spb::Grant {
                channel_id: "ops".into(),
                role: spb::Role::Admin as i32,
            }],
            replace: true,
        })
        .await
        .unwrap_err();
    assert_eq!(escalation.code(), Code::PermissionDenied, "{escalation:?}");

    // A gateway cannot register a media node (it would pick where channels go).
    let mut gateway_registry = spb::media_registry_service_client::MediaRegistryServiceClient::new(
        stack.state_channel(0, &Identity::Gateway).unwrap(),
    );
    let spoofed = gateway_registry
        .register_node(register("media-x", 1))
        .await
        .unwrap_err();
    assert_eq!(spoofed.code(), Code::PermissionDenied, "{spoofed:?}");
    assert_eq!(stack.nodes().await.unwrap().len(), 1, "nothing registered");

    // A gateway serves clients but cannot grant anyone a role; an admin can.
    let grant = spb::SetUserGrantsRequest {
        user_id: "u-mallory".into(),
        grants: vec![spb::Grant {
            channel_id: "ops".into(),
            role: spb::Role::Admin as i32,
        }],
        replace: true,
    };
    let mut as_gateway = spb::access_service_client::AccessServiceClient::new(
        stack.state_channel(0, &Identity::Gateway).unwrap(),
    );
    let escalation = as_gateway.set_user_grants(grant.clone()).await.unwrap_err();
    assert_eq!(escalation.code(), Code::PermissionDenied, "{escalation:?}");
    let stored = stack
        .access()
        .await
        .unwrap()
        .get_user_grants(spb::GetUserGrantsRequest {
            user_id: "u-mallory".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stored.grants.is_empty(), "nothing granted: {stored:?}");

    // Only gateways drive a media node: an admin may read its statistics, nothing more.
    let mut media_as_admin = mpb::media_service_client::MediaServiceClient::new(
        stack.media_channel(0, &Identity::Admin).unwrap(),
    );
    media_as_admin
        .get_node_stats(mpb::GetNodeStatsRequest {
            reset_latency: false,
        })
        .await
        .unwrap();
    let floor = media_as_admin
        .set_floor(mpb::SetFloorRequest {
            channel_id: "ops".into(),
            producer_id: String::new(),
            epoch: u64::MAX / 2,
            expires_at_ms: 0,
            lease_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(floor.code(), Code::PermissionDenied, "{floor:?}");
    let mut media_as_media = mpb::media_service_client::MediaServiceClient::new(
        stack.media_channel(0, &media_1).unwrap(),
    );
    let transport = media_as_media
        .create_transport(mpb::CreateTransportRequest::default())
        .await
        .unwrap_err();
    assert_eq!(transport.code(), Code::PermissionDenied, "{transport:?}");
    let consume = media_as_admin
        .consume(mpb::ConsumeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(consume.code(), Code::PermissionDenied, "{consume:?}");
    let stats = media_as_admin
        .get_node_stats(mpb::GetNodeStatsRequest {
            reset_latency: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.transports, 0, "no transport was created: {stats:?}");

    // A certificate from another CA naming "admin" gets nothing.
    let rogue_dir = stack.certs.dir.join("rogue");
    let rogue_ca = DevCa::new("not the deployment's CA").unwrap();
    let mut rogue_files = rogue_ca
        .write(&rogue_dir, "admin", &Identity::Admin, &[])
        .unwrap();
    rogue_files.ca = stack.certs.dir.join("ca.crt");
    let rogue = Security::Mtls(Tls::load(rogue_files).unwrap());
    let channel = talkgroup_common::grpc::channel(
        &stack.state_url(0),
        Some(Duration::from_secs(5)),
        &rogue,
        Expect::Exactly(Identity::State),
    )
    .unwrap();
    let untrusted = spb::media_registry_service_client::MediaRegistryServiceClient::new(channel)
        .list_nodes(spb::ListNodesRequest {})
        .await
        .unwrap_err();
    assert_eq!(untrusted.code(), Code::Unauthenticated, "{untrusted:?}");

    // Plaintext to a TLS port gets no answer at all.
    let plain = tonic::transport::Endpoint::from_shared(stack.state_url(0))
        .unwrap()
        .timeout(Duration::from_secs(3))
        .connect_lazy();
    let refused = spb::media_registry_service_client::MediaRegistryServiceClient::new(plain)
        .list_nodes(spb::ListNodesRequest {})
        .await
        .unwrap_err();
    // The server drops the connection; the client reports that as one of these, depending on
    // when it notices (a close during its first write is `Cancelled`, "connection closed").
    assert!(
        matches!(
            refused.code(),
            Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
        ),
        "{refused:?}"
    );

    // The refusals are counted where they happened.
    let state_metrics = stack.state[0].logged_addr("metrics listening").unwrap();
    let counted = metric(state_metrics, "ptt_grpc_refused_total").await;
    for line in [
        r#"ptt_grpc_refused_total{reason="permission_denied",role="media"} 4"#,
        r#"ptt_grpc_refused_total{reason="permission_denied",role="gateway"} 2"#,
        r#"ptt_grpc_refused_total{reason="unauthenticated",role="none"} 1"#,
    ] {
        assert!(counted.contains(line), "{line} in:\n{counted}");
    }
    assert!(
        counted.contains(r#"reason="handshake""#),
        "the plaintext attempt failed the handshake:\n{counted}"
    );
    let media_metrics = stack.media[0].logged_addr("metrics listening").unwrap();
    let counted = metric(media_metrics, "ptt_grpc_refused_total").await;
    assert!(
        counted.contains(r#"ptt_grpc_refused_total{reason="permission_denied",role="admin"} 2"#)
            && counted
                .contains(r#"ptt_grpc_refused_total{reason="permission_denied",role="media"} 1"#),
        "{counted}"
    );

    // The stack still works for its clients.
    let mut ana = stack.client(0, "u-ana", "Ana").await;
    ana.join("ops").await;
    let granted = ana.ptt_start("ops").await;
    assert_eq!(granted["granted"], true, "{granted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_used_without_a_restart() {
    let stack = Stack::start(Topology::default()).await.unwrap();
    stack.ready().await.unwrap();
    let reloaded = |stack: &Stack| {
        stack.state[0]
            .logs()
            .iter()
            .filter(|l| l.contains("TLS certificate reloaded"))
            .count()
    };
    assert_eq!(reloaded(&stack), 0);
    // cert-manager renews in place: same paths, a new key and certificate.
    stack.certs.issue("state", &Identity::State).unwrap();
    testkit::wait_until(
        Duration::from_secs(10),
        "state-svc reloads its certificate",
        || {
            let n = reloaded(&stack);
            async move { n == 1 }
        },
    )
    .await
    .unwrap();
    // Fresh connections (a new client, the gateway's next reconnect) use the new one; the
    // existing ones carry on.
    assert_eq!(stack.nodes().await.unwrap().len(), 1);
    let mut ana = stack.client(0, "u-ana", "Ana").await;
    ana.join("ops").await;
    let granted = ana.ptt_start("ops").await;
    assert_eq!(granted["granted"], true, "{granted}");
}

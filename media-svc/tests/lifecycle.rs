//! Transport teardown, and the node's life with state-svc: registration, load, floor watch,
//! draining.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use media_svc::Config;
use support::{TestNode, listener, set_floor, speaker, stats};
use talkgroup_proto::media::v1 as pb;
use talkgroup_proto::state::v1 as spb;
use testkit::wait_until;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The media nodes the registry knows.
async fn nodes(
    mut registry: spb::media_registry_service_client::MediaRegistryServiceClient<
        tonic::transport::Channel,
    >,
) -> Vec<spb::MediaNode> {
    registry
        .list_nodes(spb::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_create_close_cycles_leak_no_sockets_or_memory() {
    let config = Config::for_tests();
    let node = TestNode::start(config).await;
    let mut client = node.client().await;
    let cycle = |client: &mut support::Client, i: usize| {
        let mut client = client.clone();
        async move {
            let direction = if i.is_multiple_of(2) {
                pb::Direction::Send
            } else {
                pb::Direction::Recv
            };
            let created = client
                .create_transport(pb::CreateTransportRequest {
                    channel_id: format!("ch{}", i % 7),
                    session_id: format!("s{i}"),
                    direction: direction.into(),
                })
                .await
                .unwrap()
                .into_inner();
            let sdp = created.offer.unwrap().sdp;
            let candidate = support::udp_candidate(&sdp);
            assert!(candidate.ip().is_loopback(), "candidate on loopback");
            let port = candidate.port();
            client
                .close_transport(pb::CloseTransportRequest {
                    transport_id: created.transport_id,
                    session_id: format!("s{i}"),
                })
                .await
                .unwrap();
            port
        }
    };
    // Warm up allocator pools and lazily created runtime state before the baseline.
    let mut ports = std::collections::BTreeSet::new();
    for i in 0..50 {
        ports.insert(cycle(&mut client, i).await);
    }
    let (fds_before, rss_before) = (open_fds(), testkit::process_rss_kib("self"));
    for i in 0..1_000 {
        ports.insert(cycle(&mut client, i).await);
    }
    assert_eq!(
        ports.len(),
        1,
        "every transport offers the node's one port: {ports:?}"
    );
    wait_until(Duration::from_secs(10), "sockets to be closed", || async {
        open_fds() <= fds_before + 4
    })
    .await
    .unwrap_or_else(|_| panic!("open fds grew from {fds_before} to {}", open_fds()));
    let rss_after = testkit::process_rss_kib("self");
    eprintln!(
        "1000 cycles: fds {fds_before} -> {}, rss {rss_before} KiB -> {rss_after} KiB",
        open_fds()
    );
    assert!(
        rss_after < rss_before + 16 * 1024,
        "rss grew from {rss_before} KiB to {rss_after} KiB"
    );
    assert_eq!(stats(&mut client).await.transports, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_with_state_svc_follows_floor_revokes_and_drains() {
    // A real state-svc (in-memory store) for the node to register with.
    let state_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let state_addr = state_listener.local_addr().unwrap();
    let mut state_config = state_svc::Config::for_tests();
    state_config.tls =
        talkgroup_common::devcerts::TestPki::global().args(&talkgroup_common::tls::Identity::State);
    state_config.node_heartbeat_ms = 100;
    state_config.node_dead_after_ms = 1_000;
    state_config.lease_ms = 300;
    let state_stop = tokio_util::sync::CancellationToken::new();
    let state = tokio::spawn(state_svc::run(
        state_config,
        state_listener,
        state_stop.clone(),
    ));
    let state_channel = talkgroup_common::devcerts::TestPki::global().channel(
        state_addr,
        &talkgroup_common::tls::Identity::Gateway,
        talkgroup_common::tls::Identity::State,
    );
    let mut registry =
        spb::media_registry_service_client::MediaRegistryServiceClient::new(state_channel.clone());
    let mut sessions =
        spb::session_service_client::SessionServiceClient::new(state_channel.clone());
    let mut floors = spb::floor_service_client::FloorServiceClient::new(state_channel);

    let mut config = Config::for_tests();
    config.node_id = Some("media-a".into());
    config.state_url = Some(format!("http://{state_addr}"));
    let node = TestNode::start(config).await;
    wait_until(Duration::from_secs(5), "node registered and live", || {
        let registry = registry.clone();
        async move {
            nodes(registry)
                .await
                .iter()
                .any(|n| n.node_id == "media-a" && n.live)
        }
    })
    .await
    .unwrap();
    let placed = registry
        .place_channel(spb::PlaceChannelRequest {
            channel_id: "ops".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(placed.node.unwrap().node_id, "media-a");

    // A session talks through the state service; the gateway (this test) names its producer.
    let session = sessions
        .create_session(spb::CreateSessionRequest {
            user_id: "u-a".into(),
            user_name: "Ana".into(),
            gateway_id: "gw".into(),
            ttl_ms: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .session_id;
    sessions
        .join_channel(spb::JoinChannelRequest {
            session_id: session.clone(),
            channel_id: "ops".into(),
        })
        .await
        .unwrap();
    let mut client = node.client().await;
    let (a, producer) = speaker(&mut client, &session, "ops").await;
    let (ear, _, _) = listener(&mut client, "listener", "ops", false).await;
    wait_until(Duration::from_secs(5), "load reported", || {
        let registry = registry.clone();
        async move { nodes(registry).await[0].load == 2 }
    })
    .await
    .unwrap();
    let grant = floors
        .acquire_floor(spb::AcquireFloorRequest {
            channel_id: "ops".into(),
            session_id: session.clone(),
            priority: 0,
            min_epoch: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let epoch = grant.holder.unwrap().epoch;
    set_floor(&mut client, "ops", Some(&producer), epoch).await;
    let mut tone = support::Tone::new(440.0);
    tone.play(&a, 5).await;
    wait_until(Duration::from_secs(5), "audio", || async {
        ear.received().len() >= 5
    })
    .await
    .unwrap();

    // Nobody renews: state-svc expires the lease and the node cuts the speaker on its own,
    // with no gateway telling it.
    wait_until(
        Duration::from_secs(5),
        "the node to learn the floor expired",
        || {
            let mut floors = floors.clone();
            async move {
                floors
                    .get_floor(spb::GetFloorRequest {
                        channel_id: "ops".into(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .holder
                    .is_none()
            }
        },
    )
    .await
    .unwrap();
    let revoked = wait_until(Duration::from_secs(5), "a higher epoch at the node", || {
        let mut client = client.clone();
        async move {
            // A stale SetFloor at the old epoch is refused once the node saw the expiry.
            !set_floor(&mut client, "ops", Some("nobody"), epoch)
                .await
                .applied
        }
    })
    .await;
    assert!(
        revoked.is_ok(),
        "the node applied the expiry from state-svc"
    );

    // SIGTERM: health goes NOT_SERVING at once, the registry marks the node draining, and the
    // process ends once its last transports close.
    node.shutdown.cancel();
    wait_until(Duration::from_secs(5), "registry sees draining", || {
        let registry = registry.clone();
        async move { nodes(registry).await.iter().any(|n| n.draining) }
    })
    .await
    .unwrap();
    let refused = client
        .create_transport(pb::CreateTransportRequest {
            channel_id: "new".into(),
            session_id: "x".into(),
            direction: pb::Direction::Recv.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::Unavailable,
        "no new channels while draining"
    );
    client
        .close_session(pb::CloseSessionRequest {
            session_id: session.clone(),
        })
        .await
        .unwrap();
    client
        .close_session(pb::CloseSessionRequest {
            session_id: "listener".into(),
        })
        .await
        .unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(5), node.handle).await;
    assert!(matches!(stopped, Ok(Ok(Ok(())))), "node exits once empty");
    a.close().await;
    ear.close().await;
    state_stop.cancel();
    let _ = state.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transports_that_never_connect_or_lose_their_peer_are_closed() {
    let mut config = Config::for_tests();
    config.connect_timeout_ms = 1_000;
    let node = TestNode::start(config).await;
    let mut client = node.client().await;
    // Connected ones stay.
    let (_mic, _) = speaker(&mut client, "s-speaker", "ch").await;
    let (_ear, _, _) = listener(&mut client, "s-listener", "ch", false).await;
    // Never answered, and answered by a peer that never shows up.
    for (session, direction) in [("s-a", pb::Direction::Recv), ("s-b", pb::Direction::Send)] {
        client
            .create_transport(pb::CreateTransportRequest {
                channel_id: "ch".into(),
                session_id: session.into(),
                direction: direction.into(),
            })
            .await
            .unwrap();
    }
    let ghost = client
        .create_transport(pb::CreateTransportRequest {
            channel_id: "ch".into(),
            session_id: "s-ghost".into(),
            direction: pb::Direction::Recv.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut absent = testkit::media::Peer::new(false).await;
    let answer = absent.answer(&ghost.offer.unwrap().sdp, false).await;
    absent.close().await;
    support::connect(&mut client, &ghost.transport_id, "s-ghost", answer).await;
    assert_eq!(stats(&mut client).await.transports, 5);

    wait_until(
        Duration::from_secs(5),
        "unconnected transports closed",
        || {
            let mut client = client.clone();
            async move { stats(&mut client).await.transports == 2 }
        },
    )
    .await
    .unwrap();
    // The two that connected are still served: still 2 a moment later.
    let closed = client
        .close_transport(pb::CloseTransportRequest {
            transport_id: ghost.transport_id,
            session_id: "s-ghost".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        closed.code(),
        tonic::Code::NotFound,
        "the ghost's transport is gone"
    );
    assert_eq!(stats(&mut client).await.transports, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_gateways_make_media_calls_and_admins_only_read_stats() {
    use talkgroup_common::tls::Identity;
    let node = TestNode::start(Config::for_tests()).await;
    let create = || pb::CreateTransportRequest {
        channel_id: "ch".into(),
        session_id: "s-intruder".into(),
        direction: pb::Direction::Recv.into(),
    };
    for identity in [
        Identity::Media("media-other".into()),
        Identity::State,
        Identity::Admin,
    ] {
        let refused = node
            .client_as(&identity)
            .create_transport(create())
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{identity}");
    }
    // Nothing was created by the refused calls.
    let mut admin = node.client_as(&Identity::Admin);
    assert_eq!(stats(&mut admin).await.transports, 0);
    node.client()
        .await
        .create_transport(create())
        .await
        .unwrap();
    assert_eq!(stats(&mut admin).await.transports, 1);
}

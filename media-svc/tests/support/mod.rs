//! Harness for media-svc tests: the real node on `127.0.0.1:0` with mutual TLS (its
//! certificate names its node id; a throwaway CA per test binary), a gRPC client dialling as a
//! gateway, client peers from the `webrtc` crate, and Opus tones.

#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

pub use testkit::media::{Tone, analyse};

/// The client peer, as the tests call it.
pub mod peer {
    pub use testkit::media::{Peer, Received};
}

use std::net::SocketAddr;

use media_svc::Config;
use talkgroup_common::devcerts::TestPki;
use talkgroup_common::tls::Identity;
use talkgroup_proto::media::v1 as pb;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub type Client = pb::media_service_client::MediaServiceClient<Channel>;

pub struct TestNode {
    pub addr: SocketAddr,
    /// The node id its certificate names.
    pub node_id: String,
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<Result<(), media_svc::RunError>>,
}

impl TestNode {
    pub async fn start(mut config: Config) -> Self {
        config.drain_timeout_ms = config.drain_timeout_ms.min(5_000);
        let node_id = config
            .node_id
            .clone()
            .unwrap_or_else(|| "media-test".to_owned());
        config.tls = TestPki::global().args(&Identity::Media(node_id.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(media_svc::run(config, listener, shutdown.clone()));
        Self {
            addr,
            node_id,
            shutdown,
            handle,
        }
    }

    /// A client dialling as a gateway.
    pub async fn client(&self) -> Client {
        self.client_as(&Identity::Gateway)
    }

    /// A client dialling as `identity`.
    pub fn client_as(&self, identity: &Identity) -> Client {
        Client::new(TestPki::global().channel(
            self.addr,
            identity,
            Identity::Media(self.node_id.clone()),
        ))
    }
}

/// A connected speaker: its peer and producer id.
pub async fn speaker(client: &mut Client, session: &str, channel: &str) -> (peer::Peer, String) {
    let (peer, _, producer) = speaker_transport(client, session, channel).await;
    (peer, producer)
}

/// A connected speaker: its peer, transport id and producer id.
pub async fn speaker_transport(
    client: &mut Client,
    session: &str,
    channel: &str,
) -> (peer::Peer, String, String) {
    let created = client
        .create_transport(pb::CreateTransportRequest {
            channel_id: channel.into(),
            session_id: session.into(),
            direction: pb::Direction::Send.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut peer = peer::Peer::new(false).await;
    let answer = peer.answer(&created.offer.unwrap().sdp, true).await;
    connect(client, &created.transport_id, session, answer).await;
    let producer = client
        .produce(pb::ProduceRequest {
            transport_id: created.transport_id.clone(),
            session_id: session.into(),
            channel_id: channel.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .producer_id;
    peer.wait_connected().await;
    (peer, created.transport_id, producer)
}

/// Restarts a transport's ICE and has its peer answer the new offer.
pub async fn restart_ice(
    client: &mut Client,
    transport_id: &str,
    session: &str,
    peer: &peer::Peer,
) {
    let offer = client
        .restart_ice(pb::RestartIceRequest {
            transport_id: transport_id.into(),
            session_id: session.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .offer
        .unwrap()
        .sdp;
    let answer = peer.reanswer(&offer).await;
    connect(client, transport_id, session, answer).await;
}

/// A connected listener: its peer, transport id and the SSRC it receives.
pub async fn listener(
    client: &mut Client,
    session: &str,
    channel: &str,
    stalled: bool,
) -> (peer::Peer, String, u32) {
    let (transport_id, offer) = recv_offer(client, session, channel).await;
    let (peer, ssrc) = listen_on(
        client,
        session,
        channel,
        transport_id.clone(),
        &offer,
        stalled,
    )
    .await;
    (peer, transport_id, ssrc)
}

/// A receive transport of `channel`: its id and the node's offer.
pub async fn recv_offer(client: &mut Client, session: &str, channel: &str) -> (String, String) {
    let created = client
        .create_transport(pb::CreateTransportRequest {
            channel_id: channel.into(),
            session_id: session.into(),
            direction: pb::Direction::Recv.into(),
        })
        .await
        .unwrap()
        .into_inner();
    (created.transport_id, created.offer.unwrap().sdp)
}

/// Answers `offer` with a listening peer, connects and consumes; the peer (connected) and the
/// SSRC it receives.
pub async fn listen_on(
    client: &mut Client,
    session: &str,
    channel: &str,
    transport_id: String,
    offer: &str,
    stalled: bool,
) -> (peer::Peer, u32) {
    let mut peer = peer::Peer::new(stalled).await;
    let answer = peer.answer(offer, false).await;
    connect(client, &transport_id, session, answer).await;
    let consumed = client
        .consume(pb::ConsumeRequest {
            transport_id,
            session_id: session.into(),
            channel_id: channel.into(),
        })
        .await
        .unwrap()
        .into_inner();
    peer.wait_connected().await;
    (peer, consumed.ssrc)
}

/// The node's UDP candidate in an offer
/// (`a=candidate:<foundation> 1 udp <priority> <ip> <port> typ host`).
pub fn udp_candidate(sdp: &str) -> SocketAddr {
    let fields: Vec<&str> = sdp
        .lines()
        .find(|l| l.starts_with("a=candidate:") && l.contains(" udp "))
        .expect("a UDP candidate")
        .split(' ')
        .collect();
    format!("{}:{}", fields[4], fields[5]).parse().unwrap()
}

/// Hands the client's answer to the node.
pub async fn connect(client: &mut Client, transport_id: &str, session: &str, sdp: String) {
    client
        .connect_transport(pb::ConnectTransportRequest {
            transport_id: transport_id.into(),
            session_id: session.into(),
            payload: Some(pb::connect_transport_request::Payload::Answer(
                pb::SessionDescription {
                    r#type: "answer".into(),
                    sdp,
                },
            )),
        })
        .await
        .unwrap();
}

pub async fn set_floor(
    client: &mut Client,
    channel: &str,
    producer: Option<&str>,
    epoch: u64,
) -> pb::SetFloorResponse {
    // A duration, as gateways give it: the node ends the grant on its own clock.
    client
        .set_floor(pb::SetFloorRequest {
            channel_id: channel.into(),
            producer_id: producer.unwrap_or_default().into(),
            epoch,
            expires_at_ms: 0,
            lease_ms: if producer.is_some() { 30_000 } else { 0 },
        })
        .await
        .unwrap()
        .into_inner()
}

pub async fn stats(client: &mut Client) -> pb::NodeStats {
    client
        .get_node_stats(pb::GetNodeStatsRequest {
            reset_latency: false,
        })
        .await
        .unwrap()
        .into_inner()
}

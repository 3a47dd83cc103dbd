//! A client of the WebSocket protocol, with real WebRTC media: what an app does, step by step.

use std::net::SocketAddr;

use serde_json::{Value, json};
use talkgroup_wire::Request;
use talkgroup_wire::request::{
    ChannelRef, ConnectTransport, CreateTransport, Produce, PttStart, SessionDescription,
    TransportDirection, TransportRef,
};
use testkit::media::Peer;
use testkit::ws::WsClient;

fn channel_ref(channel: &str) -> ChannelRef {
    ChannelRef {
        channel_id: channel.to_owned(),
    }
}

/// `connect-transport` with the client's answer.
fn connect(transport: &str, answer: &str) -> Request {
    Request::ConnectTransport(ConnectTransport {
        transport_id: transport.to_owned(),
        answer: Some(SessionDescription {
            kind: "answer".into(),
            sdp: answer.to_owned(),
        }),
        candidate: None,
    })
}

fn produce(channel: &str, transport: &str) -> Request {
    Request::Produce(Produce {
        transport_id: transport.to_owned(),
        channel_id: channel.to_owned(),
        kind: "audio".into(),
    })
}

/// A token for `user` signed with the stack's secret, allowed to talk in every channel.
pub fn token(user: &str, name: &str) -> String {
    token_with_grants(user, name, &json!({"*": "talk"}))
}

/// A token for `user` with the given `grants` claim (channel or `*` -> role).
pub fn token_with_grants(user: &str, name: &str, grants: &Value) -> String {
    testkit::jwt::token(crate::SECRET, user, name, grants, 3_600)
}

/// A protocol client ([`WsClient`]: requests, replies, pushes) that also negotiates media.
#[derive(Debug)]
pub struct Client {
    inner: WsClient,
    pub user: String,
}

impl std::ops::Deref for Client {
    type Target = WsClient;
    fn deref(&self) -> &WsClient {
        &self.inner
    }
}

impl std::ops::DerefMut for Client {
    fn deref_mut(&mut self) -> &mut WsClient {
        &mut self.inner
    }
}

impl Client {
    pub async fn connect(addr: SocketAddr, user: &str, name: &str) -> Self {
        Self::connect_with(addr, user, name, &json!({"*": "talk"})).await
    }

    /// The protocol client inside (for [`WsClient::keep_reading`]).
    pub fn into_ws(self) -> WsClient {
        self.inner
    }

    /// Wraps an already signed-in protocol client.
    pub fn from_ws(inner: WsClient, user: &str) -> Self {
        Self {
            inner,
            user: user.to_owned(),
        }
    }

    /// Signs in and takes over the session of `resume` (the token of its `session` push).
    pub async fn resume(addr: SocketAddr, user: &str, name: &str, resume: &str) -> Self {
        Self {
            inner: WsClient::resume(addr, &token(user, name), resume).await,
            user: user.to_owned(),
        }
    }

    /// Signs in with a token carrying `grants` (channel or `*` -> role).
    pub async fn connect_with(addr: SocketAddr, user: &str, name: &str, grants: &Value) -> Self {
        Self {
            inner: WsClient::connect(addr, &token_with_grants(user, name, grants)).await,
            user: user.to_owned(),
        }
    }

    /// The next `speaker-changed` of `channel` with `reason`.
    pub async fn speaker_changed(&mut self, channel: &str, reason: &str) -> Value {
        self.push_where("speaker-changed", |d| {
            d["channelId"] == channel && d["reason"] == reason
        })
        .await["data"]
            .clone()
    }

    pub async fn join(&mut self, channel: &str) -> Value {
        self.ok_request(Request::JoinChannel(channel_ref(channel)))
            .await["channel"]
            .clone()
    }

    pub async fn ptt_start(&mut self, channel: &str) -> Value {
        self.ok_request(Request::PttStart(PttStart {
            channel_id: channel.to_owned(),
            priority: None,
        }))
        .await
    }

    pub async fn ptt_stop(&mut self, channel: &str) {
        self.ok_request(Request::PttStop(channel_ref(channel)))
            .await;
    }

    /// Creates a transport of `direction`, answers the server's offer with a new peer (with a
    /// microphone track when sending) and connects it: (peer, transport id).
    async fn negotiate(&mut self, channel: &str, direction: &str) -> (Peer, String) {
        let (peer, transport, _) = self.negotiate_with(channel, direction, None).await;
        (peer, transport)
    }

    /// As [`Client::negotiate`]; with `relay`, the peer may use only the TURN relay the reply
    /// handed out (`Some(true)` spoils its credential). Also the answer SDP.
    async fn negotiate_with(
        &mut self,
        channel: &str,
        direction: &str,
        relay: Option<bool>,
    ) -> (Peer, String, String) {
        self.negotiate_built(channel, direction, |server| async move {
            match relay {
                None => Peer::new(false).await,
                Some(forge) => Peer::relayed(relay_of(&server, forge)).await,
            }
        })
        .await
    }

    /// A transport whose peer the caller builds from the relay the gateway hands out (on
    /// another runtime, say: a network namespace's): (peer, transport id, answer SDP).
    pub async fn negotiate_relayed_with<F, Fut>(
        &mut self,
        channel: &str,
        direction: &str,
        build: F,
    ) -> (Peer, String, String)
    where
        F: FnOnce(testkit::media::Relay) -> Fut,
        Fut: std::future::Future<Output = Peer>,
    {
        self.negotiate_built(channel, direction, |server| build(relay_of(&server, false)))
            .await
    }

    /// Creates a transport, builds its peer from the first `iceServers` entry, answers the
    /// node's offer and connects: (peer, transport id, answer SDP).
    async fn negotiate_built<F, Fut>(
        &mut self,
        channel: &str,
        direction: &str,
        build: F,
    ) -> (Peer, String, String)
    where
        F: FnOnce(Value) -> Fut,
        Fut: std::future::Future<Output = Peer>,
    {
        let direction_of = if direction == "send" {
            TransportDirection::Send
        } else {
            TransportDirection::Recv
        };
        let created = self
            .ok_request(Request::CreateTransport(CreateTransport {
                channel_id: channel.to_owned(),
                direction: direction_of,
            }))
            .await;
        let mut peer = build(created["iceServers"][0].clone()).await;
        let answer = peer
            .answer(
                created["offer"]["sdp"].as_str().unwrap(),
                direction == "send",
            )
            .await;
        let transport = created["transportId"].as_str().unwrap().to_owned();
        self.ok_request(connect(&transport, &answer)).await;
        (peer, transport, answer)
    }

    /// Starts producing on a send transport made by [`Client::negotiate_relayed_with`].
    pub async fn produce(&mut self, channel: &str, transport: &str) {
        self.ok_request(produce(channel, transport)).await;
    }

    /// A send transport with a producer: the peer to speak from.
    pub async fn speaker(&mut self, channel: &str) -> Peer {
        let (peer, transport) = self.negotiate(channel, "send").await;
        self.ok_request(produce(channel, &transport)).await;
        peer.wait_connected().await;
        peer
    }

    /// A recv transport consuming the channel's stream: the peer to listen with, and the SSRC
    /// the stream arrives on.
    pub async fn listener(&mut self, channel: &str) -> (Peer, u32) {
        let (peer, _, ssrc) = self.listener_transport(channel).await;
        (peer, ssrc)
    }

    /// As [`Client::listener`], with the transport's id.
    pub async fn listener_transport(&mut self, channel: &str) -> (Peer, String, u32) {
        let (peer, transport) = self.negotiate(channel, "recv").await;
        let consumed = self
            .ok_request(Request::Consume(channel_ref(channel)))
            .await;
        peer.wait_connected().await;
        (peer, transport, consumed["ssrc"].as_u64().unwrap() as u32)
    }

    /// Restarts a transport's ICE through the gateway (`restart-ice`) and answers the new
    /// offer with the same peer (`connect-transport`): the reply to `restart-ice`.
    pub async fn restart_ice(&mut self, transport: &str, peer: &Peer) -> Value {
        let restarted = self
            .ok_request(Request::RestartIce(TransportRef {
                transport_id: transport.to_owned(),
            }))
            .await;
        let answer = peer
            .reanswer(restarted["offer"]["sdp"].as_str().unwrap())
            .await;
        self.ok_request(connect(transport, &answer)).await;
        restarted
    }

    /// A recv transport whose peer may use only the TURN relay `create-transport` handed out
    /// (`forge` spoils its credential): the peer, its transport id and its answer SDP, which
    /// carries a `typ relay` candidate only if the relay accepted the credential. Not
    /// consumed yet.
    pub async fn relayed_recv(&mut self, channel: &str, forge: bool) -> (Peer, String, String) {
        self.negotiate_with(channel, "recv", Some(forge)).await
    }

    /// Consumes `channel` on this socket's recv transport: the SSRC the stream arrives on.
    pub async fn consume(&mut self, channel: &str) -> u32 {
        let consumed = self
            .ok_request(Request::Consume(channel_ref(channel)))
            .await;
        consumed["ssrc"].as_u64().unwrap() as u32
    }

    /// The next `transport-closed` push of `channel` for a transport of `direction`.
    pub async fn transport_closed(&mut self, channel: &str, direction: &str) -> Value {
        self.push_where("transport-closed", |d| {
            d["channelId"] == channel && d["direction"] == direction
        })
        .await["data"]
            .clone()
    }

    /// Closes the socket with a close frame: the gateway ends its session at once.
    pub async fn close(mut self) {
        let _ = self.inner.ws.close(None).await;
    }
}

/// The TURN relay of one `iceServers` entry; `forge` spoils its credential.
fn relay_of(server: &Value, forge: bool) -> testkit::media::Relay {
    testkit::media::Relay {
        urls: server["urls"]
            .as_array()
            .expect("the gateway hands out a relay")
            .iter()
            .map(|u| u.as_str().unwrap().to_owned())
            .collect(),
        username: server["username"].as_str().unwrap().to_owned(),
        credential: if forge {
            "Zm9yZ2VkLWNyZWRlbnRpYWw=".to_owned()
        } else {
            server["credential"].as_str().unwrap().to_owned()
        },
    }
}

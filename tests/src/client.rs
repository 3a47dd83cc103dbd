//! A client of the WebSocket protocol, with real WebRTC media: what an app does, step by step.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use testkit::media::Peer;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A token for `user` signed with the stack's secret.
pub fn token(user: &str, name: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({"sub": user, "name": name, "exp": now + 3600});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(crate::SECRET.as_bytes()),
    )
    .unwrap()
}

#[derive(Debug)]
pub struct Client {
    ws: Ws,
    next_id: u64,
    /// Pushes (and stale replies) received while waiting for something else.
    pub pushes: Vec<Value>,
    pub user: String,
}

impl Client {
    pub async fn connect(addr: SocketAddr, user: &str, name: &str) -> Self {
        let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {}", token(user, name)).parse().unwrap(),
        );
        let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        Self {
            ws,
            next_id: 0,
            pushes: Vec::new(),
            user: user.to_owned(),
        }
    }

    async fn next_frame(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), self.ws.next())
                .await
                .expect("a frame within 10 s")
                .expect("socket open")
                .expect("frame ok");
            if let Message::Text(t) = msg {
                return serde_json::from_str(t.as_str()).unwrap();
            }
        }
    }

    /// Sends a request without waiting; returns its id.
    pub async fn send(&mut self, kind: &str, data: Value) -> String {
        self.next_id += 1;
        let id = self.next_id.to_string();
        let frame = json!({"type": kind, "id": id, "data": data});
        self.ws
            .send(Message::Text(frame.to_string().into()))
            .await
            .unwrap();
        id
    }

    /// The reply to request `id`; pushes meanwhile are kept.
    pub async fn reply(&mut self, id: &str) -> Value {
        if let Some(i) = self.pushes.iter().position(|p| p["id"] == id) {
            return self.pushes.remove(i);
        }
        loop {
            let frame = self.next_frame().await;
            if frame["id"] == id {
                return frame;
            }
            self.pushes.push(frame);
        }
    }

    /// Sends a request and returns its reply frame.
    pub async fn request(&mut self, kind: &str, data: Value) -> Value {
        let id = self.send(kind, data).await;
        self.reply(&id).await
    }

    /// Sends a request and returns its reply's `data`; panics on an error reply.
    pub async fn ok(&mut self, kind: &str, data: Value) -> Value {
        let reply = self.request(kind, data).await;
        assert_ne!(reply["type"], "error", "{kind} failed: {reply}");
        reply["data"].clone()
    }

    /// The next push of `kind` matching `filter` (kept or new).
    pub async fn push_where(&mut self, kind: &str, filter: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self
            .pushes
            .iter()
            .position(|p| p["type"] == kind && filter(&p["data"]))
        {
            return self.pushes.remove(i);
        }
        loop {
            let frame = self.next_frame().await;
            if frame["type"] == kind && filter(&frame["data"]) {
                return frame;
            }
            self.pushes.push(frame);
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
        self.ok("join-channel", json!({"channelId": channel})).await["channel"].clone()
    }

    pub async fn ptt_start(&mut self, channel: &str) -> Value {
        self.ok("ptt-start", json!({"channelId": channel})).await
    }

    pub async fn ptt_stop(&mut self, channel: &str) {
        self.ok("ptt-stop", json!({"channelId": channel})).await;
    }

    /// Creates a transport of `direction`, answers the server's offer with a new peer (with a
    /// microphone track when sending) and connects it: (peer, transport id).
    async fn negotiate(&mut self, channel: &str, direction: &str) -> (Peer, String) {
        let created = self
            .ok(
                "create-transport",
                json!({"channelId": channel, "direction": direction}),
            )
            .await;
        let mut peer = Peer::new(false).await;
        let answer = peer
            .answer(
                created["offer"]["sdp"].as_str().unwrap(),
                direction == "send",
            )
            .await;
        let transport = created["transportId"].as_str().unwrap().to_owned();
        self.ok(
            "connect-transport",
            json!({"transportId": transport, "answer": {"type": "answer", "sdp": answer}}),
        )
        .await;
        (peer, transport)
    }

    /// A send transport with a producer: the peer to speak from.
    pub async fn speaker(&mut self, channel: &str) -> Peer {
        let (peer, transport) = self.negotiate(channel, "send").await;
        self.ok(
            "produce",
            json!({"transportId": transport, "channelId": channel, "kind": "audio"}),
        )
        .await;
        peer.wait_connected().await;
        peer
    }

    /// A recv transport consuming the channel's stream: the peer to listen with, and the SSRC
    /// the stream arrives on.
    pub async fn listener(&mut self, channel: &str) -> (Peer, u32) {
        let (peer, _) = self.negotiate(channel, "recv").await;
        let consumed = self.ok("consume", json!({"channelId": channel})).await;
        peer.wait_connected().await;
        (peer, consumed["ssrc"].as_u64().unwrap() as u32)
    }

    /// Closes the socket (the gateway cleans up as for a lost client).
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

//! A client of the gateway's WebSocket + JSON protocol (feature `ws`): requests with ids, their
//! replies, and pushes kept aside until asked for. Requests are built, and every frame the
//! gateway sends is read, through the protocol crate (`talkgroup-wire`): a request the protocol
//! does not define, or a frame from the gateway it cannot read, fails the test. Hostile frames
//! go through [`WsClient::send_raw`] or the socket itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use talkgroup_wire::{ClientFrame, ErrorBody, Reply, Request, ServerFrame};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(Debug)]
pub struct WsClient {
    /// The socket, for tests that send raw frames.
    pub ws: Ws,
    next_id: u64,
    /// Pushes (and replies) received while waiting for something else.
    pub pushes: Vec<Value>,
    /// Each channel's members (user ids) and their version, as the frames read so far say.
    members: std::collections::HashMap<String, (u64, std::collections::BTreeSet<String>)>,
    /// Each sync session as the frames read so far say, with the server time last given.
    syncs: std::collections::HashMap<String, (Value, i64)>,
}

impl WsClient {
    /// Connects to `ws://addr/ws` with `token` as a bearer token.
    pub async fn connect(addr: SocketAddr, token: &str) -> Self {
        Self::connect_path(addr, token, "/ws").await
    }

    /// Connects to take a session over with its resume token (`/ws?resume=`).
    pub async fn resume(addr: SocketAddr, token: &str, resume: &str) -> Self {
        Self::connect_path(addr, token, &format!("/ws?resume={resume}")).await
    }

    /// The `session` push the gateway sends first: the session id, the resume token, and on
    /// a resume what the session kept.
    pub async fn session(&mut self) -> Value {
        self.push("session").await["data"].clone()
    }

    /// The code of the close frame the socket ends with, reading past other frames (panics
    /// after 10 s, or when the socket ends without one).
    pub async fn close_code(&mut self) -> u16 {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.ws.next())
                .await
                .expect("a close within 10 s")
            {
                Some(Ok(Message::Close(frame))) => {
                    break u16::from(frame.expect("close frame").code);
                }
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    /// Ends the TCP connection without a WebSocket close frame, as a lost network does.
    pub fn cut(self) {
        drop(self.ws);
    }

    async fn connect_path(addr: SocketAddr, token: &str, path: &str) -> Self {
        let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        // No Nagle, as browsers do: a small request must not wait for the ACK of the last one.
        let (ws, _) = tokio_tungstenite::connect_async_with_config(request, None, true)
            .await
            .unwrap();
        Self {
            ws,
            next_id: 0,
            pushes: Vec::new(),
            members: std::collections::HashMap::new(),
            syncs: std::collections::HashMap::new(),
        }
    }

    /// The next text frame, parsed (panics after 10 s).
    pub async fn next_frame(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), self.ws.next())
                .await
                .expect("a frame within 10 s")
                .expect("socket open")
                .expect("frame ok");
            if let Message::Text(t) = msg {
                let frame = read_frame(t.as_str());
                self.observe(&frame);
                return frame;
            }
        }
    }

    /// Follows channel membership as a client should: a channel state (a `join-channel`
    /// reply, a `channel-state` push) sets the members when it is not older than what is
    /// known; `members-changed` applies the changes newer than that.
    fn observe(&mut self, frame: &Value) {
        self.observe_sync(frame);
        let state = match frame["type"].as_str() {
            Some("channel-state") => Some(&frame["data"]),
            Some("join-channel") => Some(&frame["data"]["channel"]),
            _ => None,
        };
        if let Some(state) = state.filter(|s| s["channelId"].is_string()) {
            let channel = state["channelId"].as_str().unwrap_or_default().to_owned();
            let version = state["membersVersion"].as_u64().unwrap_or(0);
            let known = self.members.get(&channel).map_or(0, |(v, _)| *v);
            if version >= known {
                let ids = state["members"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|m| m["userId"].as_str().map(str::to_owned))
                    .collect();
                self.members.insert(channel, (version, ids));
            }
            return;
        }
        if frame["type"] == "members-changed" {
            let data = &frame["data"];
            let channel = data["channelId"].as_str().unwrap_or_default().to_owned();
            let entry = self.members.entry(channel).or_default();
            for change in data["changes"].as_array().into_iter().flatten() {
                let version = change["version"].as_u64().unwrap_or(0);
                if version <= entry.0 {
                    continue;
                }
                entry.0 = version;
                if let Some(user) = change["joined"]["userId"].as_str() {
                    entry.1.insert(user.to_owned());
                }
                if let Some(user) = change["left"].as_str() {
                    entry.1.remove(user);
                }
            }
        }
    }

    /// Follows sync sessions as a client should: a whole session (a `sync-state` push, a
    /// `sync-*` reply) replaces what is known unless that is newer; a `sync-changed` applies
    /// to the version it names as its base, and is otherwise ignored (a client would re-read
    /// the session).
    fn observe_sync(&mut self, frame: &Value) {
        let kind = frame["type"].as_str().unwrap_or_default();
        let data = &frame["data"];
        let time = data["serverTime"].as_i64().unwrap_or(0);
        if kind == "sync-changed" {
            let id = data["sessionId"].as_str().unwrap_or_default();
            let Some((session, server_time)) = self.syncs.get_mut(id) else {
                return;
            };
            if session["version"] != data["baseVersion"] {
                return;
            }
            if let (Some(fields), Some(changes)) =
                (session.as_object_mut(), data["changes"].as_object())
            {
                for (k, v) in changes {
                    fields.insert(k.clone(), v.clone());
                }
            }
            for changed in data["participants"].as_array().into_iter().flatten() {
                if let Some(p) = session["participants"]
                    .as_array_mut()
                    .into_iter()
                    .flatten()
                    .find(|p| p["participantId"] == changed["participantId"])
                {
                    *p = changed.clone();
                }
            }
            session["version"] = data["version"].clone();
            *server_time = time;
            return;
        }
        if !(kind == "sync-state" || kind.starts_with("sync-")) || !data["session"].is_object() {
            return;
        }
        let session = &data["session"];
        let id = session["sessionId"].as_str().unwrap_or_default().to_owned();
        if session["deleted"] == true {
            self.syncs.remove(&id);
            return;
        }
        let version = session["version"].as_u64().unwrap_or(0);
        let known = self.syncs.get(&id).and_then(|(s, _)| s["version"].as_u64());
        if known.is_none_or(|k| version >= k) {
            self.syncs.insert(id, (session.clone(), time));
        }
    }

    /// Sync session `id` and the server time last given with it, once it satisfies `check`,
    /// reading frames (and keeping them as pushes) until it does.
    pub async fn sync_until(&mut self, id: &str, check: impl Fn(&Value) -> bool) -> (Value, i64) {
        loop {
            if let Some((session, time)) = self.syncs.get(id)
                && check(session)
            {
                return (session.clone(), *time);
            }
            let frame = self.next_frame().await;
            self.pushes.push(frame);
        }
    }

    /// The members (user ids) of `channel` once they satisfy `check`, reading frames (and
    /// keeping them as pushes) until they do.
    pub async fn members_until(
        &mut self,
        channel: &str,
        check: impl Fn(&std::collections::BTreeSet<String>) -> bool,
    ) -> std::collections::BTreeSet<String> {
        loop {
            if let Some((_, members)) = self.members.get(channel)
                && check(members)
            {
                return members.clone();
            }
            let frame = self.next_frame().await;
            self.pushes.push(frame);
        }
    }

    /// Sends a request without waiting; returns its id. `kind` and `data` must make a
    /// request the protocol defines (built through the wire crate).
    pub async fn send(&mut self, kind: &str, data: Value) -> String {
        let request: Request = serde_json::from_value(json!({"type": kind, "data": data}))
            .unwrap_or_else(|e| panic!("not a {kind} request the protocol defines ({e})"));
        self.send_request(request).await
    }

    /// Sends a typed request without waiting; returns its id.
    pub async fn send_request(&mut self, request: Request) -> String {
        self.next_id += 1;
        let id = self.next_id.to_string();
        let frame = ClientFrame::new(id.clone(), request).encode();
        self.ws.send(Message::Text(frame.into())).await.unwrap();
        id
    }

    /// Sends whatever `kind` and `data` say, valid or not (hostile input); returns its id.
    pub async fn send_raw(&mut self, kind: &str, data: Value) -> String {
        self.next_id += 1;
        let id = self.next_id.to_string();
        let frame = json!({"type": kind, "id": id, "data": data});
        self.ws
            .send(Message::Text(frame.to_string().into()))
            .await
            .unwrap();
        id
    }

    /// Sends a typed request and reads its reply: the reply's data, or the error.
    pub async fn call(&mut self, request: Request) -> Result<Reply, ErrorBody> {
        let id = self.send_request(request).await;
        self.answer(&id).await
    }

    /// The typed reply to request `id`: its data, or the error; pushes meanwhile are kept.
    pub async fn answer(&mut self, id: &str) -> Result<Reply, ErrorBody> {
        let reply = self.reply(id).await;
        match ServerFrame::decode(&reply.to_string()) {
            Ok(ServerFrame::Reply { data, .. }) => Ok(data),
            Ok(ServerFrame::Error { error, .. }) => Err(error),
            other => panic!("a reply to request {id}, not {other:?}"),
        }
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

    /// Sends whatever `kind` and `data` say (hostile input) and returns the reply frame.
    pub async fn request_raw(&mut self, kind: &str, data: Value) -> Value {
        let id = self.send_raw(kind, data).await;
        self.reply(&id).await
    }

    /// Sends a request and returns its reply frame.
    pub async fn request(&mut self, kind: &str, data: Value) -> Value {
        let id = self.send(kind, data).await;
        self.reply(&id).await
    }

    /// Sends a typed request and returns its reply's `data`; panics on an error reply.
    pub async fn ok_request(&mut self, request: Request) -> Value {
        let kind = request.name();
        let id = self.send_request(request).await;
        let reply = self.reply(&id).await;
        assert_ne!(reply["type"], "error", "{kind} failed: {reply}");
        reply["data"].clone()
    }

    /// Sends a request and returns its reply's `data`; panics on an error reply.
    pub async fn ok(&mut self, kind: &str, data: Value) -> Value {
        let reply = self.request(kind, data).await;
        assert_ne!(reply["type"], "error", "{kind} failed: {reply}");
        reply["data"].clone()
    }

    /// The next push of `kind` whose data matches `filter` (kept or new).
    pub async fn push_where(&mut self, kind: &str, filter: impl Fn(&Value) -> bool) -> Value {
        self.frame_where(|f| f["type"] == kind && filter(&f["data"]))
            .await
    }

    /// The first push (kept or new) whose whole frame `filter` accepts.
    pub async fn frame_where(&mut self, filter: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.pushes.iter().position(&filter) {
            return self.pushes.remove(i);
        }
        loop {
            let frame = self.next_frame().await;
            if filter(&frame) {
                return frame;
            }
            self.pushes.push(frame);
        }
    }

    /// The next push of `kind` (kept or new).
    pub async fn push(&mut self, kind: &str) -> Value {
        self.push_where(kind, |_| true).await
    }

    /// Reads the socket in a task of its own until [`Reading::stop`], so the client answers
    /// pings (and keeps its pushes) while the test is busy elsewhere.
    pub fn keep_reading(mut self) -> Reading {
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => return self,
                    message = self.ws.next() => match message {
                        Some(Ok(Message::Text(t))) => {
                            let frame = read_frame(t.as_str());
                            self.observe(&frame);
                            self.pushes.push(frame);
                        }
                        Some(Ok(_)) => {}
                        _ => return self,
                    },
                }
            }
        });
        Reading { stop, task }
    }
}

/// A frame from the gateway: read through the wire crate (the test fails on one it cannot
/// read), kept as JSON for the test's assertions.
fn read_frame(text: &str) -> Value {
    if let Err(error) = ServerFrame::decode(text) {
        panic!("the gateway sent a frame the protocol does not define ({error}): {text}");
    }
    // Invariant: what decoded as a frame is JSON.
    serde_json::from_str(text).expect("a frame is JSON")
}

/// A client whose socket a task reads ([`WsClient::keep_reading`]).
#[derive(Debug)]
pub struct Reading {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<WsClient>,
}

impl Reading {
    /// The client back, with what was read meanwhile among its pushes.
    pub async fn stop(self) -> WsClient {
        let _ = self.stop.send(());
        self.task.await.unwrap()
    }
}

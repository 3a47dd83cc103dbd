//! One client connection: its state session, requests, pushes, floor renewal and cleanup.
//!
//! The floor flow keeps the order that saves first words: state-svc grants (one atomic step),
//! the media node is told (`SetFloor`), and only then the client hears `granted` and unmutes.
//! While the socket lives the floor is renewed every third of its lease, and each renewal moves
//! the media node's expiry too. Whatever ends the connection (close, error, dead socket,
//! shutdown) removes the state session, which releases its floors and membership for everyone,
//! and closes its media transports.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use talkgroup_proto::media::v1 as mpb;
use talkgroup_proto::state::v1 as spb;
use talkgroup_proto::state::v1::mutate_sync_request::Action as SyncAction;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::AppState;
use crate::access::{
    ADMIN_EMERGENCY_PRIORITY, DISPATCH_PRIORITY, EMERGENCY_PRIORITY, Grants, Role,
};
use crate::auth::Claims;
use crate::hub::{FloorRequest, HubEvent, Outgoing};
use crate::protocol::{
    self, ClientError, Code, EMERGENCY_CONFIRM, Frame, Request, TransportDirection, User,
    channel_state, reason, user_of,
};

/// Frames queued to a client before the connection is considered stuck.
const OUTBOX: usize = 256;
/// Rate-limit refusals in a row after which the connection is closed as a flood.
const FLOOD_LIMIT: u32 = 50;
/// Close code of a socket an administrator disconnected (after a `force-disconnect` push).
const KICKED: u16 = 4000;

type Result<T> = std::result::Result<T, ClientError>;

fn err(code: Code, message: &'static str) -> ClientError {
    ClientError::new(code, message)
}

/// A token bucket.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Debug, Clone)]
struct TransportInfo {
    channel: String,
    node: String,
    direction: TransportDirection,
}

/// Producers of this connection by channel: (producer id, media node URL). Shared with the
/// renewal tasks, so a renewal names the producer made after the grant.
type Producers = Arc<Mutex<HashMap<String, (String, String)>>>;

#[derive(Debug)]
struct Held {
    epoch: u64,
    /// Lease end as granted (renewals move it at the media node; this is a lower bound).
    expires_at_ms: i64,
    renewal: JoinHandle<()>,
}

struct Conn {
    app: Arc<AppState>,
    id: u64,
    session: String,
    user: User,
    out: mpsc::Sender<Outgoing>,
    joined: HashSet<String>,
    transports: HashMap<String, TransportInfo>,
    producers: Producers,
    /// Media nodes of channels this socket pressed in without a producer there (signalling-only
    /// presses), so each press does not place the channel again. Forgotten when the node does
    /// not take a floor change, or the socket leaves the channel.
    placed: HashMap<String, String>,
    floors: HashMap<String, Held>,
    /// What the user may do where.
    grants: Grants,
    /// Events whose emergency broadcast this connection runs.
    emergencies: HashSet<String>,
    requests: Bucket,
    ptt: Bucket,
    refused_in_a_row: u32,
}

fn valid_name(name: &str) -> bool {
    let n = name.trim();
    !n.is_empty() && n.chars().count() <= 64 && !n.chars().any(char::is_control)
}

pub async fn run(app: Arc<AppState>, claims: Claims, socket: WebSocket) {
    let user_name = claims
        .name
        .clone()
        .filter(|n| valid_name(n))
        .unwrap_or_else(|| claims.sub.clone());
    let (mut sink, mut stream) = socket.split();
    let created = app
        .sessions()
        .create_session(spb::CreateSessionRequest {
            user_id: claims.sub.clone(),
            user_name: user_name.clone(),
            gateway_id: app.gateway_id.clone(),
            ttl_ms: 0,
        })
        .await;
    let session = match created {
        Ok(s) => s.into_inner(),
        Err(status) => {
            tracing::warn!(code = ?status.code(), "cannot create a session; closing");
            let close = CloseFrame {
                code: 1011,
                reason: "service unavailable".into(),
            };
            let _ = sink.send(Message::Close(Some(close))).await;
            return;
        }
    };
    // Register before reading the grants, so a change made in between is not missed.
    // The outbox first: the hub writes members' pushes straight into it.
    let (out, mut out_rx) = mpsc::channel::<Outgoing>(OUTBOX);
    let (id, mut events) = app
        .hub
        .register(&claims.sub, &session.session_id, out.clone());
    let mut grants = Grants::new(claims.roles.clone());
    match app
        .access()
        .get_user_grants(spb::GetUserGrantsRequest {
            user_id: claims.sub.clone(),
        })
        .await
    {
        Ok(stored) => {
            grants.apply(&stored.into_inner());
        }
        Err(status) => {
            // Fail closed: without the stored grants a revoked channel could look open.
            tracing::warn!(code = ?status.code(), "cannot read grants; closing");
            app.hub.unregister(id);
            let _ = app
                .sessions()
                .remove_session(spb::RemoveSessionRequest {
                    session_id: session.session_id.clone(),
                })
                .await;
            let close = CloseFrame {
                code: 1011,
                reason: "service unavailable".into(),
            };
            let _ = sink.send(Message::Close(Some(close))).await;
            return;
        }
    }
    let writer = tokio::spawn(async move {
        while let Some(outgoing) = out_rx.recv().await {
            let message = match outgoing {
                Outgoing::Message(message) => message,
                // The frames before it are on the socket: the request's fan-out may go.
                Outgoing::Written(request) => {
                    drop(request);
                    continue;
                }
            };
            let closing = matches!(message, Message::Close(_));
            if sink.send(message).await.is_err() || closing {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let config = &app.config;
    let mut conn = Conn {
        app: Arc::clone(&app),
        id,
        session: session.session_id.clone(),
        user: User {
            user_id: claims.sub.clone(),
            user_name,
        },
        out,
        joined: HashSet::new(),
        transports: HashMap::new(),
        producers: Producers::default(),
        placed: HashMap::new(),
        floors: HashMap::new(),
        grants,
        emergencies: HashSet::new(),
        requests: Bucket::new(config.request_rate, config.request_rate * 2),
        ptt: Bucket::new(config.ptt_rate, config.ptt_rate),
        refused_in_a_row: 0,
    };
    tracing::info!(conn = id, session_id = %conn.session, user_id = %conn.user.user_id, "connected");

    let ping_every = Duration::from_millis(config.ping_interval_ms);
    let mut ping = tokio::time::interval(ping_every);
    let mut touch = tokio::time::interval(Duration::from_millis(u64::from(
        session.ttl_ms.max(3_000) / 3,
    )));
    let mut last_heard = Instant::now();
    let close_code = loop {
        tokio::select! {
            message = stream.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    last_heard = Instant::now();
                    if !conn.on_text(text.as_str()).await {
                        break 1008;
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    last_heard = Instant::now();
                    conn.send(Frame::error(None, err(Code::BadRequest, "binary frames are not supported"))).await;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => last_heard = Instant::now(),
                Some(Ok(Message::Close(_))) | None => break 1000,
                Some(Err(_)) => break 1002,
            },
            Some(event) = events.recv() => {
                if let HubEvent::Kicked(reason) = &event {
                    tracing::info!(conn = id, "disconnected by an administrator");
                    conn.send(Frame::push("force-disconnect", json!({"reason": reason}))).await;
                    break KICKED;
                }
                conn.on_event(event).await;
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > ping_every * 2 {
                    tracing::info!(conn = id, "no sign of life; closing");
                    break 1001;
                }
                let _ = conn.out.try_send(Outgoing::Message(Message::Ping(Vec::new().into())));
            }
            _ = touch.tick() => {
                let _ = conn.app.sessions().touch_session(spb::TouchSessionRequest { session_id: conn.session.clone() }).await;
            }
            () = app.shutdown.cancelled() => break 1001,
        }
    };
    conn.cleanup().await;
    let reason = match close_code {
        1001 => "going away",
        KICKED => "disconnected by an administrator",
        _ => "",
    };
    let _ = conn
        .out
        .send(Outgoing::Message(Message::Close(Some(CloseFrame {
            code: close_code,
            reason: reason.into(),
        }))))
        .await;
    drop(conn);
    let _ = writer.await;
    if close_code != 1000 {
        // The closing handshake: read and discard until the client's Close (at most 2 s), so
        // frames it sent meanwhile do not turn the close into a TCP reset that hides the code.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(message)) = stream.next().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
    tracing::info!(conn = id, code = close_code, "disconnected");
}

impl Conn {
    async fn send(&self, frame: Frame) {
        if let Some(text) = frame.encode() {
            self.send_text(text).await;
        }
    }

    async fn send_text(&self, text: Utf8Bytes) {
        let _ = self.out.send(Outgoing::Message(Message::Text(text))).await;
    }

    /// Handles one text frame; false when the connection must close (flood).
    async fn on_text(&mut self, text: &str) -> bool {
        let parsed = protocol::parse(text);
        if !self.requests.take() {
            self.refused_in_a_row += 1;
            self.send(Frame::error(
                parsed.id,
                err(Code::RateLimited, "too many requests"),
            ))
            .await;
            return self.refused_in_a_row < FLOOD_LIMIT;
        }
        self.refused_in_a_row = 0;
        let request = match parsed.request {
            Ok(r) => r,
            Err(e) => {
                self.send(Frame::error(parsed.id, e)).await;
                return true;
            }
        };
        let name = request.name();
        self.app.metrics.request(name);
        let pressed = Instant::now();
        let denied_push = match &request {
            Request::PttStart(p) => Some(p.channel_id.clone()),
            _ => None,
        };
        let is_press = matches!(request, Request::PttStart(_) | Request::PriorityPttStart(_));
        let floor_channel = match &request {
            Request::PttStart(r) => Some(r.channel_id.as_str()),
            Request::PttStop(r) | Request::PriorityPttStart(r) | Request::PriorityPttStop(r) => {
                Some(r.channel_id.as_str())
            }
            _ => None,
        };
        let floor_request =
            floor_channel.map(|c| FloorRequest::start(&self.app.hub, c, &self.session));
        let span = tracing::info_span!(
            "ws request",
            otel.name = name,
            otel.kind = "server",
            conn = self.id
        );
        match self.handle(request).instrument(span).await {
            Ok(data) => {
                if is_press {
                    match data.get("granted").and_then(Value::as_bool) {
                        Some(true) => {
                            self.app.metrics.floor_grants.inc();
                            self.app
                                .metrics
                                .press_to_grant
                                .observe(pressed.elapsed().as_secs_f64());
                        }
                        Some(false) => {
                            self.app.metrics.floor_denials.inc();
                        }
                        None => {}
                    }
                }
                // A denied ptt-start also gets the ptt-denied push.
                if let (Some(channel), Some(false)) =
                    (denied_push, data.get("granted").and_then(Value::as_bool))
                    && data.get("queued").is_none()
                {
                    let push = json!({"channelId": channel, "speaker": data["speaker"], "retryAfterMs": data["retryAfterMs"]});
                    self.send(Frame::reply(name, parsed.id, data)).await;
                    self.send(Frame::push("ptt-denied", push)).await;
                } else {
                    self.send(Frame::reply(name, parsed.id, data)).await;
                }
            }
            Err(e) => {
                self.app.metrics.error(e.code.as_str());
                self.send(Frame::error(parsed.id, e)).await;
            }
        }
        if let Some(request) = floor_request {
            // Behind the reply; if the writer is gone, dropping it here ends the request.
            let _ = self.out.send(Outgoing::Written(request)).await;
        }
        true
    }

    /// The configured channels with who is talking and how many are present, asked of
    /// state-svc in parallel.
    async fn list_channels(&self) -> Result<Value> {
        let visible: Vec<&String> = self
            .app
            .config
            .channels
            .iter()
            .filter(|c| self.grants.role(c) >= Role::Listen)
            .collect();
        let asks = visible.into_iter().map(|channel| {
            let mut client =
                spb::channel_service_client::ChannelServiceClient::new(self.app.state.clone());
            async move {
                client
                    .get_channel_state(spb::GetChannelStateRequest {
                        channel_id: channel.clone(),
                    })
                    .await
                    .map(tonic::Response::into_inner)
            }
        });
        let mut channels = Vec::new();
        for state in futures::future::join_all(asks).await {
            let state = state?;
            let members = state
                .members
                .iter()
                .map(|m| &m.user_id)
                .collect::<HashSet<_>>()
                .len();
            channels.push(json!({
                "channelId": state.channel_id,
                "speaker": state.holder.as_ref().map(user_of),
                "busy": state.busy,
                "memberCount": members,
                "role": self.grants.role(&state.channel_id),
            }));
        }
        Ok(json!({ "channels": channels }))
    }

    /// The user's role in `channel` must be at least `least`.
    fn require_role(&self, channel: &str, least: Role) -> Result<Role> {
        let role = self.grants.role(channel);
        if role >= least {
            return Ok(role);
        }
        Err(match least {
            Role::Listen => err(Code::Forbidden, "no access to this channel"),
            Role::Talk => err(Code::Forbidden, "this user may only listen here"),
            _ => err(Code::Forbidden, "not a dispatcher of this channel"),
        })
    }

    fn require_joined(&self, channel: &str) -> Result<()> {
        if self.joined.contains(channel) {
            Ok(())
        } else {
            Err(err(Code::Forbidden, "join the channel first"))
        }
    }

    async fn place(&self, channel: &str) -> Result<String> {
        let placement = self
            .app
            .registry()
            .place_channel(spb::PlaceChannelRequest {
                channel_id: channel.to_owned(),
            })
            .await?
            .into_inner();
        placement
            .node
            .map(|n| n.grpc_addr)
            .ok_or(err(Code::Unavailable, "no media node"))
    }

    fn media(
        &self,
        node: &str,
    ) -> Result<mpb::media_service_client::MediaServiceClient<crate::Traced>> {
        self.app
            .media(node)
            .ok_or(err(Code::Unavailable, "media node unreachable"))
    }

    async fn handle(&mut self, request: Request) -> Result<Value> {
        match request {
            Request::Ping(_) => Ok(json!({ "serverTime": crate_now_ms() })),
            Request::ListChannels(_) => self.list_channels().await,
            Request::JoinChannel(r) => {
                let role = self.require_role(&r.channel_id, Role::Listen)?;
                let state = self
                    .app
                    .sessions()
                    .join_channel(spb::JoinChannelRequest {
                        session_id: self.session.clone(),
                        channel_id: r.channel_id.clone(),
                    })
                    .await?
                    .into_inner();
                self.app.hub.follow(self.id, &r.channel_id);
                self.joined.insert(r.channel_id);
                Ok(json!({ "channel": channel_state(&state), "role": role }))
            }
            Request::LeaveChannel(r) => {
                self.require_joined(&r.channel_id)?;
                self.leave(&r.channel_id).await?;
                Ok(json!({}))
            }
            Request::GetRouterCapabilities(r) => {
                self.require_joined(&r.channel_id)?;
                let node = self.place(&r.channel_id).await?;
                let caps = self
                    .media(&node)?
                    .get_router_capabilities(mpb::GetRouterCapabilitiesRequest {
                        channel_id: r.channel_id,
                    })
                    .await?
                    .into_inner();
                let codecs: Vec<Value> = caps
                    .codecs
                    .iter()
                    .map(|c| json!({"mimeType": c.mime_type, "clockRate": c.clock_rate, "channels": c.channels, "payloadType": c.payload_type, "fmtp": c.fmtp}))
                    .collect();
                Ok(json!({ "codecs": codecs }))
            }
            Request::CreateTransport(r) => {
                self.require_joined(&r.channel_id)?;
                if r.direction == TransportDirection::Send {
                    self.require_role(&r.channel_id, Role::Talk)?;
                }
                let node = self.place(&r.channel_id).await?;
                let direction = match r.direction {
                    TransportDirection::Send => mpb::Direction::Send,
                    TransportDirection::Recv => mpb::Direction::Recv,
                };
                let created = self
                    .media(&node)?
                    .create_transport(mpb::CreateTransportRequest {
                        channel_id: r.channel_id.clone(),
                        session_id: self.session.clone(),
                        direction: direction.into(),
                    })
                    .await?
                    .into_inner();
                let offer = created.offer.map(|o| o.sdp).unwrap_or_default();
                self.transports.insert(
                    created.transport_id.clone(),
                    TransportInfo {
                        channel: r.channel_id,
                        node,
                        direction: r.direction,
                    },
                );
                Ok(
                    json!({ "transportId": created.transport_id, "offer": {"type": "offer", "sdp": offer} }),
                )
            }
            Request::ConnectTransport(r) => {
                let info = self
                    .transports
                    .get(&r.transport_id)
                    .cloned()
                    .ok_or(err(Code::NotFound, "unknown transport"))?;
                let payload = match (r.answer, r.candidate) {
                    (Some(answer), None) if answer.kind == "answer" => {
                        mpb::connect_transport_request::Payload::Answer(mpb::SessionDescription {
                            r#type: answer.kind,
                            sdp: answer.sdp,
                        })
                    }
                    (None, Some(c)) => {
                        mpb::connect_transport_request::Payload::Candidate(mpb::IceCandidate {
                            candidate: c.candidate,
                            sdp_mid: c.sdp_mid.unwrap_or_default(),
                            sdp_mline_index: c.sdp_m_line_index.unwrap_or(0),
                        })
                    }
                    _ => return Err(err(Code::BadRequest, "send an answer or a candidate")),
                };
                self.media(&info.node)?
                    .connect_transport(mpb::ConnectTransportRequest {
                        transport_id: r.transport_id,
                        session_id: self.session.clone(),
                        payload: Some(payload),
                    })
                    .await?;
                Ok(json!({}))
            }
            Request::Produce(r) => {
                if r.kind != "audio" {
                    return Err(err(Code::BadRequest, "only audio can be produced"));
                }
                let info = self
                    .transports
                    .get(&r.transport_id)
                    .cloned()
                    .ok_or(err(Code::NotFound, "unknown transport"))?;
                if info.channel != r.channel_id || info.direction != TransportDirection::Send {
                    return Err(err(
                        Code::BadRequest,
                        "not a send transport of this channel",
                    ));
                }
                self.require_role(&r.channel_id, Role::Talk)?;
                let producer = self
                    .media(&info.node)?
                    .produce(mpb::ProduceRequest {
                        transport_id: r.transport_id,
                        session_id: self.session.clone(),
                        channel_id: r.channel_id.clone(),
                    })
                    .await?
                    .into_inner()
                    .producer_id;
                self.lock_producers()
                    .insert(r.channel_id.clone(), (producer.clone(), info.node.clone()));
                // Already talking (pressed before producing): forward this producer now rather
                // than at the next renewal.
                if let Some(held) = self.floors.get(&r.channel_id) {
                    let (epoch, expires) = (held.epoch, held.expires_at_ms);
                    set_floor(
                        &self.app,
                        &self.producers,
                        &r.channel_id,
                        &info.node,
                        epoch,
                        expires,
                    )
                    .await?;
                }
                Ok(json!({ "producerId": producer }))
            }
            Request::Consume(r) => {
                self.require_joined(&r.channel_id)?;
                self.require_role(&r.channel_id, Role::Listen)?;
                let (transport_id, info) = self
                    .transports
                    .iter()
                    .find(|(_, t)| {
                        t.channel == r.channel_id && t.direction == TransportDirection::Recv
                    })
                    .map(|(id, t)| (id.clone(), t.clone()))
                    .ok_or(err(Code::BadRequest, "create a recv transport first"))?;
                let consumed = self
                    .media(&info.node)?
                    .consume(mpb::ConsumeRequest {
                        transport_id,
                        session_id: self.session.clone(),
                        channel_id: r.channel_id,
                    })
                    .await?
                    .into_inner();
                Ok(
                    json!({ "consumerId": consumed.consumer_id, "kind": "audio", "ssrc": consumed.ssrc }),
                )
            }
            Request::PttStart(r) => {
                self.require_joined(&r.channel_id)?;
                let role = self.require_role(&r.channel_id, Role::Talk)?;
                let priority = r.priority.unwrap_or(0);
                if priority > role.max_priority() {
                    return Err(err(Code::Forbidden, "priority not allowed for this user"));
                }
                if !self.ptt.take() {
                    return Err(err(Code::RateLimited, "too many ptt-start requests"));
                }
                self.ptt_start(&r.channel_id, priority).await
            }
            Request::PriorityPttStart(r) => {
                self.require_joined(&r.channel_id)?;
                self.require_role(&r.channel_id, Role::Dispatch)?;
                if !self.ptt.take() {
                    return Err(err(Code::RateLimited, "too many ptt-start requests"));
                }
                self.ptt_start(&r.channel_id, DISPATCH_PRIORITY).await
            }
            Request::PttStop(r) | Request::PriorityPttStop(r) => {
                self.require_joined(&r.channel_id)?;
                self.ptt_stop(&r.channel_id).await
            }
            Request::EmergencyBroadcastStart(r) => {
                if r.confirm != EMERGENCY_CONFIRM {
                    return Err(err(
                        Code::BadRequest,
                        "confirm the emergency broadcast with \"EMERGENCY\"",
                    ));
                }
                if !self.ptt.take() {
                    return Err(err(Code::RateLimited, "too many ptt-start requests"));
                }
                self.emergency_start(&r.event_id).await
            }
            Request::EmergencyBroadcastStop(r) => self.emergency_stop(&r.event_id).await,
            Request::SyncCreate(r) => {
                self.require_role(&r.channel_id, Role::Dispatch)?;
                let created = self
                    .app
                    .syncs()
                    .create_sync(crate::sync::create_request(r)?)
                    .await?
                    .into_inner();
                Ok(crate::sync::envelope(&created))
            }
            Request::SyncGet(r) => {
                let session = self.sync_session(&r.session_id, Role::Listen).await?;
                Ok(crate::sync::envelope(&session))
            }
            Request::SyncStart(r) => {
                self.sync_mutate(r, Role::Dispatch, SyncAction::Start(spb::Empty {}))
                    .await
            }
            Request::SyncSwitch(r) => {
                let to = spb::SyncSwitch {
                    participant_id: r.participant_id.clone().unwrap_or_default(),
                };
                // Participants hand over themselves: talk is enough.
                self.sync_mutate(r, Role::Talk, SyncAction::Switch(to))
                    .await
            }
            Request::SyncPause(r) => {
                self.sync_mutate(r, Role::Dispatch, SyncAction::Pause(spb::Empty {}))
                    .await
            }
            Request::SyncResume(r) => {
                self.sync_mutate(r, Role::Dispatch, SyncAction::Resume(spb::Empty {}))
                    .await
            }
            Request::SyncComplete(r) => {
                self.sync_mutate(r, Role::Dispatch, SyncAction::Complete(spb::Empty {}))
                    .await
            }
            Request::SyncCancel(r) => {
                self.sync_mutate(r, Role::Dispatch, SyncAction::Cancel(spb::Empty {}))
                    .await
            }
            Request::SyncDelete(r) => {
                self.sync_session(&r.session_id, Role::Dispatch).await?;
                let deleted = self
                    .app
                    .syncs()
                    .delete_sync(spb::DeleteSyncRequest {
                        session_id: r.session_id.clone(),
                        expected_version: r.expected_version.unwrap_or(0),
                    })
                    .await?
                    .into_inner();
                Ok(json!({"sessionId": r.session_id, "version": deleted.version}))
            }
        }
    }

    fn lock_producers(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, String)>> {
        self.producers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A sync session, if the user has at least `least` in its channel.
    async fn sync_session(&self, id: &str, least: Role) -> Result<spb::SyncState> {
        let session = self
            .app
            .syncs()
            .get_sync(spb::GetSyncRequest {
                session_id: id.to_owned(),
            })
            .await?
            .into_inner();
        if session.channel_id.is_empty() {
            return Err(err(Code::Forbidden, "this sync session has no channel"));
        }
        self.require_role(&session.channel_id, least)?;
        Ok(session)
    }

    async fn sync_mutate(
        &self,
        r: crate::protocol::SyncRef,
        least: Role,
        action: SyncAction,
    ) -> Result<Value> {
        self.sync_session(&r.session_id, least).await?;
        let state = self
            .app
            .syncs()
            .mutate_sync(crate::sync::mutate_request(r, action))
            .await?
            .into_inner();
        Ok(crate::sync::envelope(&state))
    }

    /// Leaves a channel: gives up its floor, closes its transports, tells state-svc.
    async fn leave(&mut self, channel: &str) -> Result<()> {
        self.stop_holding(channel);
        let ids: Vec<String> = self
            .transports
            .iter()
            .filter(|(_, t)| t.channel == channel)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            self.close_transport(&id).await;
        }
        self.app.hub.unfollow(self.id, channel);
        self.joined.remove(channel);
        self.placed.remove(channel);
        self.app
            .sessions()
            .leave_channel(spb::LeaveChannelRequest {
                session_id: self.session.clone(),
                channel_id: channel.to_owned(),
            })
            .await?;
        Ok(())
    }

    /// The event's channels, each of which the user must dispatch in. Returns them with
    /// whether the user is an admin in all of them.
    async fn dispatch_event(&self, event_id: &str) -> Result<(Vec<String>, bool)> {
        let event = self
            .app
            .access()
            .get_event(spb::GetEventRequest {
                event_id: event_id.to_owned(),
            })
            .await?
            .into_inner();
        let roles: Vec<Role> = event
            .channel_ids
            .iter()
            .map(|c| self.grants.role(c))
            .collect();
        if roles.iter().any(|r| *r < Role::Dispatch) {
            return Err(err(Code::Forbidden, "not a dispatcher of this event"));
        }
        let admin = roles.iter().all(|r| *r == Role::Admin);
        Ok((event.channel_ids, admin))
    }

    async fn emergency_start(&mut self, event_id: &str) -> Result<Value> {
        let (_, admin) = self.dispatch_event(event_id).await?;
        let priority = if admin {
            ADMIN_EMERGENCY_PRIORITY
        } else {
            EMERGENCY_PRIORITY
        };
        let started = self
            .app
            .access()
            .start_emergency(spb::StartEmergencyRequest {
                event_id: event_id.to_owned(),
                session_id: self.session.clone(),
                priority,
            })
            .await?
            .into_inner();
        self.emergencies.insert(event_id.to_owned());
        let mut channels = Vec::new();
        for ch in started.channels {
            let Some(holder) = ch.holder else {
                channels.push(json!({"channelId": ch.channel_id, "granted": false}));
                continue;
            };
            if self.joined.insert(ch.channel_id.clone()) {
                self.app.hub.follow(self.id, &ch.channel_id);
            }
            // The media node first, as for any grant; a channel whose node cannot be told
            // still belongs to the broadcast (the renewal tells it again).
            if let Err(e) = self
                .tell_media(&ch.channel_id, holder.epoch, holder.expires_at_ms)
                .await
            {
                tracing::warn!(channel = %ch.channel_id, error = %e, "media node not told of the emergency");
            }
            let lease_ms = (holder.expires_at_ms - started.server_time_ms).max(300);
            self.hold(&ch.channel_id, holder.epoch, holder.expires_at_ms, lease_ms);
            channels.push(json!({
                "channelId": ch.channel_id,
                "granted": true,
                "epoch": holder.epoch,
                "expiresAt": holder.expires_at_ms,
            }));
        }
        tracing::info!(
            conn = self.id,
            event_id,
            channels = channels.len(),
            "emergency broadcast started"
        );
        Ok(json!({ "eventId": event_id, "channels": channels }))
    }

    async fn emergency_stop(&mut self, event_id: &str) -> Result<Value> {
        let (_, admin) = self.dispatch_event(event_id).await?;
        // An admin may end anyone's broadcast; a dispatcher only their own.
        let force = admin && !self.emergencies.contains(event_id);
        let stopped = self
            .app
            .access()
            .stop_emergency(spb::StopEmergencyRequest {
                event_id: event_id.to_owned(),
                session_id: self.session.clone(),
                force,
            })
            .await?
            .into_inner();
        self.emergencies.remove(event_id);
        let mut channels = Vec::new();
        for ch in stopped.channels {
            self.stop_holding(&ch.channel_id);
            self.cut_media(&ch.channel_id, ch.epoch).await;
            channels.push(json!({"channelId": ch.channel_id, "epoch": ch.epoch}));
        }
        tracing::info!(conn = self.id, event_id, "emergency broadcast stopped");
        Ok(json!({ "eventId": event_id, "channels": channels }))
    }

    /// Tells the channel's media node to forward nobody from `epoch` on.
    async fn cut_media(&self, channel: &str, epoch: u64) {
        if let Ok(node) = self.place(channel).await
            && let Ok(mut media) = self.media(&node)
        {
            let cut = mpb::SetFloorRequest {
                channel_id: channel.to_owned(),
                producer_id: String::new(),
                epoch,
                expires_at_ms: 0,
            };
            if let Err(status) = media.set_floor(cut).await {
                tracing::warn!(code = ?status.code(), "media node did not take the release");
            }
        }
    }

    /// Applies the user's current grants to this connection: leaves channels it may no longer
    /// hear, gives up floors and send transports where it may no longer talk, and tells the
    /// client.
    async fn enforce_grants(&mut self) {
        let revoked: Vec<String> = self
            .joined
            .iter()
            .filter(|c| self.grants.role(c) < Role::Listen)
            .cloned()
            .collect();
        for channel in &revoked {
            if let Err(e) = self.leave(channel).await {
                tracing::warn!(%channel, error = %e, "leaving a revoked channel failed");
            }
        }
        let muted: Vec<String> = self
            .floors
            .keys()
            .filter(|c| self.grants.role(c) < Role::Talk)
            .cloned()
            .collect();
        for channel in &muted {
            let _ = self.ptt_stop(channel).await;
        }
        let senders: Vec<String> = self
            .transports
            .iter()
            .filter(|(_, t)| {
                t.direction == TransportDirection::Send && self.grants.role(&t.channel) < Role::Talk
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in senders {
            self.close_transport(&id).await;
        }
        let channels: Vec<Value> = self
            .grants
            .named()
            .into_iter()
            .map(|(channel, role)| json!({"channelId": channel, "role": role}))
            .collect();
        if !revoked.is_empty() {
            tracing::info!(conn = self.id, revoked = revoked.len(), "channels revoked");
        }
        let data = json!({
            "channels": channels,
            "defaultRole": self.grants.default_role(),
            "revoked": revoked,
        });
        self.app.metrics.permission_updates.inc();
        self.send(Frame::push("permission-update", data)).await;
    }

    async fn ptt_start(&mut self, channel: &str, priority: u32) -> Result<Value> {
        let mut floors = self.app.floors();
        let acquire = floors.acquire_floor(spb::AcquireFloorRequest {
            channel_id: channel.to_owned(),
            session_id: self.session.clone(),
            priority,
        });
        // Where the channel's media is does not depend on the grant: when this socket has no
        // producer there to say so, ask at the same time as for the floor.
        let known = self.media_node_known(channel);
        let (reply, node) = match known {
            Some(node) => (acquire.await?, Ok(node)),
            None => {
                let (reply, node) = tokio::join!(acquire, self.place(channel));
                if let Ok(node) = &node {
                    self.placed.insert(channel.to_owned(), node.clone());
                }
                (reply?, node)
            }
        };
        let reply = reply.into_inner();
        let holder = reply.holder.clone().unwrap_or_default();
        match reply.outcome() {
            spb::AcquireOutcome::Granted => {
                // The media node first: the client unmutes on our reply, and its first words
                // must already be forwarded.
                let lease_ms = (holder.expires_at_ms - reply.server_time_ms).max(300);
                let tell = |node: String| {
                    let (app, producers) = (Arc::clone(&self.app), Arc::clone(&self.producers));
                    async move {
                        set_floor(
                            &app,
                            &producers,
                            channel,
                            &node,
                            holder.epoch,
                            holder.expires_at_ms,
                        )
                        .await
                    }
                };
                let mut told = match node {
                    Ok(node) => tell(node).await,
                    Err(e) => Err(e),
                };
                // A remembered placement can be stale (its node died and the channel moved on
                // the next join): place the channel again, once.
                if told.is_err() && self.placed.remove(channel).is_some() {
                    told = match self.place(channel).await {
                        Ok(node) => {
                            self.placed.insert(channel.to_owned(), node.clone());
                            tell(node).await
                        }
                        Err(e) => Err(e),
                    };
                }
                if let Err(e) = told {
                    self.placed.remove(channel);
                    // Nobody would hear the speaker: give the floor back rather than hold it mute.
                    let release = spb::ReleaseFloorRequest {
                        channel_id: channel.to_owned(),
                        session_id: self.session.clone(),
                        epoch: holder.epoch,
                    };
                    let _ = self.app.floors().release_floor(release).await;
                    return Err(e);
                }
                self.hold(channel, holder.epoch, holder.expires_at_ms, lease_ms);
                if reply.preempted.is_some() {
                    self.app.metrics.floor_preemptions.inc();
                }
                Ok(
                    json!({"granted": true, "epoch": holder.epoch, "expiresAt": holder.expires_at_ms, "maxTalkMs": reply.max_talk_ms}),
                )
            }
            spb::AcquireOutcome::Queued => Ok(
                json!({"granted": false, "queued": true, "position": reply.queue_position, "speaker": user_of(&holder)}),
            ),
            _ => Ok(
                json!({"granted": false, "speaker": user_of(&holder), "retryAfterMs": reply.retry_after_ms.max(0)}),
            ),
        }
    }

    /// The channel's media node as this socket knows it: where its producer is, or where its
    /// last press placed the channel.
    fn media_node_known(&self, channel: &str) -> Option<String> {
        self.lock_producers()
            .get(channel)
            .map(|(_, n)| n.clone())
            .or_else(|| self.placed.get(channel).cloned())
    }

    async fn tell_media(&mut self, channel: &str, epoch: u64, expires_at_ms: i64) -> Result<()> {
        let node = match self.media_node_known(channel) {
            Some(node) => node,
            None => {
                let node = self.place(channel).await?;
                self.placed.insert(channel.to_owned(), node.clone());
                node
            }
        };
        let told = set_floor(
            &self.app,
            &self.producers,
            channel,
            &node,
            epoch,
            expires_at_ms,
        )
        .await;
        if told.is_err() {
            self.placed.remove(channel);
        }
        told
    }

    fn hold(&mut self, channel: &str, epoch: u64, expires_at_ms: i64, lease_ms: i64) {
        self.stop_holding(channel);
        self.app.hub.holding(self.id, channel, true);
        let renewal = tokio::spawn(renew(
            Arc::clone(&self.app),
            Arc::clone(&self.producers),
            channel.to_owned(),
            self.session.clone(),
            epoch,
            Duration::from_millis(u64::try_from(lease_ms / 3).unwrap_or(1_000).max(100)),
        ));
        self.floors.insert(
            channel.to_owned(),
            Held {
                epoch,
                expires_at_ms,
                renewal,
            },
        );
    }

    fn stop_holding(&mut self, channel: &str) -> Option<u64> {
        self.floors.remove(channel).map(|held| {
            self.app.hub.holding(self.id, channel, false);
            held.renewal.abort();
            held.epoch
        })
    }

    async fn ptt_stop(&mut self, channel: &str) -> Result<Value> {
        let epoch = self.stop_holding(channel).unwrap_or(0);
        let released = self
            .app
            .floors()
            .release_floor(spb::ReleaseFloorRequest {
                channel_id: channel.to_owned(),
                session_id: self.session.clone(),
                epoch,
            })
            .await?
            .into_inner();
        if released.released {
            // Cut at once with the release's epoch; the watch says so too, a moment later.
            self.cut_media(channel, released.epoch).await;
        }
        Ok(json!({}))
    }

    async fn on_event(&mut self, event: HubEvent) {
        match event {
            HubEvent::Floor(push) => {
                let change = &push.change;
                let mine = change
                    .holder
                    .as_ref()
                    .and_then(|h| h.speaker.as_ref())
                    .is_some_and(|s| s.session_id == self.session);
                if let Some(held) = self.floors.get(&change.channel_id)
                    && held.epoch < change.epoch
                    && !mine
                {
                    self.stop_holding(&change.channel_id);
                }
                if mine
                    && let Some(h) = &change.holder
                    && !self.floors.contains_key(&change.channel_id)
                {
                    // Granted from the queue: take it up as if just granted.
                    let lease_ms = (h.expires_at_ms - change.at_ms).max(300);
                    if self
                        .tell_media(&change.channel_id, h.epoch, h.expires_at_ms)
                        .await
                        .is_ok()
                    {
                        self.hold(&change.channel_id, h.epoch, h.expires_at_ms, lease_ms);
                    }
                }
                let interrupted = change
                    .previous
                    .as_ref()
                    .is_some_and(|p| p.session_id == self.session)
                    && matches!(
                        change.reason(),
                        spb::FloorReason::Preempted | spb::FloorReason::Emergency
                    );
                if interrupted {
                    let by = change.holder.as_ref().map(user_of);
                    let data = json!({"channelId": change.channel_id, "by": by, "epoch": change.epoch, "reason": reason(change.reason())});
                    self.send(Frame::push("ptt-interrupted", data)).await;
                }
                self.send_text(push.speaker_changed.clone()).await;
            }
            HubEvent::Grants(grants) => {
                if self.grants.apply(&grants) {
                    self.enforce_grants().await;
                }
            }
            // Handled by the connection loop, which closes the socket.
            HubEvent::Kicked(_) => {}
            HubEvent::GrantsResync => {
                let read = self
                    .app
                    .access()
                    .get_user_grants(spb::GetUserGrantsRequest {
                        user_id: self.user.user_id.clone(),
                    })
                    .await;
                match read {
                    Ok(grants) => {
                        if self.grants.apply(&grants.into_inner()) {
                            self.enforce_grants().await;
                        }
                    }
                    Err(status) => {
                        tracing::warn!(code = ?status.code(), "cannot re-read grants");
                    }
                }
            }
        }
    }

    async fn close_transport(&mut self, transport_id: &str) {
        if let Some(info) = self.transports.remove(transport_id)
            && let Ok(mut media) = self.media(&info.node)
        {
            let _ = media
                .close_transport(mpb::CloseTransportRequest {
                    transport_id: transport_id.to_owned(),
                    session_id: self.session.clone(),
                })
                .await;
            self.lock_producers()
                .retain(|ch, _| *ch != info.channel || info.direction != TransportDirection::Send);
        }
    }

    async fn cleanup(&mut self) {
        for (_, held) in self.floors.drain() {
            held.renewal.abort();
        }
        // An emergency broadcast ends with its broadcaster's connection.
        for event_id in std::mem::take(&mut self.emergencies) {
            let stop = spb::StopEmergencyRequest {
                event_id,
                session_id: self.session.clone(),
                force: false,
            };
            if let Err(status) = self.app.access().stop_emergency(stop).await {
                tracing::debug!(code = ?status.code(), "emergency already over");
            }
        }
        self.app.hub.unregister(self.id);
        // One call releases the session's floors (reason `disconnected`) and memberships for
        // every gateway's clients.
        if let Err(status) = self
            .app
            .sessions()
            .remove_session(spb::RemoveSessionRequest {
                session_id: self.session.clone(),
            })
            .await
            && status.code() != tonic::Code::NotFound
        {
            tracing::warn!(code = ?status.code(), "session removal failed; it will expire");
        }
        let nodes: HashSet<String> = self.transports.values().map(|t| t.node.clone()).collect();
        for node in nodes {
            if let Ok(mut media) = self.media(&node) {
                let _ = media
                    .close_session(mpb::CloseSessionRequest {
                        session_id: self.session.clone(),
                    })
                    .await;
            }
        }
        self.transports.clear();
    }
}

async fn set_floor(
    app: &AppState,
    producers: &Producers,
    channel: &str,
    node: &str,
    epoch: u64,
    expires_at_ms: i64,
) -> Result<()> {
    let producer = producers
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(channel)
        .map(|(p, _)| p.clone())
        .unwrap_or_default();
    let mut media = app
        .media(node)
        .ok_or(err(Code::Unavailable, "media node unreachable"))?;
    media
        .set_floor(mpb::SetFloorRequest {
            channel_id: channel.to_owned(),
            producer_id: producer,
            epoch,
            expires_at_ms,
        })
        .await?;
    Ok(())
}

/// Renews a held floor until it is refused (released, revoked, expired) or aborted.
async fn renew(
    app: Arc<AppState>,
    producers: Producers,
    channel: String,
    session: String,
    epoch: u64,
    every: Duration,
) {
    loop {
        tokio::time::sleep(every).await;
        let renewed = app
            .floors()
            .renew_floor(spb::RenewFloorRequest {
                channel_id: channel.clone(),
                session_id: session.clone(),
                epoch,
            })
            .await;
        match renewed.map(tonic::Response::into_inner) {
            Ok(r) if r.renewed => {
                let node = producers
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get(&channel)
                    .map(|(_, n)| n.clone());
                if let Some(node) = node {
                    let _ =
                        set_floor(&app, &producers, &channel, &node, epoch, r.expires_at_ms).await;
                }
            }
            Ok(_) => return,
            Err(status) => {
                tracing::warn!(code = ?status.code(), %channel, "floor renewal failed; retrying")
            }
        }
    }
}

fn crate_now_ms() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

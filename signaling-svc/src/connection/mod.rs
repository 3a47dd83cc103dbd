//! One client connection: its state session, requests, pushes, floor renewal and cleanup.
//!
//! [`run`] owns the socket: it opens the state session, serves the socket until it closes,
//! cleans up, and closes with a named [`Close`]. The connection's concerns each have a file,
//! all of them `impl Conn` blocks over the one [`Conn`]:
//! - [`dispatch`]: the request table, one line per request, and the reply and its metrics;
//! - [`limits`]: the request and press rate limits, and when refusals become a flood;
//! - [`channels`]: join, leave, list;
//! - [`floors`]: the [`floors::Floors`] this socket holds: grants, renewal, its producers and
//!   where its channels' media is; [`placement`] finds and reaches a channel's media node;
//! - [`transports`]: WebRTC transports, producers and consumers on the media node;
//! - [`resume`]: the session's resume token, taking a session over, and parking it when the
//!   socket is lost;
//! - [`emergency`]: emergency broadcasts; [`grants`]: roles and their enforcement;
//!   [`sync`]: sync sessions; [`events`]: what the hub hands the connection; [`token`]: the
//!   socket's end with its token, and `refresh-token`.
//!
//! The floor flow keeps the order that saves first words: state-svc grants (one atomic step),
//! the media node is told (`SetFloor`), and only then the client hears `granted` and unmutes.
//! A connection that ends on purpose (the client's close, an error, a kick) removes the state
//! session, which releases its floors and membership for everyone, and closes its media
//! transports. One that is lost (the socket ended without a close frame, went silent, read too
//! slowly, or the gateway shuts down) parks the session instead: memberships, queue places
//! and transports wait the grace period for a socket with the resume token; its floors are no
//! longer renewed. A socket whose session another socket resumed just lets go.

mod channels;
mod dispatch;
mod emergency;
mod events;
mod floors;
mod grants;
mod limits;
mod placement;
mod resume;
mod sync;
mod token;
mod transports;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use talkgroup_proto::error::{Reason, ServiceError};
use talkgroup_proto::media::v1 as mpb;
use talkgroup_proto::state::v1 as spb;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::access::Grants;
use crate::app_state::AppState;
use crate::auth::Claims;
use crate::hub::HubEvent;
use crate::outbox::Outgoing;
use crate::outbox::{self, Outbox, OutboxReader};
use crate::protocol::{ClientError, Code, Frame, User, err};

use floors::Floors;
use limits::Limits;
use transports::Transports;

type Result<T> = std::result::Result<T, ClientError>;

/// Why the gateway closes a socket, and the close code it says so with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    /// The client closed, or its socket ended.
    Normal,
    /// Shutdown, or no sign of life.
    GoingAway,
    /// The socket ended without a close frame (the TCP connection broke or was reset).
    Lost,
    /// Another socket resumed the session.
    TakenOver,
    /// The WebSocket protocol was broken.
    ProtocolError,
    /// A text frame was not UTF-8 (RFC 6455 7.4.1: 1007).
    InvalidData,
    /// A frame over the hard size limit (1009).
    TooBig,
    /// Too many refused requests in a row.
    Flood,
    /// The session could not be set up.
    Unavailable,
    /// An administrator disconnected the user (after a `force-disconnect` push).
    Kicked,
    /// The token expired and no `refresh-token` came in time.
    TokenExpired,
    /// The client read too slowly: its outbox overflowed, or a write stalled.
    TooSlow,
    /// The user has as many sessions as the deployment allows.
    TooManySessions,
    /// state-svc no longer has the socket's session (removed while this gateway was not
    /// listening, expired, or lost with the store).
    SessionEnded,
}

impl Close {
    fn code(self) -> u16 {
        use talkgroup_wire::close;
        match self {
            Self::Normal => close::NORMAL,
            Self::GoingAway | Self::Lost => close::GOING_AWAY,
            Self::ProtocolError => close::PROTOCOL_ERROR,
            Self::InvalidData => close::INVALID_DATA,
            Self::TooBig => close::TOO_BIG,
            Self::Flood => close::FLOOD,
            Self::Unavailable => close::UNAVAILABLE,
            Self::Kicked => close::KICKED,
            Self::TokenExpired => close::TOKEN_EXPIRED,
            Self::TooSlow => close::TOO_SLOW,
            Self::TooManySessions => close::TOO_MANY_SESSIONS,
            Self::SessionEnded => close::SESSION_ENDED,
            Self::TakenOver => close::TAKEN_OVER,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Self::GoingAway => "going away",
            Self::Unavailable => "service unavailable",
            Self::Kicked => "disconnected by an administrator",
            Self::TokenExpired => "token expired",
            Self::InvalidData => "text frames must be UTF-8",
            Self::TooBig => "frame too large",
            Self::TooSlow => "too slow to read",
            Self::TooManySessions => "too many sessions for this user",
            Self::SessionEnded => "session ended",
            Self::TakenOver => "session resumed on another connection",
            Self::Lost => "connection lost",
            Self::Normal | Self::ProtocolError | Self::Flood => "",
        }
    }

    /// The close a failed read calls for.
    fn for_read_error(error: axum::Error) -> Self {
        use tungstenite::Error;
        use tungstenite::error::ProtocolError;
        match error.into_inner().downcast::<Error>().map(|e| *e) {
            Ok(Error::Utf8(_)) => Self::InvalidData,
            Ok(Error::Capacity(_)) => Self::TooBig,
            Ok(
                Error::Io(_)
                | Error::ConnectionClosed
                | Error::AlreadyClosed
                | Error::Protocol(ProtocolError::ResetWithoutClosingHandshake),
            ) => Self::Lost,
            _ => Self::ProtocolError,
        }
    }

    /// What the end of the connection does to its session.
    fn ending(self) -> Ending {
        match self {
            // Nothing the client chose: the session waits for its resume.
            Self::Lost | Self::GoingAway | Self::TooSlow => Ending::Park,
            Self::TakenOver => Ending::LetGo,
            _ => Ending::Remove,
        }
    }

    fn frame(self) -> Message {
        Message::Close(Some(CloseFrame {
            code: self.code(),
            reason: self.reason().into(),
        }))
    }
}

/// What a closing connection does with its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Removes it: its floors and memberships end for everyone, its transports close.
    Remove,
    /// Parks it for a resume.
    Park,
    /// Leaves it as it is: another socket holds it now.
    LetGo,
}

/// One connected socket and everything it holds.
struct Conn {
    app: Arc<AppState>,
    id: u64,
    session: String,
    /// The session's generation this socket holds (it moves on at each resume).
    generation: u64,
    user: User,
    out: Outbox,
    joined: HashSet<String>,
    transports: Transports,
    floors: Floors,
    /// What the user may do where.
    grants: Grants,
    /// Events whose emergency broadcast this connection runs.
    emergencies: HashSet<String>,
    limits: Limits,
    /// When the socket's token stops being honoured (`exp` plus the leeway).
    token_deadline: tokio::time::Instant,
    /// The token's `exp` (Unix seconds): TURN credentials end no later.
    token_exp_s: u64,
}

fn valid_name(name: &str) -> bool {
    let n = name.trim();
    !n.is_empty() && n.chars().count() <= 64 && !n.chars().any(char::is_control)
}

/// Serves one authenticated socket until it closes; `resume` is the resume token it came with.
pub async fn run(app: Arc<AppState>, claims: Claims, resume: Option<String>, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    // The opening, each request and the cleanup are boxed: they run briefly and hold big
    // futures (gRPC calls), which would otherwise be part of every idle socket's task.
    let (mut conn, mut events, outbox, opened) =
        match Box::pin(Conn::open(&app, &claims, resume.as_deref())).await {
            Ok(opened) => opened,
            Err(close) => {
                let _ = sink.send(close.frame()).await;
                return;
            }
        };
    let write_timeout = Duration::from_millis(app.config.write_timeout_ms);
    let mut writer = spawn_writer(&app, sink, outbox, write_timeout);
    tracing::info!(
        conn = conn.id,
        session_id = %conn.session,
        user_id = %conn.user.user_id,
        resumed = opened.resumed,
        "connected"
    );
    let session_ttl_ms = opened.session.ttl_ms;
    Box::pin(conn.welcome(opened)).await;
    let close = conn.serve(&mut stream, &mut events, session_ttl_ms).await;
    match close.ending() {
        Ending::Remove => Box::pin(conn.cleanup()).await,
        Ending::Park => Box::pin(conn.park()).await,
        Ending::LetGo => Box::pin(conn.let_go()).await,
    }
    conn.out.push_close(close.frame());
    let id = conn.id;
    drop(conn);
    // What is queued gets one write deadline to go out; a client that does not read by then
    // loses it with the TCP connection.
    if tokio::time::timeout(write_timeout, &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
    if !matches!(close, Close::Normal | Close::TooSlow) {
        drain_until_close(&mut stream).await;
    }
    tracing::info!(conn = id, code = close.code(), "disconnected");
}

/// Writes the outbox to the socket, in order, until a close frame, a failed write or one that
/// takes longer than `write_timeout` (which fails the outbox).
fn spawn_writer(
    app: &AppState,
    mut sink: SplitSink<WebSocket, Message>,
    mut outbox: OutboxReader,
    write_timeout: Duration,
) -> JoinHandle<()> {
    app.tracker.spawn(async move {
        while let Some((outgoing, receipt)) = outbox.recv().await {
            let message = match outgoing {
                Outgoing::Message(message) => message,
                // The frames before it are on the socket: the request's fan-out may go.
                Outgoing::Written(request) => {
                    drop(request);
                    outbox.written(receipt);
                    continue;
                }
            };
            let closing = matches!(message, Message::Close(_));
            match tokio::time::timeout(write_timeout, sink.send(message)).await {
                Ok(Ok(())) => outbox.written(receipt),
                Ok(Err(_)) => break,
                Err(_) => {
                    outbox.stalled();
                    return;
                }
            }
            if closing {
                break;
            }
        }
        let _ = tokio::time::timeout(write_timeout, sink.close()).await;
    })
}

/// The closing handshake: reads and discards until the client's Close (at most 2 s), so frames
/// it sent meanwhile do not turn the close into a TCP reset that hides the code.
async fn drain_until_close(stream: &mut SplitStream<WebSocket>) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(message)) = stream.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// The socket's session: the one its resume token took over, or a new one; whether it was
/// resumed, and why a resume was refused. The close when state-svc cannot give one: 1011, or
/// 4003 when the user has as many sessions as allowed.
async fn establish(
    app: &Arc<AppState>,
    user: &User,
    resume: Option<&str>,
) -> std::result::Result<(spb::Session, bool, Option<&'static str>), Close> {
    let refused = match resume {
        Some(token) => match resume::take_over(app, user, token).await {
            Ok(session) => return Ok((session, true, None)),
            Err(refused) => Some(refused),
        },
        None => None,
    };
    let created = app
        .sessions()
        .create_session(spb::CreateSessionRequest {
            user_id: user.user_id.clone(),
            user_name: user.user_name.clone(),
            gateway_id: app.gateway_id.clone(),
            ttl_ms: 0,
        })
        .await;
    match created {
        Ok(s) => Ok((s.into_inner(), false, refused)),
        Err(status) => {
            if ServiceError::decode(&status).reason == Reason::TooManySessions {
                tracing::info!(user_id = %user.user_id, "too many sessions; closing");
                app.metrics.refused("sessions-per-user");
                return Err(Close::TooManySessions);
            }
            tracing::warn!(code = ?status.code(), "cannot create a session; closing");
            Err(Close::Unavailable)
        }
    }
}

/// The user's roles: the token's, overridden by the grants stored in state-svc; `None` when
/// those cannot be read (fail closed: without them a revoked channel could look open).
async fn stored_grants(app: &Arc<AppState>, claims: &Claims, user: &User) -> Option<Grants> {
    let mut grants = Grants::new(claims.roles.clone());
    let stored = app
        .access()
        .get_user_grants(spb::GetUserGrantsRequest {
            user_id: user.user_id.clone(),
        })
        .await;
    match stored {
        Ok(stored) => {
            grants.apply(&stored.into_inner());
            Some(grants)
        }
        Err(status) => {
            tracing::warn!(code = ?status.code(), "cannot read grants; closing");
            None
        }
    }
}

/// A session the socket cannot go on with: a resumed one stays parked for another try, a new
/// one is removed.
async fn give_up(app: &Arc<AppState>, session: &spb::Session, resumed: bool) {
    if resumed {
        let _ = app
            .sessions()
            .park_session(spb::ParkSessionRequest {
                session_id: session.session_id.clone(),
                generation: session.generation,
            })
            .await;
    } else {
        let _ = app
            .sessions()
            .remove_session(spb::RemoveSessionRequest {
                session_id: session.session_id.clone(),
                generation: Some(session.generation),
            })
            .await;
    }
}

impl Conn {
    /// Creates the state session, registers with the hub and reads the user's stored grants.
    /// The close for the socket (logged) when state-svc cannot do its part: 1011, or 4003 when
    /// the user has as many sessions as allowed.
    async fn open(
        app: &Arc<AppState>,
        claims: &Claims,
        resume: Option<&str>,
    ) -> std::result::Result<(Self, mpsc::Receiver<HubEvent>, OutboxReader, resume::Opened), Close>
    {
        let user = User {
            user_id: claims.sub.clone(),
            user_name: claims
                .name
                .clone()
                .filter(|n| valid_name(n))
                .unwrap_or_else(|| claims.sub.clone()),
        };
        let (session, resumed, refused) = establish(app, &user, resume).await?;
        // Register before reading the grants, so a change made in between is not missed.
        // The outbox first: the hub writes members' pushes straight into it.
        let (out, outbox) = outbox::outbox(app.config.outbox_bytes);
        let (id, events) = app
            .hub
            .register(&user.user_id, &session.session_id, out.clone());
        let grants = match stored_grants(app, claims, &user).await {
            Some(grants) => grants,
            None => {
                app.hub.unregister(id);
                give_up(app, &session, resumed).await;
                return Err(Close::Unavailable);
            }
        };
        let conn = Self {
            app: Arc::clone(app),
            id,
            floors: Floors::new(Arc::clone(app), id, session.session_id.clone()),
            session: session.session_id.clone(),
            generation: session.generation,
            user,
            out,
            joined: HashSet::new(),
            transports: Transports::default(),
            grants,
            emergencies: HashSet::new(),
            limits: Limits::new(&app.config),
            token_deadline: token::deadline(claims.exp, app.auth.leeway()),
            token_exp_s: claims.exp,
        };
        let opened = resume::Opened {
            resumed,
            refused,
            session,
        };
        Ok((conn, events, outbox, opened))
    }

    /// The socket loop: frames from the client, events from the hub, liveness and the
    /// session's keep-alive, until something closes the socket.
    async fn serve(
        &mut self,
        stream: &mut SplitStream<WebSocket>,
        events: &mut mpsc::Receiver<HubEvent>,
        session_ttl_ms: u32,
    ) -> Close {
        let ping_every = Duration::from_millis(self.app.config.ping_interval_ms);
        let mut ping = tokio::time::interval(ping_every);
        // The first touch a period after the socket opened: the session was just created or
        // resumed, and the resume token before a resume stays good until that touch.
        let touch_every = Duration::from_millis(u64::from(session_ttl_ms.max(3_000) / 3));
        let mut touch =
            tokio::time::interval_at(tokio::time::Instant::now() + touch_every, touch_every);
        let mut last_heard = Instant::now();
        let expiry = tokio::time::sleep_until(self.token_deadline);
        tokio::pin!(expiry);
        loop {
            if expiry.deadline() != self.token_deadline {
                expiry.as_mut().reset(self.token_deadline);
            }
            tokio::select! {
                message = stream.next() => {
                    last_heard = Instant::now();
                    if let Some(close) = Box::pin(self.on_message(message)).await {
                        return close;
                    }
                }
                Some(event) = events.recv() => {
                    if let Some(close) = Box::pin(self.on_event(event)).await {
                        return close;
                    }
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() > ping_every * 2 {
                        tracing::info!(conn = self.id, "no sign of life; closing");
                        return Close::GoingAway;
                    }
                    self.out.push(Outgoing::Message(Message::Ping(Vec::new().into())));
                }
                () = self.out.failed() => {
                    tracing::info!(
                        conn = self.id,
                        cause = ?self.out.failure(),
                        queued_bytes = self.out.queued(),
                        "client too slow to read; closing",
                    );
                    self.app.metrics.slow_client();
                    return Close::TooSlow;
                }
                _ = touch.tick() => {
                    if let Some(close) = Box::pin(self.touch_session()).await {
                        return close;
                    }
                }
                () = &mut expiry => {
                    tracing::info!(conn = self.id, "token expired; closing");
                    return Close::TokenExpired;
                }
                () = self.app.shutdown.cancelled() => return Close::GoingAway,
            }
        }
    }

    /// One message from the socket; the close it calls for, if any.
    async fn on_message(
        &mut self,
        message: Option<std::result::Result<Message, axum::Error>>,
    ) -> Option<Close> {
        match message {
            Some(Ok(Message::Text(text))) => {
                (!self.on_text(text.as_str()).await).then_some(Close::Flood)
            }
            Some(Ok(Message::Binary(_))) => {
                let refused = err(Code::BadRequest, "binary frames are not supported");
                self.send(Frame::error(None, refused)).await;
                None
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => None,
            Some(Ok(Message::Close(_))) => Some(Close::Normal),
            None => Some(Close::Lost),
            Some(Err(error)) => Some(Close::for_read_error(error)),
        }
    }

    /// Keeps the session alive. A session state-svc no longer has closes the socket (4004):
    /// whatever ended it (a kick this gateway missed, expiry, lost state), the socket must not
    /// live on without one. Other failures are left to the next touch.
    async fn touch_session(&self) -> Option<Close> {
        let touch = spb::TouchSessionRequest {
            session_id: self.session.clone(),
        };
        match self.app.sessions().touch_session(touch).await {
            Err(status) if ServiceError::decode(&status).reason == Reason::NotFound => {
                tracing::info!(conn = self.id, session_id = %self.session, "session gone; closing");
                Some(Close::SessionEnded)
            }
            // The takeover's event did not come (the watch was down): the touch tells.
            Ok(session) if session.get_ref().generation > self.generation => {
                tracing::info!(conn = self.id, session_id = %self.session, "session resumed elsewhere; closing");
                Some(Close::TakenOver)
            }
            _ => None,
        }
    }

    async fn send(&self, frame: impl Into<Frame>) {
        if let Some(text) = frame.into().encode() {
            self.send_text(text).await;
        }
    }

    /// Queues a frame without waiting: the read loop never waits on the client's reading. A
    /// full outbox fails, and the loop then closes the socket.
    async fn send_text(&self, text: Utf8Bytes) {
        self.out.push(Outgoing::Message(Message::Text(text)));
    }

    /// Ends what the connection holds: renewals, its emergency broadcasts, its state session
    /// (which releases its floors and memberships for everyone) and its media transports.
    async fn cleanup(&mut self) {
        self.floors.stop_all();
        self.end_emergencies().await;
        let nodes = self.leave_hub();
        // One call releases the session's floors (reason `disconnected`) and memberships for
        // every gateway's clients; only while the session is still this socket's: another
        // socket may have resumed it meanwhile, and its media must not be closed either.
        match self
            .app
            .sessions()
            .remove_session(spb::RemoveSessionRequest {
                session_id: self.session.clone(),
                generation: Some(self.generation),
            })
            .await
        {
            Ok(_) => {}
            Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                tracing::info!(conn = self.id, session_id = %self.session, "session resumed elsewhere; left to its new socket");
                return;
            }
            Err(status) if status.code() == tonic::Code::NotFound => {}
            Err(status) => {
                tracing::warn!(code = ?status.code(), "session removal failed; it will expire");
            }
        }
        for node in nodes {
            if let Ok(mut media) = placement::media(&self.app, &node) {
                let _ = media
                    .close_session(mpb::CloseSessionRequest {
                        session_id: self.session.clone(),
                    })
                    .await;
            }
        }
    }
}

impl Conn {
    /// An emergency broadcast ends with its broadcaster's connection.
    async fn end_emergencies(&mut self) {
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
    }

    /// Gives the user's transport places back and leaves the hub (in that order: the
    /// connection count tells the places are free); the media nodes the transports are on.
    fn leave_hub(&mut self) -> HashSet<String> {
        let (held, nodes) = self.transports.take_nodes();
        self.app.transports.give_back(&self.user.user_id, held);
        self.app.hub.unregister(self.id);
        nodes
    }
}

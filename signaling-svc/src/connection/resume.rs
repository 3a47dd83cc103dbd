//! Session continuity: the `session` push with the resume token, a new socket taking a session
//! over with it (on any gateway replica), and parking the session when its socket is lost.
//!
//! A resumed socket gets back what the session held: its channels (a `channel-state` push each,
//! so what changed meanwhile is seen), its transports on the media nodes (listed by the nodes,
//! so another replica can serve them), its producers, and the floors whose lease has not
//! lapsed (their renewal starts again; nobody renewed them while no socket was there). Its
//! roles are applied again and pushed as a `permission-update`.

use std::collections::{HashMap, HashSet};

use talkgroup_proto::error::{Reason, ServiceError};
use talkgroup_proto::media::v1 as mpb;
use talkgroup_proto::state::v1 as spb;

use super::placement::media;
use super::transports::TransportInfo;
use super::{Close, Conn};
use crate::app_state::AppState;
use crate::protocol::push::{ResumedTransport, SessionInfo};
use crate::protocol::{Push, TransportDirection, User};

/// Longest resume token accepted: a session id, a dot and 64 hex digits, with room to spare.
pub(super) const MAX_RESUME_TOKEN: usize = 160;

/// The one refusal a client hears, whatever the cause (used, expired, another user's, made up).
const REFUSED: &str = "resume-refused";

/// How the socket's session came about.
pub(super) struct Opened {
    /// It was taken over with a resume token.
    pub resumed: bool,
    /// A resume was asked for and refused.
    pub refused: Option<&'static str>,
    pub session: spb::Session,
}

/// Takes the session of `token` over for `user` on this gateway.
pub(super) async fn take_over(
    app: &AppState,
    user: &User,
    token: &str,
) -> Result<spb::Session, &'static str> {
    if token.is_empty() || token.len() > MAX_RESUME_TOKEN {
        app.metrics.resume("refused");
        return Err(REFUSED);
    }
    let resumed = app
        .sessions()
        .resume_session(spb::ResumeSessionRequest {
            resume_token: token.to_owned(),
            user_id: user.user_id.clone(),
            gateway_id: app.gateway_id.clone(),
        })
        .await;
    match resumed {
        Ok(session) => {
            app.metrics.resume("resumed");
            Ok(session.into_inner())
        }
        Err(status) => {
            let reason = ServiceError::decode(&status).reason;
            if reason == Reason::PermissionDenied {
                tracing::info!(user_id = %user.user_id, "resume refused; new session");
                app.metrics.resume("refused");
            } else {
                tracing::warn!(code = ?status.code(), "resume failed; new session");
                app.metrics.resume("failed");
            }
            Err(REFUSED)
        }
    }
}

impl Conn {
    /// The socket's first pushes: `session`, and on a resume what the session holds.
    pub(super) async fn welcome(&mut self, opened: Opened) {
        let mut info = SessionInfo {
            session_id: self.session.clone(),
            resume_token: opened.session.resume_token.clone(),
            resume_grace_ms: opened.session.resume_grace_ms,
            resumed: opened.resumed,
            resume_error: opened.refused.map(Into::into),
            channels: Vec::new(),
            transports: Vec::new(),
        };
        if !opened.resumed {
            self.send(Push::Session(info)).await;
            return;
        }
        let states = self.restore(&opened.session.channel_ids, &mut info).await;
        self.send(Push::Session(info)).await;
        // Roles may have changed while no socket was there: applied and pushed again.
        self.enforce_grants().await;
        for state in states {
            if !self.joined.contains(&state.channel_id) {
                continue;
            }
            self.take_up_own_floor(&state).await;
            self.send(Push::ChannelState(crate::protocol::channel_state(&state)))
                .await;
        }
    }

    /// Follows the session's channels again and takes up its transports and producers; the
    /// channels' states, read now.
    async fn restore(
        &mut self,
        channel_ids: &[String],
        info: &mut SessionInfo,
    ) -> Vec<spb::ChannelState> {
        let mut states = Vec::new();
        let mut nodes = HashSet::new();
        for channel in channel_ids {
            if !self.follow(channel.clone()) {
                // This gateway has no room for the channel: the session leaves it.
                tracing::warn!(%channel, "no room to follow a resumed channel; leaving it");
                let _ = self
                    .app
                    .sessions()
                    .leave_channel(spb::LeaveChannelRequest {
                        session_id: self.session.clone(),
                        channel_id: channel.clone(),
                    })
                    .await;
                continue;
            }
            let state = self
                .app
                .channel_service()
                .get_channel_state(spb::GetChannelStateRequest {
                    channel_id: channel.clone(),
                })
                .await;
            match state {
                Ok(state) => states.push(state.into_inner()),
                Err(status) => {
                    tracing::warn!(%channel, code = ?status.code(), "cannot read a resumed channel")
                }
            }
            let placed = self
                .app
                .registry()
                .get_placement(spb::GetPlacementRequest {
                    channel_id: channel.clone(),
                })
                .await;
            if let Ok(placed) = placed
                && let Some(node) = placed.into_inner().node
            {
                self.app.learn_node(&node);
                nodes.insert(node.grpc_addr);
            }
        }
        info.channels = self.joined.iter().cloned().collect();
        info.channels.sort();
        for node in nodes {
            self.adopt_transports(&node, info).await;
        }
        states
    }

    /// Takes up the session's transports on `node`: in a channel it is still in, served as
    /// before; anywhere else, closed.
    async fn adopt_transports(&mut self, node: &str, info: &mut SessionInfo) {
        let Ok(mut client) = media(&self.app, node) else {
            return;
        };
        let listed = client
            .list_session_transports(mpb::ListSessionTransportsRequest {
                session_id: self.session.clone(),
            })
            .await;
        let listed = match listed {
            Ok(listed) => listed.into_inner().transports,
            Err(status) => {
                tracing::warn!(%node, code = ?status.code(), "cannot list a resumed session's transports");
                return;
            }
        };
        let mut adopted = 0;
        let mut producers = HashMap::new();
        for t in listed {
            let direction = match t.direction() {
                mpb::Direction::Send => TransportDirection::Send,
                mpb::Direction::Recv => TransportDirection::Recv,
                mpb::Direction::Unspecified => continue,
            };
            if !self.joined.contains(&t.channel_id) {
                let _ = client
                    .close_transport(mpb::CloseTransportRequest {
                        transport_id: t.transport_id,
                        session_id: self.session.clone(),
                    })
                    .await;
                continue;
            }
            adopted += 1;
            if !t.producer_id.is_empty() {
                producers.insert(t.channel_id.clone(), t.producer_id.clone());
            }
            info.transports.push(ResumedTransport {
                transport_id: t.transport_id.clone(),
                channel_id: t.channel_id.clone(),
                direction,
                producer_id: Some(t.producer_id).filter(|p| !p.is_empty()),
                consumer_id: Some(t.consumer_id).filter(|c| !c.is_empty()),
                ssrc: Some(t.ssrc).filter(|_| direction == TransportDirection::Recv),
            });
            self.transports.insert(
                t.transport_id,
                TransportInfo {
                    channel: t.channel_id,
                    node: node.to_owned(),
                    direction,
                },
            );
        }
        self.app.transports.add(&self.user.user_id, adopted);
        for (channel, producer) in producers {
            // Not held yet: nothing to tell the node until the floor is taken up.
            let _ = self
                .floors
                .produced(&channel, producer, node.to_owned())
                .await;
        }
    }

    /// Renews the session's floor of the channel again when its lease has not lapsed.
    async fn take_up_own_floor(&mut self, state: &spb::ChannelState) {
        let Some(holder) = &state.holder else {
            return;
        };
        let mine = holder
            .speaker
            .as_ref()
            .is_some_and(|s| s.session_id == self.session);
        if mine && holder.expires_at_ms > state.server_time_ms {
            tracing::info!(conn = self.id, channel = %state.channel_id, epoch = holder.epoch, "resumed holding the floor");
            self.floors
                .take_up(&state.channel_id, holder, state.server_time_ms)
                .await;
            // Demoted while no socket was there: the floor goes back at once.
            if self.grants.role(&state.channel_id) < crate::access::Role::Talk {
                tracing::info!(conn = self.id, channel = %state.channel_id, "no longer allowed to talk; floor released");
                let _ = self.floors.release(&state.channel_id).await;
            }
        }
    }

    /// The socket was lost: the session waits the grace period for a resume. Its floors are
    /// no longer renewed (their leases run out unless the resume comes first), its transports
    /// stay on the media nodes, its emergency broadcasts end.
    pub(super) async fn park(&mut self) {
        self.floors.stop_all();
        self.end_emergencies().await;
        // The transports stay on their nodes: they count against the user's limit here until
        // the grace period is over (a resume on this gateway counts them again meanwhile).
        let (held, _) = self.transports.take_nodes();
        self.app.hub.unregister(self.id);
        let user = self.user.user_id.clone();
        let give_back = |app: &std::sync::Arc<AppState>, after: std::time::Duration| {
            let app_for_task = std::sync::Arc::clone(app);
            app.tracker.spawn(async move {
                tokio::time::sleep(after).await;
                app_for_task.transports.give_back(&user, held);
            });
        };
        let parked = self
            .app
            .sessions()
            .park_session(spb::ParkSessionRequest {
                session_id: self.session.clone(),
                generation: self.generation,
            })
            .await;
        match parked {
            Ok(session) => {
                let session = session.into_inner();
                tracing::info!(
                    conn = self.id,
                    session_id = %self.session,
                    until_ms = session.expires_at_ms,
                    "session parked for a resume"
                );
                self.app.metrics.resume("parked");
                let grace = (session.expires_at_ms - session.parked_at_ms).max(0);
                give_back(
                    &self.app,
                    std::time::Duration::from_millis(u64::try_from(grace).unwrap_or(0)),
                );
            }
            Err(status) if status.code() == tonic::Code::NotFound => {
                tracing::debug!(conn = self.id, "session already gone or resumed");
                give_back(&self.app, std::time::Duration::ZERO);
            }
            Err(status) => {
                // The session keeps its time to live: it can still be resumed until then.
                tracing::warn!(code = ?status.code(), "cannot park the session; it will expire");
                give_back(&self.app, std::time::Duration::from_millis(60_000));
            }
        }
    }

    /// Another socket resumed the session: this one lets go of it without ending anything.
    pub(super) async fn let_go(&mut self) {
        self.floors.stop_all();
        self.end_emergencies().await;
        self.leave_hub();
        tracing::info!(conn = self.id, session_id = %self.session, "session taken over by another connection");
    }

    /// A takeover event: closes this socket if a later socket holds its session.
    pub(super) fn taken_over(&self, session: &str, generation: u64) -> Option<Close> {
        (session == self.session && generation > self.generation).then_some(Close::TakenOver)
    }
}

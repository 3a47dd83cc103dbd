//! `ptt.state.v1.SessionService` and the unary calls of `ptt.state.v1.ChannelService`.

use talkgroup_proto::state::v1 as pb;
use tonic::{Request, Response, Status};

use super::Api;
use super::convert::{self, channel_id, session_id, user_id};
use crate::domain::{
    ChannelConfig, ChannelId, NewSession, Resume, ResumeToken, SessionId, parse_user_name, rules,
};
use crate::error::StoreError;
use crate::store::Store;

/// Longest accepted gateway id.
const MAX_GATEWAY_ID: usize = 128;
/// Longest session time to live a caller may ask for: one day.
const MAX_SESSION_TTL_MS: u32 = 86_400_000;

impl<S: Store> Api<S> {
    /// Ends the user's session parked longest (its socket was lost and nobody resumed it yet),
    /// so a user who comes back without the resume token is not locked out by their own
    /// parked sessions; whether there was one.
    async fn end_oldest_parked(&self, user: &crate::domain::UserId) -> Result<bool, StoreError> {
        let sessions = self.store.user_sessions(user).await?;
        let Some(oldest) = sessions
            .iter()
            .filter(|s| s.parked_at_ms > 0)
            .min_by_key(|s| s.parked_at_ms)
        else {
            return Ok(false);
        };
        tracing::info!(session_id = %oldest.session_id, user_id = %user, "ending a parked session for a new one");
        self.store.remove_session(&oldest.session_id, None).await?;
        Ok(true)
    }

    /// A session as its new socket's gateway sees it: with its resume token and grace.
    fn with_token(&self, session: &crate::domain::Session, token: &ResumeToken) -> pb::Session {
        pb::Session {
            resume_token: token.expose(),
            resume_grace_ms: self.settings().resume_grace_ms,
            ..convert::session(session)
        }
    }
}

#[tonic::async_trait]
impl<S: Store> pb::session_service_server::SessionService for Api<S> {
    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let req = request.into_inner();
        if req.gateway_id.len() > MAX_GATEWAY_ID || req.gateway_id.chars().any(char::is_control) {
            return Err(Status::invalid_argument("invalid gateway id"));
        }
        if req.ttl_ms > MAX_SESSION_TTL_MS {
            return Err(Status::invalid_argument("session ttl out of range"));
        }
        let sid = SessionId::generate();
        let token = ResumeToken::generate(&sid);
        let new = NewSession {
            session_id: sid,
            user_id: user_id(&req.user_id)?,
            user_name: parse_user_name(&req.user_name)?,
            gateway_id: req.gateway_id,
            ttl_ms: req.ttl_ms,
            resume_digest: token.digest(),
        };
        let user = new.user_id.clone();
        let mut created = self.store.create_session(new.clone()).await;
        if matches!(created, Err(StoreError::TooManySessions))
            && self.end_oldest_parked(&user).await?
        {
            created = self.store.create_session(new).await;
        }
        let session = match created {
            Err(StoreError::TooManySessions) => {
                let max = self.settings().max_sessions_per_user;
                tracing::info!(user_id = %user, max, "session refused: too many sessions");
                return Err(StoreError::TooManySessions.into());
            }
            created => created?,
        };
        tracing::debug!(session_id = %session.session_id, user_id = %session.user_id, "session created");
        Ok(Response::new(self.with_token(&session, &token)))
    }

    async fn park_session(
        &self,
        request: Request<pb::ParkSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let req = request.into_inner();
        let sid = session_id(&req.session_id)?;
        let session = self.store.park_session(&sid, req.generation).await?;
        tracing::debug!(session_id = %sid, until_ms = session.expires_at_ms, "session parked");
        Ok(Response::new(convert::session(&session)))
    }

    async fn resume_session(
        &self,
        request: Request<pb::ResumeSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let req = request.into_inner();
        if req.gateway_id.len() > MAX_GATEWAY_ID || req.gateway_id.chars().any(char::is_control) {
            return Err(Status::invalid_argument("invalid gateway id"));
        }
        let uid = user_id(&req.user_id)?;
        // A malformed token is refused like a wrong one: it tells nothing about sessions.
        let Some(token) = crate::domain::ResumeToken::parse(&req.resume_token) else {
            return Err(StoreError::PermissionDenied("resume refused").into());
        };
        let next = ResumeToken::generate(&token.session_id);
        let resume = Resume {
            session_id: token.session_id.clone(),
            user_id: uid,
            digest: token.digest(),
            next_digest: next.digest(),
            gateway_id: req.gateway_id,
        };
        let session = match self.store.resume_session(resume).await {
            // Gone and refused look the same to the caller.
            Err(StoreError::NotFound(_) | StoreError::PermissionDenied(_)) => {
                tracing::info!(session_id = %token.session_id, "resume refused");
                return Err(StoreError::PermissionDenied("resume refused").into());
            }
            resumed => resumed?,
        };
        tracing::info!(
            session_id = %session.session_id,
            generation = session.generation,
            gateway_id = %session.gateway_id,
            "session resumed"
        );
        Ok(Response::new(self.with_token(&session, &next)))
    }

    async fn touch_session(
        &self,
        request: Request<pb::TouchSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let sid = session_id(&request.into_inner().session_id)?;
        Ok(Response::new(convert::session(
            &self.store.touch_session(&sid).await?,
        )))
    }

    async fn get_session(
        &self,
        request: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let sid = session_id(&request.into_inner().session_id)?;
        Ok(Response::new(convert::session(
            &self.store.session(&sid).await?,
        )))
    }

    async fn list_user_sessions(
        &self,
        request: Request<pb::ListUserSessionsRequest>,
    ) -> Result<Response<pb::ListUserSessionsResponse>, Status> {
        let uid = user_id(&request.into_inner().user_id)?;
        let sessions = self.store.user_sessions(&uid).await?;
        Ok(Response::new(pb::ListUserSessionsResponse {
            sessions: sessions.iter().map(convert::session).collect(),
        }))
    }

    async fn join_channel(
        &self,
        request: Request<pb::JoinChannelRequest>,
    ) -> Result<Response<pb::ChannelState>, Status> {
        let req = request.into_inner();
        let sid = session_id(&req.session_id)?;
        let ch = channel_id(&req.channel_id)?;
        self.enforce_channel_limit(&sid, &ch).await?;
        let state = self.store.join_channel(&sid, &ch).await?;
        tracing::debug!(channel_id = %ch, session_id = %sid, "joined channel");
        Ok(Response::new(convert::channel_state(&state)))
    }

    async fn leave_channel(
        &self,
        request: Request<pb::LeaveChannelRequest>,
    ) -> Result<Response<pb::LeaveChannelResponse>, Status> {
        let req = request.into_inner();
        let sid = session_id(&req.session_id)?;
        let ch = channel_id(&req.channel_id)?;
        let left = self.store.leave_channel(&sid, &ch).await?;
        Ok(Response::new(pb::LeaveChannelResponse {
            was_member: left.was_member,
            released_floor: left.released_floor,
        }))
    }

    async fn list_members(
        &self,
        request: Request<pb::ListMembersRequest>,
    ) -> Result<Response<pb::ListMembersResponse>, Status> {
        let ch = channel_id(&request.into_inner().channel_id)?;
        let state = self.store.channel_state(&ch).await?;
        Ok(Response::new(pb::ListMembersResponse {
            members: state.members.iter().map(convert::member).collect(),
        }))
    }

    async fn remove_session(
        &self,
        request: Request<pb::RemoveSessionRequest>,
    ) -> Result<Response<pb::RemoveSessionResponse>, Status> {
        let req = request.into_inner();
        let sid = session_id(&req.session_id)?;
        let removed = self.store.remove_session(&sid, req.generation).await?;
        tracing::debug!(session_id = %sid, channels = removed.channels_left.len(), "session removed");
        Ok(Response::new(pb::RemoveSessionResponse {
            channels_left: removed
                .channels_left
                .iter()
                .map(ToString::to_string)
                .collect(),
            floors_released: removed.floors_released,
        }))
    }
}

impl<S: Store> Api<S> {
    pub(super) async fn get_channel_state_impl(
        &self,
        req: pb::GetChannelStateRequest,
    ) -> Result<pb::ChannelState, Status> {
        let ch = channel_id(&req.channel_id)?;
        Ok(convert::channel_state(
            &self.store.channel_state(&ch).await?,
        ))
    }

    pub(super) async fn get_channel_config_impl(
        &self,
        req: pb::GetChannelConfigRequest,
    ) -> Result<pb::ChannelConfig, Status> {
        let ch = channel_id(&req.channel_id)?;
        Ok(convert::channel_config(
            &ch,
            self.store.channel_config(&ch).await?,
        ))
    }

    pub(super) async fn set_channel_config_impl(
        &self,
        req: pb::SetChannelConfigRequest,
    ) -> Result<pb::ChannelConfig, Status> {
        let config = req
            .config
            .ok_or_else(|| Status::invalid_argument("config is required"))?;
        let ch = channel_id(&config.channel_id)?;
        let wanted = ChannelConfig {
            queue_enabled: config.queue_enabled,
            lease_ms: config.lease_ms,
            max_talk_ms: config.max_talk_ms,
        };
        let saved = self.store.set_channel_config(&ch, wanted).await?;
        tracing::info!(channel_id = %ch, queue = saved.queue_enabled, lease_ms = saved.lease_ms, max_talk_ms = saved.max_talk_ms, "channel config set");
        Ok(convert::channel_config(&ch, saved))
    }
}

impl<S: Store> Api<S> {
    /// Keeps a user at `--max-channels-per-user` joined channels across their sessions; a
    /// channel the session is already in is never refused.
    async fn enforce_channel_limit(&self, sid: &SessionId, ch: &ChannelId) -> Result<(), Status> {
        let session = self.store.session(sid).await?;
        if session.channels.contains(ch) {
            return Ok(());
        }
        let sessions = self.store.user_sessions(&session.user_id).await?;
        let max = self.settings().max_channels_per_user;
        if rules::channels_joined(&sessions, self.clock.now_ms()) >= max as usize {
            return Err(StoreError::TooManyChannels.into());
        }
        Ok(())
    }
}

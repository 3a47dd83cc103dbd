//! `ptt.admin.v1.AdminService`: the administration API, behind a bearer admin token.
//!
//! [`AdminAuth`] checks `authorization: Bearer <token>` in constant time before any handler
//! runs; without a configured token every call is refused. The handlers reuse the internal
//! services' validated implementations.

use std::collections::HashSet;
use std::sync::Arc;

use subtle::ConstantTimeEq;
use talkgroup_proto::admin::v1 as apb;
use talkgroup_proto::state::v1 as pb;
use tonic::{Request, Response, Status};

use super::Api;
use super::access::event_id;
use super::convert::{self, channel_id, node_id, user_id};
use crate::audit::History;
use crate::store::Store;

/// Longest admin token accepted (config validation allows 16 to 512 characters).
const MAX_TOKEN_BYTES: usize = 512;
/// Longest kick reason shown to users.
const MAX_REASON_CHARS: usize = 200;
/// Sessions listed when the caller gives no limit, and the most ever listed.
const DEFAULT_SESSION_LIMIT: u32 = 1_000;
const MAX_SESSION_LIMIT: u32 = 10_000;

/// The admin token check, as a tonic interceptor.
#[derive(Clone)]
pub struct AdminAuth {
    token: Option<Arc<[u8; MAX_TOKEN_BYTES]>>,
    len: usize,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminAuth")
            .field("configured", &self.token.is_some())
            .finish()
    }
}

impl AdminAuth {
    pub fn new(token: Option<&str>) -> Self {
        let Some(token) = token.filter(|t| t.len() <= MAX_TOKEN_BYTES) else {
            return Self {
                token: None,
                len: 0,
            };
        };
        let mut padded = [0u8; MAX_TOKEN_BYTES];
        padded[..token.len()].copy_from_slice(token.as_bytes());
        Self {
            token: Some(Arc::new(padded)),
            len: token.len(),
        }
    }

    /// Compares the presented token with the configured one in time that depends on neither.
    fn accepts(&self, presented: &str) -> bool {
        let Some(token) = &self.token else {
            return false;
        };
        if presented.len() > MAX_TOKEN_BYTES {
            return false;
        }
        let mut padded = [0u8; MAX_TOKEN_BYTES];
        padded[..presented.len()].copy_from_slice(presented.as_bytes());
        let same_bytes = padded.ct_eq(&**token);
        let same_len = (presented.len() as u64).ct_eq(&(self.len as u64));
        bool::from(same_bytes & same_len)
    }

    pub fn check(&self, request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match presented {
            Some(token) if self.accepts(token.trim()) => Ok(request),
            _ => {
                tracing::warn!("admin call refused: missing or wrong token");
                Err(Status::unauthenticated("admin token required"))
            }
        }
    }
}

/// The admin service over the shared API handle.
#[derive(Debug)]
pub struct AdminApi<S> {
    api: Api<S>,
    history: Option<Arc<History>>,
}

impl<S> AdminApi<S> {
    pub fn new(api: Api<S>, history: Option<Arc<History>>) -> Self {
        Self { api, history }
    }

    fn history(&self) -> Result<&History, Status> {
        self.history
            .as_deref()
            .ok_or_else(|| Status::failed_precondition("no audit database configured"))
    }
}

fn history_limit(raw: u32) -> i64 {
    i64::from(match raw {
        0 => DEFAULT_SESSION_LIMIT,
        n => n.min(MAX_SESSION_LIMIT),
    })
}

#[tonic::async_trait]
impl<S: Store> apb::admin_service_server::AdminService for AdminApi<S> {
    async fn list_channels(
        &self,
        _request: Request<apb::ListChannelsRequest>,
    ) -> Result<Response<apb::ListChannelsResponse>, Status> {
        let store = &self.api.store;
        let ids = store.list_channels().await?;
        let summaries = futures::future::try_join_all(ids.iter().map(|ch| async move {
            let state = store.channel_state(ch).await?;
            let event = store.channel_event(ch).await?;
            Ok::<_, crate::error::StoreError>((state, event))
        }))
        .await?;
        let channels = summaries
            .into_iter()
            .filter(|(state, _)| !state.members.is_empty())
            .map(|(state, event)| apb::ChannelSummary {
                channel_id: state.channel_id.to_string(),
                holder: state.holder.as_ref().map(convert::holder),
                member_count: u32::try_from(
                    state
                        .members
                        .iter()
                        .map(|m| &m.user_id)
                        .collect::<HashSet<_>>()
                        .len(),
                )
                .unwrap_or(u32::MAX),
                media_node_id: state.media_node.map(|n| n.to_string()).unwrap_or_default(),
                event_id: event.map(|e| e.to_string()).unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(apb::ListChannelsResponse { channels }))
    }

    async fn get_channel(
        &self,
        request: Request<apb::GetChannelRequest>,
    ) -> Result<Response<apb::ChannelDetail>, Status> {
        let ch = channel_id(&request.into_inner().channel_id)?;
        let store = &self.api.store;
        let state = store.channel_state(&ch).await?;
        let config = store.channel_config(&ch).await?;
        let event = store.channel_event(&ch).await?;
        Ok(Response::new(apb::ChannelDetail {
            state: Some(convert::channel_state(&state)),
            config: Some(convert::channel_config(&ch, config)),
            event_id: event.map(|e| e.to_string()).unwrap_or_default(),
        }))
    }

    async fn force_release_floor(
        &self,
        request: Request<apb::ForceReleaseFloorRequest>,
    ) -> Result<Response<apb::ForceReleaseFloorResponse>, Status> {
        let ch = channel_id(&request.into_inner().channel_id)?;
        let outcome = self.api.store.force_release_floor(&ch, None).await?;
        tracing::info!(channel_id = %ch, released = outcome.released(), "admin force release");
        Ok(Response::new(apb::ForceReleaseFloorResponse {
            released: outcome.released(),
            epoch: outcome.epoch,
        }))
    }

    async fn kick_user(
        &self,
        request: Request<apb::KickUserRequest>,
    ) -> Result<Response<apb::KickUserResponse>, Status> {
        let req = request.into_inner();
        let uid = user_id(&req.user_id)?;
        let reason = req.reason.trim();
        if reason.chars().count() > MAX_REASON_CHARS || reason.chars().any(char::is_control) {
            return Err(Status::invalid_argument("invalid reason"));
        }
        let reason = if reason.is_empty() {
            "disconnected by an administrator"
        } else {
            reason
        };
        let closed = self.api.store.kick_user(&uid, reason).await?;
        tracing::info!(user_id = %uid, sessions = closed, "admin kick");
        Ok(Response::new(apb::KickUserResponse {
            sessions_closed: closed,
        }))
    }

    async fn list_sessions(
        &self,
        request: Request<apb::ListSessionsRequest>,
    ) -> Result<Response<apb::ListSessionsResponse>, Status> {
        let req = request.into_inner();
        let limit = match req.limit {
            0 => DEFAULT_SESSION_LIMIT,
            n => n.min(MAX_SESSION_LIMIT),
        } as usize;
        let mut sessions = if req.user_id.is_empty() {
            self.api.store.list_sessions(limit).await?
        } else {
            self.api
                .store
                .user_sessions(&user_id(&req.user_id)?)
                .await?
        };
        sessions.truncate(limit);
        Ok(Response::new(apb::ListSessionsResponse {
            sessions: sessions.iter().map(convert::session).collect(),
        }))
    }

    async fn list_media_nodes(
        &self,
        _request: Request<apb::ListMediaNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let nodes = self.api.store.list_nodes().await?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: nodes.iter().map(convert::node).collect(),
        }))
    }

    async fn drain_media_node(
        &self,
        request: Request<apb::DrainMediaNodeRequest>,
    ) -> Result<Response<pb::MediaNode>, Status> {
        let node = node_id(&request.into_inner().node_id)?;
        let drained = self.api.store.drain_node(&node).await?;
        tracing::info!(node_id = %node, "admin drain");
        Ok(Response::new(convert::node(&drained)))
    }

    async fn get_user_grants(
        &self,
        request: Request<pb::GetUserGrantsRequest>,
    ) -> Result<Response<pb::UserGrants>, Status> {
        Ok(Response::new(
            self.api.get_user_grants_impl(request.into_inner()).await?,
        ))
    }

    async fn set_user_grants(
        &self,
        request: Request<pb::SetUserGrantsRequest>,
    ) -> Result<Response<pb::UserGrants>, Status> {
        Ok(Response::new(
            self.api.set_user_grants_impl(request.into_inner()).await?,
        ))
    }

    async fn set_event_channels(
        &self,
        request: Request<pb::SetEventChannelsRequest>,
    ) -> Result<Response<pb::Event>, Status> {
        Ok(Response::new(
            self.api
                .set_event_channels_impl(request.into_inner())
                .await?,
        ))
    }

    async fn get_event(
        &self,
        request: Request<pb::GetEventRequest>,
    ) -> Result<Response<pb::Event>, Status> {
        Ok(Response::new(
            self.api.get_event_impl(request.into_inner()).await?,
        ))
    }

    async fn event_speakers(
        &self,
        request: Request<pb::GetEventRequest>,
    ) -> Result<Response<pb::EventSpeakersResponse>, Status> {
        Ok(Response::new(
            self.api.event_speakers_impl(request.into_inner()).await?,
        ))
    }

    async fn pause_event(
        &self,
        request: Request<pb::GetEventRequest>,
    ) -> Result<Response<pb::PauseEventResponse>, Status> {
        Ok(Response::new(
            self.api.pause_event_impl(request.into_inner()).await?,
        ))
    }

    async fn talk_history(
        &self,
        request: Request<apb::TalkHistoryRequest>,
    ) -> Result<Response<apb::TalkHistoryResponse>, Status> {
        let req = request.into_inner();
        let channel = if req.channel_id.is_empty() {
            None
        } else {
            Some(channel_id(&req.channel_id)?.to_string())
        };
        let user = if req.user_id.is_empty() {
            None
        } else {
            Some(user_id(&req.user_id)?.to_string())
        };
        if channel.is_none() && user.is_none() {
            return Err(Status::invalid_argument("name a channel or a user"));
        }
        let (from, to) = if req.from_ms == 0 && req.to_ms == 0 {
            let now = self.api.clock.now_ms();
            (now - 86_400_000, now + 1)
        } else {
            (req.from_ms, req.to_ms)
        };
        if from >= to {
            return Err(Status::invalid_argument("from_ms must be before to_ms"));
        }
        let records = self
            .history()?
            .talk(
                channel.as_deref(),
                user.as_deref(),
                from,
                to,
                history_limit(req.limit),
            )
            .await?;
        Ok(Response::new(apb::TalkHistoryResponse {
            records: records
                .into_iter()
                .map(|r| apb::TalkRecord {
                    channel_id: r.channel_id,
                    event: r.event,
                    user_id: r.user_id,
                    session_id: r.session_id,
                    epoch: r.epoch,
                    at_ms: r.at_ms,
                    held_ms: r.held_ms.unwrap_or_default(),
                    by: r.by.unwrap_or_default(),
                })
                .collect(),
        }))
    }

    async fn sync_history(
        &self,
        request: Request<apb::SyncHistoryRequest>,
    ) -> Result<Response<apb::SyncHistoryResponse>, Status> {
        let req = request.into_inner();
        if req.session_id.is_empty() || req.session_id.len() > 64 {
            return Err(Status::invalid_argument("invalid sync session id"));
        }
        let records = self
            .history()?
            .sync(&req.session_id, history_limit(req.limit))
            .await?;
        Ok(Response::new(apb::SyncHistoryResponse {
            records: records
                .into_iter()
                .map(|r| apb::SyncRecord {
                    version: u64::try_from(r.version).unwrap_or_default(),
                    action: r.action,
                    at_ms: r.at_ms,
                    status: r.status,
                })
                .collect(),
        }))
    }

    async fn stop_emergency(
        &self,
        request: Request<apb::StopEmergencyRequest>,
    ) -> Result<Response<pb::EmergencyResponse>, Status> {
        let event = request.into_inner().event_id;
        event_id(&event)?;
        Ok(Response::new(
            self.api
                .stop_emergency_impl(pb::StopEmergencyRequest {
                    event_id: event,
                    session_id: String::new(),
                    force: true,
                })
                .await?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_token_passes() {
        let auth = AdminAuth::new(Some("the-admin-token-0123"));
        assert!(auth.accepts("the-admin-token-0123"));
        for wrong in ["", "the-admin-token-012", "the-admin-token-01234", "x"] {
            assert!(!auth.accepts(wrong), "{wrong:?}");
        }
        assert!(!auth.accepts(&"a".repeat(600)));
        assert!(!AdminAuth::new(None).accepts(""));
        assert!(!format!("{auth:?}").contains("admin-token"));
    }
}

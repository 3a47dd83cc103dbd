//! `ptt.state.v1.AccessService`: grants, events and the emergency broadcast (grant changes
//! reach watchers on the user's topic, `watch`).
//!
//! The `*_impl` methods are shared with the admin API, which adds its token check in front.

use talkgroup_proto::state::v1 as pb;
use tonic::{Request, Response, Status};

use super::Api;
use super::convert::{self, channel_id, session_id, user_id};
use crate::access::{self, MembershipUpdate};
use crate::domain::{
    Acquired, EventId, EventInfo, GrantChange, MAX_GRANTS_PER_USER, Role, UserGrants,
    parse_priority,
};
use crate::error::StoreError;
use crate::store::Store;

pub fn event_id(raw: &str) -> Result<EventId, StoreError> {
    EventId::parse(raw)
}

fn role_from_pb(raw: i32) -> Result<Option<Role>, StoreError> {
    pb::Role::try_from(raw)
        .map(Role::from_pb)
        .map_err(|_| StoreError::InvalidArgument("unknown role"))
}

pub fn role_to_pb(role: Role) -> pb::Role {
    role.to_pb()
}

pub fn user_grants(g: &UserGrants) -> pb::UserGrants {
    pb::UserGrants {
        user_id: g.user_id.to_string(),
        version: g.version,
        grants: g
            .grants
            .iter()
            .map(|(ch, role)| pb::Grant {
                channel_id: ch.to_string(),
                role: role_to_pb(*role).into(),
            })
            .collect(),
    }
}

pub fn event(e: &EventInfo) -> pb::Event {
    pb::Event {
        event_id: e.event_id.to_string(),
        channel_ids: e.channels.iter().map(ToString::to_string).collect(),
        emergency: e.emergency.as_ref().map(|h| pb::EmergencyInfo {
            by: Some(convert::speaker(&h.speaker)),
            started_at_ms: h.started_at_ms,
        }),
    }
}

fn channel_ids(raw: &[String]) -> Result<Vec<crate::domain::ChannelId>, StoreError> {
    raw.iter().map(|c| channel_id(c)).collect()
}

impl<S: Store> Api<S> {
    pub(crate) async fn get_user_grants_impl(
        &self,
        req: pb::GetUserGrantsRequest,
    ) -> Result<pb::UserGrants, Status> {
        let uid = user_id(&req.user_id)?;
        Ok(user_grants(&self.store.user_grants(&uid).await?))
    }

    pub(crate) async fn set_user_grants_impl(
        &self,
        req: pb::SetUserGrantsRequest,
    ) -> Result<pb::UserGrants, Status> {
        let uid = user_id(&req.user_id)?;
        if req.grants.len() > MAX_GRANTS_PER_USER {
            return Err(StoreError::InvalidArgument("too many grants").into());
        }
        let set = req
            .grants
            .iter()
            .map(|g| Ok((channel_id(&g.channel_id)?, role_from_pb(g.role)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let change = GrantChange {
            set,
            replace: req.replace,
            expect_version: None,
        };
        let updated = access::grants_of(self.store.update_grants(&uid, &change).await?);
        tracing::info!(user_id = %uid, version = updated.version, "grants set");
        Ok(user_grants(&updated))
    }

    pub(crate) async fn apply_membership_update_impl(
        &self,
        req: pb::MembershipUpdate,
    ) -> Result<pb::UserGrants, Status> {
        let update = MembershipUpdate::new(&req.event_id, &req.user_id, &req.channel_ids)?;
        let updated = access::apply_membership_update(&*self.store, &update).await?;
        Ok(user_grants(&access::grants_of(updated)))
    }

    pub(crate) async fn set_event_channels_impl(
        &self,
        req: pb::SetEventChannelsRequest,
    ) -> Result<pb::Event, Status> {
        let eid = event_id(&req.event_id)?;
        let channels = channel_ids(&req.channel_ids)?;
        let info = self.store.set_event_channels(&eid, &channels).await?;
        tracing::info!(event_id = %eid, channels = info.channels.len(), "event channels set");
        Ok(event(&info))
    }

    pub(crate) async fn get_event_impl(
        &self,
        req: pb::GetEventRequest,
    ) -> Result<pb::Event, Status> {
        let eid = event_id(&req.event_id)?;
        let info = self
            .store
            .event(&eid)
            .await?
            .ok_or(StoreError::NotFound("event"))?;
        Ok(event(&info))
    }

    pub(crate) async fn event_speakers_impl(
        &self,
        req: pb::GetEventRequest,
    ) -> Result<pb::EventSpeakersResponse, Status> {
        let eid = event_id(&req.event_id)?;
        let info = self
            .store
            .event(&eid)
            .await?
            .ok_or(StoreError::NotFound("event"))?;
        let states = futures::future::try_join_all(
            info.channels.iter().map(|c| self.store.channel_state(c)),
        )
        .await?;
        Ok(pb::EventSpeakersResponse {
            event_id: eid.to_string(),
            channels: states
                .iter()
                .map(|s| pb::ChannelSpeaker {
                    channel_id: s.channel_id.to_string(),
                    holder: s.holder.as_ref().map(convert::holder),
                })
                .collect(),
        })
    }

    pub(crate) async fn pause_event_impl(
        &self,
        req: pb::GetEventRequest,
    ) -> Result<pb::PauseEventResponse, Status> {
        let eid = event_id(&req.event_id)?;
        let info = self
            .store
            .event(&eid)
            .await?
            .ok_or(StoreError::NotFound("event"))?;
        let mut released = Vec::new();
        for ch in &info.channels {
            if self.store.force_release_floor(ch, None).await?.released() {
                released.push(ch.to_string());
            }
        }
        tracing::info!(event_id = %eid, released = released.len(), "event paused");
        Ok(pb::PauseEventResponse {
            released_channel_ids: released,
        })
    }

    pub(crate) async fn stop_emergency_impl(
        &self,
        req: pb::StopEmergencyRequest,
    ) -> Result<pb::EmergencyResponse, Status> {
        let eid = event_id(&req.event_id)?;
        let sid = if req.force {
            None
        } else {
            Some(session_id(&req.session_id)?)
        };
        let (info, channels) = access::stop_emergency(&*self.store, &eid, sid.as_ref()).await?;
        Ok(pb::EmergencyResponse {
            event_id: info.event_id.to_string(),
            channels: channels
                .iter()
                .map(|(ch, r)| pb::EmergencyChannel {
                    channel_id: ch.to_string(),
                    holder: None,
                    preempted: None,
                    epoch: r.epoch,
                })
                .collect(),
            server_time_ms: self.clock.now_ms(),
        })
    }
}

#[tonic::async_trait]
impl<S: Store> pb::access_service_server::AccessService for Api<S> {
    async fn get_user_grants(
        &self,
        request: Request<pb::GetUserGrantsRequest>,
    ) -> Result<Response<pb::UserGrants>, Status> {
        Ok(Response::new(
            self.get_user_grants_impl(request.into_inner()).await?,
        ))
    }

    async fn set_user_grants(
        &self,
        request: Request<pb::SetUserGrantsRequest>,
    ) -> Result<Response<pb::UserGrants>, Status> {
        Ok(Response::new(
            self.set_user_grants_impl(request.into_inner()).await?,
        ))
    }

    async fn apply_membership_update(
        &self,
        request: Request<pb::MembershipUpdate>,
    ) -> Result<Response<pb::UserGrants>, Status> {
        Ok(Response::new(
            self.apply_membership_update_impl(request.into_inner())
                .await?,
        ))
    }

    async fn set_event_channels(
        &self,
        request: Request<pb::SetEventChannelsRequest>,
    ) -> Result<Response<pb::Event>, Status> {
        Ok(Response::new(
            self.set_event_channels_impl(request.into_inner()).await?,
        ))
    }

    async fn get_event(
        &self,
        request: Request<pb::GetEventRequest>,
    ) -> Result<Response<pb::Event>, Status> {
        Ok(Response::new(
            self.get_event_impl(request.into_inner()).await?,
        ))
    }

    async fn get_channel_event(
        &self,
        request: Request<pb::GetChannelEventRequest>,
    ) -> Result<Response<pb::ChannelEvent>, Status> {
        let req = request.into_inner();
        let ch = channel_id(&req.channel_id)?;
        let eid = self.store.channel_event(&ch).await?;
        Ok(Response::new(pb::ChannelEvent {
            channel_id: ch.to_string(),
            event_id: eid.map(|e| e.to_string()).unwrap_or_default(),
        }))
    }

    async fn event_speakers(
        &self,
        request: Request<pb::GetEventRequest>,
    ) -> Result<Response<pb::EventSpeakersResponse>, Status> {
        Ok(Response::new(
            self.event_speakers_impl(request.into_inner()).await?,
        ))
    }

    async fn pause_event(
        &self,
        request: Request<pb::GetEventRequest>,
    ) -> Result<Response<pb::PauseEventResponse>, Status> {
        Ok(Response::new(
            self.pause_event_impl(request.into_inner()).await?,
        ))
    }

    async fn start_emergency(
        &self,
        request: Request<pb::StartEmergencyRequest>,
    ) -> Result<Response<pb::EmergencyResponse>, Status> {
        let req = request.into_inner();
        let eid = event_id(&req.event_id)?;
        let sid = session_id(&req.session_id)?;
        let priority = parse_priority(req.priority)?;
        let started = access::start_emergency(&*self.store, &eid, &sid, priority).await?;
        self.metrics.emergencies.inc();
        for (_, outcome) in &started.channels {
            if let Acquired::Granted { preempted, .. } = &outcome.result {
                self.metrics.floor_grants.inc();
                if preempted.is_some() {
                    self.metrics.floor_preemptions.inc();
                }
            }
        }
        let mut server_time_ms = 0;
        let channels = started
            .channels
            .iter()
            .map(|(ch, outcome)| {
                server_time_ms = outcome.server_time_ms;
                let (holder, preempted) = match &outcome.result {
                    Acquired::Granted {
                        holder, preempted, ..
                    } => (
                        Some(convert::holder(holder)),
                        preempted.as_ref().map(convert::speaker),
                    ),
                    Acquired::Denied { .. } | Acquired::Queued { .. } => (None, None),
                };
                pb::EmergencyChannel {
                    channel_id: ch.to_string(),
                    holder,
                    preempted,
                    epoch: 0,
                }
            })
            .collect();
        Ok(Response::new(pb::EmergencyResponse {
            event_id: eid.to_string(),
            channels,
            server_time_ms,
        }))
    }

    async fn stop_emergency(
        &self,
        request: Request<pb::StopEmergencyRequest>,
    ) -> Result<Response<pb::EmergencyResponse>, Status> {
        Ok(Response::new(
            self.stop_emergency_impl(request.into_inner()).await?,
        ))
    }
}

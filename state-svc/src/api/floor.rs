//! `ptt.state.v1.FloorService`.

use talkgroup_proto::state::v1 as pb;
use tonic::{Request, Response, Status};

use super::Api;
use super::convert::{self, channel_id, optional_epoch, session_id};
use crate::domain::{Acquired, now_ms, parse_priority};
use crate::store::Store;

#[tonic::async_trait]
impl<S: Store> pb::floor_service_server::FloorService for Api<S> {
    async fn acquire_floor(
        &self,
        request: Request<pb::AcquireFloorRequest>,
    ) -> Result<Response<pb::AcquireFloorResponse>, Status> {
        let req = request.into_inner();
        let ch = channel_id(&req.channel_id)?;
        let sid = session_id(&req.session_id)?;
        let priority = parse_priority(req.priority)?;
        let min_epoch = plausible_min_epoch(req.min_epoch, now_ms())?;
        let outcome = self
            .store
            .acquire_floor(&ch, &sid, priority, min_epoch)
            .await?;
        let mut reply = pb::AcquireFloorResponse {
            server_time_ms: outcome.server_time_ms,
            ..Default::default()
        };
        match &outcome.result {
            Acquired::Granted {
                holder,
                max_talk_ms,
                preempted,
            } => {
                tracing::debug!(channel_id = %ch, session_id = %sid, epoch = holder.epoch, "floor granted");
                self.metrics.floor_grants.inc();
                if preempted.is_some() {
                    self.metrics.floor_preemptions.inc();
                }
                reply.set_outcome(pb::AcquireOutcome::Granted);
                reply.holder = Some(convert::holder(holder));
                reply.max_talk_ms = *max_talk_ms;
                reply.preempted = preempted.as_ref().map(convert::speaker);
            }
            Acquired::Denied {
                holder,
                retry_after_ms,
            } => {
                tracing::debug!(channel_id = %ch, session_id = %sid, "floor denied");
                self.metrics.floor_denials.inc();
                reply.set_outcome(pb::AcquireOutcome::Denied);
                reply.holder = Some(convert::holder(holder));
                reply.retry_after_ms = *retry_after_ms;
            }
            Acquired::Queued { holder, position } => {
                tracing::debug!(channel_id = %ch, session_id = %sid, position, "floor request queued");
                self.metrics.floor_queued.inc();
                reply.set_outcome(pb::AcquireOutcome::Queued);
                reply.holder = Some(convert::holder(holder));
                reply.queue_position = *position;
            }
        }
        Ok(Response::new(reply))
    }

    async fn renew_floor(
        &self,
        request: Request<pb::RenewFloorRequest>,
    ) -> Result<Response<pb::RenewFloorResponse>, Status> {
        let req = request.into_inner();
        let ch = channel_id(&req.channel_id)?;
        let sid = session_id(&req.session_id)?;
        let outcome = self.store.renew_floor(&ch, &sid, req.epoch).await?;
        let mut reply = pb::RenewFloorResponse {
            server_time_ms: outcome.server_time_ms,
            ..Default::default()
        };
        match outcome.result {
            Ok(renewed) => {
                reply.renewed = true;
                reply.expires_at_ms = renewed.expires_at_ms;
                reply.max_until_ms = renewed.max_until_ms;
            }
            Err(refusal) => reply.set_refusal(convert::refusal(Some(refusal))),
        }
        Ok(Response::new(reply))
    }

    async fn release_floor(
        &self,
        request: Request<pb::ReleaseFloorRequest>,
    ) -> Result<Response<pb::ReleaseFloorResponse>, Status> {
        let req = request.into_inner();
        let ch = channel_id(&req.channel_id)?;
        let sid = session_id(&req.session_id)?;
        let outcome = self
            .store
            .release_floor(&ch, &sid, optional_epoch(req.epoch))
            .await?;
        Ok(Response::new(release_reply(outcome)))
    }

    async fn force_release_floor(
        &self,
        request: Request<pb::ForceReleaseFloorRequest>,
    ) -> Result<Response<pb::ReleaseFloorResponse>, Status> {
        let req = request.into_inner();
        let ch = channel_id(&req.channel_id)?;
        let outcome = self
            .store
            .force_release_floor(&ch, optional_epoch(req.epoch))
            .await?;
        if outcome.released() {
            tracing::info!(channel_id = %ch, epoch = outcome.epoch, "floor force-released");
        }
        Ok(Response::new(release_reply(outcome)))
    }

    async fn get_floor(
        &self,
        request: Request<pb::GetFloorRequest>,
    ) -> Result<Response<pb::GetFloorResponse>, Status> {
        let ch = channel_id(&request.into_inner().channel_id)?;
        let state = self.store.channel_state(&ch).await?;
        Ok(Response::new(pb::GetFloorResponse {
            holder: state.holder.as_ref().map(convert::holder),
            epoch: state.epoch,
            server_time_ms: state.server_time_ms,
        }))
    }
}

fn release_reply(outcome: crate::domain::ReleaseOutcome) -> pb::ReleaseFloorResponse {
    let mut reply = pb::ReleaseFloorResponse {
        released: outcome.released(),
        epoch: outcome.epoch,
        dequeued: outcome.dequeued,
        ..Default::default()
    };
    reply.set_refusal(convert::refusal(outcome.refusal));
    reply
}

/// A caller's highest seen epoch, refused when it is further ahead of this clock than any real
/// epoch could be (`talkgroup_proto::epoch`, the window media nodes apply too): one pushed far
/// ahead would hold every later grant hostage to it.
fn plausible_min_epoch(min_epoch: u64, now_ms: i64) -> Result<u64, Status> {
    if !talkgroup_proto::epoch::plausible(min_epoch, now_ms) {
        return Err(Status::invalid_argument(
            "min_epoch far ahead of the server clock",
        ));
    }
    Ok(min_epoch)
}

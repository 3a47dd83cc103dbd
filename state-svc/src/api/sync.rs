//! `ptt.state.v1.SyncService`: sync sessions over the store's compare-and-set.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use talkgroup_proto::state::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::Api;
use super::convert::{channel_id, sync_id};
use crate::domain::{Published, Topic};
use crate::error::StoreError;
use crate::hub::Delivery;
use crate::store::{Store, sync_mutate};
use crate::sync::{NewSync, SyncAction, SyncMode, SyncSession, SyncStatus};

/// Changes buffered per watch stream before it is re-sent the current state.
const SYNC_OUTBOX: usize = 64;

type SyncStream = Pin<Box<dyn Stream<Item = Result<pb::SyncState, Status>> + Send>>;

fn mode_from_pb(raw: i32) -> Result<SyncMode, StoreError> {
    Ok(match pb::SyncMode::try_from(raw) {
        Ok(pb::SyncMode::PerParticipant) => SyncMode::PerParticipant,
        Ok(pb::SyncMode::PerCycle) => SyncMode::PerCycle,
        Ok(pb::SyncMode::PerGroup) => SyncMode::PerGroup,
        Ok(pb::SyncMode::Global) => SyncMode::Global,
        Ok(pb::SyncMode::CountUp) => SyncMode::CountUp,
        _ => return Err(StoreError::InvalidArgument("unknown sync mode")),
    })
}

fn mode_to_pb(mode: SyncMode) -> pb::SyncMode {
    match mode {
        SyncMode::PerParticipant => pb::SyncMode::PerParticipant,
        SyncMode::PerCycle => pb::SyncMode::PerCycle,
        SyncMode::PerGroup => pb::SyncMode::PerGroup,
        SyncMode::Global => pb::SyncMode::Global,
        SyncMode::CountUp => pb::SyncMode::CountUp,
    }
}

fn status_to_pb(status: SyncStatus) -> pb::SyncStatus {
    match status {
        SyncStatus::Pending => pb::SyncStatus::Pending,
        SyncStatus::Running => pb::SyncStatus::Running,
        SyncStatus::Paused => pb::SyncStatus::Paused,
        SyncStatus::Expired => pb::SyncStatus::Expired,
        SyncStatus::Completed => pb::SyncStatus::Completed,
        SyncStatus::Cancelled => pb::SyncStatus::Cancelled,
    }
}

/// The wire form of a session, remaining times computed at `now`.
pub fn sync_state(s: &SyncSession, now: i64) -> pb::SyncState {
    let remaining = s.participant_remaining_ms(now);
    pb::SyncState {
        session_id: s.session_id.to_string(),
        channel_id: s.channel_id.clone().unwrap_or_default(),
        version: s.version,
        sync_mode: mode_to_pb(s.sync_mode).into(),
        status: status_to_pb(s.status).into(),
        participants: s
            .participants
            .iter()
            .zip(remaining)
            .map(|(p, time_remaining_ms)| pb::SyncParticipant {
                participant_id: p.participant_id.clone(),
                group_id: p.group_id.clone().unwrap_or_default(),
                total_time_ms: p.total_time_ms,
                time_used_ms: p.time_used_ms,
                time_remaining_ms,
                cycle_count: p.cycle_count,
                is_active: p.is_active,
                has_expired: p.has_expired,
            })
            .collect(),
        active_participant_id: s.active_participant_id.clone().unwrap_or_default(),
        total_time_ms: s.total_time_ms,
        time_per_cycle_ms: s.time_per_cycle_ms,
        increment_ms: s.increment_ms,
        max_time_ms: s.max_time_ms,
        cycle_started_at: s.cycle_started_at.unwrap_or_default(),
        session_started_at: s.session_started_at.unwrap_or_default(),
        session_completed_at: s.session_completed_at.unwrap_or_default(),
        created_at: s.created_at,
        updated_at: s.updated_at,
        server_time_ms: now,
        deleted: false,
    }
}

fn expected(raw: u64) -> Option<u64> {
    (raw != 0).then_some(raw)
}

fn action_from_pb(
    action: Option<pb::mutate_sync_request::Action>,
) -> Result<SyncAction, StoreError> {
    use pb::mutate_sync_request::Action;
    Ok(
        match action.ok_or(StoreError::InvalidArgument("no action"))? {
            Action::Start(_) => SyncAction::Start,
            Action::Switch(s) => {
                SyncAction::Switch((!s.participant_id.is_empty()).then_some(s.participant_id))
            }
            Action::Pause(_) => SyncAction::Pause,
            Action::Resume(_) => SyncAction::Resume,
            Action::Complete(_) => SyncAction::Complete,
            Action::Cancel(_) => SyncAction::Cancel,
            Action::Update(t) => SyncAction::Update {
                total_time_ms: t.total_time_ms,
                time_per_cycle_ms: t.time_per_cycle_ms,
                increment_ms: t.increment_ms,
                max_time_ms: t.max_time_ms,
            },
        },
    )
}

#[tonic::async_trait]
impl<S: Store> pb::sync_service_server::SyncService for Api<S> {
    async fn create_sync(
        &self,
        request: Request<pb::CreateSyncRequest>,
    ) -> Result<Response<pb::SyncState>, Status> {
        let req = request.into_inner();
        if req.participants.len() > crate::sync::MAX_PARTICIPANTS {
            return Err(
                StoreError::InvalidArgument("a sync session needs 1 to 1000 participants").into(),
            );
        }
        let now = self.clock.now_ms();
        let channel = if req.channel_id.is_empty() {
            None
        } else {
            Some(channel_id(&req.channel_id)?)
        };
        let owner = if req.owner_user_id.is_empty() {
            None
        } else {
            Some(super::convert::user_id(&req.owner_user_id)?)
        };
        // The caps bound how many sessions change (and are pushed to a channel's members)
        // at once. Checked before the creation: racing creations may pass it by a few.
        let (in_channel, by_owner) = self
            .store
            .sync_open_counts(channel.as_ref(), owner.as_ref())
            .await?;
        let settings = self.settings();
        if in_channel >= settings.max_syncs_per_channel as usize
            || by_owner >= settings.max_syncs_per_user as usize
        {
            return Err(StoreError::TooManySyncs.into());
        }
        let session = SyncSession::create(
            NewSync {
                session_id: sync_id(&req.session_id)?,
                owner,
                channel_id: channel,
                sync_mode: mode_from_pb(req.sync_mode)?,
                participants: req
                    .participants
                    .into_iter()
                    .map(|p| {
                        (
                            p.participant_id,
                            (!p.group_id.is_empty()).then_some(p.group_id),
                        )
                    })
                    .collect(),
                total_time_ms: req.total_time_ms,
                time_per_cycle_ms: req.time_per_cycle_ms,
                increment_ms: req.increment_ms,
                max_time_ms: req.max_time_ms,
            },
            now,
        )?;
        match self.store.sync_put(&session, None, "create", None).await {
            Err(StoreError::Conflict { .. }) => {
                return Err(Status::already_exists("sync session exists"));
            }
            other => other?,
        }
        tracing::info!(session_id = %session.session_id, "sync session created");
        Ok(Response::new(sync_state(&session, now)))
    }

    async fn get_sync(
        &self,
        request: Request<pb::GetSyncRequest>,
    ) -> Result<Response<pb::SyncState>, Status> {
        let id = sync_id(&request.into_inner().session_id)?;
        let session = self
            .store
            .sync_get(&id)
            .await?
            .ok_or(StoreError::NotFound("sync session"))?;
        Ok(Response::new(sync_state(&session, self.clock.now_ms())))
    }

    async fn mutate_sync(
        &self,
        request: Request<pb::MutateSyncRequest>,
    ) -> Result<Response<pb::SyncState>, Status> {
        let req = request.into_inner();
        let action = action_from_pb(req.action)?;
        let now = self.clock.now_ms();
        let session = sync_mutate(
            &*self.store,
            &sync_id(&req.session_id)?,
            expected(req.expected_version),
            &action,
            now,
        )
        .await?;
        Ok(Response::new(sync_state(&session, now)))
    }

    async fn delete_sync(
        &self,
        request: Request<pb::DeleteSyncRequest>,
    ) -> Result<Response<pb::DeleteSyncResponse>, Status> {
        let req = request.into_inner();
        let version = self
            .store
            .sync_delete(&sync_id(&req.session_id)?, expected(req.expected_version))
            .await?;
        Ok(Response::new(pb::DeleteSyncResponse { version }))
    }

    type WatchSyncStream = SyncStream;

    async fn watch_sync(
        &self,
        request: Request<pb::GetSyncRequest>,
    ) -> Result<Response<Self::WatchSyncStream>, Status> {
        let id = sync_id(&request.into_inner().session_id)?;
        // Subscribe before reading, so no change falls between the two.
        let mut subscription = self.hub.subscribe();
        subscription.add(&[Topic::Sync(id.clone())]);
        self.store.listen().await?;
        let first = self
            .store
            .sync_get(&id)
            .await?
            .ok_or(StoreError::NotFound("sync session"))?;
        let (tx, rx) = mpsc::channel(SYNC_OUTBOX);
        let store = std::sync::Arc::clone(&self.store);
        let shutdown = self.shutdown.clone();
        let clock = self.clock.clone();
        self.tasks.spawn(async move {
            let mut last = first.version;
            if tx
                .send(Ok(sync_state(&first, clock.now_ms())))
                .await
                .is_err()
            {
                return;
            }
            loop {
                let delivery = tokio::select! {
                    delivery = subscription.recv() => delivery,
                    () = tx.closed() => return,
                    () = shutdown.cancelled() => return,
                };
                let state = match delivery {
                    Some(Delivery::Event(event)) => match &*event {
                        Published::Sync(e) if e.version > last => {
                            last = e.version;
                            match &e.state {
                                Some(s) => sync_state(s, clock.now_ms()),
                                None => pb::SyncState {
                                    session_id: id.to_string(),
                                    version: e.version,
                                    deleted: true,
                                    server_time_ms: clock.now_ms(),
                                    ..Default::default()
                                },
                            }
                        }
                        _ => continue,
                    },
                    // Changes may have been missed: read the session again.
                    Some(Delivery::Resync) => match store.sync_get(&id).await {
                        Ok(Some(s)) if s.version > last => {
                            last = s.version;
                            sync_state(&s, clock.now_ms())
                        }
                        _ => continue,
                    },
                    None => return,
                };
                let ended = state.deleted;
                if tx.send(Ok(state)).await.is_err() || ended {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx).boxed()))
    }
}

//! Sync sessions: `sync-*` requests, checked against the user's role in the session's channel
//! and turned into state-svc `SyncService` calls.

use talkgroup_proto::state::v1 as spb;
use talkgroup_proto::state::v1::mutate_sync_request::Action;

use super::{Conn, Result};
use crate::access::Role;
use crate::protocol::reply::SyncDeleted;
use crate::protocol::sync::{create_request, mutate_request};
use crate::protocol::{Code, SyncCreate, SyncRef, err};
use talkgroup_wire::sync::SyncEnvelope;

impl Conn {
    pub(super) async fn sync_create(&mut self, r: SyncCreate) -> Result<SyncEnvelope> {
        self.require_role(&r.channel_id, Role::Dispatch)?;
        self.limits.sync_create()?;
        let created = self
            .app
            .syncs()
            .create_sync(create_request(r, &self.user.user_id)?)
            .await?
            .into_inner();
        Ok(crate::protocol::sync::sync_envelope(&created))
    }

    pub(super) async fn sync_get(&self, id: &str) -> Result<SyncEnvelope> {
        let session = self.sync_session(id, Role::Listen).await?;
        Ok(crate::protocol::sync::sync_envelope(&session))
    }

    pub(super) async fn sync_start(&mut self, r: SyncRef) -> Result<SyncEnvelope> {
        self.sync_mutate(r, Role::Dispatch, Action::Start(spb::Empty {}))
            .await
    }

    /// Participants hand over themselves: talk is enough.
    pub(super) async fn sync_switch(&mut self, r: SyncRef) -> Result<SyncEnvelope> {
        let to = spb::SyncSwitch {
            participant_id: r.participant_id.clone().unwrap_or_default(),
        };
        self.sync_mutate(r, Role::Talk, Action::Switch(to)).await
    }

    pub(super) async fn sync_pause(&mut self, r: SyncRef) -> Result<SyncEnvelope> {
        self.sync_mutate(r, Role::Dispatch, Action::Pause(spb::Empty {}))
            .await
    }

    pub(super) async fn sync_resume(&mut self, r: SyncRef) -> Result<SyncEnvelope> {
        self.sync_mutate(r, Role::Dispatch, Action::Resume(spb::Empty {}))
            .await
    }

    pub(super) async fn sync_complete(&mut self, r: SyncRef) -> Result<SyncEnvelope> {
        self.sync_mutate(r, Role::Dispatch, Action::Complete(spb::Empty {}))
            .await
    }

    pub(super) async fn sync_cancel(&mut self, r: SyncRef) -> Result<SyncEnvelope> {
        self.sync_mutate(r, Role::Dispatch, Action::Cancel(spb::Empty {}))
            .await
    }

    pub(super) async fn sync_delete(&self, r: SyncRef) -> Result<SyncDeleted> {
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
        Ok(SyncDeleted {
            session_id: r.session_id,
            version: deleted.version,
        })
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
        &mut self,
        r: SyncRef,
        least: Role,
        action: Action,
    ) -> Result<SyncEnvelope> {
        self.sync_session(&r.session_id, least).await?;
        self.limits.sync_change(&r.session_id)?;
        let state = self
            .app
            .syncs()
            .mutate_sync(mutate_request(r, action))
            .await?
            .into_inner();
        Ok(crate::protocol::sync::sync_envelope(&state))
    }
}

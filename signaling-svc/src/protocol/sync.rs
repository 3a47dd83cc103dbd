//! Sync sessions: the `sync-*` requests turned into state-svc `SyncService` calls, and the
//! wire's session object ([`talkgroup_wire::sync`]) built from state-svc's.

use talkgroup_proto::state::v1 as spb;
use talkgroup_wire::sync::{
    DeletedSync, LiveSync, Participant, SyncEnvelope, SyncMode, SyncStatus, SyncView,
};

use super::{ClientError, Code, SyncCreate, SyncRef};

fn mode(raw: &str) -> Result<spb::SyncMode, ClientError> {
    Ok(match raw {
        "per_participant" => spb::SyncMode::PerParticipant,
        "per_cycle" => spb::SyncMode::PerCycle,
        "per_group" => spb::SyncMode::PerGroup,
        "global" => spb::SyncMode::Global,
        "count_up" => spb::SyncMode::CountUp,
        _ => return Err(ClientError::new(Code::BadRequest, "unknown sync mode")),
    })
}

fn mode_of(mode: spb::SyncMode) -> SyncMode {
    match mode {
        spb::SyncMode::PerParticipant => SyncMode::PerParticipant,
        spb::SyncMode::PerCycle => SyncMode::PerCycle,
        spb::SyncMode::PerGroup => SyncMode::PerGroup,
        spb::SyncMode::Global => SyncMode::Global,
        spb::SyncMode::CountUp => SyncMode::CountUp,
        spb::SyncMode::Unspecified => SyncMode::Unknown,
    }
}

fn status_of(status: spb::SyncStatus) -> SyncStatus {
    match status {
        spb::SyncStatus::Pending => SyncStatus::Pending,
        spb::SyncStatus::Running => SyncStatus::Running,
        spb::SyncStatus::Paused => SyncStatus::Paused,
        spb::SyncStatus::Expired => SyncStatus::Expired,
        spb::SyncStatus::Completed => SyncStatus::Completed,
        spb::SyncStatus::Cancelled => SyncStatus::Cancelled,
        spb::SyncStatus::Unspecified => SyncStatus::Unknown,
    }
}

/// Absent on the wire (`null`) when empty or zero.
fn present<T: Default + PartialEq>(v: T) -> Option<T> {
    (v != T::default()).then_some(v)
}

pub fn create_request(r: SyncCreate, owner: &str) -> Result<spb::CreateSyncRequest, ClientError> {
    Ok(spb::CreateSyncRequest {
        owner_user_id: owner.to_owned(),
        sync_mode: mode(&r.mode)?.into(),
        session_id: r.session_id,
        channel_id: r.channel_id,
        participants: r
            .participants
            .into_iter()
            .map(|p| spb::SyncParticipantSpec {
                participant_id: p.participant_id,
                group_id: p.group_id.unwrap_or_default(),
            })
            .collect(),
        total_time_ms: r.total_time_ms,
        time_per_cycle_ms: r.time_per_cycle_ms,
        increment_ms: r.increment_ms,
        max_time_ms: r.max_time_ms,
    })
}

pub fn mutate_request(
    r: SyncRef,
    action: spb::mutate_sync_request::Action,
) -> spb::MutateSyncRequest {
    spb::MutateSyncRequest {
        session_id: r.session_id,
        expected_version: r.expected_version.unwrap_or(0),
        action: Some(action),
    }
}

/// The session object of a state-svc session.
pub fn sync_view(s: &spb::SyncState) -> SyncView {
    if s.deleted {
        return SyncView::Deleted(DeletedSync {
            session_id: s.session_id.clone(),
            version: s.version,
            deleted: true,
        });
    }
    let participants = s
        .participants
        .iter()
        .map(|p| Participant {
            participant_id: p.participant_id.clone(),
            group_id: present(p.group_id.clone()),
            total_time_ms: p.total_time_ms,
            time_used_ms: p.time_used_ms,
            time_remaining_ms: p.time_remaining_ms,
            cycle_count: p.cycle_count,
            is_active: p.is_active,
            has_expired: p.has_expired,
        })
        .collect();
    SyncView::Live(Box::new(LiveSync {
        session_id: s.session_id.clone(),
        channel_id: s.channel_id.clone(),
        version: s.version,
        mode: mode_of(s.sync_mode()),
        status: status_of(s.status()),
        participants,
        active_participant_id: present(s.active_participant_id.clone()),
        total_time_ms: s.total_time_ms,
        time_per_cycle_ms: s.time_per_cycle_ms,
        increment_ms: s.increment_ms,
        max_time_ms: s.max_time_ms,
        cycle_started_at: present(s.cycle_started_at),
        session_started_at: present(s.session_started_at),
        session_completed_at: present(s.session_completed_at),
        created_at: s.created_at,
        updated_at: s.updated_at,
    }))
}

/// A reply's or push's session, with the server's clock.
pub fn sync_envelope(s: &spb::SyncState) -> SyncEnvelope {
    SyncEnvelope {
        session: sync_view(s),
        server_time: s.server_time_ms,
    }
}

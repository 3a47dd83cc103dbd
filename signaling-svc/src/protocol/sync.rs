//! Sync sessions on the wire: the `sync-*` requests turned into state-svc `SyncService` calls,
//! and the session object of their replies and of the `sync-state` push.

use serde::Serialize;
use talkgroup_proto::state::v1 as spb;

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

fn mode_name(mode: spb::SyncMode) -> &'static str {
    match mode {
        spb::SyncMode::PerParticipant => "per_participant",
        spb::SyncMode::PerCycle => "per_cycle",
        spb::SyncMode::PerGroup => "per_group",
        spb::SyncMode::Global => "global",
        spb::SyncMode::CountUp => "count_up",
        spb::SyncMode::Unspecified => "unknown",
    }
}

fn status_name(status: spb::SyncStatus) -> &'static str {
    match status {
        spb::SyncStatus::Pending => "pending",
        spb::SyncStatus::Running => "running",
        spb::SyncStatus::Paused => "paused",
        spb::SyncStatus::Expired => "expired",
        spb::SyncStatus::Completed => "completed",
        spb::SyncStatus::Cancelled => "cancelled",
        spb::SyncStatus::Unspecified => "unknown",
    }
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

/// A session as clients see it (a deleted one is `{sessionId, version, deleted: true}`).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum SyncView {
    Deleted(DeletedSync),
    Live(Box<LiveSync>),
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeletedSync {
    session_id: String,
    version: u64,
    deleted: bool,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LiveSync {
    session_id: String,
    channel_id: String,
    version: u64,
    mode: &'static str,
    status: &'static str,
    participants: Vec<Participant>,
    active_participant_id: Option<String>,
    total_time_ms: i64,
    time_per_cycle_ms: i64,
    increment_ms: i64,
    max_time_ms: i64,
    cycle_started_at: Option<i64>,
    session_started_at: Option<i64>,
    session_completed_at: Option<i64>,
    created_at: i64,
    updated_at: i64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Participant {
    participant_id: String,
    group_id: Option<String>,
    total_time_ms: i64,
    time_used_ms: i64,
    time_remaining_ms: i64,
    cycle_count: u32,
    is_active: bool,
    has_expired: bool,
}

/// Absent on the wire (`null`) when empty or zero.
fn present<T: Default + PartialEq>(v: T) -> Option<T> {
    (v != T::default()).then_some(v)
}

impl From<&spb::SyncState> for SyncView {
    fn from(s: &spb::SyncState) -> Self {
        if s.deleted {
            return Self::Deleted(DeletedSync {
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
        Self::Live(Box::new(LiveSync {
            session_id: s.session_id.clone(),
            channel_id: s.channel_id.clone(),
            version: s.version,
            mode: mode_name(s.sync_mode()),
            status: status_name(s.status()),
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
}

/// A reply or push: the session and the server's clock, from which clients count down.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncEnvelope {
    session: SyncView,
    server_time: i64,
}

impl From<&spb::SyncState> for SyncEnvelope {
    fn from(s: &spb::SyncState) -> Self {
        Self {
            session: SyncView::from(s),
            server_time: s.server_time_ms,
        }
    }
}

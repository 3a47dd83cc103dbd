//! Sync sessions on the WebSocket: the `sync-*` requests, turned into state-svc
//! `SyncService` calls, and the `sync-state` JSON every member of the session's channel gets.

use serde_json::{Value, json};
use talkgroup_proto::state::v1 as spb;

use crate::protocol::{ClientError, Code, SyncCreate, SyncRef};

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

pub fn create_request(r: SyncCreate) -> Result<spb::CreateSyncRequest, ClientError> {
    Ok(spb::CreateSyncRequest {
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

/// The JSON form of a session (a deleted one is `{sessionId, version, deleted: true}`).
pub fn state_json(s: &spb::SyncState) -> Value {
    if s.deleted {
        return json!({"sessionId": s.session_id, "version": s.version, "deleted": true});
    }
    let opt = |v: i64| if v == 0 { Value::Null } else { json!(v) };
    json!({
        "sessionId": s.session_id,
        "channelId": s.channel_id,
        "version": s.version,
        "mode": mode_name(s.sync_mode()),
        "status": status_name(s.status()),
        "participants": s.participants.iter().map(|p| json!({
            "participantId": p.participant_id,
            "groupId": if p.group_id.is_empty() { Value::Null } else { json!(p.group_id) },
            "totalTimeMs": p.total_time_ms,
            "timeUsedMs": p.time_used_ms,
            "timeRemainingMs": p.time_remaining_ms,
            "cycleCount": p.cycle_count,
            "isActive": p.is_active,
            "hasExpired": p.has_expired,
        })).collect::<Vec<_>>(),
        "activeParticipantId": if s.active_participant_id.is_empty() { Value::Null } else { json!(s.active_participant_id) },
        "totalTimeMs": s.total_time_ms,
        "timePerCycleMs": s.time_per_cycle_ms,
        "incrementMs": s.increment_ms,
        "maxTimeMs": s.max_time_ms,
        "cycleStartedAt": opt(s.cycle_started_at),
        "sessionStartedAt": opt(s.session_started_at),
        "sessionCompletedAt": opt(s.session_completed_at),
        "createdAt": s.created_at,
        "updatedAt": s.updated_at,
    })
}

/// A reply or push: the session and the server's clock, from which clients count down.
pub fn envelope(s: &spb::SyncState) -> Value {
    json!({"session": state_json(s), "serverTime": s.server_time_ms})
}

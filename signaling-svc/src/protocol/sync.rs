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

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LiveSync {
    session_id: String,
    channel_id: String,
    pub version: u64,
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

#[derive(Debug, Clone, PartialEq, Serialize)]
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

/// What changed in a session from `base_version` to `version`: the top-level fields that
/// changed and the participants that changed (whole). Sent instead of the whole session when
/// the gateway pushed `base_version` to the same members; a client at another version
/// re-reads it with `sync-get`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncChanged {
    session_id: String,
    channel_id: String,
    version: u64,
    base_version: u64,
    server_time: i64,
    changes: SyncFieldChanges,
    participants: Vec<Participant>,
}

/// The top-level fields of a session that changed, each present only when it did (one that
/// became empty is `null`), named as in the session object.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncFieldChanges {
    #[serde(skip_serializing_if = "Option::is_none")]
    session_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mode: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    active_participant_id: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    total_time_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    time_per_cycle_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    increment_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_time_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cycle_started_at: Option<Option<i64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session_started_at: Option<Option<i64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session_completed_at: Option<Option<i64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    created_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    updated_at: Option<i64>,
}

/// Each named field of `after` that differs from `before`'s.
macro_rules! changed_fields {
    ($before:expr, $after:expr, $($field:ident),* $(,)?) => {
        SyncFieldChanges {
            $($field: ($before.$field != $after.$field).then(|| $after.$field.clone()),)*
        }
    };
}

impl SyncChanged {
    /// The delta from `before` to `after`, or `None` when they cannot be compared (another
    /// participant list: send the whole session).
    pub fn between(before: &LiveSync, after: &LiveSync, server_time: i64) -> Option<Self> {
        let ids = |s: &LiveSync| -> Vec<String> {
            s.participants
                .iter()
                .map(|p| p.participant_id.clone())
                .collect()
        };
        if ids(before) != ids(after) {
            return None;
        }
        let changes = changed_fields!(
            before,
            after,
            session_id,
            channel_id,
            version,
            mode,
            status,
            active_participant_id,
            total_time_ms,
            time_per_cycle_ms,
            increment_ms,
            max_time_ms,
            cycle_started_at,
            session_started_at,
            session_completed_at,
            created_at,
            updated_at,
        );
        let participants = after
            .participants
            .iter()
            .zip(&before.participants)
            .filter(|(a, b)| a != b)
            .map(|(a, _)| a.clone())
            .collect();
        Some(Self {
            session_id: after.session_id.clone(),
            channel_id: after.channel_id.clone(),
            version: after.version,
            base_version: before.version,
            server_time,
            changes,
            participants,
        })
    }
}

/// A reply or push: the session and the server's clock, from which clients count down.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncEnvelope {
    session: SyncView,
    server_time: i64,
}

impl SyncEnvelope {
    /// The session, if it is live (not deleted).
    pub fn live(&self) -> Option<&LiveSync> {
        match &self.session {
            SyncView::Live(live) => Some(live),
            SyncView::Deleted(_) => None,
        }
    }

    pub fn version(&self) -> u64 {
        match &self.session {
            SyncView::Live(live) => live.version,
            SyncView::Deleted(deleted) => deleted.version,
        }
    }

    pub fn server_time(&self) -> i64 {
        self.server_time
    }
}

impl From<&spb::SyncState> for SyncEnvelope {
    fn from(s: &spb::SyncState) -> Self {
        Self {
            session: SyncView::from(s),
            server_time: s.server_time_ms,
        }
    }
}

#[cfg(test)]
mod delta_tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn state(version: u64, active: usize) -> spb::SyncState {
        spb::SyncState {
            session_id: "debate".into(),
            channel_id: "ops".into(),
            version,
            status: spb::SyncStatus::Running.into(),
            participants: (0..1000)
                .map(|i| spb::SyncParticipant {
                    participant_id: format!("p{i}"),
                    total_time_ms: 60_000,
                    time_remaining_ms: if i == active { 59_000 } else { 60_000 },
                    is_active: i == active,
                    ..Default::default()
                })
                .collect(),
            active_participant_id: format!("p{active}"),
            updated_at: 1_000 + version as i64,
            cycle_started_at: 1_000 + version as i64,
            ..Default::default()
        }
    }

    #[test]
    fn a_switch_in_a_thousand_participant_session_sends_what_changed() {
        let before = SyncEnvelope::from(&state(2, 0)).live().unwrap().clone();
        let after_state = state(3, 1);
        let after = SyncEnvelope::from(&after_state).live().unwrap().clone();
        let delta = SyncChanged::between(&before, &after, 5).unwrap();
        let delta_bytes = serde_json::to_string(&delta).unwrap().len();
        let full_bytes = serde_json::to_string(&SyncEnvelope::from(&after_state))
            .unwrap()
            .len();
        eprintln!(
            "switch in a 1000-participant session: {delta_bytes} B instead of {full_bytes} B"
        );
        assert_eq!(
            delta.participants.len(),
            2,
            "the one handing over and the next"
        );
        let changes = serde_json::to_value(&delta.changes).unwrap();
        assert_eq!(
            changes.as_object().unwrap().keys().collect::<Vec<_>>(),
            [
                "activeParticipantId",
                "cycleStartedAt",
                "updatedAt",
                "version"
            ]
        );
        assert!(
            delta_bytes * 100 < full_bytes,
            "delta {delta_bytes} B, whole session {full_bytes} B"
        );
        // Another participant list cannot be diffed: the whole session goes.
        let mut other = after.clone();
        other.participants.pop();
        assert!(SyncChanged::between(&before, &other, 5).is_none());
    }
}

//! Sync sessions on the wire: the session object of `sync-*` replies and `sync-state` pushes,
//! and the `sync-changed` delta between two versions of it.

use serde::{Deserialize, Deserializer, Serialize};

/// How a session's clock runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    PerParticipant,
    PerCycle,
    PerGroup,
    Global,
    CountUp,
    #[serde(other)]
    Unknown,
}

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncStatus {
    Pending,
    Running,
    Paused,
    Expired,
    Completed,
    Cancelled,
    #[serde(other)]
    Unknown,
}

/// A field that is absent (no change), `null` (changed to nothing) or a value.
fn changed<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// A session as clients see it (a deleted one is `{sessionId, version, deleted: true}`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SyncView {
    Deleted(DeletedSync),
    Live(Box<LiveSync>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeletedSync {
    pub session_id: String,
    pub version: u64,
    /// Always `true`.
    pub deleted: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LiveSync {
    pub session_id: String,
    pub channel_id: String,
    pub version: u64,
    pub mode: SyncMode,
    pub status: SyncStatus,
    pub participants: Vec<Participant>,
    pub active_participant_id: Option<String>,
    pub total_time_ms: i64,
    pub time_per_cycle_ms: i64,
    pub increment_ms: i64,
    pub max_time_ms: i64,
    pub cycle_started_at: Option<i64>,
    pub session_started_at: Option<i64>,
    pub session_completed_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Participant {
    pub participant_id: String,
    pub group_id: Option<String>,
    pub total_time_ms: i64,
    pub time_used_ms: i64,
    pub time_remaining_ms: i64,
    pub cycle_count: u32,
    pub is_active: bool,
    pub has_expired: bool,
}

/// What changed in a session from `base_version` to `version`: the top-level fields that
/// changed and the participants that changed (whole). Sent instead of the whole session when
/// the gateway pushed `base_version` to the same members; a client at another version
/// re-reads it with `sync-get`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncChanged {
    pub session_id: String,
    pub channel_id: String,
    pub version: u64,
    pub base_version: u64,
    pub server_time: i64,
    pub changes: SyncFieldChanges,
    pub participants: Vec<Participant>,
}

/// The top-level fields of a session that changed, each present only when it did (one that
/// became empty is `null`), named as in the session object.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncFieldChanges {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<SyncMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<SyncStatus>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "changed"
    )]
    pub active_participant_id: Option<Option<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_time_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_per_cycle_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub increment_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_time_ms: Option<i64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "changed"
    )]
    pub cycle_started_at: Option<Option<i64>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "changed"
    )]
    pub session_started_at: Option<Option<i64>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "changed"
    )]
    pub session_completed_at: Option<Option<i64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<i64>,
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
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncEnvelope {
    pub session: SyncView,
    pub server_time: i64,
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

#[cfg(test)]
mod delta_tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn state(version: u64, active: usize) -> LiveSync {
        LiveSync {
            session_id: "debate".into(),
            channel_id: "ops".into(),
            version,
            mode: SyncMode::PerParticipant,
            status: SyncStatus::Running,
            participants: (0..1000)
                .map(|i| Participant {
                    participant_id: format!("p{i}"),
                    group_id: None,
                    total_time_ms: 60_000,
                    time_used_ms: 0,
                    time_remaining_ms: if i == active { 59_000 } else { 60_000 },
                    cycle_count: 0,
                    is_active: i == active,
                    has_expired: false,
                })
                .collect(),
            active_participant_id: Some(format!("p{active}")),
            total_time_ms: 0,
            time_per_cycle_ms: 0,
            increment_ms: 0,
            max_time_ms: 0,
            cycle_started_at: Some(1_000 + version as i64),
            session_started_at: None,
            session_completed_at: None,
            created_at: 0,
            updated_at: 1_000 + version as i64,
        }
    }

    fn envelope(live: &LiveSync) -> SyncEnvelope {
        SyncEnvelope {
            session: SyncView::Live(Box::new(live.clone())),
            server_time: 5,
        }
    }

    #[test]
    fn a_switch_in_a_thousand_participant_session_sends_what_changed() {
        let before = state(2, 0);
        let after = state(3, 1);
        let delta = SyncChanged::between(&before, &after, 5).unwrap();
        let delta_bytes = serde_json::to_string(&delta).unwrap().len();
        let full_bytes = serde_json::to_string(&envelope(&after)).unwrap().len();
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

    #[test]
    fn a_delta_reads_back_as_it_was_sent_nulls_included() {
        let before = state(2, 0);
        let mut after = state(3, 1);
        after.active_participant_id = None;
        let delta = SyncChanged::between(&before, &after, 5).unwrap();
        let text = serde_json::to_string(&delta).unwrap();
        assert!(text.contains("\"activeParticipantId\":null"), "{text}");
        let back: SyncChanged = serde_json::from_str(&text).unwrap();
        assert_eq!(back.changes.active_participant_id, Some(None));
        assert_eq!(back.changes.version, Some(3));
        assert_eq!(back.changes.status, None, "unchanged: absent");
        assert_eq!(back.participants, delta.participants);
    }
}

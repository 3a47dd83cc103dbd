//! Pushes: what the server sends without being asked, each wire name written once (in one
//! table, `messages!`).

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::request::TransportDirection;
use crate::role::Role;
use crate::sync::SyncEnvelope;
use crate::view::{ChannelState, FloorReason, User};

messages! {
    /// Every push, as `{"type", "data"}`.
    Push,
    "The wire names of every push.",
    {
    "session" => Session(SessionInfo),
    "speaker-changed" => SpeakerChanged(SpeakerChanged),
    "ptt-denied" => PttDenied(PttDenied),
    "ptt-interrupted" => PttInterrupted(PttInterrupted),
    "channel-state" => ChannelState(ChannelState),
    "members-changed" => MembersChanged(MembersChanged),
    "permission-update" => PermissionUpdate(PermissionUpdate),
    "force-disconnect" => ForceDisconnect(ForceDisconnect),
    "transport-closed" => TransportClosed(TransportClosed),
    "sync-state" => SyncState(Box<SyncEnvelope>),
    "sync-changed" => SyncChanged(Box<crate::sync::SyncChanged>),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpeakerChanged {
    pub channel_id: String,
    pub speaker: Option<User>,
    pub epoch: u64,
    pub reason: FloorReason,
}

/// Who joined and left a channel since the last push, each change with the members version
/// it made: a client applies the changes newer than its own version, in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MembersChanged {
    pub channel_id: String,
    pub changes: Vec<MemberChange>,
}

/// One user arriving (their first socket joined) or gone (their last socket left).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MemberChange {
    pub version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joined: Option<User>,
    /// The user id of who left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PttDenied {
    pub channel_id: String,
    pub speaker: Option<User>,
    pub retry_after_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PttInterrupted {
    pub channel_id: String,
    pub by: Option<User>,
    pub epoch: u64,
    pub reason: FloorReason,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PermissionUpdate {
    pub channels: Vec<ChannelRole>,
    pub default_role: Role,
    pub revoked: Vec<String>,
}

impl PermissionUpdate {
    pub fn new(named: BTreeMap<String, Role>, default_role: Role, revoked: Vec<String>) -> Self {
        let channels = named
            .into_iter()
            .map(|(channel_id, role)| ChannelRole { channel_id, role })
            .collect();
        Self {
            channels,
            default_role,
            revoked,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChannelRole {
    pub channel_id: String,
    pub role: Role,
}

/// The socket's session, first thing after connecting: the token that resumes it after a
/// lost connection, and on a resume what the session still holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionInfo {
    pub session_id: String,
    /// Single use: present it as `?resume=` on the next socket; every session push brings a
    /// new one.
    pub resume_token: String,
    /// How long after a lost connection the session waits for its resume.
    pub resume_grace_ms: u32,
    /// This socket took over an earlier socket's session.
    pub resumed: bool,
    /// A resume was asked for and refused (`resume-refused`): this is a new session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_error: Option<Cow<'static, str>>,
    /// On a resume: the channels still joined (a `channel-state` push follows for each).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<String>,
    /// On a resume: the transports still open, to be used as before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transports: Vec<ResumedTransport>,
}

/// A transport a resumed session kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResumedTransport {
    pub transport_id: String,
    pub channel_id: String,
    pub direction: TransportDirection,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub producer_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssrc: Option<u32>,
}

/// A transport the server closed: its channel moved to another media node. Create a new one
/// of the same direction (and `produce` or `consume` on it) as after a join.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TransportClosed {
    pub transport_id: String,
    pub channel_id: String,
    pub direction: TransportDirection,
    /// `node-lost` (its media node died: the transport is dead) or `node-draining` (its node
    /// is being emptied: the transport keeps working a few seconds, time to make its
    /// replacement).
    pub reason: Cow<'static, str>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForceDisconnect {
    pub reason: String,
}

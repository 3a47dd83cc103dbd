//! The objects replies and pushes share: a user, a channel's state, a floor change's reason.

use serde::{Deserialize, Serialize};

/// `{userId, userName}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct User {
    pub user_id: String,
    pub user_name: String,
}

/// The `ChannelState` object; members are listed once per user.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ChannelState {
    pub channel_id: String,
    pub speaker: Option<User>,
    pub members: Vec<User>,
    /// The version of `members`: `members-changed` pushes with a higher version apply to it.
    pub members_version: u64,
    pub busy: bool,
    pub epoch: u64,
}

/// Why the floor changed (`speaker-changed`, `ptt-interrupted`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FloorReason {
    Granted,
    Released,
    Preempted,
    LeaseExpired,
    MaxTalkTime,
    ForceReleased,
    LeftChannel,
    Disconnected,
    QueueGranted,
    Emergency,
    EmergencyEnded,
    /// The store lost the floor (a holder's renewal found it gone).
    Lost,
    /// A reason this version does not know.
    #[serde(other)]
    Unknown,
}

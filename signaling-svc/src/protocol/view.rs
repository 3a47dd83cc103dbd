//! The objects replies and pushes share (a user, a channel's state, a floor reason), each built
//! once from state-svc's messages.

use std::collections::HashSet;

use serde::Serialize;
use talkgroup_proto::state::v1 as spb;

/// `{userId, userName}`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct User {
    pub user_id: String,
    pub user_name: String,
}

impl User {
    /// The speaker of a floor holder (`null` on the wire when there is none).
    pub fn of_holder(holder: &spb::FloorHolder) -> Option<Self> {
        holder.speaker.as_ref().map(|s| Self {
            user_id: s.user_id.clone(),
            user_name: s.user_name.clone(),
        })
    }

    /// The speaker of an optional holder.
    pub fn speaking(holder: Option<&spb::FloorHolder>) -> Option<Self> {
        holder.and_then(Self::of_holder)
    }
}

/// The `ChannelState` object; members are listed once per user.
#[derive(Debug, Clone, Serialize)]
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

impl From<&spb::ChannelState> for ChannelState {
    fn from(state: &spb::ChannelState) -> Self {
        let mut seen = HashSet::new();
        let members = state
            .members
            .iter()
            .filter(|m| seen.insert(m.user_id.as_str()))
            .map(|m| User {
                user_id: m.user_id.clone(),
                user_name: m.user_name.clone(),
            })
            .collect();
        Self {
            channel_id: state.channel_id.clone(),
            speaker: User::speaking(state.holder.as_ref()),
            members,
            members_version: state.members_version,
            busy: state.busy,
            epoch: state.epoch,
        }
    }
}

/// The wire name of a floor change reason.
pub fn reason(r: spb::FloorReason) -> &'static str {
    match r {
        spb::FloorReason::Granted => "granted",
        spb::FloorReason::Released => "released",
        spb::FloorReason::Preempted => "preempted",
        spb::FloorReason::LeaseExpired => "lease-expired",
        spb::FloorReason::MaxTalkTime => "max-talk-time",
        spb::FloorReason::ForceReleased => "force-released",
        spb::FloorReason::LeftChannel => "left-channel",
        spb::FloorReason::Disconnected => "disconnected",
        spb::FloorReason::QueueGranted => "queue-granted",
        spb::FloorReason::Emergency => "emergency",
        spb::FloorReason::EmergencyEnded => "emergency-ended",
        spb::FloorReason::Lost => "lost",
        spb::FloorReason::Unspecified => "unknown",
    }
}

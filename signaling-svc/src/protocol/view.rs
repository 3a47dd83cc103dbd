//! The wire's shared objects (a user, a channel's state, a floor reason), each built once from
//! state-svc's messages.

use std::collections::HashSet;

use talkgroup_proto::state::v1 as spb;
use talkgroup_wire::{ChannelState, FloorReason, User};

/// The speaker of a floor holder.
fn of_holder(holder: &spb::FloorHolder) -> Option<User> {
    holder.speaker.as_ref().map(|s| User {
        user_id: s.user_id.clone(),
        user_name: s.user_name.clone(),
    })
}

/// The speaker of an optional holder (`null` on the wire when there is none).
pub fn speaking(holder: Option<&spb::FloorHolder>) -> Option<User> {
    holder.and_then(of_holder)
}

/// The `ChannelState` object of a channel's state; members are listed once per user.
pub fn channel_state(state: &spb::ChannelState) -> ChannelState {
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
    ChannelState {
        channel_id: state.channel_id.clone(),
        speaker: speaking(state.holder.as_ref()),
        members,
        members_version: state.members_version,
        busy: state.busy,
        epoch: state.epoch,
    }
}

/// The wire's reason of a floor change.
pub fn reason(r: spb::FloorReason) -> FloorReason {
    match r {
        spb::FloorReason::Granted => FloorReason::Granted,
        spb::FloorReason::Released => FloorReason::Released,
        spb::FloorReason::Preempted => FloorReason::Preempted,
        spb::FloorReason::LeaseExpired => FloorReason::LeaseExpired,
        spb::FloorReason::MaxTalkTime => FloorReason::MaxTalkTime,
        spb::FloorReason::ForceReleased => FloorReason::ForceReleased,
        spb::FloorReason::LeftChannel => FloorReason::LeftChannel,
        spb::FloorReason::Disconnected => FloorReason::Disconnected,
        spb::FloorReason::QueueGranted => FloorReason::QueueGranted,
        spb::FloorReason::Emergency => FloorReason::Emergency,
        spb::FloorReason::EmergencyEnded => FloorReason::EmergencyEnded,
        spb::FloorReason::Lost => FloorReason::Lost,
        spb::FloorReason::Unspecified => FloorReason::Unknown,
    }
}

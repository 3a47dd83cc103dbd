//! The state of each followed channel: a snapshot, then floor changes last-epoch-wins and
//! membership changes by version, turned into the pushes members get. Membership changes of
//! a channel within [`MEMBERSHIP_COALESCE`] go out as one `members-changed`.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use talkgroup_proto::state::v1 as pb;

use super::registry::FloorPush;
use crate::protocol::push::{MemberChange, MembersChanged, SpeakerChanged};
use crate::protocol::{Frame, Push, User, reason};

/// Membership changes of a channel within this window reach its members as one
/// `members-changed` push.
pub const MEMBERSHIP_COALESCE: Duration = Duration::from_millis(25);

#[derive(Debug, Default)]
pub struct ChannelCache {
    states: HashMap<String, pb::ChannelState>,
    /// Per channel, the membership changes about to go out as one `members-changed`.
    pending: HashMap<String, Vec<MemberChange>>,
}

impl ChannelCache {
    /// Takes a channel's snapshot; its `channel-state` push.
    pub fn snapshot(&mut self, state: pb::ChannelState) -> Option<Utf8Bytes> {
        let text =
            Frame::from(Push::ChannelState(crate::protocol::channel_state(&state))).encode()?;
        self.states.insert(state.channel_id.clone(), state);
        Some(text)
    }

    /// Applies a floor change newer than what is known; its push.
    pub fn floor(&mut self, change: pb::FloorChanged) -> Option<FloorPush> {
        let state = self.states.get_mut(&change.channel_id)?;
        if change.epoch < state.epoch {
            return None;
        }
        state.epoch = change.epoch;
        state.holder.clone_from(&change.holder);
        state.busy = change.holder.is_some();
        let push = Push::SpeakerChanged(SpeakerChanged {
            channel_id: change.channel_id.clone(),
            speaker: crate::protocol::speaking(change.holder.as_ref()),
            epoch: change.epoch,
            reason: reason(change.reason()),
        });
        let speaker_changed = Frame::from(push).encode()?;
        Some(FloorPush {
            change,
            speaker_changed,
        })
    }

    /// Notes the channel's new media node.
    pub fn moved(&mut self, moved: &pb::ChannelMoved) {
        if let Some(state) = self.states.get_mut(&moved.channel_id) {
            state.media_node_id = moved
                .node
                .as_ref()
                .map(|n| n.node_id.clone())
                .unwrap_or_default();
        }
    }

    /// Applies a membership change; true when it started a coalescing window (the caller
    /// flushes the channel after [`MEMBERSHIP_COALESCE`]).
    pub fn membership(&mut self, change: &pb::MembershipChanged) -> bool {
        let Some(state) = self.states.get_mut(&change.channel_id) else {
            return false;
        };
        let Some(member) = change.member.as_ref() else {
            return false;
        };
        // In order from one stream; a change not newer than the snapshot is in it.
        if change.version <= state.members_version {
            return false;
        }
        state.members_version = change.version;
        let user_present =
            |members: &[pb::Member]| members.iter().any(|m| m.user_id == member.user_id);
        let was_present = user_present(&state.members);
        state.members.retain(|m| m.session_id != member.session_id);
        if change.change() == pb::MembershipChange::Joined {
            state.members.push(member.clone());
        }
        // Members are listed once per user: a user's second socket is no change.
        let delta = match (was_present, user_present(&state.members)) {
            (false, true) => MemberChange {
                version: change.version,
                joined: Some(User {
                    user_id: member.user_id.clone(),
                    user_name: member.user_name.clone(),
                }),
                left: None,
            },
            (true, false) => MemberChange {
                version: change.version,
                joined: None,
                left: Some(member.user_id.clone()),
            },
            _ => return false,
        };
        let pending = self.pending.entry(change.channel_id.clone()).or_default();
        pending.push(delta);
        pending.len() == 1
    }

    /// The `members-changed` push of the channel's pending changes.
    pub fn flush(&mut self, channel: &str) -> Option<Utf8Bytes> {
        let changes = self.pending.remove(channel)?;
        let push = Push::MembersChanged(MembersChanged {
            channel_id: channel.to_owned(),
            changes,
        });
        Frame::from(push).encode()
    }

    /// Nobody here follows the channel any more.
    pub fn forget(&mut self, channel: &str) {
        self.states.remove(channel);
        self.pending.remove(channel);
    }

    /// The highest floor epoch seen for `channel` (0: none).
    pub fn known_epoch(&self, channel: &str) -> u64 {
        self.states.get(channel).map_or(0, |state| state.epoch)
    }
}

//! Sync sessions on followed channels: each change goes to the channel's members as the
//! typed delta from the state pushed before (`sync-changed`) when that was the version just
//! before, as the whole session (`sync-state`) otherwise.

use std::collections::{HashMap, HashSet};

use axum::extract::ws::Utf8Bytes;
use talkgroup_proto::state::v1 as pb;

use crate::protocol::{Frame, Push};
use talkgroup_wire::sync::{LiveSync, SyncChanged};

#[derive(Debug, Default)]
pub struct SyncPushes {
    /// The last live state pushed per session.
    pushed: HashMap<String, LiveSync>,
    /// The sessions pushed per channel, forgotten with the channel.
    by_channel: HashMap<String, HashSet<String>>,
}

impl SyncPushes {
    /// The push of a session change on a followed channel; `None` for a version already
    /// pushed (a resynchronisation sends states again).
    pub fn push_for(&mut self, state: &pb::SyncState) -> Option<Utf8Bytes> {
        let envelope = crate::protocol::sync::sync_envelope(state);
        let id = &state.session_id;
        if self
            .pushed
            .get(id)
            .is_some_and(|before| before.version >= envelope.version())
        {
            return None;
        }
        let previous = match envelope.live() {
            Some(now) => {
                self.by_channel
                    .entry(state.channel_id.clone())
                    .or_default()
                    .insert(id.clone());
                self.pushed.insert(id.clone(), now.clone())
            }
            None => {
                if let Some(ids) = self.by_channel.get_mut(&state.channel_id) {
                    ids.remove(id);
                }
                self.pushed.remove(id)
            }
        };
        let delta = match (&previous, envelope.live()) {
            (Some(before), Some(after)) if before.version + 1 == state.version => {
                SyncChanged::between(before, after, envelope.server_time())
            }
            _ => None,
        };
        let push = match delta {
            Some(delta) => Push::SyncChanged(Box::new(delta)),
            None => Push::SyncState(Box::new(envelope)),
        };
        Frame::from(push).encode()
    }

    /// Nobody here follows the channel any more: nothing to diff against later.
    pub fn forget_channel(&mut self, channel: &str) {
        for id in self.by_channel.remove(channel).unwrap_or_default() {
            self.pushed.remove(&id);
        }
    }
}

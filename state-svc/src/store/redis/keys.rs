//! Every Redis key and pub/sub channel name, built in one place.
//!
//! A channel's keys share the hash tag `{ch:<id>}` and a session's keys `{s:<id>}`, so each Lua
//! script touches keys of one Redis Cluster slot only. Ids are validated before they get here
//! (`domain`), so they can contain neither braces nor separators that would break the tags.

use crate::domain::{ChannelId, NodeId, SessionId, SyncId, UserId};

/// The keys of events, all under one hash tag (`{events}`) so event scripts touch one slot.
#[derive(Debug, Clone)]
pub struct EventKeys {
    /// Hash: event id -> its channels, comma-joined.
    pub channels: String,
    /// Hash: channel id -> its event id.
    pub channel_event: String,
    /// Hash: event id -> the active emergency broadcast (JSON).
    pub emergency: String,
}

/// Key builder under a configurable prefix (default `ptt`).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

/// The keys of one channel, in the order every floor script receives them (`KEYS[1..=9]`).
#[derive(Debug, Clone)]
pub struct ChannelKeys {
    pub floor: String,
    pub epoch: String,
    pub members: String,
    pub queue: String,
    pub queue_info: String,
    pub config: String,
    pub events: String,
    pub audit: String,
    pub media: String,
}

impl ChannelKeys {
    pub fn all(&self) -> [&str; 9] {
        [
            &self.floor,
            &self.epoch,
            &self.members,
            &self.queue,
            &self.queue_info,
            &self.config,
            &self.events,
            &self.audit,
            &self.media,
        ]
    }
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// The prefix every key starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn channel(&self, ch: &ChannelId) -> ChannelKeys {
        let base = format!("{}:{{ch:{ch}}}", self.prefix);
        ChannelKeys {
            floor: format!("{base}:floor"),
            epoch: format!("{base}:epoch"),
            members: format!("{base}:members"),
            queue: format!("{base}:queue"),
            queue_info: format!("{base}:queue-info"),
            config: format!("{base}:config"),
            events: format!("{base}:events"),
            audit: format!("{base}:audit"),
            media: format!("{base}:media"),
        }
    }

    /// The pub/sub channel of a channel's events.
    pub fn channel_events(&self, ch: &ChannelId) -> String {
        format!("{}:{{ch:{ch}}}:events", self.prefix)
    }

    /// Parses a pub/sub channel name back into the channel id.
    pub fn parse_channel_events(&self, name: &str) -> Option<ChannelId> {
        let rest = name.strip_prefix(&self.prefix)?.strip_prefix(":{ch:")?;
        let id = rest.strip_suffix("}:events")?;
        ChannelId::parse(id).ok()
    }

    /// Sorted set: channel id -> time (ms) its floor grant should next be checked for expiry.
    pub fn floor_deadlines(&self) -> String {
        format!("{}:floor-deadlines", self.prefix)
    }

    pub fn session(&self, sid: &SessionId) -> String {
        format!("{}:{{s:{sid}}}", self.prefix)
    }

    pub fn session_channels(&self, sid: &SessionId) -> String {
        format!("{}:{{s:{sid}}}:channels", self.prefix)
    }

    /// Sorted set: session id -> expiry (ms).
    pub fn session_deadlines(&self) -> String {
        format!("{}:session-deadlines", self.prefix)
    }

    pub fn user_sessions(&self, uid: &UserId) -> String {
        format!("{}:user:{uid}:sessions", self.prefix)
    }

    /// Set of registered media node ids.
    pub fn media_nodes(&self) -> String {
        format!("{}:media:nodes", self.prefix)
    }

    pub fn media_node(&self, node: &NodeId) -> String {
        format!("{}:media:{{node:{node}}}", self.prefix)
    }

    /// A sync session (JSON), its audit stream and its event channel share `{sync:<id>}`.
    pub fn sync(&self, id: &SyncId) -> [String; 3] {
        let base = format!("{}:{{sync:{id}}}", self.prefix);
        [
            base.clone(),
            format!("{base}:audit"),
            format!("{base}:events"),
        ]
    }

    /// Parses a sync event channel name back into the session id.
    pub fn parse_sync_events(&self, name: &str) -> Option<SyncId> {
        self.parse_sync(name, "}:events")
    }

    /// Parses a sync session's audit stream name back into the session id.
    pub fn parse_sync_audit(&self, name: &str) -> Option<SyncId> {
        self.parse_sync(name, "}:audit")
    }

    fn parse_sync(&self, name: &str, suffix: &str) -> Option<SyncId> {
        let rest = name.strip_prefix(&self.prefix)?.strip_prefix(":{sync:")?;
        SyncId::parse(rest.strip_suffix(suffix)?).ok()
    }

    /// The pub/sub pattern of every channel's events.
    pub fn channel_events_pattern(&self) -> String {
        format!("{}:{{ch:*}}:events", self.prefix)
    }

    /// The pub/sub pattern of every sync session's events.
    pub fn sync_events_pattern(&self) -> String {
        format!("{}:{{sync:*}}:events", self.prefix)
    }

    /// The key patterns of every audit stream: the channels' and the sync sessions'.
    pub fn audit_patterns(&self) -> [String; 2] {
        [
            format!("{}:{{ch:*}}:audit", self.prefix),
            format!("{}:{{sync:*}}:audit", self.prefix),
        ]
    }

    /// Sorted set: sync session id -> when its running clock runs out (ms).
    /// The ids of the sync sessions of a channel (`channel:<id>`) or of a user
    /// (`owner:<id>`), pruned as they are read.
    pub fn sync_index(&self, what: &str) -> String {
        format!("{}:sync-index:{what}", self.prefix)
    }

    pub fn sync_deadlines(&self) -> String {
        format!("{}:sync-deadlines", self.prefix)
    }

    /// Hash of a user's grants: channel id -> role, plus `#v` (the version).
    pub fn grants(&self, uid: &UserId) -> String {
        format!("{}:{{u:{uid}}}:grants", self.prefix)
    }

    /// Set of channels that have (or recently had) members, for the admin listing.
    pub fn channels_index(&self) -> String {
        format!("{}:channels", self.prefix)
    }

    /// The pub/sub channel on which admin kicks reach every replica.
    pub fn kicks(&self) -> String {
        format!("{}:kicks", self.prefix)
    }

    /// The pub/sub channel on which session takeovers (resumes) reach every replica.
    pub fn resumes(&self) -> String {
        format!("{}:resumes", self.prefix)
    }

    /// The pub/sub channel on which grant changes reach every replica.
    pub fn grants_events(&self) -> String {
        format!("{}:grants", self.prefix)
    }

    pub fn events(&self) -> EventKeys {
        let base = format!("{}:{{events}}", self.prefix);
        EventKeys {
            channels: format!("{base}:event-channels"),
            channel_event: format!("{base}:channel-event"),
            emergency: format!("{base}:emergency"),
        }
    }

    pub fn media_node_channels(&self, node: &NodeId) -> String {
        format!("{}:media:{{node:{node}}}:channels", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_keys_share_one_hash_tag() {
        let keys = Keys::new("ptt");
        let ch = ChannelId::parse("ops").unwrap();
        let all = keys.channel(&ch);
        for key in all.all() {
            assert!(key.starts_with("ptt:{ch:ops}:"), "{key}");
        }
        assert_eq!(all.events, keys.channel_events(&ch));
        assert_eq!(keys.parse_channel_events(&all.events), Some(ch));
        assert_eq!(keys.parse_channel_events("other:{ch:ops}:events"), None);
    }
}

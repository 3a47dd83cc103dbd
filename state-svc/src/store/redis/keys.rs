//! Every Redis key and pub/sub channel name, built in one place.
//!
//! A channel's keys share the hash tag `{ch:<id>}` and a session's keys `{s:<id>}`, so each Lua
//! script touches keys of one Redis Cluster slot only. Ids are validated before they get here
//! (`domain`), so they can contain neither braces nor separators that would break the tags.

use crate::domain::{ChannelId, NodeId, SessionId, SyncId, Topic, UserId};

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
///
/// The global indexes (floor, session and sync deadlines, the channel index) are one key each
/// on one server, and under Cluster [`CLUSTER_SHARDS`] keys each, every one under its own hash
/// tag, so they spread over the masters instead of making one of them the hot spot of every
/// press. A member's shard is fixed by its id.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    shards: u16,
}

/// Shards of each global index under Redis Cluster.
pub const CLUSTER_SHARDS: u16 = 16;

/// FNV-1a: a stable spread of ids over shards (not a security boundary).
fn shard_of(id: &str, shards: u16) -> u16 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in id.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    u16::try_from(hash % u32::from(shards)).unwrap_or_default()
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

/// The keys of one sync session, in one hash tag (`{sync:<id>}`).
#[derive(Debug, Clone)]
pub struct SyncKeys {
    /// The session (JSON).
    pub state: String,
    /// Its change log (stream).
    pub audit: String,
    /// Its pub/sub name.
    pub events: String,
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
            shards: 1,
        }
    }

    /// Keys for a Redis Cluster: the global indexes in [`CLUSTER_SHARDS`] shards each.
    pub fn for_cluster(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            shards: CLUSTER_SHARDS,
        }
    }

    /// Shard `n` of global index `name` (one shard: the plain `<prefix>:<name>`).
    fn index_shard(&self, name: &str, n: u16) -> String {
        if self.shards == 1 {
            format!("{}:{name}", self.prefix)
        } else {
            format!("{}:{{{name}:{n}}}", self.prefix)
        }
    }

    /// The shard of global index `name` that holds `member`.
    fn index_for(&self, name: &str, member: &str) -> String {
        self.index_shard(name, shard_of(member, self.shards))
    }

    /// Every shard of global index `name`.
    fn index_all(&self, name: &str) -> Vec<String> {
        (0..self.shards)
            .map(|n| self.index_shard(name, n))
            .collect()
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

    /// The pub/sub channel of a topic's events, in the topic's hash tag (so the script that
    /// changes a channel, a user's grants or a sync session publishes in its own slot).
    pub fn topic_events(&self, topic: &Topic) -> String {
        match topic {
            Topic::Channel(ch) => format!("{}:{{ch:{ch}}}:events", self.prefix),
            Topic::User(uid) => format!("{}:{{u:{uid}}}:events", self.prefix),
            Topic::Sync(id) => format!("{}:{{sync:{id}}}:events", self.prefix),
        }
    }

    /// Parses a pub/sub channel name back into its topic: the one place names are matched.
    pub fn parse_topic_events(&self, name: &str) -> Option<Topic> {
        let rest = name.strip_prefix(&self.prefix)?.strip_prefix(":{")?;
        let (tag, suffix) = rest.split_once('}')?;
        if suffix != ":events" {
            return None;
        }
        let (kind, id) = tag.split_once(':')?;
        match kind {
            "ch" => ChannelId::parse(id).ok().map(Topic::Channel),
            "u" => UserId::parse(id).ok().map(Topic::User),
            "sync" => SyncId::parse(id).ok().map(Topic::Sync),
            _ => None,
        }
    }

    /// Sorted set: channel id -> time (ms) its floor grant should next be checked for expiry
    /// (the shard that holds `ch`).
    pub fn floor_deadlines(&self, ch: &ChannelId) -> String {
        self.index_for("floor-deadlines", ch.as_str())
    }

    /// Every shard of the floor deadlines.
    pub fn floor_deadlines_all(&self) -> Vec<String> {
        self.index_all("floor-deadlines")
    }

    pub fn session(&self, sid: &SessionId) -> String {
        format!("{}:{{s:{sid}}}", self.prefix)
    }

    pub fn session_channels(&self, sid: &SessionId) -> String {
        format!("{}:{{s:{sid}}}:channels", self.prefix)
    }

    /// Sorted set: session id -> expiry (ms) (the shard that holds `sid`).
    pub fn session_deadlines(&self, sid: &SessionId) -> String {
        self.index_for("session-deadlines", sid.as_str())
    }

    /// Every shard of the session deadlines.
    pub fn session_deadlines_all(&self) -> Vec<String> {
        self.index_all("session-deadlines")
    }

    /// Sorted set of a user's sessions: session id -> until when it counts against the
    /// user's session limit (ms). Shares the user's hash tag with the grants.
    pub fn user_sessions(&self, uid: &UserId) -> String {
        format!("{}:{{u:{uid}}}:sessions", self.prefix)
    }

    /// Set of registered media node ids.
    pub fn media_nodes(&self) -> String {
        format!("{}:media:nodes", self.prefix)
    }

    pub fn media_node(&self, node: &NodeId) -> String {
        format!("{}:media:{{node:{node}}}", self.prefix)
    }

    /// A sync session's keys, sharing `{sync:<id>}`.
    pub fn sync(&self, id: &SyncId) -> SyncKeys {
        let base = format!("{}:{{sync:{id}}}", self.prefix);
        SyncKeys {
            audit: format!("{base}:audit"),
            events: format!("{base}:events"),
            state: base,
        }
    }

    /// Parses a sync session's audit stream name back into the session id.
    pub fn parse_sync_audit(&self, name: &str) -> Option<SyncId> {
        let rest = name.strip_prefix(&self.prefix)?.strip_prefix(":{sync:")?;
        SyncId::parse(rest.strip_suffix("}:audit")?).ok()
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

    /// The shard of the sync deadlines that holds `id`.
    pub fn sync_deadlines(&self, id: &SyncId) -> String {
        self.index_for("sync-deadlines", id.as_str())
    }

    /// Every shard of the sync deadlines.
    pub fn sync_deadlines_all(&self) -> Vec<String> {
        self.index_all("sync-deadlines")
    }

    /// Hash of a user's grants: channel id -> role, plus `#v` (the version).
    pub fn grants(&self, uid: &UserId) -> String {
        format!("{}:{{u:{uid}}}:grants", self.prefix)
    }

    /// Set of channels that have (or recently had) members, for the admin listing (the shard
    /// that holds `ch`).
    pub fn channels_index(&self, ch: &ChannelId) -> String {
        self.index_for("channels", ch.as_str())
    }

    /// Every shard of the channel index.
    pub fn channels_index_all(&self) -> Vec<String> {
        self.index_all("channels")
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
        let topic = Topic::Channel(ch.clone());
        assert_eq!(all.events, keys.topic_events(&topic));
        assert_eq!(keys.parse_topic_events(&all.events), Some(topic));
        assert_eq!(keys.parse_topic_events("other:{ch:ops}:events"), None);
    }

    #[test]
    fn every_topic_has_one_events_name_in_its_own_hash_tag() {
        let keys = Keys::new("ptt");
        let uid = UserId::parse("ana").unwrap();
        let sync = SyncId::parse("clock").unwrap();
        for topic in [
            Topic::Channel(ChannelId::parse("ops").unwrap()),
            Topic::User(uid.clone()),
            Topic::Sync(sync.clone()),
        ] {
            let name = keys.topic_events(&topic);
            assert_eq!(keys.parse_topic_events(&name), Some(topic));
        }
        let tag = |key: &str| key[key.find('{').unwrap()..=key.find('}').unwrap()].to_owned();
        assert_eq!(
            tag(&keys.topic_events(&Topic::User(uid.clone()))),
            tag(&keys.grants(&uid))
        );
        assert_eq!(
            tag(&keys.topic_events(&Topic::Sync(sync.clone()))),
            tag(&keys.sync(&sync).state)
        );
        for hostile in [
            "ptt:{x:ops}:events",
            "ptt:{ch:ops}:audit",
            "ptt:{u:}:events",
            "ptt:{ch:a b}:events",
        ] {
            assert_eq!(keys.parse_topic_events(hostile), None, "{hostile}");
        }
    }

    #[test]
    fn one_server_keeps_one_key_per_index() {
        let keys = Keys::new("ptt");
        let ch = ChannelId::parse("ops").unwrap();
        assert_eq!(keys.floor_deadlines(&ch), "ptt:floor-deadlines");
        assert_eq!(keys.floor_deadlines_all(), vec!["ptt:floor-deadlines"]);
        assert_eq!(keys.channels_index(&ch), "ptt:channels");
    }

    #[test]
    fn cluster_indexes_spread_over_hash_tagged_shards() {
        let keys = Keys::for_cluster("ptt");
        let all = keys.floor_deadlines_all();
        assert_eq!(all.len(), usize::from(CLUSTER_SHARDS));
        assert_eq!(all[3], "ptt:{floor-deadlines:3}");
        let mut used = std::collections::HashSet::new();
        for i in 0..200 {
            let ch = ChannelId::parse(&format!("ch-{i}")).unwrap();
            let key = keys.floor_deadlines(&ch);
            assert!(all.contains(&key), "{key}");
            // The same channel always lands in the same shard.
            assert_eq!(key, keys.floor_deadlines(&ch));
            used.insert(key);
        }
        assert_eq!(
            used.len(),
            usize::from(CLUSTER_SHARDS),
            "200 ids use every shard"
        );
    }
}

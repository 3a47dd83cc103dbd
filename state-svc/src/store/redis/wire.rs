//! The JSON documents the Lua scripts answer with and publish, and their conversion into
//! domain types. Data read back from Redis is validated like any other input: a record that
//! does not parse is an internal error, never a panic.

use serde::{Deserialize, Deserializer};

use std::collections::{BTreeMap, HashMap};

use crate::domain::{
    ChannelId, ChannelMoved, EmergencyHolder, Event, FloorChanged, FloorHolder, FloorReason,
    FloorRefusal, Member, MembershipChange, MembershipChanged, MoveReason, NodeId, Published, Role,
    SessionId, Speaker, SyncEvent, SyncId, Topic, UserEvent, UserGrants, UserId,
};
use crate::error::StoreError;
use crate::sync::SyncSession;

fn corrupt(what: &str) -> StoreError {
    StoreError::Internal(format!("unreadable {what} in redis"))
}

pub fn parse<'a, T: Deserialize<'a>>(raw: &'a str, what: &str) -> Result<T, StoreError> {
    serde_json::from_str(raw).map_err(|e| StoreError::Internal(format!("unreadable {what}: {e}")))
}

/// What a script answered, decoded once from its token (`r` of a JSON answer, or the first
/// element of an array answer): every token a script returns. An unknown token is an internal
/// error at this edge; past it, answers are matched as variants, never as strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Granted,
    Denied,
    Queued,
    NotMember,
    Renewed,
    Released,
    NotHeld,
    NotHolder,
    StaleEpoch,
    MaxTalkTime,
    Changed,
    Unchanged,
    Mismatch,
    TooMany,
    Ok,
    Busy,
    NoEvent,
    Conflict,
    Missing,
    /// A session moved past the generation the caller named (resumed elsewhere).
    Moved,
}

impl Verdict {
    /// Decodes a bare token.
    pub fn parse(token: &str) -> Result<Self, StoreError> {
        use serde::de::IntoDeserializer;
        let token: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
            token.into_deserializer();
        Self::deserialize(token).map_err(|_| corrupt("script answer"))
    }

    /// The floor refusal this answer is, if it is one.
    pub fn refusal(self) -> Option<FloorRefusal> {
        Some(match self {
            Self::NotHeld => FloorRefusal::NotHeld,
            Self::NotHolder => FloorRefusal::NotHolder,
            Self::StaleEpoch => FloorRefusal::StaleEpoch,
            Self::MaxTalkTime => FloorRefusal::MaxTalkTime,
            _ => return None,
        })
    }

    /// The error for an answer the calling script never gives.
    pub fn unexpected(self, what: &str) -> StoreError {
        StoreError::Internal(format!("unexpected {what} answer {self:?}"))
    }
}

/// A membership change as published.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireChange {
    Joined,
    Left,
}

pub fn epoch(raw: &str) -> Result<u64, StoreError> {
    raw.parse().map_err(|_| corrupt("epoch"))
}

/// A u64 written as a JSON number or as a decimal string.
fn u64_or_string<'de, D>(d: D) -> Result<u64, D::Error>
where
    D: Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumOrStr {
        Num(u64),
        Str(String),
    }
    match NumOrStr::deserialize(d)? {
        NumOrStr::Num(n) => Ok(n),
        NumOrStr::Str(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

/// cjson encodes an empty Lua table as `{}`: accept it where a list is expected.
fn list_or_empty_object<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrObject<T> {
        List(Vec<T>),
        Object(serde_json::Map<String, serde_json::Value>),
    }
    match ListOrObject::deserialize(d)? {
        ListOrObject::List(v) => Ok(v),
        ListOrObject::Object(m) if m.is_empty() => Ok(Vec::new()),
        ListOrObject::Object(_) => Err(serde::de::Error::custom("expected a list")),
    }
}

#[derive(Debug, Deserialize)]
pub struct WireSpeaker {
    pub sid: String,
    pub uid: String,
    pub name: String,
    pub prio: u32,
}

impl WireSpeaker {
    pub fn into_domain(self) -> Result<Speaker, StoreError> {
        Ok(Speaker {
            session_id: SessionId::parse(&self.sid).map_err(|_| corrupt("session id"))?,
            user_id: UserId::parse(&self.uid).map_err(|_| corrupt("user id"))?,
            user_name: self.name,
            priority: self.prio,
        })
    }
}

#[derive(Debug, Deserialize)]
pub struct WireHolder {
    #[serde(flatten)]
    pub speaker: WireSpeaker,
    pub epoch: String,
    pub granted: i64,
    pub expires: i64,
    pub max_until: i64,
}

impl WireHolder {
    pub fn into_domain(self) -> Result<FloorHolder, StoreError> {
        Ok(FloorHolder {
            epoch: epoch(&self.epoch)?,
            granted_at_ms: self.granted,
            expires_at_ms: self.expires,
            max_until_ms: self.max_until,
            speaker: self.speaker.into_domain()?,
        })
    }
}

#[derive(Debug, Deserialize)]
pub struct WireMember {
    pub sid: String,
    pub uid: String,
    pub name: String,
    pub at: i64,
}

impl WireMember {
    pub fn into_domain(self) -> Result<Member, StoreError> {
        Ok(Member {
            session_id: SessionId::parse(&self.sid).map_err(|_| corrupt("session id"))?,
            user_id: UserId::parse(&self.uid).map_err(|_| corrupt("user id"))?,
            user_name: self.name,
            joined_at_ms: self.at,
        })
    }
}

/// What a member record stores (the session id is the hash field).
#[derive(Debug, serde::Serialize)]
pub struct StoredMember<'a> {
    pub uid: &'a str,
    pub name: &'a str,
    pub at: i64,
}

#[derive(Debug, Deserialize)]
pub struct WireAcquire {
    pub r: Verdict,
    pub holder: Option<WireHolder>,
    pub max_talk: Option<i64>,
    pub retry: Option<i64>,
    pub pos: Option<u32>,
    pub preempted: Option<WireSpeaker>,
    pub now: i64,
}

#[derive(Debug, Deserialize)]
pub struct WireRenew {
    pub r: Verdict,
    pub expires: Option<i64>,
    pub max_until: Option<i64>,
    pub now: i64,
}

#[derive(Debug, Deserialize)]
pub struct WireRelease {
    pub r: Verdict,
    pub epoch: String,
    #[serde(default)]
    pub dequeued: bool,
}

#[derive(Debug, Deserialize)]
pub struct WireExpire {
    pub expired: bool,
    pub next: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub struct WireLeave {
    pub was_member: bool,
    pub released: bool,
    pub node: Option<String>,
    /// The channel has no members left.
    #[serde(default)]
    pub empty: bool,
}

#[derive(Debug, Deserialize)]
pub struct WireState {
    #[serde(deserialize_with = "list_or_empty_object")]
    pub members: Vec<WireMember>,
    pub holder: Option<WireHolder>,
    pub epoch: String,
    pub node: Option<String>,
    pub now: i64,
    /// The members version, as a string (it exceeds what cjson keeps of a number).
    #[serde(default)]
    pub mver: Option<String>,
}

impl WireState {
    pub fn into_domain(self, ch: &ChannelId) -> Result<crate::domain::ChannelState, StoreError> {
        let mut members = self
            .members
            .into_iter()
            .map(WireMember::into_domain)
            .collect::<Result<Vec<_>, _>>()?;
        members.sort_by(|a, b| {
            a.joined_at_ms
                .cmp(&b.joined_at_ms)
                .then_with(|| a.session_id.cmp(&b.session_id))
        });
        Ok(crate::domain::ChannelState {
            channel_id: ch.clone(),
            holder: self.holder.map(WireHolder::into_domain).transpose()?,
            epoch: epoch(&self.epoch)?,
            members,
            members_version: self.mver.as_deref().map_or(Ok(0), epoch)?,
            media_node: self
                .node
                .map(|n| NodeId::parse(&n).map_err(|_| corrupt("node id")))
                .transpose()?,
            server_time_ms: self.now,
        })
    }
}

/// An event as the scripts publish it.
#[derive(Debug, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub enum WireEvent {
    Floor {
        ch: String,
        epoch: String,
        reason: String,
        holder: Option<WireHolder>,
        prev: Option<WireSpeaker>,
        prev_ms: Option<i64>,
        at: i64,
    },
    Member {
        ch: String,
        change: WireChange,
        m: WireMember,
        count: u32,
        at: i64,
        #[serde(default)]
        v: Option<String>,
    },
    Moved {
        ch: String,
        node: String,
        addr: String,
        from: String,
        reason: String,
        at: i64,
    },
}

impl WireEvent {
    pub fn into_domain(self) -> Result<Event, StoreError> {
        let channel = |ch: &str| ChannelId::parse(ch).map_err(|_| corrupt("channel id"));
        Ok(match self {
            Self::Moved {
                ch,
                node,
                addr,
                from,
                reason,
                at,
            } => Event::Moved(ChannelMoved {
                channel_id: channel(&ch)?,
                node_id: NodeId::parse(&node).map_err(|_| corrupt("node id"))?,
                grpc_addr: addr,
                previous: NodeId::parse(&from).map_err(|_| corrupt("node id"))?,
                reason: MoveReason::parse(&reason).ok_or_else(|| corrupt("move reason"))?,
                at_ms: at,
            }),
            Self::Floor {
                ch,
                epoch: e,
                reason,
                holder,
                prev,
                prev_ms,
                at,
            } => Event::Floor(FloorChanged {
                channel_id: channel(&ch)?,
                holder: holder.map(WireHolder::into_domain).transpose()?,
                previous: prev.map(WireSpeaker::into_domain).transpose()?,
                epoch: epoch(&e)?,
                reason: FloorReason::parse(&reason).ok_or_else(|| corrupt("floor reason"))?,
                previous_duration_ms: prev_ms.unwrap_or(0),
                at_ms: at,
            }),
            Self::Member {
                ch,
                change,
                m,
                count,
                at,
                v,
            } => Event::Membership(MembershipChanged {
                channel_id: channel(&ch)?,
                member: m.into_domain()?,
                change: match change {
                    WireChange::Joined => MembershipChange::Joined,
                    WireChange::Left => MembershipChange::Left,
                },
                member_count: count,
                at_ms: at,
                version: v.as_deref().map_or(Ok(0), epoch)?,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_token_a_script_answers_is_a_verdict() {
        let scripts = include_str!("scripts.rs");
        let mut seen = 0;
        // Answers: the `r` of a JSON answer, and what a script returns at its top level (a
        // helper's `return` inside a function is indented).
        for opener in ["r = '", "\nreturn '", "return { '"] {
            for (at, _) in scripts.match_indices(opener) {
                let rest = &scripts[at + opener.len()..];
                let token = &rest[..rest.find('\'').unwrap()];
                assert!(Verdict::parse(token).is_ok(), "{token}");
                seen += 1;
            }
        }
        assert!(seen > 30, "the scripts' answers were found ({seen})");
        assert!(Verdict::parse("granted ").is_err());
    }

    #[test]
    fn empty_lua_table_reads_as_empty_list() {
        let state: WireState = parse(
            r#"{"members":{},"epoch":"1732245123456000","now":5}"#,
            "state",
        )
        .unwrap();
        assert!(state.members.is_empty());
        assert_eq!(epoch(&state.epoch).unwrap(), 1_732_245_123_456_000);
    }

    #[test]
    fn events_parse_into_domain() {
        let raw = r#"{"k":"floor","ch":"ops","epoch":"7","reason":"preempted",
            "holder":{"sid":"s2","uid":"u2","name":"Bo","prio":5,"epoch":"7","granted":1,"expires":2,"max_until":3},
            "prev":{"sid":"s1","uid":"u1","name":"Al","prio":0},"prev_ms":40,"at":9}"#;
        let event = parse::<WireEvent>(raw, "event")
            .unwrap()
            .into_domain()
            .unwrap();
        let Event::Floor(f) = event else {
            panic!("not a floor event")
        };
        assert_eq!(f.reason, FloorReason::Preempted);
        assert_eq!(f.previous.unwrap().user_name, "Al");
        assert_eq!(f.holder.unwrap().speaker.priority, 5);
    }
}

/// Decodes one message of a topic's pub/sub channel: the one place published payloads become
/// domain events. A payload that names another topic than the one it came on is refused, so
/// no publisher can reach a topic's watchers through another topic's name.
pub fn decode_event(topic: &Topic, payload: &[u8]) -> Result<Published, StoreError> {
    let raw = std::str::from_utf8(payload).map_err(|_| corrupt("event"))?;
    let event: Published = match topic {
        Topic::Channel(_) => parse::<WireEvent>(raw, "channel event")?
            .into_domain()?
            .into(),
        Topic::User(_) => parse::<WireUserEvent>(raw, "user event")?
            .into_domain()?
            .into(),
        Topic::Sync(_) => parse::<WireSyncEvent>(raw, "sync event")?
            .into_domain()?
            .into(),
    };
    if event.topics().next().as_ref() != Some(topic) {
        return Err(corrupt("event of another topic"));
    }
    Ok(event)
}

/// An event of a user's topic as published, its kind in `k`.
#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(tag = "k", rename_all = "lowercase")]
pub enum WireUserEvent {
    Grants(WireGrants),
    Kick(WireKick),
    Resumed(WireResumed),
}

impl WireUserEvent {
    pub fn into_domain(self) -> Result<UserEvent, StoreError> {
        Ok(match self {
            Self::Grants(g) => UserEvent::Grants(g.into_published()?),
            Self::Kick(k) => UserEvent::Kicked {
                user_id: UserId::parse(&k.uid)?,
                reason: k.reason,
            },
            Self::Resumed(r) => UserEvent::Resumed {
                user_id: UserId::parse(&r.uid)?,
                session_id: SessionId::parse(&r.sid)?,
                generation: r.generation,
            },
        })
    }
}

/// A sync session's change as its scripts publish it: the whole stored session, or the
/// marker of its deletion.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum WireSyncEvent {
    Deleted(WireSyncDeleted),
    State(Box<SyncSession>),
}

#[derive(Debug, Deserialize)]
pub struct WireSyncDeleted {
    /// Always `true`: what tells a deletion from a session.
    #[serde(rename = "deleted", deserialize_with = "only_true")]
    _deleted: (),
    session_id: String,
    version: u64,
    #[serde(default)]
    channel_id: Option<String>,
}

fn only_true<'de, D: Deserializer<'de>>(d: D) -> Result<(), D::Error> {
    if bool::deserialize(d)? {
        Ok(())
    } else {
        Err(serde::de::Error::custom("not a deletion"))
    }
}

impl WireSyncEvent {
    pub fn into_domain(self) -> Result<SyncEvent, StoreError> {
        match self {
            Self::State(state) => Ok(SyncEvent::changed(*state)),
            Self::Deleted(d) => Ok(SyncEvent {
                session_id: SyncId::parse(&d.session_id)?,
                version: d.version,
                channel_id: d.channel_id.as_deref().map(ChannelId::parse).transpose()?,
                state: None,
            }),
        }
    }
}

/// A user's grants as the grant script answers and publishes them.
#[derive(Debug, Deserialize, serde::Serialize)]
pub struct WireGrants {
    /// The grant script's answer (absent on grants read back from the hash).
    #[serde(default)]
    pub r: Option<Verdict>,
    #[serde(default)]
    pub uid: Option<String>,
    /// A decimal string (numbers this large lose digits in cjson); a number from older
    /// scripts is read too.
    #[serde(default, deserialize_with = "u64_or_string")]
    pub v: u64,
    #[serde(default)]
    pub g: HashMap<String, String>,
}

impl WireGrants {
    pub fn into_domain(self, uid: &UserId) -> Result<UserGrants, StoreError> {
        let mut grants = BTreeMap::new();
        for (ch, role) in self.g {
            let ch = ChannelId::parse(&ch).map_err(|_| corrupt("grant channel"))?;
            let role = Role::parse(&role).ok_or_else(|| corrupt("grant role"))?;
            grants.insert(ch, role);
        }
        Ok(UserGrants {
            user_id: uid.clone(),
            version: self.v,
            grants,
        })
    }

    /// A published change names its user.
    pub fn into_published(self) -> Result<UserGrants, StoreError> {
        let uid = UserId::parse(self.uid.as_deref().unwrap_or_default())
            .map_err(|_| corrupt("grant user"))?;
        self.into_domain(&uid)
    }
}

/// An event's emergency broadcaster as stored.
#[derive(Debug, Deserialize, serde::Serialize)]
pub struct WireEmergency {
    pub sid: String,
    pub uid: String,
    pub name: String,
    pub prio: u32,
    #[serde(default)]
    pub started: i64,
}

impl WireEmergency {
    pub fn from_speaker(s: &Speaker) -> Self {
        Self {
            sid: s.session_id.to_string(),
            uid: s.user_id.to_string(),
            name: s.user_name.clone(),
            prio: s.priority,
            started: 0,
        }
    }

    pub fn into_domain(self) -> Result<EmergencyHolder, StoreError> {
        Ok(EmergencyHolder {
            started_at_ms: self.started,
            speaker: WireSpeaker {
                sid: self.sid,
                uid: self.uid,
                name: self.name,
                prio: self.prio,
            }
            .into_domain()?,
        })
    }
}

#[derive(Debug, Deserialize)]
pub struct WireClaim {
    pub r: Verdict,
    #[serde(default)]
    pub chans: Option<String>,
    #[serde(default)]
    pub em: Option<WireEmergency>,
}

/// Splits a stored comma-joined channel list.
pub fn channel_list(raw: &str) -> Result<Vec<ChannelId>, StoreError> {
    raw.split(',')
        .filter(|c| !c.is_empty())
        .map(|c| ChannelId::parse(c).map_err(|_| corrupt("event channel")))
        .collect()
}

/// An admin kick as published on the user's topic.
#[derive(Debug, Deserialize, serde::Serialize)]
pub struct WireKick {
    pub uid: String,
    pub reason: String,
}

/// A session taken over by a resumed socket, as published on the user's topic.
#[derive(Debug, Deserialize, serde::Serialize)]
pub struct WireResumed {
    pub uid: String,
    pub sid: String,
    pub generation: u64,
}

//! Replies: the `data` of the one answer each request gets. The reply's `type` is its request's
//! ([`crate::Request::reply_type`]), so no wire name is written here; [`Reply::decode`] reads
//! one back by that type.

use serde::{Deserialize, Serialize};

use crate::role::Role;
use crate::sync::SyncEnvelope;
use crate::view::{ChannelState, User};

/// The data of a successful reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    /// `{}`: `leave-channel`, `connect-transport`, `ptt-stop`.
    Done(Done),
    Pong(Pong),
    Channels(Channels),
    Joined(Joined),
    Capabilities(Capabilities),
    Transport(Transport),
    Producer(Producer),
    Consumer(Consumer),
    Floor(FloorAnswer),
    EmergencyStarted(EmergencyStarted),
    EmergencyStopped(EmergencyStopped),
    Sync(Box<SyncEnvelope>),
    SyncDeleted(SyncDeleted),
    TokenRefreshed(TokenRefreshed),
    IceServers(IceServers),
}

/// Lets a handler return its own reply type where a [`Reply`] is expected.
macro_rules! reply_from {
    ($($ty:ident => $variant:ident),* $(,)?) => {
        $(impl From<$ty> for Reply {
            fn from(data: $ty) -> Self {
                Self::$variant(data.into())
            }
        })*
    };
}

reply_from! {
    Done => Done, Pong => Pong, Channels => Channels, Joined => Joined,
    Capabilities => Capabilities, Transport => Transport, Producer => Producer,
    Consumer => Consumer, FloorAnswer => Floor, EmergencyStarted => EmergencyStarted,
    EmergencyStopped => EmergencyStopped, SyncEnvelope => Sync, SyncDeleted => SyncDeleted,
    TokenRefreshed => TokenRefreshed, IceServers => IceServers,
}

/// `get-ice-servers`: the relays the client may use, with credentials for this user.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IceServers {
    /// For `RTCConfiguration.iceServers`; empty when the deployment has no relay.
    pub ice_servers: Vec<IceServer>,
    /// When the credentials stop working, in ms since the Unix epoch; absent without relays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
}

/// `refresh-token`: the socket now lives until the new token's `exp` (plus the leeway).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenRefreshed {
    /// The new token's `exp`, in ms since the Unix epoch.
    pub expires_at: i64,
}

/// `{}`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Done {}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pong {
    pub server_time: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Channels {
    pub channels: Vec<ChannelSummary>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChannelSummary {
    pub channel_id: String,
    pub speaker: Option<User>,
    pub busy: bool,
    pub member_count: usize,
    pub role: Role,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Joined {
    pub channel: ChannelState,
    pub role: Role,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Capabilities {
    pub codecs: Vec<Codec>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Codec {
    pub mime_type: String,
    pub clock_rate: u32,
    pub channels: u32,
    pub payload_type: u32,
    pub fmtp: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Transport {
    pub transport_id: String,
    pub offer: Offer,
    /// The relays for this transport's peer connection (as `get-ice-servers` gives them);
    /// absent when the deployment has none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ice_servers: Vec<IceServer>,
}

/// `{type: "offer", sdp}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Offer {
    /// Always `offer`.
    #[serde(rename = "type")]
    pub kind: String,
    pub sdp: String,
}

impl Offer {
    pub fn new(sdp: String) -> Self {
        Self {
            kind: "offer".into(),
            sdp,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Producer {
    pub producer_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Consumer {
    pub consumer_id: String,
    /// Always `audio`.
    pub kind: String,
    pub ssrc: u32,
}

impl Consumer {
    pub fn audio(consumer_id: String, ssrc: u32) -> Self {
        Self {
            consumer_id,
            kind: "audio".into(),
            ssrc,
        }
    }
}

/// The answer to a `ptt-start` or `priority-ptt-start`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FloorAnswer {
    /// `{granted: true, epoch, expiresAt, maxTalkMs}`.
    Granted(Granted),
    /// `{granted: false, queued: true, position, speaker}`.
    Queued(Queued),
    /// `{granted: false, speaker, retryAfterMs}`; the requester also gets `ptt-denied`.
    Denied(Denied),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Granted {
    /// Always `true`.
    pub granted: bool,
    pub epoch: u64,
    pub expires_at: i64,
    pub max_talk_ms: u32,
}

impl Granted {
    pub fn new(epoch: u64, expires_at: i64, max_talk_ms: u32) -> Self {
        Self {
            granted: true,
            epoch,
            expires_at,
            max_talk_ms,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Queued {
    /// Always `false`.
    pub granted: bool,
    /// Always `true`.
    pub queued: bool,
    pub position: u32,
    pub speaker: Option<User>,
}

impl Queued {
    pub fn new(position: u32, speaker: Option<User>) -> Self {
        Self {
            granted: false,
            queued: true,
            position,
            speaker,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Denied {
    /// Always `false`.
    pub granted: bool,
    pub speaker: Option<User>,
    pub retry_after_ms: i64,
}

impl Denied {
    pub fn new(speaker: Option<User>, retry_after_ms: i64) -> Self {
        Self {
            granted: false,
            speaker,
            retry_after_ms,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EmergencyStarted {
    pub event_id: String,
    pub channels: Vec<EmergencyChannel>,
}

/// A channel of a started broadcast: `{channelId, granted: false}` or `{channelId, granted:
/// true, epoch, expiresAt}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EmergencyChannel {
    pub channel_id: String,
    pub granted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EmergencyStopped {
    pub event_id: String,
    pub channels: Vec<ChannelEpoch>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChannelEpoch {
    pub channel_id: String,
    pub epoch: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncDeleted {
    pub session_id: String,
    pub version: u64,
}

/// One entry of a client's `RTCConfiguration.iceServers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServer {
    pub urls: Vec<String>,
    pub username: String,
    pub credential: String,
}

impl Reply {
    /// Reads the `data` of a reply of type `reply_type` (a request's type, or `pong`).
    pub fn decode(reply_type: &str, data: serde_json::Value) -> Result<Self, serde_json::Error> {
        use serde_json::from_value as read;
        Ok(match reply_type {
            "pong" => Self::Pong(read(data)?),
            "refresh-token" => Self::TokenRefreshed(read(data)?),
            "list-channels" => Self::Channels(read(data)?),
            "get-ice-servers" => Self::IceServers(read(data)?),
            "join-channel" => Self::Joined(read(data)?),
            "get-router-capabilities" => Self::Capabilities(read(data)?),
            "create-transport" | "restart-ice" => Self::Transport(read(data)?),
            "produce" => Self::Producer(read(data)?),
            "consume" => Self::Consumer(read(data)?),
            "ptt-start" | "priority-ptt-start" => Self::Floor(FloorAnswer::decode(data)?),
            "emergency-broadcast-start" => Self::EmergencyStarted(read(data)?),
            "emergency-broadcast-stop" => Self::EmergencyStopped(read(data)?),
            "sync-delete" => Self::SyncDeleted(read(data)?),
            "sync-create" | "sync-get" | "sync-start" | "sync-switch" | "sync-pause"
            | "sync-resume" | "sync-complete" | "sync-cancel" => Self::Sync(read(data)?),
            "leave-channel" | "connect-transport" | "ptt-stop" | "priority-ptt-stop" => {
                Self::Done(read(data)?)
            }
            other => {
                return Err(serde::de::Error::custom(format!(
                    "no reply has the type {other}"
                )));
            }
        })
    }
}

impl FloorAnswer {
    /// Reads a press's answer: granted, queued or denied, by its flags.
    pub fn decode(data: serde_json::Value) -> Result<Self, serde_json::Error> {
        let flag = |name: &str| data.get(name).and_then(serde_json::Value::as_bool);
        Ok(match (flag("granted"), flag("queued")) {
            (Some(true), _) => Self::Granted(serde_json::from_value(data)?),
            (Some(false), Some(true)) => Self::Queued(serde_json::from_value(data)?),
            (Some(false), _) => Self::Denied(serde_json::from_value(data)?),
            (None, _) => return Err(serde::de::Error::custom("a press answer without granted")),
        })
    }
}

//! Requests: every message a client may send, each wire name written once (in one table,
//! `messages!`). A client serialises a [`Request`] as the `type` and `data` of its frame (see
//! [`crate::ClientFrame`]).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChannelRef {
    pub channel_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateTransport {
    pub channel_id: String,
    pub direction: TransportDirection,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportDirection {
    Send,
    Recv,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionDescription {
    #[serde(rename = "type")]
    pub kind: String,
    pub sdp: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IceCandidate {
    pub candidate: String,
    #[serde(default)]
    pub sdp_mid: Option<String>,
    #[serde(default, rename = "sdpMLineIndex")]
    pub sdp_m_line_index: Option<u32>,
    /// What browsers' `RTCIceCandidate.toJSON()` adds; accepted and not needed (the candidate
    /// line names the ufrag).
    #[serde(default)]
    pub username_fragment: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectTransport {
    pub transport_id: String,
    #[serde(default)]
    pub answer: Option<SessionDescription>,
    #[serde(default)]
    pub candidate: Option<IceCandidate>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TransportRef {
    pub transport_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Produce {
    pub transport_id: String,
    pub channel_id: String,
    #[serde(default = "audio")]
    pub kind: String,
}

fn audio() -> String {
    "audio".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PttStart {
    pub channel_id: String,
    #[serde(default)]
    pub priority: Option<u32>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// The word an `emergency-broadcast-start` must carry in `confirm`, so that a stray or replayed
/// generic message cannot start a broadcast by accident.
pub const EMERGENCY_CONFIRM: &str = "EMERGENCY";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EmergencyStart {
    pub event_id: String,
    pub confirm: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventRef {
    pub event_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SyncParticipantSpec {
    pub participant_id: String,
    #[serde(default)]
    pub group_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SyncCreate {
    pub session_id: String,
    pub channel_id: String,
    /// per_participant, per_cycle, per_group, global or count_up.
    pub mode: String,
    pub participants: Vec<SyncParticipantSpec>,
    #[serde(default)]
    pub total_time_ms: i64,
    #[serde(default)]
    pub time_per_cycle_ms: i64,
    #[serde(default)]
    pub increment_ms: i64,
    #[serde(default)]
    pub max_time_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SyncRef {
    pub session_id: String,
    /// The version the client last saw; absent: whatever is current.
    #[serde(default)]
    pub expected_version: Option<u64>,
    /// `sync-switch` only: who is next (absent: the next in order).
    #[serde(default)]
    pub participant_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshToken {
    /// A newer JWT of the same user.
    pub token: String,
}

messages! {
    /// Every request a client may send.
    Request,
    "The wire names of every request.",
    {
    "refresh-token" => RefreshToken(RefreshToken),
    "join-channel" => JoinChannel(ChannelRef),
    "leave-channel" => LeaveChannel(ChannelRef),
    "get-router-capabilities" => GetRouterCapabilities(ChannelRef),
    "create-transport" => CreateTransport(CreateTransport),
    "connect-transport" => ConnectTransport(ConnectTransport),
    "restart-ice" => RestartIce(TransportRef),
    "produce" => Produce(Produce),
    "consume" => Consume(ChannelRef),
    "ptt-start" => PttStart(PttStart),
    "ptt-stop" => PttStop(ChannelRef),
    "ping" => Ping(Empty),
    "list-channels" => ListChannels(Empty),
    "get-ice-servers" => GetIceServers(Empty),
    "priority-ptt-start" => PriorityPttStart(ChannelRef),
    "priority-ptt-stop" => PriorityPttStop(ChannelRef),
    "emergency-broadcast-start" => EmergencyBroadcastStart(EmergencyStart),
    "emergency-broadcast-stop" => EmergencyBroadcastStop(EventRef),
    "sync-create" => SyncCreate(SyncCreate),
    "sync-get" => SyncGet(SyncRef),
    "sync-start" => SyncStart(SyncRef),
    "sync-switch" => SyncSwitch(SyncRef),
    "sync-pause" => SyncPause(SyncRef),
    "sync-resume" => SyncResume(SyncRef),
    "sync-complete" => SyncComplete(SyncRef),
    "sync-cancel" => SyncCancel(SyncRef),
    "sync-delete" => SyncDelete(SyncRef),
    }
}

impl Request {
    /// The `type` of its reply: the request's own, but `pong` for `ping`.
    pub fn reply_type(&self) -> &'static str {
        match self {
            Self::Ping(_) => "pong",
            other => other.name(),
        }
    }

    /// The channel whose floor it asks for or gives up, if it is a floor request.
    pub fn floor_channel(&self) -> Option<&str> {
        match self {
            Self::PttStart(PttStart { channel_id, .. })
            | Self::PttStop(ChannelRef { channel_id })
            | Self::PriorityPttStart(ChannelRef { channel_id })
            | Self::PriorityPttStop(ChannelRef { channel_id }) => Some(channel_id),
            _ => None,
        }
    }
}

//! The client protocol on the wire: `{"type", "id", "data"}` envelopes, typed requests, replies,
//! pushes and the stable error codes. See `docs/protocol.md`.

use std::collections::HashSet;

use axum::extract::ws::Utf8Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use talkgroup_proto::state::v1 as spb;

/// Largest frame a client may send; a larger one gets a `BAD_REQUEST` reply.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;
/// Largest frame read at all; past this the socket is closed (1009).
pub const HARD_FRAME_LIMIT: usize = 256 * 1024;
/// Read buffer per socket; it grows for larger frames.
pub const READ_BUFFER_BYTES: usize = 4 * 1024;
/// Longest request id echoed back.
const MAX_ID_CHARS: usize = 128;

/// Stable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Code {
    Unauthenticated,
    Forbidden,
    NotFound,
    BadRequest,
    FloorBusy,
    /// An optimistic-lock mismatch (sync sessions): `expectedVersion` and `actualVersion` say
    /// which.
    Conflict,
    RateLimited,
    Unavailable,
    Internal,
}

impl Code {
    /// The wire name, for metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unauthenticated => "UNAUTHENTICATED",
            Self::Forbidden => "FORBIDDEN",
            Self::NotFound => "NOT_FOUND",
            Self::BadRequest => "BAD_REQUEST",
            Self::FloorBusy => "FLOOR_BUSY",
            Self::Conflict => "CONFLICT",
            Self::RateLimited => "RATE_LIMITED",
            Self::Unavailable => "UNAVAILABLE",
            Self::Internal => "INTERNAL",
        }
    }
}

/// An error for the client: a code and a safe, fixed message.
#[derive(Debug, Clone, Serialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ClientError {
    pub code: Code,
    pub message: &'static str,
    /// Version conflicts: what the client expected and what is stored.
    #[serde(rename = "expectedVersion", skip_serializing_if = "Option::is_none")]
    pub expected_version: Option<u64>,
    #[serde(rename = "actualVersion", skip_serializing_if = "Option::is_none")]
    pub actual_version: Option<u64>,
}

impl ClientError {
    pub const fn new(code: Code, message: &'static str) -> Self {
        Self {
            code,
            message,
            expected_version: None,
            actual_version: None,
        }
    }
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        match status.code() {
            tonic::Code::InvalidArgument => Self::new(Code::BadRequest, "invalid request"),
            tonic::Code::NotFound => Self::new(Code::NotFound, "not found"),
            tonic::Code::FailedPrecondition => {
                Self::new(Code::Forbidden, "not allowed in this state")
            }
            tonic::Code::PermissionDenied => Self::new(Code::Forbidden, "forbidden"),
            tonic::Code::ResourceExhausted => Self::new(Code::RateLimited, "capacity exhausted"),
            tonic::Code::Aborted if status.message() == "version conflict" => {
                let version = |key: &str| {
                    status
                        .metadata()
                        .get(key)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok())
                };
                Self {
                    expected_version: version("expected-version"),
                    actual_version: version("actual-version"),
                    ..Self::new(Code::Conflict, "version conflict")
                }
            }
            tonic::Code::Aborted => Self::new(Code::FloorBusy, "an emergency broadcast is active"),
            tonic::Code::AlreadyExists => Self::new(Code::BadRequest, "already exists"),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                Self::new(Code::Unavailable, "service unavailable")
            }
            _ => {
                tracing::warn!(code = ?status.code(), "backend call failed");
                Self::new(Code::Internal, "internal error")
            }
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChannelRef {
    pub channel_id: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateTransport {
    pub channel_id: String,
    pub direction: TransportDirection,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportDirection {
    Send,
    Recv,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SessionDescription {
    #[serde(rename = "type")]
    pub kind: String,
    pub sdp: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IceCandidate {
    pub candidate: String,
    #[serde(default)]
    pub sdp_mid: Option<String>,
    #[serde(default, rename = "sdpMLineIndex")]
    pub sdp_m_line_index: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectTransport {
    pub transport_id: String,
    #[serde(default)]
    pub answer: Option<SessionDescription>,
    #[serde(default)]
    pub candidate: Option<IceCandidate>,
}

#[derive(Debug, Clone, Deserialize)]
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

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PttStart {
    pub channel_id: String,
    #[serde(default)]
    pub priority: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// The word an `emergency-broadcast-start` must carry in `confirm`, so that a stray or replayed
/// generic message cannot start a broadcast by accident.
pub const EMERGENCY_CONFIRM: &str = "EMERGENCY";

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EmergencyStart {
    pub event_id: String,
    pub confirm: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventRef {
    pub event_id: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SyncParticipantSpec {
    pub participant_id: String,
    #[serde(default)]
    pub group_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
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

#[derive(Debug, Clone, Deserialize)]
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

/// Every request a client may send.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "kebab-case")]
pub enum Request {
    JoinChannel(ChannelRef),
    LeaveChannel(ChannelRef),
    GetRouterCapabilities(ChannelRef),
    CreateTransport(CreateTransport),
    ConnectTransport(ConnectTransport),
    Produce(Produce),
    Consume(ChannelRef),
    PttStart(PttStart),
    PttStop(ChannelRef),
    Ping(Empty),
    ListChannels(Empty),
    PriorityPttStart(ChannelRef),
    PriorityPttStop(ChannelRef),
    EmergencyBroadcastStart(EmergencyStart),
    EmergencyBroadcastStop(EventRef),
    SyncCreate(SyncCreate),
    SyncGet(SyncRef),
    SyncStart(SyncRef),
    SyncSwitch(SyncRef),
    SyncPause(SyncRef),
    SyncResume(SyncRef),
    SyncComplete(SyncRef),
    SyncCancel(SyncRef),
    SyncDelete(SyncRef),
}

impl Request {
    /// The wire name, for replies.
    pub fn name(&self) -> &'static str {
        match self {
            Self::JoinChannel(_) => "join-channel",
            Self::LeaveChannel(_) => "leave-channel",
            Self::GetRouterCapabilities(_) => "get-router-capabilities",
            Self::CreateTransport(_) => "create-transport",
            Self::ConnectTransport(_) => "connect-transport",
            Self::Produce(_) => "produce",
            Self::Consume(_) => "consume",
            Self::PttStart(_) => "ptt-start",
            Self::PttStop(_) => "ptt-stop",
            Self::Ping(_) => "pong",
            Self::ListChannels(_) => "list-channels",
            Self::PriorityPttStart(_) => "priority-ptt-start",
            Self::PriorityPttStop(_) => "priority-ptt-stop",
            Self::EmergencyBroadcastStart(_) => "emergency-broadcast-start",
            Self::EmergencyBroadcastStop(_) => "emergency-broadcast-stop",
            Self::SyncCreate(_) => "sync-create",
            Self::SyncGet(_) => "sync-get",
            Self::SyncStart(_) => "sync-start",
            Self::SyncSwitch(_) => "sync-switch",
            Self::SyncPause(_) => "sync-pause",
            Self::SyncResume(_) => "sync-resume",
            Self::SyncComplete(_) => "sync-complete",
            Self::SyncCancel(_) => "sync-cancel",
            Self::SyncDelete(_) => "sync-delete",
        }
    }
}

const KNOWN: [&str; 24] = [
    "sync-create",
    "sync-get",
    "sync-start",
    "sync-switch",
    "sync-pause",
    "sync-resume",
    "sync-complete",
    "sync-cancel",
    "sync-delete",
    "priority-ptt-start",
    "priority-ptt-stop",
    "emergency-broadcast-start",
    "emergency-broadcast-stop",
    "join-channel",
    "leave-channel",
    "get-router-capabilities",
    "create-transport",
    "connect-transport",
    "produce",
    "consume",
    "ptt-start",
    "ptt-stop",
    "ping",
    "list-channels",
];

/// A parsed frame: the request, or why it was refused; with the id to answer to.
#[derive(Debug)]
pub struct Parsed {
    pub id: Option<String>,
    pub request: Result<Request, ClientError>,
}

/// Parses one text frame.
pub fn parse(text: &str) -> Parsed {
    if text.len() > MAX_FRAME_BYTES {
        return Parsed {
            id: None,
            request: Err(ClientError::new(Code::BadRequest, "frame too large")),
        };
    }
    let Ok(mut value) = serde_json::from_str::<Value>(text) else {
        return Parsed {
            id: None,
            request: Err(ClientError::new(Code::BadRequest, "invalid JSON")),
        };
    };
    let Some(object) = value.as_object_mut() else {
        return Parsed {
            id: None,
            request: Err(ClientError::new(Code::BadRequest, "expected an object")),
        };
    };
    let id = match object.remove("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.chars().count() <= MAX_ID_CHARS => Some(s),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(_) => {
            return Parsed {
                id: None,
                request: Err(ClientError::new(Code::BadRequest, "invalid id")),
            };
        }
    };
    let kind = object
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if !KNOWN.contains(&kind.as_str()) {
        return Parsed {
            id,
            request: Err(ClientError::new(Code::BadRequest, "unknown message type")),
        };
    }
    object
        .entry("data")
        .or_insert_with(|| Value::Object(Default::default()));
    let request = serde_json::from_value::<Request>(value)
        .map_err(|_| ClientError::new(Code::BadRequest, "missing or invalid fields"));
    Parsed { id, request }
}

/// A frame to the client.
#[derive(Debug, Clone, Serialize)]
pub struct Frame {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ClientError>,
}

impl Frame {
    /// The frame as a WebSocket text message body, encoded once and shared by every receiver.
    pub fn encode(&self) -> Option<Utf8Bytes> {
        match serde_json::to_string(self) {
            Ok(text) => Some(text.into()),
            Err(error) => {
                tracing::error!(%error, kind = self.kind, "cannot encode a frame");
                None
            }
        }
    }

    pub fn reply(kind: &'static str, id: Option<String>, data: Value) -> Self {
        Self {
            kind,
            id,
            data: Some(data),
            error: None,
        }
    }

    pub fn push(kind: &'static str, data: Value) -> Self {
        Self {
            kind,
            id: None,
            data: Some(data),
            error: None,
        }
    }

    pub fn error(id: Option<String>, error: ClientError) -> Self {
        Self {
            kind: "error",
            id,
            data: None,
            error: Some(error),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct User {
    pub user_id: String,
    pub user_name: String,
}

/// `{userId, userName}` of a floor holder, or null.
pub fn user_of(holder: &spb::FloorHolder) -> Value {
    holder
        .speaker
        .as_ref()
        .map(|s| json!({"userId": s.user_id, "userName": s.user_name}))
        .unwrap_or(Value::Null)
}

/// The `ChannelState` object; members are listed once per user.
pub fn channel_state(state: &spb::ChannelState) -> Value {
    let mut seen = HashSet::new();
    let members: Vec<Value> = state
        .members
        .iter()
        .filter(|m| seen.insert(m.user_id.clone()))
        .map(|m| json!({"userId": m.user_id, "userName": m.user_name}))
        .collect();
    json!({
        "channelId": state.channel_id,
        "speaker": state.holder.as_ref().map(user_of),
        "members": members,
        "busy": state.busy,
        "epoch": state.epoch,
    })
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
        spb::FloorReason::Unspecified => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_with_and_without_data() {
        let p = parse(r#"{"type":"ping","id":"7"}"#);
        assert_eq!(p.id.as_deref(), Some("7"));
        assert!(matches!(p.request, Ok(Request::Ping(_))));
        let p = parse(r#"{"type":"ptt-start","id":1,"data":{"channelId":"ops","priority":5}}"#);
        assert!(matches!(
            p.request,
            Ok(Request::PttStart(PttStart {
                priority: Some(5),
                ..
            }))
        ));
    }

    #[test]
    fn bad_frames_get_stable_codes() {
        for (frame, message) in [
            ("not json", "invalid JSON"),
            (r#"{"type":"fly","id":"1"}"#, "unknown message type"),
            (
                r#"{"type":"join-channel","id":"1","data":{}}"#,
                "missing or invalid fields",
            ),
            (
                r#"{"type":"join-channel","data":{"channelId":"a","x":1}}"#,
                "missing or invalid fields",
            ),
        ] {
            let p = parse(frame);
            let err = p.request.unwrap_err();
            assert_eq!(
                (err.code, err.message),
                (Code::BadRequest, message),
                "{frame}"
            );
        }
        assert_eq!(
            parse(r#"{"type":"fly","id":"1"}"#).id.as_deref(),
            Some("1"),
            "id still echoed"
        );
    }

    #[test]
    fn frames_serialize_as_documented() {
        let f = Frame::error(
            Some("9".into()),
            ClientError::new(Code::FloorBusy, "floor busy"),
        );
        assert_eq!(
            serde_json::to_string(&f).unwrap(),
            r#"{"type":"error","id":"9","error":{"code":"FLOOR_BUSY","message":"floor busy"}}"#
        );
    }
}

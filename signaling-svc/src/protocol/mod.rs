//! The gateway's side of the client protocol. The protocol's types (every request, reply,
//! push, error and close code) are the `talkgroup-wire` crate, shared with clients; here is
//! what only the server does with them:
//!
//! - [`parse`] reads a client's frame, refusing hostile input with stable codes;
//! - [`Frame`] encodes one frame to a client, once for every receiver;
//! - [`view`] and [`sync`] build the wire's objects from state-svc's messages;
//! - [`error`]: the gateway's refusal and the one translation of a backend refusal.
//!
//! See `docs/protocol.md`.

pub mod error;
pub mod sync;
pub mod view;

pub use talkgroup_wire::{push, reply, request};

use axum::extract::ws::Utf8Bytes;
use serde::Serialize;
use serde::ser::SerializeMap;
use serde_json::Value;

pub use error::{ClientError, err};
pub use talkgroup_wire::request::*;
pub use talkgroup_wire::{ChannelState, Code, FloorReason, Push, Reply, User};
pub use view::{channel_state, reason, speaking};

/// Largest frame a client may send; a larger one gets a `BAD_REQUEST` reply.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;
/// Largest frame read at all; past this the socket is closed (1009).
pub const HARD_FRAME_LIMIT: usize = 256 * 1024;
/// Read buffer per socket; it grows for larger frames.
pub const READ_BUFFER_BYTES: usize = 4 * 1024;
/// Longest request id echoed back.
const MAX_ID_CHARS: usize = 128;

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
    if !request::KNOWN.contains(&kind.as_str()) {
        return Parsed {
            id,
            request: Err(ClientError::new(Code::BadRequest, "unknown message type")),
        };
    }
    if object.keys().any(|k| k != "type" && k != "data") {
        return Parsed {
            id,
            request: Err(ClientError::new(Code::BadRequest, "unknown envelope field")),
        };
    }
    match object.get("data") {
        None => {
            object.insert("data".into(), Value::Object(Default::default()));
        }
        Some(Value::Object(_)) => {}
        Some(_) => {
            return Parsed {
                id,
                request: Err(ClientError::new(Code::BadRequest, "data must be an object")),
            };
        }
    }
    let request = serde_json::from_value::<Request>(value)
        .map_err(|_| ClientError::new(Code::BadRequest, "missing or invalid fields"));
    Parsed { id, request }
}

/// A frame to the client.
#[derive(Debug, Clone)]
pub enum Frame {
    /// `{type, id?, data}`: the answer to a request.
    Reply {
        kind: &'static str,
        id: Option<String>,
        data: Reply,
    },
    /// `{type, data}`.
    Push(Push),
    /// `{type: "error", id?, error}`: a refused request, or a refused frame without an id.
    Error {
        id: Option<String>,
        error: ClientError,
    },
}

impl Frame {
    /// The frame as a WebSocket text message body, encoded once and shared by every receiver.
    pub fn encode(&self) -> Option<Utf8Bytes> {
        match serde_json::to_string(self) {
            Ok(text) => Some(text.into()),
            Err(error) => {
                tracing::error!(%error, "cannot encode a frame");
                None
            }
        }
    }

    pub fn reply(kind: &'static str, id: Option<String>, data: Reply) -> Self {
        Self::Reply { kind, id, data }
    }

    pub fn error(id: Option<String>, error: ClientError) -> Self {
        Self::Error { id, error }
    }
}

impl From<Push> for Frame {
    fn from(push: Push) -> Self {
        Self::Push(push)
    }
}

impl Serialize for Frame {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let (kind, id) = match self {
            Self::Push(push) => return push.serialize(serializer),
            Self::Reply { kind, id, .. } => (*kind, id),
            Self::Error { id, .. } => ("error", id),
        };
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("type", kind)?;
        if let Some(id) = id {
            map.serialize_entry("id", id)?;
        }
        match self {
            Self::Reply { data, .. } => map.serialize_entry("data", data)?,
            Self::Error { error, .. } => map.serialize_entry("error", &error.body())?,
            Self::Push(_) => {}
        }
        map.end()
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
    fn the_envelope_and_nested_objects_refuse_what_they_do_not_know() {
        for (frame, message) in [
            (
                r#"{"type":"ping","id":"1","data":{},"extra":true}"#,
                "unknown envelope field",
            ),
            (
                r#"{"type":"join-channel","id":"1","data":["ops"]}"#,
                "data must be an object",
            ),
            (
                r#"{"type":"ping","id":"1","data":null}"#,
                "data must be an object",
            ),
            (
                r#"{"type":"connect-transport","id":"1","data":{"transportId":"t","answer":{"type":"answer","sdp":"v=0","x":1}}}"#,
                "missing or invalid fields",
            ),
            (
                r#"{"type":"connect-transport","id":"1","data":{"transportId":"t","candidate":{"candidate":"c","foo":1}}}"#,
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
            assert_eq!(p.id.as_deref(), Some("1"), "id still echoed: {frame}");
        }
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

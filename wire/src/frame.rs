//! Whole frames: what a client sends ([`ClientFrame`]) and what it reads ([`ServerFrame`]).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ErrorBody;
use crate::push::{self, Push};
use crate::reply::Reply;
use crate::request::Request;

/// A request as a client sends it: `{"type", "id"?, "data"}`.
#[derive(Debug, Clone, Serialize)]
pub struct ClientFrame {
    #[serde(flatten)]
    pub request: Request,
    /// Echoed in the reply; without one, a request gets no reply to match.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl ClientFrame {
    pub fn new(id: impl Into<String>, request: Request) -> Self {
        Self {
            request,
            id: Some(id.into()),
        }
    }

    /// The frame's text.
    pub fn encode(&self) -> String {
        // Invariant: every request is plain data with string keys; encoding cannot fail.
        serde_json::to_string(self).expect("a request encodes")
    }
}

/// A frame from the server, read into its type.
#[derive(Debug, Clone)]
pub enum ServerFrame {
    /// The answer to a request: `type` is the request's (`pong` for `ping`).
    Reply {
        kind: String,
        id: Option<String>,
        data: Reply,
    },
    Push(Push),
    /// A refused request (with its id), or a refused frame (without one).
    Error {
        id: Option<String>,
        error: ErrorBody,
    },
}

#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    error: Option<ErrorBody>,
}

impl ServerFrame {
    /// Reads a frame's text; an error for anything the protocol does not define.
    pub fn decode(text: &str) -> Result<Self, serde_json::Error> {
        let raw: Raw = serde_json::from_str(text)?;
        if raw.kind == "error" {
            let error = raw
                .error
                .ok_or_else(|| serde::de::Error::custom("an error frame without error"))?;
            return Ok(Self::Error { id: raw.id, error });
        }
        let data = raw
            .data
            .unwrap_or_else(|| Value::Object(Default::default()));
        if raw.id.is_none() && push::KNOWN.contains(&raw.kind.as_str()) {
            let push = serde_json::json!({"type": raw.kind, "data": data});
            return Ok(Self::Push(serde_json::from_value(push)?));
        }
        Ok(Self::Reply {
            data: Reply::decode(&raw.kind, data)?,
            kind: raw.kind,
            id: raw.id,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::request::{ChannelRef, PttStart};
    use crate::{Code, FloorReason};

    #[test]
    fn requests_encode_as_the_gateway_reads_them() {
        let frame = ClientFrame::new(
            "7",
            Request::PttStart(PttStart {
                channel_id: "ops".into(),
                priority: None,
            }),
        );
        let value: Value = serde_json::from_str(&frame.encode()).unwrap();
        assert_eq!(value["type"], "ptt-start");
        assert_eq!(value["id"], "7");
        assert_eq!(value["data"]["channelId"], "ops");
        let back: Request = serde_json::from_value(serde_json::json!({
            "type": "join-channel", "data": {"channelId": "ops"}
        }))
        .unwrap();
        assert!(
            matches!(back, Request::JoinChannel(ChannelRef { channel_id }) if channel_id == "ops")
        );
    }

    #[test]
    fn server_frames_read_into_their_types() {
        let reply = ServerFrame::decode(
            r#"{"type":"ptt-start","id":"7","data":{"granted":true,"epoch":5,"expiresAt":9,"maxTalkMs":60000}}"#,
        )
        .unwrap();
        assert!(matches!(
            reply,
            ServerFrame::Reply { data: Reply::Floor(crate::reply::FloorAnswer::Granted(g)), .. } if g.epoch == 5
        ));
        let push = ServerFrame::decode(
            r#"{"type":"speaker-changed","data":{"channelId":"ops","speaker":null,"epoch":6,"reason":"lease-expired"}}"#,
        )
        .unwrap();
        assert!(matches!(
            push,
            ServerFrame::Push(Push::SpeakerChanged(s)) if s.reason == FloorReason::LeaseExpired
        ));
        let error = ServerFrame::decode(
            r#"{"type":"error","id":"8","error":{"code":"FLOOR_BUSY","message":"busy"}}"#,
        )
        .unwrap();
        assert!(matches!(error, ServerFrame::Error { error, .. } if error.code == Code::FloorBusy));
        assert!(ServerFrame::decode(r#"{"type":"no-such-push","data":{}}"#).is_err());
    }
}

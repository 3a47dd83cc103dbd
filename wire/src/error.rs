//! The stable error codes of `error` replies, and the WebSocket close codes.

use serde::{Deserialize, Serialize};

/// Stable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
    /// A quota of the user, socket or channel is used up (the message says which).
    LimitExceeded,
    Unavailable,
    Internal,
}

impl Code {
    /// Every code, in the order `docs/protocol.md` lists them.
    pub const ALL: [Code; 10] = [
        Self::Unauthenticated,
        Self::Forbidden,
        Self::NotFound,
        Self::BadRequest,
        Self::FloorBusy,
        Self::Conflict,
        Self::RateLimited,
        Self::LimitExceeded,
        Self::Unavailable,
        Self::Internal,
    ];

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
            Self::LimitExceeded => "LIMIT_EXCEEDED",
            Self::Unavailable => "UNAVAILABLE",
            Self::Internal => "INTERNAL",
        }
    }
}

/// The `error` of an error reply: a code and a safe, fixed message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    pub code: Code,
    pub message: String,
    /// Version conflicts: what the client expected and what is stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_version: Option<u64>,
}

/// The codes a gateway closes a WebSocket with, and what each does to the session (see
/// `docs/protocol.md`, Closing).
pub mod close {
    /// The client closed, or the server closes normally.
    pub const NORMAL: u16 = 1000;
    /// Shutdown or no sign of life; also a socket lost without a close frame. The session is
    /// parked for a resume.
    pub const GOING_AWAY: u16 = 1001;
    /// The WebSocket protocol was broken.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text frame was not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// Too many refused requests in a row.
    pub const FLOOD: u16 = 1008;
    /// A frame over the hard size limit.
    pub const TOO_BIG: u16 = 1009;
    /// The session could not be set up (state-svc unavailable, grants unreadable).
    pub const UNAVAILABLE: u16 = 1011;
    /// An administrator disconnected the user (after a `force-disconnect` push).
    pub const KICKED: u16 = 4000;
    /// The token expired and no `refresh-token` came in time.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// The client read too slowly. The session is parked for a resume.
    pub const TOO_SLOW: u16 = 4002;
    /// The user has as many sessions as the deployment allows.
    pub const TOO_MANY_SESSIONS: u16 = 4003;
    /// state-svc no longer has the socket's session.
    pub const SESSION_ENDED: u16 = 4004;
    /// Another socket resumed the session.
    pub const TAKEN_OVER: u16 = 4005;

    /// Every close code the gateway sends.
    pub const ALL: [u16; 13] = [
        NORMAL,
        GOING_AWAY,
        PROTOCOL_ERROR,
        INVALID_DATA,
        FLOOD,
        TOO_BIG,
        UNAVAILABLE,
        KICKED,
        TOKEN_EXPIRED,
        TOO_SLOW,
        TOO_MANY_SESSIONS,
        SESSION_ENDED,
        TAKEN_OVER,
    ];
}

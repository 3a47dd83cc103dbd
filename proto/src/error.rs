//! Why a call was refused, carried across every gRPC hop in one typed form.
//!
//! A server turns its own error into a [`ServiceError`] and that into a `tonic::Status` once
//! (`Status::from`); the status carries the [`Reason`] in the `ptt-reason` metadata key, and a
//! version conflict its two versions in `expected-version` and `actual-version`. A client reads
//! it back once with [`ServiceError::decode`]. Nothing compares status messages: the message is
//! for people, the reason for code. A status without the key (one made by tonic itself, a
//! transport failure) is classified by its gRPC code alone.

use std::borrow::Cow;

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

/// Metadata key of the reason.
pub const REASON_KEY: &str = "ptt-reason";
/// Metadata key of a version conflict's expected version.
pub const EXPECTED_VERSION_KEY: &str = "expected-version";
/// Metadata key of a version conflict's stored version.
pub const ACTUAL_VERSION_KEY: &str = "actual-version";

/// Why a call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    /// The session is not a member of the channel.
    NotMember,
    /// The call is not allowed in the current state.
    FailedPrecondition,
    PermissionDenied,
    /// A capacity or quota is used up.
    Exhausted,
    /// The user has as many live sessions as the deployment allows.
    TooManySessions,
    /// The user, across their sessions, is in as many channels as the deployment allows.
    TooManyChannels,
    /// The channel has as many members as the deployment allows.
    ChannelFull,
    /// The channel, or the user, has as many open sync sessions as the deployment allows.
    TooManySyncs,
    /// An optimistic-lock mismatch; the status carries both versions.
    VersionConflict,
    /// An emergency broadcast holds the channel or event.
    EmergencyActive,
    /// No live media node can take the channel.
    NoMediaNode,
    /// The state store (Redis) is unreachable or too slow.
    StoreUnavailable,
    /// The service cannot serve now (draining, stopping, a transport it depends on failed).
    Unavailable,
    Internal,
}

/// The one table: every reason's wire name and gRPC code.
const REASONS: [(Reason, &str, Code); 17] = [
    (
        Reason::InvalidArgument,
        "invalid-argument",
        Code::InvalidArgument,
    ),
    (Reason::NotFound, "not-found", Code::NotFound),
    (Reason::AlreadyExists, "already-exists", Code::AlreadyExists),
    (Reason::NotMember, "not-member", Code::FailedPrecondition),
    (
        Reason::FailedPrecondition,
        "failed-precondition",
        Code::FailedPrecondition,
    ),
    (
        Reason::PermissionDenied,
        "permission-denied",
        Code::PermissionDenied,
    ),
    (Reason::Exhausted, "exhausted", Code::ResourceExhausted),
    (
        Reason::TooManySessions,
        "too-many-sessions",
        Code::ResourceExhausted,
    ),
    (
        Reason::TooManyChannels,
        "too-many-channels",
        Code::ResourceExhausted,
    ),
    (Reason::ChannelFull, "channel-full", Code::ResourceExhausted),
    (
        Reason::TooManySyncs,
        "too-many-syncs",
        Code::ResourceExhausted,
    ),
    (Reason::VersionConflict, "version-conflict", Code::Aborted),
    (Reason::EmergencyActive, "emergency-active", Code::Aborted),
    (Reason::NoMediaNode, "no-media-node", Code::Unavailable),
    (
        Reason::StoreUnavailable,
        "store-unavailable",
        Code::Unavailable,
    ),
    (Reason::Unavailable, "unavailable", Code::Unavailable),
    (Reason::Internal, "internal", Code::Internal),
];

impl Reason {
    fn row(self) -> (Reason, &'static str, Code) {
        // Invariant: REASONS has one row per variant (checked by a test).
        REASONS.into_iter().find(|(r, _, _)| *r == self).unwrap_or((
            Reason::Internal,
            "internal",
            Code::Internal,
        ))
    }

    /// The wire name, also used as a metrics label.
    pub fn as_str(self) -> &'static str {
        self.row().1
    }

    /// The gRPC code a status of this reason has.
    pub fn code(self) -> Code {
        self.row().2
    }

    pub fn parse(raw: &str) -> Option<Self> {
        REASONS
            .into_iter()
            .find(|(_, name, _)| *name == raw)
            .map(|(r, _, _)| r)
    }

    /// The reason of a status that carries none, from its gRPC code.
    pub fn of_code(code: Code) -> Self {
        match code {
            Code::InvalidArgument | Code::OutOfRange => Self::InvalidArgument,
            Code::NotFound => Self::NotFound,
            Code::AlreadyExists => Self::AlreadyExists,
            Code::FailedPrecondition => Self::FailedPrecondition,
            Code::PermissionDenied | Code::Unauthenticated => Self::PermissionDenied,
            Code::ResourceExhausted => Self::Exhausted,
            Code::Unavailable | Code::DeadlineExceeded => Self::Unavailable,
            _ => Self::Internal,
        }
    }
}

/// The two versions of an optimistic-lock mismatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conflict {
    /// What the caller expected.
    pub expected: u64,
    /// What is stored.
    pub actual: u64,
}

/// A refusal as it crosses a hop: a reason, a message safe to show, and a conflict's versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceError {
    pub reason: Reason,
    pub message: Cow<'static, str>,
    pub conflict: Option<Conflict>,
}

impl ServiceError {
    pub fn new(reason: Reason, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            reason,
            message: message.into(),
            conflict: None,
        }
    }

    pub fn conflict(conflict: Conflict) -> Self {
        Self {
            conflict: Some(conflict),
            ..Self::new(Reason::VersionConflict, "version conflict")
        }
    }

    /// Reads the refusal a status carries (see the module doc for statuses without one).
    pub fn decode(status: &Status) -> Self {
        let metadata = status.metadata();
        let text = |key: &str| metadata.get(key).and_then(|v| v.to_str().ok());
        let reason = text(REASON_KEY)
            .and_then(Reason::parse)
            .unwrap_or_else(|| Reason::of_code(status.code()));
        let version = |key: &str| text(key).and_then(|v| v.parse().ok());
        let conflict = match (version(EXPECTED_VERSION_KEY), version(ACTUAL_VERSION_KEY)) {
            (Some(expected), Some(actual)) if reason == Reason::VersionConflict => {
                Some(Conflict { expected, actual })
            }
            _ => None,
        };
        Self {
            reason,
            message: Cow::Owned(status.message().to_owned()),
            conflict,
        }
    }
}

impl std::fmt::Display for ServiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason.as_str(), self.message)
    }
}

impl std::error::Error for ServiceError {}

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Self {
        let mut status = Status::new(error.reason.code(), error.message.into_owned());
        let metadata = status.metadata_mut();
        metadata.insert(
            REASON_KEY,
            MetadataValue::from_static(error.reason.as_str()),
        );
        if let Some(c) = error.conflict {
            metadata.insert(EXPECTED_VERSION_KEY, MetadataValue::from(c.expected));
            metadata.insert(ACTUAL_VERSION_KEY, MetadataValue::from(c.actual));
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Reason; 13] = [
        Reason::InvalidArgument,
        Reason::NotFound,
        Reason::AlreadyExists,
        Reason::NotMember,
        Reason::FailedPrecondition,
        Reason::PermissionDenied,
        Reason::Exhausted,
        Reason::VersionConflict,
        Reason::EmergencyActive,
        Reason::NoMediaNode,
        Reason::StoreUnavailable,
        Reason::Unavailable,
        Reason::Internal,
    ];

    #[test]
    fn every_reason_survives_a_hop() {
        for reason in ALL {
            assert_eq!(reason.row().0, reason, "{reason:?} has its own row");
            let status = Status::from(ServiceError::new(reason, "said"));
            assert_eq!(status.code(), reason.code());
            let decoded = ServiceError::decode(&status);
            assert_eq!((decoded.reason, decoded.message.as_ref()), (reason, "said"));
        }
    }

    #[test]
    fn a_conflict_carries_both_versions() {
        let status = Status::from(ServiceError::conflict(Conflict {
            expected: 7,
            actual: 9,
        }));
        assert_eq!(status.code(), Code::Aborted);
        assert_eq!(
            ServiceError::decode(&status).conflict,
            Some(Conflict {
                expected: 7,
                actual: 9
            })
        );
    }

    #[test]
    fn a_status_without_a_reason_is_judged_by_its_code() {
        let decoded = ServiceError::decode(&Status::unavailable("tcp connect error"));
        assert_eq!(decoded.reason, Reason::Unavailable);
        let decoded = ServiceError::decode(&Status::aborted("version conflict"));
        assert_eq!(decoded.reason, Reason::Internal, "prose means nothing");
    }
}

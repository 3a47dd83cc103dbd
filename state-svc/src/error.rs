//! The one error type of the state service, and its one mapping to the typed reasons of
//! [`talkgroup_proto::error`] that every caller decodes.
//!
//! Messages sent to callers are fixed strings: the source of an internal error is logged, never
//! returned.

use std::sync::LazyLock;

use prometheus_client::metrics::counter::Counter;
use talkgroup_proto::error::{Conflict, Reason, ServiceError};
use tonic::Status;

/// Redis calls that failed for want of Redis (unreachable or too slow), for `/metrics`; counted
/// at the store's call boundary.
pub static STORE_ERRORS: LazyLock<Counter> = LazyLock::new(Counter::default);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("session is not a member of the channel")]
    NotMember,
    #[error("no live media node")]
    NoMediaNode,
    /// An emergency broadcast holds the event or channel.
    #[error("emergency active on the event")]
    EmergencyActive,
    #[error("permission denied: {0}")]
    PermissionDenied(&'static str),
    #[error("not allowed in this state: {0}")]
    FailedPrecondition(&'static str),
    /// An optimistic-lock mismatch: the caller expected another version.
    #[error("version conflict: expected {expected}, actual {actual}")]
    Conflict { expected: u64, actual: u64 },
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl StoreError {
    /// A Redis failure, classified: the connection or the time bound failed (unavailable: the
    /// caller may retry), or Redis answered with an error (a script or protocol fault: internal).
    pub fn redis(error: &redis::RedisError) -> Self {
        if error.is_io_error()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
            || error.is_timeout()
            || error.is_unrecoverable_error()
        {
            Self::Unavailable(error.to_string())
        } else {
            Self::Internal(format!("redis: {error}"))
        }
    }

    /// The reason callers see, the one table from store errors to the wire.
    fn reason(&self) -> Reason {
        match self {
            Self::InvalidArgument(_) => Reason::InvalidArgument,
            Self::NotFound(_) => Reason::NotFound,
            Self::NotMember => Reason::NotMember,
            Self::NoMediaNode => Reason::NoMediaNode,
            Self::EmergencyActive => Reason::EmergencyActive,
            Self::PermissionDenied(_) => Reason::PermissionDenied,
            Self::FailedPrecondition(_) => Reason::FailedPrecondition,
            Self::Conflict { .. } => Reason::VersionConflict,
            Self::Unavailable(_) => Reason::StoreUnavailable,
            Self::Internal(_) => Reason::Internal,
        }
    }
}

impl From<StoreError> for ServiceError {
    fn from(error: StoreError) -> Self {
        let reason = error.reason();
        match error {
            StoreError::InvalidArgument(what)
            | StoreError::PermissionDenied(what)
            | StoreError::FailedPrecondition(what) => Self::new(reason, what),
            StoreError::NotFound(what) => Self::new(reason, format!("{what} not found")),
            StoreError::NotMember | StoreError::NoMediaNode | StoreError::EmergencyActive => {
                Self::new(reason, error.to_string())
            }
            StoreError::Conflict { expected, actual } => {
                Self::conflict(Conflict { expected, actual })
            }
            // The source stays in the log; the caller gets a fixed message.
            StoreError::Unavailable(_) => {
                tracing::warn!(%error, "state store unavailable");
                Self::new(reason, "state store unavailable")
            }
            StoreError::Internal(_) => {
                tracing::error!(%error, "internal error");
                Self::new(reason, "internal error")
            }
        }
    }
}

impl From<StoreError> for Status {
    fn from(error: StoreError) -> Self {
        ServiceError::from(error).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_details_never_reach_the_caller() {
        let status = Status::from(StoreError::Unavailable(
            "connection refused 10.0.0.7:6379".into(),
        ));
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(
            ServiceError::decode(&status).reason,
            Reason::StoreUnavailable
        );
        assert!(!status.message().contains("10.0.0.7"));
        let status = Status::from(StoreError::Internal("bad json at byte 7".into()));
        assert_eq!(status.message(), "internal error");
    }
}

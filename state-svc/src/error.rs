//! The one error type of the state service, and its one mapping to gRPC status codes.
//!
//! Messages sent to callers are fixed strings: the source of an internal error is logged, never
//! returned.

use std::sync::LazyLock;

use prometheus_client::metrics::counter::Counter;
use tonic::{Code, Status};

/// Store calls that failed `Unavailable` (Redis unreachable or too slow), for `/metrics`.
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
    /// The thing is held by someone else (an emergency broadcast).
    #[error("busy: {0}")]
    Busy(&'static str),
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

impl From<redis::RedisError> for StoreError {
    fn from(error: redis::RedisError) -> Self {
        Self::Unavailable(error.to_string())
    }
}

impl From<StoreError> for Status {
    fn from(error: StoreError) -> Self {
        let (code, message): (Code, String) = match &error {
            StoreError::InvalidArgument(what) => (Code::InvalidArgument, (*what).to_owned()),
            StoreError::NotFound(what) => (Code::NotFound, format!("{what} not found")),
            StoreError::NotMember => (Code::FailedPrecondition, error.to_string()),
            StoreError::NoMediaNode => (Code::Unavailable, error.to_string()),
            StoreError::Busy(what) => (Code::Aborted, (*what).to_owned()),
            StoreError::PermissionDenied(what) => (Code::PermissionDenied, (*what).to_owned()),
            StoreError::FailedPrecondition(what) => (Code::FailedPrecondition, (*what).to_owned()),
            StoreError::Conflict { expected, actual } => {
                let mut status = Status::aborted("version conflict");
                let metadata = status.metadata_mut();
                if let (Ok(e), Ok(a)) = (expected.to_string().parse(), actual.to_string().parse()) {
                    metadata.insert("expected-version", e);
                    metadata.insert("actual-version", a);
                }
                return status;
            }
            StoreError::Unavailable(_) => {
                STORE_ERRORS.inc();
                tracing::warn!(%error, "state store unavailable");
                (Code::Unavailable, "state store unavailable".to_owned())
            }
            StoreError::Internal(_) => {
                tracing::error!(%error, "internal error");
                (Code::Internal, "internal error".to_owned())
            }
        };
        Status::new(code, message)
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
        assert_eq!(status.code(), Code::Unavailable);
        assert!(!status.message().contains("10.0.0.7"));
        let status = Status::from(StoreError::Internal("bad json at byte 7".into()));
        assert_eq!(status.message(), "internal error");
    }
}

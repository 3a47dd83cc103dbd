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
    /// The user has `--max-sessions-per-user` live sessions.
    #[error("too many sessions for this user")]
    TooManySessions,
    /// The user is in `--max-channels-per-user` channels.
    #[error("too many channels joined by this user")]
    TooManyChannels,
    /// The channel, or the user, has as many open sync sessions as allowed.
    #[error("too many sync sessions")]
    TooManySyncs,
    /// The channel has `--max-members-per-channel` members.
    #[error("the channel is full")]
    ChannelFull,
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl StoreError {
    /// A Redis failure, classified: a failure that goes away by itself (the connection broke or
    /// timed out, Redis is loading, a failover is under way) is unavailable and the caller may
    /// retry; a failure that a retry would repeat (a script error, a wrong reply type, a refused
    /// permission) is internal.
    pub fn redis(error: &redis::RedisError) -> Self {
        if matches!(error.retry_method(), redis::RetryMethod::NoRetry) {
            Self::Internal(format!("redis: {error}"))
        } else {
            Self::Unavailable(error.to_string())
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
            Self::TooManySessions => Reason::TooManySessions,
            Self::TooManyChannels => Reason::TooManyChannels,
            Self::ChannelFull => Reason::ChannelFull,
            Self::TooManySyncs => Reason::TooManySyncs,
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
            StoreError::NotMember
            | StoreError::NoMediaNode
            | StoreError::EmergencyActive
            | StoreError::TooManySessions
            | StoreError::TooManyChannels
            | StoreError::ChannelFull
            | StoreError::TooManySyncs => Self::new(reason, error.to_string()),
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

/// A configuration that cannot be used; `main` exits with code 64.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("the redis store needs --redis-url (PTT_STATE_REDIS_URL)")]
    MissingRedisUrl,
    #[error("{0} must be between {1} and {2}")]
    OutOfRange(&'static str, u32, u32),
    #[error("key prefix must be 1 to 64 characters without braces or spaces")]
    BadKeyPrefix,
    #[error("membership channel must be 1 to 128 printable characters without spaces")]
    BadMembershipChannel,
    #[error("admin token must be 16 to 512 printable characters without spaces")]
    BadAdminToken,
    #[error("{0}")]
    Tls(String),
    #[error("--redis-url is not a redis:// or rediss:// URL")]
    BadRedisUrl,
    #[error("--postgres-url is not a PostgreSQL URL")]
    BadPostgresUrl,
    #[error("{0} TLS: {1}")]
    StoreTls(&'static str, String),
    #[error("{0} ({1}): {2}")]
    Secret(&'static str, String, String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_failures_that_pass_are_unavailable_and_the_rest_internal() {
        let io = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(matches!(StoreError::redis(&io), StoreError::Unavailable(_)));
        let loading = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading),
            "loading",
        ));
        assert!(matches!(
            StoreError::redis(&loading),
            StoreError::Unavailable(_)
        ));
        let script = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "script error",
        ));
        assert!(matches!(
            StoreError::redis(&script),
            StoreError::Internal(_)
        ));
        let types =
            redis::RedisError::from((redis::ErrorKind::UnexpectedReturnType, "not a string"));
        assert!(matches!(StoreError::redis(&types), StoreError::Internal(_)));
    }

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

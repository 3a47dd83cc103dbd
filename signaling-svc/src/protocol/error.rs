//! The gateway's refusal of a request ([`ClientError`], sent as the wire's `ErrorBody`) and the
//! one translation of a backend refusal into it.

use talkgroup_proto::error::{Reason, ServiceError};
use talkgroup_wire::{Code, ErrorBody};

/// An error for the client: a code and a safe, fixed message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ClientError {
    pub code: Code,
    pub message: &'static str,
    /// Version conflicts: what the client expected and what is stored.
    pub expected_version: Option<u64>,
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

impl ClientError {
    /// What the client is sent.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.code,
            message: self.message.to_owned(),
            expected_version: self.expected_version,
            actual_version: self.actual_version,
        }
    }
}

/// Shorthand for a [`ClientError`].
pub const fn err(code: Code, message: &'static str) -> ClientError {
    ClientError::new(code, message)
}

/// What the client is told for each reason a backend gives: the one table.
fn for_reason(reason: Reason) -> ClientError {
    match reason {
        Reason::InvalidArgument => err(Code::BadRequest, "invalid request"),
        Reason::NotFound => err(Code::NotFound, "not found"),
        Reason::NotMember | Reason::FailedPrecondition => {
            err(Code::Forbidden, "not allowed in this state")
        }
        Reason::PermissionDenied => err(Code::Forbidden, "forbidden"),
        Reason::Exhausted => err(Code::RateLimited, "capacity exhausted"),
        Reason::TooManySessions => err(Code::LimitExceeded, "too many sessions for this user"),
        Reason::TooManyChannels => err(Code::LimitExceeded, "too many channels for this user"),
        Reason::ChannelFull => err(Code::LimitExceeded, "the channel is full"),
        Reason::TooManySyncs => err(Code::LimitExceeded, "too many sync sessions"),
        Reason::VersionConflict => err(Code::Conflict, "version conflict"),
        Reason::EmergencyActive => err(Code::FloorBusy, "an emergency broadcast is active"),
        Reason::AlreadyExists => err(Code::BadRequest, "already exists"),
        Reason::NoMediaNode | Reason::StoreUnavailable | Reason::Unavailable => {
            err(Code::Unavailable, "service unavailable")
        }
        Reason::Internal => err(Code::Internal, "internal error"),
    }
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        let error = ServiceError::decode(&status);
        if error.reason == Reason::Internal {
            tracing::warn!(code = ?status.code(), "backend call failed");
        }
        Self {
            expected_version: error.conflict.map(|c| c.expected),
            actual_version: error.conflict.map(|c| c.actual),
            ..for_reason(error.reason)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use talkgroup_proto::error::Conflict;

    #[test]
    fn backend_reasons_reach_the_client_as_stable_codes() {
        let conflict = ServiceError::conflict(Conflict {
            expected: 3,
            actual: 5,
        });
        let client = ClientError::from(tonic::Status::from(conflict));
        assert_eq!(client.code, Code::Conflict);
        assert_eq!(
            (client.expected_version, client.actual_version),
            (Some(3), Some(5))
        );
        let busy = ServiceError::new(Reason::EmergencyActive, "emergency active on the event");
        assert_eq!(
            ClientError::from(tonic::Status::from(busy)).code,
            Code::FloorBusy
        );
        // A status no service encoded (a transport failure) is judged by its code alone.
        let down = tonic::Status::unavailable("connection refused");
        assert_eq!(ClientError::from(down).code, Code::Unavailable);
        let aborted = tonic::Status::aborted("whatever the text");
        assert_eq!(ClientError::from(aborted).code, Code::Internal);
    }
}

//! A user's role in a channel as state-svc stores it (a grant), one type for the store, the
//! gRPC edge and the gateway. The gateway turns it into the role a socket acts with
//! (`talkgroup_wire::Role`): `Member` takes the token's role, or talk.

use crate::state::v1 as pb;

/// What a stored grant gives. Ordered: each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StoredRole {
    /// No access, whatever the token says.
    None,
    /// Access given by the control plane: the token's role, or talk. Resolved by the gateway.
    Member,
    Listen,
    Talk,
    Dispatch,
    Admin,
}

impl StoredRole {
    /// The name stored in Redis.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Member => "member",
            Self::Listen => "listen",
            Self::Talk => "talk",
            Self::Dispatch => "dispatch",
            Self::Admin => "admin",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "none" => Self::None,
            "member" => Self::Member,
            "listen" => Self::Listen,
            "talk" => Self::Talk,
            "dispatch" => Self::Dispatch,
            "admin" => Self::Admin,
            _ => return None,
        })
    }

    /// The role of a `pb::Role`; `None` for `ROLE_UNSPECIFIED` (no grant).
    pub fn from_pb(role: pb::Role) -> Option<Self> {
        Some(match role {
            pb::Role::Unspecified => return None,
            pb::Role::None => Self::None,
            pb::Role::Member => Self::Member,
            pb::Role::Listen => Self::Listen,
            pb::Role::Talk => Self::Talk,
            pb::Role::Dispatch => Self::Dispatch,
            pb::Role::Admin => Self::Admin,
        })
    }

    pub fn to_pb(self) -> pb::Role {
        match self {
            Self::None => pb::Role::None,
            Self::Member => pb::Role::Member,
            Self::Listen => pb::Role::Listen,
            Self::Talk => pb::Role::Talk,
            Self::Dispatch => pb::Role::Dispatch,
            Self::Admin => pb::Role::Admin,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_round_trips_through_its_name_and_protobuf() {
        use StoredRole::*;
        for role in [None, Member, Listen, Talk, Dispatch, Admin] {
            assert_eq!(StoredRole::parse(role.as_str()), Some(role));
            assert_eq!(StoredRole::from_pb(role.to_pb()), Some(role));
        }
        assert_eq!(StoredRole::from_pb(pb::Role::Unspecified), Option::None);
        assert_eq!(StoredRole::parse("owner"), Option::None);
    }
}

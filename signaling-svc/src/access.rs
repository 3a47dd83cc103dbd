//! Roles: what a connected user may do in each channel, and how it is decided.
//!
//! A user's role in a channel comes from two places. The JWT may carry initial grants
//! (`"grants": {"ops": "talk", "*": "listen"}`, `*` covering every channel not named). Grants
//! stored in state-svc (set through the admin API or by the control plane's
//! `vp:membership_updates`) override the token channel by channel: a stored `none` closes a
//! channel the token opened, a stored `member` opens one with the token's role or `talk`.
//! Without either, the user has no access (deny by default).

use std::collections::{BTreeMap, HashMap};

use talkgroup_proto::role::StoredRole;
use talkgroup_proto::state::v1 as spb;
pub use talkgroup_wire::Role;
pub use talkgroup_wire::role::DISPATCH_PRIORITY;

/// Most entries a token's `grants` claim may have.
pub const MAX_TOKEN_GRANTS: usize = 256;
/// Floor priority of a dispatcher's emergency broadcast.
pub const EMERGENCY_PRIORITY: u32 = 200;
/// Floor priority of an admin's emergency broadcast (overrides a dispatcher's).
pub const ADMIN_EMERGENCY_PRIORITY: u32 = 250;

/// The role a socket acts with for a stored role other than `member`.
fn acting(stored: StoredRole) -> Role {
    match stored {
        StoredRole::None | StoredRole::Member => Role::None,
        StoredRole::Listen => Role::Listen,
        StoredRole::Talk => Role::Talk,
        StoredRole::Dispatch => Role::Dispatch,
        StoredRole::Admin => Role::Admin,
    }
}

/// Parses a token's `grants` claim; `None` when it is malformed (the token is refused).
pub fn token_grants(raw: &BTreeMap<String, String>) -> Option<HashMap<String, Role>> {
    if raw.len() > MAX_TOKEN_GRANTS {
        return None;
    }
    raw.iter()
        .map(|(channel, role)| {
            let valid_channel = channel == "*" || talkgroup_proto::id::valid(channel);
            let role = Role::parse(role)?;
            valid_channel.then(|| (channel.clone(), role))
        })
        .collect()
}

/// One connection's view of its user's grants.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    token: HashMap<String, Role>,
    stored: HashMap<String, StoredRole>,
    /// Version of the stored grants last applied; older announcements are ignored.
    version: u64,
}

impl Grants {
    pub fn new(token: HashMap<String, Role>) -> Self {
        Self {
            token,
            ..Self::default()
        }
    }

    /// Replaces the token's grants (a refreshed token); whether any changed.
    pub fn set_token(&mut self, token: HashMap<String, Role>) -> bool {
        let changed = self.token != token;
        self.token = token;
        changed
    }

    fn token_role(&self, channel: &str) -> Role {
        self.token
            .get(channel)
            .or_else(|| self.token.get("*"))
            .copied()
            .unwrap_or(Role::None)
    }

    /// True when the user holds at least the listen role in some channel.
    pub fn any_role(&self) -> bool {
        self.token.values().any(|r| *r >= Role::Listen)
            || self.stored.values().any(|s| match s {
                StoredRole::Member => true,
                stored => *stored >= StoredRole::Listen,
            })
    }

    /// The user's role in `channel`.
    pub fn role(&self, channel: &str) -> Role {
        match self.stored.get(channel) {
            Some(StoredRole::Member) => match self.token_role(channel) {
                Role::None => Role::Talk,
                role => role,
            },
            Some(stored) => acting(*stored),
            None => self.token_role(channel),
        }
    }

    /// Takes stored grants from state-svc; false when they are not newer than the ones held
    /// (the user's topic sends its grants again at every subscribe and resynchronisation).
    pub fn apply(&mut self, stored: &spb::UserGrants) -> bool {
        if stored.version <= self.version {
            return false;
        }
        self.version = stored.version;
        self.stored = stored
            .grants
            .iter()
            .filter_map(|g| Some((g.channel_id.clone(), StoredRole::from_pb(g.role())?)))
            .collect();
        true
    }

    /// Every channel named anywhere, with the user's role there (the `*` default aside).
    pub fn named(&self) -> BTreeMap<String, Role> {
        self.token
            .keys()
            .filter(|c| c.as_str() != "*")
            .chain(self.stored.keys())
            .map(|c| (c.clone(), self.role(c)))
            .collect()
    }

    /// The token's role for channels no grant names.
    pub fn default_role(&self) -> Role {
        self.token.get("*").copied().unwrap_or(Role::None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(version: u64, grants: &[(&str, spb::Role)]) -> spb::UserGrants {
        spb::UserGrants {
            user_id: "u".into(),
            version,
            grants: grants
                .iter()
                .map(|(c, r)| spb::Grant {
                    channel_id: (*c).into(),
                    role: (*r).into(),
                })
                .collect(),
        }
    }

    #[test]
    fn stored_grants_override_the_token_per_channel() {
        let token: BTreeMap<String, String> = [("ops", "dispatch"), ("*", "listen")]
            .iter()
            .map(|(c, r)| ((*c).into(), (*r).into()))
            .collect();
        let mut g = Grants::new(token_grants(&token).unwrap());
        assert_eq!(g.role("ops"), Role::Dispatch);
        assert_eq!(g.role("anything"), Role::Listen);
        assert!(g.apply(&stored(
            2,
            &[
                ("ops", spb::Role::Member),
                ("stage", spb::Role::Member),
                ("anything", spb::Role::None),
            ]
        )));
        // `member` keeps the token's role, or talk when the token gives none above none.
        assert_eq!(g.role("ops"), Role::Dispatch);
        assert_eq!(g.role("stage"), Role::Listen);
        assert_eq!(g.role("anything"), Role::None);
        // An older announcement does not undo a newer one.
        assert!(!g.apply(&stored(1, &[])));
        assert_eq!(g.role("anything"), Role::None);

        let mut bare = Grants::new(HashMap::new());
        assert_eq!(bare.role("ops"), Role::None);
        bare.apply(&stored(1, &[("ops", spb::Role::Member)]));
        assert_eq!(bare.role("ops"), Role::Talk);
    }

    #[test]
    fn malformed_token_grants_are_refused() {
        let one = |c: &str, r: &str| BTreeMap::from([(c.to_owned(), r.to_owned())]);
        assert!(token_grants(&one("ops", "talk")).is_some());
        assert!(token_grants(&one("ops", "god")).is_none());
        assert!(token_grants(&one("a b", "talk")).is_none());
        let many: BTreeMap<String, String> = (0..=MAX_TOKEN_GRANTS)
            .map(|i| (format!("c{i}"), "talk".to_owned()))
            .collect();
        assert!(token_grants(&many).is_none());
    }
}

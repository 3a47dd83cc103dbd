//! The field names of the hashes that both Rust and the Lua scripts read or write, written
//! once. Rust names a field by its constant (`fields::session::GENERATION`); a script names it
//! `SESSION.GENERATION`, which [`substitute`] replaces with the quoted name (`'gen'`) when the
//! script is built, so no script spells a shared field as a string of its own and no script
//! pays for a table of names at every call.
//!
//! The floor hash is left out: only the scripts read and write it (Rust sees the floor through
//! their JSON answers).

macro_rules! fields {
    ($(
        $(#[$doc:meta])*
        $group:ident as $lua:ident { $($name:ident = $value:literal),* $(,)? }
    )*) => {
        $(
            $(#[$doc])*
            #[allow(dead_code, reason = "some fields are named only by the scripts")]
            pub mod $group {
                $(pub const $name: &str = $value;)*
            }
        )*

        /// Every field as the Lua spelling of its name and its value (`SESSION.GENERATION`,
        /// `gen`).
        pub const LUA: &[(&str, &str)] = &[$($(
            (concat!(stringify!($lua), ".", stringify!($name)), $value),
        )*)*];
    };
}

fields! {
    /// A channel's settings and counters (`ChannelKeys::config`).
    config as CONFIG {
        QUEUE = "queue",
        LEASE_MS = "lease_ms",
        MAX_TALK_MS = "max_talk_ms",
        MEMBERS_VERSION = "mver",
        EMERGENCY = "emergency",
        DENIAL_WINDOW = "dwin",
        DENIALS = "dn",
        DENIALS_COUNTED = "dcount",
    }
    /// A session (`Keys::session`).
    session as SESSION {
        USER_ID = "uid",
        USER_NAME = "name",
        GATEWAY = "gw",
        CREATED = "created",
        EXPIRES = "expires",
        TTL = "ttl",
        RESUME_DIGEST = "rtok",
        PREVIOUS_DIGEST = "rtok_prev",
        GENERATION = "gen",
        PARKED = "parked",
    }
    /// A registered media node (`Keys::media_node`).
    node as NODE {
        ADDR = "addr",
        IP = "ip",
        CAPACITY = "capacity",
        LOAD = "load",
        DRAINING = "draining",
        LAST_HEARTBEAT = "last_hb",
    }
    /// A user's grants (`Keys::grants`): channel -> role, plus this version field (`#` cannot
    /// start a channel id).
    grants as GRANTS {
        VERSION = "#v",
    }
}

/// `script` with every `GROUP.FIELD` replaced by the field's quoted name. Longer spellings
/// first, so that `CONFIG.DENIALS_COUNTED` is not read as `CONFIG.DENIALS`.
pub fn substitute(script: &str) -> String {
    let mut names: Vec<&(&str, &str)> = LUA.iter().collect();
    names.sort_by_key(|(lua, _)| std::cmp::Reverse(lua.len()));
    names.iter().fold(script.to_owned(), |text, (lua, value)| {
        text.replace(lua, &format!("'{value}'"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_becomes_its_quoted_name() {
        assert_eq!(
            substitute("HGET(K, SESSION.GENERATION, CONFIG.DENIALS_COUNTED, CONFIG.DENIALS)"),
            "HGET(K, 'gen', 'dcount', 'dn')"
        );
        assert!(LUA.contains(&("GRANTS.VERSION", "#v")));
    }

    #[test]
    fn no_script_is_left_with_an_unknown_spelling() {
        let text = substitute(include_str!("scripts.rs"));
        for group in ["CONFIG.", "SESSION.", "NODE.", "GRANTS."] {
            assert!(!text.contains(group), "an unknown {group}... field is left");
        }
    }
}

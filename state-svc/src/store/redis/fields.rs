//! The field names of the hashes that both Rust and the Lua scripts read or write, written
//! once. Rust names a field by its constant (`fields::session::GEN`); every script is compiled
//! with [`LUA`] in front, which declares each group as a Lua table of the same names
//! (`SESSION.GEN`), so no script spells a shared field as a string of its own.
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

        /// Every group as a Lua table (`local SESSION = { GEN = 'gen', ... }`), put in front of
        /// every script.
        pub const LUA: &str = concat!($(
            "local ", stringify!($lua), " = {",
            $(" ", stringify!($name), " = '", $value, "',",)*
            " }\n",
        )*);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lua_tables_carry_every_name() {
        assert!(
            LUA.starts_with("local CONFIG = { QUEUE = 'queue',"),
            "{LUA}"
        );
        assert!(LUA.contains(" GENERATION = 'gen',"), "{LUA}");
        assert!(
            LUA.contains("local GRANTS = { VERSION = '#v', }\n"),
            "{LUA}"
        );
        assert_eq!(LUA.lines().count(), 4);
    }
}

//! What a user may do in a channel.

use serde::{Deserialize, Serialize};

/// Floor priority of a dispatcher's `priority-ptt-start`, the highest a `ptt-start` of a
/// dispatcher may ask for (normal talk is 0).
pub const DISPATCH_PRIORITY: u32 = 100;

/// What a user may do in a channel. Ordered: each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    None,
    /// Hear only.
    Listen,
    Talk,
    /// Priority talk and emergency broadcast.
    Dispatch,
    /// Everything, including overriding another dispatcher's emergency.
    Admin,
}

impl Role {
    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "none" => Self::None,
            "listen" => Self::Listen,
            "talk" => Self::Talk,
            "dispatch" => Self::Dispatch,
            "admin" => Self::Admin,
            _ => return None,
        })
    }

    /// The highest `ptt-start` priority this role may ask for.
    pub fn max_priority(self) -> u32 {
        match self {
            Self::None | Self::Listen | Self::Talk => 0,
            Self::Dispatch | Self::Admin => DISPATCH_PRIORITY,
        }
    }
}

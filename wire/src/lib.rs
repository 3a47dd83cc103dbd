//! Talkgroup's client protocol on the wire, for every side: the gateway, the test kit, the
//! load tool and any Rust client. Every frame is a JSON text frame `{"type", "id"?, "data"}`;
//! see `docs/protocol.md`.
//!
//! - [`request`]: every request a client sends ([`Request`]), each wire name written once.
//! - [`reply`]: the data of each reply ([`Reply`]), read back with [`Reply::decode`].
//! - [`push`]: every push ([`Push`]).
//! - [`view`]: the objects replies and pushes share (a user, a channel's state, a floor
//!   reason); [`role`]: what a user may do; [`sync`]: sync sessions and their deltas.
//! - [`error`]: the stable error codes and the WebSocket close codes.
//! - [`frame`]: a whole frame from the server ([`ServerFrame`]) and to it ([`ClientFrame`]).
//!
//! Every type serialises and deserialises, so a client builds requests and reads replies
//! through the same definitions the gateway answers with.

/// Declares a message enum from one table of wire names and bodies: the serde names
/// (`{"type", "data"}`), each variant's wire name and the list of every name all come from it.
macro_rules! messages {
    ($(#[$doc:meta])* $name:ident, $known:literal, { $($wire:literal => $variant:ident($body:ty),)* }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
        #[serde(tag = "type", content = "data")]
        pub enum $name {
            $(#[serde(rename = $wire)] $variant($body),)*
        }

        impl $name {
            /// The wire name.
            pub fn name(&self) -> &'static str {
                match self {
                    $(Self::$variant(_) => $wire,)*
                }
            }
        }

        #[doc = $known]
        pub const KNOWN: &[&str] = &[$($wire),*];
    };
}

pub mod error;
pub mod frame;
pub mod push;
pub mod reply;
pub mod request;
pub mod role;
pub mod sync;
pub mod view;

pub use error::{Code, ErrorBody, close};
pub use frame::{ClientFrame, ServerFrame};
pub use push::Push;
pub use reply::Reply;
pub use request::*;
pub use role::Role;
pub use view::{ChannelState, FloorReason, User};

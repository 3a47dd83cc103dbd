//! The gRPC contracts of Talkgroup, generated from `proto/ptt/**.proto` at build time.
//!
//! This is the only crate that compiles protobuf. Services convert these types into their own
//! domain types once, at the gRPC edge. [`error`] is the one typed form of a refusal that every
//! hop encodes and decodes; [`epoch`] the one rule of fencing epochs every service applies; [`id`] the one rule of ids; [`clock`] the one read of the wall clock, and the clock services are given; [`role`] a
//! stored grant's role.

pub mod clock;
pub mod epoch;
pub mod error;
pub mod id;
pub mod role;

/// `ptt.state.v1`: floor control, channel state and events, sessions, media-node registry.
pub mod state {
    pub mod v1 {
        #![allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
        tonic::include_proto!("ptt.state.v1");
    }
}

/// `ptt.media.v1`: the SFU service of media nodes.
pub mod media {
    pub mod v1 {
        #![allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
        tonic::include_proto!("ptt.media.v1");
    }
}

/// `ptt.admin.v1`: the administration API (state-svc, bearer admin token).
pub mod admin {
    pub mod v1 {
        #![allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
        tonic::include_proto!("ptt.admin.v1");
    }
}

/// The encoded file descriptor set of every contract, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/talkgroup_descriptor.bin"));

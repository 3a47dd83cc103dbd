//! media-svc: the SFU worker pool that forwards the floor holder's Opus audio.
//!
//! Not built yet: this crate holds the place in the workspace until the media plane lands. Its
//! gRPC contract is `proto/proto/ptt/media/v1/media.proto`.

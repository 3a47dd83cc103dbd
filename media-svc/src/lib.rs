//! media-svc: the SFU worker pool that forwards the floor holder's Opus audio.

pub mod engine;
pub mod router;

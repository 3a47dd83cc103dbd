//! signaling-svc: the authenticated WebSocket gateway clients speak to.
//!
//! Not built yet: this crate holds the place in the workspace until the gateway lands. The
//! protocol it will speak is `docs/protocol.md`.

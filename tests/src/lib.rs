//! End-to-end tests of Talkgroup, starting every service as its own process.
//!
//! Empty until the gateway and media services land; the state service's own service and fault
//! tests live in `state-svc/tests`.

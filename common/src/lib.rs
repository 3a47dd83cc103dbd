//! Process plumbing shared by the Talkgroup services, and nothing else.
//!
//! - [`telemetry`]: `tracing` set-up with plain or JSON logs.
//! - [`shutdown`]: a [`tokio_util::sync::CancellationToken`] cancelled on SIGTERM or Ctrl-C.
//! - [`grpc`]: the health and reflection services every gRPC server exposes, and the listener
//!   stream with `TCP_NODELAY`.
//! - [`service`]: the `main` every service shares (validate, bind, run, exit codes).
//! - [`tls`] and [`authz`]: mutual TLS between the services, and who may call what.
//! - [`devcerts`] (feature `devcerts`): a throwaway CA for the local stack and the tests.
//! - [`metrics`]: Prometheus text exposition of a service's registry on `/metrics`.
//! - [`source`]: budgets per client source (an IPv4 address, an IPv6 /64).
//!
//! Domain code lives in the services; this crate must stay free of it.

pub mod authz;
#[cfg(feature = "devcerts")]
pub mod devcerts;
pub mod grpc;
pub mod metrics;
pub mod service;
pub mod shutdown;
pub mod source;
pub mod telemetry;
pub mod tls;

/// Exit code for a configuration that cannot be used (sysexits `EX_USAGE`).
pub const EXIT_BAD_CONFIG: i32 = 64;

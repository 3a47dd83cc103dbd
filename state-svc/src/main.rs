//! The state-svc binary: parses configuration, sets up logging, binds, and runs.

use std::process::ExitCode;

use clap::Parser;
use state_svc::Config;
use talkgroup_common::service;

/// mimalloc instead of the system allocator: glibc malloc and free were a fifth of the
/// service's CPU under load (measured with perf on the floor benchmark).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    let _telemetry = config.process.init_telemetry("state-svc");
    tracing::info!(?config, "starting state-svc");
    let valid = config.validate().map_err(|e| e.to_string());
    service::main("state-svc", config.listen, valid, |listener, shutdown| {
        state_svc::run(config, listener, shutdown)
    })
    .await
}

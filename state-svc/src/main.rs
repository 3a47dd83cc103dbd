//! The state-svc binary: parses configuration, sets up logging, binds, and runs.

use std::process::ExitCode;

use clap::Parser;
use state_svc::Config;
use talkgroup_common::{EXIT_BAD_CONFIG, shutdown, telemetry};

/// mimalloc instead of the system allocator: glibc malloc and free were a fifth of the
/// service's CPU under load (measured with perf on the floor benchmark).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    telemetry::init(config.log_format, "info");
    if let Err(error) = config.validate() {
        tracing::error!(%error, "invalid configuration");
        return ExitCode::from(EXIT_BAD_CONFIG as u8);
    }
    tracing::info!(?config, "starting state-svc");
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, addr = %config.listen, "cannot bind");
            return ExitCode::FAILURE;
        }
    };
    match state_svc::run(config, listener, shutdown::on_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "state-svc failed");
            ExitCode::FAILURE
        }
    }
}

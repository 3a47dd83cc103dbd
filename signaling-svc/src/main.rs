//! The signaling-svc binary: parses configuration, sets up logging, binds, and runs.

use std::process::ExitCode;

use clap::Parser;
use signaling_svc::Config;
use talkgroup_common::{EXIT_BAD_CONFIG, shutdown, telemetry};

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
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, addr = %config.listen, "cannot bind");
            return ExitCode::FAILURE;
        }
    };
    match signaling_svc::run(config, listener, shutdown::on_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(signaling_svc::RunError::Config(error)) => {
            tracing::error!(%error, "invalid configuration");
            ExitCode::from(EXIT_BAD_CONFIG as u8)
        }
        Err(error) => {
            tracing::error!(%error, "signaling-svc failed");
            ExitCode::FAILURE
        }
    }
}

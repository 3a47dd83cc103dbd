//! The signaling-svc binary: parses configuration, sets up logging, binds, and runs.

use std::process::ExitCode;

use clap::Parser;
use signaling_svc::Config;
use talkgroup_common::service;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    let _telemetry = config.process.init_telemetry("signaling-svc");
    tracing::info!(?config, "starting signaling-svc");
    let valid = config
        .validate()
        .and_then(|()| signaling_svc::auth::Authenticator::from_config(&config).map(drop));
    service::main(
        "signaling-svc",
        config.listen,
        valid,
        |listener, shutdown| signaling_svc::run(config, listener, shutdown),
    )
    .await
}

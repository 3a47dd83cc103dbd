//! The signaling-svc binary: parses configuration, sets up logging, binds, and runs.

use std::process::ExitCode;

use clap::Parser;
use signaling_svc::Config;
use talkgroup_common::{service, telemetry};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    let _telemetry = telemetry::init(
        config.log_format,
        "info",
        "signaling-svc",
        config.otlp_endpoint.as_deref(),
    );
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

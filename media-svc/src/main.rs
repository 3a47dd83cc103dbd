//! The media-svc binary: parses configuration, sets up logging, binds, and runs.

use std::process::ExitCode;

use clap::Parser;
use media_svc::Config;
use talkgroup_common::{service, telemetry};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    let _telemetry = telemetry::init(
        config.log_format,
        "info",
        "media-svc",
        config.otlp_endpoint.as_deref(),
    );
    let valid = config.validate();
    service::main("media-svc", config.listen, valid, |listener, shutdown| {
        media_svc::run(config, listener, shutdown)
    })
    .await
}

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
    telemetry::init(config.log_format, "info");
    let valid = config.validate();
    service::main("media-svc", config.listen, valid, |listener, shutdown| {
        media_svc::run(config, listener, shutdown)
    })
    .await
}

//! The media-svc binary: parses configuration, sets up logging, binds, and runs.

use std::process::ExitCode;

use clap::Parser;
use media_svc::Config;
use talkgroup_common::service;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    let _telemetry = config.process.init_telemetry("media-svc");
    let valid = config.validate();
    service::main("media-svc", config.listen, valid, |listener, shutdown| {
        media_svc::run(config, listener, shutdown)
    })
    .await
}

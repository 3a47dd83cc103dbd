//! The state-svc binary: parses configuration, sets up logging, binds, and runs.

use std::process::ExitCode;

use state_svc::Config;
use talkgroup_common::service;

/// mimalloc instead of the system allocator: glibc malloc and free were a fifth of the
/// service's CPU under load (measured with perf on the floor benchmark).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let (mut config, flagged) = service::parse_noting_secret_flags::<Config>(&["admin_token"]);
    let _telemetry = config.process.init_telemetry("state-svc");
    for flag in flagged {
        tracing::warn!(
            flag,
            "a secret given as a command-line flag: every local user can read it in ps; use the environment or a file"
        );
    }
    tracing::info!(?config, "starting state-svc");
    let valid = match config.admin_token_file.clone() {
        Some(path) => talkgroup_common::service::read_secret_file(&path)
            .map(|token| config.admin_token = Some(token)),
        None => Ok(()),
    }
    .and_then(|()| config.validate().map_err(|e| e.to_string()));
    service::main("state-svc", config.listen, valid, |listener, shutdown| {
        state_svc::run(config, listener, shutdown)
    })
    .await
}

//! The signaling-svc binary: parses configuration, sets up logging, binds, and runs.

use std::process::ExitCode;

use signaling_svc::Config;
use talkgroup_common::service;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let (mut config, flagged) = service::parse_noting_secret_flags::<Config>(&["jwt_secret"]);
    let _telemetry = config.process.init_telemetry("signaling-svc");
    for flag in flagged {
        tracing::warn!(
            flag,
            "a secret given as a command-line flag: every local user can read it in ps; use the environment or a file"
        );
    }
    tracing::info!(?config, "starting signaling-svc");
    let valid = config
        .read_secret_files()
        .and_then(|()| config.validate())
        .and_then(|()| signaling_svc::auth::Authenticator::from_config(&config).map(drop));
    service::main(
        "signaling-svc",
        config.listen,
        valid,
        |listener, shutdown| signaling_svc::run(config, listener, shutdown),
    )
    .await
}

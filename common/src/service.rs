//! The `main` every service shares: validate the configuration, bind, run until a signal.

use std::fmt::Display;
use std::net::SocketAddr;
use std::process::ExitCode;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::EXIT_BAD_CONFIG;

/// Exits 64 for an invalid configuration, 1 when the address cannot be bound or the service
/// fails, 0 after a clean shutdown on SIGTERM or Ctrl-C.
pub async fn main<F, Fut, E>(
    name: &str,
    listen: SocketAddr,
    valid: Result<(), String>,
    run: F,
) -> ExitCode
where
    F: FnOnce(TcpListener, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    if let Err(error) = valid {
        tracing::error!(%error, "invalid configuration");
        return ExitCode::from(EXIT_BAD_CONFIG as u8);
    }
    let listener = match TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, addr = %listen, "cannot bind");
            return ExitCode::FAILURE;
        }
    };
    match run(listener, crate::shutdown::on_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, service = name, "service failed");
            ExitCode::FAILURE
        }
    }
}

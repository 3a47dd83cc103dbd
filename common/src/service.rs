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

/// Declares `$name`, the process flags every service takes, each also read from the
/// environment variable `$prefix` + its name in capitals (`PTT_MEDIA_LOG_FORMAT`): where its
/// metrics are served, where its traces go, how it logs. Flatten it into the service's
/// configuration under the "Process" heading. A macro rather than a struct of this crate
/// because clap takes an environment variable's name as a constant, and each service has its
/// own prefix.
#[macro_export]
macro_rules! process_args {
    ($name:ident, $prefix:literal) => {
        /// The process flags every service takes: metrics, traces, logs.
        #[derive(Debug, Clone, clap::Args)]
        pub struct $name {
            /// Internal address of the Prometheus `/metrics` endpoint (HTTP), kept off the
            /// service's other listeners; off when unset.
            #[arg(long, env = concat!($prefix, "METRICS_LISTEN"))]
            pub metrics_listen: Option<std::net::SocketAddr>,
            /// OTLP/gRPC endpoint traces are exported to (for example
            /// `http://otel-collector:4317`); no export when unset.
            #[arg(long, env = concat!($prefix, "OTLP_ENDPOINT"))]
            pub otlp_endpoint: Option<String>,
            /// Log format.
            #[arg(long, env = concat!($prefix, "LOG_FORMAT"), value_enum, default_value = "plain")]
            pub log_format: $crate::telemetry::LogFormat,
        }

        impl $name {
            /// Installs logging (`RUST_LOG` overrides `info`) and trace export for `service`.
            pub fn init_telemetry(&self, service: &'static str) -> $crate::telemetry::Telemetry {
                $crate::telemetry::init(
                    self.log_format,
                    "info",
                    service,
                    self.otlp_endpoint.as_deref(),
                )
            }
        }
    };
}

/// Reads a secret from `path` (a mounted Secret, say): the file's content without a final
/// newline. Errors name the file, never its content; an empty file is an error.
pub fn read_secret_file(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the secret file {}: {e}", path.display()))?;
    let secret = text.trim_end_matches(['\n', '\r']);
    if secret.is_empty() {
        return Err(format!("the secret file {} is empty", path.display()));
    }
    Ok(secret.to_owned())
}

/// Parses `C` from the command line and the environment, and says which of `secrets` (field
/// ids) came as command-line flags: every local user can read those in `ps`, so the caller
/// warns about them once logging is up.
pub fn parse_noting_secret_flags<C: clap::Parser>(secrets: &[&str]) -> (C, Vec<String>) {
    let matches = C::command().get_matches();
    let flagged = secrets
        .iter()
        .filter(|id| {
            matches.try_get_raw(id).is_ok_and(|v| v.is_some())
                && matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
        })
        .map(|id| (*id).to_owned())
        .collect();
    match C::from_arg_matches(&matches) {
        Ok(config) => (config, flagged),
        Err(error) => error.exit(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_secret_file_is_read_without_its_final_newline_and_an_empty_one_is_refused() {
        let dir = std::env::temp_dir().join(format!("tg-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, "s3cret value\n").unwrap();
        assert_eq!(read_secret_file(&file).unwrap(), "s3cret value");
        std::fs::write(&file, "\n").unwrap();
        assert!(read_secret_file(&file).unwrap_err().contains("empty"));
        let missing = read_secret_file(&dir.join("nope")).unwrap_err();
        assert!(missing.contains("cannot read"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

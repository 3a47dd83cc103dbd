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

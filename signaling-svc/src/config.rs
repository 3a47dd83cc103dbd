//! signaling-svc configuration: flags, each also readable from a `PTT_SIGNALING_*` variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use talkgroup_common::tls::TlsArgs;

talkgroup_common::process_args!(ProcessArgs, "PTT_SIGNALING_");

/// Topics (channels and users) state-svc takes on one watch stream.
pub const MAX_TOPICS_PER_STREAM: usize = 10_000;

/// The Talkgroup gateway: the WebSocket + JSON protocol clients speak.
#[derive(Clone, Parser)]
#[command(name = "signaling-svc", version, about)]
pub struct Config {
    /// HTTP/WebSocket listen address.
    #[arg(
        help_heading = "Listeners",
        long,
        env = "PTT_SIGNALING_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    pub listen: SocketAddr,
    /// Certificate chain (PEM) for serving HTTPS and `wss://` on --listen itself, for a
    /// deployment without an ingress in front (browsers need HTTPS for the microphone
    /// anywhere but on 127.0.0.1). Re-read when the file changes. Plain HTTP when unset.
    #[arg(
        help_heading = "Listeners",
        long,
        env = "PTT_SIGNALING_HTTPS_CERT",
        requires = "https_key"
    )]
    pub https_cert: Option<PathBuf>,
    /// The private key of --https-cert (PEM).
    #[arg(
        help_heading = "Listeners",
        long,
        env = "PTT_SIGNALING_HTTPS_KEY",
        requires = "https_cert"
    )]
    pub https_key: Option<PathBuf>,
    /// state-svc gRPC URL.
    #[arg(
        help_heading = "state-svc and the event plane",
        long,
        env = "PTT_SIGNALING_STATE_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub state_url: String,
    /// Mutual TLS for gRPC to state-svc and the media nodes (the certificate must name
    /// `spiffe://talkgroup/gateway`).
    #[command(flatten, next_help_heading = "Mutual TLS (gRPC)")]
    pub tls: TlsArgs,
    /// HS256 shared secret for client tokens. Never logged. Give it in the environment or
    /// with --jwt-secret-file: as a flag, every local user can read it in `ps`.
    #[arg(
        help_heading = "Client tokens",
        long,
        env = "PTT_SIGNALING_JWT_SECRET",
        hide_env_values = true
    )]
    pub jwt_secret: Option<String>,
    /// A file holding the HS256 secret (a mounted Secret), instead of --jwt-secret.
    #[arg(
        help_heading = "Client tokens",
        long,
        env = "PTT_SIGNALING_JWT_SECRET_FILE",
        conflicts_with = "jwt_secret"
    )]
    pub jwt_secret_file: Option<std::path::PathBuf>,
    /// PEM file with the RS256 or ES256 public key for client tokens (instead of a secret).
    #[arg(
        help_heading = "Client tokens",
        long,
        env = "PTT_SIGNALING_JWT_PUBLIC_KEY"
    )]
    pub jwt_public_key: Option<PathBuf>,
    /// JSON Web Key Set file (RFC 7517) whose keys tokens name by `kid` (instead of a secret
    /// or a public key); re-read when it changes, so keys rotate without a restart.
    #[arg(help_heading = "Client tokens", long, env = "PTT_SIGNALING_JWT_JWKS")]
    pub jwt_jwks: Option<PathBuf>,
    /// How often the key set file is checked for changes.
    #[arg(
        help_heading = "Client tokens",
        long,
        env = "PTT_SIGNALING_JWT_JWKS_CHECK_MS",
        default_value_t = 10_000
    )]
    pub jwt_jwks_check_ms: u64,
    /// Required `aud` claim, if set.
    #[arg(
        help_heading = "Client tokens",
        long,
        env = "PTT_SIGNALING_JWT_AUDIENCE"
    )]
    pub jwt_audience: Option<String>,
    /// Required `iss` claim, if set.
    #[arg(help_heading = "Client tokens", long, env = "PTT_SIGNALING_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Production mode: refuse to start without `--jwt-audience` and `--jwt-issuer` (a token
    /// signed for another service of the same identity provider must not open a socket here)
    /// and with `--dev-tokens`.
    #[arg(
        help_heading = "Client tokens",
        long,
        env = "PTT_SIGNALING_PRODUCTION",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub production: bool,
    /// Clock skew allowed on a token's `exp` and `nbf`, in seconds; a socket is closed this
    /// long after its token's `exp` unless the client sent `refresh-token` before.
    #[arg(
        help_heading = "Client tokens",
        long,
        env = "PTT_SIGNALING_JWT_LEEWAY_S",
        default_value_t = 5
    )]
    pub jwt_leeway_s: u64,
    /// This gateway's id (recorded on its sessions); random when unset.
    #[arg(
        help_heading = "state-svc and the event plane",
        long,
        env = "PTT_SIGNALING_GATEWAY_ID"
    )]
    pub gateway_id: Option<String>,
    /// Interval of server pings; a socket silent for two intervals is closed.
    #[arg(
        help_heading = "Limits per socket and user",
        long,
        env = "PTT_SIGNALING_PING_INTERVAL_MS",
        default_value_t = 30_000
    )]
    pub ping_interval_ms: u64,
    /// Requests per second a connection may send (burst twice that).
    #[arg(
        help_heading = "Limits per socket and user",
        long,
        env = "PTT_SIGNALING_REQUEST_RATE",
        default_value_t = 20
    )]
    pub request_rate: u32,
    /// `ptt-start` requests per second a connection may send.
    #[arg(
        help_heading = "Limits per socket and user",
        long,
        env = "PTT_SIGNALING_PTT_RATE",
        default_value_t = 5
    )]
    pub ptt_rate: u32,
    /// Bytes queued for one client at most (replies and pushes it has not read yet); a client
    /// that lets more pile up is closed with 4002.
    #[arg(help_heading = "Limits per socket and user", long, env = "PTT_SIGNALING_OUTBOX_BYTES", default_value_t = 1 << 20)]
    pub outbox_bytes: usize,
    /// A write to a client's socket that takes longer than this closes it with 4002.
    #[arg(
        help_heading = "Limits per socket and user",
        long,
        env = "PTT_SIGNALING_WRITE_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub write_timeout_ms: u64,
    /// The kernel's send buffer of each client connection, in bytes (0: the kernel's own
    /// autotuning, up to `net.ipv4.tcp_wmem`, 4 MiB by default). With the outbox this bounds
    /// what a client that stops reading can hold.
    #[arg(help_heading = "Listeners", long, env = "PTT_SIGNALING_SOCKET_SEND_BUFFER", default_value_t = 128 * 1024)]
    pub socket_send_buffer: usize,
    /// Time a TCP connection gets to send a whole HTTP request head, from its accept and
    /// between keep-alive requests; then it is closed.
    #[arg(
        help_heading = "Listeners",
        long,
        env = "PTT_SIGNALING_HEADER_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub header_timeout_ms: u64,
    /// TCP connections the listener holds at once (WebSockets and HTTP requests); one more is
    /// closed as soon as it is accepted.
    #[arg(
        help_heading = "Listeners",
        long,
        env = "PTT_SIGNALING_MAX_CONNECTIONS",
        default_value_t = 20_000
    )]
    pub max_connections: usize,
    /// Sync sessions one socket may create a minute (all of them at once at most).
    #[arg(
        help_heading = "Limits per socket and user",
        long,
        env = "PTT_SIGNALING_SYNC_CREATE_RATE",
        default_value_t = 10
    )]
    pub sync_create_rate: u32,
    /// Changes (start, switch, pause, ...) one socket may make to one sync session a second
    /// (burst twice that): each is pushed to every member of the session's channel.
    #[arg(
        help_heading = "Limits per socket and user",
        long,
        env = "PTT_SIGNALING_SYNC_CHANGE_RATE",
        default_value_t = 5
    )]
    pub sync_change_rate: u32,
    /// WebRTC transports one user may hold through this gateway, across their sockets (each
    /// socket's session holds at most 64 on a media node: a dispatcher monitoring 50
    /// channels holds one receive transport each, and send transports where it talks).
    #[arg(
        help_heading = "Limits per socket and user",
        long,
        env = "PTT_SIGNALING_MAX_TRANSPORTS_PER_USER",
        default_value_t = 128
    )]
    pub max_transports_per_user: usize,
    /// Channels one socket may be in at once (state-svc also caps them per user).
    #[arg(
        help_heading = "Limits per socket and user",
        long,
        env = "PTT_SIGNALING_MAX_CHANNELS_PER_SOCKET",
        default_value_t = 100
    )]
    pub max_channels_per_socket: usize,
    /// WebSockets one client address may hold on this gateway at once.
    #[arg(
        help_heading = "Listeners",
        long,
        env = "PTT_SIGNALING_MAX_SOCKETS_PER_ADDRESS",
        default_value_t = 100
    )]
    pub max_sockets_per_address: usize,
    /// TCP connections (WebSockets, HTTP requests, connections that have sent nothing yet) one
    /// source may hold on this gateway at once, counted at accept; a trusted proxy's
    /// connections are not counted (its clients are, by their forwarded address, per socket).
    #[arg(
        help_heading = "Listeners",
        long,
        env = "PTT_SIGNALING_MAX_CONNECTIONS_PER_ADDRESS",
        default_value_t = 128
    )]
    pub max_connections_per_address: usize,
    /// Larger budgets for known client networks, comma-separated `CIDR=N`: each address in the
    /// block may hold N sockets and N connections (a venue or office where hundreds of staff
    /// share one NAT address). For example `198.51.100.7=1000`.
    #[arg(
        help_heading = "Listeners",
        long,
        env = "PTT_SIGNALING_SOURCE_ALLOWANCES",
        value_delimiter = ','
    )]
    pub source_allowances: Vec<crate::client_addr::Allowance>,
    /// Proxies (addresses or CIDR blocks, comma-separated) whose `X-Forwarded-For` is believed:
    /// for a connection from one of them, the client address is the entry
    /// `--trusted-proxy-hops` places from the end of that header.
    #[arg(
        help_heading = "Listeners",
        long,
        env = "PTT_SIGNALING_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<crate::client_addr::Cidr>,
    /// How many trusted proxies stand in front of the gateway, each appending the address it
    /// saw to `X-Forwarded-For` (one Ingress: 1). 0 believes no header.
    #[arg(
        help_heading = "Listeners",
        long,
        env = "PTT_SIGNALING_TRUSTED_PROXY_HOPS",
        default_value_t = 1
    )]
    pub trusted_proxy_hops: usize,
    /// `Watch` streams on state-svc at most; the gateway's channels are spread over them.
    #[arg(
        help_heading = "state-svc and the event plane",
        long,
        env = "PTT_SIGNALING_WATCH_STREAMS",
        default_value_t = 16
    )]
    pub watch_streams: usize,
    /// Channels one `Watch` stream follows at most (state-svc takes up to 10,000 per stream).
    /// With `--watch-streams` this caps the channels one gateway follows; a join past it is
    /// refused with LIMIT_EXCEEDED.
    #[arg(
        help_heading = "state-svc and the event plane",
        long,
        env = "PTT_SIGNALING_WATCH_CHANNELS_PER_STREAM",
        default_value_t = 5_000
    )]
    pub watch_channels_per_stream: usize,
    /// Development only: serve `POST /dev/token` {"name"} → a token for that name, signed with
    /// the HS256 secret. Anyone can then sign in as anyone: never enable it in production.
    #[arg(
        help_heading = "Client tokens",
        long,
        env = "PTT_SIGNALING_DEV_TOKENS",
        default_value_t = false
    )]
    pub dev_tokens: bool,
    /// Channels offered by `list-channels` (comma-separated ids; at most 64). Clients may still
    /// join other channels by id.
    #[arg(
        help_heading = "Client tokens",
        long,
        env = "PTT_SIGNALING_CHANNELS",
        value_delimiter = ',',
        default_value = "ops,security,stage"
    )]
    pub channels: Vec<String>,
    /// TURN relays (coturn) handed to clients with short-lived credentials, comma-separated
    /// `turn:`/`turns:` URLs, for example `turn:turn.example:3478?transport=udp,turns:turn.example:443?transport=tcp`;
    /// none when unset.
    #[arg(
        help_heading = "TURN relays",
        long = "turn-url",
        env = "PTT_SIGNALING_TURN_URLS",
        value_delimiter = ','
    )]
    pub turn_urls: Vec<String>,
    /// File holding the secret the TURN relays share with the gateway (coturn's
    /// `static-auth-secret`); required with `--turn-url`, read once, never logged.
    #[arg(
        help_heading = "TURN relays",
        long,
        env = "PTT_SIGNALING_TURN_SECRET_FILE"
    )]
    pub turn_secret_file: Option<std::path::PathBuf>,
    /// How long TURN credentials stay valid, in seconds (60 to 86400), and never past the
    /// user's token's `exp`; clients ask again (`get-ice-servers`) before they expire.
    #[arg(
        help_heading = "TURN relays",
        long,
        env = "PTT_SIGNALING_TURN_TTL_S",
        default_value_t = 1_800
    )]
    pub turn_ttl_s: u64,
    /// Time connections get to close after SIGTERM, in ms.
    #[arg(
        help_heading = "Process",
        long,
        env = "PTT_SIGNALING_SHUTDOWN_GRACE_MS",
        default_value_t = 10_000
    )]
    pub shutdown_grace_ms: u64,
    /// Metrics, traces and logs.
    #[command(flatten, next_help_heading = "Process")]
    pub process: ProcessArgs,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("state_url", &self.state_url)
            .field("tls", &self.tls)
            .field("jwt_secret", &self.jwt_secret.as_ref().map(|_| "***"))
            .field("jwt_public_key", &self.jwt_public_key)
            .field("gateway_id", &self.gateway_id)
            .finish_non_exhaustive()
    }
}

/// The most channels `--channels` may list.
pub const MAX_LISTED_CHANNELS: usize = 64;

/// The channel id rule state-svc enforces, checked early for configured ids.
fn valid_channel_id(id: &str) -> bool {
    talkgroup_proto::id::valid(id)
}

impl Config {
    /// Reads the secrets given as files into their fields.
    pub fn read_secret_files(&mut self) -> Result<(), String> {
        if let Some(path) = &self.jwt_secret_file {
            self.jwt_secret = Some(talkgroup_common::service::read_secret_file(path)?);
        }
        Ok(())
    }

    pub fn for_tests(secret: &str) -> Self {
        Self::parse_from([
            "signaling-svc",
            "--listen",
            "127.0.0.1:0",
            "--jwt-secret",
            secret,
            "--insecure-plaintext",
        ])
    }

    pub fn validate(&self) -> Result<(), String> {
        self.tls.validate()?;
        if !self.turn_urls.is_empty() && !crate::turn::TTL_RANGE.contains(&self.turn_ttl_s) {
            return Err("TURN credential lifetime must be 60 s to 24 h".into());
        }
        let keys = [
            self.jwt_secret.is_some(),
            self.jwt_public_key.is_some(),
            self.jwt_jwks.is_some(),
        ];
        match keys.iter().filter(|set| **set).count() {
            0 => return Err("set a JWT secret, public key or key set".into()),
            1 => {}
            _ => return Err("set only one of a JWT secret, public key and key set".into()),
        }
        if self.jwt_secret.as_ref().is_some_and(|s| s.len() < 16) {
            return Err("the JWT secret must be at least 16 bytes".into());
        }
        if self.jwt_jwks_check_ms < 100 {
            return Err("jwt-jwks-check-ms must be at least 100".into());
        }
        if self.jwt_leeway_s > 300 {
            return Err("jwt-leeway-s must be at most 300".into());
        }
        if self.dev_tokens && self.jwt_secret.is_none() {
            return Err("development tokens need the HS256 secret".into());
        }
        if self.channels.len() > MAX_LISTED_CHANNELS {
            return Err(format!("at most {MAX_LISTED_CHANNELS} listed channels"));
        }
        if let Some(bad) = self.channels.iter().find(|c| !valid_channel_id(c)) {
            return Err(format!(
                "invalid channel id {bad:?}: 1-64 of A-Z a-z 0-9 - _ ."
            ));
        }
        if self.outbox_bytes < 64 * 1024 {
            return Err("outbox-bytes must be at least 65536".into());
        }
        if !(100..=120_000).contains(&self.write_timeout_ms)
            || !(100..=120_000).contains(&self.header_timeout_ms)
        {
            return Err("write and header timeouts must be 100 ms to 120 s".into());
        }
        if !(1..=256).contains(&self.watch_streams)
            || !(1..=10_000).contains(&self.watch_channels_per_stream)
        {
            return Err("watch-streams must be 1-256, watch-channels-per-stream 1-10000".into());
        }
        // Each stream carries its channels and its share of the users (one per connection at
        // most), and state-svc takes at most 10,000 topics a stream.
        if self.max_connections.div_ceil(self.watch_streams) + self.watch_channels_per_stream
            > MAX_TOPICS_PER_STREAM
        {
            return Err(format!(
                "max-connections / watch-streams + watch-channels-per-stream must be at most \
                 {MAX_TOPICS_PER_STREAM} (the topics state-svc takes on one stream)"
            ));
        }
        if self.max_connections == 0
            || self.max_channels_per_socket == 0
            || self.max_sockets_per_address == 0
        {
            return Err("connection, channel and socket limits must be positive".into());
        }
        if self.production
            && (self.jwt_audience.is_none() || self.jwt_issuer.is_none() || self.dev_tokens)
        {
            return Err(
                "production mode needs --jwt-audience and --jwt-issuer, and no --dev-tokens".into(),
            );
        }
        if self.trusted_proxy_hops > 8 {
            return Err("trusted proxy hops must be at most 8".into());
        }
        if self.max_connections_per_address < self.max_sockets_per_address {
            return Err(
                "max connections per address must be at least max sockets per address".into(),
            );
        }
        if self.ping_interval_ms < 100
            || self.request_rate == 0
            || self.ptt_rate == 0
            || self.sync_create_rate == 0
            || self.sync_change_rate == 0
        {
            return Err("ping interval and rates must be positive".into());
        }
        Ok(())
    }

    pub fn gateway_id(&self) -> String {
        self.gateway_id
            .clone()
            .unwrap_or_else(|| format!("gw-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_channels_must_fit_state_svcs_streams() {
        let mut config = Config::for_tests("a-test-secret-of-enough-length");
        assert!(config.validate().is_ok(), "the defaults fit");
        config.watch_streams = 1;
        assert!(
            config.validate().is_err(),
            "20,000 users on one stream do not"
        );
        config.max_connections = 5_000;
        assert!(config.validate().is_ok());
    }

    #[test]
    fn listed_channels_are_validated() {
        let mut config = Config::for_tests("a-test-secret-of-enough-length");
        assert_eq!(config.channels, ["ops", "security", "stage"]);
        assert!(config.validate().is_ok());
        config.channels = vec!["ops".into(), "bad id".into()];
        assert!(config.validate().unwrap_err().contains("bad id"));
        config.channels = vec![String::new()];
        assert!(config.validate().is_err());
        config.channels = (0..=MAX_LISTED_CHANNELS).map(|i| format!("c{i}")).collect();
        assert!(config.validate().is_err());
        config.channels = vec!["a".repeat(65)];
        assert!(config.validate().is_err());
    }

    #[test]
    fn production_mode_needs_an_audience_and_an_issuer_and_no_dev_tokens() {
        let mut config = Config::for_tests("a-test-secret-of-enough-length");
        config.production = true;
        assert!(config.validate().unwrap_err().contains("production"));
        config.jwt_audience = Some("talkgroup".into());
        assert!(config.validate().is_err(), "no issuer");
        config.jwt_issuer = Some("https://login.example.com/".into());
        assert!(config.validate().is_ok());
        config.dev_tokens = true;
        assert!(config.validate().is_err(), "development tokens");
    }

    #[test]
    fn per_source_budgets_are_consistent() {
        let mut config = Config::for_tests("a-test-secret-of-enough-length");
        config.max_connections_per_address = config.max_sockets_per_address - 1;
        assert!(config.validate().is_err());
        config.max_connections_per_address = config.max_sockets_per_address;
        config.trusted_proxy_hops = 9;
        assert!(config.validate().is_err());
    }
}

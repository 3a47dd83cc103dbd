//! state-svc configuration: command-line flags, each also readable from a `PTT_STATE_*`
//! environment variable. Read once in `main.rs`; tests build [`Config`] directly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::domain::Clock;
use clap::{Parser, ValueEnum};
use talkgroup_common::tls::TlsArgs;

use crate::connect::redact_url;
use crate::connect::{PostgresAuth, PostgresConnect, RedisAuth, RedisConnect};
pub use crate::error::ConfigError;
use crate::store::StoreSettings;
use crate::store::redis::RedisOptions;

talkgroup_common::process_args!(ProcessArgs, "PTT_STATE_");

/// Which store backs the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// In-process state; one instance only, lost on restart.
    Memory,
    /// Redis; any number of replicas.
    Redis,
}

/// The state service of Talkgroup: floor control, channel state, sessions and media placement.
#[derive(Clone, Parser)]
#[command(name = "state-svc", version, about)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(
        help_heading = "Listeners",
        long,
        env = "PTT_STATE_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    pub listen: SocketAddr,
    /// Mutual TLS for gRPC (the certificate must name `spiffe://talkgroup/state`).
    #[command(flatten, next_help_heading = "Mutual TLS (gRPC)")]
    pub tls: TlsArgs,
    /// Serve gRPC reflection (lists every method; for grpcurl in development).
    #[arg(help_heading = "Listeners", long, env = "PTT_STATE_GRPC_REFLECTION")]
    pub grpc_reflection: bool,
    /// State store. Defaults to `redis` when a Redis URL is set, otherwise `memory`.
    #[arg(
        help_heading = "Store (Redis)",
        long,
        env = "PTT_STATE_STORE",
        value_enum
    )]
    pub store: Option<StoreKind>,
    /// Redis URL: `redis://127.0.0.1:6379/0` (or `rediss://` for TLS), under Sentinel
    /// `redis+sentinel://host:port,.../<master name>`, a Redis Cluster
    /// `redis+cluster://host:port,...` (seed nodes). Never logged with its password.
    #[arg(
        help_heading = "Store (Redis)",
        long,
        env = "PTT_STATE_REDIS_URL",
        hide_env_values = true
    )]
    pub redis_url: Option<String>,
    /// Redis ACL user (`AUTH <user> <password>`); the URL may name it too.
    #[arg(help_heading = "Store (Redis)", long, env = "PTT_STATE_REDIS_USERNAME")]
    pub redis_username: Option<String>,
    /// File holding the Redis password (a mounted Secret), instead of a password in the URL.
    #[arg(
        help_heading = "Store (Redis)",
        long,
        env = "PTT_STATE_REDIS_PASSWORD_FILE"
    )]
    pub redis_password_file: Option<PathBuf>,
    /// CA bundle (PEM) the Redis server's certificate must chain to, for a `rediss://` URL;
    /// without it the system's roots are used. The host name in the URL is verified.
    #[arg(help_heading = "Store (Redis)", long, env = "PTT_STATE_REDIS_CA")]
    pub redis_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a Redis that asks for one (`tls-auth-clients yes`).
    #[arg(
        help_heading = "Store (Redis)",
        long,
        env = "PTT_STATE_REDIS_CLIENT_CERT",
        requires = "redis_client_key"
    )]
    pub redis_client_cert: Option<PathBuf>,
    /// The key of --redis-client-cert (PEM).
    #[arg(
        help_heading = "Store (Redis)",
        long,
        env = "PTT_STATE_REDIS_CLIENT_KEY",
        requires = "redis_client_cert"
    )]
    pub redis_client_key: Option<PathBuf>,
    /// Prefix of every Redis key, so several deployments can share one Redis.
    #[arg(
        help_heading = "Store (Redis)",
        long,
        env = "PTT_STATE_KEY_PREFIX",
        default_value = "ptt"
    )]
    pub key_prefix: String,
    /// Floor lease in milliseconds; gateways renew it about every third of it.
    #[arg(
        help_heading = "Floors and sessions",
        long,
        env = "PTT_STATE_LEASE_MS",
        default_value_t = 5_000
    )]
    pub lease_ms: u32,
    /// Maximum talk time of one grant in milliseconds, after which the floor is revoked.
    #[arg(
        help_heading = "Floors and sessions",
        long,
        env = "PTT_STATE_MAX_TALK_MS",
        default_value_t = 60_000
    )]
    pub max_talk_ms: u32,
    /// Maximum length of an emergency broadcast in milliseconds; its floors are revoked after it.
    #[arg(
        help_heading = "Floors and sessions",
        long,
        env = "PTT_STATE_EMERGENCY_MAX_MS",
        default_value_t = 600_000
    )]
    pub emergency_max_ms: u32,
    /// Redis pub/sub channel on which an external control plane publishes membership updates
    /// (`{eventId, userId, channelIds, action: "set_user_channels"}`). Redis store only.
    #[arg(
        help_heading = "Store (Redis)",
        long,
        env = "PTT_STATE_MEMBERSHIP_CHANNEL",
        default_value = "vp:membership_updates"
    )]
    pub membership_channel: String,
    /// PostgreSQL URL of the audit trail (`postgres://user:password@host/db`); every floor
    /// event is copied there from Redis. Off when unset (the audit then stays in Redis,
    /// trimmed to --audit-maxlen per channel). Redis store only. Never logged.
    #[arg(
        help_heading = "Audit trail (PostgreSQL)",
        long,
        env = "PTT_STATE_POSTGRES_URL",
        hide_env_values = true
    )]
    pub postgres_url: Option<String>,
    /// File holding the PostgreSQL password (a mounted Secret), instead of one in the URL.
    #[arg(
        help_heading = "Audit trail (PostgreSQL)",
        long,
        env = "PTT_STATE_POSTGRES_PASSWORD_FILE"
    )]
    pub postgres_password_file: Option<PathBuf>,
    /// CA bundle (PEM) the PostgreSQL server's certificate must chain to. With it TLS is
    /// required and the host name is verified (as `sslmode=verify-full`); without it the
    /// connection is plaintext, for a database on the same host or network namespace only.
    #[arg(
        help_heading = "Audit trail (PostgreSQL)",
        long,
        env = "PTT_STATE_POSTGRES_CA"
    )]
    pub postgres_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a PostgreSQL that authenticates clients by certificate.
    #[arg(
        help_heading = "Audit trail (PostgreSQL)",
        long,
        env = "PTT_STATE_POSTGRES_CLIENT_CERT",
        requires = "postgres_client_key"
    )]
    pub postgres_client_cert: Option<PathBuf>,
    /// The key of --postgres-client-cert (PEM).
    #[arg(
        help_heading = "Audit trail (PostgreSQL)",
        long,
        env = "PTT_STATE_POSTGRES_CLIENT_KEY",
        requires = "postgres_client_cert"
    )]
    pub postgres_client_key: Option<PathBuf>,
    /// How often the audit writer looks at every audit stream, in milliseconds (it also
    /// follows the channels' events).
    #[arg(
        help_heading = "Audit trail (PostgreSQL)",
        long,
        env = "PTT_STATE_AUDIT_SWEEP_MS",
        default_value_t = 30_000
    )]
    pub audit_sweep_ms: u32,
    /// Days the audit database keeps floor and sync-session events; older rows are deleted
    /// (at the writer's start and every ten minutes).
    #[arg(
        help_heading = "Audit trail (PostgreSQL)",
        long,
        env = "PTT_STATE_AUDIT_RETENTION_DAYS",
        default_value_t = 90
    )]
    pub audit_retention_days: u32,
    /// Bearer token of the admin API (`ptt.admin.v1.AdminService`), at least 16 characters.
    /// Without it the admin API refuses every call. Never logged. Give it in the environment
    /// or with --admin-token-file: as a flag, every local user can read it in `ps`.
    #[arg(
        help_heading = "Listeners",
        long,
        env = "PTT_STATE_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// A file holding the admin API's bearer token (a mounted Secret), instead of
    /// --admin-token.
    #[arg(
        help_heading = "Listeners",
        long,
        env = "PTT_STATE_ADMIN_TOKEN_FILE",
        conflicts_with = "admin_token"
    )]
    pub admin_token_file: Option<PathBuf>,
    /// Session time to live in milliseconds without a touch from its gateway.
    #[arg(
        help_heading = "Floors and sessions",
        long,
        env = "PTT_STATE_SESSION_TTL_MS",
        default_value_t = 60_000
    )]
    pub session_ttl_ms: u32,
    /// A media node without a heartbeat for this many milliseconds is dead: its channels move
    /// to live nodes at once.
    #[arg(
        help_heading = "Media nodes",
        long,
        env = "PTT_STATE_NODE_DEAD_AFTER_MS",
        default_value_t = 3_000
    )]
    pub node_dead_after_ms: u32,
    /// Heartbeat interval asked of media nodes, in milliseconds.
    #[arg(
        help_heading = "Media nodes",
        long,
        env = "PTT_STATE_NODE_HEARTBEAT_MS",
        default_value_t = 1_000
    )]
    pub node_heartbeat_ms: u32,
    /// A dead media node whose channels have moved is dropped from the registry after this
    /// many milliseconds without a heartbeat (so node ids of past rollouts do not pile up).
    #[arg(
        help_heading = "Media nodes",
        long,
        env = "PTT_STATE_NODE_FORGET_AFTER_MS",
        default_value_t = 600_000
    )]
    pub node_forget_after_ms: u32,
    /// Live sessions (sockets, across gateways) one user may have; one more is refused.
    #[arg(
        help_heading = "Limits",
        long,
        env = "PTT_STATE_MAX_SESSIONS_PER_USER",
        default_value_t = 10
    )]
    pub max_sessions_per_user: u32,
    /// Channels one user may be in at once, across their sessions.
    #[arg(
        help_heading = "Limits",
        long,
        env = "PTT_STATE_MAX_CHANNELS_PER_USER",
        default_value_t = 200
    )]
    pub max_channels_per_user: u32,
    /// Open sync sessions (pending, running, paused) one channel may have.
    #[arg(
        help_heading = "Limits",
        long,
        env = "PTT_STATE_MAX_SYNCS_PER_CHANNEL",
        default_value_t = 16
    )]
    pub max_syncs_per_channel: u32,
    /// Open sync sessions one user may have created.
    #[arg(
        help_heading = "Limits",
        long,
        env = "PTT_STATE_MAX_SYNCS_PER_USER",
        default_value_t = 32
    )]
    pub max_syncs_per_user: u32,
    /// Members one channel may have.
    #[arg(
        help_heading = "Limits",
        long,
        env = "PTT_STATE_MAX_MEMBERS_PER_CHANNEL",
        default_value_t = 1_000
    )]
    pub max_members_per_channel: u32,
    /// How long a session whose socket went away (without a close frame, or with its gateway)
    /// waits for a resume, in milliseconds. Its floors are not renewed meanwhile.
    #[arg(
        help_heading = "Floors and sessions",
        long,
        env = "PTT_STATE_RESUME_GRACE_MS",
        default_value_t = 20_000
    )]
    pub resume_grace_ms: u32,
    /// The most transports a media node may register as its capacity; more is clamped to
    /// this (and logged), so a node cannot attract every new channel by claiming a huge one.
    #[arg(
        help_heading = "Floors and sessions",
        long,
        env = "PTT_STATE_MAX_NODE_CAPACITY",
        default_value_t = 20_000
    )]
    pub max_node_capacity: u32,
    /// Replicas that must have a floor grant (Redis `WAIT`) before it is answered, so that a
    /// failover cannot lose a grant someone was told of; a grant they do not confirm within
    /// half of --redis-timeout-ms is given back and answered UNAVAILABLE. 0: answer at once.
    /// Set it below the number of replicas, or grants stop while one is away.
    #[arg(
        help_heading = "Store (Redis)",
        long,
        env = "PTT_STATE_REDIS_WAIT_REPLICAS",
        default_value_t = 0
    )]
    pub redis_wait_replicas: u32,
    /// Upper bound of every Redis call in milliseconds; past it the call fails UNAVAILABLE.
    #[arg(
        help_heading = "Store (Redis)",
        long,
        env = "PTT_STATE_REDIS_TIMEOUT_MS",
        default_value_t = 1_000
    )]
    pub redis_timeout_ms: u32,
    /// How often expired floors and sessions are swept, in milliseconds.
    #[arg(
        help_heading = "Floors and sessions",
        long,
        env = "PTT_STATE_SWEEP_INTERVAL_MS",
        default_value_t = 100
    )]
    pub sweep_interval_ms: u32,
    /// Approximate length each channel's audit stream is trimmed to, when the audit stays in
    /// Redis (no --postgres-url). With PostgreSQL, streams are trimmed only past what the
    /// audit writer has copied, whatever their length.
    #[arg(
        help_heading = "Audit trail (PostgreSQL)",
        long,
        env = "PTT_STATE_AUDIT_MAXLEN",
        default_value_t = 100_000
    )]
    pub audit_maxlen: u32,
    /// With PostgreSQL: how many uncopied entries a channel's audit stream may hold (while
    /// PostgreSQL is away) before it takes no more denials, only counts them. Grants,
    /// releases, revocations and pre-emptions are kept whatever the backlog.
    #[arg(
        help_heading = "Audit trail (PostgreSQL)",
        long,
        env = "PTT_STATE_AUDIT_BACKLOG_MAX",
        default_value_t = 100_000
    )]
    pub audit_backlog_max: u32,
    /// Denials (presses refused because the channel is held) are the one audit entry a
    /// client causes at will: each channel appends at most 20 per window of this many
    /// milliseconds and counts the rest into one `denied_aggregate` entry.
    #[arg(
        help_heading = "Audit trail (PostgreSQL)",
        long,
        env = "PTT_STATE_AUDIT_DENIAL_WINDOW_MS",
        default_value_t = 60_000
    )]
    pub audit_denial_window_ms: u32,
    /// Time allowed for in-flight calls to finish after SIGTERM, in milliseconds.
    #[arg(
        help_heading = "Process",
        long,
        env = "PTT_STATE_SHUTDOWN_GRACE_MS",
        default_value_t = 10_000
    )]
    pub shutdown_grace_ms: u32,
    /// Metrics, traces and logs.
    #[command(flatten, next_help_heading = "Process")]
    pub process: ProcessArgs,
    /// The clock of the memory store and the API: the system clock, unless a test injects a
    /// manual one.
    #[arg(skip)]
    pub clock: Clock,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("tls", &self.tls)
            .field("store", &self.store_kind())
            .field("redis_url", &self.redis_url.as_deref().map(redact_url))
            .field("key_prefix", &self.key_prefix)
            .field("lease_ms", &self.lease_ms)
            .field("max_talk_ms", &self.max_talk_ms)
            .field("session_ttl_ms", &self.session_ttl_ms)
            .field("redis_timeout_ms", &self.redis_timeout_ms)
            .field("membership_channel", &self.membership_channel)
            .field("admin_token", &self.admin_token.as_ref().map(|_| "***"))
            .field("postgres_url", &self.postgres_url.as_ref().map(|_| "***"))
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Defaults for everything but the listen address, as tests want them.
    pub fn for_tests() -> Self {
        Self::parse_from([
            "state-svc",
            "--listen",
            "127.0.0.1:0",
            "--insecure-plaintext",
        ])
    }

    pub fn store_kind(&self) -> StoreKind {
        self.store.unwrap_or(if self.redis_url.is_some() {
            StoreKind::Redis
        } else {
            StoreKind::Memory
        })
    }

    /// Each numeric setting with the range it must lie in: (flag, value, lowest, highest).
    fn ranges(&self) -> [(&'static str, u32, u32, u32); 22] {
        [
            ("lease_ms", self.lease_ms, 100, 3_600_000),
            ("max_talk_ms", self.max_talk_ms, 100, 3_600_000),
            ("session_ttl_ms", self.session_ttl_ms, 1_000, 86_400_000),
            (
                "node_dead_after_ms",
                self.node_dead_after_ms,
                100,
                3_600_000,
            ),
            (
                "node_heartbeat_ms",
                self.node_heartbeat_ms,
                50,
                self.node_dead_after_ms,
            ),
            (
                "node_forget_after_ms",
                self.node_forget_after_ms,
                self.node_dead_after_ms,
                604_800_000,
            ),
            ("redis_timeout_ms", self.redis_timeout_ms, 10, 60_000),
            ("redis_wait_replicas", self.redis_wait_replicas, 0, 16),
            ("sweep_interval_ms", self.sweep_interval_ms, 10, 60_000),
            ("audit_maxlen", self.audit_maxlen, 100, 100_000_000),
            (
                "audit_backlog_max",
                self.audit_backlog_max,
                100,
                100_000_000,
            ),
            (
                "audit_denial_window_ms",
                self.audit_denial_window_ms,
                100,
                3_600_000,
            ),
            ("emergency_max_ms", self.emergency_max_ms, 1_000, 86_400_000),
            ("audit_sweep_ms", self.audit_sweep_ms, 50, 3_600_000),
            ("audit_retention_days", self.audit_retention_days, 1, 36_500),
            (
                "max_sessions_per_user",
                self.max_sessions_per_user,
                1,
                10_000,
            ),
            (
                "max_channels_per_user",
                self.max_channels_per_user,
                1,
                100_000,
            ),
            (
                "max_syncs_per_channel",
                self.max_syncs_per_channel,
                1,
                10_000,
            ),
            ("max_syncs_per_user", self.max_syncs_per_user, 1, 10_000),
            (
                "max_members_per_channel",
                self.max_members_per_channel,
                1,
                1_000_000,
            ),
            ("resume_grace_ms", self.resume_grace_ms, 1_000, 600_000),
            ("max_node_capacity", self.max_node_capacity, 1, 1_000_000),
        ]
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.tls.validate().map_err(ConfigError::Tls)?;
        for (name, value, lo, hi) in self.ranges() {
            if !(lo..=hi).contains(&value) {
                return Err(ConfigError::OutOfRange(name, lo, hi));
            }
        }
        let printable = |v: &str, lo: usize, hi: usize| {
            (lo..=hi).contains(&v.len()) && v.chars().all(|c| c.is_ascii_graphic())
        };
        if !printable(&self.membership_channel, 1, 128) {
            return Err(ConfigError::BadMembershipChannel);
        }
        if let Some(token) = &self.admin_token
            && !printable(token, 16, 512)
        {
            return Err(ConfigError::BadAdminToken);
        }
        if self.key_prefix.is_empty()
            || self.key_prefix.len() > 64
            || self
                .key_prefix
                .chars()
                .any(|c| c == '{' || c == '}' || !c.is_ascii_graphic())
        {
            return Err(ConfigError::BadKeyPrefix);
        }
        if self.store_kind() == StoreKind::Redis && self.redis_url.is_none() {
            return Err(ConfigError::MissingRedisUrl);
        }
        Ok(())
    }

    /// How to reach the audit database, with its files read and checked; none when unset.
    pub fn postgres(&self) -> Result<Option<PostgresConnect>, ConfigError> {
        let Some(url) = &self.postgres_url else {
            return Ok(None);
        };
        let auth = PostgresAuth {
            password_file: self.postgres_password_file.clone(),
            ca: self.postgres_ca.clone(),
            client_cert: self.postgres_client_cert.clone(),
            client_key: self.postgres_client_key.clone(),
        };
        PostgresConnect::new(url, &auth).map(Some)
    }

    pub fn store_settings(&self) -> StoreSettings {
        StoreSettings {
            lease_ms: self.lease_ms,
            max_talk_ms: self.max_talk_ms,
            session_ttl_ms: self.session_ttl_ms,
            node_dead_after_ms: self.node_dead_after_ms,
            node_heartbeat_ms: self.node_heartbeat_ms,
            node_forget_after_ms: self.node_forget_after_ms,
            emergency_max_ms: self.emergency_max_ms,
            max_sessions_per_user: self.max_sessions_per_user,
            max_syncs_per_channel: self.max_syncs_per_channel,
            max_syncs_per_user: self.max_syncs_per_user,
            max_channels_per_user: self.max_channels_per_user,
            max_members_per_channel: self.max_members_per_channel,
            resume_grace_ms: self.resume_grace_ms,
            max_node_capacity: self.max_node_capacity,
        }
    }

    /// How to reach Redis, with its files read and checked.
    pub fn redis_options(&self) -> Result<RedisOptions, ConfigError> {
        let url = self
            .redis_url
            .as_deref()
            .ok_or(ConfigError::MissingRedisUrl)?;
        let auth = RedisAuth {
            username: self.redis_username.clone(),
            password_file: self.redis_password_file.clone(),
            ca: self.redis_ca.clone(),
            client_cert: self.redis_client_cert.clone(),
            client_key: self.redis_client_key.clone(),
        };
        Ok(RedisOptions {
            connect: RedisConnect::new(url, &auth)?,
            key_prefix: self.key_prefix.clone(),
            timeout: Duration::from_millis(u64::from(self.redis_timeout_ms)),
            // With the audit writer, a stream is trimmed only past what it has copied: a long
            // PostgreSQL outage grows the streams instead of losing history.
            audit_maxlen: if self.postgres_url.is_some() {
                0
            } else {
                self.audit_maxlen
            },
            audit_backlog_max: self.audit_backlog_max,
            audit_denial_window_ms: self.audit_denial_window_ms,
            membership_channel: self.membership_channel.clone(),
            wait_replicas: self.redis_wait_replicas,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_url_selects_redis_and_is_redacted() {
        let mut config = Config::for_tests();
        assert_eq!(config.store_kind(), StoreKind::Memory);
        config.redis_url = Some("redis://:secret@db:6379".into());
        config.admin_token = Some("admin-token-0123456789".into());
        assert_eq!(config.store_kind(), StoreKind::Redis);
        assert!(!format!("{config:?}").contains("secret"));
        assert!(!format!("{config:?}").contains("admin-token"));
        assert!(config.validate().is_ok());
    }

    #[test]
    fn bad_values_are_refused() {
        let mut config = Config::for_tests();
        config.store = Some(StoreKind::Redis);
        assert!(matches!(
            config.validate(),
            Err(ConfigError::MissingRedisUrl)
        ));
        let mut config = Config::for_tests();
        config.lease_ms = 5;
        assert!(config.validate().is_err());
        let mut config = Config::for_tests();
        config.key_prefix = "a{b}".into();
        assert!(config.validate().is_err());
        let mut config = Config::for_tests();
        config.admin_token = Some("short".into());
        assert!(matches!(config.validate(), Err(ConfigError::BadAdminToken)));
    }
}

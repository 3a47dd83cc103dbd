//! How state-svc reaches its backing stores: Redis (`redis://` or `rediss://` with TLS, an ACL
//! user and a password from a file) and PostgreSQL (TLS with full certificate verification, a
//! password from a file). Everything is read and checked once at start, so a bad file stops
//! the service with a message naming it; secrets never reach a log (`Debug` redacts them).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::future::BoxFuture;
use talkgroup_common::tls::{self, ClientCert};

use crate::error::{ConfigError, StoreError};

/// The longest secret read from a file; anything longer is not a password.
const MAX_SECRET: u64 = 4096;

/// The URL with any password replaced, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// Reads a secret from a file (a Kubernetes Secret volume), without its trailing newline.
fn read_secret(path: &Path, what: &'static str) -> Result<String, ConfigError> {
    let bad = |why: String| ConfigError::Secret(what, path.display().to_string(), why);
    let size = std::fs::metadata(path)
        .map_err(|e| bad(e.to_string()))?
        .len();
    if size > MAX_SECRET {
        return Err(bad(format!("longer than {MAX_SECRET} bytes")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let secret = text.trim_end_matches(['\r', '\n']).to_owned();
    if secret.is_empty() {
        return Err(bad("empty".into()));
    }
    Ok(secret)
}

fn client_cert(
    cert: Option<&PathBuf>,
    key: Option<&PathBuf>,
    store: &'static str,
) -> Result<Option<ClientCert>, ConfigError> {
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => {
            let files = ClientCert {
                cert: cert.clone(),
                key: key.clone(),
            };
            tls::check_client_cert(&files)
                .map_err(|e| ConfigError::StoreTls(store, e.to_string()))?;
            Ok(Some(files))
        }
        _ => Err(ConfigError::StoreTls(
            store,
            "a client certificate needs both its certificate and its key".into(),
        )),
    }
}

/// What the Redis flags say, checked.
#[derive(Clone)]
pub struct RedisConnect {
    info: redis::ConnectionInfo,
    /// `redis+sentinel://`: the Sentinels and the master's name; `info` then carries only the
    /// master's credentials.
    sentinel: Option<SentinelTarget>,
    /// `redis+cluster://`: the seed nodes of a Redis Cluster; `info` then carries the first
    /// seed and the credentials every node shares.
    cluster: Option<Vec<redis::ConnectionAddr>>,
    /// Whether the URL asks for TLS (`rediss://`).
    tls: bool,
    certificates: Option<redis::TlsCertificates>,
    /// The URL without its password, for logs.
    shown: String,
}

impl std::fmt::Debug for RedisConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConnect")
            .field("url", &self.shown)
            .field("tls", &self.tls)
            .field("username", &self.info.redis_settings().username())
            .field(
                "password",
                &self.info.redis_settings().password().map(|_| "***"),
            )
            .finish_non_exhaustive()
    }
}

/// Redis under Sentinel: where the Sentinels are and the name of the master they watch.
#[derive(Debug, Clone)]
struct SentinelTarget {
    addrs: Vec<redis::ConnectionAddr>,
    master: String,
}

/// Most Sentinels one URL may name.
const MAX_SENTINELS: usize = 16;

/// Parses `redis+sentinel://host:port[,host:port...]/<master name>`; `None` for other URLs.
fn sentinel_url(url: &str) -> Option<Result<SentinelTarget, ConfigError>> {
    if url.starts_with("rediss+sentinel://") {
        return Some(Err(ConfigError::StoreTls(
            "redis",
            "TLS to Sentinel and its master is not supported yet: use redis+sentinel://".into(),
        )));
    }
    let rest = url.strip_prefix("redis+sentinel://")?;
    let parse = || -> Option<SentinelTarget> {
        let (hosts, master) = rest.split_once('/')?;
        let valid_name = !master.is_empty()
            && master.len() <= 64
            && master
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !valid_name || hosts.contains('@') {
            return None;
        }
        host_list(hosts, MAX_SENTINELS).map(|addrs| SentinelTarget {
            addrs,
            master: master.to_owned(),
        })
    };
    Some(parse().ok_or(ConfigError::BadRedisUrl))
}

/// Most seed nodes one Cluster URL may name.
const MAX_SEEDS: usize = 64;

/// `host:port[,host:port...]`, at most `max` of them.
fn host_list(hosts: &str, max: usize) -> Option<Vec<redis::ConnectionAddr>> {
    let addrs: Vec<redis::ConnectionAddr> = hosts
        .split(',')
        .map(|h| {
            let (host, port) = h.rsplit_once(':')?;
            let port: u16 = port.parse().ok()?;
            (!host.is_empty() && !host.contains('@'))
                .then(|| redis::ConnectionAddr::Tcp(host.to_owned(), port))
        })
        .collect::<Option<_>>()?;
    (!addrs.is_empty() && addrs.len() <= max).then_some(addrs)
}

/// Parses `redis+cluster://host:port[,host:port...]` (the seed nodes); `None` for other URLs.
fn cluster_url(url: &str) -> Option<Result<Vec<redis::ConnectionAddr>, ConfigError>> {
    if url.starts_with("rediss+cluster://") {
        return Some(Err(ConfigError::StoreTls(
            "redis",
            "TLS to a Redis Cluster is not supported yet: use redis+cluster://".into(),
        )));
    }
    let rest = url.strip_prefix("redis+cluster://")?;
    let hosts = rest.strip_suffix('/').unwrap_or(rest);
    Some(host_list(hosts, MAX_SEEDS).ok_or(ConfigError::BadRedisUrl))
}

/// The Redis flags besides the URL.
#[derive(Debug, Clone, Default)]
pub struct RedisAuth {
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// The Redis settings with the username and password of the flags (a password in the URL and
/// in a file is refused).
fn with_credentials(
    mut settings: redis::RedisConnectionInfo,
    auth: &RedisAuth,
) -> Result<redis::RedisConnectionInfo, ConfigError> {
    if let Some(user) = &auth.username {
        if user.is_empty() || user.len() > 128 || !user.chars().all(|c| c.is_ascii_graphic()) {
            return Err(ConfigError::StoreTls(
                "redis",
                "the username must be 1 to 128 printable characters".into(),
            ));
        }
        settings = settings.set_username(user);
    }
    if let Some(path) = &auth.password_file {
        if settings.password().is_some() {
            return Err(ConfigError::StoreTls(
                "redis",
                "give the password in the URL or in --redis-password-file, not both".into(),
            ));
        }
        settings = settings.set_password(read_secret(path, "redis password")?);
    }
    Ok(settings)
}

/// The CA and client certificate for TLS to Redis, read and checked; none when neither is
/// given (the system roots then, over `rediss://`). Refused without TLS.
fn redis_certificates(
    tls: bool,
    auth: &RedisAuth,
) -> Result<Option<redis::TlsCertificates>, ConfigError> {
    let client = client_cert(auth.client_cert.as_ref(), auth.client_key.as_ref(), "redis")?;
    if auth.ca.is_none() && client.is_none() {
        return Ok(None);
    }
    if !tls {
        return Err(ConfigError::StoreTls(
            "redis",
            "--redis-ca and --redis-client-cert need a rediss:// URL".into(),
        ));
    }
    let root_cert = match &auth.ca {
        Some(ca) => {
            tls::read_roots(ca).map_err(|e| ConfigError::StoreTls("redis", e.to_string()))?;
            Some(read_file(ca, "redis")?)
        }
        None => None,
    };
    let client_tls = match client {
        Some(files) => Some(redis::ClientTlsConfig {
            client_cert: read_file(&files.cert, "redis")?,
            client_key: read_file(&files.key, "redis")?,
        }),
        None => None,
    };
    Ok(Some(redis::TlsCertificates {
        client_tls,
        root_cert,
    }))
}

impl RedisConnect {
    pub fn new(url: &str, auth: &RedisAuth) -> Result<Self, ConfigError> {
        let shown = redact_url(url);
        let sentinel = sentinel_url(url).transpose()?;
        let cluster = cluster_url(url).transpose()?;
        // Under Sentinel the credentials (from the flags) are the master's, and under Cluster
        // every node's; the URL names only where the Sentinels or the seed nodes are.
        let first = sentinel
            .as_ref()
            .map(|s| &s.addrs[0])
            .or(cluster.as_ref().map(|c| &c[0]));
        let url = match first {
            Some(redis::ConnectionAddr::Tcp(host, port)) => format!("redis://{host}:{port}"),
            Some(_) => return Err(ConfigError::BadRedisUrl),
            None => url.to_owned(),
        };
        let mut info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
            .map_err(|_| ConfigError::BadRedisUrl)?
            // Many small pipelined commands share one connection; with Nagle a write would
            // wait for the ACK of the previous one, which Redis delays (up to 40 ms on Linux).
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        let tls = match info.addr() {
            redis::ConnectionAddr::TcpTls { insecure, .. } => {
                if *insecure {
                    return Err(ConfigError::StoreTls(
                        "redis",
                        "#insecure (no certificate verification) is not supported".into(),
                    ));
                }
                true
            }
            redis::ConnectionAddr::Tcp(..) => false,
            _ => return Err(ConfigError::BadRedisUrl),
        };
        let settings = with_credentials(info.redis_settings().clone(), auth)?;
        info = info.set_redis_settings(settings);
        let certificates = redis_certificates(tls, auth)?;
        let this = Self {
            info,
            sentinel,
            cluster,
            tls,
            certificates,
            shown,
        };
        this.client().map_err(|_| ConfigError::BadRedisUrl)?;
        Ok(this)
    }

    /// Whether connections use TLS.
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// Whether the URL names Sentinels rather than one server.
    pub fn is_sentinel(&self) -> bool {
        self.sentinel.is_some()
    }

    /// Whether the URL names the seed nodes of a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// Under Cluster, a client of the cluster (every node with the configured credentials).
    pub fn cluster_client(
        &self,
        timeout: std::time::Duration,
        pushes: Option<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>,
    ) -> Result<Option<redis::cluster::ClusterClient>, StoreError> {
        let Some(seeds) = &self.cluster else {
            return Ok(None);
        };
        let nodes = seeds
            .iter()
            .map(|addr| self.info.clone().set_addr(addr.clone()));
        let mut builder = redis::cluster::ClusterClientBuilder::new(nodes)
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        if let Some(pushes) = pushes {
            builder = builder
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(pushes);
        }
        builder
            .build()
            .map(Some)
            .map_err(|_| StoreError::InvalidArgument("invalid redis cluster configuration"))
    }

    /// A client of one node at `addr` with this configuration's credentials (a Cluster's
    /// master, to scan its keys).
    pub fn node_client(&self, addr: redis::ConnectionAddr) -> Result<redis::Client, StoreError> {
        redis::Client::open(self.info.clone().set_addr(addr))
            .map_err(|_| StoreError::InvalidArgument("invalid redis configuration"))
    }

    /// Under Sentinel, a client of the Sentinels that names the current master (and connects
    /// to it with the configured credentials).
    pub fn sentinel_client(&self) -> Result<Option<redis::sentinel::SentinelClient>, StoreError> {
        let Some(target) = &self.sentinel else {
            return Ok(None);
        };
        let settings = self.info.redis_settings();
        let mut builder = redis::sentinel::SentinelClientBuilder::new(
            target.addrs.clone(),
            &target.master,
            redis::sentinel::SentinelServerType::Master,
        )
        .map_err(|_| StoreError::InvalidArgument("invalid sentinel configuration"))?
        .set_client_to_redis_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        if let Some(user) = settings.username() {
            builder = builder.set_client_to_redis_username(user);
        }
        if let Some(password) = settings.password() {
            builder = builder.set_client_to_redis_password(password);
        }
        builder
            .build()
            .map(Some)
            .map_err(|_| StoreError::InvalidArgument("invalid sentinel configuration"))
    }

    /// The URL without its password.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// A client with this configuration (every connection it opens verifies the server when
    /// TLS is on).
    pub fn client(&self) -> Result<redis::Client, StoreError> {
        let client = match &self.certificates {
            Some(certificates) => {
                redis::Client::build_with_tls(self.info.clone(), certificates.clone())
            }
            None => redis::Client::open(self.info.clone()),
        };
        client.map_err(|_| StoreError::InvalidArgument("invalid redis configuration"))
    }
}

fn read_file(path: &Path, store: &'static str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path)
        .map_err(|e| ConfigError::StoreTls(store, format!("cannot read {}: {e}", path.display())))
}

/// The PostgreSQL flags besides the URL.
#[derive(Debug, Clone, Default)]
pub struct PostgresAuth {
    pub password_file: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// How the audit writer and the history queries reach PostgreSQL.
#[derive(Clone)]
pub struct PostgresConnect {
    config: tokio_postgres::Config,
    /// With a CA: TLS is required and the server's certificate is verified for the host name.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for PostgresConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConnect")
            .field("hosts", &self.config.get_hosts().len())
            .field("user", &self.config.get_user())
            .field("dbname", &self.config.get_dbname())
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// A PostgreSQL connection: the client, and the future that drives it (spawn it).
pub type PgConnection = (
    tokio_postgres::Client,
    BoxFuture<'static, Result<(), tokio_postgres::Error>>,
);

impl PostgresConnect {
    pub fn new(url: &str, auth: &PostgresAuth) -> Result<Self, ConfigError> {
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|_| ConfigError::BadPostgresUrl)?;
        if let Some(path) = &auth.password_file {
            if config.get_password().is_some() {
                return Err(ConfigError::StoreTls(
                    "postgres",
                    "give the password in the URL or in --postgres-password-file, not both".into(),
                ));
            }
            config.password(read_secret(path, "postgres password")?);
        }
        let client = client_cert(
            auth.client_cert.as_ref(),
            auth.client_key.as_ref(),
            "postgres",
        )?;
        let tls = match &auth.ca {
            Some(ca) => {
                let tls = tls::verifying_client_config(ca, client.as_ref())
                    .map_err(|e| ConfigError::StoreTls("postgres", e.to_string()))?;
                // Never fall back to plaintext once a CA is configured.
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
                Some(Arc::new(tls))
            }
            None if client.is_some() => {
                return Err(ConfigError::StoreTls(
                    "postgres",
                    "--postgres-client-cert needs --postgres-ca".into(),
                ));
            }
            None => {
                if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
                    return Err(ConfigError::StoreTls(
                        "postgres",
                        "sslmode=require needs --postgres-ca (the server certificate is always verified)"
                            .into(),
                    ));
                }
                config.ssl_mode(tokio_postgres::config::SslMode::Disable);
                None
            }
        };
        Ok(Self { config, tls })
    }

    /// Whether connections use TLS.
    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    pub async fn connect(&self) -> Result<PgConnection, tokio_postgres::Error> {
        match &self.tls {
            Some(tls) => {
                let connector = tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone());
                let (client, connection) = self.config.connect(connector).await?;
                Ok((client, Box::pin(connection)))
            }
            None => {
                let (client, connection) = self.config.connect(tokio_postgres::NoTls).await?;
                Ok((client, Box::pin(connection)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, contents: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("connect-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn redis_password_comes_from_a_file_and_is_never_shown() {
        let file = temp("redis-pw", "s3cret-pass\n");
        let auth = RedisAuth {
            username: Some("talkgroup".into()),
            password_file: Some(file.clone()),
            ..RedisAuth::default()
        };
        let connect = RedisConnect::new("redis://127.0.0.1:6379/0", &auth).unwrap();
        assert_eq!(
            connect.info.redis_settings().password(),
            Some("s3cret-pass")
        );
        assert_eq!(connect.info.redis_settings().username(), Some("talkgroup"));
        assert!(!format!("{connect:?}").contains("s3cret"));
        let _ = std::fs::remove_file(file);
    }

    #[test]
    fn bad_redis_settings_are_refused() {
        let tls_only = RedisAuth {
            ca: Some("/nonexistent/ca.crt".into()),
            ..RedisAuth::default()
        };
        assert!(RedisConnect::new("redis://127.0.0.1:6379", &tls_only).is_err());
        assert!(
            RedisConnect::new("rediss://127.0.0.1:6379/#insecure", &RedisAuth::default()).is_err()
        );
        assert!(RedisConnect::new("http://x", &RedisAuth::default()).is_err());
        let half = RedisAuth {
            client_cert: Some("/tmp/x.crt".into()),
            ..RedisAuth::default()
        };
        assert!(RedisConnect::new("rediss://127.0.0.1:6379", &half).is_err());
        let both = RedisAuth {
            password_file: Some(temp("redis-pw2", "x")),
            ..RedisAuth::default()
        };
        assert!(RedisConnect::new("redis://:inurl@127.0.0.1:6379", &both).is_err());
        let empty = RedisAuth {
            password_file: Some(temp("redis-empty", "\n")),
            ..RedisAuth::default()
        };
        assert!(RedisConnect::new("redis://127.0.0.1:6379", &empty).is_err());
    }

    #[test]
    fn cluster_urls_name_seed_nodes() {
        let none = RedisAuth::default();
        let connect =
            RedisConnect::new("redis+cluster://r0:6379,r1:6380,10.0.0.3:6379", &none).unwrap();
        assert!(connect.is_cluster() && !connect.is_sentinel());
        assert_eq!(connect.cluster.as_ref().unwrap().len(), 3);
        assert!(
            connect
                .cluster_client(std::time::Duration::from_secs(1), None)
                .unwrap()
                .is_some()
        );
        assert!(RedisConnect::new("redis+cluster://r0:6379/", &none).is_ok());
        for bad in [
            "redis+cluster://",
            "redis+cluster://r0",
            "redis+cluster://r0:notaport",
            "redis+cluster://:6379",
            "redis+cluster://user:pw@r0:6379",
            "rediss+cluster://r0:6379",
        ] {
            assert!(RedisConnect::new(bad, &none).is_err(), "{bad}");
        }
        let many: Vec<String> = (0..65).map(|i| format!("r{i}:6379")).collect();
        let url = format!("redis+cluster://{}", many.join(","));
        assert!(RedisConnect::new(&url, &none).is_err(), "at most 64 seeds");
        assert!(
            !RedisConnect::new("redis://127.0.0.1:6379", &none)
                .unwrap()
                .is_cluster()
        );
    }

    #[test]
    fn postgres_tls_is_required_once_a_ca_is_given() {
        assert!(
            !PostgresConnect::new("postgres://u@h/db", &PostgresAuth::default())
                .unwrap()
                .tls()
        );
        assert!(
            PostgresConnect::new(
                "postgres://u@h/db?sslmode=require",
                &PostgresAuth::default()
            )
            .is_err()
        );
        assert!(PostgresConnect::new("not a url at all ===", &PostgresAuth::default()).is_err());
        let missing = PostgresAuth {
            ca: Some("/nonexistent/ca.crt".into()),
            ..PostgresAuth::default()
        };
        assert!(PostgresConnect::new("postgres://u@h/db", &missing).is_err());
    }
}

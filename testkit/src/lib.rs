//! Test harness shared by Talkgroup's service tests, end-to-end tests and benchmarks.
//!
//! - [`RedisServer`]: a real `redis-server` process on an ephemeral loopback port, with no
//!   persistence, that can be killed (`SIGKILL`) and restarted empty on the same port. The
//!   process dies with the test binary even when the harness never drops it (a watchdog shell
//!   holds the test's end of a pipe).
//! - [`ServiceProcess`]: a service binary started with JSON logs, whose listening address is
//!   read from its log.
//! - [`wait_until`]: poll a condition with a deadline instead of sleeping.
//! - [`TurnServer`]: a real coturn relay on a free loopback port, checking TURN REST API
//!   credentials against a shared secret.
//! - [`netns::Netns`]: a network namespace joined to this host by a veth pair, for clients
//!   behind a hard network or on a host of their own.

#[cfg(feature = "ws")]
pub mod jwt;
#[cfg(feature = "media")]
pub mod media;
pub mod netns;
pub mod postgres;
#[cfg(feature = "ws")]
pub mod ws;
pub use postgres::PostgresServer;
pub mod turn;
#[cfg(feature = "media")]
pub mod turn_probe;
#[cfg(feature = "media")]
pub mod turn_tls;
pub use turn::TurnServer;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Polls `check` every 10 ms until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat`.
pub fn process_cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // Linux reports in clock ticks of 1/100 s on every platform this project targets.
    Some(Duration::from_millis(ticks * 10))
}

/// CPU time of a process's live threads to the nanosecond, from each thread's
/// `/proc/<pid>/task/<tid>/schedstat`: for windows too short for the 10 ms ticks of
/// [`process_cpu_time`], over which the threads do not change (a thread that exits takes its
/// time with it).
pub fn threads_cpu_time(pid: u32) -> Option<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path().join("schedstat");
        let Ok(stat) = std::fs::read_to_string(path) else {
            continue;
        };
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(total))
}

/// Resident memory of a process in KiB, from `/proc/<pid>/status` (`"self"` for this one).
pub fn process_rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A free loopback port (bound and released; the caller retries if it is taken meanwhile).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A `redis-server` process owned by a test.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    pid: Option<u32>,
    watchdog: Option<(Child, ChildStdin)>,
    tls: Option<RedisTls>,
    /// Extra arguments (a replica's `--replicaof`).
    extra: Vec<String>,
    /// A Sentinel's configuration file: the process runs `--sentinel` with it.
    sentinel_config: Option<std::path::PathBuf>,
    /// A Cluster node: its bus port and its `nodes.conf` (kept across a restart, so the node
    /// rejoins as itself).
    cluster: Option<(u16, std::path::PathBuf)>,
}

/// TLS for a test Redis: its certificate, key and the CA clients must chain to (PEM files).
/// Clients must present a certificate (`tls-auth-clients yes`, Redis's default).
#[derive(Debug, Clone)]
pub struct RedisTls {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub ca: std::path::PathBuf,
    /// The TLS port, chosen at start.
    pub port: u16,
}

const WATCHDOG: &str = r#"redis-server "$@" & pid=$!; echo "$pid"; read -r _; kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null"#;

impl RedisServer {
    /// Starts Redis on a fresh ephemeral port.
    pub fn start() -> Result<Self> {
        Self::start_with(None)
    }

    /// Starts Redis with a TLS port besides the plain one (which the harness keeps for its
    /// own PING); `tls.port` is filled in.
    pub fn start_tls(tls: RedisTls) -> Result<Self> {
        Self::start_with(Some(tls))
    }

    /// Starts a replica of the Redis on `master_port`.
    pub fn start_replica(master_port: u16) -> Result<Self> {
        Self::start_full(
            None,
            vec![
                "--replicaof".into(),
                "127.0.0.1".into(),
                master_port.to_string(),
            ],
            None,
        )
    }

    fn start_with(tls: Option<RedisTls>) -> Result<Self> {
        Self::start_full(tls, Vec::new(), None)
    }

    /// Starts a Redis Cluster node (not yet part of a cluster: see [`RedisCluster`]).
    pub fn start_cluster_node() -> Result<Self> {
        let mut last_error = None;
        for _ in 0..5 {
            let port = free_port()?;
            let bus = free_port()?;
            let conf = std::env::temp_dir().join(format!(
                "talkgroup-cluster-{}-{port}.conf",
                std::process::id()
            ));
            let _ = std::fs::remove_file(&conf);
            let mut server = Self {
                port,
                pid: None,
                watchdog: None,
                tls: None,
                extra: Vec::new(),
                sentinel_config: None,
                cluster: Some((bus, conf)),
            };
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("redis cluster node did not start")))
    }

    fn start_full(
        tls: Option<RedisTls>,
        extra: Vec<String>,
        sentinel_config: Option<&str>,
    ) -> Result<Self> {
        let mut last_error = None;
        for attempt in 0..5 {
            let port = free_port()?;
            let mut tls = tls.clone();
            if let Some(tls) = tls.as_mut() {
                tls.port = free_port()?;
            }
            let sentinel_config = match sentinel_config {
                Some(body) => {
                    let path = std::env::temp_dir().join(format!(
                        "talkgroup-sentinel-{}-{port}-{attempt}.conf",
                        std::process::id()
                    ));
                    std::fs::write(&path, body)?;
                    Some(path)
                }
                None => None,
            };
            let mut server = Self {
                port,
                pid: None,
                watchdog: None,
                tls,
                extra: extra.clone(),
                sentinel_config,
                cluster: None,
            };
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("redis did not start")))
    }

    fn spawn(&mut self) -> Result<()> {
        let port = self.port.to_string();
        let mut tls_args: Vec<String> = Vec::new();
        if let Some(tls) = &self.tls {
            tls_args = vec![
                "--tls-port".into(),
                tls.port.to_string(),
                "--tls-cert-file".into(),
                tls.cert.display().to_string(),
                "--tls-key-file".into(),
                tls.key.display().to_string(),
                "--tls-ca-cert-file".into(),
                tls.ca.display().to_string(),
                "--tls-auth-clients".into(),
                "yes".into(),
            ];
        }
        let mut command = Command::new("sh");
        command.args(["-c", WATCHDOG, "sh"]);
        if let Some(config) = &self.sentinel_config {
            command.arg(config).arg("--sentinel");
        }
        command.args(["--port", &port, "--bind", "127.0.0.1"]);
        if self.sentinel_config.is_none() {
            command.args(["--save", "", "--appendonly", "no"]);
        }
        if let Some((bus, conf)) = &self.cluster {
            command
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus.to_string(),
                ])
                .arg("--cluster-config-file")
                .arg(conf)
                // A master is failed over about two seconds after its death.
                .args(["--cluster-node-timeout", "1000"]);
        }
        let mut child = command
            .args([
                "--dir",
                &std::env::temp_dir().to_string_lossy(),
                "--loglevel",
                "warning",
            ])
            .args(&tls_args)
            .args(&self.extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot run redis-server (install the Debian package redis-server)")?;
        let stdin = child.stdin.take().context("watchdog stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("watchdog stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let pid: u32 = line
            .trim()
            .parse()
            .context("watchdog did not report the redis pid")?;
        // Keep draining redis's stdout so it never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = stdout.read_to_end(&mut sink);
        });
        self.pid = Some(pid);
        self.watchdog = Some((child, stdin));
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.ping() {
                return Ok(());
            }
            if let Some((child, _)) = self.watchdog.as_mut()
                && child.try_wait()?.is_some()
            {
                bail!("redis-server exited at start (port {} taken?)", self.port);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
        bail!("redis-server did not answer PING on port {}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The `rediss://` URL of the TLS port, when started with TLS.
    pub fn tls_url(&self) -> Option<String> {
        self.tls
            .as_ref()
            .map(|tls| format!("rediss://127.0.0.1:{}", tls.port))
    }

    /// Runs one command on the plain port with `redis-cli` (ACL setup in tests), failing on
    /// an error reply.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .context("cannot run redis-cli")?;
        let reply = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() || reply.starts_with("ERR") || reply.contains("(error)") {
            bail!("redis-cli {args:?}: {reply}");
        }
        Ok(reply)
    }

    /// The Redis process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// True when the server answers PING.
    pub fn ping(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], self.port)),
            Duration::from_millis(200),
        ) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        let mut reply = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n"
    }

    /// `kill -9` of the Redis process: everything in memory is lost.
    pub fn kill(&mut self) {
        if let Some(pid) = self.pid.take() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        if let Some((mut child, stdin)) = self.watchdog.take() {
            drop(stdin);
            let _ = child.wait();
        }
    }

    /// Freezes the process (`SIGSTOP`): connections stay open and calls hang.
    pub fn pause(&self) {
        if let Some(pid) = self.pid {
            let _ = Command::new("kill")
                .args(["-STOP", &pid.to_string()])
                .status();
        }
    }

    /// Thaws a paused process (`SIGCONT`).
    pub fn resume(&self) {
        if let Some(pid) = self.pid {
            let _ = Command::new("kill")
                .args(["-CONT", &pid.to_string()])
                .status();
        }
    }

    /// Starts an empty Redis again on the same port.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// Redis under Sentinel, on loopback: a master, its replicas and three Sentinels that fail
/// over within about two seconds of the master's death (down after 1 s, quorum 2).
#[derive(Debug)]
pub struct RedisSentinels {
    /// The first master and its replica; after a failover their roles are swapped.
    pub servers: Vec<RedisServer>,
    pub sentinels: Vec<RedisServer>,
    pub master_name: String,
}

impl RedisSentinels {
    /// A master with one replica.
    pub fn start() -> Result<Self> {
        Self::start_with(1)
    }

    /// A master with `replicas` replicas.
    pub fn start_with(replicas: usize) -> Result<Self> {
        let master = RedisServer::start()?;
        let mut servers = vec![master];
        for _ in 0..replicas {
            servers.push(RedisServer::start_replica(servers[0].port())?);
        }
        let master_name = "talkgroup".to_owned();
        let config = format!(
            "sentinel monitor {master_name} 127.0.0.1 {port} 2\n\
             sentinel down-after-milliseconds {master_name} 1000\n\
             sentinel failover-timeout {master_name} 4000\n\
             sentinel parallel-syncs {master_name} 1\n",
            port = servers[0].port()
        );
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            sentinels.push(RedisServer::start_full(None, Vec::new(), Some(&config))?);
        }
        let this = Self {
            servers,
            sentinels,
            master_name,
        };
        // Ready once every Sentinel knows every replica (so it can promote one).
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            let known = this.sentinels.iter().all(|s| {
                s.cli(&["SENTINEL", "replicas", &this.master_name])
                    .is_ok_and(|r| {
                        this.servers[1..]
                            .iter()
                            .all(|replica| r.contains(&replica.port().to_string()))
                    })
            });
            if known {
                return Ok(this);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("the Sentinels did not discover the replicas")
    }

    /// The Sentinels' addresses, `127.0.0.1:<port>`.
    pub fn addresses(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port()))
            .collect()
    }

    /// The port of the master as the first Sentinel that answers names it.
    pub fn master_port(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|s| {
            let reply = s
                .cli(&["SENTINEL", "get-master-addr-by-name", &self.master_name])
                .ok()?;
            reply.lines().nth(1)?.trim().parse().ok()
        })
    }

    /// `kill -9` of the current master; its index in `servers`.
    pub fn kill_master(&mut self) -> Result<usize> {
        let port = self.master_port().context("no master known")?;
        let i = self
            .servers
            .iter()
            .position(|s| s.port() == port)
            .context("the master is not one of ours")?;
        self.servers[i].kill();
        Ok(i)
    }
}

/// A Redis Cluster on loopback: three masters with one replica each (`redis-cli --cluster
/// create`), failing a dead master over to its replica within about two seconds (node timeout
/// 1 s).
#[derive(Debug)]
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Three masters with one replica each.
    pub fn start() -> Result<Self> {
        Self::start_with(1)
    }

    /// Three masters with `replicas` replicas each.
    pub fn start_with(replicas: usize) -> Result<Self> {
        let nodes: Vec<RedisServer> = (0..3 * (1 + replicas))
            .map(|_| RedisServer::start_cluster_node())
            .collect::<Result<_>>()?;
        let this = Self { nodes };
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(this.seeds())
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .context("cannot run redis-cli")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        this.wait_ready(Duration::from_secs(20))?;
        Ok(this)
    }

    /// `127.0.0.1:<port>` of every node.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect()
    }

    /// The URL state-svc takes: `redis+cluster://<every node>`.
    pub fn url(&self) -> String {
        format!("redis+cluster://{}", self.seeds().join(","))
    }

    /// Waits until every running node says the cluster is up, every slot is served, and each
    /// replica is in sync with its master.
    pub fn wait_ready(&self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let ready = self.nodes.iter().filter(|n| n.pid().is_some()).all(|n| {
                let info_ok = n.cli(&["CLUSTER", "INFO"]).is_ok_and(|i| {
                    i.contains("cluster_state:ok") && i.contains("cluster_slots_ok:16384")
                });
                let synced = n.cli(&["INFO", "replication"]).is_ok_and(|r| {
                    !r.contains("role:slave") || r.contains("master_link_status:up")
                });
                info_ok && synced
            });
            if ready {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("the redis cluster did not become ready")
    }

    /// The index in `nodes` of the master that serves `key`'s slot.
    pub fn master_of(&self, key: &str) -> Result<usize> {
        let live = self
            .nodes
            .iter()
            .find(|n| n.pid().is_some())
            .context("no node runs")?;
        let slot: u16 = live.cli(&["CLUSTER", "KEYSLOT", key])?.trim().parse()?;
        for (i, node) in self.nodes.iter().enumerate() {
            if node.pid().is_none() {
                continue;
            }
            let role = node.cli(&["ROLE"])?;
            if !role.starts_with("master") {
                continue;
            }
            let nodes = node.cli(&["CLUSTER", "NODES"])?;
            let mine = nodes
                .lines()
                .find(|l| l.contains("myself"))
                .context("no myself line")?;
            let serves = mine.split_whitespace().skip(8).any(|range| {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                match (a.parse::<u16>(), b.parse::<u16>()) {
                    (Ok(a), Ok(b)) => (a..=b).contains(&slot),
                    _ => false,
                }
            });
            if serves {
                return Ok(i);
            }
        }
        bail!("no live master serves slot {slot}")
    }

    /// `kill -9` of the master that serves `key`; its index in `nodes`.
    pub fn kill_master_of(&mut self, key: &str) -> Result<usize> {
        let i = self.master_of(key)?;
        self.nodes[i].kill();
        Ok(i)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        if let Some(config) = self.sentinel_config.take() {
            let _ = std::fs::remove_file(config);
        }
        if let Some((_, conf)) = self.cluster.take() {
            let _ = std::fs::remove_file(conf);
        }
    }
}

/// A service binary running as its own process, with JSON logs on stdout.
#[derive(Debug)]
pub struct ServiceProcess {
    child: Child,
    pub addr: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
}

impl ServiceProcess {
    /// Starts `bin` with `args` and waits for the log line `listening_message` carrying an
    /// `addr` field.
    pub fn start(
        bin: &str,
        args: &[&str],
        envs: &[(&str, &str)],
        listening_message: &str,
    ) -> Result<Self> {
        let mut child = Command::new(bin)
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {bin}"))?;
        let stdout = child.stdout.take().context("service stdout")?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&logs);
        let wanted = listening_message.to_owned();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(json) = serde_json::from_str::<serde_json::Value>(&line)
                    && json["message"] == wanted.as_str()
                    && let Some(addr) = json["addr"]
                        .as_str()
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr);
                }
                if let Ok(mut logs) = sink.lock() {
                    logs.push(line);
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => Ok(Self { child, addr, logs }),
            Err(_) => {
                let _ = child.kill();
                let logs = logs.lock().map(|l| l.join("\n")).unwrap_or_default();
                bail!("{bin} did not log {listening_message:?}; its log:\n{logs}")
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The `addr` field of the first log line with `message` so far (for example the
    /// "metrics listening" line of a service started with `--metrics-listen 127.0.0.1:0`).
    pub fn logged_addr(&self, message: &str) -> Option<SocketAddr> {
        self.logs().iter().find_map(|line| {
            let json: serde_json::Value = serde_json::from_str(line).ok()?;
            (json["message"] == message)
                .then(|| json["addr"].as_str()?.parse().ok())
                .flatten()
        })
    }

    /// Log lines so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Kills the process at once (SIGKILL: no shutdown of any kind) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM without waiting.
    pub fn signal_term(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Waits for the process to exit and returns its code (None if killed by a signal);
    /// kills it and fails after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<i32>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.code());
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                bail!("process did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM and waits for the exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Result<Option<i32>> {
        self.signal_term();
        self.wait_exit(timeout)
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! A `turnserver` (coturn, Debian's `coturn` package) owned by a test: a TURN relay on a free
//! port, under the shipped relay policy (`deploy/overlays/prod/turnserver.conf`: no TCP
//! relaying, every peer refused but the media node's address, quotas), checking credentials in
//! the TURN REST API form against a shared secret. The secret goes into its configuration
//! file, as in the shipped DaemonSet, never onto its command line. Like
//! [`crate::RedisServer`], it runs under a small shell watchdog that kills it when the test
//! process goes away.

use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::free_port;

/// The relay policy the production overlay ships, which the tests run coturn under.
pub const POLICY: &str = include_str!("../../deploy/overlays/prod/turnserver.conf");

const WATCHDOG: &str = r#"turnserver "$@" & pid=$!; echo "$pid"; read -r _; kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null"#;

/// A running coturn relay.
#[derive(Debug)]
pub struct TurnServer {
    ip: IpAddr,
    port: u16,
    /// TURN over TLS: its port, when started with a certificate.
    tls_port: Option<u16>,
    watchdog: Option<(Child, ChildStdin)>,
    /// Its configuration file (the policy, the secret, the allowed peer), removed with it.
    config: std::path::PathBuf,
}

/// The relay's certificate and key (PEM files) for TURN over TLS.
#[derive(Debug, Clone)]
pub struct TurnTls {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

impl TurnServer {
    /// Starts coturn on a free loopback port with `secret` as its `static-auth-secret`.
    pub fn start(secret: &str) -> Result<Self> {
        Self::start_on(IpAddr::V4(Ipv4Addr::LOCALHOST), secret)
    }

    /// Starts coturn listening and relaying on `ip` (a veth address, for clients in a network
    /// namespace). The media node must be on `ip` too: it is the one peer the policy lets
    /// the relay reach.
    pub fn start_on(ip: IpAddr, secret: &str) -> Result<Self> {
        Self::start_with(ip, secret, None)
    }

    /// Starts coturn on `ip` with TURN over TLS too (on a second port), with this
    /// certificate.
    pub fn start_tls(ip: IpAddr, secret: &str, tls: &TurnTls) -> Result<Self> {
        Self::start_with(ip, secret, Some(tls))
    }

    fn start_with(ip: IpAddr, secret: &str, tls: Option<&TurnTls>) -> Result<Self> {
        let mut last_error = None;
        for _ in 0..5 {
            let port = free_port()?;
            let tls = match tls {
                Some(tls) => Some((tls, free_port()?)),
                None => None,
            };
            match Self::spawn(ip, port, secret, tls) {
                Ok(server) => return Ok(server),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("turnserver did not start")))
    }

    fn spawn(ip: IpAddr, port: u16, secret: &str, tls: Option<(&TurnTls, u16)>) -> Result<Self> {
        let port_arg = port.to_string();
        let ip_arg = ip.to_string();
        let tls_args: Vec<String> = match tls {
            Some((files, tls_port)) => vec![
                "--tls-listening-port".into(),
                tls_port.to_string(),
                "--cert".into(),
                files.cert.display().to_string(),
                "--pkey".into(),
                files.key.display().to_string(),
                "--no-tlsv1".into(),
                "--no-tlsv1_1".into(),
            ],
            None => vec!["--no-tls".into()],
        };
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let config =
            std::env::temp_dir().join(format!("talkgroup-turn-{}-{n}.conf", std::process::id()));
        // The test's media node listens on `ip`; on loopback coturn also wants loopback peers
        // allowed at all (the policy still refuses every other loopback address).
        std::fs::write(
            &config,
            format!("{POLICY}\nstatic-auth-secret={secret}\nallowed-peer-ip={ip}\n"),
        )?;
        let config_arg = config.display().to_string();
        let mut child = Command::new("sh")
            .args(["-c", WATCHDOG, "sh"])
            .args([
                "-c",
                &config_arg,
                "--listening-ip",
                &ip_arg,
                "--relay-ip",
                &ip_arg,
                "--listening-port",
                &port_arg,
                "--no-dtls",
                "--allow-loopback-peers",
                "--log-file",
                "stdout",
                "--simple-log",
                "--pidfile",
                "",
            ])
            .args(&tls_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot run turnserver (install the Debian package coturn)")?;
        let stdin = child.stdin.take().context("watchdog stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("watchdog stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        // Keep draining coturn's log so it never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = stdout.read_to_end(&mut sink);
        });
        let mut server = Self {
            ip,
            port,
            tls_port: tls.map(|(_, p)| p),
            watchdog: Some((child, stdin)),
            config,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            // coturn listens on TCP as well as UDP on its port (and on the TLS port).
            let listening = |port| {
                TcpStream::connect_timeout(&SocketAddr::new(ip, port), Duration::from_millis(200))
                    .is_ok()
            };
            if listening(port) && server.tls_port.is_none_or(listening) {
                return Ok(server);
            }
            if let Some((child, _)) = server.watchdog.as_mut()
                && child.try_wait()?.is_some()
            {
                bail!("turnserver exited at start (port {port} taken?)");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        server.stop();
        bail!("turnserver did not listen on port {port}")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The relay's address (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }

    /// `turn:` URLs of the relay over UDP and over TCP.
    pub fn urls(&self) -> Vec<String> {
        vec![
            format!("turn:{}:{}?transport=udp", self.ip, self.port),
            format!("turn:{}:{}?transport=tcp", self.ip, self.port),
        ]
    }

    /// The TURN-over-TLS port, when started with a certificate.
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }

    /// The `turns:` URL of the relay (TURN over TLS over TCP), when started with a
    /// certificate.
    pub fn tls_url(&self) -> Option<String> {
        self.tls_port
            .map(|port| format!("turns:{}:{port}?transport=tcp", self.ip))
    }

    fn stop(&mut self) {
        if let Some((mut child, stdin)) = self.watchdog.take() {
            drop(stdin);
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.config);
    }
}

impl Drop for TurnServer {
    fn drop(&mut self) {
        self.stop();
    }
}

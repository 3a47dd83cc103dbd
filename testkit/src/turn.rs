//! A `turnserver` (coturn, Debian's `coturn` package) owned by a test: a TURN relay on a free
//! loopback port, checking credentials in the TURN REST API form against a shared secret
//! (`use-auth-secret`), allowed to relay to loopback peers (where the test's media node is).
//! Like [`crate::RedisServer`], it runs under a small shell watchdog that kills it when the
//! test process goes away.

use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::free_port;

const WATCHDOG: &str = r#"turnserver "$@" & pid=$!; echo "$pid"; read -r _; kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null"#;

/// A running coturn relay.
#[derive(Debug)]
pub struct TurnServer {
    ip: IpAddr,
    port: u16,
    watchdog: Option<(Child, ChildStdin)>,
}

impl TurnServer {
    /// Starts coturn on a free loopback port with `secret` as its `static-auth-secret`.
    pub fn start(secret: &str) -> Result<Self> {
        Self::start_on(IpAddr::V4(Ipv4Addr::LOCALHOST), secret)
    }

    /// Starts coturn listening and relaying on `ip` (a veth address, for clients in a network
    /// namespace).
    pub fn start_on(ip: IpAddr, secret: &str) -> Result<Self> {
        let mut last_error = None;
        for _ in 0..5 {
            let port = free_port()?;
            match Self::spawn(ip, port, secret) {
                Ok(server) => return Ok(server),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("turnserver did not start")))
    }

    fn spawn(ip: IpAddr, port: u16, secret: &str) -> Result<Self> {
        let port_arg = port.to_string();
        let ip_arg = ip.to_string();
        let mut child = Command::new("sh")
            .args(["-c", WATCHDOG, "sh"])
            .args([
                "-n",
                "--no-cli",
                "--listening-ip",
                &ip_arg,
                "--relay-ip",
                &ip_arg,
                "--listening-port",
                &port_arg,
                "--use-auth-secret",
                "--static-auth-secret",
                secret,
                "--realm",
                "talkgroup.test",
                "--fingerprint",
                "--no-tls",
                "--no-dtls",
                "--allow-loopback-peers",
                "--no-multicast-peers",
                "--log-file",
                "stdout",
                "--simple-log",
                "--pidfile",
                "",
            ])
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
            watchdog: Some((child, stdin)),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            // coturn listens on TCP as well as UDP on its port.
            if TcpStream::connect_timeout(&SocketAddr::new(ip, port), Duration::from_millis(200))
                .is_ok()
            {
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

    /// `turn:` URLs of the relay over UDP and over TCP.
    pub fn urls(&self) -> Vec<String> {
        vec![
            format!("turn:{}:{}?transport=udp", self.ip, self.port),
            format!("turn:{}:{}?transport=tcp", self.ip, self.port),
        ]
    }

    fn stop(&mut self) {
        if let Some((mut child, stdin)) = self.watchdog.take() {
            drop(stdin);
            let _ = child.wait();
        }
    }
}

impl Drop for TurnServer {
    fn drop(&mut self) {
        self.stop();
    }
}

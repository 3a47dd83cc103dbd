//! A real coturn relay for a stack: TURN over UDP and TCP, and with `tls` over TLS too, with a
//! throwaway certificate for the relay's address from a CA of its own (which a browser is told
//! to trust), and the shared secret in a file for the gateways.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use talkgroup_common::devcerts::DevCa;
use talkgroup_common::tls::Identity;
use testkit::TurnServer;
use testkit::turn::TurnTls;

/// The secret coturn and the gateways share.
pub const TURN_SECRET: &str = "a-turn-secret-shared-with-coturn";

/// A running relay and its files, removed with it.
#[derive(Debug)]
pub struct TestRelay {
    pub turn: TurnServer,
    /// The CA bundle the relay's certificate chains to.
    pub ca: PathBuf,
    pub secret_file: PathBuf,
    dir: PathBuf,
}

impl TestRelay {
    /// Starts coturn listening and relaying on `ip`, with TURN over TLS when `tls`.
    pub fn start(ip: Ipv4Addr, tls: bool) -> Result<Self> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("talkgroup-relay-{}-{n}", std::process::id()));
        let ca = DevCa::new("relay test CA").map_err(|e| anyhow::anyhow!("{e}"))?;
        let files = ca.write(&dir, "turn", &Identity::Gateway, &[&ip.to_string()])?;
        let turn = if tls {
            TurnServer::start_tls(
                ip.into(),
                TURN_SECRET,
                &TurnTls {
                    cert: files.cert.clone(),
                    key: files.key.clone(),
                },
            )
        } else {
            TurnServer::start_on(ip.into(), TURN_SECRET)
        }
        .context("coturn (apt-get install coturn)")?;
        let secret_file = dir.join("turn-secret");
        std::fs::write(&secret_file, TURN_SECRET)?;
        Ok(Self {
            turn,
            ca: files.ca,
            secret_file,
            dir,
        })
    }

    /// The port clients reach the relay on: its TLS port when it has one.
    pub fn port(&self) -> u16 {
        self.turn.tls_port().unwrap_or_else(|| self.turn.port())
    }

    /// The gateway flags that hand the relay out: its `turns:` URL when it has TLS, otherwise
    /// its `turn:` URLs over UDP and TCP.
    pub fn gateway_args(&self) -> Vec<String> {
        let urls = self
            .turn
            .tls_url()
            .unwrap_or_else(|| self.turn.urls().join(","));
        vec![
            "--turn-url".into(),
            urls,
            "--turn-secret-file".into(),
            self.secret_file.display().to_string(),
        ]
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

//! A PostgreSQL server owned by a test: `initdb` into a temporary directory, `pg_ctl` to start
//! and stop it (stopping and starting again keeps the data, for fault tests), on an ephemeral
//! loopback port, trust authentication for the user `tg`. As root, the server runs as the
//! `postgres` system user (PostgreSQL refuses to run as root).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

use crate::free_port;

/// The directory with `initdb`, `pg_ctl` and `postgres`.
fn bin_dir() -> Result<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").is_file() {
            return Ok(dir);
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL not found: install the Debian package postgresql")?
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|p| p.join("initdb").is_file())
        .collect();
    versions.sort();
    versions
        .pop()
        .context("no initdb under /usr/lib/postgresql/*/bin")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

#[derive(Debug)]
pub struct PostgresServer {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
    running: bool,
    tls: bool,
}

impl PostgresServer {
    /// Creates a cluster and starts it.
    pub fn start() -> Result<Self> {
        Self::start_with(None)
    }

    /// Creates a cluster that takes TCP connections over TLS only (`ssl=on`, `hostssl` in
    /// `pg_hba.conf`, plaintext TCP rejected), with this certificate and key (PEM), and starts
    /// it.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Result<Self> {
        Self::start_with(Some((cert_pem, key_pem)))
    }

    fn start_with(tls: Option<(&str, &str)>) -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let bin = bin_dir()?;
        let dir = std::env::temp_dir().join(format!(
            "talkgroup-pg-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let as_postgres = is_root();
        if as_postgres {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()?;
            if !status.success() {
                bail!("cannot hand {} to the postgres user", dir.display());
            }
        }
        let mut server = Self {
            dir,
            bin,
            port: free_port()?,
            as_postgres,
            running: false,
            tls: tls.is_some(),
        };
        let data = server.data_dir();
        server.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "tg",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        )?;
        if let Some((cert, key)) = tls {
            server.install_tls(cert, key)?;
        }
        server.resume()?;
        Ok(server)
    }

    /// Writes the server's certificate and key into the data directory and allows TCP over
    /// TLS only.
    fn install_tls(&self, cert: &str, key: &str) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let data = PathBuf::from(self.data_dir());
        std::fs::write(data.join("server.crt"), cert)?;
        std::fs::write(data.join("server.key"), key)?;
        std::fs::set_permissions(
            data.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )?;
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 trust\n\
             hostnossl all all 127.0.0.1/32 reject\n",
        )?;
        if self.as_postgres {
            for file in ["server.crt", "server.key", "pg_hba.conf"] {
                let status = Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(data.join(file))
                    .status()?;
                if !status.success() {
                    bail!("cannot hand {file} to the postgres user");
                }
            }
        }
        Ok(())
    }

    fn data_dir(&self) -> String {
        self.dir.join("data").to_string_lossy().into_owned()
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<()> {
        let path = self.bin.join(tool);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        let out = command
            .args(args)
            .current_dir(&self.dir)
            .output()
            .with_context(|| format!("cannot run {}", path.display()))?;
        if !out.status.success() {
            bail!(
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Starts the server again (after [`PostgresServer::stop`]); the data is kept.
    pub fn resume(&mut self) -> Result<()> {
        let data = self.data_dir();
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off",
            self.port,
            self.dir.display()
        );
        if self.tls {
            options.push_str(" -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key");
        }
        let log = self.dir.join("server.log").to_string_lossy().into_owned();
        self.run(
            "pg_ctl",
            &[
                "-D", &data, "-o", &options, "-l", &log, "-w", "-t", "30", "start",
            ],
        )?;
        self.running = true;
        Ok(())
    }

    /// Stops the server (fast shutdown: connections are cut).
    pub fn stop(&mut self) -> Result<()> {
        let data = self.data_dir();
        self.run("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"])?;
        self.running = false;
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for `tokio-postgres` (user `tg`, database `postgres`, no password).
    pub fn url(&self) -> String {
        format!("postgres://tg@127.0.0.1:{}/postgres", self.port)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if self.running {
            let _ = self.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

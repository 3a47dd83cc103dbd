//! Headless Chromium driven over the Chrome DevTools protocol (one WebSocket to the browser,
//! flattened sessions per page): enough to open pages, run script, press keys and take
//! screenshots. Chromium is Debian's `chromium` (`CHROMIUM` overrides the path), started with
//! fake media devices and loopback ICE allowed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::{Mutex as AsyncMutex, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Sink = SplitSink<WebSocketStream<MaybeTlsStream<TcpStream>>, Message>;
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// The Chromium binary, if installed.
pub fn chromium_path() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// Where tests put screenshots and other artifacts: `target/e2e-artifacts` (or
/// `TALKGROUP_ARTIFACTS`).
pub fn artifact_dir() -> PathBuf {
    let dir = std::env::var("TALKGROUP_ARTIFACTS").map_or_else(
        |_| {
            std::env::current_exe()
                .ok()
                .and_then(|exe| exe.ancestors().nth(3).map(Path::to_path_buf))
                .unwrap_or_else(std::env::temp_dir)
                .join("e2e-artifacts")
        },
        PathBuf::from,
    );
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// A running headless Chromium. Dropping it kills the browser.
#[derive(Debug)]
pub struct Browser {
    child: Child,
    profile: PathBuf,
    ws_url: String,
    /// The network namespace it runs in: its DevTools port is on that namespace's loopback.
    netns: Option<String>,
}

/// Where a [`Browser`] runs: this host's network, or a network namespace.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// Run inside this network namespace (`ip netns exec`), its DevTools port on `devtools_ip`.
    pub netns: Option<(String, std::net::Ipv4Addr)>,
    /// Origins treated as secure (for the microphone) although plain HTTP off loopback.
    pub secure_origins: Vec<String>,
    /// A CA certificate (PEM) Chromium trusts besides its own roots, installed in the NSS
    /// database of the profile's home (`certutil`, Debian's libnss3-tools), as a user would.
    pub trust_ca: Option<PathBuf>,
}

/// Creates an NSS database under `home/.pki/nssdb` (where Chromium on Linux looks) that
/// trusts `ca` for TLS servers.
fn trust_in_nss(home: &Path, ca: &Path) -> Result<()> {
    let db = home.join(".pki/nssdb");
    std::fs::create_dir_all(&db)?;
    let db = format!("sql:{}", db.display());
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new("certutil")
            .args(args)
            .output()
            .context("cannot run certutil (apt-get install libnss3-tools)")?;
        if !out.status.success() {
            bail!(
                "certutil {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    run(&["-N", "-d", &db, "--empty-password"])?;
    let ca = ca.to_string_lossy();
    run(&[
        "-A",
        "-d",
        &db,
        "-t",
        "C,,",
        "-n",
        "talkgroup-test-ca",
        "-i",
        &ca,
    ])
}

impl Browser {
    pub fn launch() -> Result<Self> {
        Self::launch_with(&Launch::default())
    }

    pub fn launch_with(launch: &Launch) -> Result<Self> {
        static N: AtomicU64 = AtomicU64::new(0);
        let bin =
            chromium_path().context("Chromium is not installed (apt-get install chromium)")?;
        let profile = std::env::temp_dir().join(format!(
            "talkgroup-chromium-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile)?;
        let mut command = match &launch.netns {
            Some((ns, _)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        if let Some(ca) = &launch.trust_ca {
            let home = profile.join("home");
            trust_in_nss(&home, ca)?;
            command.env("HOME", &home);
        }
        if !launch.secure_origins.is_empty() {
            command.arg(format!(
                "--unsafely-treat-insecure-origin-as-secure={}",
                launch.secure_origins.join(",")
            ));
        }
        let child = command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--use-fake-device-for-media-stream",
                "--use-fake-ui-for-media-stream",
                "--allow-loopback-in-peer-connection",
                "--autoplay-policy=no-user-gesture-required",
                "--disable-audio-output",
                "--remote-debugging-port=0",
                "--window-size=800,900",
            ])
            .arg("--remote-debugging-address=127.0.0.1")
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut browser = Self {
            child,
            profile,
            ws_url: String::new(),
            netns: launch.netns.as_ref().map(|(ns, _)| ns.clone()),
        };
        // Chromium writes its DevTools port and browser path into the profile once listening.
        let file = browser.profile.join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&file)
                && let Some((port, path)) = text.split_once('\n')
                && !path.trim().is_empty()
            {
                browser.ws_url = format!("ws://127.0.0.1:{}{}", port.trim(), path.trim());
                return Ok(browser);
            }
            if let Some(status) = browser.child.try_wait()? {
                bail!("chromium exited at start: {status}");
            }
            if Instant::now() > deadline {
                bail!("chromium did not open its DevTools port within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A DevTools connection to the browser.
    pub async fn connect(&self) -> Result<Cdp> {
        let port: u16 = self
            .ws_url
            .trim_start_matches("ws://127.0.0.1:")
            .split('/')
            .next()
            .and_then(|p| p.parse().ok())
            .context("DevTools port")?;
        let stream = match self.netns.clone() {
            None => TcpStream::connect(("127.0.0.1", port)).await?,
            Some(ns) => {
                let std_stream =
                    tokio::task::spawn_blocking(move || connect_in_netns(&ns, port)).await??;
                TcpStream::from_std(std_stream)?
            }
        };
        let (ws, _) =
            tokio_tungstenite::client_async(self.ws_url.as_str(), MaybeTlsStream::Plain(stream))
                .await?;
        let (sink, mut stream) = ws.split();
        let pending: Pending = Arc::default();
        let console = Arc::new(Mutex::new(Vec::new()));
        let (p, c) = (Arc::clone(&pending), Arc::clone(&console));
        tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                let Message::Text(text) = msg else { continue };
                let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
                    continue;
                };
                if let Some(id) = v["id"].as_u64() {
                    if let Some(tx) = p.lock().unwrap().remove(&id) {
                        let _ = tx.send(v);
                    }
                } else if v["method"] == "Runtime.consoleAPICalled" {
                    let args: Vec<String> = v["params"]["args"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|a| a["value"].to_string())
                        .collect();
                    c.lock().unwrap().push(args.join(" "));
                } else if v["method"] == "Runtime.exceptionThrown" {
                    c.lock().unwrap().push(
                        v["params"]["exceptionDetails"]["exception"]["description"].to_string(),
                    );
                }
            }
        });
        Ok(Cdp {
            inner: Arc::new(CdpInner {
                sink: AsyncMutex::new(sink),
                pending,
                next: AtomicU64::new(1),
                console,
            }),
        })
    }
}

/// Connects to `127.0.0.1:port` inside network namespace `ns`, from a thread that enters it
/// (a socket stays in the namespace it was made in, whichever thread then uses it).
fn connect_in_netns(ns: &str, port: u16) -> Result<std::net::TcpStream> {
    let ns = ns.to_owned();
    std::thread::spawn(move || -> Result<std::net::TcpStream> {
        let file = std::fs::File::open(format!("/var/run/netns/{ns}"))
            .with_context(|| format!("network namespace {ns}"))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .context("enter the network namespace")?;
        let stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
        stream.set_nonblocking(true)?;
        Ok(stream)
    })
    .join()
    .map_err(|_| anyhow!("namespace thread panicked"))?
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

#[derive(Debug)]
struct CdpInner {
    sink: AsyncMutex<Sink>,
    pending: Pending,
    next: AtomicU64,
    console: Arc<Mutex<Vec<String>>>,
}

/// A DevTools protocol connection.
#[derive(Debug, Clone)]
pub struct Cdp {
    inner: Arc<CdpInner>,
}

impl Cdp {
    /// Calls `method` (on a page when `session` is given) and returns its `result`.
    pub async fn call(&self, method: &str, params: Value, session: Option<&str>) -> Result<Value> {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let (tx, rx) = oneshot::channel();
        self.inner.pending.lock().unwrap().insert(id, tx);
        self.inner
            .sink
            .lock()
            .await
            .send(Message::Text(msg.to_string().into()))
            .await?;
        let reply = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .map_err(|_| anyhow!("{method}: no reply within 30 s"))??;
        if let Some(error) = reply.get("error") {
            bail!("{method}: {error}");
        }
        Ok(reply["result"].clone())
    }

    /// Opens `url` in a new page.
    pub async fn new_page(&self, url: &str) -> Result<Page> {
        let target = self
            .call("Target.createTarget", json!({"url": url}), None)
            .await?;
        let target_id = target["targetId"].as_str().context("targetId")?.to_owned();
        let attached = self
            .call(
                "Target.attachToTarget",
                json!({"targetId": target_id, "flatten": true}),
                None,
            )
            .await?;
        let session = attached["sessionId"]
            .as_str()
            .context("sessionId")?
            .to_owned();
        let page = Page {
            cdp: self.clone(),
            session,
        };
        page.call("Runtime.enable", json!({})).await?;
        // Every page behaves as focused, as a visible tab would.
        page.call(
            "Emulation.setFocusEmulationEnabled",
            json!({"enabled": true}),
        )
        .await?;
        Ok(page)
    }

    /// What the pages logged to their consoles (for failure messages).
    pub fn console(&self) -> Vec<String> {
        self.inner.console.lock().unwrap().clone()
    }
}

/// One page (tab).
#[derive(Debug)]
pub struct Page {
    cdp: Cdp,
    session: String,
}

impl Page {
    pub async fn call(&self, method: &str, params: Value) -> Result<Value> {
        self.cdp.call(method, params, Some(&self.session)).await
    }

    /// Evaluates `expression` (awaiting a promise) and returns its value.
    pub async fn eval(&self, expression: &str) -> Result<Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "awaitPromise": true, "returnByValue": true}),
            )
            .await?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("script failed: {}", e["exception"]["description"]);
        }
        Ok(r["result"]["value"].clone())
    }

    /// Polls `expression` until it is truthy; returns its value.
    pub async fn wait_for(&self, expression: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.eval(expression).await?;
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out waiting for `{expression}`; console: {:?}",
                    self.cdp.console()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Presses (`down`) or releases a key, as a keyboard would.
    pub async fn key(&self, down: bool, key: &str, code: &str, key_code: u32) -> Result<()> {
        self.call(
            "Input.dispatchKeyEvent",
            json!({
                "type": if down { "keyDown" } else { "keyUp" },
                "key": key,
                "code": code,
                "windowsVirtualKeyCode": key_code,
            }),
        )
        .await?;
        Ok(())
    }

    /// Saves a PNG screenshot to `path`.
    pub async fn screenshot(&self, path: &Path) -> Result<()> {
        // Only the front tab of a headless browser renders frames.
        self.call("Page.bringToFront", json!({})).await?;
        let shot = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().context("screenshot data")?)?;
        std::fs::write(path, png)?;
        Ok(())
    }
}

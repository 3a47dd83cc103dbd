//! End-to-end harness for Talkgroup: the real service binaries as separate processes on
//! ephemeral loopback ports, one real Redis, clients that speak the WebSocket protocol with real
//! WebRTC audio, and (in [`browser`]) headless Chromium driven over the DevTools protocol.
//!
//! The binaries are the ones `cargo build --bins` puts beside this crate's test executables
//! (`target/debug` for tests, `target/release` for the benchmark); `TALKGROUP_BIN_DIR`
//! overrides where they are looked up. `scripts/test` builds them first.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod browser;
pub mod client;
pub use testkit::netns;
pub mod relay;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use talkgroup_common::devcerts::DevCa;
use talkgroup_common::grpc::Security;
use talkgroup_common::tls::{Expect, Identity, Tls, TlsFiles};
use talkgroup_proto::state::v1 as spb;
use testkit::{RedisServer, ServiceProcess};
use tonic::transport::Channel;

pub use client::Client;

/// The HS256 secret every gateway of a test stack shares.
pub const SECRET: &str = "talkgroup-e2e-secret-0123456789";
/// The admin token of every state-svc of a test stack.
/// Gateway flags for clients that all connect from this host (load tools, benchmarks): one
/// source, so the per-source budgets are raised out of the way.
pub const ONE_HOST_GATEWAY_ARGS: [&str; 4] = [
    "--max-sockets-per-address",
    "100000",
    "--max-connections-per-address",
    "100000",
];

pub const ADMIN_TOKEN: &str = "talkgroup-e2e-admin-token-0123";

/// Where the service binaries are.
pub fn binary(name: &str) -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("TALKGROUP_BIN_DIR") {
        let path = PathBuf::from(dir).join(name);
        return if path.is_file() {
            Ok(path)
        } else {
            bail!("{} not found (TALKGROUP_BIN_DIR)", path.display())
        };
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> → target/<profile>/<name>
    for dir in exe.ancestors().skip(1).take(3) {
        let path = dir.join(name);
        if path.is_file() {
            return Ok(path);
        }
    }
    bail!(
        "{name} not found beside {}: build the services first (`cargo build --bins`, or \
         `cargo build --release --bins` for benchmarks)",
        exe.display()
    )
}

/// How many of each service a [`Stack`] runs. State-svc `i` serves gateway `i % state` and
/// media node `i % state`.
#[derive(Debug, Clone)]
pub struct Topology {
    pub state: usize,
    pub media: usize,
    pub gateways: usize,
    /// Floor lease and maximum talk time at state-svc.
    pub lease_ms: u32,
    pub max_talk_ms: u32,
    /// Extra gateway flags.
    pub gateway_args: Vec<String>,
    /// Extra state-svc flags.
    pub state_args: Vec<String>,
    /// OTLP/gRPC endpoint every service exports traces to.
    pub otlp_endpoint: Option<String>,
    /// The heartbeat interval state-svc asks of media nodes (100 ms: fast test stacks).
    pub node_heartbeat_ms: u32,
    /// State-svc reaches Redis through Sentinel (a master, a replica, three Sentinels)
    /// instead of one server.
    pub sentinel: bool,
    /// State-svc uses a Redis Cluster (three masters with a replica each) instead of one
    /// server.
    pub cluster: bool,
    /// The address gateways listen on and media nodes serve media on (loopback by default;
    /// a veth address for clients in a network namespace).
    pub bind_ip: String,
    /// Gateways serve HTTPS and `wss://` themselves, with a certificate from the stack's CA
    /// for 127.0.0.1 and localhost.
    pub https: bool,
    /// Every gRPC hop in plaintext (`--insecure-plaintext`), for the benchmark that measures
    /// what mutual TLS costs; never for a test of behaviour.
    pub plaintext: bool,
}

impl Default for Topology {
    fn default() -> Self {
        Self {
            state: 1,
            media: 1,
            gateways: 1,
            lease_ms: 5_000,
            max_talk_ms: 60_000,
            gateway_args: Vec::new(),
            state_args: Vec::new(),
            otlp_endpoint: None,
            node_heartbeat_ms: 100,
            // `TALKGROUP_TEST_REDIS=sentinel|cluster` runs every stack that does not choose
            // on that topology (the whole suite against a Cluster, say).
            sentinel: redis_topology_from_env() == Some("sentinel"),
            cluster: redis_topology_from_env() == Some("cluster"),
            bind_ip: "127.0.0.1".to_owned(),
            https: false,
            plaintext: false,
        }
    }
}

/// The Redis topology `TALKGROUP_TEST_REDIS` asks for, if any.
fn redis_topology_from_env() -> Option<&'static str> {
    match std::env::var("TALKGROUP_TEST_REDIS").ok()?.as_str() {
        "sentinel" => Some("sentinel"),
        "cluster" => Some("cluster"),
        _ => None,
    }
}

/// A running stack. Dropping it kills every process.
#[derive(Debug)]
pub struct Stack {
    pub gateways: Vec<ServiceProcess>,
    pub media: Vec<ServiceProcess>,
    pub state: Vec<ServiceProcess>,
    /// The Redis server (unused under Sentinel, where `sentinels` holds the data).
    pub redis: RedisServer,
    /// Redis under Sentinel, when the topology asks for it.
    pub sentinels: Option<testkit::RedisSentinels>,
    /// A Redis Cluster, when the topology asks for it.
    pub cluster: Option<testkit::RedisCluster>,
    /// The stack's throwaway CA and a certificate per identity: every gRPC hop is mutual TLS.
    pub certs: Certs,
    /// Whether the gateways serve HTTPS.
    pub https: bool,
    /// What the stack was started with, for nodes added later.
    topology: Topology,
}

/// A throwaway CA and the certificates of a stack's services, in a temporary directory
/// removed with it.
#[derive(Debug)]
pub struct Certs {
    pub ca: DevCa,
    pub dir: PathBuf,
    /// Hand out `--insecure-plaintext` instead of certificates ([`Topology::plaintext`]).
    pub plaintext: bool,
}

impl Certs {
    pub fn new(plaintext: bool) -> Result<Self> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("talkgroup-certs-{}-{n}", std::process::id()));
        let ca = DevCa::new("Talkgroup test CA").map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Self { ca, dir, plaintext })
    }

    /// Issues (or re-issues) the certificate of `identity` under `name`.
    pub fn issue(&self, name: &str, identity: &Identity) -> Result<TlsFiles> {
        Ok(self
            .ca
            .write(&self.dir, name, identity, &["localhost", "127.0.0.1"])?)
    }

    /// The `--tls-*` flags of a service with `identity`.
    pub fn args(&self, name: &str, identity: &Identity) -> Result<Vec<String>> {
        if self.plaintext {
            return Ok(vec!["--insecure-plaintext".to_owned()]);
        }
        let files = self.issue(name, identity)?;
        Ok(vec![
            "--tls-cert".into(),
            files.cert.display().to_string(),
            "--tls-key".into(),
            files.key.display().to_string(),
            "--tls-ca".into(),
            files.ca.display().to_string(),
        ])
    }

    /// How a test client with `identity` dials the stack's services.
    pub fn security(&self, identity: &Identity) -> Result<Security> {
        if self.plaintext {
            return Ok(Security::Plaintext);
        }
        let name = format!("client-{}", identity.to_string().replace('/', "-"));
        Ok(Security::Mtls(Tls::load(self.issue(&name, identity)?)?))
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(bin: &str, args: &[String], message: &str) -> Result<ServiceProcess> {
    let path = binary(bin)?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ServiceProcess::start(
        path.to_str().context("binary path")?,
        &args,
        // Export finished spans quickly (tests wait for them).
        &[("RUST_LOG", "info"), ("OTEL_BSP_SCHEDULE_DELAY", "100")],
        message,
    )
}

/// Media node `media-<i>` of topology `t`, registering with the state-svc at `state_url`.
fn start_media(certs: &Certs, t: &Topology, i: usize, state_url: &str) -> Result<ServiceProcess> {
    let args = strings(&[
        "--listen",
        "127.0.0.1:0",
        "--node-id",
        &format!("media-{i}"),
        "--state-url",
        state_url,
        "--drain-timeout-ms",
        "2000",
        "--rtc-bind-ip",
        &t.bind_ip,
        // Equal, fixed capacities keep placement across nodes deterministic (measured
        // capacities differ a little from node to node).
        "--capacity",
        "4000",
        "--metrics-listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
    ]);
    let mut args = with_otlp(args, t);
    let node = Identity::Media(format!("media-{i}"));
    args.extend(certs.args(&format!("media-{i}"), &node)?);
    start("media-svc", &args, "media-svc listening")
}

fn with_otlp(mut args: Vec<String>, t: &Topology) -> Vec<String> {
    if let Some(endpoint) = &t.otlp_endpoint {
        args.extend(["--otlp-endpoint".to_owned(), endpoint.clone()]);
    }
    args
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

impl Stack {
    /// Starts Redis, then state-svc, the media nodes (registered) and the gateways, and waits
    /// until every gateway sees every media node live.
    pub async fn start(topology: Topology) -> Result<Self> {
        tokio::task::spawn_blocking(move || Self::start_blocking(&topology))
            .await
            .context("start task")?
    }

    fn start_blocking(t: &Topology) -> Result<Self> {
        let certs = Certs::new(t.plaintext)?;
        let redis = RedisServer::start()?;
        let sentinels = if t.sentinel {
            Some(testkit::RedisSentinels::start()?)
        } else {
            None
        };
        let cluster = if t.cluster {
            Some(testkit::RedisCluster::start()?)
        } else {
            None
        };
        let url = match (&sentinels, &cluster) {
            (Some(set), _) => format!(
                "redis+sentinel://{}/{}",
                set.addresses().join(","),
                set.master_name
            ),
            (None, Some(cluster)) => cluster.url(),
            (None, None) => redis.url(),
        };
        let mut state = Vec::new();
        for _ in 0..t.state.max(1) {
            let args = strings(&[
                "--listen",
                "127.0.0.1:0",
                "--store",
                "redis",
                "--redis-url",
                &url,
                "--key-prefix",
                "e2e",
                "--lease-ms",
                &t.lease_ms.to_string(),
                "--max-talk-ms",
                &t.max_talk_ms.to_string(),
                "--node-heartbeat-ms",
                &t.node_heartbeat_ms.to_string(),
                "--admin-token",
                ADMIN_TOKEN,
                "--metrics-listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
            ]);
            let mut args = with_otlp(args, t);
            args.extend(certs.args("state", &Identity::State)?);
            args.extend(t.state_args.iter().cloned());
            state.push(start("state-svc", &args, "state-svc listening")?);
        }
        let state_url = |i: usize| format!("http://{}", state[i % state.len()].addr);
        let mut media = Vec::new();
        for i in 0..t.media {
            media.push(start_media(&certs, t, i, &state_url(i))?);
        }
        let mut gateways = Vec::new();
        for i in 0..t.gateways.max(1) {
            let mut args = strings(&[
                "--listen",
                &format!("{}:0", t.bind_ip),
                "--state-url",
                &state_url(i),
                "--jwt-secret",
                SECRET,
                "--gateway-id",
                &format!("gw-{i}"),
                "--metrics-listen",
                "127.0.0.1:0",
                "--shutdown-grace-ms",
                "2000",
                "--log-format",
                "json",
            ]);
            args.extend(certs.args("gateway", &Identity::Gateway)?);
            if t.https {
                let files = certs.issue("gateway-https", &Identity::Gateway)?;
                args.extend([
                    "--https-cert".into(),
                    files.cert.display().to_string(),
                    "--https-key".into(),
                    files.key.display().to_string(),
                ]);
            }
            args.extend(t.gateway_args.iter().cloned());
            let args = with_otlp(args, t);
            gateways.push(start("signaling-svc", &args, "signaling-svc listening")?);
        }
        Ok(Self {
            gateways,
            media,
            state,
            redis,
            sentinels,
            cluster,
            certs,
            https: t.https,
            topology: t.clone(),
        })
    }

    /// A plain `redis://` URL on which a classic `PUBLISH` reaches state-svc (the membership
    /// channel of an external control plane): the server, the master under Sentinel, any
    /// node of a Cluster (classic pub/sub spans the cluster).
    pub fn redis_publish_url(&self) -> String {
        if let Some(cluster) = &self.cluster {
            return format!("redis://{}", cluster.seeds()[0]);
        }
        if let Some(port) = self.sentinels.as_ref().and_then(|s| s.master_port()) {
            return format!("redis://127.0.0.1:{port}");
        }
        self.redis.url()
    }

    /// Starts media node `media-<i>` (a new id, or one whose process is gone) and waits until
    /// state-svc has it live: its index in [`Stack::media`].
    pub async fn add_media(&mut self, i: usize) -> Result<usize> {
        let state_url = format!("http://{}", self.state[i % self.state.len()].addr);
        let node = start_media(&self.certs, &self.topology, i, &state_url)?;
        self.media.push(node);
        let id = format!("media-{i}");
        self.wait_for_node(&id, Duration::from_secs(10), &id, |n| n.live)
            .await?;
        Ok(self.media.len() - 1)
    }

    /// Waits until every gateway reports all media nodes live.
    pub async fn ready(&self) -> Result<()> {
        let want = self.media.len() as u64;
        for gateway in &self.gateways {
            let addr = gateway.addr;
            let ca = self.https.then(|| self.certs.dir.join("ca.crt"));
            testkit::wait_until(Duration::from_secs(10), "media nodes live", || {
                let ca = ca.clone();
                async move {
                    let health = match &ca {
                        Some(ca) => https_get(addr, "/health", ca).await,
                        None => http_get(addr, "/health").await,
                    };
                    health
                        .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
                        .is_some_and(|h| h["mediaNodes"].as_u64() == Some(want))
                }
            })
            .await?;
        }
        Ok(())
    }

    pub fn gateway(&self, i: usize) -> SocketAddr {
        self.gateways[i].addr
    }

    /// The page of gateway `i`: `https://` when the stack serves HTTPS.
    pub fn gateway_url(&self, i: usize) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}/", self.gateway(i))
    }

    /// A signed-in client on gateway `gateway`, allowed to talk everywhere.
    pub async fn client(&self, gateway: usize, user: &str, name: &str) -> Client {
        Client::connect(self.gateway(gateway), user, name).await
    }

    /// A signed-in client on gateway `gateway` whose token carries `grants`.
    pub async fn client_with(
        &self,
        gateway: usize,
        user: &str,
        name: &str,
        grants: &serde_json::Value,
    ) -> Client {
        Client::connect_with(self.gateway(gateway), user, name, grants).await
    }

    /// The gRPC URL of state-svc `i`.
    pub fn state_url(&self, i: usize) -> String {
        format!("http://{}", self.state[i].addr)
    }

    /// A channel to state-svc `i` as `identity` (mutual TLS with the stack's CA).
    pub fn state_channel(&self, i: usize, identity: &Identity) -> Result<Channel> {
        Ok(talkgroup_common::grpc::channel(
            &self.state_url(i),
            Some(Duration::from_secs(10)),
            &self.certs.security(identity)?,
            Expect::Exactly(Identity::State),
        )?)
    }

    /// A channel to media node `i` as `identity`.
    pub fn media_channel(&self, i: usize, identity: &Identity) -> Result<Channel> {
        Ok(talkgroup_common::grpc::channel(
            &format!("http://{}", self.media[i].addr),
            Some(Duration::from_secs(10)),
            &self.certs.security(identity)?,
            Expect::Exactly(Identity::Media(format!("media-{i}"))),
        )?)
    }

    /// The `--tls-*` flags for `pttctl` as an admin of this stack.
    pub fn admin_tls_args(&self) -> Result<Vec<String>> {
        self.certs.args("pttctl", &Identity::Admin)
    }

    /// A client of state-svc `0`'s access service (grants, events, emergencies), as an admin.
    pub async fn access(&self) -> Result<spb::access_service_client::AccessServiceClient<Channel>> {
        Ok(spb::access_service_client::AccessServiceClient::new(
            self.state_channel(0, &Identity::Admin)?,
        ))
    }

    /// The registered media nodes, as state-svc `0` lists them to an admin.
    pub async fn nodes(&self) -> Result<Vec<spb::MediaNode>> {
        let mut registry = spb::media_registry_service_client::MediaRegistryServiceClient::new(
            self.state_channel(0, &Identity::Admin)?,
        );
        Ok(registry
            .list_nodes(spb::ListNodesRequest {})
            .await?
            .into_inner()
            .nodes)
    }

    /// Waits until the registry's entry for `node_id` satisfies `check`.
    pub async fn wait_for_node(
        &self,
        node_id: &str,
        within: std::time::Duration,
        what: &str,
        check: impl Fn(&spb::MediaNode) -> bool,
    ) -> Result<()> {
        let check = &check;
        testkit::wait_until(within, what, || async move {
            self.nodes()
                .await
                .is_ok_and(|nodes| nodes.iter().any(|n| n.node_id == node_id && check(n)))
        })
        .await
    }

    /// The media node a channel is placed on ("" when not placed).
    /// The index in [`Stack::media`] of the node hosting `channel`.
    pub async fn media_index_of(&self, channel: &str) -> Result<usize> {
        let node = self.placement(channel).await?;
        node.strip_prefix("media-")
            .and_then(|i| i.parse().ok())
            .with_context(|| format!("{channel} is on {node:?}, not a stack node"))
    }

    pub async fn placement(&self, channel: &str) -> Result<String> {
        let mut channels = spb::channel_service_client::ChannelServiceClient::new(
            self.state_channel(0, &Identity::Admin)?,
        );
        Ok(channels
            .get_channel_state(spb::GetChannelStateRequest {
                channel_id: channel.to_owned(),
            })
            .await?
            .into_inner()
            .media_node_id)
    }
}

/// `GET path` on a gateway with a bare HTTP/1.1 request: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let s = tokio::net::TcpStream::connect(addr).await.ok()?;
    get_over(s, addr, path).await
}

/// [`http_get`] over TLS, the gateway's certificate verified against the CA at `ca` for the
/// address dialled.
pub async fn https_get(
    addr: SocketAddr,
    path: &str,
    ca: &std::path::Path,
) -> Option<(u16, String)> {
    let config = talkgroup_common::tls::verifying_client_config(ca, None).ok()?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let s = connector.connect(name, tcp).await.ok()?;
    get_over(s, addr, path).await
}

async fn get_over<S>(mut s: S, addr: SocketAddr, path: &str) -> Option<(u16, String)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    // A TLS peer may close without close_notify: what arrived before counts.
    if s.read_to_end(&mut buf).await.is_err() && buf.is_empty() {
        return None;
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

/// A gateway's `/health` body (`Null` when unreachable).
pub async fn health(addr: SocketAddr) -> serde_json::Value {
    http_get(addr, "/health")
        .await
        .and_then(|(_, body)| serde_json::from_str(&body).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// The code of an error reply (panics, showing the reply, when it is not an error).
pub fn error_code(reply: &serde_json::Value) -> &str {
    assert_eq!(reply["type"], "error", "expected an error: {reply}");
    reply["error"]["code"].as_str().unwrap_or_default()
}

/// What `peer` received in `range` (of its packet indices), decoded: (RMS level, dominant
/// frequency in Hz).
pub fn heard(peer: &testkit::media::Peer, range: std::ops::Range<usize>) -> (f32, f32) {
    let received = peer.received();
    let end = range.end.min(received.len());
    let payloads: Vec<Vec<u8>> = received[range.start.min(end)..end]
        .iter()
        .map(|r| r.packet.payload.to_vec())
        .collect();
    testkit::media::analyse(&payloads)
}

/// Asserts that `peer` heard a tone of `freq` Hz in the packets of `range`.
pub fn assert_tone_in(
    peer: &testkit::media::Peer,
    range: std::ops::Range<usize>,
    freq: f32,
    who: &str,
) {
    let (rms, hz) = heard(peer, range);
    assert!(rms > 1_000.0, "{who} heard silence (rms {rms})");
    assert!(
        (hz - freq).abs() < freq * 0.1,
        "{who} heard {hz} Hz, expected {freq} Hz"
    );
}

/// Asserts that `peer` heard a tone of `freq` Hz from packet `from` on.
pub fn assert_tone(peer: &testkit::media::Peer, from: usize, freq: f32, who: &str) {
    assert_tone_in(peer, from..usize::MAX, freq, who);
}

/// Waits (up to 10 s) until `peer` has received `at_least` packets.
pub async fn wait_packets(peer: &testkit::media::Peer, at_least: usize, who: &str) {
    testkit::wait_until(Duration::from_secs(10), who, || async move {
        peer.received_count() >= at_least
    })
    .await
    .unwrap();
}

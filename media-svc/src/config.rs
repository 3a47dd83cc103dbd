//! media-svc configuration: flags, each also readable from a `PTT_MEDIA_*` environment variable.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use clap::Parser;
use talkgroup_common::grpc::Security;
use talkgroup_common::tls::{Identity, TlsArgs};

talkgroup_common::process_args!(ProcessArgs, "PTT_MEDIA_");

/// An inclusive UDP port range, written `MIN-MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange(pub u16, pub u16);

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (lo, hi) = s.split_once('-').ok_or("expected MIN-MAX")?;
        let lo: u16 = lo.trim().parse().map_err(|_| "bad minimum port")?;
        let hi: u16 = hi.trim().parse().map_err(|_| "bad maximum port")?;
        if lo == 0 || lo > hi {
            return Err("expected 0 < MIN <= MAX".into());
        }
        Ok(Self(lo, hi))
    }
}

/// A Talkgroup media node: forwards the floor holder's Opus audio to a channel's listeners.
#[derive(Debug, Clone, Parser)]
#[command(name = "media-svc", version, about)]
pub struct Config {
    /// Address the gRPC server (ptt.media.v1) listens on.
    #[arg(
        help_heading = "Listeners",
        long,
        env = "PTT_MEDIA_LISTEN",
        default_value = "127.0.0.1:50052"
    )]
    pub listen: SocketAddr,
    /// Mutual TLS for gRPC: the certificate names `spiffe://talkgroup/media/<node-id>`, and
    /// that node id is this node's (`--node-id`, if given, must match it).
    #[command(flatten, next_help_heading = "Mutual TLS (gRPC)")]
    pub tls: TlsArgs,
    /// Serve gRPC reflection (lists every method; for grpcurl in development).
    #[arg(help_heading = "Listeners", long, env = "PTT_MEDIA_GRPC_REFLECTION")]
    pub grpc_reflection: bool,
    /// This node's id in the registry; a random one when unset.
    #[arg(help_heading = "Media", long, env = "PTT_MEDIA_NODE_ID")]
    pub node_id: Option<String>,
    /// gRPC URL gateways use to reach this node (registered with state-svc); defaults to the
    /// bound listen address.
    #[arg(help_heading = "Listeners", long, env = "PTT_MEDIA_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// IP address the media ports bind to. Bind a concrete address: a wildcard bind leaves
    /// out loopback candidates.
    #[arg(
        help_heading = "Media",
        long,
        env = "PTT_MEDIA_RTC_BIND_IP",
        default_value = "127.0.0.1"
    )]
    pub rtc_bind_ip: IpAddr,
    /// Public IP written into the node's ICE candidates (behind NAT or hostNetwork).
    #[arg(help_heading = "Media", long, env = "PTT_MEDIA_ANNOUNCED_IP")]
    pub announced_ip: Option<IpAddr>,
    /// The one UDP port every transport of the node shares (0: an ephemeral port, logged at
    /// start). Open it in the firewall.
    #[arg(
        help_heading = "Media",
        long,
        env = "PTT_MEDIA_RTC_UDP_PORT",
        default_value_t = 0
    )]
    pub rtc_udp_port: u16,
    /// Serve ICE over TCP (RFC 6544): a passive TCP candidate on `--rtc-tcp-port`, after the
    /// UDP one, for clients whose network blocks UDP.
    #[arg(help_heading = "Media", long, env = "PTT_MEDIA_ICE_TCP", default_value_t = true, action = clap::ArgAction::Set)]
    pub ice_tcp: bool,
    /// The one TCP port every transport's ICE/TCP candidate shares (0: an ephemeral port).
    #[arg(
        help_heading = "Media",
        long,
        env = "PTT_MEDIA_RTC_TCP_PORT",
        default_value_t = 0
    )]
    pub rtc_tcp_port: u16,
    /// Deprecated: transports share one port now. When set and `--rtc-udp-port` is not, the
    /// range's first port is the shared port.
    #[arg(
        help_heading = "Media",
        long,
        env = "PTT_MEDIA_PORT_RANGE",
        hide = true
    )]
    pub port_range: Option<PortRange>,
    /// Forwarding workers; 0 means one per core.
    #[arg(
        help_heading = "Media",
        long,
        env = "PTT_MEDIA_WORKERS",
        default_value_t = 0
    )]
    pub workers: usize,
    /// Pin each forwarding worker to a CPU of its own (of those this process may use), so a
    /// packet's copies are encrypted and sent on every core at once. Unset: pinned when the
    /// process may run on no more CPUs than it has workers (it owns them).
    #[arg(help_heading = "Media", long, env = "PTT_MEDIA_PIN_WORKERS", action = clap::ArgAction::Set)]
    pub pin_workers: Option<bool>,
    /// Transports (peer connections) the node accepts; 0 (the default) derives it from the
    /// CPU: the cost of one forwarded copy, measured at start, and the cores.
    #[arg(
        help_heading = "Media",
        long,
        env = "PTT_MEDIA_CAPACITY",
        default_value_t = 0
    )]
    pub capacity: u32,
    /// state-svc gRPC URL: register, heartbeat and watch floors. Standalone when unset.
    #[arg(help_heading = "state-svc", long, env = "PTT_MEDIA_STATE_URL")]
    pub state_url: Option<String>,
    /// A transport not connected (ICE and DTLS done) this long after its creation is closed.
    #[arg(
        help_heading = "state-svc",
        long,
        env = "PTT_MEDIA_CONNECT_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub connect_timeout_ms: u64,
    /// After SIGTERM, how long to wait for transports to close before exiting, in ms.
    #[arg(
        help_heading = "state-svc",
        long,
        env = "PTT_MEDIA_DRAIN_TIMEOUT_MS",
        default_value_t = 600_000
    )]
    pub drain_timeout_ms: u64,
    /// Metrics, traces and logs.
    #[command(flatten, next_help_heading = "Process")]
    pub process: ProcessArgs,
}

impl Config {
    pub fn for_tests() -> Self {
        Self::parse_from([
            "media-svc",
            "--listen",
            "127.0.0.1:0",
            "--insecure-plaintext",
        ])
    }

    pub fn validate(&self) -> Result<(), String> {
        self.tls.validate()?;
        if let Some(id) = &self.node_id
            && !talkgroup_common::tls::valid_node_id(id)
        {
            return Err("node id must be 1 to 64 of [A-Za-z0-9._-]".into());
        }
        if self.rtc_bind_ip.is_unspecified() {
            return Err("rtc bind ip must be a concrete address, not a wildcard".into());
        }
        if !(1_000..=600_000).contains(&self.connect_timeout_ms) {
            return Err("connect timeout must be 1 s to 10 min".into());
        }
        Ok(())
    }

    /// The shared UDP address, honouring the deprecated `--port-range`.
    pub fn udp_addr(&self) -> SocketAddr {
        let port = match (self.rtc_udp_port, self.port_range) {
            (0, Some(PortRange(first, _))) => first,
            (port, _) => port,
        };
        SocketAddr::new(self.rtc_bind_ip, port)
    }

    /// The shared UDP address and, when ICE/TCP is on, the shared TCP address.
    pub fn media_addrs(&self) -> (SocketAddr, Option<SocketAddr>) {
        let tcp = self
            .ice_tcp
            .then(|| SocketAddr::new(self.rtc_bind_ip, self.rtc_tcp_port));
        (self.udp_addr(), tcp)
    }

    /// This node's id: the one its certificate names under mutual TLS, else `--node-id`, else
    /// a random one.
    pub fn node_id(&self, security: &Security) -> Result<String, String> {
        if let Security::Mtls(tls) = security {
            let Identity::Media(id) = tls.identity() else {
                return Err("the certificate must name spiffe://talkgroup/media/<node-id>".into());
            };
            return match &self.node_id {
                Some(wanted) if *wanted != id => Err(format!(
                    "--node-id {wanted} differs from the node id in the certificate ({id})"
                )),
                _ => Ok(id),
            };
        }
        Ok(self.node_id.clone().unwrap_or_else(|| {
            format!("media-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
        }))
    }
}

//! The WebRTC engine behind the project's own trait, so it can be replaced.
//!
//! The engine is sans-IO: a [`Transport`] is a plain state machine fed with datagrams and
//! timeouts and polled for datagrams to send and state changes; a [`SpeakerTransport`] is also
//! polled for the RTP it received, a [`ListenerTransport`] given the RTP to send. Each kind
//! carries only what it does. The worker owning a transport drives it in its own thread, so
//! forwarding a packet to a listener is a function call and one non-blocking UDP send, with no
//! channel hop and no task wake-up per listener.
//!
//! - [`rtc_peer`]: speakers' transports, full `rtc` peer connections (they send receiver
//!   reports); [`listener`]: listeners' lean ICE-lite + DTLS-SRTP transports; [`sdp`]: SDP
//!   edits both need.
//!
//! The media node always offers: a *send* transport (the client sends) is offered one recvonly
//! audio section; a *recv* transport (the client listens) one sendonly audio track. The node's
//! host candidates are in the offer (non-trickle, ICE-lite), with the announced IP written in:
//! its one shared UDP port, and after it, at a lower priority, its one ICE/TCP port (a passive
//! candidate, RFC 6544). Every transport of the node shares those two ports; the worker layer
//! tells transports apart by the ICE username fragment of the first check from an address.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use rtc::rtp;

pub use crate::router::Rewritten;

pub mod listener;
pub mod rtc_peer;
pub mod sdp;
pub mod stun;

/// Opus payload type the node offers.
pub const OPUS_PAYLOAD_TYPE: u8 = 111;
/// Opus format parameters the node offers.
pub const OPUS_FMTP: &str = "minptime=10;useinbandfec=1";

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("invalid session description")]
    BadDescription,
    #[error("invalid ice candidate")]
    BadCandidate,
    #[error("transport could not be set up: {0}")]
    Setup(String),
}

/// What to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerSpec {
    /// The client sends audio; the node receives it.
    Send,
    /// The node sends one audio track with this SSRC.
    Recv { ssrc: u32 },
}

/// A client ICE candidate.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub candidate: String,
    pub sdp_mid: Option<String>,
    pub sdp_mline_index: Option<u16>,
}

/// The transport protocol a datagram came over, or is to leave by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Udp,
    /// ICE over TCP: datagrams framed on a TCP connection (RFC 4571).
    Tcp,
}

/// Where a datagram came from or goes: the client's address and the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Path {
    pub proto: Proto,
    pub remote: SocketAddr,
}

impl Path {
    pub fn udp(remote: SocketAddr) -> Self {
        Self {
            proto: Proto::Udp,
            remote,
        }
    }

    pub fn tcp(remote: SocketAddr) -> Self {
        Self {
            proto: Proto::Tcp,
            remote,
        }
    }
}

/// The node's shared media addresses, which every transport's offer carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// The bound UDP address.
    pub udp: SocketAddr,
    /// The bound ICE/TCP listening address, when ICE/TCP is on.
    pub tcp: Option<SocketAddr>,
    /// Written into the candidates instead of the bound IP (behind NAT or hostNetwork).
    pub announced: Option<IpAddr>,
}

/// Connection states the node acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    Connected,
    Failed,
    Closed,
}

/// What every transport of the node does, whichever way its audio flows: ICE, DTLS, timers and
/// datagrams, sans-IO.
pub trait Transport: Send + 'static {
    /// The node's offer (candidate included).
    fn offer(&self) -> &str;
    /// The transport's own ICE username fragment and password (from its offer): a client's
    /// first check from a new address names the fragment and is signed with the password.
    fn ice_credentials(&self) -> (&str, &str);
    fn apply_answer(&mut self, sdp: &str, now: Instant) -> Result<(), EngineError>;
    /// Starts an ICE restart: fresh local credentials and a fresh offer (then [`Self::offer`]
    /// and [`Self::ice_credentials`] give the new ones), answered through
    /// [`Self::apply_answer`]. DTLS and SRTP stay; media keeps flowing on the current path
    /// until the client nominates one with the new credentials.
    fn restart_ice(&mut self, now: Instant) -> Result<(), EngineError>;
    fn add_candidate(&mut self, candidate: &Candidate) -> Result<(), EngineError>;
    /// A datagram arrived from the client over `from`.
    fn handle_datagram(&mut self, data: bytes::BytesMut, from: Path, now: Instant);
    fn handle_timeout(&mut self, now: Instant);
    /// When `handle_timeout` wants to run next.
    fn poll_timeout(&mut self) -> Option<Instant>;
    /// The next datagram to send, and where.
    fn poll_datagram(&mut self) -> Option<(bytes::BytesMut, Path)>;
    /// The next connection state change.
    fn poll_state(&mut self) -> Option<PeerState>;
    fn close(&mut self);
}

/// A speaker's transport: the node receives the client's audio.
pub trait SpeakerTransport: Transport {
    /// The next RTP packet received from the client.
    fn poll_rtp(&mut self) -> Option<rtp::Packet>;
}

/// A listener's transport: the node sends the client one audio track.
pub trait ListenerTransport: Transport {
    /// Encrypts one RTP packet (`header` and `payload`) for the client into the start of
    /// `out`, where the worker's send batch wants it: the datagram's length and the path it
    /// goes on, or `None` if it cannot be sent (not connected yet, too long for `out`, or
    /// refused by the SRTP sender).
    fn seal_rtp(
        &mut self,
        header: &Rewritten,
        payload: &[u8],
        out: &mut [u8],
    ) -> Option<(usize, Path)>;
    /// The payload type the client accepted for the node's track.
    fn payload_type(&self) -> u8;
    /// Whether [`ListenerTransport::seal_rtp`] can send now; reads the state sealing reads,
    /// so a worker can bring a group of listeners into cache before sealing for them.
    fn ready(&self) -> bool;
}

/// Creates the node's transports.
pub trait Engine: Send + Sync + 'static {
    type Speaker: SpeakerTransport;
    type Listener: ListenerTransport;
    /// A speaker's transport on the node's shared addresses.
    fn speaker(&self, local: &Addresses, now: Instant) -> Result<Self::Speaker, EngineError>;
    /// A listener's transport sending with `ssrc`.
    fn listener(&self, ssrc: u32, local: &Addresses) -> Result<Self::Listener, EngineError>;
}

/// A transport of either kind, as a worker holds it. A speaker's full peer connection is
/// several kilobytes and there are few of them: boxed, so a listener's slot stays small (a
/// fan-out walks a thousand of those per packet).
#[derive(Debug)]
pub enum Peer<S, L> {
    Speaker(Box<S>),
    Listener(L),
}

impl<S: SpeakerTransport, L: ListenerTransport> Peer<S, L> {
    /// Creates the transport `spec` asks for.
    pub fn create<E: Engine<Speaker = S, Listener = L>>(
        engine: &E,
        spec: PeerSpec,
        local: &Addresses,
        now: Instant,
    ) -> Result<Self, EngineError> {
        Ok(match spec {
            PeerSpec::Send => Self::Speaker(Box::new(engine.speaker(local, now)?)),
            PeerSpec::Recv { ssrc } => Self::Listener(engine.listener(ssrc, local)?),
        })
    }

    /// What both kinds do.
    pub fn transport(&mut self) -> &mut dyn Transport {
        match self {
            Self::Speaker(s) => s.as_mut(),
            Self::Listener(l) => l,
        }
    }

    pub fn offer(&self) -> &str {
        match self {
            Self::Speaker(s) => s.offer(),
            Self::Listener(l) => l.offer(),
        }
    }

    pub fn ice_credentials(&self) -> (&str, &str) {
        match self {
            Self::Speaker(s) => s.ice_credentials(),
            Self::Listener(l) => l.ice_credentials(),
        }
    }
}

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
//! one host candidate (its UDP port from the configured range) is in the offer (non-trickle,
//! ICE-lite), with the announced IP written in.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use rtc::rtp;

pub mod listener;
pub mod rtc_peer;
pub mod sdp;

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
    fn apply_answer(&mut self, sdp: &str, now: Instant) -> Result<(), EngineError>;
    fn add_candidate(&mut self, candidate: &Candidate) -> Result<(), EngineError>;
    /// A datagram arrived from `from` on the transport's socket.
    fn handle_datagram(&mut self, data: bytes::BytesMut, from: SocketAddr, now: Instant);
    fn handle_timeout(&mut self, now: Instant);
    /// When `handle_timeout` wants to run next.
    fn poll_timeout(&mut self) -> Option<Instant>;
    /// The next datagram to send, and where.
    fn poll_datagram(&mut self) -> Option<(bytes::BytesMut, SocketAddr)>;
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
    /// Queues one RTP packet to the client; false if it cannot be sent (not connected yet).
    fn write_rtp(&mut self, packet: &rtp::Packet) -> bool;
    /// The payload type the client accepted for the node's track.
    fn payload_type(&self) -> u8;
}

/// Creates the node's transports.
pub trait Engine: Send + Sync + 'static {
    type Speaker: SpeakerTransport;
    type Listener: ListenerTransport;
    /// A speaker's transport whose socket is bound at `local`; `announced` replaces its IP in
    /// the offer.
    fn speaker(
        &self,
        local: SocketAddr,
        announced: Option<IpAddr>,
        now: Instant,
    ) -> Result<Self::Speaker, EngineError>;
    /// A listener's transport sending with `ssrc`.
    fn listener(
        &self,
        ssrc: u32,
        local: SocketAddr,
        announced: Option<IpAddr>,
    ) -> Result<Self::Listener, EngineError>;
}

/// A transport of either kind, as a worker holds it.
#[derive(Debug)]
pub enum Peer<S, L> {
    Speaker(S),
    Listener(L),
}

impl<S: SpeakerTransport, L: ListenerTransport> Peer<S, L> {
    /// Creates the transport `spec` asks for.
    pub fn create<E: Engine<Speaker = S, Listener = L>>(
        engine: &E,
        spec: PeerSpec,
        local: SocketAddr,
        announced: Option<IpAddr>,
        now: Instant,
    ) -> Result<Self, EngineError> {
        Ok(match spec {
            PeerSpec::Send => Self::Speaker(engine.speaker(local, announced, now)?),
            PeerSpec::Recv { ssrc } => Self::Listener(engine.listener(ssrc, local, announced)?),
        })
    }

    /// What both kinds do.
    pub fn transport(&mut self) -> &mut dyn Transport {
        match self {
            Self::Speaker(s) => s,
            Self::Listener(l) => l,
        }
    }

    pub fn offer(&self) -> &str {
        match self {
            Self::Speaker(s) => s.offer(),
            Self::Listener(l) => l.offer(),
        }
    }
}

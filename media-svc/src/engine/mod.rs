//! The WebRTC engine behind the project's own trait, so it can be replaced.
//!
//! The engine is sans-IO: a [`Peer`] is a plain state machine fed with datagrams, timeouts and
//! outgoing RTP, and polled for datagrams to send, received RTP and state changes. The worker
//! that owns a channel's router also owns the peers of that channel and drives them in the same
//! task, so forwarding a packet to a listener is a function call and one non-blocking UDP send,
//! with no channel hop and no task wake-up per listener.
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

/// One peer connection of the node, sans-IO.
pub trait Peer: Send + 'static {
    /// The node's offer (candidate included).
    fn offer(&self) -> &str;
    fn apply_answer(&mut self, sdp: String, now: Instant) -> Result<(), EngineError>;
    fn add_candidate(&mut self, candidate: Candidate) -> Result<(), EngineError>;
    /// A datagram arrived from `from` on the peer's socket.
    fn handle_datagram(&mut self, data: bytes::BytesMut, from: SocketAddr, now: Instant);
    fn handle_timeout(&mut self, now: Instant);
    /// When `handle_timeout` wants to run next.
    fn poll_timeout(&mut self) -> Option<Instant>;
    /// The next datagram to send, and where.
    fn poll_datagram(&mut self) -> Option<(bytes::BytesMut, SocketAddr)>;
    /// The next RTP packet received from the client (send transports).
    fn poll_rtp(&mut self) -> Option<rtp::Packet>;
    /// Queues one RTP packet to the client (recv transports); false if it cannot be sent.
    fn write_rtp(&mut self, packet: rtp::Packet, now: Instant) -> bool;
    /// The payload type the client accepted for the node's track (recv transports).
    fn payload_type(&mut self) -> u8;
    /// The next connection state change.
    fn poll_state(&mut self) -> Option<PeerState>;
    fn close(&mut self);
}

/// Creates peers.
pub trait Engine: Send + Sync + 'static {
    type Peer: Peer;
    /// A peer whose socket is bound at `local`; `announced` replaces its IP in the offer.
    fn create(
        &self,
        spec: PeerSpec,
        local: SocketAddr,
        announced: Option<IpAddr>,
        now: Instant,
    ) -> Result<Self::Peer, EngineError>;
}

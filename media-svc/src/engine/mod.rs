//! The WebRTC engine behind the project's own trait, so it can be replaced.
//!
//! The media node always offers: a *send* transport (the client sends) is offered one
//! recvonly audio section; a *recv* transport (the client listens) one sendonly audio track.
//! The server gathers its candidates before answering (non-trickle) on one UDP port taken from
//! the configured range, and writes the announced IP into them.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rtc::rtp;

pub mod sdp;
pub mod webrtc;

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
    #[error("transport closed")]
    Closed,
}

/// Where packets arriving on a send transport go.
pub trait PacketSink: Send + Sync + 'static {
    fn on_rtp(&self, packet: rtp::Packet);
}

/// What to create.
#[derive(Clone)]
pub enum TransportSpec {
    /// The client sends audio; the node receives it into `sink`.
    Send { sink: Arc<dyn PacketSink> },
    /// The node sends one audio track with this SSRC.
    Recv { ssrc: u32 },
}

impl std::fmt::Debug for TransportSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Send { .. } => f.write_str("Send"),
            Self::Recv { ssrc } => write!(f, "Recv {{ ssrc: {ssrc} }}"),
        }
    }
}

/// A client ICE candidate.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub candidate: String,
    pub sdp_mid: Option<String>,
    pub sdp_mline_index: Option<u16>,
}

/// One peer connection of the node.
pub trait Transport: Send + Sync + 'static {
    /// The node's offer (candidates included).
    fn offer(&self) -> &str;
    /// Applies the client's answer.
    fn apply_answer(&self, sdp: String) -> impl Future<Output = Result<(), EngineError>> + Send;
    fn add_candidate(
        &self,
        candidate: Candidate,
    ) -> impl Future<Output = Result<(), EngineError>> + Send;
    /// Sends one packet on a recv transport (the node's sending side).
    fn write_rtp(
        &self,
        packet: rtp::Packet,
    ) -> impl Future<Output = Result<(), EngineError>> + Send;
    /// Queues one packet without waiting; false when the transport's bounded send queue is
    /// full (the packet is dropped) or the transport is closed.
    fn try_write_rtp(&self, packet: rtp::Packet) -> bool;
    /// The payload type the client accepted for the audio track (recv transports).
    fn payload_type(&self) -> impl Future<Output = u8> + Send;
    fn close(&self) -> impl Future<Output = ()> + Send;
}

/// Creates transports.
pub trait Engine: Send + Sync + 'static {
    type Transport: Transport;
    fn create(
        &self,
        spec: TransportSpec,
        bind: SocketAddr,
        announced_ip: Option<IpAddr>,
    ) -> impl Future<Output = Result<Self::Transport, EngineError>> + Send;
}

//! The engine on the sans-IO `rtc` 0.21 stack (the protocol core under `webrtc` 0.21; the two
//! are pinned together). A speaker's transport (the node receives) is a full `rtc` peer
//! connection: Opus only, RTCP reports as the only interceptor (no NACK or TWCC for audio),
//! mDNS off, ICE-lite; it never sends media. A listener's transport (the node sends) is the lean
//! [`ListenerPeer`](super::listener::ListenerPeer) built from the same stack's ICE, DTLS and
//! SRTP crates, because it carries every forwarded copy.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::BytesMut;
use rtc::ice::mdns::MulticastDnsMode;
use rtc::ice::tcp_type::TcpType;
use rtc::interceptor::Registry;
use rtc::peer_connection::configuration::interceptor_registry::configure_rtcp_reports;
use rtc::peer_connection::configuration::media_engine::{MIME_TYPE_OPUS, MediaEngine};
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::event::RTCPeerConnectionEvent;
use rtc::peer_connection::message::{RTCMessage, TaggedRTCMessage};
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::transport::{
    CandidateConfig, CandidateHostConfig, RTCIceCandidate, RTCIceCandidateInit,
};
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodec, RTCRtpCodecParameters, RtpCodecKind};
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};

use super::listener::{Identity, ListenerPeer};
use super::{
    Addresses, Candidate, Engine, EngineError, OPUS_FMTP, OPUS_PAYLOAD_TYPE, Path, PeerState,
    Proto, SpeakerTransport, Transport, sdp,
};
use std::sync::Arc;

pub fn opus_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_OPUS.to_owned(),
        clock_rate: 48_000,
        channels: 2,
        sdp_fmtp_line: OPUS_FMTP.to_owned(),
        rtcp_feedback: vec![],
    }
}

/// A media engine that knows Opus only.
pub fn opus_media_engine() -> Result<MediaEngine, EngineError> {
    let mut media = MediaEngine::default();
    media
        .register_codec(
            RTCRtpCodecParameters {
                rtp_codec: opus_codec(),
                payload_type: OPUS_PAYLOAD_TYPE,
            },
            RtpCodecKind::Audio,
        )
        .map_err(setup)?;
    Ok(media)
}

/// The UDP host candidate of a socket bound at `local`, for `add_local_candidate`.
pub fn host_candidate(local: SocketAddr) -> Result<RTCIceCandidateInit, EngineError> {
    candidate(local, "udp", TcpType::Unspecified)
}

/// The passive ICE/TCP host candidate (RFC 6544) of a listener bound at `local`.
pub fn tcp_candidate(local: SocketAddr) -> Result<RTCIceCandidateInit, EngineError> {
    candidate(local, "tcp", TcpType::Passive)
}

fn candidate(
    local: SocketAddr,
    network: &str,
    tcp_type: TcpType,
) -> Result<RTCIceCandidateInit, EngineError> {
    let candidate = CandidateHostConfig {
        base_config: CandidateConfig {
            network: network.to_owned(),
            address: local.ip().to_string(),
            port: local.port(),
            component: 1,
            ..Default::default()
        },
        tcp_type,
    }
    .new_candidate_host()
    .map_err(setup)?;
    RTCIceCandidate::from(&candidate).to_json().map_err(setup)
}

fn setup<E: std::fmt::Display>(e: E) -> EngineError {
    EngineError::Setup(e.to_string())
}

/// Creates the node's transports; holds the node's DTLS identity for listener transports.
#[derive(Debug, Clone)]
pub struct RtcEngine {
    identity: Arc<Identity>,
}

impl RtcEngine {
    /// An engine with a fresh DTLS certificate.
    pub fn new() -> Result<Self, EngineError> {
        Ok(Self {
            identity: Arc::new(Identity::generate()?),
        })
    }
}

pub struct RtcPeer {
    core: RTCPeerConnection,
    local: Addresses,
    offer: String,
    ufrag: String,
    pwd: String,
    inbound: std::collections::VecDeque<rtp::Packet>,
    states: std::collections::VecDeque<PeerState>,
}

impl std::fmt::Debug for RtcPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RtcPeer")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl Engine for RtcEngine {
    type Speaker = RtcPeer;
    type Listener = ListenerPeer;

    fn speaker(&self, local: &Addresses, now: Instant) -> Result<RtcPeer, EngineError> {
        RtcPeer::speaker(local, now)
    }

    fn listener(&self, ssrc: u32, local: &Addresses) -> Result<ListenerPeer, EngineError> {
        Ok(ListenerPeer::new(Arc::clone(&self.identity), ssrc, local))
    }
}

impl RtcPeer {
    /// A speaker's transport: a full `rtc` peer connection with one recvonly audio section.
    /// Receiver reports tell the speaker's client about loss (Opus FEC and bitrate adapt to
    /// them).
    pub fn speaker(local: &Addresses, now: Instant) -> Result<RtcPeer, EngineError> {
        let settings = SettingEngineBuilder::new()
            .with_multicast_dns_mode(MulticastDnsMode::Disabled)
            .with_lite(true)
            .build();
        let mut core = RTCPeerConnectionBuilder::new()
            .with_setting_engine(settings)
            .with_media_engine(opus_media_engine()?)
            .with_interceptor_registry(configure_rtcp_reports(Registry::new()))
            .build(now)
            .map_err(setup)?;
        let init = RTCRtpTransceiverInit {
            direction: RTCRtpTransceiverDirection::Recvonly,
            streams: vec![],
            send_encodings: vec![],
        };
        core.add_transceiver_from_kind(RtpCodecKind::Audio, Some(init))
            .map_err(setup)?;
        core.add_local_candidate(host_candidate(local.udp)?)
            .map_err(setup)?;
        if let Some(tcp) = local.tcp {
            core.add_local_candidate(tcp_candidate(tcp)?)
                .map_err(setup)?;
        }
        let offer = core.create_offer(None).map_err(setup)?;
        core.set_local_description(now, offer).map_err(setup)?;
        let local_sdp = core
            .local_description()
            .map(|d| d.sdp)
            .ok_or_else(|| setup("no local description"))?;
        if !sdp::has_candidate(&local_sdp) {
            return Err(setup(format!("no candidate on {}", local.udp)));
        }
        let (ufrag, pwd) =
            sdp::ice_credentials(&local_sdp).ok_or_else(|| setup("no ICE credentials"))?;
        let offer = match local.announced {
            Some(ip) => sdp::announce_ip(&local_sdp, local.udp.ip(), ip),
            None => local_sdp,
        };
        Ok(RtcPeer {
            core,
            local: *local,
            offer,
            ufrag,
            pwd,
            inbound: Default::default(),
            states: Default::default(),
        })
    }
}

impl RtcPeer {
    /// Moves what the core produced for the application into the peer's queues.
    fn pump(&mut self) {
        while let Some(TaggedRTCMessage { message, .. }) = self.core.poll_read() {
            if let RTCMessage::RtpPacket(_, packet) = message {
                self.inbound.push_back(packet);
            }
        }
        while let Some(event) = self.core.poll_event() {
            if let RTCPeerConnectionEvent::OnConnectionStateChangeEvent(state) = event {
                let mapped = match state {
                    RTCPeerConnectionState::Connected => Some(PeerState::Connected),
                    RTCPeerConnectionState::Failed => Some(PeerState::Failed),
                    RTCPeerConnectionState::Closed => Some(PeerState::Closed),
                    _ => None,
                };
                if let Some(s) = mapped {
                    self.states.push_back(s);
                }
            }
        }
    }
}

impl Transport for RtcPeer {
    fn offer(&self) -> &str {
        &self.offer
    }

    fn ice_credentials(&self) -> (&str, &str) {
        (&self.ufrag, &self.pwd)
    }

    fn restart_ice(&mut self, now: Instant) -> Result<(), EngineError> {
        self.core.restart_ice();
        let offer = self.core.create_offer(None).map_err(setup)?;
        self.core.set_local_description(now, offer).map_err(setup)?;
        let local_sdp = self
            .core
            .local_description()
            .map(|d| d.sdp)
            .ok_or_else(|| setup("no local description"))?;
        let (ufrag, pwd) =
            sdp::ice_credentials(&local_sdp).ok_or_else(|| setup("no ICE credentials"))?;
        self.offer = match self.local.announced {
            Some(ip) => sdp::announce_ip(&local_sdp, self.local.udp.ip(), ip),
            None => local_sdp,
        };
        self.ufrag = ufrag;
        self.pwd = pwd;
        self.pump();
        Ok(())
    }

    fn apply_answer(&mut self, sdp: &str, now: Instant) -> Result<(), EngineError> {
        let answer = RTCSessionDescription::answer(sdp.to_owned())
            .map_err(|_| EngineError::BadDescription)?;
        self.core
            .set_remote_description(now, answer)
            .map_err(|_| EngineError::BadDescription)?;
        self.pump();
        Ok(())
    }

    fn add_candidate(&mut self, candidate: &Candidate) -> Result<(), EngineError> {
        let init = RTCIceCandidateInit {
            candidate: candidate.candidate.clone(),
            sdp_mid: candidate.sdp_mid.clone(),
            sdp_mline_index: candidate.sdp_mline_index,
            ..Default::default()
        };
        self.core
            .add_remote_candidate(init)
            .map_err(|_| EngineError::BadCandidate)
    }

    fn handle_datagram(&mut self, data: BytesMut, from: Path, now: Instant) {
        let (local_addr, transport_protocol) = match (from.proto, self.local.tcp) {
            (Proto::Tcp, Some(tcp)) => (tcp, TransportProtocol::TCP),
            (Proto::Tcp, None) => return,
            (Proto::Udp, _) => (self.local.udp, TransportProtocol::UDP),
        };
        let msg = TaggedBytesMut {
            now,
            transport: TransportContext {
                local_addr,
                peer_addr: from.remote,
                ecn: None,
                transport_protocol,
            },
            message: data,
        };
        if let Err(error) = self.core.handle_read(msg) {
            tracing::trace!(%error, "datagram refused");
        }
        self.pump();
    }

    fn handle_timeout(&mut self, now: Instant) {
        if let Err(error) = self.core.handle_timeout(now) {
            tracing::trace!(%error, "timeout handling");
        }
        self.pump();
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        self.core.poll_timeout()
    }

    fn poll_datagram(&mut self) -> Option<(BytesMut, Path)> {
        self.core.poll_write().map(|m| {
            let path = match m.transport.transport_protocol {
                TransportProtocol::TCP => Path::tcp(m.transport.peer_addr),
                _ => Path::udp(m.transport.peer_addr),
            };
            (m.message, path)
        })
    }

    fn poll_state(&mut self) -> Option<PeerState> {
        self.states.pop_front()
    }

    fn close(&mut self) {
        let _ = self.core.close();
        self.pump();
    }
}

impl SpeakerTransport for RtcPeer {
    fn poll_rtp(&mut self) -> Option<rtp::Packet> {
        self.inbound.pop_front()
    }
}

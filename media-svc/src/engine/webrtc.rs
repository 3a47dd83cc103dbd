//! The engine on `webrtc` 0.21 (pinned with `rtc` 0.21; earlier releases leak every connection
//! that carried a track).
//!
//! One peer connection per transport, bound to one UDP port, Opus only, RTCP reports as the
//! only interceptor (no NACK or TWCC for forwarded audio), mDNS off, ICE-lite.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rtc::ice::mdns::MulticastDnsMode;
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::media_engine::MIME_TYPE_OPUS;
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters,
    RtpCodecKind,
};
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use tokio::sync::Notify;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCIceCandidateInit, RTCIceGatheringState, RTCPeerConnectionState, RTCSessionDescription,
    Registry, configure_rtcp_reports,
};

use super::{
    Candidate, Engine, EngineError, OPUS_FMTP, OPUS_PAYLOAD_TYPE, PacketSink, Transport,
    TransportSpec, sdp,
};

/// How long candidate gathering may take before the transport is given up.
const GATHER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Default)]
pub struct WebrtcEngine {
    /// ICE-lite on the server (the client runs full ICE). On by default.
    pub full_ice: bool,
}

pub struct WebrtcTransport {
    pc: Arc<dyn PeerConnection>,
    offer: String,
    track: Option<Arc<TrackLocalStaticRTP>>,
    sender: Option<Arc<dyn webrtc::rtp_transceiver::RtpSender>>,
}

impl std::fmt::Debug for WebrtcTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebrtcTransport")
            .field("sends", &self.track.is_some())
            .finish_non_exhaustive()
    }
}

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
        .map_err(|e| EngineError::Setup(e.to_string()))?;
    Ok(media)
}

struct Handler {
    gathered: Arc<Notify>,
    sink: Option<Arc<dyn PacketSink>>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            self.gathered.notify_one();
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        tracing::debug!(%state, "peer connection state");
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let Some(sink) = self.sink.clone() else {
            return;
        };
        tokio::spawn(async move {
            while let Some(event) = track.poll().await {
                if let TrackRemoteEvent::OnRtpPacket(packet) = event {
                    sink.on_rtp(packet);
                }
            }
        });
    }
}

fn setup<E: std::fmt::Display>(e: E) -> EngineError {
    EngineError::Setup(e.to_string())
}

impl Engine for WebrtcEngine {
    type Transport = WebrtcTransport;

    async fn create(
        &self,
        spec: TransportSpec,
        bind: SocketAddr,
        announced_ip: Option<IpAddr>,
    ) -> Result<WebrtcTransport, EngineError> {
        let gathered = Arc::new(Notify::new());
        let sink = match &spec {
            TransportSpec::Send { sink } => Some(Arc::clone(sink)),
            TransportSpec::Recv { .. } => None,
        };
        let media = opus_media_engine()?;
        let registry = configure_rtcp_reports(Registry::new());
        let settings = SettingEngineBuilder::new()
            .with_multicast_dns_mode(MulticastDnsMode::Disabled)
            .with_lite(!self.full_ice)
            .build();
        let pc = PeerConnectionBuilder::new()
            .with_media_engine(media)
            .with_interceptor_registry(registry)
            .with_setting_engine(settings)
            .with_handler(Arc::new(Handler {
                gathered: Arc::clone(&gathered),
                sink,
            }))
            .with_udp_addrs(vec![bind.to_string()])
            .build()
            .await
            .map_err(setup)?;
        let pc: Arc<dyn PeerConnection> = Arc::new(pc);
        let result = async {
            let (track, sender) = match spec {
                TransportSpec::Send { .. } => {
                    let init = RTCRtpTransceiverInit {
                        direction: RTCRtpTransceiverDirection::Recvonly,
                        streams: vec![],
                        send_encodings: vec![],
                    };
                    pc.add_transceiver_from_kind(RtpCodecKind::Audio, Some(init))
                        .await
                        .map_err(setup)?;
                    (None, None)
                }
                TransportSpec::Recv { ssrc } => {
                    let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
                        "talkgroup".to_owned(),
                        format!("floor-{ssrc}"),
                        "floor".to_owned(),
                        RtpCodecKind::Audio,
                        vec![RTCRtpEncodingParameters {
                            rtp_coding_parameters: RTCRtpCodingParameters {
                                ssrc: Some(ssrc),
                                ..Default::default()
                            },
                            codec: opus_codec(),
                            ..Default::default()
                        }],
                    )));
                    let init = RTCRtpTransceiverInit {
                        direction: RTCRtpTransceiverDirection::Sendonly,
                        streams: vec![],
                        send_encodings: vec![],
                    };
                    let transceiver = pc
                        .add_transceiver_from_track(
                            Arc::clone(&track) as Arc<dyn TrackLocal>,
                            Some(init),
                        )
                        .await
                        .map_err(setup)?;
                    let sender = transceiver.sender().await.map_err(setup)?;
                    (Some(track), sender)
                }
            };
            let offer = pc.create_offer(None).await.map_err(setup)?;
            pc.set_local_description(offer).await.map_err(setup)?;
            tokio::time::timeout(GATHER_TIMEOUT, gathered.notified())
                .await
                .map_err(|_| EngineError::Setup("candidate gathering timed out".into()))?;
            let local = pc
                .local_description()
                .await
                .ok_or_else(|| EngineError::Setup("no local description".into()))?;
            if !sdp::has_candidate(&local.sdp) {
                return Err(EngineError::Setup(format!("no candidate on {bind}")));
            }
            let offer = match announced_ip {
                Some(ip) => sdp::announce_ip(&local.sdp, bind.ip(), ip),
                None => local.sdp,
            };
            Ok((offer, track, sender))
        }
        .await;
        match result {
            Ok((offer, track, sender)) => Ok(WebrtcTransport {
                pc,
                offer,
                track,
                sender,
            }),
            Err(e) => {
                let _ = pc.close().await;
                Err(e)
            }
        }
    }
}

impl Transport for WebrtcTransport {
    fn offer(&self) -> &str {
        &self.offer
    }

    async fn apply_answer(&self, sdp: String) -> Result<(), EngineError> {
        let answer = RTCSessionDescription::answer(sdp).map_err(|_| EngineError::BadDescription)?;
        self.pc
            .set_remote_description(answer)
            .await
            .map_err(|_| EngineError::BadDescription)
    }

    async fn add_candidate(&self, candidate: Candidate) -> Result<(), EngineError> {
        let init = RTCIceCandidateInit {
            candidate: candidate.candidate,
            sdp_mid: candidate.sdp_mid,
            sdp_mline_index: candidate.sdp_mline_index,
            ..Default::default()
        };
        self.pc
            .add_ice_candidate(init)
            .await
            .map_err(|_| EngineError::BadCandidate)
    }

    async fn write_rtp(&self, packet: rtp::Packet) -> Result<(), EngineError> {
        let track = self.track.as_ref().ok_or(EngineError::Closed)?;
        track
            .write_rtp(packet)
            .await
            .map_err(|_| EngineError::Closed)
    }

    fn try_write_rtp(&self, packet: rtp::Packet) -> bool {
        use futures::FutureExt;
        // The track hands the packet to the connection's driver through a bounded queue; one
        // poll either queues it or finds the queue full, and then the packet is dropped here
        // rather than making the caller wait.
        let Some(track) = &self.track else {
            return false;
        };
        matches!(track.write_rtp(packet).now_or_never(), Some(Ok(())))
    }

    async fn payload_type(&self) -> u8 {
        let Some(sender) = &self.sender else {
            return OPUS_PAYLOAD_TYPE;
        };
        sender
            .get_parameters()
            .await
            .ok()
            .and_then(|p| p.rtp_parameters.codecs.first().map(|c| c.payload_type))
            .unwrap_or(OPUS_PAYLOAD_TYPE)
    }

    async fn close(&self) {
        if let Err(error) = self.pc.close().await {
            tracing::debug!(%error, "closing peer connection");
        }
    }
}

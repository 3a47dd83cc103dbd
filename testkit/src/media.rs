//! Client-side media for tests (feature `media`): a peer from the `webrtc` crate, as an app
//! would run it (it answers the media node's offer, sends Opus from a track, and collects what
//! it receives), Opus tones to send, and an analysis of what was heard.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_debug_implementations
)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::media_engine::{MIME_TYPE_OPUS, MediaEngine};
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters,
    RtpCodecKind,
};
use tokio::sync::Notify;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCIceGatheringState,
    RTCPeerConnectionState, RTCSessionDescription,
};

/// The Opus payload type the client offers (the one browsers use).
pub const OPUS_PAYLOAD_TYPE: u8 = 111;

/// Opus as a browser describes it.
pub fn opus_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_OPUS.to_owned(),
        clock_rate: 48_000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
        rtcp_feedback: vec![],
    }
}

fn opus_media_engine() -> MediaEngine {
    let mut media = MediaEngine::default();
    media
        .register_codec(
            RTCRtpCodecParameters {
                rtp_codec: opus_codec(),
                payload_type: OPUS_PAYLOAD_TYPE,
            },
            RtpCodecKind::Audio,
        )
        .expect("register opus");
    media
}

/// A received packet and when it arrived.
#[derive(Debug, Clone)]
pub struct Received {
    pub packet: rtp::Packet,
    pub at: Instant,
}

#[derive(Default)]
struct Shared {
    received: Mutex<Vec<Received>>,
    tracks: Mutex<u32>,
}

struct Handler {
    gathered: Arc<Notify>,
    connected: Arc<Notify>,
    shared: Arc<Shared>,
    /// Stop reading (a stalled listener).
    stalled: bool,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            self.gathered.notify_one();
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        if state == RTCPeerConnectionState::Connected {
            self.connected.notify_one();
        }
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        *self.shared.tracks.lock().unwrap() += 1;
        let shared = Arc::clone(&self.shared);
        let stalled = self.stalled;
        tokio::spawn(async move {
            if stalled {
                // Hold the track and never read it.
                std::future::pending::<()>().await;
            }
            while let Some(event) = track.poll().await {
                if let TrackRemoteEvent::OnRtpPacket(packet) = event {
                    shared.received.lock().unwrap().push(Received {
                        packet,
                        at: Instant::now(),
                    });
                }
            }
        });
    }
}

pub struct Peer {
    pub pc: Arc<dyn PeerConnection>,
    shared: Arc<Shared>,
    gathered: Arc<Notify>,
    connected: Arc<Notify>,
    pub track: Option<Arc<TrackLocalStaticRTP>>,
    pub ssrc: u32,
}

/// A TURN relay a peer may use, as `get-ice-servers` hands it out.
#[derive(Debug, Clone)]
pub struct Relay {
    pub urls: Vec<String>,
    pub username: String,
    pub credential: String,
}

impl Peer {
    pub async fn new(stalled: bool) -> Self {
        Self::build(stalled, None).await
    }

    /// A peer that may use only `relay` (ICE transport policy `relay`): it gathers no host
    /// candidate, so everything it sends and receives goes through the TURN server.
    pub async fn relayed(relay: Relay) -> Self {
        Self::build(false, Some(relay)).await
    }

    async fn build(stalled: bool, relay: Option<Relay>) -> Self {
        use webrtc::peer_connection::{
            RTCConfigurationBuilder, RTCIceServer, RTCIceTransportPolicy,
        };
        let shared = Arc::new(Shared::default());
        let gathered = Arc::new(Notify::new());
        let connected = Arc::new(Notify::new());
        let mut builder = PeerConnectionBuilder::new();
        if let Some(relay) = relay {
            builder = builder.with_configuration(
                RTCConfigurationBuilder::new()
                    .with_ice_servers(vec![RTCIceServer {
                        urls: relay.urls,
                        username: relay.username,
                        credential: relay.credential,
                    }])
                    .with_ice_transport_policy(RTCIceTransportPolicy::Relay)
                    .build(),
            );
            // A relay-only peer needs no mDNS (and a network namespace without a multicast
            // route could not join its group).
            builder = builder.with_setting_engine(
                webrtc::peer_connection::SettingEngineBuilder::new()
                    .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
                    .build(),
            );
        }
        let pc = builder
            .with_media_engine(opus_media_engine())
            .with_handler(Arc::new(Handler {
                gathered: Arc::clone(&gathered),
                connected: Arc::clone(&connected),
                shared: Arc::clone(&shared),
                stalled,
            }))
            .with_udp_addrs(vec!["127.0.0.1:0".to_owned()])
            .build()
            .await
            .unwrap();
        Self {
            pc: Arc::new(pc),
            shared,
            gathered,
            connected,
            track: None,
            ssrc: rand::random(),
        }
    }

    /// Offers to send Opus to another client peer directly (no server): the baseline the SFU
    /// path is compared with. Returns the offer SDP, candidates included.
    pub async fn offer_to_send(&mut self) -> String {
        self.add_mic().await;
        let offer = self.pc.create_offer(None).await.unwrap();
        self.pc.set_local_description(offer).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.gathered.notified())
            .await
            .expect("gathered");
        self.pc.local_description().await.unwrap().sdp
    }

    /// Takes the answer to [`Peer::offer_to_send`].
    pub async fn accept_answer(&self, answer: &str) {
        self.pc
            .set_remote_description(RTCSessionDescription::answer(answer.to_owned()).unwrap())
            .await
            .unwrap();
    }

    async fn add_mic(&mut self) {
        let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
            "client".to_owned(),
            format!("mic-{}", self.ssrc),
            "mic".to_owned(),
            RtpCodecKind::Audio,
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(self.ssrc),
                    ..Default::default()
                },
                codec: opus_codec(),
                ..Default::default()
            }],
        )));
        self.pc
            .add_track(Arc::clone(&track) as Arc<dyn TrackLocal>)
            .await
            .unwrap();
        self.track = Some(track);
    }

    /// Answers an offer; with `send`, attaches an Opus track to send on.
    pub async fn answer(&mut self, offer: &str, send: bool) -> String {
        self.pc
            .set_remote_description(RTCSessionDescription::offer(offer.to_owned()).unwrap())
            .await
            .unwrap();
        if send {
            self.add_mic().await;
        }
        let answer = self.pc.create_answer(None).await.unwrap();
        self.pc.set_local_description(answer).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.gathered.notified())
            .await
            .expect("gathered");
        self.pc.local_description().await.unwrap().sdp
    }

    /// Answers a later offer of the same connection (an ICE restart): no new track, and no
    /// wait for gathering (the node learns the peer's address from its checks).
    pub async fn reanswer(&self, offer: &str) -> String {
        self.pc
            .set_remote_description(RTCSessionDescription::offer(offer.to_owned()).unwrap())
            .await
            .unwrap();
        let answer = self.pc.create_answer(None).await.unwrap();
        self.pc.set_local_description(answer).await.unwrap();
        self.pc.local_description().await.unwrap().sdp
    }

    pub async fn wait_connected(&self) {
        tokio::time::timeout(Duration::from_secs(10), self.connected.notified())
            .await
            .expect("connected");
    }

    /// Sends one Opus frame with RTP `seq` and `timestamp`.
    pub async fn send(&self, seq: u16, timestamp: u32, payload: Vec<u8>) {
        let packet = rtp::Packet {
            header: rtp::header::Header {
                version: 2,
                payload_type: OPUS_PAYLOAD_TYPE,
                sequence_number: seq,
                timestamp,
                ssrc: self.ssrc,
                ..Default::default()
            },
            payload: payload.into(),
        };
        self.track
            .as_ref()
            .expect("a sending peer")
            .write_rtp(packet)
            .await
            .unwrap();
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    /// Forgets what was received so far.
    pub fn clear(&self) {
        self.shared.received.lock().unwrap().clear();
    }

    /// How many packets were received so far.
    pub fn received_count(&self) -> usize {
        self.shared.received.lock().unwrap().len()
    }

    pub fn track_count(&self) -> u32 {
        *self.shared.tracks.lock().unwrap()
    }

    pub async fn close(&self) {
        let _ = self.pc.close().await;
    }
}

/// Encodes a sine tone as 20 ms Opus frames (48 kHz mono).
pub struct Tone {
    encoder: opus::Encoder,
    freq: f32,
    phase: f32,
    pub seq: u16,
    pub ts: u32,
}

impl Tone {
    pub fn new(freq: f32) -> Self {
        Self {
            encoder: opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Voip)
                .unwrap(),
            freq,
            phase: 0.0,
            seq: rand::random(),
            ts: rand::random(),
        }
    }

    /// The next frame's Opus payload.
    pub fn frame(&mut self) -> Vec<u8> {
        let mut pcm = [0i16; 960];
        for sample in &mut pcm {
            *sample = (self.phase.sin() * 12_000.0) as i16;
            self.phase += 2.0 * std::f32::consts::PI * self.freq / 48_000.0;
        }
        let mut out = vec![0u8; 1500];
        let len = self.encoder.encode(&pcm, &mut out).unwrap();
        out.truncate(len);
        out
    }

    /// Sends `frames` frames from `peer`, paced at 20 ms.
    pub async fn play(&mut self, peer: &Peer, frames: usize) {
        let mut ticker = tokio::time::interval(Duration::from_millis(20));
        for _ in 0..frames {
            ticker.tick().await;
            let frame = self.frame();
            peer.send(self.seq, self.ts, frame).await;
            self.seq = self.seq.wrapping_add(1);
            self.ts = self.ts.wrapping_add(960);
        }
    }
}

/// Decodes a run of Opus payloads and returns (RMS level, dominant frequency in Hz estimated
/// from zero crossings) of the audio after the first frames settle.
pub fn analyse(payloads: &[Vec<u8>]) -> (f32, f32) {
    let mut decoder = opus::Decoder::new(48_000, opus::Channels::Mono).unwrap();
    let mut pcm = Vec::new();
    for payload in payloads {
        let mut out = [0i16; 5760];
        let n = decoder.decode(payload, &mut out, false).unwrap();
        pcm.extend_from_slice(&out[..n]);
    }
    let settled = &pcm[pcm.len().min(960 * 3)..];
    if settled.is_empty() {
        return (0.0, 0.0);
    }
    let rms = (settled
        .iter()
        .map(|&s| f64::from(s) * f64::from(s))
        .sum::<f64>()
        / settled.len() as f64)
        .sqrt() as f32;
    let crossings = settled
        .windows(2)
        .filter(|w| (w[0] < 0) != (w[1] < 0))
        .count();
    let seconds = settled.len() as f32 / 48_000.0;
    (rms, crossings as f32 / 2.0 / seconds)
}

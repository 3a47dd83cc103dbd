//! The node's send-only audio transport (a *recv* transport: the client listens), assembled
//! from the protocol crates under `rtc` 0.21: ICE-lite answering STUN checks, a DTLS-SRTP
//! handshake (`rtc::dtls`) whose exported keys feed one SRTP context (`rtc::srtp`), and
//! nothing else.
//!
//! Why not a full `RTCPeerConnection`: a listener's transport carries one outgoing audio
//! stream and nothing the node needs back, but every forwarded copy through the connection's
//! pipeline passes the interceptor chain, the stats accumulator and six handler queues before
//! its SRTP encryption (~12 µs of the node's CPU per copy measured at 1000 listeners). Here a
//! copy is one header marshal, one SRTP encryption and one datagram. The same design as
//! mediasoup's `WebRtcTransport`: the SFU owns its transport and is always ICE-lite.
//!
//! The node keeps one DTLS certificate for all its transports ([`Identity`]), as browsers and
//! mediasoup do; clients authenticate it by the fingerprint in the offer, and the node
//! authenticates each client by the fingerprint in its answer. Media and DTLS are only
//! accepted from, and only sent to, an address that passed a STUN check signed with the
//! transport's ICE password.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rtc::crypto::{HashAlgorithm, RTCCryptoProvider, SignatureScheme};
use rtc::dtls::config::{
    ClientAuthType, ConfigBuilder, ExtendedMasterSecretType, HandshakeConfig,
    VerifyPeerCertificateFn,
};
use rtc::dtls::endpoint::{Endpoint, EndpointEvent};
use rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile;
use rtc::peer_connection::certificate::{CertificateParams, RTCCertificate};
use rtc::rtp;
use rtc::shared::TransportProtocol;
use rtc::shared::marshal::{Marshal, MarshalSize};
use rtc::srtp::protection_profile::ProtectionProfile;
use rtc::stun::attributes::{ATTR_ICE_CONTROLLED, ATTR_USE_CANDIDATE, ATTR_USERNAME};
use rtc::stun::fingerprint::FINGERPRINT;
use rtc::stun::integrity::MessageIntegrity;
use rtc::stun::message::{BINDING_SUCCESS, CLASS_REQUEST, Getter, METHOD_BINDING, Message, Setter};
use rtc::stun::textattrs::Username;
use rtc::stun::xoraddr::XorMappedAddress;

use super::{Candidate, EngineError, OPUS_FMTP, OPUS_PAYLOAD_TYPE, PeerState};

/// A client that stops its ICE consent checks (RFC 7675: every ~5 s) is gone after this.
const CONSENT_TIMEOUT: Duration = Duration::from_secs(30);
/// A transport must finish ICE and DTLS this long after the client's answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer the node parses.
const MAX_ANSWER: usize = 64 * 1024;
/// DTLS datagrams kept from before the answer (the client's first flight).
const MAX_EARLY_DTLS: usize = 8;

/// An ICE username fragment or password: RFC 8839 `ice-char`s, at least `min` of them.
fn valid_ice(value: &str, min: usize) -> bool {
    (min..=256).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

/// What every listener transport of the node shares: the crypto provider and the node's DTLS
/// certificate with its fingerprint.
pub struct Identity {
    crypto: Arc<dyn RTCCryptoProvider>,
    certificate: RTCCertificate,
    fingerprint: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

fn setup<E: std::fmt::Display>(e: E) -> EngineError {
    EngineError::Setup(e.to_string())
}

/// `aa:bb:...` of a SHA-256 digest.
fn fingerprint_of(crypto: &dyn rtc::crypto::RTCCrypto, der: &[u8]) -> Result<String, EngineError> {
    let digest = crypto.hash(HashAlgorithm::Sha256, der).map_err(setup)?;
    Ok(digest
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":"))
}

impl Identity {
    /// A fresh ECDSA P-256 certificate for this node.
    pub fn generate() -> Result<Self, EngineError> {
        let crypto = rtc::crypto::default_provider().map_err(setup)?;
        let params = CertificateParams::new(vec!["talkgroup-media".to_owned()]).map_err(setup)?;
        let certificate =
            RTCCertificate::generate(crypto.crypto(), SignatureScheme::EcdsaP256Sha256, params)
                .map_err(setup)?;
        let der = certificate
            .dtls_certificate
            .certificate
            .first()
            .ok_or_else(|| setup("certificate without a chain"))?;
        let fingerprint = fingerprint_of(crypto.crypto(), der.as_ref())?;
        Ok(Self {
            crypto,
            certificate,
            fingerprint,
        })
    }

    fn handshake_config(
        &self,
        is_client: bool,
        remote_fingerprint: String,
    ) -> Result<Arc<HandshakeConfig>, EngineError> {
        let crypto = Arc::clone(&self.crypto);
        // The DTLS layer requires a client certificate (`RequireAnyClientCert`) and skips chain
        // validation: WebRTC certificates are self-signed, and this check, against the
        // fingerprint the client signed into its answer, is what authenticates it.
        let verify: VerifyPeerCertificateFn = Arc::new(move |certs: &[Vec<u8>], _chains| {
            let presented = certs
                .first()
                .ok_or(rtc::shared::error::Error::ErrNonCertificate)?;
            match fingerprint_of(crypto.crypto(), presented) {
                Ok(fp) if fp.eq_ignore_ascii_case(&remote_fingerprint) => Ok(()),
                _ => Err(rtc::shared::error::Error::ErrNoMatchingCertificateFingerprint),
            }
        });
        let config = ConfigBuilder::default()
            .with_crypto_provider(Arc::clone(&self.crypto))
            .with_certificates(vec![self.certificate.dtls_certificate.clone()])
            .with_srtp_protection_profiles(vec![
                SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm,
                SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80,
            ])
            .with_client_auth(ClientAuthType::RequireAnyClientCert)
            .with_insecure_skip_verify(true)
            .with_verify_peer_certificate(Some(verify))
            .with_extended_master_secret(ExtendedMasterSecretType::Require)
            .build(is_client, None)
            .map_err(setup)?;
        Ok(Arc::new(config))
    }
}

/// What the client's answer says that the transport needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    ufrag: String,
    pwd: String,
    /// `sha-256` fingerprint, lower case.
    fingerprint: String,
    /// The client takes the DTLS server role (`a=setup:passive`); the node then connects.
    client_passive: bool,
    payload_type: u8,
}

/// Reads the parts of the client's answer the transport uses; anything missing or malformed
/// refuses the answer.
fn parse_answer(sdp: &str) -> Result<Answer, EngineError> {
    if sdp.len() > MAX_ANSWER {
        return Err(EngineError::BadDescription);
    }
    let (mut ufrag, mut pwd, mut fingerprint, mut setup) = (None, None, None, None);
    let mut audio_port = None;
    let mut payload_type = None;
    let mut sections = 0;
    for line in sdp.lines() {
        let line = line.trim_end();
        if let Some(m) = line.strip_prefix("m=") {
            sections += 1;
            if sections == 1 {
                let mut fields = m.split(' ');
                if fields.next() != Some("audio") {
                    return Err(EngineError::BadDescription);
                }
                audio_port = fields.next().and_then(|p| p.parse::<u16>().ok());
            }
            continue;
        }
        // Session-level lines and the first (only) media section.
        if sections > 1 {
            continue;
        }
        let Some(attr) = line.strip_prefix("a=") else {
            continue;
        };
        let (name, value) = attr.split_once(':').unwrap_or((attr, ""));
        match name {
            "ice-ufrag" => ufrag = Some(value.to_owned()),
            "ice-pwd" => pwd = Some(value.to_owned()),
            "fingerprint" => {
                if let Some(("sha-256", fp)) = value.split_once(' ') {
                    fingerprint = Some(fp.trim().to_ascii_lowercase());
                }
            }
            "setup" => setup = Some(value.to_owned()),
            "rtpmap" => {
                if let Some((pt, codec)) = value.split_once(' ')
                    && codec.to_ascii_lowercase().starts_with("opus/48000")
                    && payload_type.is_none()
                {
                    payload_type = pt.parse::<u8>().ok().filter(|pt| (96..=127).contains(pt));
                }
            }
            _ => {}
        }
    }
    // RFC 8839: ufrag at least 4 characters, password at least 22.
    let valid = |s: &Option<String>, min: usize| s.as_deref().is_some_and(|v| valid_ice(v, min));
    if !valid(&ufrag, 4) || !valid(&pwd, 22) || audio_port.unwrap_or(0) == 0 {
        return Err(EngineError::BadDescription);
    }
    let fingerprint = fingerprint
        .filter(|fp| fp.len() == 95 && fp.bytes().all(|b| b.is_ascii_hexdigit() || b == b':'))
        .ok_or(EngineError::BadDescription)?;
    let client_passive = match setup.as_deref() {
        Some("active") | None => false,
        Some("passive") => true,
        Some(_) => return Err(EngineError::BadDescription),
    };
    Ok(Answer {
        ufrag: ufrag.unwrap_or_default(),
        pwd: pwd.unwrap_or_default(),
        fingerprint,
        client_passive,
        payload_type: payload_type.ok_or(EngineError::BadDescription)?,
    })
}

fn random_token(len: usize) -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(CHARS[rng.random_range(0..CHARS.len())]))
        .collect()
}

/// The node's offer: one send-only Opus section, ICE-lite, one host candidate.
fn offer(identity: &Identity, ufrag: &str, pwd: &str, ssrc: u32, candidate: SocketAddr) -> String {
    let family = if candidate.is_ipv4() { "IP4" } else { "IP6" };
    let ip = candidate.ip();
    let port = candidate.port();
    let session: u64 = rand::random::<u64>() >> 1;
    format!(
        "v=0\r\n\
         o=- {session} 1 IN {family} {ip}\r\n\
         s=-\r\n\
         t=0 0\r\n\
         a=ice-lite\r\n\
         a=group:BUNDLE 0\r\n\
         a=msid-semantic: WMS floor\r\n\
         m=audio {port} UDP/TLS/RTP/SAVPF {OPUS_PAYLOAD_TYPE}\r\n\
         c=IN {family} {ip}\r\n\
         a=ice-ufrag:{ufrag}\r\n\
         a=ice-pwd:{pwd}\r\n\
         a=fingerprint:sha-256 {fingerprint}\r\n\
         a=setup:actpass\r\n\
         a=mid:0\r\n\
         a=sendonly\r\n\
         a=rtcp-mux\r\n\
         a=rtpmap:{OPUS_PAYLOAD_TYPE} opus/48000/2\r\n\
         a=fmtp:{OPUS_PAYLOAD_TYPE} {OPUS_FMTP}\r\n\
         a=msid:floor floor-{ssrc}\r\n\
         a=ssrc:{ssrc} cname:talkgroup\r\n\
         a=ssrc:{ssrc} msid:floor floor-{ssrc}\r\n\
         a=candidate:1 1 udp 2130706431 {ip} {port} typ host\r\n\
         a=end-of-candidates\r\n",
        fingerprint = identity.fingerprint.to_ascii_uppercase(),
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Offered; waiting for the answer.
    Offered,
    /// Answer applied; ICE and DTLS under way.
    Connecting,
    Connected,
    /// Failed or closed: nothing more is sent or accepted.
    Ended,
}

/// One listener's transport.
pub struct ListenerPeer {
    identity: Arc<Identity>,
    local: SocketAddr,
    offer: String,
    ssrc: u32,
    ufrag: String,
    pwd: String,
    answer: Option<Answer>,
    phase: Phase,
    /// Where media goes: the address the client nominated in a valid check.
    remote: Option<SocketAddr>,
    /// The client's username fragment in the checks from `remote`.
    remote_ufrag: Option<String>,
    /// The client nominated `remote` (USE-CANDIDATE).
    nominated: bool,
    /// DTLS datagrams from `remote` that came before the answer.
    early_dtls: Vec<BytesMut>,
    last_consent: Option<Instant>,
    connect_deadline: Option<Instant>,
    dtls: Option<Endpoint>,
    /// The node's DTLS client configuration, when the client answered `passive`.
    dtls_client: Option<Arc<HandshakeConfig>>,
    srtp: Option<rtc::srtp::context::Context>,
    out: VecDeque<(BytesMut, SocketAddr)>,
    states: VecDeque<PeerState>,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for ListenerPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerPeer")
            .field("local", &self.local)
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

impl ListenerPeer {
    pub fn new(
        identity: Arc<Identity>,
        ssrc: u32,
        local: SocketAddr,
        announced: Option<IpAddr>,
    ) -> Self {
        let ufrag = random_token(16);
        let pwd = random_token(32);
        let candidate = SocketAddr::new(announced.unwrap_or(local.ip()), local.port());
        let offer = offer(&identity, &ufrag, &pwd, ssrc, candidate);
        Self {
            identity,
            local,
            offer,
            ssrc,
            ufrag,
            pwd,
            answer: None,
            phase: Phase::Offered,
            remote: None,
            remote_ufrag: None,
            nominated: false,
            early_dtls: Vec::new(),
            last_consent: None,
            connect_deadline: None,
            dtls: None,
            dtls_client: None,
            srtp: None,
            out: VecDeque::new(),
            states: VecDeque::new(),
            scratch: Vec::with_capacity(1500),
        }
    }

    pub fn offer(&self) -> &str {
        &self.offer
    }

    pub fn apply_answer(&mut self, sdp: &str, now: Instant) -> Result<(), EngineError> {
        if self.phase != Phase::Offered {
            return Err(EngineError::BadDescription);
        }
        let answer = parse_answer(sdp)?;
        let config = self
            .identity
            .handshake_config(answer.client_passive, answer.fingerprint.clone())?;
        if answer.client_passive {
            self.dtls = Some(Endpoint::new(self.local, TransportProtocol::UDP, None));
            self.dtls_client = Some(config);
        } else {
            self.dtls = Some(Endpoint::new(
                self.local,
                TransportProtocol::UDP,
                Some(config),
            ));
        }
        // An address selected before the answer counts only if the checks came from this client.
        if self.remote_ufrag.as_deref() != Some(answer.ufrag.as_str()) {
            self.remote = None;
            self.remote_ufrag = None;
            self.nominated = false;
            self.early_dtls.clear();
        }
        self.answer = Some(answer);
        self.phase = Phase::Connecting;
        self.connect_deadline = Some(now + CONNECT_TIMEOUT);
        if self.remote.is_some() {
            self.last_consent = Some(now);
        }
        self.connect_if_client(now);
        if let Some(remote) = self.remote {
            for data in std::mem::take(&mut self.early_dtls) {
                self.on_dtls(data, remote, now);
            }
        }
        self.drain_dtls();
        Ok(())
    }

    /// Client candidates are not needed: an ICE-lite agent learns the client's address from
    /// its checks. They are validated and otherwise ignored.
    pub fn add_candidate(&mut self, candidate: &Candidate) -> Result<(), EngineError> {
        let c = candidate.candidate.trim();
        if c.is_empty() || c.len() > 512 {
            return Err(EngineError::BadCandidate);
        }
        Ok(())
    }

    fn end(&mut self, state: PeerState) {
        if self.phase != Phase::Ended {
            self.phase = Phase::Ended;
            self.srtp = None;
            self.states.push_back(state);
        }
    }

    pub fn handle_datagram(&mut self, data: BytesMut, from: SocketAddr, now: Instant) {
        if self.phase == Phase::Ended || data.is_empty() {
            return;
        }
        // RFC 7983 demultiplexing by the first byte.
        match data[0] {
            0..=3 => self.on_stun(&data, from, now),
            20..=63 if Some(from) == self.remote => {
                if self.dtls.is_some() {
                    self.on_dtls(data, from, now);
                } else if self.early_dtls.len() < MAX_EARLY_DTLS {
                    // The client's first flight, ahead of its answer: kept, so the handshake
                    // does not wait a retransmission timeout (1 s) for it.
                    self.early_dtls.push(data);
                }
            }
            // RTCP from the listener (receiver reports) is not used; anything else is noise.
            _ => {}
        }
    }

    /// Answers a valid binding request. A check can arrive before the client's answer reaches
    /// the node (the client starts ICE as soon as it has the offer): it is answered all the
    /// same, since its integrity is proven with the node's own password, and the client's
    /// username fragment in it is held against the answer when that comes (RFC 8445 7.3).
    fn on_stun(&mut self, data: &[u8], from: SocketAddr, now: Instant) {
        let mut m = Message::new();
        if m.unmarshal_binary(data).is_err()
            || m.typ.method != METHOD_BINDING
            || m.typ.class != CLASS_REQUEST
        {
            return;
        }
        let mut username = Username::new(ATTR_USERNAME, String::new());
        let their_ufrag = match username.get_from(&m) {
            Ok(()) => match username.text.split_once(':') {
                Some((ours, theirs)) if ours == self.ufrag && valid_ice(theirs, 4) => {
                    theirs.to_owned()
                }
                _ => return,
            },
            Err(_) => return,
        };
        if self.answer.as_ref().is_some_and(|a| a.ufrag != their_ufrag)
            || FINGERPRINT.check(&m).is_err()
            || MessageIntegrity::check(&mut m, self.pwd.as_bytes(), self.identity.crypto.crypto())
                .is_err()
        {
            tracing::trace!(%from, "STUN check refused");
            return;
        }
        // A lite agent is always controlled; a peer that is not controlling is broken.
        if m.contains(ATTR_ICE_CONTROLLED) {
            return;
        }
        let mut reply = Message::new();
        let built = reply.build(&[
            Box::new(m.clone()) as Box<dyn Setter>,
            Box::new(BINDING_SUCCESS),
            Box::new(XorMappedAddress {
                ip: from.ip(),
                port: from.port(),
            }),
            Box::new(MessageIntegrity::new_short_term_integrity_with_provider(
                self.pwd.clone(),
                self.identity.crypto.crypto(),
            )),
            Box::new(FINGERPRINT),
        ]);
        if built.is_err() {
            return;
        }
        self.out
            .push_back((BytesMut::from(reply.raw.as_slice()), from));
        let nominating = m.contains(ATTR_USE_CANDIDATE);
        if nominating || self.remote.is_none() {
            if self.remote != Some(from) {
                tracing::debug!(%from, nominating, "listener address selected");
            }
            self.remote = Some(from);
            self.remote_ufrag = Some(their_ufrag);
            self.nominated |= nominating;
            self.connect_if_client(now);
        }
        if self.remote == Some(from) {
            self.last_consent = Some(now);
        }
        self.drain_dtls();
    }

    /// Starts the handshake when the client answered `passive` and nominated an address. Not
    /// before the nomination: until the client has this check's response its DTLS transport is
    /// not listening, so a ClientHello sent any earlier is lost and costs a 1 s retransmission.
    fn connect_if_client(&mut self, now: Instant) {
        if let Some(remote) = self.remote.filter(|_| self.nominated)
            && let Some(dtls) = self.dtls.as_mut()
            && let Some(config) = self.dtls_client.take()
            && dtls.connect(now, remote, config, None).is_err()
        {
            self.end(PeerState::Failed);
        }
    }

    fn on_dtls(&mut self, data: BytesMut, from: SocketAddr, now: Instant) {
        let Some(dtls) = self.dtls.as_mut() else {
            return;
        };
        let events = dtls.read(now, from, None, data);
        self.drain_dtls();
        let events = match events {
            Ok(events) => events,
            Err(error) => {
                tracing::debug!(%error, "listener DTLS refused");
                if self.phase == Phase::Connecting {
                    self.end(PeerState::Failed);
                }
                return;
            }
        };
        for event in events {
            match event {
                EndpointEvent::HandshakeComplete => match self.srtp_context(from) {
                    Ok(context) => {
                        self.srtp = Some(context);
                        self.phase = Phase::Connected;
                        self.connect_deadline = None;
                        self.states.push_back(PeerState::Connected);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "listener SRTP keys could not be derived");
                        self.end(PeerState::Failed);
                    }
                },
                EndpointEvent::PeerClosed => self.end(PeerState::Closed),
                _ => {}
            }
        }
    }

    /// The SRTP context for what the node sends, keyed from the finished handshake (RFC 5764).
    fn srtp_context(&self, remote: SocketAddr) -> Result<rtc::srtp::context::Context, EngineError> {
        let state = self
            .dtls
            .as_ref()
            .and_then(|d| d.get_connection_state(remote))
            .ok_or_else(|| setup("no DTLS state"))?;
        let profile = match state.srtp_protection_profile() {
            SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm => ProtectionProfile::AeadAes128Gcm,
            SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80 => {
                ProtectionProfile::Aes128CmHmacSha1_80
            }
            _ => return Err(setup("unexpected SRTP profile")),
        };
        let mut config = rtc::srtp::config::Config {
            profile,
            ..Default::default()
        };
        let material = state
            .export_keying_material(
                rtc::srtp::config::LABEL_EXTRACTOR_DTLS_SRTP,
                &[],
                config.keying_material_len(),
            )
            .map_err(setup)?;
        config
            .set_session_keys_from_keying_material(material.as_ref(), state.is_client())
            .map_err(setup)?;
        rtc::srtp::context::Context::new(
            &config.keys.local_master_key,
            &config.keys.local_master_salt,
            profile,
            None,
            None,
            self.identity.crypto.crypto(),
        )
        .map_err(setup)
    }

    fn drain_dtls(&mut self) {
        if let Some(dtls) = self.dtls.as_mut() {
            while let Some(t) = dtls.poll_transmit() {
                self.out.push_back((t.message, t.transport.peer_addr));
            }
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.phase == Phase::Ended {
            return;
        }
        if self.connect_deadline.is_some_and(|at| now >= at) {
            tracing::info!(local = %self.local, "listener transport did not connect in time");
            self.end(PeerState::Failed);
            return;
        }
        if self.phase == Phase::Connected
            && self
                .last_consent
                .is_some_and(|at| now >= at + CONSENT_TIMEOUT)
        {
            tracing::info!(local = %self.local, "listener stopped its consent checks");
            self.end(PeerState::Failed);
            return;
        }
        if let (Some(dtls), Some(remote)) = (self.dtls.as_mut(), self.remote)
            && dtls.poll_timeout(&remote).is_some_and(|at| now >= at)
            && dtls.handle_timeout(remote, now).is_err()
        {
            tracing::debug!("listener DTLS handshake timed out");
            self.end(PeerState::Failed);
        }
        self.drain_dtls();
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.phase == Phase::Ended {
            return None;
        }
        let dtls = self
            .dtls
            .as_ref()
            .zip(self.remote)
            .and_then(|(d, r)| d.poll_timeout(&r));
        let consent = match self.phase {
            Phase::Connected => self.last_consent.map(|at| at + CONSENT_TIMEOUT),
            _ => self.connect_deadline,
        };
        [dtls, consent].into_iter().flatten().min()
    }

    pub fn poll_datagram(&mut self) -> Option<(BytesMut, SocketAddr)> {
        self.out.pop_front()
    }

    /// Encrypts one RTP packet for the listener and queues it.
    pub fn write_rtp(&mut self, packet: &rtp::Packet) -> bool {
        let (Some(srtp), Some(remote)) = (self.srtp.as_mut(), self.remote) else {
            return false;
        };
        self.scratch.clear();
        self.scratch
            .resize(packet.header.marshal_size() + packet.payload.len(), 0);
        let Ok(n) = packet.header.marshal_to(&mut self.scratch) else {
            return false;
        };
        self.scratch[n..].copy_from_slice(&packet.payload);
        match srtp.encrypt_rtp_with_header(&self.scratch, &packet.header) {
            Ok(encrypted) => {
                self.out.push_back((encrypted, remote));
                true
            }
            Err(_) => false,
        }
    }

    pub fn payload_type(&self) -> u8 {
        self.answer
            .as_ref()
            .map_or(OPUS_PAYLOAD_TYPE, |a| a.payload_type)
    }

    pub fn ssrc(&self) -> u32 {
        self.ssrc
    }

    pub fn poll_state(&mut self) -> Option<PeerState> {
        self.states.pop_front()
    }

    pub fn close(&mut self) {
        if let (Some(dtls), Some(remote)) = (self.dtls.as_mut(), self.remote)
            && self.phase == Phase::Connected
        {
            dtls.stop(Instant::now(), remote);
        }
        self.drain_dtls();
        self.end(PeerState::Closed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89";

    fn answer(extra: &str) -> String {
        format!(
            "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
             a=fingerprint:sha-256 {FP}\r\n\
             m=audio 9 UDP/TLS/RTP/SAVPF 109\r\nc=IN IP4 0.0.0.0\r\n\
             a=ice-ufrag:abcd\r\na=ice-pwd:0123456789012345678901\r\n\
             a=rtpmap:109 opus/48000/2\r\n{extra}"
        )
    }

    #[test]
    fn an_answer_gives_credentials_fingerprint_role_and_payload_type() {
        let a = parse_answer(&answer("a=setup:active\r\n")).unwrap();
        assert_eq!(a.ufrag, "abcd");
        assert_eq!(a.pwd, "0123456789012345678901");
        assert_eq!(a.fingerprint, FP.to_ascii_lowercase());
        assert!(!a.client_passive);
        assert_eq!(a.payload_type, 109);
        assert!(
            parse_answer(&answer("a=setup:passive\r\n"))
                .unwrap()
                .client_passive
        );
    }

    #[test]
    fn incomplete_or_hostile_answers_are_refused() {
        let cases = [
            answer("a=setup:actpass\r\n"),
            answer("").replace("a=ice-pwd:0123456789012345678901", "a=ice-pwd:short"),
            answer("").replace("a=ice-ufrag:abcd", "a=ice-ufrag:a b"),
            answer("").replace("sha-256", "sha-1"),
            answer("").replace("m=audio 9", "m=audio 0"),
            answer("").replace("m=audio", "m=video"),
            answer("").replace("opus/48000/2", "PCMU/8000"),
            answer(&"a=x\r\n".repeat(20_000)),
            String::new(),
        ];
        for sdp in cases {
            assert!(
                parse_answer(&sdp).is_err(),
                "{}",
                &sdp[..sdp.len().min(300)]
            );
        }
    }

    #[test]
    fn the_offer_is_ice_lite_send_only_opus_with_one_candidate() {
        let identity = Arc::new(Identity::generate().unwrap());
        let local: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let peer = ListenerPeer::new(identity, 1234, local, Some("203.0.113.9".parse().unwrap()));
        let sdp = peer.offer();
        for line in [
            "a=ice-lite",
            "a=sendonly",
            "a=setup:actpass",
            "a=rtpmap:111 opus/48000/2",
            "a=ssrc:1234 cname:talkgroup",
            "a=candidate:1 1 udp 2130706431 203.0.113.9 40000 typ host",
        ] {
            assert!(sdp.lines().any(|l| l == line), "{line} missing in {sdp}");
        }
        assert_eq!(sdp.lines().filter(|l| l.starts_with("m=")).count(), 1);
    }

    #[test]
    fn nothing_is_sent_before_the_handshake() {
        let identity = Arc::new(Identity::generate().unwrap());
        let mut peer = ListenerPeer::new(identity, 1, "127.0.0.1:40000".parse().unwrap(), None);
        let packet = rtp::Packet::default();
        assert!(!peer.write_rtp(&packet));
        // A malformed STUN message, and DTLS from an address no check validated, are ignored.
        peer.handle_datagram(
            BytesMut::from(&[0u8, 1, 0, 0][..]),
            "127.0.0.1:5000".parse().unwrap(),
            Instant::now(),
        );
        peer.handle_datagram(
            BytesMut::from(&[22u8, 254, 253][..]),
            "127.0.0.1:5000".parse().unwrap(),
            Instant::now(),
        );
        assert!(peer.poll_datagram().is_none());
    }

    /// A real client: an `rtc` peer connection answering the node's offer, joined to the
    /// listener transport by an in-memory "network" between two fixed addresses.
    mod handshake {
        use super::*;
        use crate::engine::rtc_peer::{host_candidate, opus_media_engine};
        use rtc::peer_connection::message::RTCMessage;
        use rtc::peer_connection::sdp::RTCSessionDescription;
        use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
        use rtc::sansio::Protocol;
        use rtc::shared::{TaggedBytesMut, TransportContext};

        const NODE: &str = "127.0.0.1:40000";
        const CLIENT: &str = "127.0.0.1:50000";

        fn client(offer: &str) -> (RTCPeerConnection, String) {
            let now = Instant::now();
            let mut pc = RTCPeerConnectionBuilder::new()
                .with_media_engine(opus_media_engine().unwrap())
                .build(now)
                .unwrap();
            pc.set_remote_description(now, RTCSessionDescription::offer(offer.into()).unwrap())
                .unwrap();
            pc.add_local_candidate(host_candidate(CLIENT.parse().unwrap()).unwrap())
                .unwrap();
            let answer = pc.create_answer(None).unwrap();
            pc.set_local_description(now, answer).unwrap();
            let sdp = pc.local_description().unwrap().sdp;
            (pc, sdp)
        }

        /// Runs both sides for up to `steps` rounds of simulated time; returns the RTP payloads
        /// the client decrypted and the listener's state changes. `tamper` may rewrite or drop
        /// each datagram on its way to the node.
        fn run(
            node: &mut ListenerPeer,
            pc: &mut RTCPeerConnection,
            now: &mut Instant,
            steps: usize,
            send_after_connect: usize,
            mut tamper: impl FnMut(BytesMut) -> Option<(BytesMut, SocketAddr)>,
        ) -> (Vec<Vec<u8>>, Vec<PeerState>) {
            let node_addr: SocketAddr = NODE.parse().unwrap();
            let client_addr: SocketAddr = CLIENT.parse().unwrap();
            let mut heard = Vec::new();
            let mut states = Vec::new();
            let mut sent = 0usize;
            for _ in 0..steps {
                *now += Duration::from_millis(10);
                let now = *now;
                let _ = pc.handle_timeout(now);
                node.handle_timeout(now);
                while let Some(out) = pc.poll_write() {
                    if let Some((data, from)) = tamper(out.message) {
                        node.handle_datagram(data, from, now);
                    }
                }
                while let Some((data, to)) = node.poll_datagram() {
                    assert_eq!(
                        to, client_addr,
                        "the node sends only to the checked address"
                    );
                    let _ = pc.handle_read(TaggedBytesMut {
                        now,
                        transport: TransportContext {
                            local_addr: client_addr,
                            peer_addr: node_addr,
                            ecn: None,
                            transport_protocol: TransportProtocol::UDP,
                        },
                        message: data,
                    });
                }
                while let Some(msg) = pc.poll_read() {
                    if let RTCMessage::RtpPacket(_, packet) = msg.message {
                        heard.push(packet.payload.to_vec());
                    }
                }
                while pc.poll_event().is_some() {}
                while let Some(state) = node.poll_state() {
                    states.push(state);
                }
                if states.contains(&PeerState::Connected) && sent < send_after_connect {
                    let packet = rtp::Packet {
                        header: rtp::header::Header {
                            version: 2,
                            payload_type: node.payload_type(),
                            sequence_number: 100 + sent as u16,
                            timestamp: 960 * sent as u32,
                            ssrc: node.ssrc(),
                            ..Default::default()
                        },
                        payload: bytes::Bytes::from(vec![sent as u8; 40]),
                    };
                    assert!(node.write_rtp(&packet));
                    sent += 1;
                }
            }
            (heard, states)
        }

        fn pair() -> (ListenerPeer, RTCPeerConnection, String) {
            let identity = Arc::new(Identity::generate().unwrap());
            let node = ListenerPeer::new(identity, 4242, NODE.parse().unwrap(), None);
            let (pc, answer) = client(node.offer());
            (node, pc, answer)
        }

        fn from_client(data: BytesMut) -> Option<(BytesMut, SocketAddr)> {
            Some((data, CLIENT.parse().unwrap()))
        }

        #[test]
        fn a_real_client_connects_and_decrypts_what_the_node_sends() {
            let (mut node, mut pc, answer) = pair();
            let mut now = Instant::now();
            node.apply_answer(&answer, now).unwrap();
            let (heard, states) = run(&mut node, &mut pc, &mut now, 400, 5, from_client);
            assert_eq!(states, vec![PeerState::Connected]);
            assert_eq!(heard.len(), 5, "every copy decrypted by the client");
            assert_eq!(heard[3], vec![3u8; 40]);
        }

        #[test]
        fn consent_keeps_a_live_client_and_ends_a_silent_one() {
            let (mut node, mut pc, answer) = pair();
            let mut now = Instant::now();
            node.apply_answer(&answer, now).unwrap();
            // 45 s of simulated time: the client's keepalive checks renew consent.
            let (_, states) = run(&mut node, &mut pc, &mut now, 4_500, 0, from_client);
            assert_eq!(states, vec![PeerState::Connected]);
            // Then nothing more arrives from it: failed once 30 s pass without a check.
            let (_, states) = run(&mut node, &mut pc, &mut now, 3_200, 0, |_| None);
            assert_eq!(states, vec![PeerState::Failed]);
        }

        #[test]
        fn checks_before_the_answer_are_answered_and_kept() {
            let (mut node, mut pc, answer) = pair();
            let mut now = Instant::now();
            // The client starts ICE at once; the answer reaches the node 200 ms later.
            let _ = run(&mut node, &mut pc, &mut now, 20, 0, from_client);
            node.apply_answer(&answer, now).unwrap();
            let (_, states) = run(&mut node, &mut pc, &mut now, 400, 0, from_client);
            assert_eq!(states, vec![PeerState::Connected]);
        }

        #[test]
        fn a_client_whose_certificate_is_not_the_one_in_its_answer_is_refused() {
            let (mut node, mut pc, answer) = pair();
            let mut now = Instant::now();
            let forged = answer
                .lines()
                .map(|l| {
                    if l.starts_with("a=fingerprint:sha-256 ") {
                        format!("a=fingerprint:sha-256 {FP}")
                    } else {
                        l.to_owned()
                    }
                })
                .collect::<Vec<_>>()
                .join("\r\n");
            node.apply_answer(&forged, now).unwrap();
            let (heard, states) = run(&mut node, &mut pc, &mut now, 400, 5, from_client);
            assert_eq!(states, vec![PeerState::Failed]);
            assert!(heard.is_empty());
        }

        #[test]
        fn checks_with_a_wrong_password_or_from_another_address_win_nothing() {
            let (mut node, mut pc, answer) = pair();
            let mut now = Instant::now();
            node.apply_answer(&answer, now).unwrap();
            // Every STUN check has one bit of its integrity flipped: never answered.
            let (_, states) = run(&mut node, &mut pc, &mut now, 200, 0, |mut data| {
                if data[0] < 4 && data.len() > 40 {
                    let at = data.len() - 12;
                    data[at] ^= 1;
                }
                from_client(data)
            });
            assert!(states.is_empty());
            assert!(node.remote.is_none());
            // DTLS from an address no check came from is ignored.
            node.handle_datagram(
                BytesMut::from(&[22u8, 254, 253, 0, 0][..]),
                "127.0.0.1:6666".parse().unwrap(),
                Instant::now(),
            );
            assert!(node.poll_datagram().is_none());
        }
    }
}

//! The node's send-only audio transport (a *recv* transport: the client listens), assembled
//! from the protocol crates under `rtc` 0.21: ICE-lite answering STUN checks, a DTLS-SRTP
//! handshake (`rtc::dtls`) whose exported keys key one SRTP sender ([`SrtpSender`]: AES-GCM
//! sealed with `ring` straight into the worker's send batch), and nothing else.
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
//!
//! The client's path may change under a connected transport: a NAT rebinding gives the same
//! client a new source port, and a browser may move to its ICE/TCP candidate. A valid check
//! from a new path takes the media over when it nominates (USE-CANDIDATE, which browsers put on
//! every check of their selected pair with a lite peer), or, from a client that nominated only
//! once and then sends plain consent checks, when the current path has gone quiet
//! ([`PATH_QUIET`]). No renegotiation is needed: the SRTP keys belong to the transport, not the
//! path. But a connected transport's media moves only to a path that proved it asked for it
//! (as QUIC validates a path, RFC 9000 8.2): a check proves knowledge of the password, which
//! the client has, so a client could send one from a victim's address and turn the node into a
//! reflector of the channel's audio. The node answers the check and sends one binding request
//! of its own to the new path ([`ice::probe`]); media moves when the answer carrying its
//! transaction id comes back from there. Until then an unproven path gets, for each check it
//! sent, the check's answer and one probe: about twice its bytes, never media.
//!
//! An ICE restart gives the transport fresh credentials and a fresh offer while DTLS and SRTP
//! carry on: checks signed with the old credentials keep the current path alive until the
//! client nominates a path with the new ones, and the restart's answer must name the same
//! certificate fingerprint and DTLS role as the first.

mod description;
mod ice;
mod identity;
mod srtp;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rtc::dtls::config::HandshakeConfig;
use rtc::dtls::endpoint::{Endpoint, EndpointEvent};
use rtc::shared::TransportProtocol;

use super::{
    Addresses, Candidate, EngineError, ListenerTransport, OPUS_PAYLOAD_TYPE, Path, PeerState,
    Rewritten, Transport,
};
use description::{Answer, offer, parse_answer, random_token};
pub use identity::Identity;
use identity::setup;
pub use srtp::SrtpSender;

/// A client that stops its ICE consent checks (RFC 7675: every ~5 s) is gone after this.
const CONSENT_TIMEOUT: Duration = Duration::from_secs(30);
/// A transport must finish ICE and DTLS this long after the client's answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// DTLS datagrams kept from before the answer (the client's first flight).
const MAX_EARLY_DTLS: usize = 8;
/// A connected client's checks come every 2 to 5 s (RFC 7675 consent); a non-nominating check
/// from a new path takes over once the current path has been without a check this long.
const PATH_QUIET: Duration = Duration::from_millis(1500);

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
    local: Addresses,
    offer: String,
    ssrc: u32,
    ufrag: String,
    pwd: String,
    answer: Option<Answer>,
    /// During and after an ICE restart, until the client nominates with the new credentials:
    /// the old local fragment and password, and the client's old fragment.
    previous: Option<(String, String, String)>,
    /// An ICE restart's offer is out and its answer not yet applied.
    restarting: bool,
    phase: Phase,
    /// Where media goes: the path the client nominated in a valid check.
    remote: Option<Path>,
    /// The client's username fragment in the checks from `remote`.
    remote_ufrag: Option<String>,
    /// The client nominated `remote` (USE-CANDIDATE).
    nominated: bool,
    /// A new path a valid check asked media to move to, not yet proven (see the module
    /// docs): media stays on `remote` until the probe sent there is answered from there.
    probe: Option<PathProbe>,
    /// Nominating checks seen on `remote`. A client that nominates more than once (browsers
    /// put USE-CANDIDATE on every check of their selected pair with a lite peer) moves the
    /// media only by nominating; one that nominated once (then sends plain consent checks)
    /// moves it by checking from a new path once the current one is quiet.
    nominations: u32,
    /// DTLS datagrams from `remote` that came before the answer.
    early_dtls: Vec<BytesMut>,
    last_consent: Option<Instant>,
    connect_deadline: Option<Instant>,
    dtls: Option<Endpoint>,
    /// The node's DTLS client configuration, when the client answered `passive`.
    dtls_client: Option<Arc<HandshakeConfig>>,
    srtp: Option<SrtpSender>,
    out: VecDeque<(BytesMut, Path)>,
    states: VecDeque<PeerState>,
}

/// A probe out to a path that asked for the media.
#[derive(Debug)]
struct PathProbe {
    path: Path,
    id: rtc::stun::message::TransactionId,
    their_ufrag: String,
    nominating: bool,
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
    pub fn new(identity: Arc<Identity>, ssrc: u32, local: &Addresses) -> Self {
        let ufrag = random_token(16);
        let pwd = random_token(32);
        let announce = |addr: SocketAddr| -> SocketAddr {
            SocketAddr::new(local.announced.unwrap_or(addr.ip()), addr.port())
        };
        let offer = offer(
            &identity,
            &ufrag,
            &pwd,
            ssrc,
            announce(local.udp),
            local.tcp.map(announce),
        );
        Self {
            identity,
            local: *local,
            offer,
            ssrc,
            ufrag,
            pwd,
            answer: None,
            previous: None,
            restarting: false,
            phase: Phase::Offered,
            remote: None,
            remote_ufrag: None,
            nominated: false,
            probe: None,
            nominations: 0,
            early_dtls: Vec::new(),
            last_consent: None,
            connect_deadline: None,
            dtls: None,
            dtls_client: None,
            srtp: None,
            out: VecDeque::new(),
            states: VecDeque::new(),
        }
    }

    fn end(&mut self, state: PeerState) {
        if self.phase != Phase::Ended {
            self.phase = Phase::Ended;
            self.srtp = None;
            self.states.push_back(state);
        }
    }

    /// Answers a valid binding request. A check can arrive before the client's answer reaches
    /// the node (the client starts ICE as soon as it has the offer): it is answered all the
    /// same, since its integrity is proven with the node's own password, and the client's
    /// username fragment in it is held against the answer when that comes (RFC 8445 7.3).
    fn on_stun(&mut self, data: &[u8], from: Path, now: Instant) {
        if let Some(id) = ice::success_id(data) {
            self.on_probe_answer(id, from, now);
            return;
        }
        let current = ice::Credentials {
            ufrag: &self.ufrag,
            pwd: &self.pwd,
            // The restart's answer may come after the client's first new checks.
            remote_ufrag: match self.restarting {
                true => None,
                false => self.answer.as_ref().map(|a| a.ufrag.as_str()),
            },
        };
        let (check, pwd, renewed) = match ice::verify(data, from.remote, &current, &self.identity) {
            Some(check) => (check, self.pwd.clone(), true),
            None => {
                let Some((ufrag, pwd, remote)) = &self.previous else {
                    return;
                };
                let old = ice::Credentials {
                    ufrag,
                    pwd,
                    remote_ufrag: Some(remote),
                };
                let Some(check) = ice::verify(data, from.remote, &old, &self.identity) else {
                    return;
                };
                (check, pwd.clone(), false)
            }
        };
        let Some(reply) = ice::success(&check, from.remote, &pwd, &self.identity) else {
            return;
        };
        if renewed && self.previous.is_some() && !self.restarting {
            // The client checks with the new credentials, answered: the restart is done.
            tracing::debug!(ufrag = %self.ufrag, "listener ICE restart completed");
            self.previous = None;
        }
        self.out.push_back((reply, from));
        let nominating = check.nominating;
        let moved = self.remote.is_some_and(|r| r != from);
        // A connected client's path changed (NAT rebinding, or a move to ICE/TCP).
        let takes_over = moved
            && self.phase == Phase::Connected
            && self.nominations < 2
            && self.last_consent.is_none_or(|at| now >= at + PATH_QUIET);
        if nominating || self.remote.is_none() || takes_over {
            if moved && self.phase == Phase::Connected {
                let ours = match renewed {
                    true => self.ufrag.clone(),
                    false => self
                        .previous
                        .as_ref()
                        .map_or_else(String::new, |p| p.0.clone()),
                };
                self.send_probe(from, &ours, check.their_ufrag, nominating);
            } else {
                self.select(from, check.their_ufrag, nominating, now);
            }
        }
        if self.remote == Some(from) {
            self.last_consent = Some(now);
            self.nominations += u32::from(nominating);
        }
        self.drain_dtls();
    }

    /// Makes `path` the one media goes to.
    fn select(&mut self, path: Path, their_ufrag: String, nominating: bool, now: Instant) {
        if self.remote != Some(path) {
            tracing::debug!(remote = %path.remote, proto = ?path.proto, nominating,
                "listener path selected");
            self.nominations = 0;
        }
        self.remote = Some(path);
        self.remote_ufrag = Some(their_ufrag);
        self.nominated |= nominating;
        self.connect_if_client(now);
    }

    /// Sends one probe to `path`, which a valid check asked media to move to; a later probe
    /// replaces it. One probe per check: the path is sent about twice what it sent.
    fn send_probe(&mut self, path: Path, ours: &str, their_ufrag: String, nominating: bool) {
        let Some(their_pwd) = self.answer.as_ref().map(|a| a.pwd.as_str()) else {
            return;
        };
        let Some((request, id)) = ice::probe(&their_ufrag, ours, their_pwd, &self.identity) else {
            return;
        };
        self.out.push_back((request, path));
        self.probe = Some(PathProbe {
            path,
            id,
            their_ufrag,
            nominating,
        });
    }

    /// A binding success response: if it answers the probe, from the path probed, that path
    /// asked for the media and takes it.
    fn on_probe_answer(&mut self, id: rtc::stun::message::TransactionId, from: Path, now: Instant) {
        let Some(probe) = self.probe.take_if(|p| p.id == id && p.path == from) else {
            return;
        };
        tracing::debug!(remote = %from.remote, proto = ?from.proto, "listener path validated");
        self.select(from, probe.their_ufrag, probe.nominating, now);
        self.last_consent = Some(now);
        self.nominations += u32::from(probe.nominating);
        self.drain_dtls();
    }

    /// Starts the handshake when the client answered `passive` and nominated an address. Not
    /// before the nomination: until the client has this check's response its DTLS transport is
    /// not listening, so a ClientHello sent any earlier is lost and costs a 1 s retransmission.
    fn connect_if_client(&mut self, now: Instant) {
        if let Some(remote) = self.remote.filter(|_| self.nominated)
            && let Some(dtls) = self.dtls.as_mut()
            && let Some(config) = self.dtls_client.take()
            && dtls.connect(now, remote.remote, config, None).is_err()
        {
            self.end(PeerState::Failed);
        }
    }

    fn on_dtls(&mut self, data: BytesMut, from: Path, now: Instant) {
        let Some(dtls) = self.dtls.as_mut() else {
            return;
        };
        let events = dtls.read(now, from.remote, None, data);
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
                EndpointEvent::HandshakeComplete => match self
                    .dtls
                    .as_ref()
                    .ok_or_else(|| setup("no DTLS endpoint"))
                    .and_then(|dtls| srtp::outbound(dtls, from.remote, &self.identity))
                {
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

    /// Queues what the DTLS endpoint wants sent, on the client's selected path.
    fn drain_dtls(&mut self) {
        if let Some(dtls) = self.dtls.as_mut() {
            while let Some(t) = dtls.poll_transmit() {
                let to = match self.remote {
                    Some(remote) if remote.remote == t.transport.peer_addr => remote,
                    _ => Path::udp(t.transport.peer_addr),
                };
                self.out.push_back((t.message, to));
            }
        }
    }

    pub fn ssrc(&self) -> u32 {
        self.ssrc
    }

    /// Seals one RTP packet and queues it with the control datagrams, as the tests' client
    /// reads them; false if it could not be sealed.
    #[cfg(test)]
    fn write_rtp(&mut self, header: &Rewritten, payload: &[u8]) -> bool {
        let mut out = [0u8; 1500];
        match self.seal_rtp(header, payload, &mut out) {
            Some((len, to)) => {
                self.out.push_back((BytesMut::from(&out[..len]), to));
                true
            }
            None => false,
        }
    }

    /// The answer to an ICE restart's offer: new ICE credentials, the same DTLS peer (its
    /// certificate fingerprint and role), whose session goes on.
    fn apply_restart_answer(&mut self, sdp: &str) -> Result<(), EngineError> {
        let answer = parse_answer(sdp)?;
        let same_peer = self.answer.as_ref().is_some_and(|first| {
            first.fingerprint == answer.fingerprint && first.client_passive == answer.client_passive
        });
        if !same_peer {
            return Err(EngineError::BadDescription);
        }
        self.answer = Some(answer);
        self.restarting = false;
        Ok(())
    }
}

impl Transport for ListenerPeer {
    fn offer(&self) -> &str {
        &self.offer
    }

    fn ice_credentials(&self) -> (&str, &str) {
        (&self.ufrag, &self.pwd)
    }

    fn restart_ice(&mut self, _now: Instant) -> Result<(), EngineError> {
        let Some(answer) = &self.answer else {
            // Nothing to restart before the first answer.
            return Err(EngineError::BadDescription);
        };
        if self.phase == Phase::Ended {
            return Err(EngineError::BadDescription);
        }
        let old_remote = answer.ufrag.clone();
        let ufrag = random_token(16);
        let pwd = random_token(32);
        let announce = |addr: SocketAddr| -> SocketAddr {
            SocketAddr::new(self.local.announced.unwrap_or(addr.ip()), addr.port())
        };
        self.offer = offer(
            &self.identity,
            &ufrag,
            &pwd,
            self.ssrc,
            announce(self.local.udp),
            self.local.tcp.map(announce),
        );
        let old_ufrag = std::mem::replace(&mut self.ufrag, ufrag);
        let old_pwd = std::mem::replace(&mut self.pwd, pwd);
        // A second restart before the first completed keeps the credentials still in use.
        if self.previous.is_none() {
            self.previous = Some((old_ufrag, old_pwd, old_remote));
        }
        self.restarting = true;
        self.nominations = 0;
        Ok(())
    }

    fn apply_answer(&mut self, sdp: &str, now: Instant) -> Result<(), EngineError> {
        if self.restarting {
            return self.apply_restart_answer(sdp);
        }
        if self.phase != Phase::Offered {
            return Err(EngineError::BadDescription);
        }
        let answer = parse_answer(sdp)?;
        let config = self
            .identity
            .handshake_config(answer.client_passive, answer.fingerprint.clone())?;
        if answer.client_passive {
            self.dtls = Some(Endpoint::new(self.local.udp, TransportProtocol::UDP, None));
            self.dtls_client = Some(config);
        } else {
            self.dtls = Some(Endpoint::new(
                self.local.udp,
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
    fn add_candidate(&mut self, candidate: &Candidate) -> Result<(), EngineError> {
        let c = candidate.candidate.trim();
        if c.is_empty() || c.len() > 512 {
            return Err(EngineError::BadCandidate);
        }
        Ok(())
    }

    fn handle_datagram(&mut self, data: BytesMut, from: Path, now: Instant) {
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

    fn handle_timeout(&mut self, now: Instant) {
        if self.phase == Phase::Ended {
            return;
        }
        if self.connect_deadline.is_some_and(|at| now >= at) {
            tracing::info!(ufrag = %self.ufrag, "listener transport did not connect in time");
            self.end(PeerState::Failed);
            return;
        }
        if self.phase == Phase::Connected
            && self
                .last_consent
                .is_some_and(|at| now >= at + CONSENT_TIMEOUT)
        {
            tracing::info!(ufrag = %self.ufrag, "listener stopped its consent checks");
            self.end(PeerState::Failed);
            return;
        }
        if let (Some(dtls), Some(remote)) = (self.dtls.as_mut(), self.remote)
            && dtls
                .poll_timeout(&remote.remote)
                .is_some_and(|at| now >= at)
            && dtls.handle_timeout(remote.remote, now).is_err()
        {
            tracing::debug!("listener DTLS handshake timed out");
            self.end(PeerState::Failed);
        }
        self.drain_dtls();
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        if self.phase == Phase::Ended {
            return None;
        }
        let dtls = self
            .dtls
            .as_ref()
            .zip(self.remote)
            .and_then(|(d, r)| d.poll_timeout(&r.remote));
        let consent = match self.phase {
            Phase::Connected => self.last_consent.map(|at| at + CONSENT_TIMEOUT),
            _ => self.connect_deadline,
        };
        [dtls, consent].into_iter().flatten().min()
    }

    fn poll_datagram(&mut self) -> Option<(BytesMut, Path)> {
        self.out.pop_front()
    }

    fn poll_state(&mut self) -> Option<PeerState> {
        self.states.pop_front()
    }

    fn close(&mut self) {
        if let (Some(dtls), Some(remote)) = (self.dtls.as_mut(), self.remote)
            && self.phase == Phase::Connected
        {
            dtls.stop(Instant::now(), remote.remote);
        }
        self.drain_dtls();
        self.end(PeerState::Closed);
    }
}

impl ListenerTransport for ListenerPeer {
    fn seal_rtp(
        &mut self,
        header: &Rewritten,
        payload: &[u8],
        out: &mut [u8],
    ) -> Option<(usize, Path)> {
        let (Some(srtp), Some(remote)) = (self.srtp.as_mut(), self.remote) else {
            return None;
        };
        Some((srtp.seal(header, payload, out)?, remote))
    }

    fn ready(&self) -> bool {
        self.remote.is_some() && self.srtp.as_ref().is_some_and(SrtpSender::ready)
    }

    fn payload_type(&self) -> u8 {
        self.answer
            .as_ref()
            .map_or(OPUS_PAYLOAD_TYPE, |a| a.payload_type)
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
    fn the_offer_is_ice_lite_send_only_opus_with_udp_then_tcp_candidates() {
        let identity = Arc::new(Identity::generate().unwrap());
        let local = Addresses {
            udp: "127.0.0.1:40000".parse().unwrap(),
            tcp: Some("127.0.0.1:40001".parse().unwrap()),
            announced: Some("203.0.113.9".parse().unwrap()),
        };
        let peer = ListenerPeer::new(identity, 1234, &local);
        let sdp = peer.offer();
        for line in [
            "a=ice-lite",
            "a=sendonly",
            "a=setup:actpass",
            "a=rtpmap:111 opus/48000/2",
            "a=ssrc:1234 cname:talkgroup",
            "a=candidate:1 1 udp 2130706431 203.0.113.9 40000 typ host",
            "a=candidate:2 1 tcp 1518280447 203.0.113.9 40001 typ host tcptype passive",
        ] {
            assert!(sdp.lines().any(|l| l == line), "{line} missing in {sdp}");
        }
        assert_eq!(sdp.lines().filter(|l| l.starts_with("m=")).count(), 1);
    }

    #[test]
    fn nothing_is_sent_before_the_handshake() {
        let identity = Arc::new(Identity::generate().unwrap());
        let local = Addresses {
            udp: "127.0.0.1:40000".parse().unwrap(),
            tcp: None,
            announced: None,
        };
        let mut peer = ListenerPeer::new(identity, 1, &local);
        let header = Rewritten {
            marker: false,
            payload_type: 111,
            sequence_number: 1,
            timestamp: 0,
            ssrc: 1,
        };
        assert!(!peer.write_rtp(&header, &[0; 40]));
        // A malformed STUN message, and DTLS from an address no check validated, are ignored.
        peer.handle_datagram(
            BytesMut::from(&[0u8, 1, 0, 0][..]),
            Path::udp("127.0.0.1:5000".parse().unwrap()),
            Instant::now(),
        );
        peer.handle_datagram(
            BytesMut::from(&[22u8, 254, 253][..]),
            Path::udp("127.0.0.1:5000".parse().unwrap()),
            Instant::now(),
        );
        assert!(peer.poll_datagram().is_none());
    }

    /// A real client: an `rtc` peer connection answering the node's offer, joined to the
    /// listener transport by an in-memory "network" between two fixed addresses.
    mod handshake {
        use super::*;
        use crate::engine::Proto;
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
            let mut sources = vec![client_addr];
            for _ in 0..steps {
                *now += Duration::from_millis(10);
                let now = *now;
                let _ = pc.handle_timeout(now);
                node.handle_timeout(now);
                while let Some(out) = pc.poll_write() {
                    if let Some((data, from)) = tamper(out.message) {
                        sources.push(from);
                        node.handle_datagram(data, Path::udp(from), now);
                    }
                }
                while let Some((data, to)) = node.poll_datagram() {
                    assert!(
                        to.proto == Proto::Udp && sources.contains(&to.remote),
                        "the node sends only to an address the client's datagrams came from"
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
                    let header = Rewritten {
                        marker: false,
                        payload_type: node.payload_type(),
                        sequence_number: 100 + sent as u16,
                        timestamp: 960 * sent as u32,
                        ssrc: node.ssrc(),
                    };
                    assert!(node.write_rtp(&header, &[sent as u8; 40]));
                    sent += 1;
                }
            }
            (heard, states)
        }

        fn pair() -> (ListenerPeer, RTCPeerConnection, String) {
            let identity = Arc::new(Identity::generate().unwrap());
            let local = Addresses {
                udp: NODE.parse().unwrap(),
                tcp: None,
                announced: None,
            };
            let node = ListenerPeer::new(identity, 4242, &local);
            let (pc, answer) = client(node.offer());
            (node, pc, answer)
        }

        /// `answer` naming a certificate the client does not have.
        fn another_certificate(answer: &str) -> String {
            answer
                .lines()
                .map(|l| {
                    if l.starts_with("a=fingerprint:sha-256 ") {
                        format!("a=fingerprint:sha-256 {FP}")
                    } else {
                        l.to_owned()
                    }
                })
                .collect::<Vec<_>>()
                .join("\r\n")
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
        fn a_client_whose_source_port_changes_is_followed_after_its_next_check() {
            let (mut node, mut pc, answer) = pair();
            let mut now = Instant::now();
            node.apply_answer(&answer, now).unwrap();
            let (heard, states) = run(&mut node, &mut pc, &mut now, 400, 3, from_client);
            assert_eq!(states, vec![PeerState::Connected]);
            assert_eq!(heard.len(), 3);
            // The client's NAT rebinds: the same client, a new source port. Its next consent
            // check (every 2 s) moves the media; no renegotiation.
            let rebound: SocketAddr = "127.0.0.1:50001".parse().unwrap();
            let (_, states) = run(&mut node, &mut pc, &mut now, 300, 0, |data| {
                Some((data, rebound))
            });
            assert!(states.is_empty(), "still connected: {states:?}");
            assert_eq!(node.remote, Some(Path::udp(rebound)));
            let header = Rewritten {
                marker: false,
                payload_type: node.payload_type(),
                sequence_number: 200,
                timestamp: 0,
                ssrc: node.ssrc(),
            };
            assert!(node.write_rtp(&header, &[9; 40]));
            let (_, to) = node.poll_datagram().unwrap();
            assert_eq!(to, Path::udp(rebound));
        }

        #[test]
        fn a_check_from_another_path_does_not_take_over_a_live_one() {
            let (mut node, mut pc, answer) = pair();
            let mut now = Instant::now();
            // One of the client's checks also arrives from a second address (a backup
            // candidate pair) while the first path keeps checking: media stays put.
            let stun = connected_then_a_check(&mut node, &mut pc, &answer, &mut now);
            let client: SocketAddr = CLIENT.parse().unwrap();
            let other: SocketAddr = "127.0.0.1:50002".parse().unwrap();
            // 100 ms after the first path's last check.
            let soon = node.last_consent.unwrap() + Duration::from_millis(100);
            node.handle_datagram(stun.clone(), Path::udp(other), soon);
            assert_eq!(
                node.remote,
                Some(Path::udp(client)),
                "a live path keeps the media"
            );
            // Once the first path has been quiet a while, the other takes over, once it has
            // answered the node's probe.
            let later = node.last_consent.unwrap() + PATH_QUIET;
            node.handle_datagram(stun, Path::udp(other), later);
            assert_eq!(
                node.remote,
                Some(Path::udp(client)),
                "not before the probe's answer"
            );
            for answer in to_client(&mut node, &mut pc, later) {
                node.handle_datagram(answer, Path::udp(other), later);
            }
            assert_eq!(node.remote, Some(Path::udp(other)));
        }

        /// Connects the pair, then lets 2.5 s of consent checks pass; the client's last check.
        fn connected_then_a_check(
            node: &mut ListenerPeer,
            pc: &mut RTCPeerConnection,
            answer: &str,
            now: &mut Instant,
        ) -> BytesMut {
            node.apply_answer(answer, *now).unwrap();
            let (_, states) = run(node, pc, now, 400, 0, from_client);
            assert_eq!(states, vec![PeerState::Connected]);
            let mut last = None;
            let _ = run(node, pc, now, 250, 0, |data| {
                if data[0] < 4 {
                    last = Some(data.clone());
                }
                from_client(data)
            });
            last.expect("a consent check")
        }

        /// Hands what the node sends to the client (wherever it was addressed) and returns
        /// what the client sends back.
        fn to_client(
            node: &mut ListenerPeer,
            pc: &mut RTCPeerConnection,
            now: Instant,
        ) -> Vec<BytesMut> {
            while let Some((data, _)) = node.poll_datagram() {
                let _ = pc.handle_read(TaggedBytesMut {
                    now,
                    transport: TransportContext {
                        local_addr: CLIENT.parse().unwrap(),
                        peer_addr: NODE.parse().unwrap(),
                        ecn: None,
                        transport_protocol: TransportProtocol::UDP,
                    },
                    message: data,
                });
            }
            std::iter::from_fn(|| pc.poll_write().map(|out| out.message)).collect()
        }

        /// The client (who knows the transport's password) replays its own nominating check
        /// from a victim's address, again and again: the victim gets each check's answer and
        /// one probe, never media (at most three times the bytes "it" sent), and the client
        /// keeps hearing.
        #[test]
        fn a_check_from_a_spoofed_address_gets_no_media_there() {
            let (mut node, mut pc, answer) = pair();
            let mut now = Instant::now();
            let check = connected_then_a_check(&mut node, &mut pc, &answer, &mut now);
            let client: SocketAddr = CLIENT.parse().unwrap();
            let victim: SocketAddr = "192.0.2.7:9".parse().unwrap();
            let (mut spoofed, mut reflected, mut heard) = (0, 0, 0);
            for i in 0..50u16 {
                now += Duration::from_millis(500);
                node.handle_datagram(check.clone(), Path::udp(victim), now);
                spoofed += check.len();
                let header = Rewritten {
                    marker: false,
                    payload_type: node.payload_type(),
                    sequence_number: 400 + i,
                    timestamp: 0,
                    ssrc: node.ssrc(),
                };
                assert!(node.write_rtp(&header, &[1; 100]));
                while let Some((data, to)) = node.poll_datagram() {
                    if to.remote == victim {
                        reflected += data.len();
                    } else if data[0] >= 128 {
                        assert_eq!(to.remote, client);
                        heard += 1;
                    }
                }
            }
            assert_eq!(node.remote, Some(Path::udp(client)), "the media stays");
            assert_eq!(heard, 50, "the client hears every packet");
            assert!(
                reflected <= 3 * spoofed,
                "{reflected} bytes to the victim for {spoofed} spoofed"
            );
        }

        #[test]
        fn an_ice_restart_renews_credentials_and_keeps_the_dtls_session() {
            let (mut node, mut pc, answer) = pair();
            let mut now = Instant::now();
            node.apply_answer(&answer, now).unwrap();
            let (heard, states) = run(&mut node, &mut pc, &mut now, 400, 3, from_client);
            assert_eq!(states, vec![PeerState::Connected]);
            assert_eq!(heard.len(), 3);
            let (old_ufrag, _) = node.ice_credentials();
            let old_ufrag = old_ufrag.to_owned();
            node.restart_ice(now).unwrap();
            assert_ne!(node.ice_credentials().0, old_ufrag, "new credentials");
            // The client takes the new offer (its own ICE restarts) and answers it.
            pc.set_remote_description(
                now,
                RTCSessionDescription::offer(node.offer().into()).unwrap(),
            )
            .unwrap();
            let reanswer = pc.create_answer(None).unwrap();
            pc.set_local_description(now, reanswer).unwrap();
            let sdp = pc.local_description().unwrap().sdp;
            node.apply_answer(&sdp, now).unwrap();
            let (_, states) = run(&mut node, &mut pc, &mut now, 300, 0, from_client);
            assert!(states.is_empty(), "the session went on: {states:?}");
            assert!(
                node.previous.is_none(),
                "the client moved to the new credentials"
            );
            let header = Rewritten {
                marker: false,
                payload_type: node.payload_type(),
                sequence_number: 300,
                timestamp: 0,
                ssrc: node.ssrc(),
            };
            assert!(node.write_rtp(&header, &[7; 40]));
        }

        #[test]
        fn a_restart_answer_from_another_certificate_is_refused() {
            let (mut node, mut pc, answer) = pair();
            let mut now = Instant::now();
            node.apply_answer(&answer, now).unwrap();
            let _ = run(&mut node, &mut pc, &mut now, 400, 0, from_client);
            node.restart_ice(now).unwrap();
            let forged = another_certificate(&answer);
            assert!(node.apply_answer(&forged, now).is_err());
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
            let forged = another_certificate(&answer);
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
                Path::udp("127.0.0.1:6666".parse().unwrap()),
                Instant::now(),
            );
            assert!(node.poll_datagram().is_none());
        }
    }
}

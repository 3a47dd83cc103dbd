//! The session descriptions of a listener transport: the node's offer (one send-only Opus
//! section, ICE-lite, one host candidate) and what the client's answer must say.

use std::net::SocketAddr;

use super::identity::Identity;
use crate::engine::{EngineError, OPUS_FMTP, OPUS_PAYLOAD_TYPE};

/// Largest answer the node parses.
const MAX_ANSWER: usize = 64 * 1024;

/// An ICE username fragment or password: RFC 8839 `ice-char`s, at least `min` of them.
pub(super) fn valid_ice(value: &str, min: usize) -> bool {
    (min..=256).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

/// What the client's answer says that the transport needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Answer {
    pub(super) ufrag: String,
    pub(super) pwd: String,
    /// `sha-256` fingerprint, lower case.
    pub(super) fingerprint: String,
    /// The client takes the DTLS server role (`a=setup:passive`); the node then connects.
    pub(super) client_passive: bool,
    pub(super) payload_type: u8,
}

/// Reads the parts of the client's answer the transport uses; anything missing or malformed
/// refuses the answer.
pub(super) fn parse_answer(sdp: &str) -> Result<Answer, EngineError> {
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

pub(super) fn random_token(len: usize) -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(CHARS[rng.random_range(0..CHARS.len())]))
        .collect()
}

/// The node's offer: one send-only Opus section, ICE-lite, the UDP host candidate and, when
/// ICE/TCP is on, a passive TCP host candidate at a lower priority (RFC 6544: a host TCP
/// candidate's type preference is the same, its local preference lower, so a client that can
/// reach the UDP port prefers it).
pub(super) fn offer(
    identity: &Identity,
    ufrag: &str,
    pwd: &str,
    ssrc: u32,
    candidate: SocketAddr,
    tcp: Option<SocketAddr>,
) -> String {
    let family = if candidate.is_ipv4() { "IP4" } else { "IP6" };
    let ip = candidate.ip();
    let port = candidate.port();
    let tcp_candidate = tcp.map_or(String::new(), |t| {
        format!(
            "a=candidate:2 1 tcp 1518280447 {} {} typ host tcptype passive\r\n",
            t.ip(),
            t.port()
        )
    });
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
         {tcp_candidate}\
         a=end-of-candidates\r\n",
        fingerprint = identity.fingerprint.to_ascii_uppercase(),
    )
}

//! A TURN client that asks a relay for what an attacker would (RFC 5766, RFC 6062): a UDP
//! allocation and permissions towards chosen peers, and a TCP allocation. It reports what the
//! relay answered, so a test can check the relay's policy: which peers a credential can reach
//! through it. Messages are built and read with the `rtc` stack's STUN and TURN types.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rtc::stun::attributes::{ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
use rtc::stun::error_code::ErrorCodeAttribute;
use rtc::stun::fingerprint::FINGERPRINT;
use rtc::stun::integrity::MessageIntegrity;
use rtc::stun::message::{
    CLASS_ERROR_RESPONSE, CLASS_REQUEST, CLASS_SUCCESS_RESPONSE, Getter, METHOD_ALLOCATE,
    METHOD_CREATE_PERMISSION, Message, MessageType, Method, Setter, TransactionId,
};
use rtc::stun::textattrs::TextAttribute;
use rtc::turn::proto::peeraddr::PeerAddress;
use rtc::turn::proto::reqtrans::RequestedTransport;
use rtc::turn::proto::{PROTO_TCP, PROTO_UDP, Protocol};

const TIMEOUT: Duration = Duration::from_secs(3);

/// What the relay answered one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Granted,
    /// A STUN error response with this code (403 Forbidden for a denied peer, 442 for an
    /// unsupported transport).
    Refused(u16),
}

/// A long-term credential and where the relay is.
#[derive(Debug, Clone)]
pub struct Credential {
    pub username: String,
    pub password: String,
}

/// One way to the relay: a UDP socket, or a TCP stream (STUN over TCP is self-framing: the
/// header gives the length).
#[derive(Debug)]
enum Link {
    Udp(UdpSocket, SocketAddr),
    Tcp(TcpStream),
}

impl Link {
    fn exchange(&mut self, request: &Message) -> Result<Message> {
        let mut buf = vec![0u8; 2048];
        let raw = match self {
            Self::Udp(socket, relay) => {
                socket.send_to(&request.raw, *relay)?;
                loop {
                    let (n, from) = socket
                        .recv_from(&mut buf)
                        .context("no answer from the relay")?;
                    if from == *relay {
                        break buf[..n].to_vec();
                    }
                }
            }
            Self::Tcp(stream) => {
                stream.write_all(&request.raw)?;
                let mut header = [0u8; 20];
                stream
                    .read_exact(&mut header)
                    .context("no answer from the relay")?;
                let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
                let mut body = vec![0u8; len];
                stream.read_exact(&mut body)?;
                [header.as_slice(), &body].concat()
            }
        };
        let mut answer = Message::new();
        answer.unmarshal_binary(&raw)?;
        if answer.transaction_id != request.transaction_id {
            bail!("the relay answered another transaction");
        }
        Ok(answer)
    }
}

/// An allocation on a relay, or the attempt at one.
#[derive(Debug)]
pub struct Probe {
    link: Link,
    credential: Credential,
    realm: String,
    nonce: String,
}

impl Probe {
    /// Allocates a UDP relay address over UDP. `Err` when the relay refused it.
    pub fn allocate_udp(relay: SocketAddr, credential: Credential) -> Result<Self> {
        let socket = UdpSocket::bind(SocketAddr::new(relay.ip(), 0))?;
        socket.set_read_timeout(Some(TIMEOUT))?;
        let (probe, answer) = Self::allocate(Link::Udp(socket, relay), credential, PROTO_UDP)?;
        match answer {
            Answer::Granted => Ok(probe),
            Answer::Refused(code) => bail!("the relay refused a UDP allocation: {code}"),
        }
    }

    /// Asks, over TCP, for an allocation whose relayed transport is TCP (RFC 6062: the relay
    /// would open TCP connections to peers).
    pub fn allocate_tcp(relay: SocketAddr, credential: Credential) -> Result<Answer> {
        let stream = TcpStream::connect_timeout(&relay, TIMEOUT)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        Ok(Self::allocate(Link::Tcp(stream), credential, PROTO_TCP)?.1)
    }

    fn allocate(link: Link, credential: Credential, transport: Protocol) -> Result<(Self, Answer)> {
        let mut probe = Self {
            link,
            credential,
            realm: String::new(),
            nonce: String::new(),
        };
        // The first request carries no credential: the relay answers 401 with its realm and a
        // nonce, which the authenticated request repeats.
        let mut first = Message::new();
        first.build(&[
            Box::new(TransactionId::new()),
            Box::new(MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST)),
            Box::new(RequestedTransport {
                protocol: transport,
            }),
            Box::new(FINGERPRINT),
        ])?;
        let challenge = probe.link.exchange(&first)?;
        if error_code(&challenge) != Some(401) {
            bail!("expected a 401 challenge, got {:?}", challenge.typ);
        }
        probe.realm = TextAttribute::get_from_as(&challenge, ATTR_REALM)?.text;
        probe.nonce = TextAttribute::get_from_as(&challenge, ATTR_NONCE)?.text;
        let answer = probe.request(
            METHOD_ALLOCATE,
            Box::new(RequestedTransport {
                protocol: transport,
            }),
        )?;
        Ok((probe, answer))
    }

    /// Asks for a permission towards `peer` (the relay checks its peer policy here).
    pub fn permit(&mut self, peer: SocketAddr) -> Result<Answer> {
        self.request(
            METHOD_CREATE_PERMISSION,
            Box::new(PeerAddress {
                ip: peer.ip(),
                port: peer.port(),
            }),
        )
    }

    fn request(&mut self, method: Method, attribute: Box<dyn Setter>) -> Result<Answer> {
        let provider = rtc::crypto::default_provider()?;
        let integrity = MessageIntegrity::new_long_term_integrity_with_provider(
            self.credential.username.clone(),
            self.realm.clone(),
            self.credential.password.clone(),
            provider.crypto(),
        )?;
        let mut request = Message::new();
        request.build(&[
            Box::new(TransactionId::new()),
            Box::new(MessageType::new(method, CLASS_REQUEST)),
            attribute,
            Box::new(TextAttribute::new(
                ATTR_USERNAME,
                self.credential.username.clone(),
            )),
            Box::new(TextAttribute::new(ATTR_REALM, self.realm.clone())),
            Box::new(TextAttribute::new(ATTR_NONCE, self.nonce.clone())),
            Box::new(integrity),
            Box::new(FINGERPRINT),
        ])?;
        let answer = self.link.exchange(&request)?;
        match (answer.typ.class, error_code(&answer)) {
            (CLASS_SUCCESS_RESPONSE, _) => Ok(Answer::Granted),
            (CLASS_ERROR_RESPONSE, Some(code)) => Ok(Answer::Refused(code)),
            _ => bail!(
                "an answer that is neither success nor error: {:?}",
                answer.typ
            ),
        }
    }
}

fn error_code(m: &Message) -> Option<u16> {
    if m.typ.class != CLASS_ERROR_RESPONSE {
        return None;
    }
    let mut code = ErrorCodeAttribute::default();
    code.get_from(m).ok()?;
    Some(code.code.0)
}

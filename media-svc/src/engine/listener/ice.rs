//! ICE-lite: the checks a listener transport answers. A lite agent answers binding requests
//! that prove they know the transport's password, and learns the client's address from them.
//! It sends one kind of request of its own: a path probe ([`probe`]), before media moves to a
//! new address, to learn that the address asked for it (a check proves only that its sender
//! knows the password, and the client itself knows it: it could send one from a victim's
//! address).

use std::net::SocketAddr;

use bytes::BytesMut;
use rtc::ice::attributes::control::AttrControlled;
use rtc::ice::attributes::priority::PriorityAttr;
use rtc::stun::attributes::ATTR_USERNAME;
use rtc::stun::attributes::{ATTR_ICE_CONTROLLED, ATTR_USE_CANDIDATE};
use rtc::stun::fingerprint::FINGERPRINT;
use rtc::stun::integrity::MessageIntegrity;
use rtc::stun::message::{
    BINDING_REQUEST, BINDING_SUCCESS, CLASS_SUCCESS_RESPONSE, METHOD_BINDING, Message, Setter,
    TransactionId,
};
use rtc::stun::textattrs::TextAttribute;
use rtc::stun::xoraddr::XorMappedAddress;

use super::description::valid_ice;
use super::identity::Identity;

/// A binding request that passed every check.
pub(super) struct Check {
    request: Message,
    /// The client's username fragment.
    pub(super) their_ufrag: String,
    /// The client nominates the address it came from (USE-CANDIDATE).
    pub(super) nominating: bool,
}

/// The credentials a check must prove.
pub(super) struct Credentials<'a> {
    /// The transport's own username fragment and password.
    pub(super) ufrag: &'a str,
    pub(super) pwd: &'a str,
    /// The client's username fragment, once its answer gave it.
    pub(super) remote_ufrag: Option<&'a str>,
}

/// Reads a binding request and checks it: `ours:theirs` in USERNAME with the transport's
/// fragment (and the client's, once known), a valid FINGERPRINT and MESSAGE-INTEGRITY signed
/// with the transport's password, and a controlling sender (a lite agent is always
/// controlled). Anything else is `None`.
pub(super) fn verify(
    data: &[u8],
    from: SocketAddr,
    expected: &Credentials<'_>,
    identity: &Identity,
) -> Option<Check> {
    let crate::engine::stun::FirstContact {
        message: mut m,
        local_ufrag,
        remote_ufrag: their_ufrag,
    } = crate::engine::stun::first_contact(data)?;
    if local_ufrag != expected.ufrag || !valid_ice(&their_ufrag, 4) {
        return None;
    }
    if expected.remote_ufrag.is_some_and(|u| u != their_ufrag)
        || FINGERPRINT.check(&m).is_err()
        || MessageIntegrity::check(&mut m, expected.pwd.as_bytes(), identity.crypto.crypto())
            .is_err()
    {
        tracing::trace!(%from, "STUN check refused");
        return None;
    }
    if m.contains(ATTR_ICE_CONTROLLED) {
        return None;
    }
    Some(Check {
        nominating: m.contains(ATTR_USE_CANDIDATE),
        request: m,
        their_ufrag,
    })
}

/// The success response to `check` from `from`, signed with the transport's password.
pub(super) fn success(
    check: &Check,
    from: SocketAddr,
    pwd: &str,
    identity: &Identity,
) -> Option<BytesMut> {
    let mut reply = Message::new();
    reply
        .build(&[
            Box::new(check.request.clone()) as Box<dyn Setter>,
            Box::new(BINDING_SUCCESS),
            Box::new(XorMappedAddress {
                ip: from.ip(),
                port: from.port(),
            }),
            Box::new(MessageIntegrity::new_short_term_integrity_with_provider(
                pwd.to_owned(),
                identity.crypto.crypto(),
            )),
            Box::new(FINGERPRINT),
        ])
        .ok()?;
    Some(BytesMut::from(reply.raw.as_slice()))
}

/// A binding request to the client at a new path, as a full agent's check would be: USERNAME
/// `theirs:ours`, signed with the client's password, from the controlled side. Its random
/// transaction id is the challenge: only an answer from that path can carry it back.
pub(super) fn probe(
    their_ufrag: &str,
    our_ufrag: &str,
    their_pwd: &str,
    identity: &Identity,
) -> Option<(BytesMut, TransactionId)> {
    let id = TransactionId::new();
    let mut request = Message::new();
    request
        .build(&[
            Box::new(BINDING_REQUEST) as Box<dyn Setter>,
            Box::new(id),
            Box::new(TextAttribute::new(
                ATTR_USERNAME,
                format!("{their_ufrag}:{our_ufrag}"),
            )),
            Box::new(AttrControlled(rand::random())),
            // A peer-reflexive candidate's priority (type preference 110), as RFC 8445 5.1.2.
            Box::new(PriorityAttr((110 << 24) | (65_535 << 8) | 255)),
            Box::new(MessageIntegrity::new_short_term_integrity_with_provider(
                their_pwd.to_owned(),
                identity.crypto.crypto(),
            )),
            Box::new(FINGERPRINT),
        ])
        .ok()?;
    Some((BytesMut::from(request.raw.as_slice()), id))
}

/// The transaction id of a binding success response, `None` for anything else.
pub(super) fn success_id(data: &[u8]) -> Option<TransactionId> {
    let mut m = Message::new();
    m.unmarshal_binary(data).ok()?;
    (m.typ.method == METHOD_BINDING && m.typ.class == CLASS_SUCCESS_RESPONSE)
        .then_some(m.transaction_id)
}

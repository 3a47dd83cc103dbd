//! ICE-lite: the checks a listener transport answers. A lite agent never sends checks of its
//! own; it answers binding requests that prove they know the transport's password, and learns
//! the client's address from them.

use std::net::SocketAddr;

use bytes::BytesMut;
use rtc::stun::attributes::{ATTR_ICE_CONTROLLED, ATTR_USE_CANDIDATE};
use rtc::stun::fingerprint::FINGERPRINT;
use rtc::stun::integrity::MessageIntegrity;
use rtc::stun::message::{BINDING_SUCCESS, Message, Setter};
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

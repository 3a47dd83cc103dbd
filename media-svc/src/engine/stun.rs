//! What the node reads of a STUN binding request before trusting it (the worker layer for a
//! first datagram from an unknown address, a listener transport for every check): the
//! transport it names (the local username fragment in USERNAME) and whether it proves the
//! transport's password (MESSAGE-INTEGRITY and FINGERPRINT). Only such a check opens a path to a
//! transport; everything else from an unknown address is dropped before any transport sees it.

use std::sync::Arc;

use rtc::crypto::RTCCryptoProvider;
use rtc::stun::attributes::ATTR_USERNAME;
use rtc::stun::fingerprint::FINGERPRINT;
use rtc::stun::integrity::MessageIntegrity;
use rtc::stun::message::{CLASS_REQUEST, Getter, METHOD_BINDING, Message};
use rtc::stun::textattrs::Username;

use super::EngineError;

/// Largest username fragment the node hands out or looks up.
const MAX_UFRAG: usize = 256;

/// A binding request, its USERNAME read, not yet authenticated.
#[derive(Debug)]
pub struct FirstContact {
    pub message: Message,
    /// The transport's own fragment: the part of USERNAME before the colon.
    pub local_ufrag: String,
    /// The client's fragment: the part after it.
    pub remote_ufrag: String,
}

/// Reads a binding request's USERNAME (`local:remote`); `None` for anything else.
pub fn first_contact(data: &[u8]) -> Option<FirstContact> {
    let mut message = Message::new();
    if message.unmarshal_binary(data).is_err()
        || message.typ.method != METHOD_BINDING
        || message.typ.class != CLASS_REQUEST
    {
        return None;
    }
    let mut username = Username::new(ATTR_USERNAME, String::new());
    username.get_from(&message).ok()?;
    let (local_ufrag, remote_ufrag) = match username.text.split_once(':') {
        Some((ours, theirs))
            if !ours.is_empty() && ours.len() <= MAX_UFRAG && !theirs.is_empty() =>
        {
            (ours.to_owned(), theirs.to_owned())
        }
        _ => return None,
    };
    Some(FirstContact {
        message,
        local_ufrag,
        remote_ufrag,
    })
}

/// Checks STUN integrity for the worker layer, with one crypto provider for the node.
#[derive(Clone)]
pub struct Verifier {
    crypto: Arc<dyn RTCCryptoProvider>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").finish_non_exhaustive()
    }
}

impl Verifier {
    pub fn new() -> Result<Self, EngineError> {
        let crypto =
            rtc::crypto::default_provider().map_err(|e| EngineError::Setup(e.to_string()))?;
        Ok(Self { crypto })
    }

    /// True when the check carries a valid FINGERPRINT and is signed with `pwd`.
    pub fn authentic(&self, contact: &mut FirstContact, pwd: &str) -> bool {
        FINGERPRINT.check(&contact.message).is_ok()
            && MessageIntegrity::check(&mut contact.message, pwd.as_bytes(), self.crypto.crypto())
                .is_ok()
    }
}

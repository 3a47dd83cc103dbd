//! SRTP keying: the one context that encrypts what a listener transport sends, keyed from its
//! DTLS handshake.

use std::net::SocketAddr;

use rtc::dtls::endpoint::Endpoint;
use rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile;
use rtc::srtp::context::Context;
use rtc::srtp::protection_profile::ProtectionProfile;

use super::identity::{Identity, setup};
use crate::engine::EngineError;

/// The SRTP context for what the node sends to `remote`, keyed from its finished handshake
/// (RFC 5764).
pub(super) fn outbound(
    dtls: &Endpoint,
    remote: SocketAddr,
    identity: &Identity,
) -> Result<Context, EngineError> {
    let state = dtls
        .get_connection_state(remote)
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
    Context::new(
        &config.keys.local_master_key,
        &config.keys.local_master_salt,
        profile,
        None,
        None,
        identity.crypto.crypto(),
    )
    .map_err(setup)
}

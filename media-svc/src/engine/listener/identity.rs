//! The node's DTLS identity: one certificate for every listener transport (as browsers and
//! mediasoup do), and the per-transport handshake configuration that authenticates the client
//! by the fingerprint in its answer.

use std::sync::Arc;

use rtc::crypto::{HashAlgorithm, RTCCryptoProvider, SignatureScheme};
use rtc::dtls::config::{
    ClientAuthType, ConfigBuilder, ExtendedMasterSecretType, HandshakeConfig,
    VerifyPeerCertificateFn,
};
use rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile;
use rtc::peer_connection::certificate::{CertificateParams, RTCCertificate};

use crate::engine::EngineError;

/// What every listener transport of the node shares: the crypto provider and the node's DTLS
/// certificate with its fingerprint.
pub struct Identity {
    pub(super) crypto: Arc<dyn RTCCryptoProvider>,
    certificate: RTCCertificate,
    pub(super) fingerprint: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

pub(super) fn setup<E: std::fmt::Display>(e: E) -> EngineError {
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

    /// The DTLS configuration of one transport, checking the client's certificate against
    /// the fingerprint in its answer.
    pub(super) fn handshake_config(
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

//! SRTP for what a listener transport sends: keyed from its DTLS handshake (RFC 5764), sealing
//! each copy straight into the worker's send batch.
//!
//! A copy with `AEAD_AES_128_GCM` (RFC 7714, what browsers negotiate) is one header write, one
//! payload copy and one `ring` seal into the datagram's final place: no allocation, no lookup.
//! The `rtc` crate's SRTP context, used before, allocated the protected packet, looked the
//! SSRC's rollover state up in a hash map twice and took a marshalled copy of the packet, which
//! together cost more than the encryption itself (the node seals one copy per listener per
//! packet, so this is the hottest code of a fan-out). Its key derivation is private to the
//! crate, so the session keys are derived here (RFC 3711 section 4.3, AES-CM PRF, with the
//! provider's AES block function); a unit test checks every sealed byte against the crate's
//! context, across a sequence number wrap. The `AES_CM_128_HMAC_SHA1_80` profile, which a
//! client may still pick, goes through the crate's context as before. Under either profile a
//! packet index is sealed at most once (see [`SrtpSender::seal`]).

use std::net::SocketAddr;

use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use rtc::crypto::{BlockCipherAlgorithm, RTCCrypto};
use rtc::dtls::endpoint::Endpoint;
use rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile;
use rtc::srtp::context::Context;
use rtc::srtp::protection_profile::ProtectionProfile;

use super::identity::{Identity, setup};
use crate::engine::{EngineError, Rewritten};

/// Length of the AES-GCM authentication tag (RFC 7714 section 12: 16 octets).
const GCM_TAG: usize = 16;
/// KDF labels (RFC 3711 section 4.3.1).
const LABEL_ENCRYPTION: u8 = 0x00;
const LABEL_SALT: u8 = 0x02;
/// Packets sealed under one key at most (RFC 3711 section 9.2: 2^48).
const MAX_INDEX: u64 = (1 << 48) - 1;
/// How far behind the highest index a late (reordered) packet may still be sealed, once.
const WINDOW: u64 = 64;

/// The sealing side of a listener's SRTP session.
pub struct SrtpSender {
    kind: Kind,
    index: Index,
}

#[allow(
    clippy::large_enum_variant,
    reason = "the GCM key lives inline in the transport: one indirection less per copy"
)]
enum Kind {
    /// `AEAD_AES_128_GCM`, sealed here.
    Gcm(Gcm),
    /// `AES_CM_128_HMAC_SHA1_80`, through the `rtc` crate's context.
    Context(Box<Context>),
}

struct Gcm {
    key: LessSafeKey,
    salt: [u8; 12],
}

/// The packet indexes sealed so far, so none is sealed twice.
#[derive(Debug, Default)]
struct Index {
    /// The highest packet index sealed (rollover count × 2^16 + sequence number).
    highest: Option<u64>,
    /// Which of the [`WINDOW`] indexes up to `highest` were sealed (bit `i`: `highest - i`).
    sealed: u64,
}

impl std::fmt::Debug for SrtpSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let profile = match self.kind {
            Kind::Gcm(_) => "AEAD_AES_128_GCM",
            Kind::Context(_) => "AES_CM_128_HMAC_SHA1_80",
        };
        f.debug_tuple("SrtpSender").field(&profile).finish()
    }
}

impl SrtpSender {
    /// The sender for `profile` from the local master key and salt.
    pub fn new(
        profile: ProtectionProfile,
        master_key: &[u8],
        master_salt: &[u8],
        crypto: &dyn RTCCrypto,
    ) -> Result<Self, EngineError> {
        let kind = match profile {
            ProtectionProfile::AeadAes128Gcm => {
                if master_key.len() != 16 || master_salt.len() != 12 {
                    return Err(setup("bad AES-GCM master key or salt length"));
                }
                let mut key = [0u8; 16];
                derive(crypto, LABEL_ENCRYPTION, master_key, master_salt, &mut key)?;
                let mut salt = [0u8; 12];
                derive(crypto, LABEL_SALT, master_key, master_salt, &mut salt)?;
                let key = UnboundKey::new(&AES_128_GCM, &key).map_err(|_| setup("AES-GCM key"))?;
                Kind::Gcm(Gcm {
                    key: LessSafeKey::new(key),
                    salt,
                })
            }
            _ => Kind::Context(Box::new(
                Context::new(master_key, master_salt, profile, None, None, crypto)
                    .map_err(setup)?,
            )),
        };
        Ok(Self {
            kind,
            index: Index::default(),
        })
    }

    /// Whether a packet may be sealed (the key has not sealed all it may).
    pub fn ready(&self) -> bool {
        self.index.highest.is_none_or(|h| h < MAX_INDEX)
    }

    /// Seals one RTP packet (`header` and `payload`) into the start of `out`: the datagram's
    /// length, or `None` when it does not fit, when its index was sealed before or is too old
    /// to tell (two packets sealed under one index would share a nonce, which exposes the key
    /// stream, and with GCM the authentication key: a speaker sending two payloads under one
    /// sequence number must not cause that), or when the key has sealed all it may. A late
    /// packet (the router keeps reordered packets in their place) is sealed if it is at most
    /// [`WINDOW`] behind and its index unused.
    pub fn seal(&mut self, header: &Rewritten, payload: &[u8], out: &mut [u8]) -> Option<usize> {
        let index = self.index.next(header.sequence_number)?;
        let len = match &mut self.kind {
            Kind::Gcm(gcm) => gcm.seal(header, index, payload, out)?,
            Kind::Context(context) => {
                let mut plain = Vec::with_capacity(Rewritten::LEN + payload.len());
                plain.extend_from_slice(&header.marshal());
                plain.extend_from_slice(payload);
                let sealed = context
                    .encrypt_rtp_with_header(&plain, &header.header())
                    .ok()?;
                out.get_mut(..sealed.len())?.copy_from_slice(&sealed);
                sealed.len()
            }
        };
        self.index.mark(index);
        Some(len)
    }
}

impl Gcm {
    fn seal(
        &self,
        header: &Rewritten,
        index: u64,
        payload: &[u8],
        out: &mut [u8],
    ) -> Option<usize> {
        let len = Rewritten::LEN + payload.len() + GCM_TAG;
        let out = out.get_mut(..len)?;
        let (head, rest) = out.split_at_mut(Rewritten::LEN);
        head.copy_from_slice(&header.marshal());
        let (body, tag_out) = rest.split_at_mut(payload.len());
        body.copy_from_slice(payload);
        // RFC 7714 section 8.1: 00 00 || SSRC || ROC || SEQ, XOR the session salt.
        let mut iv = [0u8; 12];
        iv[2..6].copy_from_slice(&header.ssrc.to_be_bytes());
        iv[6..12].copy_from_slice(&index.to_be_bytes()[2..]);
        for (v, s) in iv.iter_mut().zip(self.salt) {
            *v ^= s;
        }
        let tag = self
            .key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(iv), Aad::from(&*head), body)
            .ok()?;
        tag_out.copy_from_slice(tag.as_ref());
        Some(len)
    }
}

impl Index {
    /// Records `index` as sealed.
    fn mark(&mut self, index: u64) {
        match self.highest {
            Some(highest) if index <= highest => self.sealed |= 1 << (highest - index),
            Some(highest) => {
                let shift = index - highest;
                self.sealed = if shift >= WINDOW {
                    0
                } else {
                    self.sealed << shift
                };
                self.sealed |= 1;
                self.highest = Some(index);
            }
            None => {
                self.sealed = 1;
                self.highest = Some(index);
            }
        }
    }

    /// The packet index of `seq` (RFC 3711 section 3.3.1 and appendix A: the rollover count
    /// guessed from the highest index sealed so far); `None` if that index was sealed before
    /// or is more than [`WINDOW`] behind the highest.
    fn next(&self, seq: u16) -> Option<u64> {
        let Some(highest) = self.highest else {
            return Some(u64::from(seq));
        };
        let roc = highest >> 16;
        let last = (highest & 0xffff) as i64;
        let seq_i = i64::from(seq);
        let guess = if last < 0x8000 {
            if seq_i - last > 0x8000 {
                roc.checked_sub(1)?
            } else {
                roc
            }
        } else if last - 0x8000 > seq_i {
            roc + 1
        } else {
            roc
        };
        let index = (guess << 16) | u64::from(seq);
        if index > MAX_INDEX {
            return None;
        }
        if index > highest {
            return Some(index);
        }
        let behind = highest - index;
        (behind < WINDOW && self.sealed & (1 << behind) == 0).then_some(index)
    }
}

/// RFC 3711 section 4.3.3, AES-CM PRF with a key derivation rate of 0 (RFC 5764): the master
/// salt, padded to a block, XOR the label at octet 7, with a 16-bit block counter in the last
/// two octets, encrypted under the master key; `out` is filled from the key stream.
fn derive(
    crypto: &dyn RTCCrypto,
    label: u8,
    master_key: &[u8],
    master_salt: &[u8],
    out: &mut [u8],
) -> Result<(), EngineError> {
    for (counter, chunk) in out.chunks_mut(16).enumerate() {
        let mut block = [0u8; 16];
        block[..master_salt.len().min(14)]
            .copy_from_slice(&master_salt[..master_salt.len().min(14)]);
        block[7] ^= label;
        block[14..].copy_from_slice(&(counter as u16).to_be_bytes());
        crypto
            .block_encrypt(BlockCipherAlgorithm::Aes128, master_key, &mut block)
            .map_err(setup)?;
        chunk.copy_from_slice(&block[..chunk.len()]);
    }
    Ok(())
}

/// The sender for what the node sends to `remote`, keyed from its finished handshake (RFC
/// 5764).
pub(super) fn outbound(
    dtls: &Endpoint,
    remote: SocketAddr,
    identity: &Identity,
) -> Result<SrtpSender, EngineError> {
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
    SrtpSender::new(
        profile,
        &config.keys.local_master_key,
        &config.keys.local_master_salt,
        identity.crypto.crypto(),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn header(seq: u16) -> Rewritten {
        Rewritten {
            marker: seq.is_multiple_of(7),
            payload_type: 111,
            sequence_number: seq,
            timestamp: u32::from(seq).wrapping_mul(960),
            ssrc: 0x1234_5678,
        }
    }

    #[test]
    fn key_derivation_matches_rfc_3711_appendix_b3() {
        let crypto = rtc::crypto::default_provider().unwrap();
        let key = hex("E1F97A0D3E018BE0D64FA32C06DE4139");
        let salt = hex("0EC675AD498AFEEBB6960B3AABE6");
        let mut cipher_key = [0u8; 16];
        derive(
            crypto.crypto(),
            LABEL_ENCRYPTION,
            &key,
            &salt,
            &mut cipher_key,
        )
        .unwrap();
        assert_eq!(cipher_key.to_vec(), hex("C61E7A93744F39EE10734AFE3FF7A087"));
        let mut cipher_salt = [0u8; 14];
        derive(crypto.crypto(), LABEL_SALT, &key, &salt, &mut cipher_salt).unwrap();
        assert_eq!(cipher_salt.to_vec(), hex("30CBBC08863D8C85D49DB34A9AE1"));
    }

    /// Every sealed byte equals what the `rtc` crate's SRTP context makes of the same packet,
    /// through a sequence number wrap (the rollover count), for both profiles.
    #[test]
    fn sealed_packets_match_the_rtc_context_across_a_wrap() {
        let crypto = rtc::crypto::default_provider().unwrap();
        for (profile, key_len, salt_len) in [
            (ProtectionProfile::AeadAes128Gcm, 16, 12),
            (ProtectionProfile::Aes128CmHmacSha1_80, 16, 14),
        ] {
            let key: Vec<u8> = (0..key_len).map(|i| i as u8 * 7 + 1).collect();
            let salt: Vec<u8> = (0..salt_len).map(|i| i as u8 * 13 + 5).collect();
            let mut ours = SrtpSender::new(profile, &key, &salt, crypto.crypto()).unwrap();
            let mut theirs =
                Context::new(&key, &salt, profile, None, None, crypto.crypto()).unwrap();
            let mut out = [0u8; 256];
            for seq in (65_500u16..=u16::MAX).chain(0..40) {
                let h = header(seq);
                let payload: Vec<u8> = (0..(60 + seq % 50)).map(|i| (i ^ seq) as u8).collect();
                let n = ours.seal(&h, &payload, &mut out).unwrap();
                let mut plain = h.marshal().to_vec();
                plain.extend_from_slice(&payload);
                let expected = theirs.encrypt_rtp_with_header(&plain, &h.header()).unwrap();
                assert_eq!(&out[..n], &expected[..], "{profile:?} seq {seq}");
            }
        }
    }

    /// A sealed packet opens with the receiving side's context (what a client runs).
    #[test]
    fn a_client_context_opens_what_is_sealed() {
        let crypto = rtc::crypto::default_provider().unwrap();
        let key = [9u8; 16];
        let salt = [3u8; 12];
        let profile = ProtectionProfile::AeadAes128Gcm;
        let mut ours = SrtpSender::new(profile, &key, &salt, crypto.crypto()).unwrap();
        let mut client = Context::new(&key, &salt, profile, None, None, crypto.crypto()).unwrap();
        let mut out = [0u8; 256];
        for seq in [1u16, 2, 5, 900] {
            let n = ours.seal(&header(seq), b"opus frame", &mut out).unwrap();
            let opened = client.decrypt_rtp(&out[..n]).unwrap();
            assert_eq!(&opened[Rewritten::LEN..], b"opus frame");
        }
    }

    /// The sender seals an index once (a repeated GCM nonce would expose the key stream): a
    /// repeated or too old sequence number is refused, a late one in the window is sealed
    /// once, and a buffer too small for the packet is refused.
    #[test]
    fn an_index_is_sealed_once_and_a_short_buffer_is_refused() {
        let crypto = rtc::crypto::default_provider().unwrap();
        for (profile, salt, tag) in [
            (ProtectionProfile::AeadAes128Gcm, 12, 16),
            (ProtectionProfile::Aes128CmHmacSha1_80, 14, 10),
        ] {
            let salt = vec![2u8; salt];
            let mut s = SrtpSender::new(profile, &[1u8; 16], &salt, crypto.crypto()).unwrap();
            let mut out = [0u8; 256];
            let mut seal =
                |seq: u16, payload: &[u8], out: &mut [u8]| s.seal(&header(seq), payload, out);
            assert!(seal(100, b"abc", &mut out).is_some());
            assert!(seal(100, b"abd", &mut out).is_none(), "repeated");
            assert!(seal(102, b"abc", &mut out).is_some());
            assert!(seal(101, b"abc", &mut out).is_some(), "late, unused");
            assert!(seal(101, b"abc", &mut out).is_none(), "late, used");
            assert!(seal(30, b"abc", &mut out).is_none(), "outside the window");
            assert!(seal(103, b"abc", &mut out[..20]).is_none());
            assert_eq!(seal(104, b"abc", &mut out), Some(12 + 3 + tag));
            // Within half the sequence space ahead: a forward move; then past the wrap: the
            // next rollover; then a late one from before the wrap.
            for seq in [30_000, 60_000, 65_530, 2, 65_534] {
                assert!(seal(seq, b"abc", &mut out).is_some(), "{profile:?} {seq}");
            }
            assert!(seal(2, b"abc", &mut out).is_none());
            assert!(seal(3, b"abc", &mut out).is_some());
        }
        let profile = ProtectionProfile::AeadAes128Gcm;
        assert!(
            SrtpSender::new(profile, &[1u8; 15], &[2u8; 12], crypto.crypto()).is_err(),
            "a short master key is refused"
        );
    }
}

//! Client authentication: a JWT from `Authorization: Bearer`, `?token=`, or
//! `Sec-WebSocket-Protocol: voiceping, <jwt>` (in that order), checked before the upgrade.
//! HS256 with a shared secret, RS256/ES256 with a public key, or a JSON Web Key Set whose keys
//! the token's `kid` selects (so keys rotate without dropping anyone: publish the new key, sign
//! with it, drop the old one later; the file is re-read when it changes). `alg: none` and any
//! algorithm other than the key's are refused. `exp` and `nbf` are checked with a configured
//! leeway; a configured audience or issuer must be in the token. The connection ends with its
//! token (`refresh-token` extends it, see `connection::token`).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use axum::http::HeaderMap;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::access::{Role, token_grants};
use crate::config::Config;

/// Longest token accepted.
const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// The subprotocol browsers offer with the token.
pub const SUBPROTOCOL: &str = "voiceping";

#[derive(Debug, Clone, Deserialize)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Display name.
    #[serde(default)]
    pub name: Option<String>,
    pub exp: u64,
    /// Initial grants: channel id (or `*`) -> role. Validated in [`Authenticator::authenticate`].
    #[serde(default)]
    pub grants: BTreeMap<String, String>,
    /// The grants, parsed.
    #[serde(skip)]
    pub roles: HashMap<String, Role>,
}

/// Why a request was refused (all map to HTTP 401; the reason is only logged).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no token")]
    Missing,
    #[error("token too large")]
    TooLarge,
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// A verification key and the one algorithm it verifies.
struct Key {
    key: DecodingKey,
    validation: Validation,
}

/// The keys tokens are checked with.
enum Keys {
    /// One configured secret or public key; the token's `kid` is not looked at.
    Single(Key),
    /// A key set, by `kid`, re-read from its file when the file changes.
    Set {
        path: PathBuf,
        keys: RwLock<Arc<HashMap<String, Key>>>,
        /// The file's modification time and length when last read.
        read: RwLock<Option<(SystemTime, u64)>>,
    },
}

/// Most keys a key set may hold.
const MAX_KEYS: usize = 32;

pub struct Authenticator {
    keys: Keys,
    /// Audience, issuer, required claims and leeway; each key's validation is a copy with its
    /// algorithm.
    template: Validation,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = match &self.keys {
            Keys::Single(key) => format!("{:?}", key.validation.algorithms),
            Keys::Set { keys, .. } => format!("{} keys by kid", read_lock(keys).len()),
        };
        f.debug_struct("Authenticator")
            .field("keys", &keys)
            .finish_non_exhaustive()
    }
}

fn read_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The algorithm a key verifies: its `alg`, else the one its type and curve imply.
fn key_algorithm(jwk: &jsonwebtoken::jwk::Jwk) -> Result<Algorithm, String> {
    if let Some(alg) = jwk.common.key_algorithm {
        return Algorithm::from_str(&alg.to_string()).map_err(|_| format!("unsupported alg {alg}"));
    }
    Ok(match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            _ => return Err("unsupported curve".into()),
        },
        AlgorithmParameters::OctetKey(_) => Algorithm::HS256,
        AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
    })
}

/// Reads a JSON Web Key Set: every key needs a unique `kid`; at most [`MAX_KEYS`].
fn read_key_set(
    path: &std::path::Path,
    template: &Validation,
) -> Result<HashMap<String, Key>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let set: JwkSet = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not a JWKS: {e}", path.display()))?;
    if set.keys.is_empty() || set.keys.len() > MAX_KEYS {
        return Err(format!("a key set holds 1 to {MAX_KEYS} keys"));
    }
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        let kid = jwk
            .common
            .key_id
            .clone()
            .filter(|k| !k.is_empty() && k.len() <= 128)
            .ok_or("every key needs a kid (1-128 bytes)")?;
        let algorithm = key_algorithm(jwk).map_err(|e| format!("key {kid}: {e}"))?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {kid}: {e}"))?;
        let mut validation = template.clone();
        validation.algorithms = vec![algorithm];
        if keys.insert(kid.clone(), Key { key, validation }).is_some() {
            return Err(format!("kid {kid} appears twice"));
        }
    }
    Ok(keys)
}

fn file_stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

impl Authenticator {
    pub fn from_config(config: &Config) -> Result<Self, String> {
        let mut template = Validation::new(Algorithm::HS256);
        // A configured audience or issuer must be present in the token, not merely match when
        // it happens to be there. With no audience configured the gateway serves none, so a
        // token that names one is for somebody else and is refused (RFC 7519 4.1.3).
        let mut required = vec!["exp", "sub"];
        if let Some(aud) = &config.jwt_audience {
            template.set_audience(&[aud]);
            required.push("aud");
        }
        if let Some(iss) = &config.jwt_issuer {
            template.set_issuer(&[iss]);
            required.push("iss");
        }
        template.set_required_spec_claims(&required);
        template.validate_nbf = true;
        template.leeway = config.jwt_leeway_s;
        let single = |key: DecodingKey, algorithm: Algorithm| {
            let mut validation = template.clone();
            validation.algorithms = vec![algorithm];
            Keys::Single(Key { key, validation })
        };
        let keys = match (&config.jwt_secret, &config.jwt_public_key, &config.jwt_jwks) {
            (Some(secret), None, None) => single(
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            ),
            (None, Some(path), None) => {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                    single(key, Algorithm::RS256)
                } else {
                    let key = DecodingKey::from_ec_pem(&pem)
                        .map_err(|_| "the public key is neither RSA nor EC PEM".to_owned())?;
                    single(key, Algorithm::ES256)
                }
            }
            (None, None, Some(path)) => {
                let stamp = file_stamp(path);
                let keys = read_key_set(path, &template)?;
                Keys::Set {
                    path: path.clone(),
                    keys: RwLock::new(Arc::new(keys)),
                    read: RwLock::new(stamp),
                }
            }
            _ => return Err("set exactly one of a JWT secret, public key or key set".into()),
        };
        Ok(Self { keys, template })
    }

    /// How long past its `exp` a token is still honoured.
    pub fn leeway(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.template.leeway)
    }

    /// Re-reads the key set if its file changed; a file that no longer reads as a key set
    /// leaves the keys as they were. `Some(keys)` when it reloaded.
    pub fn reload_if_changed(&self) -> Result<Option<usize>, String> {
        let Keys::Set { path, keys, read } = &self.keys else {
            return Ok(None);
        };
        let stamp = file_stamp(path);
        if stamp == *read_lock(read) {
            return Ok(None);
        }
        *write_lock(read) = stamp;
        let fresh = read_key_set(path, &self.template)?;
        let count = fresh.len();
        *write_lock(keys) = Arc::new(fresh);
        Ok(Some(count))
    }

    /// Whether tokens are checked against a key set file (to be watched for changes).
    pub fn has_key_set(&self) -> bool {
        matches!(self.keys, Keys::Set { .. })
    }

    fn decode(&self, token: &str) -> Result<Claims, AuthError> {
        let invalid = |e: jsonwebtoken::errors::Error| AuthError::Invalid(e.to_string());
        match &self.keys {
            Keys::Single(key) => jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation)
                .map(|data| data.claims)
                .map_err(invalid),
            Keys::Set { keys, .. } => {
                let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
                let kid = header.kid.ok_or(AuthError::Invalid("no kid".into()))?;
                let keys = Arc::clone(&read_lock(keys));
                let key = keys
                    .get(&kid)
                    .ok_or(AuthError::Invalid("unknown kid".into()))?;
                jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation)
                    .map(|data| data.claims)
                    .map_err(invalid)
            }
        }
    }

    /// Checks one token: signature, algorithm, `exp`, `nbf`, audience and issuer, subject and
    /// grants.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLarge);
        }
        let mut claims = self.decode(token)?;
        if claims.sub.is_empty()
            || claims.sub.len() > 128
            || !claims
                .sub
                .chars()
                .all(|c| c.is_ascii_graphic() && c != '{' && c != '}')
        {
            return Err(AuthError::Invalid("bad subject".into()));
        }
        claims.roles =
            token_grants(&claims.grants).ok_or(AuthError::Invalid("bad grants claim".into()))?;
        Ok(claims)
    }

    /// Finds and checks the token. Returns the claims and whether the token came in the
    /// subprotocol header (then the reply must select `voiceping`).
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
    ) -> Result<(Claims, bool), AuthError> {
        let (token, via_subprotocol) = find_token(headers, query_token)?;
        Ok((self.verify(token)?, via_subprotocol))
    }
}

fn find_token<'a>(
    headers: &'a HeaderMap,
    query_token: Option<&'a str>,
) -> Result<(&'a str, bool), AuthError> {
    if let Some(value) = headers.get(axum::http::header::AUTHORIZATION) {
        let value = value
            .to_str()
            .map_err(|_| AuthError::Invalid("authorization header".into()))?;
        let token = value
            .strip_prefix("Bearer ")
            .ok_or(AuthError::Invalid("not a bearer token".into()))?;
        return Ok((token.trim(), false));
    }
    if let Some(token) = query_token.filter(|t| !t.is_empty()) {
        return Ok((token, false));
    }
    if let Some(value) = headers.get(axum::http::header::SEC_WEBSOCKET_PROTOCOL) {
        let value = value
            .to_str()
            .map_err(|_| AuthError::Invalid("subprotocol header".into()))?;
        let mut parts = value.split(',').map(str::trim);
        if parts.next() == Some(SUBPROTOCOL)
            && let Some(token) = parts.next().filter(|t| !t.is_empty())
        {
            return Ok((token, true));
        }
    }
    Err(AuthError::Missing)
}

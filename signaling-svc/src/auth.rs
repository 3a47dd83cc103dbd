//! Client authentication: a JWT from `Authorization: Bearer`, `?token=`, or
//! `Sec-WebSocket-Protocol: voiceping, <jwt>` (in that order), checked before the upgrade.
//! HS256 with a shared secret, or RS256/ES256 with a public key; `alg: none` and any algorithm
//! other than the configured one are refused. `exp` and `nbf` are checked with a configured
//! leeway; a configured audience or issuer must be in the token. The connection ends with its
//! token (`refresh-token` extends it, see `connection::token`).

use std::collections::{BTreeMap, HashMap};

use axum::http::HeaderMap;
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

pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    pub fn from_config(config: &Config) -> Result<Self, String> {
        let (key, algorithms) = match (&config.jwt_secret, &config.jwt_public_key) {
            (Some(secret), _) => (
                DecodingKey::from_secret(secret.as_bytes()),
                vec![Algorithm::HS256],
            ),
            (None, Some(path)) => {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                    (key, vec![Algorithm::RS256])
                } else {
                    let key = DecodingKey::from_ec_pem(&pem)
                        .map_err(|_| "the public key is neither RSA nor EC PEM".to_owned())?;
                    (key, vec![Algorithm::ES256])
                }
            }
            (None, None) => return Err("no JWT key configured".into()),
        };
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms;
        // A configured audience or issuer must be present in the token, not merely match when
        // it happens to be there.
        let mut required = vec!["exp", "sub"];
        match &config.jwt_audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &config.jwt_issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        validation.validate_nbf = true;
        validation.leeway = config.jwt_leeway_s;
        Ok(Self { key, validation })
    }

    /// How long past its `exp` a token is still honoured.
    pub fn leeway(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.validation.leeway)
    }

    /// Checks one token: signature, algorithm, `exp`, `nbf`, audience and issuer, subject and
    /// grants.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLarge);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let mut claims = data.claims;
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

//! Tokens as a deployment's identity provider would sign them (feature `ws`): the one helper
//! every test, benchmark and the load tool sign their users' JWTs with.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// An HS256 token for `user` named `name` with the `grants` claim (channel or `*` -> role),
/// expiring `valid_for_secs` from now (negative: already expired).
pub fn token(secret: &str, user: &str, name: &str, grants: &Value, valid_for_secs: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let claims = json!({"sub": user, "name": name, "exp": now + valid_for_secs, "grants": grants});
    sign(secret, &claims)
}

/// A token for `user` allowed to talk in every channel, valid for an hour.
pub fn talker(secret: &str, user: &str, name: &str) -> String {
    token(secret, user, name, &json!({"*": "talk"}), 3_600)
}

/// Any claims, signed HS256 with `secret`.
pub fn sign(secret: &str, claims: &Value) -> String {
    // Invariant: HS256 over JSON claims cannot fail to encode.
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("claims sign")
}

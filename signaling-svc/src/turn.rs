//! TURN relay credentials for clients on networks that reach the media node neither over UDP
//! nor over ICE/TCP: short-lived, in the TURN REST API form that coturn checks with
//! `use-auth-secret` and `static-auth-secret` (username `<expiry>:<user>`, password the base64
//! HMAC-SHA1 of the username under the shared secret). The gateway only hands them out; the
//! relay is coturn. The secret is read once from a file and never logged.

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use ring::hmac;

/// URLs a gateway hands out at most.
const MAX_URLS: usize = 8;
/// Longest URL accepted.
const MAX_URL: usize = 256;
/// Shortest shared secret accepted.
const MIN_SECRET: usize = 16;
/// Credential lifetimes accepted, in seconds.
pub const TTL_RANGE: std::ops::RangeInclusive<u64> = 60..=86_400;

/// The relays and the secret they share with the gateway.
pub struct Turn {
    urls: Vec<String>,
    key: hmac::Key,
    ttl: Duration,
}

impl std::fmt::Debug for Turn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Turn")
            .field("urls", &self.urls)
            .field("secret", &"<redacted>")
            .field("ttl", &self.ttl)
            .finish()
    }
}

pub use talkgroup_wire::reply::IceServer;

/// A `turn:` or `turns:` URL (RFC 7065) of printable ASCII without spaces.
fn valid_url(url: &str) -> bool {
    (url.starts_with("turn:") || url.starts_with("turns:"))
        && url.len() > "turn:".len() + 1
        && url.len() <= MAX_URL
        && url.bytes().all(|b| b.is_ascii_graphic())
}

impl Turn {
    /// The relays of `--turn-url` with the secret in `secret_file`; `None` when no URL is
    /// configured. Errors say what is wrong without the secret.
    pub fn from_config(
        urls: &[String],
        secret_file: Option<&Path>,
        ttl_s: u64,
    ) -> Result<Option<Self>, String> {
        if urls.is_empty() {
            return Ok(None);
        }
        if urls.len() > MAX_URLS {
            return Err(format!("at most {MAX_URLS} TURN urls"));
        }
        if let Some(bad) = urls.iter().find(|u| !valid_url(u)) {
            return Err(format!("invalid TURN url {bad:?} (turn: or turns:)"));
        }
        if !TTL_RANGE.contains(&ttl_s) {
            return Err("TURN credential lifetime must be 60 s to 24 h".into());
        }
        let path = secret_file.ok_or("a TURN url needs --turn-secret-file")?;
        let secret = std::fs::read(path)
            .map_err(|e| format!("cannot read the TURN secret file {}: {e}", path.display()))?;
        let secret = secret.trim_ascii();
        if secret.len() < MIN_SECRET {
            return Err(format!(
                "the TURN secret must be at least {MIN_SECRET} bytes"
            ));
        }
        Ok(Some(Self::new(
            urls.to_vec(),
            secret,
            Duration::from_secs(ttl_s),
        )))
    }

    fn new(urls: Vec<String>, secret: &[u8], ttl: Duration) -> Self {
        Self {
            urls,
            key: hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret),
            ttl,
        }
    }

    /// Credentials for `user`, valid until `now_s + ttl` but never past `not_after_s` (the
    /// user's token's `exp`: a relay is no way in for longer than the right to be here);
    /// Unix seconds. The expiry in ms.
    pub fn credentials(&self, user: &str, now_s: u64, not_after_s: u64) -> (IceServer, i64) {
        let expiry = now_s.saturating_add(self.ttl.as_secs()).min(not_after_s);
        let username = format!("{expiry}:{user}");
        let tag = hmac::sign(&self.key, username.as_bytes());
        let credential = base64::engine::general_purpose::STANDARD.encode(tag.as_ref());
        let expires_at = i64::try_from(expiry.saturating_mul(1000)).unwrap_or(i64::MAX);
        (
            IceServer {
                urls: self.urls.clone(),
                username,
                credential,
            },
            expires_at,
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn turn(ttl: u64) -> Turn {
        Turn::new(
            vec!["turn:relay.example:3478?transport=udp".into()],
            b"0123456789abcdef",
            Duration::from_secs(ttl),
        )
    }

    #[test]
    fn credentials_are_the_rest_api_form_coturn_checks() {
        let (server, expires_at) = turn(600).credentials("ana", 1_700_000_000, u64::MAX);
        assert_eq!(server.username, "1700000600:ana");
        assert_eq!(expires_at, 1_700_000_600_000);
        // base64(HMAC-SHA1("0123456789abcdef", "1700000600:ana")), computed independently
        // with `printf %s 1700000600:ana | openssl dgst -sha1 -hmac 0123456789abcdef -binary |
        // base64`.
        assert_eq!(server.credential, "KoVJUJqSNE+6VzIRbsRGcAVHvtg=");
        assert_eq!(server.urls, vec!["turn:relay.example:3478?transport=udp"]);
    }

    #[test]
    fn credentials_end_with_the_users_token() {
        let (server, expires_at) = turn(600).credentials("ana", 1_700_000_000, 1_700_000_100);
        assert_eq!(server.username, "1700000100:ana");
        assert_eq!(expires_at, 1_700_000_100_000);
    }

    #[test]
    fn the_secret_is_never_in_debug_output() {
        let debug = format!("{:?}", turn(600));
        assert!(debug.contains("<redacted>"));
        assert!(!debug.contains("0123456789abcdef"));
    }

    #[test]
    fn bad_configuration_is_refused_with_a_reason() {
        let dir = std::env::temp_dir().join(format!("turn-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good");
        std::fs::write(&good, "a-long-enough-shared-secret\n").unwrap();
        let short = dir.join("short");
        std::fs::write(&short, "short\n").unwrap();
        let url = |u: &str| vec![u.to_owned()];
        assert!(Turn::from_config(&[], None, 600).unwrap().is_none());
        assert!(
            Turn::from_config(&url("turns:relay:5349?transport=tcp"), Some(&good), 600)
                .unwrap()
                .is_some()
        );
        for (urls, file, ttl, why) in [
            (
                url("http://relay"),
                Some(good.as_path()),
                600,
                "invalid TURN url",
            ),
            (
                url("turn:relay x"),
                Some(good.as_path()),
                600,
                "invalid TURN url",
            ),
            (url("turn:relay"), None, 600, "needs --turn-secret-file"),
            (
                url("turn:relay"),
                Some(short.as_path()),
                600,
                "at least 16 bytes",
            ),
            (
                url("turn:relay"),
                Some(dir.join("missing").as_path()),
                600,
                "cannot read",
            ),
            (url("turn:relay"), Some(good.as_path()), 10, "60 s to 24 h"),
            (
                vec!["turn:r".to_owned(); 9],
                Some(good.as_path()),
                600,
                "at most 8",
            ),
        ] {
            let error = Turn::from_config(&urls, file, ttl).unwrap_err();
            assert!(error.contains(why), "{error}");
            assert!(
                !error.contains("a-long-enough"),
                "the secret leaked: {error}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

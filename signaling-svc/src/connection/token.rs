//! The socket lives no longer than its token: it is closed (4001) at the token's `exp` plus
//! the leeway, unless the client sends `refresh-token` with a newer token of the same user.

use std::time::Duration;

use tokio::time::Instant;

use super::{Conn, Result};
use crate::protocol::reply::TokenRefreshed;
use crate::protocol::{Code, RefreshToken, err};

/// The longest a socket lives on one token: a token valid for longer (or whose `exp` is near
/// the largest integer JSON carries) ends its socket after this, as an expired token would,
/// and the client refreshes or reconnects.
pub(super) const LONGEST: Duration = Duration::from_secs(366 * 24 * 3600);

/// When a token with `exp` (seconds since the Unix epoch) stops being honoured: its `exp` plus
/// the leeway, at most [`LONGEST`] from now. Any `exp` a signer put in is accepted here
/// without overflow.
pub(super) fn deadline(exp_s: u64, leeway: Duration) -> Instant {
    let now = Duration::from_millis(u64::try_from(talkgroup_proto::clock::now_ms()).unwrap_or(0));
    let end = Duration::from_secs(exp_s).saturating_add(leeway);
    Instant::now() + end.saturating_sub(now).min(LONGEST)
}

impl Conn {
    pub(super) async fn refresh_token(&mut self, r: RefreshToken) -> Result<TokenRefreshed> {
        let claims = self.app.auth.verify(&r.token).map_err(|e| {
            tracing::info!(conn = self.id, error = %e, "refresh token refused");
            err(Code::Unauthenticated, "invalid token")
        })?;
        if claims.sub != self.user.user_id {
            return Err(err(Code::Forbidden, "the token is for another user"));
        }
        self.token_deadline = deadline(claims.exp, self.app.auth.leeway());
        self.token_exp_s = claims.exp;
        if self.grants.set_token(claims.roles) {
            self.enforce_grants().await;
        }
        tracing::debug!(conn = self.id, "token refreshed");
        Ok(TokenRefreshed {
            expires_at: i64::try_from(claims.exp.saturating_mul(1000)).unwrap_or(i64::MAX),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_exp_gives_a_deadline_within_the_longest_life() {
        let leeway = Duration::from_secs(60);
        for exp in [u64::MAX, i64::MAX as u64, u64::MAX / 1000, 0] {
            let end = deadline(exp, leeway);
            assert!(end <= Instant::now() + LONGEST, "{exp}");
        }
        assert!(deadline(0, leeway) <= Instant::now());
    }
}

//! Fencing epochs, and the versions that follow the same rule: values that only grow, carried
//! by the clock. An epoch (or version) is at least the milliseconds since the Unix epoch times
//! 1000 ([`from_clock`]), so it keeps growing even after a store lost its counters; and one
//! further ahead of a clock than [`MAX_AHEAD_MS`] is refused wherever it arrives
//! ([`plausible`]), so no single call can push a channel's epochs out of every real grant's
//! reach. One rule and one window for every service (state-svc, the media nodes).

/// Epoch steps per millisecond of clock.
pub const PER_MS: u64 = 1000;

/// How far ahead of a receiver's clock an epoch may be: the clock skew tolerated between the
/// store (whose clock makes epochs), state-svc and the media nodes. Keep them within it (NTP).
pub const MAX_AHEAD_MS: u64 = 600_000;

/// The epoch the clock alone gives at `now_ms`.
pub fn from_clock(now_ms: i64) -> u64 {
    u64::try_from(now_ms).unwrap_or(0).saturating_mul(PER_MS)
}

/// The value after `current`: `max(current + 1, the clock's)`.
pub fn next(current: u64, now_ms: i64) -> u64 {
    current.saturating_add(1).max(from_clock(now_ms))
}

/// True when `epoch` could have been made by a clock within [`MAX_AHEAD_MS`] of `now_ms`.
pub fn plausible(epoch: u64, now_ms: i64) -> bool {
    let now = u64::try_from(now_ms).unwrap_or(0);
    epoch <= now.saturating_add(MAX_AHEAD_MS).saturating_mul(PER_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_grow_with_the_clock_and_absurd_ones_are_refused() {
        let now = 1_764_000_000_000;
        assert_eq!(
            next(5, now),
            from_clock(now),
            "the clock carries a lost counter"
        );
        assert_eq!(next(from_clock(now) + 7, now), from_clock(now) + 8);
        assert!(plausible(1, now));
        assert!(plausible(from_clock(now) + 5 * 60_000 * PER_MS, now));
        assert!(!plausible(from_clock(now) + 11 * 60_000 * PER_MS, now));
        assert!(!plausible(u64::MAX, now));
        assert_eq!(from_clock(-1), 0);
    }
}

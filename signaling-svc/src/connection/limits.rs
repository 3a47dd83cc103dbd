//! Rate limits of one connection: requests of any kind, presses (and emergency starts), sync
//! session creations and each sync session's changes, and the run of refusals after which the
//! connection is closed as a flood.

use std::collections::HashMap;
use std::time::Instant;

use super::Result;
use crate::config::Config;
use crate::protocol::{Code, err};

/// Rate-limit refusals in a row after which the connection is closed as a flood.
const FLOOD_LIMIT: u32 = 50;
/// Sync sessions whose change rate one connection keeps track of at once; past it the idle
/// ones are forgotten (a full bucket is the same as none).
const TRACKED_SYNCS: usize = 64;

/// A token bucket.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// `per_minute` a minute, all of them at once at most.
    fn new_per_minute(per_minute: u32) -> Self {
        Self {
            rate: f64::from(per_minute) / 60.0,
            burst: f64::from(per_minute),
            tokens: f64::from(per_minute),
            at: Instant::now(),
        }
    }

    fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            at: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
    }

    fn full(&mut self) -> bool {
        self.refill();
        self.tokens >= self.burst
    }

    fn take(&mut self) -> bool {
        self.refill();
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Debug)]
pub(super) struct Limits {
    requests: Bucket,
    presses: Bucket,
    sync_creates: Bucket,
    /// Changes per sync session, by its id.
    sync_changes: HashMap<String, Bucket>,
    sync_change_rate: u32,
    refused_in_a_row: u32,
}

impl Limits {
    pub(super) fn new(config: &Config) -> Self {
        Self {
            requests: Bucket::new(config.request_rate, config.request_rate * 2),
            presses: Bucket::new(config.ptt_rate, config.ptt_rate),
            sync_creates: Bucket::new_per_minute(config.sync_create_rate),
            sync_changes: HashMap::new(),
            sync_change_rate: config.sync_change_rate,
            refused_in_a_row: 0,
        }
    }

    /// Admits one request of any kind.
    pub(super) fn admit(&mut self) -> Result<()> {
        if self.requests.take() {
            self.refused_in_a_row = 0;
            Ok(())
        } else {
            self.refused_in_a_row += 1;
            Err(err(Code::RateLimited, "too many requests"))
        }
    }

    /// Whether the refusals in a row have become a flood.
    pub(super) fn flooding(&self) -> bool {
        self.refused_in_a_row >= FLOOD_LIMIT
    }

    /// Admits one floor press (`ptt-start`, `priority-ptt-start`, an emergency start).
    pub(super) fn press(&mut self) -> Result<()> {
        if self.presses.take() {
            Ok(())
        } else {
            Err(err(Code::RateLimited, "too many ptt-start requests"))
        }
    }

    /// Admits one sync session creation.
    pub(super) fn sync_create(&mut self) -> Result<()> {
        if self.sync_creates.take() {
            Ok(())
        } else {
            Err(err(Code::RateLimited, "too many sync sessions created"))
        }
    }

    /// Admits one change of sync session `id` (each change is pushed to every member of its
    /// channel, so each session's changes are limited on their own).
    pub(super) fn sync_change(&mut self, id: &str) -> Result<()> {
        if !self.sync_changes.contains_key(id) && self.sync_changes.len() >= TRACKED_SYNCS {
            self.sync_changes.retain(|_, bucket| !bucket.full());
            // All busy: forget the one that has rested longest (the most tokens back).
            if self.sync_changes.len() >= TRACKED_SYNCS
                && let Some(idlest) = self
                    .sync_changes
                    .iter()
                    .max_by(|a, b| a.1.tokens.total_cmp(&b.1.tokens))
                    .map(|(k, _)| k.clone())
            {
                self.sync_changes.remove(&idlest);
            }
        }
        let rate = self.sync_change_rate;
        let bucket = self
            .sync_changes
            .entry(id.to_owned())
            .or_insert_with(|| Bucket::new(rate, rate * 2));
        if bucket.take() {
            Ok(())
        } else {
            Err(err(
                Code::RateLimited,
                "too many changes to this sync session",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_creations_and_each_sessions_changes_have_their_own_limits() {
        let mut config = Config::for_tests("a-test-secret-of-enough-length");
        config.sync_create_rate = 2;
        config.sync_change_rate = 1;
        let mut limits = Limits::new(&config);
        assert!(limits.sync_create().is_ok() && limits.sync_create().is_ok());
        let refused = limits.sync_create().unwrap_err();
        assert_eq!(refused.code, Code::RateLimited);
        // Burst of two changes per session; another session is not affected.
        assert!(limits.sync_change("a").is_ok() && limits.sync_change("a").is_ok());
        assert_eq!(limits.sync_change("a").unwrap_err().code, Code::RateLimited);
        assert!(limits.sync_change("b").is_ok());
        // Tracking stays bounded: idle sessions are forgotten, busy ones kept.
        for i in 0..(TRACKED_SYNCS * 2) {
            let _ = limits.sync_change(&format!("s{i}"));
        }
        assert!(limits.sync_changes.len() <= TRACKED_SYNCS);
    }
}

//! Rate limits of one connection: requests of any kind, presses (and emergency starts), and the
//! run of refusals after which the connection is closed as a flood.

use std::time::Instant;

use super::Result;
use crate::config::Config;
use crate::protocol::{Code, err};

/// Rate-limit refusals in a row after which the connection is closed as a flood.
const FLOOD_LIMIT: u32 = 50;

/// A token bucket.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
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
    refused_in_a_row: u32,
}

impl Limits {
    pub(super) fn new(config: &Config) -> Self {
        Self {
            requests: Bucket::new(config.request_rate, config.request_rate * 2),
            presses: Bucket::new(config.ptt_rate, config.ptt_rate),
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
}

//! Gateway-wide quotas of a user, across their sockets on this gateway (the per-connection
//! rates are in `connection::limits`, sockets per address in `client_addr`).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// WebRTC transports each user holds through this gateway, across their sockets.
#[derive(Debug, Default)]
pub struct TransportQuota {
    held: Mutex<HashMap<String, usize>>,
}

impl TransportQuota {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, usize>> {
        // A panic while holding this lock leaves a plain map behind; keep serving.
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes a transport place for `user`, unless they hold `max` through this gateway.
    pub fn take(&self, user: &str, max: usize) -> bool {
        let mut held = self.lock();
        let count = held.entry(user.to_owned()).or_default();
        if *count >= max {
            return false;
        }
        *count += 1;
        true
    }

    /// Counts `count` transports `user` brought along (a resumed session's), over the limit
    /// if need be: they exist already.
    pub fn add(&self, user: &str, count: usize) {
        if count > 0 {
            *self.lock().entry(user.to_owned()).or_default() += count;
        }
    }

    /// Gives back `count` of `user`'s transport places.
    pub fn give_back(&self, user: &str, count: usize) {
        let mut held = self.lock();
        if let Some(n) = held.get_mut(user) {
            *n = n.saturating_sub(count);
            if *n == 0 {
                held.remove(user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_holds_at_most_max_and_places_come_back() {
        let quota = TransportQuota::default();
        assert!(quota.take("ana", 2) && quota.take("ana", 2));
        assert!(!quota.take("ana", 2));
        assert!(quota.take("bo", 2), "another user's places are their own");
        quota.give_back("ana", 1);
        assert!(quota.take("ana", 2));
        quota.add("ana", 3);
        assert!(!quota.take("ana", 2));
        quota.give_back("ana", 10);
        assert!(
            quota.lock().get("ana").is_none(),
            "nothing kept for a user with none"
        );
    }
}

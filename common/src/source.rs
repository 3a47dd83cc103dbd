//! Budgets per source: how many of something (sockets, connections not yet authenticated) one
//! client network may hold, so that one host cannot take what a listener has for everyone.
//!
//! One rule says what "one source" is, for every service: an IPv4 address, or an IPv6 /64. A
//! host or a subscriber's network is handed at least a /64 and may use any address in it, so
//! a budget per IPv6 address would give it 2^64 budgets. IPv4-mapped IPv6 addresses count as
//! the IPv4 address they carry.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, PoisonError};

/// The source `ip` belongs to: itself for IPv4, its /64 for IPv6.
pub fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !0xffff_ffff_ffff_ffffu128)),
        },
        v4 => v4,
    }
}

/// What each source holds of one budget.
#[derive(Debug, Default)]
pub struct SourceBudget {
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One unit a source holds, given back when dropped.
#[derive(Debug)]
pub struct SourceSlot {
    budget: Arc<SourceBudget>,
    source: IpAddr,
}

impl SourceBudget {
    /// A slot for `ip`'s source, unless it already holds `max`.
    pub fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<SourceSlot> {
        let source = source(ip);
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let count = held.entry(source).or_default();
        if *count >= max {
            if *count == 0 {
                held.remove(&source);
            }
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            budget: Arc::clone(self),
            source,
        })
    }

    /// What `ip`'s source holds now.
    pub fn held(&self, ip: IpAddr) -> usize {
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.get(&source(ip)).copied().unwrap_or(0)
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut held = self
            .budget
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = held.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_ipv6_network_is_one_source_and_mapped_ipv4_is_ipv4() {
        assert_eq!(source(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            source(ip("2001:db8:1:2:ffff::9")),
            source(ip("2001:db8:1:2::1"))
        );
        assert_ne!(source(ip("2001:db8:1:3::1")), source(ip("2001:db8:1:2::1")));
        assert_eq!(source(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(source(ip("10.1.2.3")), ip("10.1.2.3"));
    }

    #[test]
    fn a_source_holds_at_most_its_slots() {
        let budget = Arc::new(SourceBudget::default());
        let a = budget.take(ip("1.1.1.1"), 2).unwrap();
        let _b = budget.take(ip("1.1.1.1"), 2).unwrap();
        assert!(budget.take(ip("1.1.1.1"), 2).is_none());
        assert!(budget.take(ip("2.2.2.2"), 2).is_some(), "per source");
        let _c = budget.take(ip("2001:db8::1"), 1).unwrap();
        assert!(
            budget.take(ip("2001:db8::2"), 1).is_none(),
            "one IPv6 /64, one budget"
        );
        drop(a);
        assert!(budget.take(ip("1.1.1.1"), 2).is_some());
        assert!(budget.take(ip("3.3.3.3"), 0).is_none());
        assert_eq!(budget.held(ip("3.3.3.3")), 0);
    }
}

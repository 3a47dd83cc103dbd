//! Who a socket comes from, and how many sockets each client address holds.
//!
//! The client address is the TCP peer, unless the peer is a trusted proxy
//! (`--trusted-proxies`): then it is the last address in `X-Forwarded-For` that is not itself a
//! trusted proxy (each proxy appends the address it saw, so only the entries the trusted chain
//! added can be believed; the ones before them are whatever the client wrote). Each address may
//! hold `--max-sockets-per-address` sockets on this gateway.

use std::collections::HashMap;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use axum::http::HeaderMap;

/// An address block: an address and a prefix length (a bare address is a block of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not an address or CIDR block");
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text.trim(), None),
        };
        let network: IpAddr = addr.parse().map_err(|_| bad())?;
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(bad)?,
            None => bits,
        };
        Ok(Self { network, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Cidr {
    pub fn contains(&self, addr: IpAddr) -> bool {
        let masked = |value: u128, bits: u32| {
            let shift = bits - u32::from(self.prefix);
            if shift >= 128 { 0 } else { value >> shift }
        };
        match (self.network, canonical(addr)) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                masked(u128::from(u32::from(net)), 32) == masked(u128::from(u32::from(a)), 32)
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                masked(u128::from(net), 128) == masked(u128::from(a), 128)
            }
            _ => false,
        }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// The client's address: the peer's, or from `X-Forwarded-For` when the peer is trusted.
pub fn client_addr(peer: IpAddr, headers: &HeaderMap, trusted: &[Cidr]) -> IpAddr {
    let peer = canonical(peer);
    let is_trusted = |a: IpAddr| trusted.iter().any(|c| c.contains(a));
    if !is_trusted(peer) {
        return peer;
    }
    let forwarded = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    for entry in forwarded.iter().rev() {
        match entry.parse::<IpAddr>() {
            Ok(addr) if is_trusted(canonical(addr)) => continue,
            Ok(addr) => return canonical(addr),
            // Garbage in the chain: nothing before it can be believed.
            Err(_) => break,
        }
    }
    peer
}

/// Sockets held per client address on this gateway.
#[derive(Debug, Default)]
pub struct AddressSlots {
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One socket's place in its address's count, given back when dropped.
#[derive(Debug)]
pub struct AddressSlot {
    slots: Arc<AddressSlots>,
    addr: IpAddr,
}

impl AddressSlots {
    /// A slot for `addr`, unless it already holds `max`.
    pub fn take(self: &Arc<Self>, addr: IpAddr, max: usize) -> Option<AddressSlot> {
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = held.entry(addr).or_default();
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            slots: Arc::clone(self),
            addr,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut held = self
            .slots
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = held.get_mut(&self.addr) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.addr);
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
    fn blocks_parse_and_match() {
        let lan: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(lan.contains(ip("10.1.2.3")));
        assert!(!lan.contains(ip("11.0.0.1")));
        assert!(lan.contains(ip("::ffff:10.9.9.9")), "IPv4-mapped");
        let one: Cidr = "192.168.1.5".parse().unwrap();
        assert!(one.contains(ip("192.168.1.5")) && !one.contains(ip("192.168.1.6")));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")));
        for bad in ["10.0.0.0/33", "nonsense", "10.0.0/8", "::/129"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_addresses_count_only_behind_trusted_proxies() {
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            "6.6.6.6, 1.2.3.4, 10.0.0.7".parse().unwrap(),
        );
        // From the proxy: the last untrusted entry (what the proxy chain saw).
        assert_eq!(
            client_addr(ip("10.0.0.2"), &headers, &trusted),
            ip("1.2.3.4")
        );
        // From anyone else the header is the client's own claim: ignored.
        assert_eq!(
            client_addr(ip("5.5.5.5"), &headers, &trusted),
            ip("5.5.5.5")
        );
        headers.insert("x-forwarded-for", "1.2.3.4, garbage".parse().unwrap());
        assert_eq!(
            client_addr(ip("10.0.0.2"), &headers, &trusted),
            ip("10.0.0.2")
        );
        assert_eq!(
            client_addr(ip("10.0.0.2"), &HeaderMap::new(), &trusted),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn an_address_holds_at_most_its_slots() {
        let slots = Arc::new(AddressSlots::default());
        let a = slots.take(ip("1.1.1.1"), 2).unwrap();
        let _b = slots.take(ip("1.1.1.1"), 2).unwrap();
        assert!(slots.take(ip("1.1.1.1"), 2).is_none());
        assert!(slots.take(ip("2.2.2.2"), 2).is_some(), "per address");
        drop(a);
        assert!(slots.take(ip("1.1.1.1"), 2).is_some());
    }
}

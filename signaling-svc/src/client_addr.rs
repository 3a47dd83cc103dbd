//! Who a socket comes from, and how many sockets each client address holds.
//!
//! The client address is the TCP peer, unless the peer is a trusted proxy
//! (`--trusted-proxies`): then it is the address the outermost of the `--trusted-proxy-hops`
//! proxies in front saw, the entry that many places from the end of `X-Forwarded-For` (each
//! proxy appends the address it saw, so only the entries the trusted chain added can be
//! believed; the ones before them are whatever the client wrote). Counting hops rather than
//! skipping trusted addresses means a client whose own address is private (a venue over a
//! VPN, a pod) is counted as itself, and cannot pick an address by writing one. Each address may
//! hold `--max-sockets-per-address` sockets on this gateway, or what its allowance
//! (`--source-allowances`) says; one source is an IPv4 address or an IPv6 /64
//! ([`talkgroup_common::source`]).

use std::net::IpAddr;
use std::str::FromStr;

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

/// The client's address: the peer's, or from `X-Forwarded-For` when the peer is trusted:
/// the entry `hops` places from its end (`hops` trusted proxies in front appended one each).
/// A header with fewer entries, or garbage there, leaves the peer's address.
pub fn client_addr(peer: IpAddr, headers: &HeaderMap, trusted: &[Cidr], hops: usize) -> IpAddr {
    let peer = canonical(peer);
    if hops == 0 || !is_trusted(peer, trusted) {
        return peer;
    }
    let forwarded = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    forwarded
        .len()
        .checked_sub(hops)
        .and_then(|at| forwarded[at].parse::<IpAddr>().ok())
        .map_or(peer, canonical)
}

/// A larger budget for one block of client addresses: `CIDR=N` (a venue's or an office's
/// NAT address, where hundreds of staff share one address). Written `198.51.100.7=1000` or
/// `203.0.113.0/24=600`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    pub block: Cidr,
    pub max: usize,
}

impl FromStr for Allowance {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (block, max) = text
            .split_once('=')
            .ok_or_else(|| format!("{text:?} is not CIDR=N"))?;
        let max = max
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=100_000).contains(n))
            .ok_or_else(|| format!("{text:?}: N must be 1 to 100000"))?;
        Ok(Self {
            block: block.parse()?,
            max,
        })
    }
}

/// What one client address may hold: the first allowance whose block holds it, else
/// `default`.
pub fn budget_for(addr: IpAddr, allowances: &[Allowance], default: usize) -> usize {
    allowances
        .iter()
        .find(|a| a.block.contains(addr))
        .map_or(default, |a| a.max)
}

/// Whether `peer` is one of the trusted proxies.
pub fn is_trusted(peer: IpAddr, trusted: &[Cidr]) -> bool {
    trusted.iter().any(|c| c.contains(peer))
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
            "6.6.6.6, 10.9.9.9, 10.0.0.7".parse().unwrap(),
        );
        // From the proxy: the address the outermost trusted hop saw, private or not.
        assert_eq!(
            client_addr(ip("10.0.0.2"), &headers, &trusted, 1),
            ip("10.0.0.7")
        );
        assert_eq!(
            client_addr(ip("10.0.0.2"), &headers, &trusted, 2),
            ip("10.9.9.9")
        );
        // No hops configured, or from anyone else: the header is the client's own claim.
        assert_eq!(
            client_addr(ip("10.0.0.2"), &headers, &trusted, 0),
            ip("10.0.0.2")
        );
        assert_eq!(
            client_addr(ip("5.5.5.5"), &headers, &trusted, 1),
            ip("5.5.5.5")
        );
        // Fewer entries than hops, garbage, or no header: the peer.
        assert_eq!(
            client_addr(ip("10.0.0.2"), &headers, &trusted, 4),
            ip("10.0.0.2")
        );
        headers.insert("x-forwarded-for", "1.2.3.4, garbage".parse().unwrap());
        assert_eq!(
            client_addr(ip("10.0.0.2"), &headers, &trusted, 1),
            ip("10.0.0.2")
        );
        assert_eq!(
            client_addr(ip("10.0.0.2"), &HeaderMap::new(), &trusted, 1),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn allowances_give_a_block_its_own_budget() {
        let allowances: Vec<Allowance> = vec![
            "198.51.100.7=1000".parse().unwrap(),
            "10.0.0.0/8=600".parse().unwrap(),
        ];
        assert_eq!(budget_for(ip("198.51.100.7"), &allowances, 100), 1000);
        assert_eq!(budget_for(ip("10.2.3.4"), &allowances, 100), 600);
        assert_eq!(budget_for(ip("203.0.113.1"), &allowances, 100), 100);
        for bad in [
            "10.0.0.0/8",
            "10.0.0.0/8=0",
            "10.0.0.0/8=x",
            "nonsense=5",
            "1.2.3.4=100001",
        ] {
            assert!(bad.parse::<Allowance>().is_err(), "{bad}");
        }
    }
}

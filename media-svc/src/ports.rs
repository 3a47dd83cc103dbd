//! UDP ports for peer connections, taken from a configured range (the WebRTC library has no
//! port range of its own). With an empty range the OS picks ephemeral ports.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Mutex;

#[derive(Debug)]
pub struct PortPool {
    ip: IpAddr,
    range: Option<(u16, u16)>,
    in_use: Mutex<BTreeSet<u16>>,
}

impl PortPool {
    /// `range`: inclusive; `None` for ephemeral ports.
    pub fn new(ip: IpAddr, range: Option<(u16, u16)>) -> Self {
        Self {
            ip,
            range,
            in_use: Mutex::new(BTreeSet::new()),
        }
    }

    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// Ports of the range currently handed out.
    pub fn in_use(&self) -> usize {
        self.in_use.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Takes a free port of the range (one nothing else on the host has bound either), or an
    /// ephemeral address when there is no range. `None` when the range is exhausted.
    pub fn take(&self) -> Option<SocketAddr> {
        let Some((lo, hi)) = self.range else {
            return Some(SocketAddr::new(self.ip, 0));
        };
        let mut in_use = self
            .in_use
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let start = lo + (rand::random::<u16>() % (hi - lo + 1));
        for port in (start..=hi).chain(lo..start) {
            if in_use.contains(&port) {
                continue;
            }
            // Skip ports another process holds.
            if UdpSocket::bind((self.ip, port)).is_ok() {
                in_use.insert(port);
                return Some(SocketAddr::new(self.ip, port));
            }
        }
        None
    }

    pub fn release(&self, addr: SocketAddr) {
        if self.range.is_some() {
            let mut in_use = self
                .in_use
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            in_use.remove(&addr.port());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_from_the_range_and_return() {
        let pool = PortPool::new("127.0.0.1".parse().unwrap(), Some((45_100, 45_102)));
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        let c = pool.take().unwrap();
        assert!(pool.take().is_none(), "range exhausted");
        for addr in [a, b, c] {
            assert!((45_100..=45_102).contains(&addr.port()));
        }
        pool.release(b);
        assert_eq!(pool.take().unwrap().port(), b.port());
        assert_eq!(pool.in_use(), 3);
    }
}

//! The node's shared media ports: one UDP port for every transport of the node, served by one
//! socket per worker bound to it with `SO_REUSEPORT`, and what tells the transports apart.
//!
//! The kernel spreads datagrams over the workers' sockets by the sender's address, not by which
//! worker owns the transport, so a datagram is first looked up in the node's [`Demux`]: a known
//! path (an address that passed a check) names its transport, and the datagram goes to the
//! worker owning it (directly, or through that worker's inbound queue). An unknown address must
//! open with a STUN binding request naming a transport's username fragment and signed with its
//! password; anything else from it is dropped and counted by [`Drop`] cause, before any
//! transport sees it.
//!
//! Sends never wait: a worker's forwarded copies leave in batches of up to [`BATCH`] datagrams
//! per `sendmmsg` call; a full send buffer loses the copy (counted by the caller).
//!
//! ICE over TCP (RFC 6544) shares one TCP port the same way: each worker accepts on its own
//! listener bound to it, and a connection carries datagrams framed by a 16-bit length (RFC
//! 4571). Its first frame must be a check that opens a path, as a first UDP datagram must;
//! frames go to the owning worker like UDP datagrams, and what a transport sends on a TCP path
//! goes to the connection's writer through a bounded queue (a full one loses the datagram).

use std::collections::HashMap;
use std::io::IoSlice;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nix::errno::Errno;
use nix::sys::socket::{
    self as sock, AddressFamily, MsgFlags, MultiHeaders, SockFlag, SockProtocol, SockType,
    SockaddrStorage, sockopt,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::engine::stun::{self, Verifier};
use crate::engine::{EngineError, Path};

/// Datagrams per `sendmmsg` call.
pub(super) const BATCH: usize = 64;
/// Paths remembered per transport: a client's NAT rebinding or its move to another candidate
/// adds one; the oldest is forgotten past this.
const MAX_PATHS_PER_TRANSPORT: usize = 8;
/// Send and receive buffer asked of each shared socket: one socket carries a worker's whole
/// share of a fan-out burst.
const SOCKET_BUFFER: usize = 4 << 20;
/// ICE/TCP connections a node holds at once; past this, new ones are closed at accept.
pub const MAX_TCP_CONNECTIONS: usize = 8192;
/// ICE/TCP connections one source (an IPv4 address, an IPv6 /64) may hold before their first
/// valid check: each may wait [`FIRST_CHECK_TIMEOUT`] for it, and one host must not hold the
/// node's whole budget that way. A client sends its check as soon as it connects, so even a
/// venue behind one address holds few at a time; connections with a path are not counted.
pub const MAX_UNCHECKED_TCP_PER_SOURCE: usize = 32;
/// Largest RFC 4571 frame accepted; a longer one closes the connection.
const MAX_FRAME: usize = 4096;
/// A TCP connection must open a path (send a valid check) this soon after it is accepted.
const FIRST_CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// Datagrams queued for one TCP connection's writer.
const TCP_QUEUE: usize = 512;
/// A TCP client that does not take a write in this long is cut off.
const TCP_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a datagram was dropped before reaching a transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// From an unknown address and not a STUN check (RTP, RTCP, noise).
    UnknownAddress,
    /// DTLS from an address no check opened.
    DtlsUnchecked,
    /// A STUN check naming no transport of the node.
    UnknownUfrag,
    /// A STUN check for a transport, not signed with its password.
    BadIntegrity,
    /// RTP with an SSRC the transport does not receive.
    UnknownSsrc,
    /// The owning worker's inbound queue was full.
    QueueFull,
    /// An ICE/TCP connection past the node's limit, closed at accept.
    TcpLimit,
    /// An ICE/TCP connection past its source's budget of connections without a check, closed
    /// at accept.
    TcpSourceLimit,
    /// An ICE/TCP frame longer than the node accepts; the connection is closed.
    OversizedFrame,
}

impl Drop {
    pub const ALL: [Drop; 9] = [
        Drop::UnknownAddress,
        Drop::DtlsUnchecked,
        Drop::UnknownUfrag,
        Drop::BadIntegrity,
        Drop::UnknownSsrc,
        Drop::QueueFull,
        Drop::TcpLimit,
        Drop::TcpSourceLimit,
        Drop::OversizedFrame,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Drop::UnknownAddress => "unknown_address",
            Drop::DtlsUnchecked => "dtls_unchecked",
            Drop::UnknownUfrag => "unknown_ufrag",
            Drop::BadIntegrity => "bad_integrity",
            Drop::UnknownSsrc => "unknown_ssrc",
            Drop::QueueFull => "queue_full",
            Drop::TcpLimit => "tcp_limit",
            Drop::TcpSourceLimit => "tcp_source_limit",
            Drop::OversizedFrame => "oversized_frame",
        }
    }
}

#[derive(Debug)]
struct Credentials {
    key: u64,
    pwd: String,
}

#[derive(Debug, Default)]
struct Tables {
    ufrags: HashMap<String, Credentials>,
    paths: HashMap<Path, u64>,
    /// Each transport's fragments (the current one last; an ICE restart adds one) and paths,
    /// to forget them when it closes.
    by_key: HashMap<u64, (Vec<String>, Vec<Path>)>,
    /// The writer of each open ICE/TCP path; dropping it closes the connection.
    tcp: HashMap<SocketAddr, mpsc::Sender<Bytes>>,
}

impl Tables {
    /// Forgets `path` as a way to `key` (and closes it, if a TCP connection).
    fn forget(&mut self, path: Path, key: u64) {
        if self.paths.get(&path) == Some(&key) {
            self.paths.remove(&path);
            if path.proto == crate::engine::Proto::Tcp {
                self.tcp.remove(&path.remote);
            }
        }
    }
}

/// Which transport a datagram is for, shared by all workers of the node.
#[derive(Debug)]
pub struct Demux {
    tables: RwLock<Tables>,
    verifier: Verifier,
    drops: [AtomicU64; Drop::ALL.len()],
    tcp_connections: AtomicUsize,
    /// ICE/TCP connections without a valid check yet, per source.
    unchecked_tcp: std::sync::Arc<talkgroup_common::source::SourceBudget>,
}

impl Demux {
    pub fn new() -> Result<Self, EngineError> {
        Ok(Self {
            tables: RwLock::new(Tables::default()),
            verifier: Verifier::new()?,
            drops: Default::default(),
            tcp_connections: AtomicUsize::new(0),
            unchecked_tcp: std::sync::Arc::default(),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Tables> {
        self.tables
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Tables> {
        self.tables
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A new transport's credentials: checks naming `ufrag` and signed with `pwd` open paths
    /// to `key`.
    pub(super) fn register(&self, key: u64, ufrag: &str, pwd: &str) {
        let mut t = self.write();
        t.ufrags.insert(
            ufrag.to_owned(),
            Credentials {
                key,
                pwd: pwd.to_owned(),
            },
        );
        t.by_key.insert(key, (vec![ufrag.to_owned()], Vec::new()));
    }

    /// A transport's new credentials after an ICE restart: checks with them open paths too,
    /// and those with the ones before stay valid until the transport stops using them (only
    /// the two latest are kept).
    pub(super) fn renew(&self, key: u64, ufrag: &str, pwd: &str) {
        let mut t = self.write();
        let Some((ufrags, _)) = t.by_key.get_mut(&key) else {
            return;
        };
        ufrags.push(ufrag.to_owned());
        let dropped: Vec<String> = if ufrags.len() > 2 {
            ufrags.drain(..ufrags.len() - 2).collect()
        } else {
            Vec::new()
        };
        for old in dropped {
            t.ufrags.remove(&old);
        }
        t.ufrags.insert(
            ufrag.to_owned(),
            Credentials {
                key,
                pwd: pwd.to_owned(),
            },
        );
    }

    /// Forgets a closed transport's fragment and paths.
    pub(super) fn unregister(&self, key: u64) {
        let mut t = self.write();
        if let Some((ufrags, paths)) = t.by_key.remove(&key) {
            for ufrag in ufrags {
                t.ufrags.remove(&ufrag);
            }
            for path in paths {
                t.forget(path, key);
            }
        }
    }

    /// The transport a known path leads to.
    pub(super) fn lookup(&self, path: &Path) -> Option<u64> {
        self.read().paths.get(path).copied()
    }

    /// Admits a datagram from an unknown path: a check naming a transport and signed with its
    /// password opens the path to that transport. `Err` says why it was dropped.
    pub(super) fn admit(&self, data: &[u8], path: Path) -> Result<u64, Drop> {
        let class = match data.first() {
            Some(0..=3) => {
                let mut contact = stun::first_contact(data).ok_or(Drop::UnknownAddress)?;
                let (key, pwd) = {
                    let t = self.read();
                    let c = t
                        .ufrags
                        .get(&contact.local_ufrag)
                        .ok_or(Drop::UnknownUfrag)?;
                    (c.key, c.pwd.clone())
                };
                if !self.verifier.authentic(&mut contact, &pwd) {
                    return Err(Drop::BadIntegrity);
                }
                Ok(key)
            }
            Some(20..=63) => Err(Drop::DtlsUnchecked),
            _ => Err(Drop::UnknownAddress),
        };
        let key = class?;
        let mut t = self.write();
        let Some((_, paths)) = t.by_key.get_mut(&key) else {
            // Closed meanwhile.
            return Err(Drop::UnknownUfrag);
        };
        let evicted = if paths.len() >= MAX_PATHS_PER_TRANSPORT {
            Some(paths.remove(0))
        } else {
            None
        };
        paths.push(path);
        if let Some(old) = evicted {
            t.forget(old, key);
        }
        // The path may have led to another transport before (a client reusing its socket, or
        // a NAT handing the port to another client): the latest valid check wins.
        if let Some(previous) = t.paths.insert(path, key)
            && previous != key
            && let Some((_, list)) = t.by_key.get_mut(&previous)
        {
            list.retain(|p| *p != path);
        }
        Ok(key)
    }

    pub(super) fn count(&self, cause: Drop) {
        if let Some(i) = Drop::ALL.iter().position(|c| *c == cause) {
            self.drops[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Datagrams dropped so far, by cause.
    pub fn drops(&self) -> Vec<(Drop, u64)> {
        Drop::ALL
            .iter()
            .zip(&self.drops)
            .map(|(c, n)| (*c, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Paths known, for tests and stats.
    pub fn path_count(&self) -> usize {
        self.read().paths.len()
    }

    /// ICE/TCP connections open.
    pub fn tcp_connections(&self) -> usize {
        self.tcp_connections.load(Ordering::Relaxed)
    }

    /// Queues a datagram for the ICE/TCP connection of `remote`; false if there is none or its
    /// queue is full.
    pub(super) fn send_tcp(&self, data: BytesMut, remote: SocketAddr) -> bool {
        let t = self.read();
        t.tcp
            .get(&remote)
            .is_some_and(|writer| writer.try_send(data.freeze()).is_ok())
    }
}

/// Serves one accepted ICE/TCP connection until its transport closes, the client goes, or it
/// misbehaves. `deliver` hands each frame (with its transport's key) to the owning worker.
pub(super) async fn serve_tcp(
    mut stream: tokio::net::TcpStream,
    remote: SocketAddr,
    demux: std::sync::Arc<Demux>,
    mut deliver: impl FnMut(u64, BytesMut, Instant),
) {
    if demux.tcp_connections.fetch_add(1, Ordering::AcqRel) >= MAX_TCP_CONNECTIONS {
        demux.tcp_connections.fetch_sub(1, Ordering::AcqRel);
        demux.count(Drop::TcpLimit);
        return;
    }
    let Some(slot) = demux
        .unchecked_tcp
        .take(remote.ip(), MAX_UNCHECKED_TCP_PER_SOURCE)
    else {
        demux.tcp_connections.fetch_sub(1, Ordering::AcqRel);
        demux.count(Drop::TcpSourceLimit);
        return;
    };
    // Given back at the first valid check: from then on the path bounds the connection.
    let mut unchecked = Some(slot);
    let _ = stream.set_nodelay(true);
    let path = Path::tcp(remote);
    let (writer, mut queue) = mpsc::channel::<Bytes>(TCP_QUEUE);
    // Held until the first check opens the path; then the demultiplexer holds it, and dropping
    // it there (the transport closed) ends this connection.
    let mut writer = Some(writer);
    let mut key = None;
    let mut buf = BytesMut::with_capacity(MAX_FRAME + 2);
    let mut out = Vec::with_capacity(4096);
    let first_check = tokio::time::sleep(FIRST_CHECK_TIMEOUT);
    tokio::pin!(first_check);
    'serve: loop {
        tokio::select! {
            biased;
            frame = queue.recv() => {
                let Some(frame) = frame else { break };
                out.clear();
                push_frame(&mut out, &frame);
                // Coalesce what else is queued into the same write.
                while out.len() < 64 * 1024 {
                    match queue.try_recv() {
                        Ok(more) => push_frame(&mut out, &more),
                        Err(_) => break,
                    }
                }
                match tokio::time::timeout(TCP_WRITE_TIMEOUT, stream.write_all(&out)).await {
                    Ok(Ok(())) => {}
                    _ => break,
                }
            }
            read = stream.read_buf(&mut buf) => {
                match read {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                while buf.len() >= 2 {
                    let len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
                    if len > MAX_FRAME {
                        demux.count(Drop::OversizedFrame);
                        break 'serve;
                    }
                    if buf.len() < 2 + len {
                        break;
                    }
                    let mut frame = buf.split_to(2 + len);
                    let frame = frame.split_off(2);
                    let at = Instant::now();
                    let k = match key {
                        Some(k) => k,
                        None => match demux.admit(&frame, path) {
                            Ok(k) => {
                                if let Some(w) = writer.take() {
                                    demux.write().tcp.insert(remote, w);
                                }
                                drop(unchecked.take());
                                key = Some(k);
                                k
                            }
                            Err(cause) => {
                                demux.count(cause);
                                break 'serve;
                            }
                        },
                    };
                    deliver(k, frame, at);
                }
                buf.reserve(MAX_FRAME + 2);
            }
            () = &mut first_check, if key.is_none() => break,
        }
        // The path was taken over by another transport's check, or forgotten: done.
        if key.is_some() && demux.lookup(&path) != key {
            break;
        }
    }
    {
        let mut t = demux.write();
        // This connection owns its remote address while it lives, whatever became of the path.
        t.tcp.remove(&remote);
        if let Some(k) = key {
            t.forget(path, k);
            if let Some((_, paths)) = t.by_key.get_mut(&k) {
                paths.retain(|p| *p != path);
            }
        }
    }
    demux.tcp_connections.fetch_sub(1, Ordering::AcqRel);
}

fn push_frame(out: &mut Vec<u8>, frame: &[u8]) {
    let len = u16::try_from(frame.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&frame[..usize::from(len)]);
}

/// Binds `count` TCP listeners to one address with `SO_REUSEPORT`, as [`bind_shared`] does
/// for UDP; the listeners and the bound address.
pub(super) fn listen_shared(
    addr: SocketAddr,
    count: usize,
) -> Result<(Vec<TcpListener>, SocketAddr), EngineError> {
    bind_group(
        addr,
        count,
        "ICE/TCP port",
        |a| TcpListener::bind(a).map(drop),
        |a| {
            let fd = reuse_port_socket(a, SockType::Stream, SockProtocol::Tcp)?;
            sock::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
            sock::bind(fd.as_raw_fd(), &SockaddrStorage::from(a))?;
            sock::listen(&fd, sock::Backlog::MAXCONN)?;
            Ok(TcpListener::from(fd))
        },
        TcpListener::local_addr,
    )
}

/// Binds `count` UDP sockets to one address with `SO_REUSEPORT` (port 0: the first picks an
/// ephemeral port and the others join it); the sockets and the bound address.
pub(super) fn bind_shared(
    addr: SocketAddr,
    count: usize,
) -> Result<(Vec<UdpSocket>, SocketAddr), EngineError> {
    bind_group(
        addr,
        count,
        "media port",
        |a| UdpSocket::bind(a).map(drop),
        |a| {
            let fd = reuse_port_socket(a, SockType::Datagram, SockProtocol::Udp)?;
            set_buffers(&fd);
            if a.is_ipv4() {
                dont_fragment(&fd)?;
            }
            sock::bind(fd.as_raw_fd(), &SockaddrStorage::from(a))?;
            Ok(UdpSocket::from(fd))
        },
        UdpSocket::local_addr,
    )
}

/// Binds a group of `count` sockets sharing one port: `bind_one` makes each (bound to the
/// first one's address once port 0 became a real port), `local` reads where it is bound.
fn bind_group<S>(
    addr: SocketAddr,
    count: usize,
    what: &str,
    plain_bind: impl Fn(SocketAddr) -> std::io::Result<()>,
    bind_one: impl Fn(SocketAddr) -> Result<S, Errno>,
    local: impl Fn(&S) -> std::io::Result<SocketAddr>,
) -> Result<(Vec<S>, SocketAddr), EngineError> {
    // `SO_REUSEPORT` would let this node join a group another process of the same user holds
    // on a fixed port, each then getting part of the other's traffic: a fixed port must be
    // free, which a plain bind proves.
    if addr.port() != 0 {
        plain_bind(addr)
            .map_err(|e| EngineError::Setup(format!("{what} {addr} is not free: {e}")))?;
    }
    let mut sockets = Vec::with_capacity(count);
    let mut bound = addr;
    for _ in 0..count.max(1) {
        let socket =
            bind_one(bound).map_err(|e| EngineError::Setup(format!("bind {bound}: {e}")))?;
        bound = local(&socket).map_err(|e| EngineError::Setup(e.to_string()))?;
        sockets.push(socket);
    }
    Ok((sockets, bound))
}

/// A non-blocking socket for `addr`'s family with `SO_REUSEPORT` set, not yet bound.
fn reuse_port_socket(
    addr: SocketAddr,
    kind: SockType,
    protocol: SockProtocol,
) -> Result<OwnedFd, Errno> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = sock::socket(
        family,
        kind,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        protocol,
    )?;
    sock::setsockopt(&fd, sockopt::ReusePort, &true)?;
    Ok(fd)
}

/// Asks for large socket buffers: past `net.core.wmem_max` only with `CAP_NET_ADMIN`
/// (`SO_SNDBUFFORCE`), otherwise capped by the kernel.
fn set_buffers(fd: &OwnedFd) {
    if sock::setsockopt(fd, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let _ = sock::setsockopt(fd, sockopt::SndBuf, &SOCKET_BUFFER);
    }
    if sock::setsockopt(fd, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        let _ = sock::setsockopt(fd, sockopt::RcvBuf, &SOCKET_BUFFER);
    }
}

/// Sends with the don't-fragment bit and without path MTU discovery (`IP_PMTUDISC_PROBE`, as
/// `quinn-udp` sets for QUIC): media datagrams are a few hundred bytes at most, so they never
/// need fragmenting, and an IPv4 datagram that may not be fragmented needs no IP
/// identification, which the kernel otherwise draws from a shared, hashed counter for every
/// datagram of an unconnected socket (about 1% of a forwarded copy's cost).
fn dont_fragment(fd: &OwnedFd) -> Result<(), Errno> {
    use rustix::net::sockopt::{Ipv4PathMtuDiscovery, set_ip_mtu_discover};
    set_ip_mtu_discover(fd, Ipv4PathMtuDiscovery::PROBE)
        .map_err(|e| Errno::from_raw(e.raw_os_error()))
}

/// The effective send buffer of a socket, in bytes.
pub(super) fn send_buffer(socket: &UdpSocket) -> usize {
    sock::getsockopt(socket, sockopt::SndBuf).unwrap_or(0)
}

/// Room for one datagram in a batch: the largest received datagram with a longer RTP header
/// and the SRTP tag on top.
pub(super) const SLOT: usize = super::MAX_DATAGRAM + 64;

/// One worker's batched sender on its shared socket. Copies are sealed straight into one
/// buffer, one after the other, so a batch costs no allocation and its datagrams share cache
/// lines.
pub(super) struct Batch {
    headers: MultiHeaders<SockaddrStorage>,
    buf: Vec<u8>,
    /// Where each queued datagram ends in `buf`.
    ends: Vec<usize>,
    addrs: Vec<Option<SockaddrStorage>>,
}

impl Batch {
    pub(super) fn new() -> Self {
        Self {
            headers: MultiHeaders::preallocate(BATCH, None),
            buf: vec![0; BATCH * SLOT],
            ends: Vec::with_capacity(BATCH),
            addrs: Vec::with_capacity(BATCH),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.ends.len()
    }

    /// Where the next datagram goes: [`SLOT`] bytes, or none when [`BATCH`] are queued (the
    /// caller flushes before that).
    pub(super) fn space(&mut self) -> &mut [u8] {
        let start = self.ends.last().copied().unwrap_or(0);
        match self.ends.len() < BATCH {
            true => &mut self.buf[start..start + SLOT],
            false => &mut [],
        }
    }

    /// Queues the `len` bytes written at the start of [`Batch::space`], for `to`.
    pub(super) fn commit(&mut self, len: usize, to: SocketAddr) {
        let start = self.ends.last().copied().unwrap_or(0);
        debug_assert!(len <= SLOT && self.ends.len() < BATCH);
        self.ends.push(start + len.min(SLOT));
        self.addrs.push(Some(SockaddrStorage::from(to)));
    }

    /// Queues a copy of `data`; false if it does not fit.
    #[cfg(test)]
    pub(super) fn push(&mut self, data: &[u8], to: SocketAddr) -> bool {
        match self.space().get_mut(..data.len()) {
            Some(space) => {
                space.copy_from_slice(data);
                self.commit(data.len(), to);
                true
            }
            None => false,
        }
    }

    /// Sends what is queued in as few calls as the kernel takes; how many were lost. A
    /// datagram the kernel refuses (an address it cannot reach, a firewall) is skipped; a full
    /// send buffer loses the rest of the batch rather than waiting.
    pub(super) fn flush(&mut self, socket: &UdpSocket) -> usize {
        let fd = socket.as_raw_fd();
        let total = self.ends.len();
        let mut start_at = 0;
        let slices: Vec<[IoSlice<'_>; 1]> = self
            .ends
            .iter()
            .map(|&end| {
                let slice = [IoSlice::new(&self.buf[start_at..end])];
                start_at = end;
                slice
            })
            .collect();
        let mut lost = 0;
        let mut start = 0;
        while start < total {
            match sock::sendmmsg(
                fd,
                &mut self.headers,
                &slices[start..],
                &self.addrs[start..],
                [],
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(results) => {
                    let sent = results.count();
                    if sent == 0 {
                        lost += total - start;
                        break;
                    }
                    start += sent;
                }
                Err(Errno::EAGAIN | Errno::ENOBUFS) => {
                    lost += total - start;
                    break;
                }
                Err(_) => {
                    lost += 1;
                    start += 1;
                }
            }
        }
        drop(slices);
        self.ends.clear();
        self.addrs.clear();
        lost
    }
}

/// Sends one datagram at once, without waiting; false if the socket refused it.
pub(super) fn send_one(socket: &UdpSocket, data: &[u8], to: SocketAddr) -> bool {
    socket.send_to(data, to).is_ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A binding request naming `ufrag`, signed with `pwd`, as a client's first check.
    pub(crate) fn signed_check(ufrag: &str, pwd: &str) -> Vec<u8> {
        use rtc::stun::fingerprint::FINGERPRINT;
        use rtc::stun::integrity::MessageIntegrity;
        use rtc::stun::message::{BINDING_REQUEST, Message, Setter, TransactionId};
        use rtc::stun::textattrs::Username;
        let crypto = rtc::crypto::default_provider().unwrap();
        let mut m = Message::new();
        m.build(&[
            Box::new(BINDING_REQUEST) as Box<dyn Setter>,
            Box::new(TransactionId::new()),
            Box::new(Username::new(
                rtc::stun::attributes::ATTR_USERNAME,
                format!("{ufrag}:client"),
            )),
            Box::new(MessageIntegrity::new_short_term_integrity_with_provider(
                pwd.to_owned(),
                crypto.crypto(),
            )),
            Box::new(FINGERPRINT),
        ])
        .unwrap();
        m.raw.clone()
    }

    #[test]
    fn every_worker_socket_shares_one_port_and_a_batch_reaches_every_destination() {
        let (sockets, bound) = bind_shared("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        assert_eq!(sockets.len(), 3);
        for s in &sockets {
            assert_eq!(s.local_addr().unwrap(), bound);
        }
        let receivers: Vec<UdpSocket> = (0..100)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        for s in &sockets {
            let mode = rustix::net::sockopt::ip_mtu_discover(s).unwrap();
            assert_eq!(mode, rustix::net::sockopt::Ipv4PathMtuDiscovery::PROBE);
        }
        let mut batch = Batch::new();
        for (i, r) in receivers.iter().enumerate() {
            assert!(batch.push(&[i as u8; 20], r.local_addr().unwrap()));
            if batch.len() == BATCH {
                assert_eq!(batch.flush(&sockets[0]), 0);
            }
        }
        assert_eq!(batch.flush(&sockets[0]), 0);
        for (i, r) in receivers.iter().enumerate() {
            let mut buf = [0u8; 64];
            r.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            let (n, from) = r.recv_from(&mut buf).unwrap();
            assert_eq!(from, bound, "sent from the shared port");
            assert_eq!(&buf[..n], &[i as u8; 20][..]);
        }
    }

    #[test]
    fn a_fixed_port_another_socket_holds_is_refused() {
        let (_held, bound) = bind_shared("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let error = bind_shared(bound, 2).unwrap_err();
        assert!(error.to_string().contains("not free"), "{error}");
    }

    #[test]
    fn only_a_signed_check_opens_a_path_and_closing_forgets_it() {
        let demux = Demux::new().unwrap();
        demux.register(7, "nodeufrag", "nodepassword0123456789");
        let from = Path::udp("127.0.0.1:5000".parse().unwrap());
        // Noise, DTLS and RTP from an unknown address are refused by cause.
        assert_eq!(demux.admit(&[1, 2, 3], from), Err(Drop::UnknownAddress));
        assert_eq!(
            demux.admit(&[22, 254, 253, 0], from),
            Err(Drop::DtlsUnchecked)
        );
        assert_eq!(
            demux.admit(&[0x80, 111, 0, 1], from),
            Err(Drop::UnknownAddress)
        );
        assert_eq!(
            demux.admit(&signed_check("other", "nodepassword0123456789"), from),
            Err(Drop::UnknownUfrag)
        );
        assert_eq!(
            demux.admit(&signed_check("nodeufrag", "wrongpassword012345678"), from),
            Err(Drop::BadIntegrity)
        );
        assert_eq!(demux.lookup(&from), None);
        assert_eq!(
            demux.admit(&signed_check("nodeufrag", "nodepassword0123456789"), from),
            Ok(7)
        );
        assert_eq!(demux.lookup(&from), Some(7));
        // The same address over TCP is another path.
        assert_eq!(demux.lookup(&Path::tcp(from.remote)), None);
        demux.unregister(7);
        assert_eq!(demux.lookup(&from), None);
        assert_eq!(demux.path_count(), 0);
    }

    #[test]
    fn a_transport_keeps_a_bounded_number_of_paths_and_the_latest_check_wins_a_path() {
        let demux = Demux::new().unwrap();
        demux.register(1, "one", "password-one-0123456789");
        demux.register(2, "two", "password-two-0123456789");
        let path = |port: u16| Path::udp(SocketAddr::from(([127, 0, 0, 1], port)));
        for port in 6000..6020 {
            let check = signed_check("one", "password-one-0123456789");
            assert_eq!(demux.admit(&check, path(port)), Ok(1));
        }
        assert_eq!(demux.path_count(), MAX_PATHS_PER_TRANSPORT);
        assert_eq!(demux.lookup(&path(6000)), None, "the oldest is forgotten");
        assert_eq!(demux.lookup(&path(6019)), Some(1));
        // Another transport's valid check from the same address takes the path over.
        let check = signed_check("two", "password-two-0123456789");
        assert_eq!(demux.admit(&check, path(6019)), Ok(2));
        assert_eq!(demux.lookup(&path(6019)), Some(2));
        demux.unregister(1);
        assert_eq!(
            demux.lookup(&path(6019)),
            Some(2),
            "closing one leaves the other's"
        );
        assert_eq!(demux.path_count(), 1);
    }
}

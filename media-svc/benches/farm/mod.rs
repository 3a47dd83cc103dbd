//! Listeners for the forwarding benchmark that cost the node's machine as little as a WebRTC
//! receiver can: sans-IO `rtc` peers (ICE, DTLS-SRTP, the same protocol core as the node) all
//! driven by one task each on a single thread of their own.
//!
//! Every datagram that reaches a listener's socket is timestamped at once. RTP is counted from
//! its header, which SRTP leaves in the clear (sequence number, timestamp, marker). A sample of
//! the listeners, the *verifiers*, also hand every RTP datagram to their peer, which checks the
//! SRTP authentication tag and decrypts it; the benchmark reports how many copies verified and
//! fails if any did not. STUN, DTLS and RTCP always go to the peer, so ICE consent, the DTLS
//! session and the node's view of the connection are those of a real client.
//!
//! The farm may live in a network namespace of its own ([`Farm::start`] with one): its sockets
//! are made there, so what the node sends them crosses a veth link, and the namespace's receive
//! path can run in a kernel thread of its own instead of inside the node's send calls (see
//! `testkit::netns::Netns::receive_in_own_thread`).
//!
//! A listener may also connect over ICE/TCP only: its peer gets the node's offer without the
//! UDP candidate and an active TCP candidate of its own, and its datagrams travel framed
//! (RFC 4571) on one TCP connection to the node's shared TCP port.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Buf, BytesMut};
use media_svc::engine::rtc_peer::{host_candidate, opus_media_engine};
use rtc::ice::mdns::MulticastDnsMode;
use rtc::ice::tcp_type::TcpType;
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::event::RTCPeerConnectionEvent;
use rtc::peer_connection::message::{RTCMessage, TaggedRTCMessage};
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::transport::{CandidateConfig, CandidateHostConfig, RTCIceCandidate};
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// One RTP datagram as it arrived.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    pub at: Instant,
    pub sequence_number: u16,
    pub timestamp: u32,
    pub marker: bool,
}

/// What a listener observed; shared between its task and the benchmark.
#[derive(Debug, Default)]
pub struct Ear {
    pub connected: AtomicBool,
    pub failed: AtomicBool,
    arrivals: Mutex<Vec<Arrival>>,
    /// RTP datagrams this listener's peer authenticated and decrypted (verifiers only).
    pub verified: AtomicU64,
    /// RTP datagrams handed to the peer (verifiers only).
    pub checked: AtomicU64,
    /// The listener's own address (its UDP socket, or its end of the TCP connection).
    pub local: std::sync::OnceLock<SocketAddr>,
}

impl Ear {
    pub fn take(&self) -> Vec<Arrival> {
        std::mem::take(&mut *self.arrivals.lock().unwrap())
    }

    pub fn count(&self) -> usize {
        self.arrivals.lock().unwrap().len()
    }
}

/// How a listener's datagrams travel.
enum Link {
    Udp(std::net::UdpSocket),
    /// One ICE/TCP connection to the node's shared TCP port.
    Tcp(std::net::TcpStream),
}

/// A peer with its socket, ready to be driven by the farm.
struct Pending {
    core: RTCPeerConnection,
    link: Link,
    local: SocketAddr,
    ear: Arc<Ear>,
    /// Hands every RTP datagram to the peer to authenticate and decrypt.
    verifier: bool,
}

/// The node's candidate of `network` (`udp` or `tcp`) in an offer.
fn candidate_of(offer: &str, network: &str) -> SocketAddr {
    let fields: Vec<&str> = offer
        .lines()
        .find(|l| l.starts_with("a=candidate:") && l.split(' ').nth(2) == Some(network))
        .expect("candidate")
        .split(' ')
        .collect();
    format!("{}:{}", fields[4], fields[5]).parse().unwrap()
}

/// Answers the node's offer with a receive-only peer on a fresh socket on `ip` (UDP), or on a
/// TCP connection to the node's ICE/TCP port with `tcp`.
fn answer(offer: &str, verifier: bool, tcp: bool, ip: IpAddr) -> (Pending, String) {
    let (link, local, offer) = if tcp {
        let stream = std::net::TcpStream::connect(candidate_of(offer, "tcp")).unwrap();
        stream.set_nodelay(true).unwrap();
        stream.set_nonblocking(true).unwrap();
        let local = stream.local_addr().unwrap();
        let offer: String = offer
            .split_inclusive('\n')
            .filter(|l| !(l.starts_with("a=candidate:") && l.contains(" udp ")))
            .collect();
        (Link::Tcp(stream), local, offer)
    } else {
        let socket = std::net::UdpSocket::bind((ip, 0)).unwrap();
        socket.set_nonblocking(true).unwrap();
        let local = socket.local_addr().unwrap();
        (Link::Udp(socket), local, offer.to_owned())
    };
    let offer = offer.as_str();
    let settings = SettingEngineBuilder::new()
        .with_multicast_dns_mode(MulticastDnsMode::Disabled)
        .build();
    let now = Instant::now();
    let mut core = RTCPeerConnectionBuilder::new()
        .with_setting_engine(settings)
        .with_media_engine(opus_media_engine().unwrap())
        .build(now)
        .unwrap();
    core.set_remote_description(now, RTCSessionDescription::offer(offer.to_owned()).unwrap())
        .unwrap();
    let candidate = if tcp {
        // An active TCP candidate: it connects, so it advertises the discard port (RFC 6544).
        let active = CandidateHostConfig {
            base_config: CandidateConfig {
                network: "tcp".to_owned(),
                address: local.ip().to_string(),
                port: 9,
                component: 1,
                ..Default::default()
            },
            tcp_type: TcpType::Active,
        }
        .new_candidate_host()
        .unwrap();
        RTCIceCandidate::from(&active).to_json().unwrap()
    } else {
        host_candidate(local).unwrap()
    };
    core.add_local_candidate(candidate).unwrap();
    let answer = core.create_answer(None).unwrap();
    core.set_local_description(now, answer).unwrap();
    let sdp = core.local_description().unwrap().sdp;
    let ear = Arc::new(Ear::default());
    let _ = ear.local.set(local);
    (
        Pending {
            core,
            link,
            local,
            ear,
            verifier,
        },
        sdp,
    )
}

/// A listener to make: the node's offer, and where its answer and [`Ear`] go.
struct Job {
    offer: String,
    verifier: bool,
    tcp: bool,
    reply: tokio::sync::oneshot::Sender<(Arc<Ear>, String)>,
}

/// The thread the listeners run on. Dropping it stops them.
pub struct Farm {
    add: mpsc::UnboundedSender<Job>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Farm {
    /// Starts the farm's thread; its listeners' sockets are made on `ip`, inside `netns` when
    /// given (a namespace's file, as `/var/run/netns/<name>`).
    pub fn start(netns: Option<std::fs::File>, ip: IpAddr) -> Self {
        let (add, mut added) = mpsc::unbounded_channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("listener-farm".into())
            .spawn(move || {
                if let Some(ns) = netns {
                    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                        .expect("enter the listeners' namespace");
                }
                lower_this_thread();
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, async move {
                    while let Some(job) = added.recv().await {
                        let (pending, sdp) = answer(&job.offer, job.verifier, job.tcp, ip);
                        let _ = job.reply.send((Arc::clone(&pending.ear), sdp));
                        tokio::task::spawn_local(drive(pending));
                    }
                });
            })
            .unwrap();
        Self {
            add,
            thread: Some(thread),
        }
    }

    /// A new listener answering the node's `offer` (see [`Farm::start`] for where): its
    /// [`Ear`] and its answer.
    pub async fn answer(&self, offer: &str, verifier: bool, tcp: bool) -> (Arc<Ear>, String) {
        let (reply, answered) = tokio::sync::oneshot::channel();
        let job = Job {
            offer: offer.to_owned(),
            verifier,
            tcp,
            reply,
        };
        assert!(self.add.send(job).is_ok(), "farm running");
        answered.await.expect("farm answered")
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        let (closed, _) = mpsc::unbounded_channel();
        self.add = closed;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Puts the calling thread (the listeners, standing for other people's phones) in the idle
/// scheduling class, so the node it measures gets a core whenever it has work, as it would on
/// a server of its own: a woken worker preempts an idle-class thread at once, where a thread
/// merely at the lowest priority (`nice 19`) could keep the core to the end of its time slice
/// (milliseconds). The arrival times then include the listeners' waits; the node's added
/// latency is measured inside the node.
fn lower_this_thread() {
    let tid = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name().map(|t| t.to_string_lossy().into_owned()));
    if !tid.is_some_and(|tid| make_idle(&tid)) {
        eprintln!("note: could not lower the listeners' CPU priority: they compete with the node");
    }
}

/// Moves thread `tid` to the idle scheduling class (`chrt --idle`), or failing that to the
/// lowest priority (`renice -n 19`).
pub fn make_idle(tid: &str) -> bool {
    let run = |program: &str, args: &[&str]| {
        std::process::Command::new(program)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    run("chrt", &["--idle", "-p", "0", tid]) || run("renice", &["-n", "19", "-p", tid])
}

/// RTP, not RTCP (RFC 5761: RTCP packet types 192-223 put 64-95 in the payload type bits).
fn rtp_header(data: &[u8]) -> Option<(u16, u32, bool)> {
    if data.len() < 12 || data[0] >> 6 != 2 || (64..=95).contains(&(data[1] & 0x7f)) {
        return None;
    }
    Some((
        u16::from_be_bytes([data[2], data[3]]),
        u32::from_be_bytes([data[4], data[5], data[6], data[7]]),
        data[1] & 0x80 != 0,
    ))
}

/// A listener's link on the farm's event loop.
enum Io {
    Udp(tokio::net::UdpSocket),
    Tcp {
        stream: tokio::net::TcpStream,
        node: SocketAddr,
        frames: BytesMut,
    },
}

impl Io {
    async fn send(&mut self, data: &[u8], to: SocketAddr) {
        match self {
            Io::Udp(socket) => {
                let _ = socket.try_send_to(data, to);
            }
            Io::Tcp { stream, .. } => {
                let mut framed = Vec::with_capacity(data.len() + 2);
                framed.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
                framed.extend_from_slice(data);
                let _ = stream.write_all(&framed).await;
            }
        }
    }

    /// Waits for what arrives next: datagrams (one, or the whole frames of a TCP read) and
    /// where they came from. `None` when the link is gone.
    async fn recv(&mut self, buf: &mut [u8], out: &mut Vec<(BytesMut, SocketAddr)>) -> Option<()> {
        match self {
            Io::Udp(socket) => {
                let (n, from) = socket.recv_from(buf).await.ok()?;
                out.push((BytesMut::from(&buf[..n]), from));
            }
            Io::Tcp {
                stream,
                node,
                frames,
            } => {
                if stream.read_buf(frames).await.ok()? == 0 {
                    return None;
                }
                while frames.len() >= 2 {
                    let len = usize::from(u16::from_be_bytes([frames[0], frames[1]]));
                    if frames.len() < 2 + len {
                        break;
                    }
                    frames.advance(2);
                    out.push((frames.split_to(len), *node));
                }
                frames.reserve(4096);
            }
        }
        Some(())
    }

    fn protocol(&self) -> TransportProtocol {
        match self {
            Io::Udp(_) => TransportProtocol::UDP,
            Io::Tcp { .. } => TransportProtocol::TCP,
        }
    }
}

async fn drive(pending: Pending) {
    let Pending {
        mut core,
        link,
        local,
        ear,
        verifier,
    } = pending;
    let mut io = match link {
        Link::Udp(socket) => Io::Udp(tokio::net::UdpSocket::from_std(socket).unwrap()),
        Link::Tcp(stream) => Io::Tcp {
            node: stream.peer_addr().unwrap(),
            stream: tokio::net::TcpStream::from_std(stream).unwrap(),
            frames: BytesMut::with_capacity(8192),
        },
    };
    let protocol = io.protocol();
    let mut buf = vec![0u8; 2048];
    let mut arrived = Vec::new();
    loop {
        while let Some(out) = core.poll_write() {
            io.send(&out.message, out.transport.peer_addr).await;
        }
        while let Some(TaggedRTCMessage { message, .. }) = core.poll_read() {
            if let RTCMessage::RtpPacket(_, _) = message {
                ear.verified.fetch_add(1, Ordering::Relaxed);
            }
        }
        while let Some(event) = core.poll_event() {
            if let RTCPeerConnectionEvent::OnConnectionStateChangeEvent(state) = event {
                match state {
                    RTCPeerConnectionState::Connected => {
                        ear.connected.store(true, Ordering::Release)
                    }
                    RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed => {
                        ear.failed.store(true, Ordering::Release);
                        return;
                    }
                    _ => {}
                }
            }
        }
        let deadline = core.poll_timeout();
        let sleep = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            read = io.recv(&mut buf, &mut arrived) => {
                if read.is_none() {
                    ear.failed.store(true, Ordering::Release);
                    return;
                }
                let at = Instant::now();
                for (data, from) in arrived.drain(..) {
                    if let Some((sequence_number, timestamp, marker)) = rtp_header(&data) {
                        ear.arrivals.lock().unwrap().push(Arrival {
                            at,
                            sequence_number,
                            timestamp,
                            marker,
                        });
                        if !verifier {
                            continue;
                        }
                        ear.checked.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = core.handle_read(TaggedBytesMut {
                        now: at,
                        transport: TransportContext {
                            local_addr: local,
                            peer_addr: from,
                            ecn: None,
                            transport_protocol: protocol,
                        },
                        message: data,
                    });
                }
            }
            () = sleep => {
                let _ = core.handle_timeout(Instant::now());
            }
        }
    }
}

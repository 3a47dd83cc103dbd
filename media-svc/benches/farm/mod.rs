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

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::BytesMut;
use media_svc::engine::rtc_peer::{host_candidate, opus_media_engine};
use rtc::ice::mdns::MulticastDnsMode;
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::event::RTCPeerConnectionEvent;
use rtc::peer_connection::message::{RTCMessage, TaggedRTCMessage};
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
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
}

impl Ear {
    pub fn take(&self) -> Vec<Arrival> {
        std::mem::take(&mut *self.arrivals.lock().unwrap())
    }

    pub fn count(&self) -> usize {
        self.arrivals.lock().unwrap().len()
    }
}

/// A peer with its socket, ready to be driven by the farm.
pub struct Pending {
    core: RTCPeerConnection,
    socket: std::net::UdpSocket,
    local: SocketAddr,
    ear: Arc<Ear>,
    /// Hands every RTP datagram to the peer to authenticate and decrypt.
    verifier: bool,
}

/// Answers the node's offer with a receive-only peer on a fresh loopback socket.
pub fn answer(offer: &str, verifier: bool) -> (Pending, String) {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_nonblocking(true).unwrap();
    let local = socket.local_addr().unwrap();
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
    core.add_local_candidate(host_candidate(local).unwrap())
        .unwrap();
    let answer = core.create_answer(None).unwrap();
    core.set_local_description(now, answer).unwrap();
    let sdp = core.local_description().unwrap().sdp;
    let ear = Arc::new(Ear::default());
    (
        Pending {
            core,
            socket,
            local,
            ear,
            verifier,
        },
        sdp,
    )
}

impl Pending {
    pub fn ear(&self) -> Arc<Ear> {
        Arc::clone(&self.ear)
    }
}

/// The thread the listeners run on. Dropping it stops them.
pub struct Farm {
    add: mpsc::UnboundedSender<Pending>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Farm {
    pub fn start() -> Self {
        let (add, mut added) = mpsc::unbounded_channel::<Pending>();
        let thread = std::thread::Builder::new()
            .name("listener-farm".into())
            .spawn(move || {
                lower_this_thread();
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, async move {
                    while let Some(pending) = added.recv().await {
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

    pub fn add(&self, pending: Pending) {
        assert!(self.add.send(pending).is_ok(), "farm running");
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

/// Puts the calling thread (the listeners, standing for other people's phones) at the lowest
/// CPU priority (`renice -n 19` on its thread id), so the node it measures gets the cores
/// whenever it has work, as it would on a server of its own. The arrival times then include
/// the listeners' waits; the node's added latency is measured inside the node.
fn lower_this_thread() {
    let tid = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name().map(|t| t.to_string_lossy().into_owned()));
    let lowered = tid.is_some_and(|tid| {
        std::process::Command::new("renice")
            .args(["-n", "19", "-p", &tid])
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !lowered {
        eprintln!("note: could not lower the listeners' CPU priority: they compete with the node");
    }
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

async fn drive(pending: Pending) {
    let Pending {
        mut core,
        socket,
        local,
        ear,
        verifier,
    } = pending;
    let socket = tokio::net::UdpSocket::from_std(socket).unwrap();
    let mut buf = vec![0u8; 2048];
    loop {
        while let Some(out) = core.poll_write() {
            let _ = socket.try_send_to(&out.message, out.transport.peer_addr);
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
            read = socket.recv_from(&mut buf) => {
                let Ok((n, from)) = read else { continue };
                let at = Instant::now();
                let data = &buf[..n];
                if let Some((sequence_number, timestamp, marker)) = rtp_header(data) {
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
                        transport_protocol: TransportProtocol::UDP,
                    },
                    message: BytesMut::from(data),
                });
            }
            () = sleep => {
                let _ = core.handle_timeout(Instant::now());
            }
        }
    }
}

//! The node's one shared media port with real peers: many listeners on it at once, a client
//! whose source port changes mid-stream, and a flood of hostile datagrams while a channel talks.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::future::join_all;
use media_svc::Config;
use support::{
    Client, TestNode, Tone, analyse, recv_offer, set_floor, speaker, stats, udp_candidate,
};
use testkit::wait_until;

fn ice_ufrag(sdp: &str) -> String {
    sdp.lines()
        .find_map(|l| l.strip_prefix("a=ice-ufrag:"))
        .unwrap()
        .trim()
        .to_owned()
}

/// Answers `offer` with a listening peer, connects and consumes; the peer.
async fn listen_on(
    client: &mut Client,
    session: &str,
    channel: &str,
    transport_id: String,
    offer: &str,
) -> support::peer::Peer {
    support::listen_on(client, session, channel, transport_id, offer, false)
        .await
        .0
}

fn payloads(received: &[support::peer::Received]) -> Vec<Vec<u8>> {
    received.iter().map(|r| r.packet.payload.to_vec()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_listeners_on_one_port_all_hear_the_floor_holder() {
    const LISTENERS: usize = 200;
    const FRAMES: usize = 50;
    let node = TestNode::start(Config::for_tests()).await;
    let mut client = node.client().await;
    let (mic, producer) = speaker(&mut client, "talker", "ops").await;
    let mut ears = Vec::with_capacity(LISTENERS);
    let mut ports = BTreeSet::new();
    for chunk in (0..LISTENERS).collect::<Vec<_>>().chunks(20) {
        let joined = join_all(chunk.iter().map(|i| {
            let mut client = client.clone();
            async move {
                let session = format!("ear{i}");
                let (id, offer) = recv_offer(&mut client, &session, "ops").await;
                let port = udp_candidate(&offer).port();
                (
                    listen_on(&mut client, &session, "ops", id, &offer).await,
                    port,
                )
            }
        }))
        .await;
        for (peer, port) in joined {
            ears.push(peer);
            ports.insert(port);
        }
    }
    assert_eq!(ports.len(), 1, "one port for every transport: {ports:?}");
    assert!(
        set_floor(&mut client, "ops", Some(&producer), 1)
            .await
            .applied
    );
    Tone::new(440.0).play(&mic, FRAMES).await;
    wait_until(
        Duration::from_secs(10),
        "every frame at every listener",
        || async { ears.iter().all(|e| e.received_count() >= FRAMES) },
    )
    .await
    .unwrap_or_else(|_| {
        let short: Vec<usize> = ears
            .iter()
            .map(|e| e.received_count())
            .filter(|n| *n < FRAMES)
            .collect();
        panic!("{} listeners short: {short:?}", short.len())
    });
    for ear in &ears {
        let got = ear.received();
        assert_eq!(got.len(), FRAMES);
        let (rms, freq) = analyse(&payloads(&got));
        assert!(
            rms > 1_000.0 && (400.0..480.0).contains(&freq),
            "{rms} rms, {freq} Hz"
        );
    }
    assert_eq!(stats(&mut client).await.transports as usize, LISTENERS + 1);
    mic.close().await;
    join_all(ears.iter().map(|e| e.close())).await;
}

/// A UDP relay standing for the client's NAT: the client talks to `front`, the relay talks to
/// the node from a socket it can replace (a rebinding: the same client, a new source port).
struct Nat {
    front: SocketAddr,
    rebind: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Nat {
    async fn start(node: SocketAddr) -> Self {
        let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        let rebind = Arc::new(tokio::sync::Notify::new());
        let rebound = Arc::clone(&rebind);
        let task = tokio::spawn(async move {
            let mut back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let mut client: Option<SocketAddr> = None;
            let (mut up, mut down) = (vec![0u8; 2048], vec![0u8; 2048]);
            loop {
                tokio::select! {
                    () = rebound.notified() => {
                        back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
                    }
                    Ok((n, from)) = front.recv_from(&mut up) => {
                        client = Some(from);
                        let _ = back.send_to(&up[..n], node).await;
                    }
                    Ok((n, _)) = back.recv_from(&mut down) => {
                        if let Some(client) = client {
                            let _ = front.send_to(&down[..n], client).await;
                        }
                    }
                }
            }
        });
        Self {
            front: front_addr,
            rebind,
            task,
        }
    }
}

impl Drop for Nat {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_whose_source_port_changes_recovers_without_renegotiation() {
    let node = TestNode::start(Config::for_tests()).await;
    let mut client = node.client().await;
    let (mic, producer) = speaker(&mut client, "talker", "ops").await;
    let (id, offer) = recv_offer(&mut client, "ear", "ops").await;
    let node_udp = udp_candidate(&offer);
    let nat = Nat::start(node_udp).await;
    // The client reaches the node only through the NAT: its offer names the NAT's address and
    // no TCP candidate.
    let offer: String = offer
        .split_inclusive('\n')
        .filter(|l| !(l.starts_with("a=candidate:") && l.contains(" tcp ")))
        .map(|l| {
            l.replace(
                &format!("{} {} typ host", node_udp.ip(), node_udp.port()),
                &format!("{} {} typ host", nat.front.ip(), nat.front.port()),
            )
        })
        .collect();
    let ear = listen_on(&mut client, "ear", "ops", id, &offer).await;
    assert!(
        set_floor(&mut client, "ops", Some(&producer), 1)
            .await
            .applied
    );
    let mut tone = Tone::new(440.0);
    tone.play(&mic, 50).await;
    wait_until(
        Duration::from_secs(5),
        "audio before the rebinding",
        || async { ear.received_count() >= 50 },
    )
    .await
    .unwrap();
    // The NAT rebinds; the speaker goes on talking. The node keeps sending to the old address
    // until the client's next consent check arrives from the new one (every 2 s), then follows.
    nat.rebind.notify_one();
    let before = ear.received_count();
    let talking = tokio::spawn(async move {
        tone.play(&mic, 250).await;
        mic
    });
    wait_until(
        Duration::from_secs(8),
        "audio after the rebinding",
        || async { ear.received_count() >= before + 75 },
    )
    .await
    .unwrap();
    let mic = talking.await.unwrap();
    assert_eq!(ear.track_count(), 1, "the same track: no renegotiation");
    assert_eq!(
        stats(&mut client).await.transports,
        2,
        "the same transports"
    );
    let got = ear.received();
    let (rms, freq) = analyse(&payloads(&got[got.len() - 50..]));
    assert!(
        rms > 1_000.0 && (400.0..480.0).contains(&freq),
        "{rms} rms, {freq} Hz"
    );
    mic.close().await;
    ear.close().await;
}

/// Hostile traffic at the shared port from a few sockets: noise, checks for a real transport
/// signed with the wrong password, DTLS records and RTP from addresses no check opened.
async fn flood(target: SocketAddr, ufrag: String, stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) {
    use rtc::stun::fingerprint::FINGERPRINT;
    use rtc::stun::integrity::MessageIntegrity;
    use rtc::stun::message::{BINDING_REQUEST, Message, Setter, TransactionId};
    use rtc::stun::textattrs::Username;
    let crypto = rtc::crypto::default_provider().unwrap();
    let mut bad_check = Message::new();
    bad_check
        .build(&[
            Box::new(BINDING_REQUEST) as Box<dyn Setter>,
            Box::new(TransactionId::new()),
            Box::new(Username::new(
                rtc::stun::attributes::ATTR_USERNAME,
                format!("{ufrag}:attacker"),
            )),
            Box::new(MessageIntegrity::new_short_term_integrity_with_provider(
                "not-the-password-0123456789".to_owned(),
                crypto.crypto(),
            )),
            Box::new(FINGERPRINT),
        ])
        .unwrap();
    let bad_check = bad_check.raw.clone();
    let sockets: Vec<tokio::net::UdpSocket> =
        join_all((0..4).map(|_| tokio::net::UdpSocket::bind("127.0.0.1:0")))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
    let mut i = 0u64;
    while !stop.load(Ordering::Acquire) {
        for _ in 0..200 {
            let datagram: Vec<u8> = match i % 4 {
                0 => (0..(i % 200 + 1)).map(|_| rand::random::<u8>()).collect(),
                1 => bad_check.clone(),
                2 => {
                    let mut d = vec![22u8, 254, 253, 0, 0, 0, 0, 0, 0, 0, 0, 0, 20];
                    d.extend((0..20).map(|_| rand::random::<u8>()));
                    d
                }
                _ => {
                    let mut d = vec![0x80u8, 111, 0, 1, 0, 0, 0, 1];
                    d.extend_from_slice(&rand::random::<u32>().to_be_bytes());
                    d.extend((0..60).map(|_| rand::random::<u8>()));
                    d
                }
            };
            let socket = &sockets[(i % 4) as usize];
            if socket.send_to(&datagram, target).await.is_ok() {
                sent.fetch_add(1, Ordering::Relaxed);
            }
            i += 1;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_hostile_datagrams_leaves_every_listener_s_delivery_complete() {
    const LISTENERS: usize = 20;
    const FRAMES: usize = 100;
    let node = TestNode::start(Config::for_tests()).await;
    let mut client = node.client().await;
    let (mic, producer) = speaker(&mut client, "talker", "ops").await;
    let mut ears = Vec::new();
    let mut target = None;
    for i in 0..LISTENERS {
        let session = format!("ear{i}");
        let (id, offer) = recv_offer(&mut client, &session, "ops").await;
        target = Some((udp_candidate(&offer), ice_ufrag(&offer)));
        ears.push(listen_on(&mut client, &session, "ops", id, &offer).await);
    }
    let (port, ufrag) = target.unwrap();
    assert!(
        set_floor(&mut client, "ops", Some(&producer), 1)
            .await
            .applied
    );
    let refused_before = stats(&mut client).await.datagrams_refused;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let flooder = tokio::spawn(flood(port, ufrag, Arc::clone(&stop), Arc::clone(&sent)));
    Tone::new(440.0).play(&mic, FRAMES).await;
    stop.store(true, Ordering::Release);
    flooder.await.unwrap();
    wait_until(
        Duration::from_secs(5),
        "every frame at every listener",
        || async { ears.iter().all(|e| e.received_count() >= FRAMES) },
    )
    .await
    .unwrap();
    for ear in &ears {
        assert_eq!(ear.received_count(), FRAMES, "complete delivery");
        assert_eq!(ear.track_count(), 1);
    }
    let sent = sent.load(Ordering::Relaxed);
    let refused = stats(&mut client).await.datagrams_refused - refused_before;
    eprintln!("hostile datagrams sent {sent}, refused and counted {refused}");
    assert!(sent > 10_000, "the flood was a flood: {sent}");
    // Some may be lost in the kernel's receive buffer before the node reads them; the rest
    // are refused and counted.
    assert!(refused > sent / 2, "refused {refused} of {sent}");
    assert_eq!(stats(&mut client).await.transports as usize, LISTENERS + 1);
    mic.close().await;
    join_all(ears.iter().map(|e| e.close())).await;
}

/// The offer's line `a=<name>:<value>`.
fn sdp_attribute(sdp: &str, name: &str) -> String {
    sdp.lines()
        .find_map(|l| l.strip_prefix(&format!("a={name}:")))
        .unwrap()
        .trim()
        .to_owned()
}

/// The node's ICE/TCP candidate in an offer.
fn tcp_candidate(sdp: &str) -> SocketAddr {
    let fields: Vec<&str> = sdp
        .lines()
        .find(|l| l.starts_with("a=candidate:") && l.contains(" tcp "))
        .expect("a TCP candidate")
        .split(' ')
        .collect();
    format!("{}:{}", fields[4], fields[5]).parse().unwrap()
}

/// A client's first check for a transport (`ufrag`, `pwd`), framed for ICE/TCP (RFC 4571).
fn framed_check(ufrag: &str, pwd: &str) -> Vec<u8> {
    use rtc::stun::attributes::ATTR_USERNAME;
    use rtc::stun::fingerprint::FINGERPRINT;
    use rtc::stun::integrity::MessageIntegrity;
    use rtc::stun::message::{BINDING_REQUEST, Message, Setter, TransactionId};
    use rtc::stun::textattrs::Username;
    let crypto = rtc::crypto::default_provider().unwrap();
    let mut check = Message::new();
    check
        .build(&[
            Box::new(BINDING_REQUEST) as Box<dyn Setter>,
            Box::new(TransactionId::new()),
            Box::new(Username::new(ATTR_USERNAME, format!("{ufrag}:client"))),
            Box::new(MessageIntegrity::new_short_term_integrity_with_provider(
                pwd.to_owned(),
                crypto.crypto(),
            )),
            Box::new(FINGERPRINT),
        ])
        .unwrap();
    let mut framed = u16::try_from(check.raw.len())
        .unwrap()
        .to_be_bytes()
        .to_vec();
    framed.extend_from_slice(&check.raw);
    framed
}

/// One host opens many ICE/TCP connections and sends nothing (each may wait 5 s for its first
/// check): past its source's budget of 32 they are closed at accept, and a client from
/// another address still connects and is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_ice_tcp_connections_from_one_source_cannot_lock_out_another() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = TestNode::start(Config::for_tests()).await;
    let mut client = node.client().await;
    let (_, offer) = recv_offer(&mut client, "ear", "ops").await;
    let tcp = tcp_candidate(&offer);
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(tokio::net::TcpStream::connect(tcp).await.unwrap());
    }
    // The connections past the budget are closed at once (end of stream, or a reset); the
    // others wait for their first check (5 s). The node's listeners accept in their own
    // order, so which eight is not known: all are read at once.
    let closed = join_all(idle.iter_mut().map(|stream| async move {
        let mut buf = [0u8; 16];
        match tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => true,
            Ok(Ok(_)) => panic!("the node sent something unasked"),
            Err(_) => false,
        }
    }))
    .await;
    let closed = closed.into_iter().filter(|c| *c).count();
    assert_eq!(closed, 8, "the connections past the source's budget");
    // Another source: its first check is answered.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut other = socket.connect(tcp).await.unwrap();
    other
        .write_all(&framed_check(
            &sdp_attribute(&offer, "ice-ufrag"),
            &sdp_attribute(&offer, "ice-pwd"),
        ))
        .await
        .unwrap();
    let mut len = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(5), other.read_exact(&mut len))
        .await
        .expect("an answer")
        .unwrap();
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
    other.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer[..2], &[0x01, 0x01], "a binding success response");
    let refused = stats(&mut client).await.datagrams_refused;
    assert!(refused >= 8, "{refused} refused");
    node.shutdown.cancel();
}

//! TURN through a real coturn relay: the gateway hands out short-lived credentials that coturn
//! checks against the secret they share, and a client whose peer may use only the relay
//! (ICE transport policy `relay`: no host candidate at all) hears the floor holder through it.
//! A forged credential gets no relay allocation. And an ICE restart through the gateway (what a
//! client does after a network change) keeps the stream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use talkgroup_e2e::relay::{TURN_SECRET, TestRelay};
use talkgroup_e2e::{Stack, Topology, assert_tone, wait_packets};
use testkit::media::Tone;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_can_only_use_the_relay_hears_through_coturn() {
    let relay = TestRelay::start(std::net::Ipv4Addr::LOCALHOST, false).unwrap();
    let stack = Stack::start(Topology {
        gateway_args: relay.gateway_args(),
        ..Topology::default()
    })
    .await
    .unwrap();
    stack.ready().await.unwrap();
    let mut ana = stack.client(0, "u-ana", "Ana").await;
    let mut ben = stack.client(0, "u-ben", "Ben").await;
    let mut cai = stack.client(0, "u-cai", "Cai").await;
    for c in [&mut ana, &mut ben, &mut cai] {
        c.join("ops").await;
    }
    let mic = ana.speaker("ops").await;

    // Ben's peer gathers only a relay candidate (coturn accepted the gateway's credential),
    // connects to the media node through coturn and hears Ana.
    let (ear, _, answer) = ben.relayed_recv("ops", false).await;
    assert!(answer.contains("typ relay"), "no relay candidate: {answer}");
    assert!(
        !answer.contains("typ host"),
        "a relay-only peer offers no host candidate"
    );
    ben.consume("ops").await;
    ear.wait_connected().await;
    let granted = ana.ptt_start("ops").await;
    assert_eq!(granted["granted"], true, "{granted}");
    // Ana talks until Ben has heard two seconds of her (the relayed handshake can take a DTLS
    // retransmission or two to finish on the node's side after Ben's peer reports connected,
    // and copies before that are not sent).
    let mic = std::sync::Arc::new(mic);
    let talking = {
        let mic = std::sync::Arc::clone(&mic);
        tokio::spawn(async move { Tone::new(440.0).play(&mic, 500).await })
    };
    wait_packets(&ear, 100, "Ben hears Ana through the relay").await;
    talking.abort();
    assert_tone(&ear, 0, 440.0, "Ben");

    // Cai's credential is forged: coturn refuses the allocation, so his peer has no candidate
    // to reach anything with.
    let (_, _, forged) = cai.relayed_recv("ops", true).await;
    assert!(
        !forged.contains("typ relay"),
        "a forged credential got a relay: {forged}"
    );
    // A credential made correctly with the shared secret but expired an hour ago is refused
    // too; the same one with an expiry ahead gets a relay (so the first refusal is coturn's
    // expiry check, not a wrong signature).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for (expiry, relayed) in [(now - 3600, false), (now + 3600, true)] {
        let (_, _, answer) = cai
            .negotiate_relayed_with("ops", "recv", |mut relay| async move {
                relay.username = format!("{expiry}:u-cai");
                relay.credential = rest_api_password(TURN_SECRET, &relay.username);
                testkit::media::Peer::relayed(relay).await
            })
            .await;
        assert_eq!(
            answer.contains("typ relay"),
            relayed,
            "expiry {expiry} (now {now}): {answer}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ice_restart_through_the_gateway_keeps_the_stream() {
    let stack = Stack::start(Topology::default()).await.unwrap();
    stack.ready().await.unwrap();
    let mut ana = stack.client(0, "u-ana", "Ana").await;
    let mut ben = stack.client(0, "u-ben", "Ben").await;
    ana.join("ops").await;
    ben.join("ops").await;
    let mic = ana.speaker("ops").await;
    let (ear, transport, ssrc) = ben.listener_transport("ops").await;
    let granted = ana.ptt_start("ops").await;
    assert_eq!(granted["granted"], true, "{granted}");
    let mut tone = Tone::new(440.0);
    tone.play(&mic, 25).await;
    wait_packets(&ear, 20, "Ben hears Ana").await;
    let heard = ear.received_count();
    // Ben's network changed: a fresh offer for the same transport, new ICE credentials.
    let restarted = ben.restart_ice(&transport, &ear).await;
    assert_eq!(restarted["transportId"], transport.as_str());
    let unknown = ben
        .request("restart-ice", serde_json::json!({"transportId": "nope"}))
        .await;
    assert_eq!(unknown["error"]["code"], "NOT_FOUND", "{unknown}");
    tone.play(&mic, 75).await;
    wait_packets(&ear, heard + 45, "Ben hears Ana after the restart").await;
    assert!(
        ear.received().iter().all(|r| r.packet.header.ssrc == ssrc),
        "one SSRC"
    );
    assert_eq!(ear.track_count(), 1);
    assert_eq!(restarted["offer"]["type"], "offer");
}

/// The relay is a way to the media nodes and nothing else: a valid credential gets a UDP
/// allocation and a permission towards the media node's address, but no permission towards any
/// other peer (another loopback address, private, carrier-grade NAT and link-local ranges, the
/// cloud metadata address, a public address) and no TCP relaying (RFC 6062) at all.
#[test]
fn the_relay_reaches_the_media_node_and_nothing_else() {
    use testkit::turn_probe::{Answer, Credential, Probe};
    let relay = TestRelay::start(std::net::Ipv4Addr::LOCALHOST, false).unwrap();
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let username = format!("{expiry}:u-eve");
    let credential = Credential {
        password: rest_api_password(TURN_SECRET, &username),
        username,
    };
    let mut probe = Probe::allocate_udp(relay.turn.addr(), credential.clone()).unwrap();
    // The media node's address (the tests run it on the relay's own address).
    assert_eq!(
        probe.permit("127.0.0.1:40000".parse().unwrap()).unwrap(),
        Answer::Granted
    );
    for peer in [
        "127.0.0.2:9",
        "10.0.0.1:80",
        "100.64.0.1:53",
        "169.254.169.254:80",
        "172.16.0.1:10250",
        "192.168.1.1:53",
        "0.0.0.0:9",
        "8.8.8.8:53",
        "224.0.0.251:5353",
    ] {
        assert_eq!(
            probe.permit(peer.parse().unwrap()).unwrap(),
            Answer::Refused(403),
            "a permission towards {peer}"
        );
    }
    assert!(
        matches!(
            Probe::allocate_tcp(relay.turn.addr(), credential).unwrap(),
            Answer::Refused(_)
        ),
        "a TCP relay allocation"
    );
}

/// The TURN REST API password coturn checks: base64 of HMAC-SHA1(secret, username).
fn rest_api_password(secret: &str, username: &str) -> String {
    use base64::Engine as _;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(ring::hmac::sign(&key, username.as_bytes()))
}

/// A relayed peer for `client` built inside the namespace runtime `rt`, reaching the relay's
/// TLS port at `relay` through a TURN-over-TLS bridge (the `webrtc` crate speaks TURN over UDP
/// only), with a forged credential when `forge`: (peer, bridge, transport id, answer SDP).
async fn relayed_in(
    rt: &talkgroup_e2e::netns::NsRuntime,
    client: &mut talkgroup_e2e::Client,
    direction: &str,
    relay: std::net::SocketAddr,
    ca: &std::path::Path,
    forge: bool,
) -> (
    testkit::media::Peer,
    testkit::turn_tls::TlsBridge,
    String,
    String,
) {
    let name = relay.ip().to_string();
    let ca = ca.to_owned();
    let bridge = rt
        .handle
        .spawn(async move { testkit::turn_tls::TlsBridge::start(relay, &name, &ca).await })
        .await
        .unwrap()
        .unwrap();
    let url = bridge.url();
    let handle = rt.handle.clone();
    let (peer, transport, answer) = client
        .negotiate_relayed_with("ops", direction, |mut relay| async move {
            relay.urls = vec![url];
            if forge {
                relay.credential = "Zm9yZ2VkLWNyZWRlbnRpYWw=".into();
            }
            handle
                .spawn(testkit::media::Peer::relayed(relay))
                .await
                .unwrap()
        })
        .await;
    (peer, bridge, transport, answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_allowed_only_tcp_to_the_relays_tls_port_hears_and_talks_through_turn_over_tls() {
    use talkgroup_e2e::netns::{self, Netns};
    if !netns::available() {
        assert!(
            std::env::var("TALKGROUP_ALLOW_NO_NETNS").is_ok(),
            "network namespaces need root, iproute2 and nftables, and \
             TALKGROUP_ALLOW_NO_NETNS is not set"
        );
        return;
    }
    let ns = Netns::create().unwrap();
    // The relay's throwaway certificate is for its address on the link to the namespace.
    let relay_tls = TestRelay::start(ns.host_ip, true).unwrap();
    let tls_port = relay_tls.port();
    let stack = Stack::start(Topology {
        gateway_args: relay_tls.gateway_args(),
        bind_ip: ns.host_ip.to_string(),
        ..Topology::default()
    })
    .await
    .unwrap();
    stack.ready().await.unwrap();
    // Ben's media lives in the namespace, which lets out only TCP to the relay's TLS port
    // (his signalling socket is this process's, outside it).
    ns.allow_only_tcp_to(&[tls_port]).unwrap();
    let rt = ns.runtime().unwrap();
    let gateway = stack.gateway(0);
    let escapes = rt
        .handle
        .spawn(async move {
            let udp = tokio::net::UdpSocket::bind("0.0.0.0:0").await.unwrap();
            let _ = udp.send_to(b"direct?", gateway).await;
            tokio::time::timeout(
                std::time::Duration::from_secs(1),
                tokio::net::TcpStream::connect(gateway),
            )
            .await
            .is_ok_and(|c| c.is_ok())
        })
        .await
        .unwrap();
    assert!(!escapes, "the namespace reached the gateway directly");
    assert!(ns.dropped().unwrap() > 0, "the rules dropped nothing");

    let relay = std::net::SocketAddr::new(ns.host_ip.into(), tls_port);
    let mut ana = stack.client(0, "u-ana", "Ana").await;
    let mut ben = stack.client(0, "u-ben", "Ben").await;
    let mut cai = stack.client(0, "u-cai", "Cai").await;
    for c in [&mut ana, &mut ben, &mut cai] {
        c.join("ops").await;
    }
    let mic = ana.speaker("ops").await;
    let (ana_ear, _) = ana.listener("ops").await;

    // Ben hears Ana, his every packet through coturn over TLS.
    let (ben_ear, _recv_bridge, _, answer) =
        relayed_in(&rt, &mut ben, "recv", relay, &relay_tls.ca, false).await;
    assert!(answer.contains("typ relay"), "no relay candidate: {answer}");
    ben.consume("ops").await;
    ben_ear.wait_connected().await;
    assert_eq!(ana.ptt_start("ops").await["granted"], true);
    let mic = std::sync::Arc::new(mic);
    let talking = {
        let mic = std::sync::Arc::clone(&mic);
        tokio::spawn(async move { Tone::new(440.0).play(&mic, 500).await })
    };
    wait_packets(&ben_ear, 100, "Ben hears Ana through the relay over TLS").await;
    talking.abort();
    assert_tone(&ben_ear, 0, 440.0, "Ben");
    ana.ptt_stop("ops").await;

    // Ben talks the same way, and Ana hears him.
    let (ben_mic, _send_bridge, transport, _) =
        relayed_in(&rt, &mut ben, "send", relay, &relay_tls.ca, false).await;
    ben.produce("ops", &transport).await;
    ben_mic.wait_connected().await;
    let before = ana_ear.received_count();
    assert_eq!(ben.ptt_start("ops").await["granted"], true);
    let ben_mic = std::sync::Arc::new(ben_mic);
    let talking = {
        let ben_mic = std::sync::Arc::clone(&ben_mic);
        tokio::spawn(async move { Tone::new(660.0).play(&ben_mic, 500).await })
    };
    wait_packets(&ana_ear, before + 100, "Ana hears Ben through the relay").await;
    talking.abort();
    assert_tone(&ana_ear, before, 660.0, "Ana");

    // Without valid TURN credentials the namespace has no way out.
    let (_, _forged_bridge, _, forged) =
        relayed_in(&rt, &mut cai, "recv", relay, &relay_tls.ca, true).await;
    assert!(
        !forged.contains("typ relay"),
        "a forged credential got a relay: {forged}"
    );
    drop((ben_ear, ben_mic));
}

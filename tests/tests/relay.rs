//! TURN through a real coturn relay: the gateway hands out short-lived credentials that coturn
//! checks against the secret they share, and a client whose peer may use only the relay
//! (ICE transport policy `relay`: no host candidate at all) hears the floor holder through it.
//! A forged credential gets no relay allocation. And an ICE restart through the gateway (what a
//! client does after a network change) keeps the stream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use talkgroup_e2e::{Stack, Topology, assert_tone, wait_packets};
use testkit::TurnServer;
use testkit::media::Tone;

const SECRET: &str = "a-turn-secret-shared-with-coturn";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_can_only_use_the_relay_hears_through_coturn() {
    let turn = TurnServer::start(SECRET).expect("coturn (apt-get install coturn)");
    let dir = std::env::temp_dir().join(format!("relay-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret_file = dir.join("turn-secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let stack = Stack::start(Topology {
        gateway_args: vec![
            "--turn-url".into(),
            turn.urls().join(","),
            "--turn-secret-file".into(),
            secret_file.to_string_lossy().into_owned(),
        ],
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
    let _ = std::fs::remove_dir_all(&dir);
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

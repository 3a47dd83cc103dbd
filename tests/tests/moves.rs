//! Channels move off media nodes that die or drain, and their audio comes back: the
//! gateways tell every member (`transport-closed`), the clients make new transports on the
//! node state-svc chose, and a floor held across the move is kept and forwarded there.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use talkgroup_e2e::{Stack, Topology, assert_tone_in, wait_packets};
use testkit::media::Tone;

/// Two media nodes; a node is dead 1.5 s after its last heartbeat (every 100 ms here).
fn two_nodes() -> Topology {
    Topology {
        media: 2,
        state_args: vec!["--node-dead-after-ms".into(), "1500".into()],
        ..Topology::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_media_node_s_talking_channel_is_heard_again_on_another_node() {
    let mut stack = Stack::start(two_nodes()).await.unwrap();
    stack.ready().await.unwrap();
    let mut ana = stack.client(0, "u-ana", "Ana").await;
    let mut ben = stack.client(0, "u-ben", "Ben").await;
    ana.join("ops").await;
    ben.join("ops").await;
    let mic = ana.speaker("ops").await;
    let (ear, _) = ben.listener("ops").await;
    let granted = ana.ptt_start("ops").await;
    let epoch = granted["epoch"].as_u64().unwrap();
    let mut tone = Tone::new(440.0);
    tone.play(&mic, 25).await;
    wait_packets(&ear, 20, "Ben hears Ana").await;

    let dead = stack.media_index_of("ops").await.unwrap();
    stack.media[dead].kill();
    let closed = ben.transport_closed("ops", "recv").await;
    assert_eq!(closed["reason"], "node-lost", "{closed}");
    let closed = ana.transport_closed("ops", "send").await;
    assert_eq!(closed["reason"], "node-lost", "{closed}");
    let moved_to = stack.media_index_of("ops").await.unwrap();
    assert_ne!(moved_to, dead);

    // Both make new transports; Ana still holds the floor and talks on without pressing.
    let (ear, _) = ben.listener("ops").await;
    let mic = ana.speaker("ops").await;
    tone.play(&mic, 40).await;
    wait_packets(&ear, 30, "Ben hears Ana on the new node").await;
    assert_tone_in(&ear, 5..ear.received_count(), 440.0, "Ben");
    ana.ptt_stop("ops").await;
    let released = ben.speaker_changed("ops", "released").await;
    assert!(released["epoch"].as_u64().unwrap() > epoch);
    // Nothing ended the floor before Ana's own stop.
    assert!(
        !ben.pushes
            .iter()
            .any(|p| p["type"] == "speaker-changed" && p["data"]["reason"] != "granted"),
        "{:?}",
        ben.pushes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_s_channel_moves_while_its_old_transports_still_carry_audio() {
    let stack = Stack::start(two_nodes()).await.unwrap();
    stack.ready().await.unwrap();
    let mut ana = stack.client(0, "u-ana", "Ana").await;
    let mut ben = stack.client(0, "u-ben", "Ben").await;
    ana.join("ops").await;
    ben.join("ops").await;
    let old_mic = ana.speaker("ops").await;
    let (old_ear, _) = ben.listener("ops").await;
    ana.ptt_start("ops").await;
    let mut tone = Tone::new(440.0);
    tone.play(&old_mic, 25).await;
    wait_packets(&old_ear, 20, "Ben hears Ana").await;

    // SIGTERM: the node drains itself, as in a rolling update.
    let draining = stack.media_index_of("ops").await.unwrap();
    stack.media[draining].signal_term();
    let closed = ben.transport_closed("ops", "recv").await;
    assert_eq!(closed["reason"], "node-draining", "{closed}");
    ana.transport_closed("ops", "send").await;
    // The old path still carries Ana while the new one is made.
    let before = old_ear.received_count();
    tone.play(&old_mic, 10).await;
    wait_packets(
        &old_ear,
        before + 5,
        "Ben still hears Ana on the draining node",
    )
    .await;
    let (ear, _) = ben.listener("ops").await;
    let mic = ana.speaker("ops").await;
    tone.play(&mic, 40).await;
    wait_packets(&ear, 30, "Ben hears Ana on the new node").await;
    assert_ne!(stack.media_index_of("ops").await.unwrap(), draining);
}

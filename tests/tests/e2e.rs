//! The whole push-to-talk loop over separate processes: Redis, state-svc, media-svc and
//! signaling-svc binaries on ephemeral loopback ports; clients speak the WebSocket protocol and
//! send and receive real Opus over WebRTC.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;
use talkgroup_e2e::{Client, Stack, Topology, assert_tone, http_get, wait_packets};
use testkit::media::Tone;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn press_talk_hear_release_contend_and_disconnect() {
    let stack = Stack::start(Topology::default()).await.unwrap();
    stack.ready().await.unwrap();
    let mut ana = stack.client(0, "u-ana", "Ana").await;
    let mut ben = stack.client(0, "u-ben", "Ben").await;
    let mut cai = stack.client(0, "u-cai", "Cai").await;

    // Join: everyone sees who is present.
    ana.join("ops").await;
    ben.join("ops").await;
    let state = cai.join("ops").await;
    let members: HashSet<&str> = state["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["userId"].as_str().unwrap())
        .collect();
    assert_eq!(members, HashSet::from(["u-ana", "u-ben", "u-cai"]));
    // Ana learns of the others from `members-changed` pushes.
    let seen = ana.members_until("ops", |m| m.len() == 3).await;
    assert!(seen.contains("u-cai"), "{seen:?}");

    // Negotiate: Ana and Ben can speak, Ben and Cai listen (one stream each).
    let ana_mic = ana.speaker("ops").await;
    let ben_mic = ben.speaker("ops").await;
    let (ben_ear, ben_ssrc) = ben.listener("ops").await;
    let (cai_ear, cai_ssrc) = cai.listener("ops").await;

    // Ana presses: granted; everyone is told; both listeners decode her 440 Hz tone.
    let granted = ana.ptt_start("ops").await;
    assert_eq!(granted["granted"], true, "{granted}");
    for c in [&mut ben, &mut cai] {
        let changed = c.speaker_changed("ops", "granted").await;
        assert_eq!(changed["speaker"]["userId"], "u-ana");
        assert_eq!(changed["speaker"]["userName"], "Ana");
    }
    let mut ana_tone = Tone::new(440.0);
    ana_tone.play(&ana_mic, 50).await;
    wait_packets(&ben_ear, 40, "Ben hears Ana").await;
    wait_packets(&cai_ear, 40, "Cai hears Ana").await;
    assert_tone(&ben_ear, 0, 440.0, "Ben");
    assert_tone(&cai_ear, 0, 440.0, "Cai");
    assert!(
        cai_ear
            .received()
            .iter()
            .all(|r| r.packet.header.ssrc == cai_ssrc)
    );

    // Contention: Ben is denied, told who holds the floor, and his audio reaches nobody.
    let denied = ben.ptt_start("ops").await;
    assert_eq!(denied["granted"], false);
    assert_eq!(denied["speaker"]["userId"], "u-ana");
    let push = ben.push_where("ptt-denied", |_| true).await;
    assert_eq!(push["data"]["speaker"]["userName"], "Ana");
    let before = cai_ear.received_count();
    let mut ben_tone = Tone::new(1_000.0);
    ben_tone.play(&ben_mic, 25).await;
    // Ana's silence meanwhile: nothing may arrive (a few in-flight frames of Ana's at most).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        cai_ear.received_count() - before <= 2,
        "a denied speaker's audio was forwarded"
    );

    // Ben's stop does not release Ana's floor.
    ben.ptt_stop("ops").await;
    let floor = cai.join("ops").await;
    assert_eq!(floor["speaker"]["userId"], "u-ana");

    // Ana releases; Ben takes the floor; Cai's one stream carries Ben's 1 kHz tone on.
    ana.ptt_stop("ops").await;
    cai.speaker_changed("ops", "released").await;
    let granted = ben.ptt_start("ops").await;
    assert_eq!(granted["granted"], true, "{granted}");
    let from = cai_ear.received_count();
    ben_tone.play(&ben_mic, 50).await;
    wait_packets(&cai_ear, from + 40, "Cai hears Ben").await;
    assert_tone(&cai_ear, from, 1_000.0, "Cai");
    let got = cai_ear.received();
    assert!(got.iter().all(|r| r.packet.header.ssrc == cai_ssrc));
    for w in got.windows(2) {
        assert_eq!(
            w[1].packet.header.sequence_number,
            w[0].packet.header.sequence_number.wrapping_add(1),
            "Cai's stream has a gap across the speaker change"
        );
    }
    // Ben never hears himself.
    assert!(
        ben_ear
            .received()
            .iter()
            .all(|r| r.packet.header.ssrc == ben_ssrc)
    );
    let ben_heard_before = ben_ear.received_count();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(ben_ear.received_count(), ben_heard_before);

    // Ben disconnects while talking: the floor is freed, with a reason, and Ana can talk.
    ben.close().await;
    let changed = cai.speaker_changed("ops", "disconnected").await;
    assert_eq!(changed["speaker"], serde_json::Value::Null);
    let left = cai.members_until("ops", |m| m.len() == 2).await;
    assert!(!left.contains("u-ben"), "{left:?}");
    let granted = ana.ptt_start("ops").await;
    assert_eq!(granted["granted"], true, "{granted}");
    ana_mic.close().await;
    ben_mic.close().await;
    ben_ear.close().await;
    cai_ear.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_channel_goes_to_the_less_loaded_media_node() {
    let stack = Stack::start(Topology {
        media: 2,
        ..Topology::default()
    })
    .await
    .unwrap();
    stack.ready().await.unwrap();

    // Load one node with a channel of three peer connections.
    let mut clients = Vec::new();
    let mut peers = Vec::new();
    for i in 0..3 {
        let mut c = stack.client(0, &format!("u-{i}"), "Loader").await;
        c.join("busy").await;
        peers.push(c.listener("busy").await.0);
        clients.push(c);
    }
    let busy_node = stack.placement("busy").await.unwrap();
    assert!(!busy_node.is_empty());
    stack
        .wait_for_node(
            &busy_node,
            Duration::from_secs(5),
            "the load reported",
            |n| n.load >= 3,
        )
        .await
        .unwrap();

    // The next channel is placed on the other one.
    let mut dee = stack.client(0, "u-dee", "Dee").await;
    dee.join("quiet").await;
    let (ear, _) = dee.listener("quiet").await;
    let quiet_node = stack.placement("quiet").await.unwrap();
    assert!(!quiet_node.is_empty());
    assert_ne!(
        quiet_node, busy_node,
        "placed on the loaded node ({busy_node})"
    );

    // And audio flows on it.
    let mic = dee.speaker("quiet").await;
    let mut eve = stack.client(0, "u-eve", "Eve").await;
    eve.join("quiet").await;
    let (eve_ear, _) = eve.listener("quiet").await;
    assert_eq!(dee.ptt_start("quiet").await["granted"], true);
    Tone::new(440.0).play(&mic, 40).await;
    wait_packets(&eve_ear, 30, "Eve hears Dee").await;
    assert_tone(&eve_ear, 0, 440.0, "Eve");
    mic.close().await;
    ear.close().await;
    eve_ear.close().await;
    for p in &mut peers {
        p.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_press_after_its_media_node_died_places_the_channel_again() {
    let mut stack = Stack::start(Topology {
        media: 2,
        ..Topology::default()
    })
    .await
    .unwrap();
    stack.ready().await.unwrap();

    // A signalling-only press places the channel; the gateway remembers where.
    let mut ana = stack.client(0, "u-ana", "Ana").await;
    ana.join("ops").await;
    assert_eq!(ana.ptt_start("ops").await["granted"], true);
    ana.ptt_stop("ops").await;
    let first = stack.placement("ops").await.unwrap();
    assert!(!first.is_empty());

    // That node dies (killed, no drain) and the registry notices.
    let index = stack
        .media
        .iter()
        .position(|m| m.logs().iter().any(|l| l.contains(&first)))
        .expect("the placed node's process");
    drop(stack.media.remove(index));
    stack
        .wait_for_node(
            &first,
            Duration::from_secs(20),
            "the node declared dead",
            |n| !n.live,
        )
        .await
        .unwrap();

    // The next press is granted all the same: the remembered node refuses, and the gateway
    // places the channel again on the live one.
    assert_eq!(ana.ptt_start("ops").await["granted"], true);
    let second = stack.placement("ops").await.unwrap();
    assert!(!second.is_empty());
    assert_ne!(second, first);
    ana.ptt_stop("ops").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_two_state_services_two_media_nodes_one_redis() {
    let stack = Stack::start(Topology {
        state: 2,
        media: 2,
        gateways: 2,
        ..Topology::default()
    })
    .await
    .unwrap();
    stack.ready().await.unwrap();
    // Ana on gateway 0 (state-svc 0), Ben and Cai on gateway 1 (state-svc 1).
    let mut ana = stack.client(0, "u-ana", "Ana").await;
    let mut ben = stack.client(1, "u-ben", "Ben").await;
    let mut cai = stack.client(1, "u-cai", "Cai").await;
    for (channel, c) in [("ops", &mut ana), ("ops", &mut ben), ("ops", &mut cai)] {
        c.join(channel).await;
    }
    ana.members_until("ops", |m| m.len() == 3).await;

    let mic = ana.speaker("ops").await;
    let ben_mic = ben.speaker("ops").await;
    let (ben_ear, _) = ben.listener("ops").await;
    let (cai_ear, _) = cai.listener("ops").await;

    // A grant through gateway 0 is seen on gateway 1, and its audio heard there.
    assert_eq!(ana.ptt_start("ops").await["granted"], true);
    let changed = ben.speaker_changed("ops", "granted").await;
    assert_eq!(changed["speaker"]["userId"], "u-ana");
    Tone::new(440.0).play(&mic, 40).await;
    wait_packets(&ben_ear, 30, "Ben hears Ana across gateways").await;
    wait_packets(&cai_ear, 30, "Cai hears Ana across gateways").await;
    assert_tone(&ben_ear, 0, 440.0, "Ben");
    assert_tone(&cai_ear, 0, 440.0, "Cai");

    // The floor is one across replicas: Ben (other gateway, other state-svc) is denied.
    let denied = ben.ptt_start("ops").await;
    assert_eq!(denied["granted"], false);
    assert_eq!(denied["speaker"]["userId"], "u-ana");

    // Ana's gateway loses her; Ben's side sees it and takes over.
    ana.close().await;
    ben.speaker_changed("ops", "disconnected").await;
    assert_eq!(ben.ptt_start("ops").await["granted"], true);
    let from = cai_ear.received_count();
    Tone::new(1_000.0).play(&ben_mic, 40).await;
    wait_packets(&cai_ear, from + 30, "Cai hears Ben").await;
    assert_tone(&cai_ear, from, 1_000.0, "Cai");

    // Both media nodes are registered and live with every state-svc.
    let nodes = stack.nodes().await.unwrap();
    assert_eq!(nodes.iter().filter(|n| n.live).count(), 2, "{nodes:?}");
    mic.close().await;
    ben_mic.close().await;
    ben_ear.close().await;
    cai_ear.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_the_browser_client() {
    let stack = Stack::start(Topology::default()).await.unwrap();
    let addr = stack.gateway(0);
    let (status, html) = talkgroup_e2e::http_get(addr, "/").await.unwrap();
    assert_eq!(status, 200);
    assert!(html.contains("<script type=\"module\" src=\"/app.js\">"));
    let (status, js) = talkgroup_e2e::http_get(addr, "/app.js").await.unwrap();
    assert_eq!(status, 200);
    assert!(js.contains("RTCPeerConnection"));
    // Development tokens are off unless enabled.
    let (status, _) = talkgroup_e2e::http_get(addr, "/dev/token").await.unwrap();
    assert!(status == 404 || status == 405, "{status}");
    // The channel list the client shows.
    let mut c: Client = stack.client(0, "u-ana", "Ana").await;
    let list = c.ok("list-channels", json!({})).await;
    let ids: Vec<&str> = list["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["channelId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["ops", "security", "stage"]);
    c.join("ops").await;
    let list = c.ok("list-channels", json!({})).await;
    assert_eq!(list["channels"][0]["memberCount"], 1);
}

/// A counter's value in a Prometheus exposition (0 when absent).
fn counter(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_audio_reaches_a_session_the_server_dropped() {
    // Sessions expire 3 s after their gateway stops touching them; a socket that answers no
    // ping for two 1 s intervals is closed.
    let topology = Topology {
        gateways: 2,
        state_args: vec!["--session-ttl-ms".into(), "3000".into()],
        gateway_args: vec!["--ping-interval-ms".into(), "1000".into()],
        ..Topology::default()
    };
    let mut stack = Stack::start(topology).await.unwrap();
    stack.ready().await.unwrap();
    let mut ana = stack.client(0, "u-ana", "Ana").await;
    let mut cai = stack.client(0, "u-cai", "Cai").await;
    // Listen-only users: Dee will stop reading her socket; Gus's gateway will be killed.
    let mut dee = stack.client(0, "u-dee", "Dee").await;
    let mut gus = stack.client(1, "u-gus", "Gus").await;
    for c in [&mut ana, &mut cai, &mut dee, &mut gus] {
        c.join("ops").await;
    }
    // The listeners' sockets are read in the background, as a client's would be.
    let mic = ana.speaker("ops").await;
    let (cai_ear, _) = cai.listener("ops").await;
    let cai = cai.into_ws().keep_reading();
    let (dee_ear, _) = dee.listener("ops").await;
    let dee = dee.into_ws().keep_reading();
    let (gus_ear, _) = gus.listener("ops").await;
    let _gus = gus.into_ws().keep_reading();

    // Everyone hears Ana's first transmission.
    assert_eq!(ana.ptt_start("ops").await["granted"], true);
    let mut tone = Tone::new(440.0);
    tone.play(&mic, 30).await;
    for (ear, who) in [(&cai_ear, "Cai"), (&dee_ear, "Dee"), (&gus_ear, "Gus")] {
        wait_packets(ear, 20, who).await;
    }
    ana.ptt_stop("ops").await;

    // Dee stops reading (no pongs: her gateway closes her socket); Gus's gateway dies with
    // -9 (his session expires in state-svc). Both leave the member list, as Ana sees.
    let _dee_unread = dee.stop().await;
    drop(stack.gateways.remove(1));
    ana.members_until("ops", |m| !m.contains("u-dee") && !m.contains("u-gus"))
        .await;
    let ana = ana.into_ws().keep_reading();

    // The node closed their transports (Dee's when her gateway said so or state-svc reported
    // her gone, Gus's when state-svc reported his session gone).
    let media = stack.media[0].logged_addr("metrics listening").unwrap();
    testkit::wait_until(
        Duration::from_secs(5),
        "their transports closed",
        || async {
            let metrics = http_get(media, "/metrics")
                .await
                .map(|(_, m)| m)
                .unwrap_or_default();
            counter(
                &metrics,
                r#"ptt_media_transports_reaped_total{reason="session-ended"} "#,
            ) >= 1
                && counter(&metrics, "ptt_media_peer_connections ") == 2
        },
    )
    .await
    .unwrap();

    // Ana's next transmission reaches Cai, and nobody who was dropped.
    let (dee_before, gus_before) = (dee_ear.received_count(), gus_ear.received_count());
    let cai_before = cai_ear.received_count();
    let mut ana = Client::from_ws(ana.stop().await, "u-ana");
    assert_eq!(ana.ptt_start("ops").await["granted"], true);
    tone.play(&mic, 30).await;
    wait_packets(
        &cai_ear,
        cai_before + 20,
        "Cai hears the second transmission",
    )
    .await;
    assert_eq!(
        dee_ear.received_count(),
        dee_before,
        "Dee was dropped: no audio for her"
    );
    assert_eq!(
        gus_ear.received_count(),
        gus_before,
        "Gus was dropped: no audio for him"
    );
    let mut cai = Client::from_ws(cai.stop().await, "u-cai");
    assert_eq!(
        cai.request("ping", json!({})).await["type"],
        "pong",
        "Cai was kept"
    );
    mic.close().await;
}

//! The whole stack when Redis fails: under Sentinel, and under Cluster, the loop comes back by
//! itself after the master is killed (a replica promoted, state-svc following it), with the
//! membership that was replicated before; a single Redis that comes back empty leaves no socket without a session,
//! and grant changes reach the sockets again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use serde_json::json;
use talkgroup_e2e::{Client, Stack, Topology, wait_packets};
use talkgroup_proto::state::v1 as spb;
use testkit::media::Tone;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn talk_through_sentinel_and_again_after_the_master_dies() {
    let stack = Stack::start(Topology {
        sentinel: true,
        cluster: false,
        ..Topology::default()
    })
    .await
    .unwrap();
    let old = std::sync::OnceLock::new();
    talk_across_a_failover(
        stack,
        |stack| {
            old.set(stack.sentinels.as_mut().unwrap().kill_master().unwrap())
                .unwrap();
        },
        |stack| {
            let sentinels = stack.sentinels.as_ref().unwrap();
            assert_ne!(
                sentinels.master_port().unwrap(),
                sentinels.servers[*old.get().unwrap()].port(),
                "a replica was promoted"
            );
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn talk_through_a_cluster_and_again_after_the_channel_s_master_dies() {
    let stack = Stack::start(Topology {
        sentinel: false,
        cluster: true,
        ..Topology::default()
    })
    .await
    .unwrap();
    let killed = std::sync::OnceLock::new();
    talk_across_a_failover(
        stack,
        |stack| {
            let cluster = stack.cluster.as_mut().unwrap();
            killed
                .set(cluster.kill_master_of("e2e:{ch:ops}:floor").unwrap())
                .unwrap();
        },
        |stack| {
            let cluster = stack.cluster.as_ref().unwrap();
            let now = cluster.master_of("e2e:{ch:ops}:floor").unwrap();
            assert_ne!(now, *killed.get().unwrap(), "a replica was promoted");
        },
    )
    .await;
}

/// Ana talks to Ben on `ops`; `kill` kills the master that holds it; presses are refused
/// until a replica is promoted (`promoted` checks it was), then Ana is granted again with a
/// higher epoch, Ben hears her, and the membership survived.
async fn talk_across_a_failover(
    mut stack: Stack,
    kill: impl FnOnce(&mut Stack),
    promoted: impl FnOnce(&Stack),
) {
    stack.ready().await.unwrap();
    let mut ana = stack.client(0, "u-ana", "Ana").await;
    let mut ben = stack.client(0, "u-ben", "Ben").await;
    ana.join("ops").await;
    ben.join("ops").await;
    let mic = ana.speaker("ops").await;
    let (ear, _) = ben.listener("ops").await;
    assert_eq!(ana.ptt_start("ops").await["granted"], true);
    let mut tone = Tone::new(440.0);
    tone.play(&mic, 25).await;
    wait_packets(&ear, 20, "Ben hears Ana").await;
    ana.ptt_stop("ops").await;
    let first = ben.speaker_changed("ops", "released").await;

    kill(&mut stack);
    let killed = Instant::now();
    // Presses are refused (UNAVAILABLE) until the promoted replica serves; never granted twice.
    let granted = loop {
        let reply = ana.request("ptt-start", json!({"channelId": "ops"})).await;
        if reply["data"]["granted"] == true {
            break reply["data"].clone();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "no grant 30 s after the failover: {reply}"
        );
        assert_ne!(reply["data"]["granted"], true);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "granted again {:?} after the master was killed",
        killed.elapsed()
    );
    promoted(&stack);
    assert!(granted["epoch"].as_u64().unwrap() > first["epoch"].as_u64().unwrap());
    let before = ear.received_count();
    tone.play(&mic, 25).await;
    wait_packets(&ear, before + 20, "Ben hears Ana after the failover").await;
    ana.ptt_stop("ops").await;
    // Ben sees the floor free: the release itself, or a resynchronised channel state when it
    // was published while state-svc was still subscribing to the new master.
    let epoch = granted["epoch"].as_u64().unwrap();
    let freed = ben
        .frame_where(|f| {
            let d = &f["data"];
            (f["type"] == "speaker-changed" && d["reason"] == "released")
                || (f["type"] == "channel-state"
                    && d["speaker"].is_null()
                    && d["epoch"].as_u64().unwrap_or(0) > epoch)
        })
        .await;
    assert!(freed["data"]["speaker"].is_null(), "{freed}");
    // The membership was replicated before the failover: Ben is still listed (a join again is
    // idempotent and answers the channel's state).
    let state = ana.join("ops").await;
    let members: Vec<&str> = state["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["userId"].as_str())
        .collect();
    assert!(members.contains(&"u-ben"), "{state}");
}

fn grant(user: &str, channel: &str, role: spb::Role) -> spb::SetUserGrantsRequest {
    spb::SetUserGrantsRequest {
        user_id: user.into(),
        grants: vec![spb::Grant {
            channel_id: channel.into(),
            role: role.into(),
        }],
        replace: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_back_empty_closes_sessionless_sockets_and_grant_changes_still_reach_them() {
    // Sessions of 3 s: gateways touch them every second, so a lost one is noticed at once.
    // One server: this test restarts it empty.
    let mut stack = Stack::start(Topology {
        state_args: vec!["--session-ttl-ms".into(), "3000".into()],
        sentinel: false,
        cluster: false,
        ..Topology::default()
    })
    .await
    .unwrap();
    stack.ready().await.unwrap();
    let gw = stack.gateway(0);
    let mut access = stack.access().await.unwrap();
    access
        .set_user_grants(grant("u-ana", "ops", spb::Role::Talk))
        .await
        .unwrap();
    let mut ana = stack.client(0, "u-ana", "Ana").await;
    let session = ana.session().await;
    ana.join("ops").await;

    // Redis dies and comes back with nothing: Ana's session is gone, and her socket is closed
    // with the documented code instead of living on without one.
    stack.redis.kill();
    stack.redis.restart().unwrap();
    assert_eq!(ana.close_code().await, 4004, "a socket without a session");
    // Her resume token died with the session: she gets a fresh one and joins again.
    let mut ana =
        Client::resume(gw, "u-ana", "Ana", session["resumeToken"].as_str().unwrap()).await;
    let fresh = ana.session().await;
    assert_eq!(fresh["resumeError"], "resume-refused", "{fresh}");
    ana.join("ops").await;

    // A revocation stored now reaches her socket (its version carries on above the lost
    // ones), and she is out of the channel.
    access
        .set_user_grants(grant("u-ana", "ops", spb::Role::None))
        .await
        .unwrap();
    let update = ana
        .push_where("permission-update", |d| d["revoked"] == json!(["ops"]))
        .await;
    assert_eq!(update["data"]["revoked"], json!(["ops"]), "{update}");
    let refused = ana
        .request("join-channel", json!({"channelId": "ops"}))
        .await;
    assert_eq!(refused["error"]["code"], "FORBIDDEN", "{refused}");
}

//! Roles, live permission changes, dispatch priority and the emergency broadcast, over the real
//! binaries with real WebRTC audio.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use talkgroup_e2e::{
    Client, Stack, Topology, assert_tone, assert_tone_in, error_code, wait_packets,
};
use talkgroup_proto::state::v1 as spb;
use testkit::media::{Peer, Tone};

async fn set_event(stack: &Stack, event: &str, channels: &[&str]) {
    stack
        .access()
        .await
        .unwrap()
        .set_event_channels(spb::SetEventChannelsRequest {
            event_id: event.into(),
            channel_ids: channels.iter().map(|c| (*c).to_owned()).collect(),
        })
        .await
        .unwrap();
}

async fn stored_grants(stack: &Stack, user: &str) -> spb::UserGrants {
    stack
        .access()
        .await
        .unwrap()
        .get_user_grants(spb::GetUserGrantsRequest {
            user_id: user.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_decide_who_may_join_listen_and_talk() {
    let stack = Stack::start(Topology::default()).await.unwrap();
    stack.ready().await.unwrap();
    let mut lee = stack
        .client_with(0, "u-lee", "Lee", &json!({"ops": "listen"}))
        .await;
    let mut tom = stack
        .client_with(0, "u-tom", "Tom", &json!({"ops": "talk"}))
        .await;

    // A listener joins and hears, but may not talk, send or pre-empt; other channels are shut.
    let joined = lee.ok("join-channel", json!({"channelId": "ops"})).await;
    assert_eq!(joined["role"], "listen");
    for (kind, data) in [
        ("ptt-start", json!({"channelId": "ops"})),
        ("priority-ptt-start", json!({"channelId": "ops"})),
        (
            "create-transport",
            json!({"channelId": "ops", "direction": "send"}),
        ),
        ("join-channel", json!({"channelId": "stage"})),
    ] {
        let reply = lee.request(kind, data).await;
        assert_eq!(error_code(&reply), "FORBIDDEN", "{kind}: {reply}");
    }
    let listed = lee.ok("list-channels", json!({})).await;
    assert_eq!(
        listed["channels"],
        json!([{"channelId": "ops", "speaker": null, "busy": false, "memberCount": 1, "role": "listen"}])
    );

    // A talker may not raise the priority or use dispatcher requests.
    tom.join("ops").await;
    for (kind, data) in [
        ("ptt-start", json!({"channelId": "ops", "priority": 5})),
        ("priority-ptt-start", json!({"channelId": "ops"})),
        (
            "emergency-broadcast-start",
            json!({"eventId": "fest", "confirm": "EMERGENCY"}),
        ),
    ] {
        let reply = tom.request(kind, data).await;
        assert!(
            matches!(error_code(&reply), "FORBIDDEN" | "NOT_FOUND"),
            "{kind}: {reply}"
        );
    }

    // The listener hears the talker.
    let mic = tom.speaker("ops").await;
    let (ear, _) = lee.listener("ops").await;
    assert_eq!(tom.ptt_start("ops").await["granted"], true);
    Tone::new(440.0).play(&mic, 40).await;
    wait_packets(&ear, 30, "Lee hears Tom").await;
    assert_tone(&ear, 0, 440.0, "Lee");

    // A token whose grants name an unknown role is refused before the upgrade.
    let forged = talkgroup_e2e::client::token_with_grants("u-x", "X", &json!({"ops": "god"}));
    let url = format!("ws://{}/ws?token={forged}", stack.gateway(0));
    let refused = tokio_tungstenite::connect_async(url).await.unwrap_err();
    assert!(refused.to_string().contains("401"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_revocation_reaches_another_gateway_within_a_second() {
    let stack = Stack::start(Topology {
        state: 2,
        gateways: 2,
        ..Topology::default()
    })
    .await
    .unwrap();
    stack.ready().await.unwrap();
    set_event(&stack, "fest", &["gate", "stage", "bar"]).await;
    set_event(&stack, "vip", &["lounge"]).await;

    // Ana is on gateway 1, talking in `bar`; Bo listens there from gateway 0.
    let mut ana = stack.client(1, "u-ana", "Ana").await;
    let mut bo = stack.client(0, "u-bo", "Bo").await;
    ana.join("gate").await;
    ana.join("bar").await;
    bo.join("bar").await;
    let _mic = ana.speaker("bar").await;
    let (_ear, _) = ana.listener("bar").await;
    assert_eq!(ana.ptt_start("bar").await["granted"], true);
    bo.speaker_changed("bar", "granted").await;

    // Forged and hostile payloads on the membership channel change nothing.
    let mut redis = redis::Client::open(stack.redis_publish_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let huge: Vec<String> = (0..300).map(|i| format!("c{i}")).collect();
    let forged = [
        json!({"eventId": "fest", "userId": "u-ana", "channelIds": ["gate"], "action": "set_user_channels", "role": "admin"}).to_string(),
        json!({"eventId": "fest", "userId": "u-ana", "channelIds": huge, "action": "set_user_channels"}).to_string(),
        json!({"eventId": "fest", "userId": "u-ana", "channelIds": ["gate", "lounge"], "action": "set_user_channels"}).to_string(),
        json!({"eventId": "fest", "userId": "u-ana", "channelIds": [1, 2], "action": "set_user_channels"}).to_string(),
        json!({"eventId": "fest", "userId": "u-ana", "channelIds": ["gate"], "action": "drop_tables"}).to_string(),
        json!({"eventId": "nope", "userId": "u-ana", "channelIds": ["gate"], "action": "set_user_channels"}).to_string(),
        "{not json".to_owned(),
        "x".repeat(70 * 1024),
    ];
    for payload in &forged {
        let _: i64 = redis::cmd("PUBLISH")
            .arg("vp:membership_updates")
            .arg(payload)
            .query_async(&mut redis)
            .await
            .unwrap();
    }

    // The real update: within the event Ana keeps `gate` and `stage`; `bar` is revoked.
    let valid = json!({"eventId": "fest", "userId": "u-ana", "channelIds": ["gate", "stage"], "action": "set_user_channels"});
    let published = Instant::now();
    let _: i64 = redis::cmd("PUBLISH")
        .arg("vp:membership_updates")
        .arg(valid.to_string())
        .query_async(&mut redis)
        .await
        .unwrap();
    // The first permission-update Ana gets is the real one: none of the forged ones applied.
    let update = ana.push("permission-update").await;
    let told_in = published.elapsed();
    assert_eq!(update["data"]["revoked"], json!(["bar"]), "{update}");
    bo.members_until("bar", |m| !m.contains("u-ana")).await;
    let removed_in = published.elapsed();
    assert!(
        removed_in < Duration::from_secs(1),
        "revocation took {removed_in:?} (told in {told_in:?})"
    );
    eprintln!("revocation: told in {told_in:?}, removed everywhere in {removed_in:?}");
    let stored = stored_grants(&stack, "u-ana").await;
    let names: Vec<&str> = stored
        .grants
        .iter()
        .map(|g| g.channel_id.as_str())
        .collect();
    assert!(
        !names.iter().any(|c| *c == "lounge" || c.starts_with('c')),
        "forged updates changed the grants: {names:?}"
    );
    assert!(
        stored.grants.iter().all(|g| g.role() != spb::Role::Admin),
        "a forged role was stored: {stored:?}"
    );

    // Ana cannot come back to `bar`, still talks in `gate`.
    let reply = ana
        .request("join-channel", json!({"channelId": "bar"}))
        .await;
    assert_eq!(error_code(&reply), "FORBIDDEN");
    assert_eq!(ana.ptt_start("gate").await["granted"], true);

    // Grants set through the API open it again, live.
    stack
        .access()
        .await
        .unwrap()
        .set_user_grants(spb::SetUserGrantsRequest {
            user_id: "u-ana".into(),
            grants: vec![spb::Grant {
                channel_id: "bar".into(),
                role: spb::Role::Listen.into(),
            }],
            replace: false,
        })
        .await
        .unwrap();
    let update = ana
        .push_where("permission-update", |d| {
            d["channels"]
                .as_array()
                .is_some_and(|c| c.contains(&json!({"channelId": "bar", "role": "listen"})))
        })
        .await;
    assert_eq!(update["data"]["revoked"], json!([]));
    assert_eq!(ana.join("bar").await["channelId"], "bar");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatcher_interrupts_a_talker_and_only_the_dispatcher_is_heard() {
    let stack = Stack::start(Topology::default()).await.unwrap();
    stack.ready().await.unwrap();
    let mut tom = stack
        .client_with(0, "u-tom", "Tom", &json!({"ops": "talk"}))
        .await;
    let mut dee = stack
        .client_with(0, "u-dee", "Dee", &json!({"ops": "dispatch"}))
        .await;
    let mut lee = stack
        .client_with(0, "u-lee", "Lee", &json!({"ops": "listen"}))
        .await;
    for c in [&mut tom, &mut dee, &mut lee] {
        c.join("ops").await;
    }
    let tom_mic = tom.speaker("ops").await;
    let dee_mic = dee.speaker("ops").await;
    let (ear, _) = lee.listener("ops").await;
    assert_eq!(tom.ptt_start("ops").await["granted"], true);

    // Tom keeps talking (440 Hz) the whole time; Dee cuts in with 1 kHz.
    let mut tom_tone = Tone::new(440.0);
    let mut dee_tone = Tone::new(1_000.0);
    let (_, (from, count_at_grant)) = tokio::join!(tom_tone.play(&tom_mic, 175), async {
        wait_packets(&ear, 25, "Lee hears Tom").await;
        let granted = dee
            .ok("priority-ptt-start", json!({"channelId": "ops"}))
            .await;
        assert_eq!(granted["granted"], true, "{granted}");
        let at_grant = ear.received_count();
        // Skip frames already in flight when the floor moved.
        let from = at_grant + 5;
        dee_tone.play(&dee_mic, 100).await;
        (from, at_grant)
    });
    assert_tone_in(&ear, 0..count_at_grant, 440.0, "Lee before the interrupt");
    wait_packets(&ear, from + 80, "Lee hears Dee").await;
    assert_tone(&ear, from, 1_000.0, "Lee after the interrupt");
    // One stream, not two mixed: about one packet per 20 ms while both were sending.
    let during = ear.received_count() - count_at_grant;
    assert!(
        during <= 110,
        "{during} packets for 100 frames: the talker leaked"
    );

    let interrupted = tom.push("ptt-interrupted").await;
    assert_eq!(interrupted["data"]["by"]["userId"], "u-dee");
    assert_eq!(interrupted["data"]["reason"], "preempted");
    let changed = lee.speaker_changed("ops", "preempted").await;
    assert_eq!(changed["speaker"]["userId"], "u-dee");
    // Tom cannot take it back at normal priority.
    let denied = tom.ptt_start("ops").await;
    assert_eq!(denied["granted"], false);
    assert_eq!(denied["speaker"]["userId"], "u-dee");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emergency_broadcast_reaches_every_channel_of_the_event_busy_or_not() {
    let stack = Stack::start(Topology::default()).await.unwrap();
    stack.ready().await.unwrap();
    let channels = ["c1", "c2", "c3", "c4", "c5"];
    set_event(&stack, "fest", &channels).await;
    set_event(&stack, "vip", &["lounge"]).await;
    let dispatch_all: Value = channels
        .iter()
        .map(|c| ((*c).to_owned(), json!("dispatch")))
        .collect::<serde_json::Map<_, _>>()
        .into();
    let mut dee = stack.client_with(0, "u-dee", "Dee", &dispatch_all).await;

    // Every channel has a listener; three are busy with a talker who also listens.
    let mut members: Vec<(Client, Peer, &str)> = Vec::new();
    let mut talkers = Vec::new();
    for (i, ch) in channels.iter().enumerate() {
        let mut listener = stack.client(0, &format!("u-l{i}"), &format!("L{i}")).await;
        listener.join(ch).await;
        let (ear, _) = listener.listener(ch).await;
        members.push((listener, ear, ch));
        if i < 3 {
            let mut talker = stack.client(0, &format!("u-t{i}"), &format!("T{i}")).await;
            talker.join(ch).await;
            let mic = talker.speaker(ch).await;
            let (ear, _) = talker.listener(ch).await;
            assert_eq!(talker.ptt_start(ch).await["granted"], true);
            talkers.push((talker, mic, ear, *ch));
        }
    }

    // The guards: confirmation, a foreign event, an unknown event.
    for (data, code) in [
        (json!({"eventId": "fest", "confirm": "yes"}), "BAD_REQUEST"),
        (json!({"eventId": "fest"}), "BAD_REQUEST"),
        (
            json!({"eventId": "vip", "confirm": "EMERGENCY"}),
            "FORBIDDEN",
        ),
        (
            json!({"eventId": "nope", "confirm": "EMERGENCY"}),
            "NOT_FOUND",
        ),
    ] {
        // Some are malformed on purpose: sent as they are, not through the protocol's types.
        let reply = dee
            .request_raw("emergency-broadcast-start", data.clone())
            .await;
        assert_eq!(error_code(&reply), code, "{data}");
    }

    let started = dee
        .ok(
            "emergency-broadcast-start",
            json!({"eventId": "fest", "confirm": "EMERGENCY"}),
        )
        .await;
    let granted: Vec<&str> = started["channels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["granted"] == true)
        .map(|c| c["channelId"].as_str().unwrap())
        .collect();
    assert_eq!(granted, channels);
    // Dee speaks in every channel (send transports made after the grant, as a client would).
    let mut mics = Vec::new();
    for ch in channels {
        mics.push(dee.speaker(ch).await);
    }
    for (talker, _, _, ch) in &mut talkers {
        let interrupted = talker.push("ptt-interrupted").await;
        assert_eq!(interrupted["data"]["channelId"], *ch);
        assert_eq!(interrupted["data"]["reason"], "emergency");
    }
    let marks: Vec<usize> = members
        .iter()
        .map(|(_, ear, _)| ear.received_count())
        .collect();
    let talker_marks: Vec<usize> = talkers
        .iter()
        .map(|(_, _, ear, _)| ear.received_count())
        .collect();

    // The talkers keep sending; everyone hears only Dee's 1 kHz.
    let talk = futures::future::join_all(
        talkers
            .iter()
            .map(|(_, mic, _, _)| async move { Tone::new(440.0).play(mic, 60).await }),
    );
    let broadcast = futures::future::join_all(
        mics.iter()
            .map(|mic| async move { Tone::new(1_000.0).play(mic, 60).await }),
    );
    tokio::join!(talk, broadcast);
    for ((_, ear, ch), from) in members.iter().zip(&marks) {
        wait_packets(ear, from + 45, ch).await;
        assert_tone(ear, *from, 1_000.0, &format!("listener of {ch}"));
    }
    for ((_, _, ear, ch), from) in talkers.iter().zip(&talker_marks) {
        wait_packets(ear, from + 45, ch).await;
        assert_tone(ear, *from, 1_000.0, &format!("interrupted talker of {ch}"));
    }

    // During the emergency a normal request is denied and a second dispatcher cannot take over.
    let (t0, _, _, _) = &mut talkers[0];
    let denied = t0.ptt_start("c1").await;
    assert_eq!(denied["granted"], false);
    assert_eq!(denied["speaker"]["userId"], "u-dee");
    let mut dan = stack.client_with(0, "u-dan", "Dan", &dispatch_all).await;
    let reply = dan
        .request(
            "emergency-broadcast-start",
            json!({"eventId": "fest", "confirm": "EMERGENCY"}),
        )
        .await;
    assert_eq!(error_code(&reply), "FLOOR_BUSY");
    let reply = dan
        .request("emergency-broadcast-stop", json!({"eventId": "fest"}))
        .await;
    assert_eq!(error_code(&reply), "NOT_FOUND");

    // Stop: floors are freed everywhere and normal talk resumes.
    dee.ok("emergency-broadcast-stop", json!({"eventId": "fest"}))
        .await;
    for (listener, _, ch) in &mut members {
        let ended = listener.speaker_changed(ch, "emergency-ended").await;
        assert!(ended["speaker"].is_null());
    }
    let (t0, _, _, _) = &mut talkers[0];
    assert_eq!(t0.ptt_start("c1").await["granted"], true);
}

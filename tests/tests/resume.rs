//! Session continuity end to end: a socket lost without a close frame is resumed on a new one
//! (on the same gateway, or on another after its gateway is killed) with everything the
//! session held; a resume token works only for its own user, only within the grace period,
//! and is replaced at every resume (the one before stays good until the new socket's first
//! touch, in case that socket died before its token was read).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use talkgroup_e2e::{Client, Stack, Topology, assert_tone_in, wait_packets};
use testkit::media::Tone;

/// Membership changes naming `user` among what `client` has read, newer than members version
/// `after` (older ones a client ignores).
fn membership_changes_of(client: &Client, user: &str, after: u64) -> Vec<Value> {
    client
        .pushes
        .iter()
        .filter(|p| p["type"] == "members-changed")
        .flat_map(|p| p["data"]["changes"].as_array().cloned().unwrap_or_default())
        .filter(|c| c["version"].as_u64().unwrap_or(0) > after)
        .filter(|c| c["left"] == user || c["joined"]["userId"] == user)
        .collect()
}

fn members_version(state: &Value) -> u64 {
    state["membersVersion"].as_u64().unwrap()
}

fn token_of(session: &Value) -> String {
    session["resumeToken"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_socket_resumes_with_membership_transports_and_floor() {
    // A short lease: a floor not renewed while its socket is away would lapse within the test.
    let stack = Stack::start(Topology {
        lease_ms: 1_500,
        ..Topology::default()
    })
    .await
    .unwrap();
    stack.ready().await.unwrap();
    let gw = stack.gateway(0);
    let mut ana = stack.client(0, "u-ana", "Ana").await;
    let mut ben = stack.client(0, "u-ben", "Ben").await;
    let mut cai = stack.client(0, "u-cai", "Cai").await;
    let ana_session = ana.session().await;
    let ben_session = ben.session().await;
    assert_eq!(ana_session["resumed"], false, "{ana_session}");
    assert!(ana_session["resumeGraceMs"].as_u64().unwrap() > 0);
    ana.join("ops").await;
    ben.join("ops").await;
    let base = members_version(&cai.join("ops").await);
    let mic = ana.speaker("ops").await;
    let (ear, ssrc) = ben.listener("ops").await;
    let granted = ana.ptt_start("ops").await;
    assert_eq!(granted["granted"], true, "{granted}");
    let epoch = granted["epoch"].as_u64().unwrap();
    let mut tone = Tone::new(440.0);
    tone.play(&mic, 25).await;
    wait_packets(&ear, 20, "Ben hears Ana").await;

    // Ben's connection breaks; his new socket takes the session over.
    ben.into_ws().cut();
    let mut ben = Client::resume(gw, "u-ben", "Ben", &token_of(&ben_session)).await;
    let resumed = ben.session().await;
    assert_eq!(resumed["resumed"], true, "{resumed}");
    assert_eq!(resumed["sessionId"], ben_session["sessionId"]);
    assert_ne!(
        resumed["resumeToken"], ben_session["resumeToken"],
        "the token rotates"
    );
    assert_eq!(resumed["channels"], serde_json::json!(["ops"]));
    let kept = &resumed["transports"][0];
    assert_eq!(kept["direction"], "recv", "{resumed}");
    assert_eq!(kept["ssrc"], ssrc, "{resumed}");
    let state = ben
        .push_where("channel-state", |d| d["channelId"] == "ops")
        .await;
    assert_eq!(state["data"]["speaker"]["userId"], "u-ana", "{state}");
    // He still hears, on the same transport.
    let before = ear.received_count();
    tone.play(&mic, 25).await;
    wait_packets(&ear, before + 20, "Ben hears Ana after his resume").await;

    // Ana's connection breaks while she talks; she resumes within the lease and keeps talking
    // without pressing again.
    ana.into_ws().cut();
    let mut ana = Client::resume(gw, "u-ana", "Ana", &token_of(&ana_session)).await;
    let resumed = ana.session().await;
    assert_eq!(resumed["resumed"], true, "{resumed}");
    let state = ana
        .push_where("channel-state", |d| d["channelId"] == "ops")
        .await;
    assert_eq!(state["data"]["speaker"]["userId"], "u-ana", "{state}");
    assert_eq!(state["data"]["epoch"], epoch, "{state}");
    // Longer than two leases: her renewals run again, so the floor does not lapse.
    let before = ear.received_count();
    tone.play(&mic, 175).await;
    wait_packets(&ear, before + 150, "Ben hears Ana after her resume").await;
    let tail = ear.received_count() - 50;
    assert_tone_in(&ear, tail..ear.received_count(), 440.0, "Ben");
    ana.ptt_stop("ops").await;
    let released = cai.speaker_changed("ops", "released").await;
    assert!(released["epoch"].as_u64().unwrap() > epoch, "{released}");
    // The floor was held throughout: no other release came before this one.
    assert!(
        !cai.pushes
            .iter()
            .any(|p| p["type"] == "speaker-changed" && p["data"]["reason"] == "lease-expired"),
        "the floor lapsed while Ana was away"
    );
    // Nobody saw Ana or Ben leave or join again.
    assert_eq!(
        membership_changes_of(&cai, "u-ana", base),
        Vec::<Value>::new()
    );
    assert_eq!(
        membership_changes_of(&cai, "u-ben", base),
        Vec::<Value>::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_token_works_for_its_user_within_the_grace_period() {
    let stack = Stack::start(Topology {
        state_args: vec!["--resume-grace-ms".into(), "1000".into()],
        ..Topology::default()
    })
    .await
    .unwrap();
    stack.ready().await.unwrap();
    let gw = stack.gateway(0);
    let mut ben = stack.client(0, "u-ben", "Ben").await;
    let mut cai = stack.client(0, "u-cai", "Cai").await;
    let first = ben.session().await;
    ben.join("ops").await;
    let base = members_version(&cai.join("ops").await);

    // Another user with Ben's token: refused, a session of their own instead.
    let mut eve = Client::resume(gw, "u-eve", "Eve", &token_of(&first)).await;
    let refused = eve.session().await;
    assert_eq!(refused["resumed"], false, "{refused}");
    assert_eq!(refused["resumeError"], "resume-refused", "{refused}");
    assert_ne!(refused["sessionId"], first["sessionId"]);
    // Garbage is refused the same way.
    let mut junk = Client::resume(gw, "u-ben", "Ben", "not-a-token").await;
    assert_eq!(junk.session().await["resumeError"], "resume-refused");
    junk.close().await;

    // Ben's own resume works; the socket it replaces is closed with 4005.
    let mut second = Client::resume(gw, "u-ben", "Ben", &token_of(&first)).await;
    let resumed = second.session().await;
    assert_eq!(resumed["resumed"], true, "{resumed}");
    assert_eq!(
        ben.close_code().await,
        4005,
        "the replaced socket's close code"
    );
    assert_eq!(
        membership_changes_of(&cai, "u-ben", base),
        Vec::<Value>::new()
    );

    // Lost for longer than the grace period: cleaned up as a closed socket is, and the token
    // no longer resumes.
    second.into_ws().cut();
    cai.members_until("ops", |m| !m.contains("u-ben")).await;
    let mut late = Client::resume(gw, "u-ben", "Ben", &token_of(&resumed)).await;
    let late_session = late.session().await;
    assert_eq!(
        late_session["resumeError"], "resume-refused",
        "{late_session}"
    );
    late.close().await;
    eve.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_killed_gateway_resume_on_another() {
    let mut stack = Stack::start(Topology {
        gateways: 2,
        ..Topology::default()
    })
    .await
    .unwrap();
    stack.ready().await.unwrap();
    let mut ana = stack.client(1, "u-ana", "Ana").await;
    let mut ben = stack.client(0, "u-ben", "Ben").await;
    let ben_session = ben.session().await;
    ana.join("ops").await;
    let base = members_version(&ben.join("ops").await);
    let mic = ana.speaker("ops").await;
    let (ear, _) = ben.listener("ops").await;

    // Ben's gateway dies with no chance to clean up; he comes back through the other one.
    stack.gateways[0].kill();
    let mut ben = Client::resume(stack.gateway(1), "u-ben", "Ben", &token_of(&ben_session)).await;
    let resumed = ben.session().await;
    assert_eq!(resumed["resumed"], true, "{resumed}");
    assert_eq!(
        resumed["transports"].as_array().unwrap().len(),
        1,
        "{resumed}"
    );
    // The other gateway serves his transports: he hears Ana, and may leave and rejoin.
    let granted = ana.ptt_start("ops").await;
    assert_eq!(granted["granted"], true, "{granted}");
    let mut tone = Tone::new(440.0);
    let before = ear.received_count();
    tone.play(&mic, 25).await;
    wait_packets(&ear, before + 20, "Ben hears Ana through the other gateway").await;
    ana.ptt_stop("ops").await;
    let released = ben.speaker_changed("ops", "released").await;
    assert_eq!(released["speaker"], Value::Null);
    assert_eq!(
        membership_changes_of(&ana, "u-ben", base),
        Vec::<Value>::new()
    );
}

/// Two resume edges. A client whose new socket died before it read the token its resume handed
/// it still holds only the old one: that one resumes, until the session's next touch. And a
/// user demoted to listen while no socket was there does not take the floor up again: it goes
/// back at once, and the others hear it released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_new_token_leaves_the_old_one_good_and_a_demoted_holder_gives_the_floor_back() {
    use talkgroup_proto::state::v1 as spb;
    // A lease long enough that the floor outlives the time away.
    let stack = Stack::start(Topology {
        lease_ms: 15_000,
        ..Topology::default()
    })
    .await
    .unwrap();
    stack.ready().await.unwrap();
    let gw = stack.gateway(0);
    let mut ana = stack.client(0, "u-ana", "Ana").await;
    let mut cai = stack.client(0, "u-cai", "Cai").await;
    let first = ana.session().await;
    ana.join("ops").await;
    cai.join("ops").await;
    assert_eq!(ana.ptt_start("ops").await["granted"], true);

    // Ana's socket breaks; the socket that resumes it breaks too, before she reads its token.
    ana.into_ws().cut();
    let unread = Client::resume(gw, "u-ana", "Ana", &token_of(&first)).await;
    unread.into_ws().cut();
    // Meanwhile she is demoted to listen in ops.
    stack
        .access()
        .await
        .unwrap()
        .set_user_grants(spb::SetUserGrantsRequest {
            user_id: "u-ana".into(),
            grants: vec![spb::Grant {
                channel_id: "ops".into(),
                role: spb::Role::Listen.into(),
            }],
            replace: false,
        })
        .await
        .unwrap();
    // The old token is all she has, and it still works.
    let mut ana = Client::resume(gw, "u-ana", "Ana", &token_of(&first)).await;
    let resumed = ana.session().await;
    assert_eq!(resumed["resumed"], true, "{resumed}");
    assert_eq!(resumed["sessionId"], first["sessionId"]);
    // Her floor goes back at once: everyone hears it released, long before its lease ends.
    let released = cai.speaker_changed("ops", "released").await;
    assert!(released["speaker"].is_null(), "{released}");
}

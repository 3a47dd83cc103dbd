//! The event plane end to end: a gateway hears a user's events (grant changes, takeovers,
//! kicks) only while it holds a socket of that user, and a sync session's changes only while
//! it has a member of the session's channel. Counted by each gateway's
//! `ptt_gateway_topic_events_total`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use talkgroup_common::tls::Identity;
use talkgroup_e2e::{ADMIN_TOKEN, Client, Stack, Topology, http_get};
use talkgroup_proto::admin::v1 as apb;
use talkgroup_proto::state::v1 as spb;
use tonic::metadata::MetadataValue;

/// Events of `kind` topics a gateway has received from state-svc (`metrics`: its metrics
/// listener).
async fn received(metrics: SocketAddr, kind: &str) -> u64 {
    let (status, body) = http_get(metrics, "/metrics").await.expect("metrics");
    let prefix = format!("ptt_gateway_topic_events_total{{kind=\"{kind}\"}} ");
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().expect("a count"))
}

async fn set_grants(stack: &Stack, user: &str, channel: &str, role: spb::Role) {
    stack
        .access()
        .await
        .unwrap()
        .set_user_grants(spb::SetUserGrantsRequest {
            user_id: user.into(),
            grants: vec![spb::Grant {
                channel_id: channel.into(),
                role: role.into(),
            }],
            replace: false,
        })
        .await
        .unwrap();
}

fn listens_to_extra(update: &serde_json::Value) -> bool {
    update["channels"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["channelId"] == "extra" && c["role"] == "listen")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_sync_events_reach_only_the_gateways_that_need_them() {
    let stack = Stack::start(Topology {
        gateways: 2,
        ..Topology::default()
    })
    .await
    .unwrap();
    stack.ready().await.unwrap();
    // Each gateway's metrics listener.
    let metrics = |i: usize| stack.gateways[i].logged_addr("metrics listening").unwrap();
    let (first, second) = (metrics(0), metrics(1));
    // Ana only on the first gateway; Bo, in another channel, only on the second.
    let mut ana = stack
        .client_with(0, "u-ana", "Ana", &json!({"ops": "dispatch"}))
        .await;
    let ana_session = ana.session().await;
    ana.join("ops").await;
    let mut bo = stack.client(1, "u-bo", "Bo").await;
    bo.join("other").await;
    // Each gateway has its own user's grants (the user topic's state at subscribe).
    for gateway in [first, second] {
        testkit::wait_until(
            Duration::from_secs(10),
            "the user topic's state",
            || async move { received(gateway, "user").await >= 1 },
        )
        .await
        .unwrap();
    }
    let second_users = received(second, "user").await;
    let first_users = received(first, "user").await;

    // A grant change of Ana's.
    set_grants(&stack, "u-ana", "extra", spb::Role::Listen).await;
    ana.push_where("permission-update", listens_to_extra).await;

    // A sync session in Ana's channel, created and started.
    ana.ok(
        "sync-create",
        json!({"sessionId": "briefing", "channelId": "ops", "mode": "global",
               "participants": [{"participantId": "ana"}], "totalTimeMs": 60000}),
    )
    .await;
    ana.ok("sync-start", json!({"sessionId": "briefing"})).await;
    ana.sync_until("briefing", |s| s["status"] == "running")
        .await;

    // A takeover: a second socket resumes Ana's session; the first closes with 4005.
    let token = ana_session["resumeToken"].as_str().unwrap().to_owned();
    let mut again = Client::resume(stack.gateway(0), "u-ana", "Ana", &token).await;
    assert_eq!(again.session().await["resumed"], true);
    assert_eq!(ana.close_code().await, 4005);

    // A kick: the resumed socket is told and closed.
    let mut admin = apb::admin_service_client::AdminServiceClient::new(
        stack.state_channel(0, &Identity::Admin).unwrap(),
    );
    let mut request = tonic::Request::new(apb::KickUserRequest {
        user_id: "u-ana".into(),
        reason: "end of shift".into(),
    });
    let bearer: MetadataValue<_> = format!("Bearer {ADMIN_TOKEN}").parse().unwrap();
    request.metadata_mut().insert("authorization", bearer);
    admin.kick_user(request).await.unwrap();
    let kicked = again.push("force-disconnect").await;
    assert_eq!(kicked["data"]["reason"], "end of shift");

    // Last, a change of Bo's own: once it has reached the second gateway, so would have
    // anything of Ana's sent before it.
    set_grants(&stack, "u-bo", "extra", spb::Role::Listen).await;
    bo.push_where("permission-update", listens_to_extra).await;

    let first_after = received(first, "user").await;
    assert!(
        first_after >= first_users + 3,
        "the grant change, the takeover and the kick reached the first gateway: {first_users} -> {first_after}"
    );
    assert_eq!(
        received(second, "user").await,
        second_users + 1,
        "only Bo's own change reached the second gateway"
    );
    assert!(
        received(first, "sync").await >= 2,
        "the sync session's changes reached Ana's gateway"
    );
    assert_eq!(
        received(second, "sync").await,
        0,
        "no member of ops on the second gateway: none of its sync changes"
    );
    bo.close().await;
}

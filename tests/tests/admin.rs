//! The admin API over real gRPC against the real binaries, and `pttctl` against a running stack.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Output;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use talkgroup_common::tls::Identity;
use talkgroup_e2e::{ADMIN_TOKEN, Stack, Topology, binary};
use talkgroup_proto::admin::v1 as apb;
use talkgroup_proto::state::v1 as spb;
use tokio_tungstenite::tungstenite::Message;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

type Admin = apb::admin_service_client::AdminServiceClient<Channel>;

async fn admin(stack: &Stack) -> Admin {
    Admin::new(stack.state_channel(0, &Identity::Admin).unwrap())
}

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        let value: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// Every admin call once with `token`: the status code of each.
async fn every_call(admin: &mut Admin, token: Option<&str>) -> Vec<(&'static str, Code)> {
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
    let t = || token;
    vec![
        (
            "ListChannels",
            code(
                admin
                    .list_channels(with_token(apb::ListChannelsRequest {}, t()))
                    .await
                    .map(drop),
            ),
        ),
        (
            "GetChannel",
            code(
                admin
                    .get_channel(with_token(
                        apb::GetChannelRequest {
                            channel_id: "ops".into(),
                        },
                        t(),
                    ))
                    .await
                    .map(drop),
            ),
        ),
        (
            "ForceReleaseFloor",
            code(
                admin
                    .force_release_floor(with_token(
                        apb::ForceReleaseFloorRequest {
                            channel_id: "idle".into(),
                        },
                        t(),
                    ))
                    .await
                    .map(drop),
            ),
        ),
        (
            "KickUser",
            code(
                admin
                    .kick_user(with_token(
                        apb::KickUserRequest {
                            user_id: "u-nobody".into(),
                            reason: String::new(),
                        },
                        t(),
                    ))
                    .await
                    .map(drop),
            ),
        ),
        (
            "ListSessions",
            code(
                admin
                    .list_sessions(with_token(
                        apb::ListSessionsRequest {
                            user_id: String::new(),
                            limit: 0,
                        },
                        t(),
                    ))
                    .await
                    .map(drop),
            ),
        ),
        (
            "ListMediaNodes",
            code(
                admin
                    .list_media_nodes(with_token(apb::ListMediaNodesRequest {}, t()))
                    .await
                    .map(drop),
            ),
        ),
        (
            "GetUserGrants",
            code(
                admin
                    .get_user_grants(with_token(
                        spb::GetUserGrantsRequest {
                            user_id: "u-x".into(),
                        },
                        t(),
                    ))
                    .await
                    .map(drop),
            ),
        ),
        (
            "SetUserGrants",
            code(
                admin
                    .set_user_grants(with_token(
                        spb::SetUserGrantsRequest {
                            user_id: "u-x".into(),
                            grants: vec![],
                            replace: false,
                        },
                        t(),
                    ))
                    .await
                    .map(drop),
            ),
        ),
        (
            "SetEventChannels",
            code(
                admin
                    .set_event_channels(with_token(
                        spb::SetEventChannelsRequest {
                            event_id: "probe".into(),
                            channel_ids: vec!["probe-1".into()],
                        },
                        t(),
                    ))
                    .await
                    .map(drop),
            ),
        ),
        (
            "GetEvent",
            code(
                admin
                    .get_event(with_token(
                        spb::GetEventRequest {
                            event_id: "probe".into(),
                        },
                        t(),
                    ))
                    .await
                    .map(drop),
            ),
        ),
        (
            "EventSpeakers",
            code(
                admin
                    .event_speakers(with_token(
                        spb::GetEventRequest {
                            event_id: "probe".into(),
                        },
                        t(),
                    ))
                    .await
                    .map(drop),
            ),
        ),
        (
            "PauseEvent",
            code(
                admin
                    .pause_event(with_token(
                        spb::GetEventRequest {
                            event_id: "probe".into(),
                        },
                        t(),
                    ))
                    .await
                    .map(drop),
            ),
        ),
        (
            "StopEmergency",
            code(
                admin
                    .stop_emergency(with_token(
                        apb::StopEmergencyRequest {
                            event_id: "probe".into(),
                        },
                        t(),
                    ))
                    .await
                    .map(drop),
            ),
        ),
        (
            "TalkHistory",
            code(
                admin
                    .talk_history(with_token(
                        apb::TalkHistoryRequest {
                            channel_id: "ops".into(),
                            ..Default::default()
                        },
                        t(),
                    ))
                    .await
                    .map(drop),
            ),
        ),
        (
            "SyncHistory",
            code(
                admin
                    .sync_history(with_token(
                        apb::SyncHistoryRequest {
                            session_id: "probe".into(),
                            limit: 0,
                        },
                        t(),
                    ))
                    .await
                    .map(drop),
            ),
        ),
        // Last: it changes placement for the rest of the test.
        (
            "DrainMediaNode",
            code(
                admin
                    .drain_media_node(with_token(
                        apb::DrainMediaNodeRequest {
                            node_id: "media-9".into(),
                        },
                        t(),
                    ))
                    .await
                    .map(drop),
            ),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_need_the_token_and_reach_clients_on_another_gateway() {
    let stack = Stack::start(Topology {
        state: 2,
        gateways: 2,
        ..Topology::default()
    })
    .await
    .unwrap();
    stack.ready().await.unwrap();
    let mut admin = admin(&stack).await;

    for token in [None, Some("not-the-admin-token-at-all"), Some("")] {
        for (call, code) in every_call(&mut admin, token).await {
            assert_eq!(code, Code::Unauthenticated, "{call} with {token:?}");
        }
    }
    for (call, code) in every_call(&mut admin, Some(ADMIN_TOKEN)).await {
        // Stopping an emergency that is not running and draining an unknown node are refused
        // on their merits, not for the token.
        let expected = match call {
            "StopEmergency" | "DrainMediaNode" => Code::NotFound,
            // This stack has no audit database.
            "TalkHistory" | "SyncHistory" => Code::FailedPrecondition,
            _ => Code::Ok,
        };
        assert_eq!(code, expected, "{call}");
    }

    // Ana talks on gateway 1; Bo watches from gateway 0.
    let mut ana = stack.client(1, "u-ana", "Ana").await;
    let mut bo = stack.client(0, "u-bo", "Bo").await;
    ana.join("ops").await;
    bo.join("ops").await;
    assert_eq!(ana.ptt_start("ops").await["granted"], true);
    // Bo learns that Ana talks: as a speaker-changed push, or, when the grant came in the
    // moment before gateway 0 followed the channel, in the channel-state snapshot it pushes.
    bo.frame_where(|f| {
        (f["type"] == "speaker-changed" && f["data"]["reason"] == "granted")
            || (f["type"] == "channel-state" && f["data"]["speaker"]["userId"] == "u-ana")
    })
    .await;

    let listed = admin
        .list_channels(with_token(apb::ListChannelsRequest {}, Some(ADMIN_TOKEN)))
        .await
        .unwrap()
        .into_inner();
    let ops = listed
        .channels
        .iter()
        .find(|c| c.channel_id == "ops")
        .unwrap();
    assert_eq!(ops.member_count, 2);
    assert_eq!(
        ops.holder
            .as_ref()
            .unwrap()
            .speaker
            .as_ref()
            .unwrap()
            .user_id,
        "u-ana"
    );

    // Force release: both clients are told, on both gateways.
    let released = admin
        .force_release_floor(with_token(
            apb::ForceReleaseFloorRequest {
                channel_id: "ops".into(),
            },
            Some(ADMIN_TOKEN),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(released.released);
    for c in [&mut ana, &mut bo] {
        let changed = c.speaker_changed("ops", "force-released").await;
        assert!(changed["speaker"].is_null());
    }

    // Kick: Ana's socket gets force-disconnect and closes with 4000; Bo sees her leave.
    let kicked = admin
        .kick_user(with_token(
            apb::KickUserRequest {
                user_id: "u-ana".into(),
                reason: "end of shift".into(),
            },
            Some(ADMIN_TOKEN),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kicked.sessions_closed, 1);
    let push = ana.push("force-disconnect").await;
    assert_eq!(push["data"]["reason"], "end of shift");
    let close = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(message)) = ana.ws.next().await {
            if let Message::Close(frame) = message {
                return frame.map(|f| u16::from(f.code));
            }
        }
        None
    })
    .await
    .unwrap();
    assert_eq!(close, Some(4000));
    bo.members_until("ops", |m| !m.contains("u-ana")).await;
}

fn pttctl(stack: &Stack, token: &str, args: &[&str]) -> Output {
    std::process::Command::new(binary("pttctl").unwrap())
        .arg("--server")
        .arg(stack.state_url(0))
        .args(stack.admin_tls_args().unwrap())
        .args(args)
        .env("PTT_ADMIN_TOKEN", token)
        .output()
        .unwrap()
}

fn ok_json(stack: &Stack, args: &[&str]) -> Value {
    let out = pttctl(stack, ADMIN_TOKEN, &[&["--json"], args].concat());
    assert!(
        out.status.success(),
        "pttctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn ok_text(stack: &Stack, args: &[&str]) -> String {
    let out = pttctl(stack, ADMIN_TOKEN, args);
    assert!(
        out.status.success(),
        "pttctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pttctl_administers_a_running_stack() {
    let stack = Stack::start(Topology::default()).await.unwrap();
    stack.ready().await.unwrap();

    // A wrong token: exit 1 and the status, nothing else.
    let refused = pttctl(&stack, "wrong-token-0123456789", &["channels"]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("Unauthenticated"), "{stderr}");
    assert!(!stderr.contains("wrong-token"), "{stderr}");
    // Bad usage: exit 2.
    assert_eq!(
        pttctl(&stack, ADMIN_TOKEN, &["grant", "u-x", "ops"])
            .status
            .code(),
        Some(1)
    );
    assert_eq!(pttctl(&stack, ADMIN_TOKEN, &["fly"]).status.code(), Some(2));

    // Grants, live: Cai can listen in ops only after pttctl says so.
    let mut cai = stack.client_with(0, "u-cai", "Cai", &json!({})).await;
    let reply = cai
        .request("join-channel", json!({"channelId": "ops"}))
        .await;
    assert_eq!(reply["error"]["code"], "FORBIDDEN");
    let grants = ok_json(&stack, &["grant", "u-cai", "ops=listen", "stage=talk"]);
    assert!(grants["version"].as_u64().unwrap() > 0, "{grants}");
    assert_eq!(
        grants["grants"],
        json!([{"channelId": "ops", "role": "listen"}, {"channelId": "stage", "role": "talk"}])
    );
    cai.push("permission-update").await;
    assert_eq!(cai.join("ops").await["channelId"], "ops");
    let text = ok_text(&stack, &["grants", "u-cai"]);
    assert!(text.contains("ops      listen"), "{text}");

    // Events, channels, speakers, sessions, nodes.
    let event = ok_json(&stack, &["set-event", "fest", "ops", "stage"]);
    assert_eq!(event["channelIds"], json!(["ops", "stage"]));
    let mut ana = stack.client(0, "u-ana", "Ana").await;
    ana.join("ops").await;
    assert_eq!(ana.ptt_start("ops").await["granted"], true);
    let channels = ok_json(&stack, &["channels"]);
    assert_eq!(
        channels["channels"][0],
        json!({"channelId": "ops", "speaker": channels["channels"][0]["speaker"], "memberCount": 2, "mediaNodeId": "media-0", "eventId": "fest"})
    );
    assert_eq!(channels["channels"][0]["speaker"]["userId"], "u-ana");
    let table = ok_text(&stack, &["channels"]);
    assert!(table.starts_with("CHANNEL"), "{table}");
    assert!(table.contains("Ana"), "{table}");
    let speakers = ok_json(&stack, &["speakers", "fest"]);
    assert_eq!(speakers["channels"][0]["speaker"]["userName"], "Ana");
    let sessions = ok_json(&stack, &["sessions", "--user", "u-ana"]);
    assert_eq!(sessions["sessions"][0]["channelIds"], json!(["ops"]));
    let paused = ok_json(&stack, &["pause", "fest"]);
    assert_eq!(paused["releasedChannelIds"], json!(["ops"]));
    ana.speaker_changed("ops", "force-released").await;
    let nodes = ok_text(&stack, &["nodes"]);
    assert!(
        nodes.contains("media-0") && nodes.contains("live"),
        "{nodes}"
    );
    let drained = ok_json(&stack, &["drain", "media-0"]);
    assert_eq!(drained["draining"], true);
    let kicked = ok_json(&stack, &["kick", "u-ana", "--reason", "test over"]);
    assert_eq!(kicked["sessionsClosed"], 1);
    assert_eq!(
        ana.push("force-disconnect").await["data"]["reason"],
        "test over"
    );
}

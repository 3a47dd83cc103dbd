//! Sync sessions over the WebSocket: members of the bound channel, on every gateway, follow a
//! session's state with the server's clock; roles decide who controls it; conflicts carry both
//! versions; a clock that runs out is announced without anyone calling.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use talkgroup_e2e::{Stack, Topology, error_code};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_session_is_shared_by_the_channel_across_gateways() {
    let stack = Stack::start(Topology {
        state: 2,
        gateways: 2,
        ..Topology::default()
    })
    .await
    .unwrap();
    stack.ready().await.unwrap();
    let mut dee = stack
        .client_with(0, "u-dee", "Dee", &json!({"ops": "dispatch"}))
        .await;
    let mut tom = stack
        .client_with(1, "u-tom", "Tom", &json!({"ops": "talk"}))
        .await;
    let mut lee = stack
        .client_with(0, "u-lee", "Lee", &json!({"ops": "listen"}))
        .await;
    let mut eve = stack
        .client_with(1, "u-eve", "Eve", &json!({"stage": "talk"}))
        .await;
    for c in [&mut dee, &mut tom, &mut lee] {
        c.join("ops").await;
    }

    let created = dee
        .ok(
            "sync-create",
            json!({"sessionId": "debate", "channelId": "ops", "mode": "per_participant",
                   "participants": [{"participantId": "tom"}, {"participantId": "lee"}],
                   "totalTimeMs": 60000, "incrementMs": 1000}),
        )
        .await;
    assert_eq!(created["session"]["version"], 1);
    assert_eq!(created["session"]["status"], "pending");
    assert!(created["serverTime"].as_i64().unwrap() > 0);
    // The first push of a session is the whole of it.
    let pushed = tom
        .push_where("sync-state", |d| d["session"]["version"] == 1)
        .await;
    assert_eq!(pushed["data"]["session"]["sessionId"], "debate");
    lee.sync_until("debate", |s| s["version"] == 1).await;

    // Only a dispatcher starts; a talker hands over; nobody outside the channel looks.
    for (client, kind) in [(&mut lee, "sync-start"), (&mut tom, "sync-start")] {
        let reply = client.request(kind, json!({"sessionId": "debate"})).await;
        assert_eq!(error_code(&reply), "FORBIDDEN");
    }
    let reply = eve
        .request("sync-get", json!({"sessionId": "debate"}))
        .await;
    assert_eq!(error_code(&reply), "FORBIDDEN");
    let started = dee
        .ok(
            "sync-start",
            json!({"sessionId": "debate", "expectedVersion": 1}),
        )
        .await;
    assert_eq!(started["session"]["status"], "running");
    assert_eq!(started["session"]["activeParticipantId"], "tom");

    // A stale version is a conflict that says which.
    let reply = tom
        .request(
            "sync-switch",
            json!({"sessionId": "debate", "expectedVersion": 1}),
        )
        .await;
    assert_eq!(error_code(&reply), "CONFLICT");
    assert_eq!(reply["error"]["expectedVersion"], 1);
    assert_eq!(reply["error"]["actualVersion"], 2);
    let switched = tom
        .ok(
            "sync-switch",
            json!({"sessionId": "debate", "expectedVersion": 2}),
        )
        .await;
    assert_eq!(switched["session"]["version"], 3);
    // Lee, on the other gateway, sees it with the server's clock to count down from: each
    // change comes as what changed since the version before.
    let change = lee.push_where("sync-changed", |d| d["version"] == 3).await;
    assert_eq!(change["data"]["baseVersion"], 2, "{change}");
    assert_eq!(change["data"]["changes"]["activeParticipantId"], "lee");
    assert!(
        change["data"]["participants"].as_array().unwrap().len() <= 2,
        "only the participants that changed: {change}"
    );
    let (session, server_time) = lee.sync_until("debate", |s| s["version"] == 3).await;
    assert_eq!(session["activeParticipantId"], "lee");
    let tom_left = session["participants"][0]["timeRemainingMs"]
        .as_i64()
        .unwrap();
    assert!(tom_left > 60_000 && tom_left <= 61_000, "{tom_left}");
    assert!(server_time >= session["updatedAt"].as_i64().unwrap());
    assert_eq!(
        session,
        lee.ok("sync-get", json!({"sessionId": "debate"})).await["session"]
            .as_object()
            .map(|s| {
                let mut s = s.clone();
                // The remaining times are computed at each read.
                s.insert("participants".into(), session["participants"].clone());
                serde_json::Value::Object(s)
            })
            .unwrap(),
        "the changes applied give the session"
    );
    assert_eq!(
        lee.ok("sync-get", json!({"sessionId": "debate"})).await["session"]["version"],
        3
    );

    // A countdown that runs out is announced with nobody calling.
    dee.ok(
        "sync-create",
        json!({"sessionId": "cue", "channelId": "ops", "mode": "count_up",
               "participants": [{"participantId": "stage"}], "maxTimeMs": 1000}),
    )
    .await;
    dee.ok("sync-start", json!({"sessionId": "cue"})).await;
    let (expired, _) = lee.sync_until("cue", |s| s["status"] == "expired").await;
    assert_eq!(expired["participants"][0]["hasExpired"], true);

    // Delete: members are told.
    let reply = tom
        .request("sync-delete", json!({"sessionId": "debate"}))
        .await;
    assert_eq!(error_code(&reply), "FORBIDDEN");
    dee.ok("sync-delete", json!({"sessionId": "debate"})).await;
    let gone = tom
        .push_where("sync-state", |d| d["session"]["deleted"] == true)
        .await;
    assert_eq!(gone["data"]["session"]["sessionId"], "debate");
    let reply = dee
        .request("sync-get", json!({"sessionId": "debate"}))
        .await;
    assert_eq!(error_code(&reply), "NOT_FOUND");
    let reply = dee
        .request(
            "sync-create",
            json!({"sessionId": "x", "channelId": "ops", "mode": "chess", "participants": []}),
        )
        .await;
    assert_eq!(error_code(&reply), "BAD_REQUEST");
}

//! The contract both stores must keep, run over gRPC against the real server: once with the
//! in-memory store, and against a real Redis: one server, under Sentinel, and a Cluster.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::{Backend, TestServer, Watch, holder_user};
use talkgroup_common::tls::Identity;
use talkgroup_proto::state::v1 as pb;
use tonic::Code;

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test] async fn $name() { super::$name(super::Backend::Memory).await })*
        }
        mod redis {
            $(#[tokio::test] async fn $name() { super::$name(super::Backend::Redis).await })*
        }
        mod sentinel {
            $(#[tokio::test] async fn $name() { super::$name(super::Backend::Sentinel).await })*
        }
        mod cluster {
            $(#[tokio::test] async fn $name() { super::$name(super::Backend::Cluster).await })*
        }
    };
}

contract!(
    grant_then_deny_with_holder_info,
    reacquire_by_holder_is_idempotent,
    renew_extends_only_the_holders_lease,
    release_by_non_holder_or_stale_epoch_is_refused,
    lease_expiry_frees_the_floor_and_the_next_epoch_is_higher,
    max_talk_time_revokes_despite_renewal,
    per_channel_lease_shorter_than_the_default_expires_on_time,
    preemption_is_one_step,
    queue_grants_the_head_on_release,
    membership_changes_reach_watchers,
    removing_a_session_leaves_every_channel_and_releases_its_floors,
    untouched_sessions_expire,
    a_session_resumes_for_its_user_and_parks_for_the_grace_period,
    a_parked_session_gives_way_to_a_new_one_at_the_session_cap,
    a_grant_s_epoch_is_above_the_highest_the_caller_has_seen,
    placement_picks_least_loaded_live_node_and_agrees,
    hostile_input_is_refused,
    grants_change_once_and_reach_grant_watchers,
    events_are_indexed_both_ways,
    membership_update_scopes_to_the_event_and_refuses_foreign_channels,
    emergency_takes_every_channel_and_holds_off_normal_talk,
    sync_session_runs_out_with_nobody_calling,
    sync_conflicts_carry_both_versions,
    sixty_four_concurrent_sync_updaters_lose_nothing,
    quotas_per_user_and_channel_refuse_with_their_reasons,
    members_versions_move_on_with_every_change,
    open_sync_sessions_are_capped_per_channel_and_per_user,
    topics_deliver_only_what_their_watchers_follow,
    a_media_node_follows_only_its_own_channels_and_its_capacity_is_bounded,
);

async fn grant_then_deny_with_holder_info(b: Backend) {
    let server = TestServer::start(b.config("grant")).await;
    let mut c = server.clients().await;
    let a = c.join("ana", "ops").await;
    let bo = c.join("bo", "ops").await;

    let granted = c.acquire("ops", &a, 0).await;
    assert_eq!(granted.outcome(), pb::AcquireOutcome::Granted);
    let holder = granted.holder.clone().unwrap();
    assert!(holder.epoch > 0);
    assert!(holder.expires_at_ms > granted.server_time_ms);
    assert_eq!(holder.max_until_ms - holder.granted_at_ms, 60_000);
    assert_eq!(granted.max_talk_ms, 60_000);

    let denied = c.acquire("ops", &bo, 0).await;
    assert_eq!(denied.outcome(), pb::AcquireOutcome::Denied);
    let speaker = denied.holder.as_ref().unwrap().speaker.clone().unwrap();
    assert_eq!(
        (speaker.user_id.as_str(), speaker.user_name.as_str()),
        ("u-ana", "ana")
    );
    assert!(denied.retry_after_ms > 0 && denied.retry_after_ms <= 5_000);

    let floor = c.floor("ops").await;
    assert_eq!(holder_user(&floor.holder), "u-ana");
    assert_eq!(floor.epoch, holder.epoch);

    // Only members may take the floor.
    let outsider = c.session("cy").await;
    let err = c
        .floor
        .acquire_floor(pb::AcquireFloorRequest {
            channel_id: "ops".into(),
            session_id: outsider,
            priority: 0,
            min_epoch: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    server.stop().await;
}

async fn reacquire_by_holder_is_idempotent(b: Backend) {
    let server = TestServer::start(b.config("idem")).await;
    let mut c = server.clients().await;
    let a = c.join("ana", "ops").await;
    let first = c.acquire("ops", &a, 0).await.holder.unwrap();
    let again = c.acquire("ops", &a, 0).await;
    assert_eq!(again.outcome(), pb::AcquireOutcome::Granted);
    let again = again.holder.unwrap();
    assert_eq!(again.epoch, first.epoch);
    assert_eq!(again.granted_at_ms, first.granted_at_ms);
    assert!(again.expires_at_ms >= first.expires_at_ms);
    server.stop().await;
}

async fn renew_extends_only_the_holders_lease(b: Backend) {
    let server = TestServer::start(b.config("renew")).await;
    let mut c = server.clients().await;
    let a = c.join("ana", "ops").await;
    let bo = c.join("bo", "ops").await;
    let held = c.acquire("ops", &a, 0).await.holder.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await; // let the clock move so renewal shows
    let renew = |sid: String, epoch| pb::RenewFloorRequest {
        channel_id: "ops".into(),
        session_id: sid,
        epoch,
    };

    let ok = c
        .floor
        .renew_floor(renew(a.clone(), held.epoch))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.renewed);
    assert!(ok.expires_at_ms > held.expires_at_ms);
    assert_eq!(ok.max_until_ms, held.max_until_ms);

    let other = c
        .floor
        .renew_floor(renew(bo.clone(), held.epoch))
        .await
        .unwrap()
        .into_inner();
    assert!(!other.renewed);
    assert_eq!(other.refusal(), pb::FloorRefusal::NotHolder);

    let stale = c
        .floor
        .renew_floor(renew(a.clone(), held.epoch - 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stale.refusal(), pb::FloorRefusal::StaleEpoch);

    c.release("ops", &a, held.epoch).await;
    let free = c
        .floor
        .renew_floor(renew(a, held.epoch))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(free.refusal(), pb::FloorRefusal::NotHeld);
    server.stop().await;
}

async fn release_by_non_holder_or_stale_epoch_is_refused(b: Backend) {
    let server = TestServer::start(b.config("release")).await;
    let mut c = server.clients().await;
    let a = c.join("ana", "ops").await;
    let bo = c.join("bo", "ops").await;
    let held = c.acquire("ops", &a, 0).await.holder.unwrap();

    let by_other = c.release("ops", &bo, 0).await;
    assert!(!by_other.released);
    assert_eq!(by_other.refusal(), pb::FloorRefusal::NotHolder);
    let by_other_epoch = c.release("ops", &bo, held.epoch).await;
    assert!(!by_other_epoch.released);

    let stale = c.release("ops", &a, held.epoch - 1).await;
    assert!(!stale.released);
    assert_eq!(stale.refusal(), pb::FloorRefusal::StaleEpoch);
    assert_eq!(holder_user(&c.floor("ops").await.holder), "u-ana");

    let released = c.release("ops", &a, held.epoch).await;
    assert!(released.released);
    assert!(released.epoch > held.epoch, "release moves the epoch on");
    let floor = c.floor("ops").await;
    assert!(floor.holder.is_none());
    assert_eq!(floor.epoch, released.epoch);
    server.stop().await;
}

async fn lease_expiry_frees_the_floor_and_the_next_epoch_is_higher(b: Backend) {
    let mut config = b.config("lease");
    config.lease_ms = 300;
    let server = TestServer::start(config).await;
    let mut c = server.clients().await;
    let a = c.join("ana", "ops").await;
    let bo = c.join("bo", "ops").await;
    let mut watch = c.watch(&["ops"]).await;
    let held = c.acquire("ops", &a, 0).await.holder.unwrap();
    assert_eq!(watch.next_floor().await.reason(), pb::FloorReason::Granted);

    // Nobody renews and nobody touches the channel: the sweeper announces the expiry.
    let expired = watch.next_floor().await;
    assert_eq!(expired.reason(), pb::FloorReason::LeaseExpired);
    assert!(expired.holder.is_none());
    assert_eq!(expired.previous.unwrap().user_id, "u-ana");
    assert!(expired.previous_duration_ms >= 300);
    assert!(expired.epoch > held.epoch);
    assert!(c.floor("ops").await.holder.is_none());

    let next = c.acquire("ops", &bo, 0).await;
    assert_eq!(next.outcome(), pb::AcquireOutcome::Granted);
    assert!(next.holder.unwrap().epoch > expired.epoch);
    server.stop().await;
}

async fn max_talk_time_revokes_despite_renewal(b: Backend) {
    let mut config = b.config("maxtalk");
    config.lease_ms = 200;
    config.max_talk_ms = 700;
    let server = TestServer::start(config).await;
    let mut c = server.clients().await;
    let a = c.join("ana", "ops").await;
    let mut watch = c.watch(&["ops"]).await;
    let held = c.acquire("ops", &a, 0).await.holder.unwrap();
    assert_eq!(held.max_until_ms - held.granted_at_ms, 700);
    watch.next_floor().await;

    // The gateway renews every lease/3, as long as it is allowed to.
    let mut renewals = 0;
    let refusal = loop {
        tokio::time::sleep(Duration::from_millis(60)).await;
        let r = c
            .floor
            .renew_floor(pb::RenewFloorRequest {
                channel_id: "ops".into(),
                session_id: a.clone(),
                epoch: held.epoch,
            })
            .await
            .unwrap()
            .into_inner();
        if !r.renewed {
            break r.refusal();
        }
        assert!(
            r.expires_at_ms <= held.max_until_ms,
            "a renewal never passes max talk time"
        );
        renewals += 1;
        assert!(renewals < 100, "never revoked");
    };
    assert!(matches!(
        refusal,
        pb::FloorRefusal::MaxTalkTime | pb::FloorRefusal::NotHeld
    ));
    assert!(
        renewals >= 5,
        "renewal kept the grant alive past several leases ({renewals})"
    );
    let revoked = watch.next_floor().await;
    assert_eq!(revoked.reason(), pb::FloorReason::MaxTalkTime);
    assert!(revoked.previous_duration_ms >= 700 && revoked.previous_duration_ms < 1_500);
    server.stop().await;
}

async fn per_channel_lease_shorter_than_the_default_expires_on_time(b: Backend) {
    let server = TestServer::start(b.config("chlease")).await;
    let mut c = server.clients().await;
    c.admin_channel
        .set_channel_config(pb::SetChannelConfigRequest {
            config: Some(pb::ChannelConfig {
                channel_id: "ops".into(),
                queue_enabled: false,
                lease_ms: 250,
                max_talk_ms: 0,
            }),
        })
        .await
        .unwrap();
    let a = c.join("ana", "ops").await;
    let mut watch = c.watch(&["ops"]).await;
    let held = c.acquire("ops", &a, 0).await.holder.unwrap();
    assert_eq!(held.expires_at_ms - held.granted_at_ms, 250);
    watch.next_floor().await;
    let expired = watch.next_floor().await;
    assert_eq!(expired.reason(), pb::FloorReason::LeaseExpired);
    assert!(
        expired.previous_duration_ms >= 250 && expired.previous_duration_ms < 1_000,
        "announced after {} ms",
        expired.previous_duration_ms
    );
    server.stop().await;
}

async fn preemption_is_one_step(b: Backend) {
    let server = TestServer::start(b.config("preempt")).await;
    let mut c = server.clients().await;
    let a = c.join("ana", "ops").await;
    let d = c.join("dispatch", "ops").await;
    let mut watch = c.watch(&["ops"]).await;
    let low = c.acquire("ops", &a, 0).await.holder.unwrap();
    watch.next_floor().await;

    let high = c.acquire("ops", &d, 50).await;
    assert_eq!(high.outcome(), pb::AcquireOutcome::Granted);
    assert_eq!(high.preempted.as_ref().unwrap().user_id, "u-ana");
    let high_epoch = high.holder.as_ref().unwrap().epoch;
    assert!(high_epoch > low.epoch);

    // One event: the floor went straight from ana to dispatch, never through "free".
    let change = watch.next_floor().await;
    assert_eq!(change.reason(), pb::FloorReason::Preempted);
    assert_eq!(holder_user(&change.holder), "u-dispatch");
    assert_eq!(change.previous.unwrap().user_id, "u-ana");
    assert_eq!(change.epoch, high_epoch);

    // Equal or lower priority does not pre-empt.
    assert_eq!(
        c.acquire("ops", &a, 0).await.outcome(),
        pb::AcquireOutcome::Denied
    );
    assert_eq!(
        c.acquire("ops", &a, 50).await.outcome(),
        pb::AcquireOutcome::Denied
    );
    // The interrupted holder's old epoch is dead.
    assert!(!c.release("ops", &a, low.epoch).await.released);
    server.stop().await;
}

async fn queue_grants_the_head_on_release(b: Backend) {
    let server = TestServer::start(b.config("queue")).await;
    let mut c = server.clients().await;
    c.admin_channel
        .set_channel_config(pb::SetChannelConfigRequest {
            config: Some(pb::ChannelConfig {
                channel_id: "ops".into(),
                queue_enabled: true,
                lease_ms: 0,
                max_talk_ms: 0,
            }),
        })
        .await
        .unwrap();
    let a = c.join("ana", "ops").await;
    let bo = c.join("bo", "ops").await;
    let cy = c.join("cy", "ops").await;
    let mut watch = c.watch(&["ops"]).await;
    // ana talks at priority 10, so the later requests below queue instead of pre-empting.
    let held = c.acquire("ops", &a, 10).await.holder.unwrap();
    watch.next_floor().await;

    let q1 = c.acquire("ops", &bo, 0).await;
    assert_eq!(q1.outcome(), pb::AcquireOutcome::Queued);
    assert_eq!(q1.queue_position, 1);
    assert_eq!(holder_user(&q1.holder), "u-ana");
    // Priority first, then time: cy (5) goes ahead of bo (0), who asked earlier.
    let q2 = c.acquire("ops", &cy, 5).await;
    assert_eq!(q2.queue_position, 1);
    assert_eq!(
        c.acquire("ops", &bo, 0).await.queue_position,
        2,
        "asking again keeps the place"
    );

    assert!(c.release("ops", &a, held.epoch).await.released);
    let freed = watch.next_floor().await;
    assert_eq!(freed.reason(), pb::FloorReason::Released);
    let to_cy = watch.next_floor().await;
    assert_eq!(to_cy.reason(), pb::FloorReason::QueueGranted);
    assert_eq!(holder_user(&to_cy.holder), "u-cy");
    assert!(to_cy.epoch > freed.epoch);
    assert_eq!(holder_user(&c.floor("ops").await.holder), "u-cy");

    // A queued session that gives up leaves the queue.
    let gave_up = c.release("ops", &bo, 0).await;
    assert!(!gave_up.released);
    assert!(gave_up.dequeued);
    assert!(c.release("ops", &cy, 0).await.released);
    assert_eq!(watch.next_floor().await.reason(), pb::FloorReason::Released);
    assert!(
        c.floor("ops").await.holder.is_none(),
        "bo left the queue, nobody is granted"
    );
    server.stop().await;
}

async fn membership_changes_reach_watchers(b: Backend) {
    let server = TestServer::start(b.config("members")).await;
    let mut c = server.clients().await;
    let a = c.join("ana", "ops").await;
    let mut watch = c.watch(&["ops"]).await;
    let bo = c.join("bo", "ops").await;
    let joined = watch.next_membership().await;
    assert_eq!(joined.change(), pb::MembershipChange::Joined);
    assert_eq!(joined.member.unwrap().user_name, "bo");
    assert_eq!(joined.member_count, 2);

    let members = c
        .session
        .list_members(pb::ListMembersRequest {
            channel_id: "ops".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .members;
    let names: Vec<_> = members.iter().map(|m| m.user_name.as_str()).collect();
    assert_eq!(names, ["ana", "bo"]);

    let left = c
        .session
        .leave_channel(pb::LeaveChannelRequest {
            session_id: bo.clone(),
            channel_id: "ops".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(left.was_member);
    let event = watch.next_membership().await;
    assert_eq!(event.change(), pb::MembershipChange::Left);
    assert_eq!(event.member_count, 1);
    let state = c
        .channel
        .get_channel_state(pb::GetChannelStateRequest {
            channel_id: "ops".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state.members.len(), 1);
    assert_eq!(state.members[0].session_id, a);
    server.stop().await;
}

async fn removing_a_session_leaves_every_channel_and_releases_its_floors(b: Backend) {
    let server = TestServer::start(b.config("remove")).await;
    let mut c = server.clients().await;
    let a = c.join("ana", "ops").await;
    c.session
        .join_channel(pb::JoinChannelRequest {
            session_id: a.clone(),
            channel_id: "gate".into(),
        })
        .await
        .unwrap();
    let mut watch = c.watch(&["ops"]).await;
    c.acquire("ops", &a, 0).await;
    watch.next_floor().await;

    let removed = c
        .session
        .remove_session(pb::RemoveSessionRequest {
            session_id: a.clone(),
            generation: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.channels_left, ["gate", "ops"]);
    assert_eq!(removed.floors_released, 1);
    let freed = watch.next_floor().await;
    assert_eq!(freed.reason(), pb::FloorReason::Disconnected);
    assert_eq!(
        watch.next_membership().await.change(),
        pb::MembershipChange::Left
    );
    let err = c
        .session
        .get_session(pb::GetSessionRequest { session_id: a })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    server.stop().await;
}

async fn untouched_sessions_expire(b: Backend) {
    let server = TestServer::start(b.config("expiry")).await;
    let mut c = server.clients().await;
    let keep = c.join("keeper", "ops").await;
    let short = c
        .session
        .create_session(pb::CreateSessionRequest {
            user_id: "u-short".into(),
            user_name: "short".into(),
            gateway_id: "gw".into(),
            ttl_ms: 300,
        })
        .await
        .unwrap()
        .into_inner();
    c.session
        .join_channel(pb::JoinChannelRequest {
            session_id: short.session_id.clone(),
            channel_id: "ops".into(),
        })
        .await
        .unwrap();
    let mut watch = c.watch(&["ops"]).await;
    c.acquire("ops", &short.session_id, 0).await;
    watch.next_floor().await;

    let freed = watch.next_floor().await;
    assert_eq!(freed.reason(), pb::FloorReason::Disconnected);
    let left = watch.next_membership().await;
    assert_eq!(left.member.unwrap().user_id, "u-short");
    let err = c
        .session
        .get_session(pb::GetSessionRequest {
            session_id: short.session_id,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // A session that is touched lives on, for its own time to live.
    let touched = c
        .session
        .touch_session(pb::TouchSessionRequest {
            session_id: keep.clone(),
        })
        .await
        .unwrap();
    let touched = touched.into_inner();
    assert_eq!(touched.ttl_ms, 60_000);
    assert!(touched.expires_at_ms > touched.created_at_ms + 59_000);
    let sessions = c
        .session
        .list_user_sessions(pb::ListUserSessionsRequest {
            user_id: "u-keeper".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].channel_ids, ["ops"]);
    server.stop().await;
}

async fn resume(
    c: &mut support::Clients,
    token: &str,
    user: &str,
) -> Result<pb::Session, talkgroup_proto::error::Reason> {
    c.session
        .resume_session(pb::ResumeSessionRequest {
            resume_token: token.into(),
            user_id: user.into(),
            gateway_id: "gw-2".into(),
        })
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| reason(&status))
}

async fn a_session_resumes_for_its_user_and_parks_for_the_grace_period(b: Backend) {
    use talkgroup_proto::error::Reason;
    let mut config = b.config("resume");
    config.resume_grace_ms = 1_000;
    let server = TestServer::start(config).await;
    let mut c = server.clients().await;
    let created = c
        .session
        .create_session(pb::CreateSessionRequest {
            user_id: "u-ben".into(),
            user_name: "Ben".into(),
            gateway_id: "gw-1".into(),
            ttl_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let sid = created.session_id.clone();
    assert!(created.resume_token.starts_with(&format!("{sid}.")));
    assert_eq!(created.resume_grace_ms, 1_000);
    assert_eq!(created.generation, 0);
    c.session
        .join_channel(pb::JoinChannelRequest {
            session_id: sid.clone(),
            channel_id: "ops".into(),
        })
        .await
        .unwrap();
    let mut grants = c.watch_users(&["u-ben"]).await;

    // Refused alike: another user, a made-up secret, garbage. The session is untouched.
    let forged = format!("{sid}.{}", "0".repeat(64));
    for (token, user) in [
        (created.resume_token.as_str(), "u-eve"),
        (forged.as_str(), "u-ben"),
        ("garbage", "u-ben"),
    ] {
        assert_eq!(
            resume(&mut c, token, user).await.unwrap_err(),
            Reason::PermissionDenied
        );
    }
    // Ben's token: the session moves to the new gateway under the next generation, with a
    // new token; the other replicas hear of it.
    let resumed = resume(&mut c, &created.resume_token, "u-ben")
        .await
        .unwrap();
    assert_eq!(resumed.session_id, sid);
    assert_eq!(resumed.generation, 1);
    assert_eq!(resumed.gateway_id, "gw-2");
    assert_eq!(resumed.channel_ids, ["ops"]);
    assert_ne!(resumed.resume_token, created.resume_token);
    let event = loop {
        if let pb::watch_event::Event::Resumed(r) = grants.next().await {
            break r;
        }
    };
    assert_eq!(
        (event.session_id.as_str(), event.generation),
        (sid.as_str(), 1)
    );
    // The socket that was handed the new token died before the client read it: the old token
    // still resumes, once more, until the session's next touch. The new token of that resume
    // is the one the client now holds; the one it never read is dead.
    let resumed = resume(&mut c, &created.resume_token, "u-ben")
        .await
        .unwrap();
    assert_eq!(resumed.generation, 2);
    c.session
        .touch_session(pb::TouchSessionRequest {
            session_id: sid.clone(),
        })
        .await
        .unwrap();
    for spent in [&created.resume_token] {
        assert_eq!(
            resume(&mut c, spent, "u-ben").await.unwrap_err(),
            Reason::PermissionDenied,
            "a token from before the touch"
        );
    }
    // The socket of generation 1 may no longer park it, nor end it (its cleanup must leave
    // the resumed session alone); generation 2 may.
    let stale = c
        .session
        .park_session(pb::ParkSessionRequest {
            session_id: sid.clone(),
            generation: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::NotFound);
    let fenced = c
        .session
        .remove_session(pb::RemoveSessionRequest {
            session_id: sid.clone(),
            generation: Some(1),
        })
        .await
        .unwrap_err();
    assert_eq!(fenced.code(), Code::FailedPrecondition);
    let mut watch = c.watch(&["ops"]).await;
    let parked = c
        .session
        .park_session(pb::ParkSessionRequest {
            session_id: sid.clone(),
            generation: 2,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(parked.parked_at_ms > 0);
    assert!(parked.expires_at_ms <= parked.parked_at_ms + 1_000);
    // Nobody resumes it: after the grace period it ends as an untouched session does.
    let left = watch.next_membership().await;
    assert_eq!(left.change(), pb::MembershipChange::Left);
    assert_eq!(
        resume(&mut c, &resumed.resume_token, "u-ben")
            .await
            .unwrap_err(),
        Reason::PermissionDenied
    );
    server.stop().await;
}

async fn a_grant_s_epoch_is_above_the_highest_the_caller_has_seen(b: Backend) {
    let server = TestServer::start(b.config("min-epoch")).await;
    let mut c = server.clients().await;
    let a = c.join("ana", "ops").await;
    // As if a gateway saw epochs from a master whose clock ran a minute ahead of this one's.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let seen = (now_ms + 60_000) * 1000;
    let granted = c
        .floor
        .acquire_floor(pb::AcquireFloorRequest {
            channel_id: "ops".into(),
            session_id: a.clone(),
            priority: 0,
            min_epoch: seen,
        })
        .await
        .unwrap()
        .into_inner();
    let epoch = granted.holder.unwrap().epoch;
    assert!(epoch > seen, "{epoch} not above {seen}");
    let released = c
        .floor
        .release_floor(pb::ReleaseFloorRequest {
            channel_id: "ops".into(),
            session_id: a.clone(),
            epoch,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(released.epoch > epoch);
    // The counter carries it: the next grant, with nothing seen, is higher still.
    let again = c.acquire("ops", &a, 0).await;
    assert!(again.holder.unwrap().epoch > released.epoch);
    server.stop().await;
}

async fn a_parked_session_gives_way_to_a_new_one_at_the_session_cap(b: Backend) {
    let mut config = b.config("park-cap");
    config.max_sessions_per_user = 2;
    let server = TestServer::start(config).await;
    let mut c = server.clients().await;
    let create = || pb::CreateSessionRequest {
        user_id: "u-ben".into(),
        user_name: "Ben".into(),
        gateway_id: "gw".into(),
        ttl_ms: 0,
    };
    let first = c
        .session
        .create_session(create())
        .await
        .unwrap()
        .into_inner();
    let second = c
        .session
        .create_session(create())
        .await
        .unwrap()
        .into_inner();
    // Both live: the cap holds.
    let refused = c.session.create_session(create()).await.unwrap_err();
    assert_eq!(
        reason(&refused),
        talkgroup_proto::error::Reason::TooManySessions
    );
    // The first one's socket was lost: a new session takes its place, and it is gone.
    c.session
        .park_session(pb::ParkSessionRequest {
            session_id: first.session_id.clone(),
            generation: 0,
        })
        .await
        .unwrap();
    let third = c
        .session
        .create_session(create())
        .await
        .unwrap()
        .into_inner();
    let live: Vec<String> = c
        .session
        .list_user_sessions(pb::ListUserSessionsRequest {
            user_id: "u-ben".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .sessions
        .into_iter()
        .map(|s| s.session_id)
        .collect();
    assert_eq!(live.len(), 2, "{live:?}");
    assert!(live.contains(&second.session_id) && live.contains(&third.session_id));
    server.stop().await;
}

async fn placement_picks_least_loaded_live_node_and_agrees(b: Backend) {
    let server = TestServer::start(b.config("place")).await;
    let c = server.clients().await;
    // The gateway places channels and lists nodes; each node registers, heartbeats and
    // drains only itself.
    let mut reg = c.registry.clone();
    let mut busy = server.registry_as("busy");
    let mut idle = server.registry_as("idle");
    let register = |id: &str, load| pb::RegisterNodeRequest {
        node: Some(pb::MediaNode {
            node_id: id.into(),
            grpc_addr: format!("http://{id}:50052"),
            announced_ip: "127.0.0.1".into(),
            capacity: 100,
            load,
            ..Default::default()
        }),
    };
    let err = reg
        .place_channel(pb::PlaceChannelRequest {
            channel_id: "ops".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "no node yet");
    let reply = busy
        .register_node(register("busy", 40))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.dead_after_ms, 400);
    idle.register_node(register("idle", 5)).await.unwrap();

    // Concurrent first joins agree on one node: the least loaded.
    let calls = (0..16).map(|_| {
        let mut reg = reg.clone();
        async move {
            reg.place_channel(pb::PlaceChannelRequest {
                channel_id: "ops".into(),
            })
            .await
            .unwrap()
            .into_inner()
        }
    });
    let placements = futures::future::join_all(calls).await;
    assert!(
        placements
            .iter()
            .all(|p| p.node.as_ref().unwrap().node_id == "idle")
    );
    assert_eq!(placements.iter().filter(|p| p.placed_now).count(), 1);

    // A draining node gets no new channels, and its channels move at once to a live node:
    // the channel's watchers hear where to.
    let mut c = c;
    let mut watch = c.watch(&["ops"]).await;
    let drained = idle
        .drain_node(pb::DrainNodeRequest {
            node_id: "idle".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(drained.draining);
    let moved = watch.next_moved().await;
    assert_eq!(moved.reason(), pb::MoveReason::NodeDraining);
    assert_eq!(moved.previous_node_id, "idle");
    let to = moved.node.unwrap();
    assert_eq!(
        (to.node_id.as_str(), to.grpc_addr.as_str()),
        ("busy", "http://busy:50052")
    );
    let again = reg
        .place_channel(pb::PlaceChannelRequest {
            channel_id: "ops".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.node.unwrap().node_id, "busy");
    assert!(!again.placed_now, "the move placed it");
    let other = reg
        .place_channel(pb::PlaceChannelRequest {
            channel_id: "gate".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(other.node.unwrap().node_id, "busy");
    assert!(
        idle.heartbeat(pb::HeartbeatRequest {
            node_id: "idle".into(),
            load: 1
        })
        .await
        .unwrap()
        .into_inner()
        .draining
    );

    // A node that stops heartbeating is dead: its channels move to a live node by themselves,
    // before anyone places them.
    let mut fresh = server.registry_as("fresh");
    fresh.register_node(register("fresh", 0)).await.unwrap();
    support_keep_alive(&mut fresh, "fresh", Duration::from_millis(700)).await;
    let moved = watch.next_moved().await;
    assert_eq!(moved.reason(), pb::MoveReason::NodeLost);
    assert_eq!(moved.previous_node_id, "busy");
    assert_eq!(moved.node.unwrap().node_id, "fresh");
    let nodes = reg
        .list_nodes(pb::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    let busy = nodes.iter().find(|n| n.node_id == "busy").unwrap();
    assert!(!busy.live, "busy stopped heartbeating");
    assert_eq!(busy.channels, 0, "its channels moved");
    assert_eq!(
        nodes
            .iter()
            .find(|n| n.node_id == "fresh")
            .unwrap()
            .channels,
        2
    );
    let placed = reg
        .place_channel(pb::PlaceChannelRequest {
            channel_id: "gate".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(placed.node.unwrap().node_id, "fresh");
    assert!(!placed.placed_now);
    // Dead with nothing left on them, the old nodes are forgotten after a while; the live one
    // stays.
    let listed = || {
        let mut reg = reg.clone();
        async move {
            let nodes = reg
                .list_nodes(pb::ListNodesRequest {})
                .await
                .unwrap()
                .into_inner()
                .nodes;
            nodes.into_iter().map(|n| n.node_id).collect::<Vec<_>>()
        }
    };
    testkit::wait_until(Duration::from_secs(10), "dead nodes forgotten", || async {
        listed().await == ["fresh"]
    })
    .await
    .unwrap();

    let unknown = server
        .registry_as("ghost")
        .heartbeat(pb::HeartbeatRequest {
            node_id: "ghost".into(),
            load: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    server.stop().await;
}

/// Heartbeats `node` every 100 ms for `duration`.
async fn support_keep_alive(
    reg: &mut support::MediaRegistryServiceClient<tonic::transport::Channel>,
    node: &str,
    duration: Duration,
) {
    let until = tokio::time::Instant::now() + duration;
    while tokio::time::Instant::now() < until {
        reg.heartbeat(pb::HeartbeatRequest {
            node_id: node.into(),
            load: 40,
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn hostile_input_is_refused(b: Backend) {
    let server = TestServer::start(b.config("hostile")).await;
    let mut c = server.clients().await;
    let a = c.join("ana", "ops").await;
    let bad_channel = c
        .floor
        .acquire_floor(pb::AcquireFloorRequest {
            channel_id: "ops}:x{".into(),
            session_id: a.clone(),
            priority: 0,
            min_epoch: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(bad_channel.code(), Code::InvalidArgument);
    let bad_priority = c
        .floor
        .acquire_floor(pb::AcquireFloorRequest {
            channel_id: "ops".into(),
            session_id: a.clone(),
            priority: 1_000,
            min_epoch: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(bad_priority.code(), Code::InvalidArgument);
    // An epoch pushed far past any real one would hold every later grant hostage.
    let bad_epoch = c
        .floor
        .acquire_floor(pb::AcquireFloorRequest {
            channel_id: "ops".into(),
            session_id: a.clone(),
            priority: 0,
            min_epoch: u64::MAX,
        })
        .await
        .unwrap_err();
    assert_eq!(bad_epoch.code(), Code::InvalidArgument);
    let bad_name = c
        .session
        .create_session(pb::CreateSessionRequest {
            user_id: "u".into(),
            user_name: "x".repeat(500),
            gateway_id: String::new(),
            ttl_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(bad_name.code(), Code::InvalidArgument);
    let unknown = c
        .session
        .join_channel(pb::JoinChannelRequest {
            session_id: "nosuchsession".into(),
            channel_id: "ops".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let bad_config = c
        .admin_channel
        .set_channel_config(pb::SetChannelConfigRequest {
            config: Some(pb::ChannelConfig {
                channel_id: "ops".into(),
                queue_enabled: false,
                lease_ms: 1,
                max_talk_ms: 0,
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(bad_config.code(), Code::InvalidArgument);
    server.stop().await;
}

fn grant(channel: &str, role: pb::Role) -> pb::Grant {
    pb::Grant {
        channel_id: channel.into(),
        role: role.into(),
    }
}

fn roles(g: &pb::UserGrants) -> Vec<(String, pb::Role)> {
    g.grants
        .iter()
        .map(|g| (g.channel_id.clone(), g.role()))
        .collect()
}

async fn next_grants(watch: &mut Watch) -> pb::UserGrants {
    watch.next_grants().await
}

async fn grants_change_once_and_reach_grant_watchers(b: Backend) {
    let server = TestServer::start(b.config("grants")).await;
    let mut c = server.clients().await;
    let mut watch = c.watch_users(&["u-ana"]).await;
    let set = |grants: Vec<pb::Grant>, replace| pb::SetUserGrantsRequest {
        user_id: "u-ana".into(),
        grants,
        replace,
    };
    // Nothing stored yet.
    let none = c
        .access
        .get_user_grants(pb::GetUserGrantsRequest {
            user_id: "u-ana".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((none.version, none.grants.len()), (0, 0));

    let first = c
        .admin_access
        .set_user_grants(set(
            vec![
                grant("ops", pb::Role::Talk),
                grant("disp", pb::Role::Dispatch),
            ],
            false,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(first.version > 0);
    let seen = next_grants(&mut watch).await;
    assert_eq!(
        (seen.user_id.as_str(), seen.version),
        ("u-ana", first.version)
    );
    assert_eq!(roles(&seen), roles(&first));

    // The same grants again change nothing and are not announced: the next announcement is
    // the next real change.
    let again = c
        .admin_access
        .set_user_grants(set(vec![grant("ops", pb::Role::Talk)], false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.version, first.version);
    let removed = c
        .admin_access
        .set_user_grants(set(vec![grant("disp", pb::Role::Unspecified)], false))
        .await
        .unwrap()
        .into_inner();
    assert!(removed.version > first.version);
    assert_eq!(roles(&removed), [("ops".to_owned(), pb::Role::Talk)]);
    assert_eq!(next_grants(&mut watch).await.version, removed.version);

    let replaced = c
        .admin_access
        .set_user_grants(set(vec![grant("stage", pb::Role::Listen)], true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(roles(&replaced), [("stage".to_owned(), pb::Role::Listen)]);

    // Hostile input changes nothing.
    let too_many: Vec<pb::Grant> = (0..1_025)
        .map(|i| grant(&format!("c{i}"), pb::Role::Talk))
        .collect();
    for bad in [
        set(too_many, true),
        set(vec![grant("a b", pb::Role::Talk)], false),
        set(
            vec![pb::Grant {
                channel_id: "ops".into(),
                role: 99,
            }],
            false,
        ),
    ] {
        let err = c.admin_access.set_user_grants(bad).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }
    let after = c
        .access
        .get_user_grants(pb::GetUserGrantsRequest {
            user_id: "u-ana".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.version, replaced.version);
    assert_eq!(roles(&after), roles(&replaced));
    server.stop().await;
}

async fn set_event(c: &mut support::Clients, event: &str, channels: &[&str]) -> pb::Event {
    c.admin_access
        .set_event_channels(pb::SetEventChannelsRequest {
            event_id: event.into(),
            channel_ids: channels.iter().map(|c| (*c).to_owned()).collect(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn event_channels(c: &mut support::Clients, event: &str) -> Result<Vec<String>, Code> {
    c.access
        .get_event(pb::GetEventRequest {
            event_id: event.into(),
        })
        .await
        .map(|e| e.into_inner().channel_ids)
        .map_err(|s| s.code())
}

async fn channel_event(c: &mut support::Clients, channel: &str) -> String {
    c.access
        .get_channel_event(pb::GetChannelEventRequest {
            channel_id: channel.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .event_id
}

async fn events_are_indexed_both_ways(b: Backend) {
    let server = TestServer::start(b.config("events")).await;
    let mut c = server.clients().await;
    set_event(&mut c, "fest", &["gate", "stage", "bar", "gate"]).await;
    assert_eq!(
        event_channels(&mut c, "fest").await.unwrap(),
        ["gate", "stage", "bar"]
    );
    assert_eq!(channel_event(&mut c, "stage").await, "fest");
    // A channel belongs to one event: moving it removes it from the other.
    set_event(&mut c, "vip", &["bar", "lounge"]).await;
    assert_eq!(
        event_channels(&mut c, "fest").await.unwrap(),
        ["gate", "stage"]
    );
    assert_eq!(channel_event(&mut c, "bar").await, "vip");
    // Empty deletes.
    set_event(&mut c, "fest", &[]).await;
    assert_eq!(event_channels(&mut c, "fest").await, Err(Code::NotFound));
    assert_eq!(channel_event(&mut c, "gate").await, "");
    let many: Vec<String> = (0..257).map(|i| format!("c{i}")).collect();
    let err = c
        .admin_access
        .set_event_channels(pb::SetEventChannelsRequest {
            event_id: "big".into(),
            channel_ids: many,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    server.stop().await;
}

async fn membership_update_scopes_to_the_event_and_refuses_foreign_channels(b: Backend) {
    let server = TestServer::start(b.config("membership")).await;
    let mut c = server.clients().await;
    set_event(&mut c, "fest", &["gate", "stage", "bar"]).await;
    set_event(&mut c, "vip", &["lounge"]).await;
    c.admin_access
        .set_user_grants(pb::SetUserGrantsRequest {
            user_id: "u-ana".into(),
            grants: vec![
                grant("gate", pb::Role::Dispatch),
                grant("lounge", pb::Role::Talk),
            ],
            replace: false,
        })
        .await
        .unwrap();
    let update = |channels: &[&str], event: &str| pb::MembershipUpdate {
        event_id: event.into(),
        user_id: "u-ana".into(),
        channel_ids: channels.iter().map(|c| (*c).to_owned()).collect(),
    };
    let applied = c
        .admin_access
        .apply_membership_update(update(&["gate", "stage"], "fest"))
        .await
        .unwrap()
        .into_inner();
    // Listed channels keep their role or become members; the event's others are closed; other
    // events are untouched.
    assert_eq!(
        roles(&applied),
        [
            ("bar".to_owned(), pb::Role::None),
            ("gate".to_owned(), pb::Role::Dispatch),
            ("lounge".to_owned(), pb::Role::Talk),
            ("stage".to_owned(), pb::Role::Member),
        ]
    );
    let again = c
        .admin_access
        .apply_membership_update(update(&["gate", "stage"], "fest"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.version, applied.version);

    for (bad, code) in [
        (update(&["gate", "lounge"], "fest"), Code::PermissionDenied),
        (update(&["gate"], "nope"), Code::NotFound),
        (update(&["ga te"], "fest"), Code::InvalidArgument),
    ] {
        let err = c
            .admin_access
            .apply_membership_update(bad)
            .await
            .unwrap_err();
        assert_eq!(err.code(), code);
    }
    let after = c
        .access
        .get_user_grants(pb::GetUserGrantsRequest {
            user_id: "u-ana".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.version, applied.version);
    server.stop().await;
}

async fn emergency_takes_every_channel_and_holds_off_normal_talk(b: Backend) {
    let server = TestServer::start(b.config("emergency")).await;
    let mut c = server.clients().await;
    set_event(&mut c, "fest", &["gate", "stage", "bar"]).await;
    let ana = c.join("ana", "gate").await;
    let bo = c.join("bo", "stage").await;
    let mut watch = c.watch(&["gate"]).await;
    c.acquire("gate", &ana, 0).await;
    // A dispatcher's priority talk is pre-empted too.
    c.acquire("stage", &bo, 100).await;
    watch.next_floor().await;
    let disp = c.session("disp").await;
    let start = |sid: &str, priority| pb::StartEmergencyRequest {
        event_id: "fest".into(),
        session_id: sid.into(),
        priority,
    };
    let started = c
        .access
        .start_emergency(start(&disp, 200))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(started.channels.len(), 3);
    assert!(started.channels.iter().all(|ch| ch.holder.is_some()));
    let preempted: Vec<_> = started
        .channels
        .iter()
        .map(|ch| ch.preempted.as_ref().map(|s| s.user_id.clone()))
        .collect();
    assert_eq!(
        preempted,
        [Some("u-ana".to_owned()), Some("u-bo".to_owned()), None]
    );
    let change = watch.next_floor().await;
    assert_eq!(change.reason(), pb::FloorReason::Emergency);
    assert_eq!(holder_user(&change.holder), "u-disp");
    assert_eq!(change.previous.unwrap().user_id, "u-ana");
    let event = c
        .access
        .get_event(pb::GetEventRequest {
            event_id: "fest".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(event.emergency.unwrap().by.unwrap().user_id, "u-disp");

    // Normal and priority talk are held off; so is a second dispatcher.
    for priority in [0, 100] {
        let denied = c.acquire("gate", &ana, priority).await;
        assert_eq!(denied.outcome(), pb::AcquireOutcome::Denied);
        assert_eq!(holder_user(&denied.holder), "u-disp");
    }
    let rival = c.session("rival").await;
    let err = c
        .access
        .start_emergency(start(&rival, 200))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    let err = c
        .access
        .stop_emergency(pb::StopEmergencyRequest {
            event_id: "fest".into(),
            session_id: rival.clone(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // Channels of an event under emergency cannot be moved away.
    let err = c
        .admin_access
        .set_event_channels(pb::SetEventChannelsRequest {
            event_id: "other".into(),
            channel_ids: vec!["bar".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);

    // An admin overrides.
    let admin = c.session("admin").await;
    let taken = c
        .access
        .start_emergency(start(&admin, 250))
        .await
        .unwrap()
        .into_inner();
    assert!(taken.channels.iter().all(|ch| {
        ch.holder
            .as_ref()
            .and_then(|h| h.speaker.as_ref())
            .unwrap()
            .user_id
            == "u-admin"
    }));
    assert_eq!(
        c.acquire("gate", &ana, 0).await.outcome(),
        pb::AcquireOutcome::Denied
    );
    let stopped = c
        .access
        .stop_emergency(pb::StopEmergencyRequest {
            event_id: "fest".into(),
            session_id: admin.clone(),
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stopped.channels.len(), 3);
    loop {
        let change = watch.next_floor().await;
        if change.reason() == pb::FloorReason::EmergencyEnded {
            assert!(change.holder.is_none());
            break;
        }
    }
    // Normal talk resumes.
    assert_eq!(
        c.acquire("gate", &ana, 0).await.outcome(),
        pb::AcquireOutcome::Granted
    );

    // A broadcaster that disconnects frees its channels, and a new dispatcher takes over the
    // event's stale record.
    c.release("gate", &ana, 0).await;
    c.access.start_emergency(start(&disp, 200)).await.unwrap();
    c.session
        .remove_session(pb::RemoveSessionRequest {
            session_id: disp.clone(),
            generation: None,
        })
        .await
        .unwrap();
    assert_eq!(
        c.acquire("gate", &ana, 0).await.outcome(),
        pb::AcquireOutcome::Granted
    );
    c.access.start_emergency(start(&rival, 200)).await.unwrap();
    server.stop().await;
}

fn create_sync(
    id: &str,
    mode: pb::SyncMode,
    participants: usize,
    total_ms: i64,
) -> pb::CreateSyncRequest {
    pb::CreateSyncRequest {
        session_id: id.into(),
        channel_id: "ops".into(),
        sync_mode: mode.into(),
        participants: (0..participants)
            .map(|i| pb::SyncParticipantSpec {
                participant_id: format!("p{i}"),
                group_id: String::new(),
            })
            .collect(),
        total_time_ms: total_ms,
        time_per_cycle_ms: total_ms,
        increment_ms: 0,
        max_time_ms: 0,
        owner_user_id: String::new(),
    }
}

fn mutate(
    id: &str,
    expected: u64,
    action: pb::mutate_sync_request::Action,
) -> pb::MutateSyncRequest {
    pb::MutateSyncRequest {
        session_id: id.into(),
        expected_version: expected,
        action: Some(action),
    }
}

async fn sync_session_runs_out_with_nobody_calling(b: Backend) {
    use pb::mutate_sync_request::Action;
    let server = TestServer::start(b.config("sync-expiry")).await;
    let mut c = server.clients().await;
    let created = c
        .sync
        .create_sync(create_sync("clock", pb::SyncMode::Global, 2, 1_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (created.version, created.status()),
        (1, pb::SyncStatus::Pending)
    );
    let started = c
        .sync
        .mutate_sync(mutate("clock", 1, Action::Start(pb::Empty {})))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(started.status(), pb::SyncStatus::Running);
    assert!(started.participants[0].time_remaining_ms <= 1_000);
    let mut watch = c
        .sync
        .watch_sync(pb::GetSyncRequest {
            session_id: "clock".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().version, 2);
    // Nobody calls: the scheduler expires it about a second later, and watchers hear it.
    let expired = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("expiry in time")
        .unwrap()
        .unwrap();
    assert_eq!(expired.status(), pb::SyncStatus::Expired);
    assert_eq!(expired.version, 3);
    assert!(expired.participants[0].has_expired);
    assert_eq!(
        expired.session_completed_at - expired.session_started_at,
        1_000
    );
    // An ended clock refuses more.
    let err = c
        .sync
        .mutate_sync(mutate(
            "clock",
            0,
            Action::Switch(pb::SyncSwitch::default()),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    server.stop().await;
}

async fn sync_conflicts_carry_both_versions(b: Backend) {
    use pb::mutate_sync_request::Action;
    let server = TestServer::start(b.config("sync-conflict")).await;
    let mut c = server.clients().await;
    c.sync
        .create_sync(create_sync(
            "debate",
            pb::SyncMode::PerParticipant,
            2,
            60_000,
        ))
        .await
        .unwrap();
    let err = c
        .sync
        .create_sync(create_sync(
            "debate",
            pb::SyncMode::PerParticipant,
            2,
            60_000,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    c.sync
        .mutate_sync(mutate("debate", 1, Action::Start(pb::Empty {})))
        .await
        .unwrap();
    let err = c
        .sync
        .mutate_sync(mutate("debate", 1, Action::Pause(pb::Empty {})))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    assert_eq!(err.metadata().get("expected-version").unwrap(), "1");
    assert_eq!(err.metadata().get("actual-version").unwrap(), "2");
    let paused = c
        .sync
        .mutate_sync(mutate("debate", 2, Action::Pause(pb::Empty {})))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(paused.status(), pb::SyncStatus::Paused);
    if b == Backend::Redis {
        // Paused: expires an hour after the last change. Running: never.
        let mut conn = ::redis::Client::open(support::redis().url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let key = |p: &str| format!("{p}:{{sync:debate}}");
        let prefix = server_prefix(&server);
        let ttl: i64 = ::redis::cmd("PTTL")
            .arg(key(&prefix))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 3_500_000 && ttl <= 3_600_000, "{ttl}");
        c.sync
            .mutate_sync(mutate("debate", 3, Action::Resume(pb::Empty {})))
            .await
            .unwrap();
        let ttl: i64 = ::redis::cmd("PTTL")
            .arg(key(&prefix))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(ttl, -1);
    }
    // Bad input.
    for bad in [
        create_sync("a b", pb::SyncMode::Global, 1, 60_000),
        create_sync("none", pb::SyncMode::Global, 0, 60_000),
        create_sync("many", pb::SyncMode::Global, 1_001, 60_000),
        create_sync("long", pb::SyncMode::Global, 1, 90_000_000),
        create_sync("mode", pb::SyncMode::Unspecified, 1, 60_000),
    ] {
        assert_eq!(
            c.sync.create_sync(bad).await.unwrap_err().code(),
            Code::InvalidArgument
        );
    }
    let deleted = c
        .sync
        .delete_sync(pb::DeleteSyncRequest {
            session_id: "debate".into(),
            expected_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.version > 3);
    let err = c
        .sync
        .get_sync(pb::GetSyncRequest {
            session_id: "debate".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    server.stop().await;
}

fn server_prefix(server: &TestServer) -> String {
    server.prefix.clone()
}

async fn sixty_four_concurrent_sync_updaters_lose_nothing(b: Backend) {
    use pb::mutate_sync_request::Action;
    let server = TestServer::start(b.config("sync-cas")).await;
    let c = server.clients().await;
    let mut sync = c.sync.clone();
    sync.create_sync(create_sync("rounds", pb::SyncMode::PerCycle, 8, 3_600_000))
        .await
        .unwrap();
    let start = sync
        .mutate_sync(mutate("rounds", 1, Action::Start(pb::Empty {})))
        .await
        .unwrap()
        .into_inner();
    const UPDATERS: usize = 64;
    const EACH: usize = 5;
    let tasks: Vec<_> = (0..UPDATERS)
        .map(|_| {
            let mut sync = c.sync.clone();
            tokio::spawn(async move {
                let mut versions = Vec::new();
                let mut conflicts = 0u32;
                while versions.len() < EACH {
                    let seen = sync
                        .get_sync(pb::GetSyncRequest {
                            session_id: "rounds".into(),
                        })
                        .await
                        .unwrap()
                        .into_inner()
                        .version;
                    match sync
                        .mutate_sync(mutate(
                            "rounds",
                            seen,
                            Action::Switch(pb::SyncSwitch::default()),
                        ))
                        .await
                    {
                        Ok(state) => {
                            let state = state.into_inner();
                            assert_eq!(state.version, seen + 1);
                            versions.push(state.version);
                        }
                        Err(status) => {
                            assert_eq!(status.code(), Code::Aborted);
                            conflicts += 1;
                        }
                    }
                }
                (versions, conflicts)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut conflicts = 0;
    for task in tasks {
        let (versions, c) = task.await.unwrap();
        all.extend(versions);
        conflicts += c;
    }
    let successes = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), successes, "two updates got the same version");
    let last = sync
        .get_sync(pb::GetSyncRequest {
            session_id: "rounds".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(last.version, start.version + successes as u64);
    let cycles: u32 = last.participants.iter().map(|p| p.cycle_count).sum();
    assert_eq!(cycles as usize, 1 + successes, "a switch was lost");
    assert!(conflicts > 0, "the updaters never contended");
    server.stop().await;
}

/// The reason a refusal carries.
fn reason(status: &tonic::Status) -> talkgroup_proto::error::Reason {
    talkgroup_proto::error::ServiceError::decode(status).reason
}

async fn quotas_per_user_and_channel_refuse_with_their_reasons(b: Backend) {
    use talkgroup_proto::error::Reason;
    let mut config = b.config("quotas");
    config.max_sessions_per_user = 2;
    config.max_channels_per_user = 3;
    config.max_members_per_channel = 2;
    let server = TestServer::start(config).await;
    let mut c = server.clients().await;
    let create = |user: &str| pb::CreateSessionRequest {
        user_id: format!("u-{user}"),
        user_name: user.into(),
        gateway_id: "gw-test".into(),
        ttl_ms: 0,
    };

    // Sessions per user: eight connects racing each other leave exactly two, listed. A refused
    // connect lists the user's sessions (to end a parked one) while the others are being
    // written, so the race runs for several users: a listing must not forget a place whose
    // session is still being written.
    for round in 0..6 {
        let user = format!("racer{round}");
        let racing = (0..8).map(|_| {
            let mut session = c.session.clone();
            let request = create(&user);
            async move { session.create_session(request).await }
        });
        let results = futures::future::join_all(racing).await;
        let kept = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(kept, 2, "{results:?}");
        let listed = c
            .session
            .list_user_sessions(pb::ListUserSessionsRequest {
                user_id: format!("u-{user}"),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            listed.sessions.len(),
            2,
            "round {round}: a kept session was forgotten"
        );
    }
    let racing = (0..8).map(|_| {
        let mut session = c.session.clone();
        let request = create("ana");
        async move { session.create_session(request).await }
    });
    let results = futures::future::join_all(racing).await;
    let kept: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().map(|s| s.get_ref().session_id.clone()))
        .collect();
    assert_eq!(kept.len(), 2, "{results:?}");
    for refused in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert_eq!(reason(refused), Reason::TooManySessions);
    }
    let listed = c
        .session
        .list_user_sessions(pb::ListUserSessionsRequest {
            user_id: "u-ana".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.sessions.len(),
        2,
        "refused sessions are removed again"
    );
    // Another user is not affected.
    c.session.create_session(create("bo")).await.unwrap();

    // Channels per user, across the user's sessions; a channel already joined is never refused.
    let join = |sid: &str, ch: &str| pb::JoinChannelRequest {
        session_id: sid.into(),
        channel_id: ch.into(),
    };
    c.session.join_channel(join(&kept[0], "a")).await.unwrap();
    c.session.join_channel(join(&kept[0], "b")).await.unwrap();
    c.session.join_channel(join(&kept[1], "c")).await.unwrap();
    let refused = c
        .session
        .join_channel(join(&kept[1], "d"))
        .await
        .unwrap_err();
    assert_eq!(reason(&refused), Reason::TooManyChannels);
    c.session.join_channel(join(&kept[1], "c")).await.unwrap();

    // Members per channel.
    let bo = c.join("bo2", "a").await;
    let refused = c.session.join_channel(join(&bo, "b")).await;
    assert!(refused.is_ok(), "b has one member");
    let cai = c.session("cai").await;
    let full = c.session.join_channel(join(&cai, "a")).await.unwrap_err();
    assert_eq!(reason(&full), Reason::ChannelFull);
    // A member leaving makes room.
    c.session
        .leave_channel(pb::LeaveChannelRequest {
            session_id: bo,
            channel_id: "a".into(),
        })
        .await
        .unwrap();
    c.session.join_channel(join(&cai, "a")).await.unwrap();
    server.stop().await;
}

async fn members_versions_move_on_with_every_change(b: Backend) {
    let server = TestServer::start(b.config("mver")).await;
    let mut c = server.clients().await;
    let ana = c.session("ana").await;
    let joined = c
        .session
        .join_channel(pb::JoinChannelRequest {
            session_id: ana.clone(),
            channel_id: "ops".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let v1 = joined.members_version;
    assert!(v1 > 0);
    let mut watch = c.watch(&["ops"]).await;
    let bo = c.join("bo", "ops").await;
    let event = watch.next_membership().await;
    assert!(event.version > v1, "{event:?}");
    c.session
        .leave_channel(pb::LeaveChannelRequest {
            session_id: bo,
            channel_id: "ops".into(),
        })
        .await
        .unwrap();
    let left = watch.next_membership().await;
    assert!(left.version > event.version);
    let state = c
        .channel
        .get_channel_state(pb::GetChannelStateRequest {
            channel_id: "ops".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        state.members_version, left.version,
        "the state carries the latest"
    );
    // A channel that empties and fills again still never goes backwards.
    c.session
        .leave_channel(pb::LeaveChannelRequest {
            session_id: ana.clone(),
            channel_id: "ops".into(),
        })
        .await
        .unwrap();
    let emptied = watch.next_membership().await;
    let again = c
        .session
        .join_channel(pb::JoinChannelRequest {
            session_id: ana,
            channel_id: "ops".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.members_version > emptied.version);
    server.stop().await;
}

async fn open_sync_sessions_are_capped_per_channel_and_per_user(b: Backend) {
    use talkgroup_proto::error::Reason;
    let mut config = b.config("synccaps");
    config.max_syncs_per_channel = 2;
    config.max_syncs_per_user = 3;
    let server = TestServer::start(config).await;
    let mut c = server.clients().await;
    let create = |id: &str, channel: &str, owner: &str| pb::CreateSyncRequest {
        session_id: id.into(),
        channel_id: channel.into(),
        sync_mode: pb::SyncMode::PerCycle.into(),
        participants: vec![pb::SyncParticipantSpec {
            participant_id: "p".into(),
            group_id: String::new(),
        }],
        time_per_cycle_ms: 60_000,
        owner_user_id: owner.into(),
        ..Default::default()
    };
    c.sync.create_sync(create("a1", "a", "u1")).await.unwrap();
    c.sync.create_sync(create("a2", "a", "u1")).await.unwrap();
    let full = c
        .sync
        .create_sync(create("a3", "a", "u2"))
        .await
        .unwrap_err();
    assert_eq!(reason(&full), Reason::TooManySyncs, "per channel");
    c.sync.create_sync(create("b1", "b", "u1")).await.unwrap();
    let mine = c
        .sync
        .create_sync(create("c1", "c", "u1"))
        .await
        .unwrap_err();
    assert_eq!(reason(&mine), Reason::TooManySyncs, "per user");
    c.sync.create_sync(create("c2", "c", "u2")).await.unwrap();
    // Only sessions that can still change count: a cancelled one frees its places.
    c.sync
        .mutate_sync(pb::MutateSyncRequest {
            session_id: "b1".into(),
            expected_version: 0,
            action: Some(pb::mutate_sync_request::Action::Cancel(pb::Empty {})),
        })
        .await
        .unwrap();
    c.sync.create_sync(create("c3", "c", "u1")).await.unwrap();
    // A deleted one too.
    c.sync
        .delete_sync(pb::DeleteSyncRequest {
            session_id: "a1".into(),
            expected_version: 0,
        })
        .await
        .unwrap();
    c.sync.create_sync(create("a3", "a", "u2")).await.unwrap();
    server.stop().await;
}

async fn topics_deliver_only_what_their_watchers_follow(b: Backend) {
    let server = TestServer::start(b.config("topics")).await;
    let mut c = server.clients().await;
    let mut ana = c.watch_users(&["u-ana"]).await;
    let mut ops = c.watch(&["ops"]).await;
    let set = |user: &str| pb::SetUserGrantsRequest {
        user_id: user.into(),
        grants: vec![grant("ops", pb::Role::Talk)],
        replace: false,
    };
    c.admin_access.set_user_grants(set("u-bo")).await.unwrap();
    c.admin_access.set_user_grants(set("u-ana")).await.unwrap();
    // Bo's change reached nobody here: the next event of Ana's topic is her own.
    let seen = ana.next_grants().await;
    assert_eq!(seen.user_id, "u-ana");
    assert_eq!(roles(&seen), [("ops".to_owned(), pb::Role::Talk)]);

    // A sync session of another channel reaches no watcher of ops; one of ops does, and so
    // does its deletion, which still names the channel.
    let mut elsewhere = create_sync("elsewhere", pb::SyncMode::PerParticipant, 2, 60_000);
    elsewhere.channel_id = "other".into();
    c.sync.create_sync(elsewhere).await.unwrap();
    c.sync
        .create_sync(create_sync("here", pb::SyncMode::PerParticipant, 2, 60_000))
        .await
        .unwrap();
    let created = ops.next_sync().await;
    assert_eq!((created.session_id.as_str(), created.version), ("here", 1));
    c.sync
        .delete_sync(pb::DeleteSyncRequest {
            session_id: "here".into(),
            expected_version: 0,
        })
        .await
        .unwrap();
    let deleted = ops.next_sync().await;
    assert!(deleted.deleted);
    assert_eq!(
        (deleted.session_id.as_str(), deleted.channel_id.as_str()),
        ("here", "ops")
    );

    // A media node follows channels, never users.
    let mut media = pb::channel_service_client::ChannelServiceClient::new(
        server.channel_as(&Identity::Media("n1".into())),
    );
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::WatchRequest {
        action: Some(pb::watch_request::Action::Subscribe(pb::TopicSet {
            user_ids: vec!["u-ana".into()],
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut stream = media
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let refused = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("an answer in time")
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    server.stop().await;
}

/// A media node's certificate lets it watch only the channels placed on it, and the capacity
/// it registers is clamped (it cannot attract every new channel by claiming a huge one).
async fn a_media_node_follows_only_its_own_channels_and_its_capacity_is_bounded(b: Backend) {
    let server = TestServer::start(b.config("media-own")).await;
    let mut c = server.clients().await;
    server
        .registry_as("own")
        .register_node(pb::RegisterNodeRequest {
            node: Some(pb::MediaNode {
                node_id: "own".into(),
                grpc_addr: "http://own:50052".into(),
                announced_ip: "127.0.0.1".into(),
                capacity: u32::MAX,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let nodes = c
        .registry
        .list_nodes(pb::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert_eq!(nodes[0].capacity, 20_000, "clamped to the default maximum");
    let placed = c
        .registry
        .place_channel(pb::PlaceChannelRequest {
            channel_id: "ops".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(placed.node.unwrap().node_id, "own");
    server
        .registry_as("other")
        .register_node(pb::RegisterNodeRequest {
            node: Some(pb::MediaNode {
                node_id: "other".into(),
                grpc_addr: "http://other:50052".into(),
                announced_ip: "127.0.0.1".into(),
                capacity: 20_000,
                load: 0,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let mine = c
        .registry
        .place_channel(pb::PlaceChannelRequest {
            channel_id: "mine".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.node.unwrap().node_id, "other", "the less loaded node");
    // Each topic's state comes in the order asked: "ops" (not placed on "other") and
    // "nowhere" (placed nowhere) are left out, so the first state is "mine"'s.
    let watch = |node: &str, channels: &[&str]| {
        let channels: Vec<String> = channels.iter().map(|c| (*c).to_owned()).collect();
        let mut client = pb::channel_service_client::ChannelServiceClient::new(
            server.channel_as(&Identity::Media(node.into())),
        );
        async move {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(pb::WatchRequest {
                action: Some(pb::watch_request::Action::Subscribe(pb::TopicSet {
                    channel_ids: channels,
                    ..Default::default()
                })),
            })
            .await
            .unwrap();
            let mut stream = client
                .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
                .await
                .expect("an answer in time")
                .unwrap()
                .unwrap();
            (first, tx)
        }
    };
    let snapshot_of = |event: pb::WatchEvent| match event.event {
        Some(pb::watch_event::Event::Snapshot(s)) => s.channel_id,
        other => panic!("not a snapshot: {other:?}"),
    };
    let (own, _keep) = watch("own", &["ops"]).await;
    assert_eq!(snapshot_of(own), "ops", "its own channel's state");
    let (other, _keep) = watch("other", &["ops", "nowhere", "mine"]).await;
    assert_eq!(snapshot_of(other), "mine", "only its own channel");
    server.stop().await;
}

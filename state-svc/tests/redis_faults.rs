//! Redis-specific guarantees: one grant per contended round, epochs that survive Redis losing
//! everything, events shared by replicas, and fail-safe behaviour while Redis is down.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use state_svc::StoreKind;
use support::{Backend, Clients, TestServer, unique_prefix};
use talkgroup_proto::state::v1 as pb;
use testkit::{RedisServer, ServiceProcess, wait_until};
use tonic::Code;

const CONTENDERS: usize = 200;
const ROUNDS: usize = 25;

fn config_for(redis: &RedisServer, name: &str) -> state_svc::Config {
    let mut config = Backend::Memory.config(name);
    config.store = Some(StoreKind::Redis);
    config.redis_url = Some(redis.url());
    config.key_prefix = unique_prefix(name);
    config.redis_timeout_ms = 300;
    config
}

/// True once state-svc answers for `channel` (its Redis is reachable).
async fn reachable(mut c: Clients, channel: &str) -> bool {
    c.floor
        .get_floor(pb::GetFloorRequest {
            channel_id: channel.into(),
        })
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_grant_per_contended_round_and_epochs_survive_redis_loss() {
    let mut redis = RedisServer::start().unwrap();
    let server = TestServer::start(config_for(&redis, "race")).await;
    let mut c = server.clients().await;
    let mut sessions = Vec::with_capacity(CONTENDERS);
    for i in 0..CONTENDERS {
        sessions.push(c.join(&format!("user{i}"), "race").await);
    }

    let mut last_epoch = 0u64;
    for round in 0..ROUNDS {
        let calls = sessions.iter().map(|sid| {
            let mut c = c.clone();
            let sid = sid.clone();
            tokio::spawn(async move { (sid.clone(), c.acquire("race", &sid, 0).await) })
        });
        let results: Vec<_> = futures::future::join_all(calls)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let granted: Vec<_> = results
            .iter()
            .filter(|(_, r)| r.outcome() == pb::AcquireOutcome::Granted)
            .collect();
        assert_eq!(granted.len(), 1, "round {round}: exactly one grant");
        let (winner, grant) = granted[0];
        let epoch = grant.holder.as_ref().unwrap().epoch;
        assert!(
            epoch > last_epoch,
            "round {round}: epoch {epoch} after {last_epoch}"
        );
        for (_, r) in &results {
            if r.outcome() == pb::AcquireOutcome::Denied {
                assert_eq!(
                    r.holder.as_ref().unwrap().epoch,
                    epoch,
                    "every denial names the one holder"
                );
            }
        }
        let released = c.release("race", winner, epoch).await;
        assert!(released.released);
        assert!(released.epoch > epoch);
        last_epoch = released.epoch;
    }

    // Redis dies and comes back empty: the epoch counter is gone, yet the next grant's epoch is
    // higher than every earlier one, so a stale holder can never be confused with a new one.
    redis.kill();
    redis.restart().unwrap();
    wait_until(
        Duration::from_secs(10),
        "state-svc to reach the new redis",
        || reachable(c.clone(), "race"),
    )
    .await
    .unwrap();
    let sid = c.session("after").await;
    c.session
        .join_channel(pb::JoinChannelRequest {
            session_id: sid.clone(),
            channel_id: "race".into(),
        })
        .await
        .unwrap();
    let after = c.acquire("race", &sid, 0).await;
    assert_eq!(after.outcome(), pb::AcquireOutcome::Granted);
    let epoch = after.holder.unwrap().epoch;
    assert!(
        epoch > last_epoch,
        "epoch after data loss {epoch} <= earlier {last_epoch}"
    );
    server.stop().await;
}

#[tokio::test]
async fn redis_down_means_unavailable_within_bounds_and_recovery_needs_no_restart() {
    let mut redis = RedisServer::start().unwrap();
    let server = TestServer::start(config_for(&redis, "down")).await;
    let mut c = server.clients().await;
    let a = c.join("ana", "ops").await;

    // A frozen Redis: connections stay open and nothing answers. The call is bounded.
    redis.pause();
    let started = Instant::now();
    let err = c
        .floor
        .acquire_floor(pb::AcquireFloorRequest {
            channel_id: "ops".into(),
            session_id: a.clone(),
            priority: 0,
            min_epoch: 0,
        })
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        !err.message().contains("redis://"),
        "no internals in the message: {}",
        err.message()
    );
    assert!(waited < Duration::from_secs(2), "acquire took {waited:?}");
    redis.resume();
    wait_until(
        Duration::from_secs(10),
        "acquire after redis thawed",
        || {
            let mut c = c.clone();
            let a = a.clone();
            async move {
                c.floor
                    .acquire_floor(pb::AcquireFloorRequest {
                        channel_id: "ops".into(),
                        session_id: a,
                        priority: 0,
                        min_epoch: 0,
                    })
                    .await
                    .is_ok_and(|r| r.into_inner().outcome() == pb::AcquireOutcome::Granted)
            }
        },
    )
    .await
    .unwrap();

    // A dead Redis: refused connections. Never a grant, never a hang.
    redis.kill();
    for _ in 0..3 {
        let started = Instant::now();
        let err = c
            .floor
            .acquire_floor(pb::AcquireFloorRequest {
                channel_id: "ops".into(),
                session_id: a.clone(),
                priority: 0,
                min_epoch: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    redis.restart().unwrap();
    wait_until(Duration::from_secs(10), "service to work again", || {
        reachable(c.clone(), "ops")
    })
    .await
    .unwrap();
    let mut fresh = Clients::connect(server.addr).await;
    let b = fresh.join("bo", "ops").await;
    assert_eq!(
        fresh.acquire("ops", &b, 0).await.outcome(),
        pb::AcquireOutcome::Granted
    );
    server.stop().await;
}

// Multi-threaded, so the clients' connection tasks run while this thread waits for the exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_cross_state_svc_processes_sharing_one_redis() {
    let redis = support::redis();
    let prefix = unique_prefix("replicas");
    let bin = env!("CARGO_BIN_EXE_state-svc");
    let url = redis.url();
    let tls = talkgroup_common::devcerts::TestPki::global()
        .files(&talkgroup_common::tls::Identity::State);
    let (cert, key, ca) = (
        tls.cert.display().to_string(),
        tls.key.display().to_string(),
        tls.ca.display().to_string(),
    );
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-ca",
        &ca,
        "--store",
        "redis",
        "--redis-url",
        &url,
        "--key-prefix",
        &prefix,
        "--log-format",
        "json",
    ];
    let mut one = ServiceProcess::start(bin, &args, &[], "state-svc listening").unwrap();
    let mut two = ServiceProcess::start(bin, &args, &[], "state-svc listening").unwrap();
    let mut via_one = Clients::connect(one.addr).await;
    let mut via_two = Clients::connect(two.addr).await;

    let mut watch = via_two.watch(&["ops"]).await;
    let a = via_one.join("ana", "ops").await;
    let joined = watch.next_membership().await;
    assert_eq!(joined.member.unwrap().session_id, a);
    let granted = via_one.acquire("ops", &a, 0).await;
    let change = watch.next_floor().await;
    assert_eq!(change.reason(), pb::FloorReason::Granted);
    assert_eq!(change.epoch, granted.holder.unwrap().epoch);
    // And the other way round.
    let mut watch_one = via_one.watch(&["ops"]).await;
    let b = via_two.join("bo", "ops").await;
    assert_eq!(
        watch_one.next_membership().await.member.unwrap().session_id,
        b
    );

    // SIGTERM with watch streams open: each stream ends with UNAVAILABLE (so its gateway can
    // move to another replica), and both processes drain and exit cleanly, well within the
    // grace period.
    let started = Instant::now();
    one.signal_term();
    two.signal_term();
    for mut w in [watch, watch_one] {
        while w.next_or_end().await.is_some() {}
    }
    drop((via_one, via_two));
    assert_eq!(one.wait_exit(Duration::from_secs(15)).unwrap(), Some(0));
    assert_eq!(two.wait_exit(Duration::from_secs(15)).unwrap(), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "drained in {:?}",
        started.elapsed()
    );
    assert!(two.logs().iter().any(|l| l.contains("state-svc stopped")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_that_finds_its_floor_lost_says_so_once() {
    let mut redis = RedisServer::start().unwrap();
    let server = TestServer::start(config_for(&redis, "lost")).await;
    let mut c = server.clients().await;
    let ana = c.join("ana", "lost").await;
    let granted = c.acquire("lost", &ana, 0).await;
    assert_eq!(granted.outcome(), pb::AcquireOutcome::Granted);
    let epoch = granted.holder.unwrap().epoch;

    // Redis comes back empty: the floor, its epoch and the session are gone, and nobody said
    // the floor ended.
    redis.kill();
    redis.restart().unwrap();
    wait_until(
        Duration::from_secs(10),
        "state-svc reaches the new redis",
        || reachable(c.clone(), "lost"),
    )
    .await
    .unwrap();
    // A watcher of both channels, once events flow again (a probe channel's changes arrive).
    // The store answers before its pub/sub is back: a watch fails until then.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut watch = loop {
        if let Some(watch) = c.try_watch(&["lost", "probe"]).await {
            break watch;
        }
        assert!(
            Instant::now() < deadline,
            "no healthy watch after the restart"
        );
        tokio::task::yield_now().await;
    };
    let bo = c.join("bo", "probe").await;
    let probe = |mut c: Clients, bo: String| async move {
        let got = c.acquire("probe", &bo, 0).await;
        let epoch = got.holder.unwrap().epoch;
        c.release("probe", &bo, epoch).await;
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    'flowing: loop {
        probe(c.clone(), bo.clone()).await;
        while let Some(event) = watch.next_or_end().await {
            if let Some(pb::watch_event::Event::Floor(f)) = event.event
                && f.channel_id == "probe"
            {
                break 'flowing;
            }
        }
        assert!(Instant::now() < deadline, "no events after the restart");
    }
    // Drain the probe's remaining events.
    while tokio::time::timeout(Duration::from_millis(300), watch.next_or_end())
        .await
        .is_ok_and(|e| e.is_some())
    {}

    let renew = pb::RenewFloorRequest {
        channel_id: "lost".into(),
        session_id: ana.clone(),
        epoch,
    };
    let renewed = c
        .floor
        .renew_floor(renew.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(!renewed.renewed);
    let lost = watch.next_floor().await;
    assert_eq!(lost.channel_id, "lost");
    assert_eq!(lost.reason(), pb::FloorReason::Lost);
    assert!(lost.holder.is_none());
    assert!(
        lost.epoch > epoch,
        "the epoch moves on: {} <= {epoch}",
        lost.epoch
    );
    // Said once: the next renewal finds the epoch past its own, and the next event is the
    // probe's.
    assert!(
        !c.floor
            .renew_floor(renew)
            .await
            .unwrap()
            .into_inner()
            .renewed
    );
    probe(c.clone(), bo.clone()).await;
    assert_eq!(watch.next_floor().await.channel_id, "probe");
    server.stop().await;
}

/// A revocation stored after Redis came back empty must reach gateways that hold the grants of
/// before: the version carries on above every earlier one instead of starting again at 1.
#[tokio::test]
async fn grant_versions_keep_growing_after_redis_comes_back_empty() {
    let mut redis = RedisServer::start().unwrap();
    let server = TestServer::start(config_for(&redis, "grant-versions")).await;
    let mut c = server.clients().await;
    let set = |role: pb::Role| pb::SetUserGrantsRequest {
        user_id: "u-ana".into(),
        grants: vec![pb::Grant {
            channel_id: "ops".into(),
            role: role.into(),
        }],
        replace: true,
    };
    let mut last = 0;
    for role in [pb::Role::Talk, pb::Role::Listen, pb::Role::Talk] {
        let stored = c.admin_access.set_user_grants(set(role)).await.unwrap();
        let version = stored.into_inner().version;
        assert!(version > last, "{version} after {last}");
        last = version;
    }
    redis.kill();
    redis.restart().unwrap();
    let revoked = wait_until(Duration::from_secs(10), "redis back", || {
        let mut access = c.admin_access.clone();
        async move { access.set_user_grants(set(pb::Role::None)).await.is_ok() }
    })
    .await;
    revoked.unwrap();
    let after = c
        .access
        .get_user_grants(pb::GetUserGrantsRequest {
            user_id: "u-ana".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        after.version > last,
        "version after data loss {} <= earlier {last}",
        after.version
    );
    assert_eq!(after.grants[0].role(), pb::Role::None);
    server.stop().await;
}

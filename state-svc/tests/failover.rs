//! Failovers under contention, under Sentinel and under Cluster: a master is killed while
//! sessions press and release on several channels, with a bystander pressing during every
//! grant. With `--redis-wait-replicas 1` no grant anyone was told of is lost (the bystander is
//! never granted a held floor), epochs only grow on every channel, and service comes back by
//! itself.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use support::{Backend, TestServer, sentinel_url};
use talkgroup_proto::state::v1 as pb;
use testkit::{RedisCluster, RedisSentinels};

const CHANNELS: usize = 6;
/// Grants per channel after the failover before the test ends.
const AFTER: usize = 20;

#[derive(Debug, Default)]
struct Tally {
    epochs: Vec<u64>,
    double_grants: u32,
    errors: u32,
    /// The first grant after the kill.
    recovered: Option<Instant>,
}

async fn press(
    floor: &mut support::FloorServiceClient<tonic::transport::Channel>,
    channel: &str,
    session: &str,
) -> Result<pb::AcquireFloorResponse, tonic::Status> {
    floor
        .acquire_floor(pb::AcquireFloorRequest {
            channel_id: channel.into(),
            session_id: session.into(),
            priority: 0,
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_under_contention_loses_no_grant_and_epochs_only_grow() {
    // Two replicas: after the failover the new master still has one to wait for.
    let mut set = tokio::task::spawn_blocking(|| RedisSentinels::start_with(2))
        .await
        .unwrap()
        .unwrap();
    let old = std::sync::Arc::new(std::sync::OnceLock::new());
    let slowest = contention_through_a_failover(sentinel_url(&set), "failover", |_| {
        old.set(set.kill_master().unwrap()).unwrap();
    })
    .await;
    let now = set.master_port().unwrap();
    assert_ne!(
        now,
        set.servers[*old.get().unwrap()].port(),
        "a replica was promoted"
    );
    eprintln!("sentinel: service back {slowest:?} after the master was killed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_master_failover_under_contention_loses_no_grant_and_epochs_only_grow() {
    // Three masters with two replicas each: the shard that loses its master keeps one replica
    // to wait for.
    let mut cluster = tokio::task::spawn_blocking(|| RedisCluster::start_with(2))
        .await
        .unwrap()
        .unwrap();
    let url = cluster.url();
    let killed = std::sync::Arc::new(std::sync::OnceLock::new());
    let slowest = contention_through_a_failover(url, "cluster-failover", |prefix| {
        // The master of the first channel's slot: some channels lose their master, the
        // others must not notice.
        let key = format!("{prefix}:{{ch:ch0}}:floor");
        killed.set(cluster.kill_master_of(&key).unwrap()).unwrap();
    })
    .await;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.wait_ready(Duration::from_secs(20)).unwrap();
        cluster
    })
    .await
    .unwrap();
    assert!(
        cluster.nodes[*killed.get().unwrap()].pid().is_none(),
        "the killed master stays down: its replica serves the slots"
    );
    eprintln!("cluster: service back {slowest:?} after one master of three was killed");
}

/// Presses on [`CHANNELS`] channels through state-svc on `url`, calls `kill` (given the key
/// prefix) half a second in, and checks that no grant was lost or doubled and epochs only
/// grew; the longest time until a channel was granted again after the kill.
async fn contention_through_a_failover(
    url: String,
    name: &str,
    kill: impl FnOnce(&str),
) -> Duration {
    // This test's own Redis (it kills a master), not the binary's shared one.
    let mut config = Backend::Memory.config(name);
    config.store = Some(state_svc::StoreKind::Redis);
    config.redis_url = Some(url);
    config.key_prefix = support::unique_prefix(name);
    config.membership_channel = format!("{}:membership", config.key_prefix);
    config.redis_wait_replicas = 1;
    let prefix = config.key_prefix.clone();
    let server = TestServer::start(config).await;
    let mut c = server.clients().await;
    let mut sessions = Vec::new();
    for i in 0..CHANNELS {
        let channel = format!("ch{i}");
        let talker = c.join(&format!("talker{i}"), &channel).await;
        let bystander = c.join(&format!("bystander{i}"), &channel).await;
        sessions.push((channel, talker, bystander));
    }
    // Grant changes wait for a replica too: stored before the kill, kept after it.
    let grant = |role: pb::Role| pb::SetUserGrantsRequest {
        user_id: "u-ana".into(),
        grants: vec![pb::Grant {
            channel_id: "ch0".into(),
            role: role.into(),
        }],
        replace: true,
    };
    let before = c
        .admin_access
        .set_user_grants(grant(pb::Role::Talk))
        .await
        .unwrap()
        .into_inner();
    let killed_at = std::sync::Arc::new(std::sync::OnceLock::<Instant>::new());
    let workers = sessions.into_iter().map(|(channel, talker, bystander)| {
        let mut floor = c.floor.clone();
        let killed_at = std::sync::Arc::clone(&killed_at);
        tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut after = 0;
            let deadline = Instant::now() + Duration::from_secs(60);
            while after < AFTER && Instant::now() < deadline {
                let granted = match press(&mut floor, &channel, &talker).await {
                    Ok(r) if r.outcome() == pb::AcquireOutcome::Granted => r.holder.unwrap().epoch,
                    Ok(_) => {
                        tally.errors += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    Err(_) => {
                        tally.errors += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                if tally.epochs.last() != Some(&granted) {
                    tally.epochs.push(granted);
                }
                if killed_at.get().is_some() {
                    after += 1;
                    tally.recovered.get_or_insert_with(Instant::now);
                }
                // The bystander presses while the talker holds: granted would be two holders.
                if let Ok(r) = press(&mut floor, &channel, &bystander).await
                    && r.outcome() == pb::AcquireOutcome::Granted
                {
                    tally.double_grants += 1;
                }
                // Released for sure before the next press (retried through the failover).
                loop {
                    let released = floor
                        .release_floor(pb::ReleaseFloorRequest {
                            channel_id: channel.clone(),
                            session_id: talker.clone(),
                            epoch: granted,
                        })
                        .await;
                    match released {
                        Ok(_) => break,
                        Err(_) => {
                            tally.errors += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            }
            (channel, tally)
        })
    });
    let workers: Vec<_> = workers.collect();
    // Let them run, then kill the master.
    tokio::time::sleep(Duration::from_millis(500)).await;
    kill(&prefix);
    killed_at.set(Instant::now()).unwrap();
    let mut slowest = Duration::ZERO;
    for worker in workers {
        let (channel, tally) = worker.await.unwrap();
        assert_eq!(tally.double_grants, 0, "{channel}: {tally:?}");
        assert!(
            tally.epochs.windows(2).all(|w| w[0] < w[1]),
            "{channel}: epochs went backwards: {:?}",
            tally.epochs
        );
        let recovered = tally.recovered.expect("grants again after the failover");
        slowest = slowest.max(recovered - *killed_at.get().unwrap());
        eprintln!(
            "{channel}: {} grants, {} refused or failed calls, grants again {:?} after the kill",
            tally.epochs.len(),
            tally.errors,
            recovered - *killed_at.get().unwrap()
        );
    }
    let kept = c
        .access
        .get_user_grants(pb::GetUserGrantsRequest {
            user_id: "u-ana".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        kept.version, before.version,
        "the grant change survived the failover"
    );
    let after = c
        .admin_access
        .set_user_grants(grant(pb::Role::Listen))
        .await
        .unwrap()
        .into_inner();
    assert!(after.version > before.version);
    server.stop().await;
    slowest
}

/// The listener's sharded subscription follows a channel's slot to the promoted replica: a
/// watch opened before the master of `ops` dies stays open and hears floor changes made after
/// the failover as they happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_hear_a_channel_again_after_its_cluster_master_fails_over() {
    let mut cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap()
        .unwrap();
    let mut config = Backend::Memory.config("cluster-watch");
    config.store = Some(state_svc::StoreKind::Redis);
    config.redis_url = Some(cluster.url());
    config.key_prefix = support::unique_prefix("cluster-watch");
    config.membership_channel = format!("{}:membership", config.key_prefix);
    let prefix = config.key_prefix.clone();
    let server = TestServer::start(config).await;
    let mut c = server.clients().await;
    let sid = c.join("talker", "ops").await;
    let mut watch = c.watch(&["ops"]).await;
    let granted = c.acquire("ops", &sid, 0).await.holder.unwrap().epoch;
    assert_eq!(watch.next_floor().await.epoch, granted);
    c.release("ops", &sid, granted).await;
    assert!(watch.next_floor().await.holder.is_none());

    let key = format!("{prefix}:{{ch:ops}}:floor");
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.kill_master_of(&key).unwrap();
        cluster
    })
    .await
    .unwrap();
    let started = Instant::now();
    // Granted again once a replica serves the slot.
    let epoch = loop {
        let reply = c
            .floor
            .acquire_floor(pb::AcquireFloorRequest {
                channel_id: "ops".into(),
                session_id: sid.clone(),
                priority: 0,
                min_epoch: granted,
            })
            .await;
        if let Ok(r) = reply
            && r.get_ref().outcome() == pb::AcquireOutcome::Granted
        {
            break r.into_inner().holder.unwrap().epoch;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no grant");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(epoch > granted);
    // A live event, not a snapshot: the watch opened before the kill stays open (its
    // resnapshot waits for the promoted replica) and hears the release as it happens, and the
    // next grant too.
    c.release("ops", &sid, epoch).await;
    loop {
        match watch.next_raw().await {
            Ok(Some(Ok(pb::WatchEvent {
                event: Some(pb::watch_event::Event::Floor(f)),
                ..
            }))) if f.holder.is_none() && f.epoch >= epoch => break,
            // The resnapshot after the gap, and the grant made after the failover.
            Ok(Some(Ok(_))) => {}
            other => panic!("the watch opened before the kill: {other:?}"),
        }
    }
    let next = c.acquire("ops", &sid, 0).await.holder.unwrap().epoch;
    assert_eq!(watch.next_floor().await.epoch, next);
    eprintln!(
        "watch hears the channel again {:?} after the kill",
        started.elapsed()
    );
    drop(cluster);
    server.stop().await;
}

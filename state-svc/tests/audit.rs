//! The audit trail in PostgreSQL: a real `redis-server`, a real PostgreSQL from `initdb`, and
//! an outage in the middle.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::{Backend, TestServer, cluster, redis};
use talkgroup_proto::admin::v1 as apb;
use talkgroup_proto::state::v1 as pb;
use testkit::{PostgresServer, wait_until};

const ADMIN_TOKEN: &str = "audit-test-admin-token-0123";

fn admin<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {ADMIN_TOKEN}").parse().unwrap(),
    );
    request
}

type Admin = apb::admin_service_client::AdminServiceClient<tonic::transport::Channel>;

/// A sync session's history through the admin API, in version order.
async fn sync_records(
    admin_client: &mut Admin,
    session_id: &str,
) -> Result<Vec<apb::SyncRecord>, tonic::Status> {
    let reply = admin_client
        .sync_history(admin(apb::SyncHistoryRequest {
            session_id: session_id.into(),
            limit: 0,
        }))
        .await?;
    Ok(reply.into_inner().records)
}

async fn pg_client(url: &str) -> Option<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(connection);
    Some(client)
}

async fn count(url: &str, sql: &str) -> Option<i64> {
    let client = pg_client(url).await?;
    client.query_one(sql, &[]).await.ok()?.try_get(0).ok()
}

/// Stops (`up` false) or starts again (`up` true) the server, off the async threads.
async fn set_running(mut pg: PostgresServer, up: bool) -> PostgresServer {
    tokio::task::spawn_blocking(move || {
        if up {
            pg.resume().unwrap();
        } else {
            pg.stop().unwrap();
        }
        pg
    })
    .await
    .unwrap()
}

/// Waits until the audit writer has migrated the schema.
async fn schema_ready(url: &str) {
    wait_until(Duration::from_secs(20), "audit schema", || async move {
        count(url, "SELECT count(*) FROM schema_migrations").await == Some(3)
    })
    .await
    .unwrap();
}

/// Entries in a channel's audit stream.
async fn stream_len(b: Backend, prefix: &str, channel: &str) -> i64 {
    let mut xlen = ::redis::cmd("XLEN");
    xlen.arg(format!("{prefix}:{{ch:{channel}}}:audit"));
    if b == Backend::Cluster {
        let seeds: Vec<String> = cluster()
            .seeds()
            .iter()
            .map(|s| format!("redis://{s}"))
            .collect();
        let mut conn = ::redis::cluster::ClusterClient::new(seeds)
            .unwrap()
            .get_async_connection()
            .await
            .unwrap();
        return xlen.query_async(&mut conn).await.unwrap();
    }
    let mut conn = ::redis::Client::open(redis().url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    xlen.query_async(&mut conn).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_length_cap_loses_nothing() {
    outage_longer_than_the_cap(Backend::Redis).await;
}

/// Under Cluster the writer finds the streams on every master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_length_cap_loses_nothing_under_cluster() {
    outage_longer_than_the_cap(Backend::Cluster).await;
}

async fn outage_longer_than_the_cap(b: Backend) {
    let pg = tokio::task::spawn_blocking(PostgresServer::start)
        .await
        .unwrap()
        .unwrap();
    let url = pg.url();
    let mut config = b.config("audit-cap");
    config.postgres_url = Some(url.clone());
    // The smallest cap there is: without the writer, streams stay near 100 entries.
    config.audit_maxlen = 100;
    config.audit_sweep_ms = 200;
    // A loaded machine (the suite runs in parallel) must not fail a join for a slow Redis.
    config.redis_timeout_ms = 5_000;
    let prefix = config.key_prefix.clone();
    let server = TestServer::start(config).await;
    let mut c = server.clients().await;
    schema_ready(&url).await;
    let pg = set_running(pg, false).await;
    // Six times the cap in one stream while PostgreSQL is away: all of it stays in Redis.
    let sid = c.join("cap", "cap").await;
    for round in 0..300 {
        let granted = c.acquire("cap", &sid, 0).await;
        let epoch = granted.holder.unwrap().epoch;
        assert!(
            c.release("cap", &sid, epoch).await.released,
            "round {round}"
        );
    }
    let kept = stream_len(b, &prefix, "cap").await;
    assert!(
        kept >= 600,
        "the stream was trimmed to {kept} before it was copied"
    );
    let pg = set_running(pg, true).await;
    wait_until(Duration::from_secs(60), "600 audit rows", || {
        let url = url.clone();
        async move {
            count(
                &url,
                "SELECT count(*) FROM floor_events WHERE channel_id = 'cap'",
            )
            .await
                == Some(600)
        }
    })
    .await
    .unwrap();
    // Copied, then trimmed.
    wait_until(Duration::from_secs(10), "the copied stream trimmed", || {
        let prefix = prefix.clone();
        async move { stream_len(b, &prefix, "cap").await <= 1 }
    })
    .await
    .unwrap();
    server.stop().await;
    drop(pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_floor_change_reaches_postgres_exactly_once_across_an_outage() {
    let pg = tokio::task::spawn_blocking(PostgresServer::start)
        .await
        .unwrap()
        .unwrap();
    let url = pg.url();
    let mut config = Backend::Redis.config("audit");
    config.postgres_url = Some(url.clone());
    config.admin_token = Some(ADMIN_TOKEN.into());
    config.audit_sweep_ms = 200;
    let prefix = config.key_prefix.clone();
    let server = TestServer::start(config).await;
    let mut c = server.clients().await;

    // The writer has migrated the schema.
    schema_ready(&url).await;

    // PostgreSQL goes away; 1000 floor changes happen in four channels meanwhile.
    let pg = set_running(pg, false).await;
    let channels = ["a1", "a2", "a3", "a4"];
    let mut sessions = Vec::new();
    for ch in channels {
        sessions.push(c.join(&format!("u-{ch}"), ch).await);
    }
    for round in 0..125 {
        for (ch, sid) in channels.iter().zip(&sessions) {
            let granted = c.acquire(ch, sid, 0).await;
            let epoch = granted.holder.unwrap().epoch;
            assert!(c.release(ch, sid, epoch).await.released, "round {round}");
        }
    }

    // Back: every change arrives, once.
    let mut pg = set_running(pg, true).await;
    wait_until(Duration::from_secs(60), "1000 audit rows", || {
        let url = url.clone();
        async move { count(&url, "SELECT count(*) FROM floor_events").await == Some(1000) }
    })
    .await
    .unwrap();
    let client = pg_client(&url).await.unwrap();
    let rows = client
        .query(
            "SELECT event, count(*), count(DISTINCT (stream, entry_id)), count(DISTINCT channel_id)
             FROM floor_events GROUP BY event ORDER BY event",
            &[],
        )
        .await
        .unwrap();
    let summary: Vec<(String, i64, i64, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        summary,
        [
            ("granted".to_owned(), 500, 500, 4),
            ("released".to_owned(), 500, 500, 4)
        ]
    );
    let held: i64 = client
        .query_one(
            "SELECT count(*) FROM floor_events WHERE event = 'released' AND held_ms IS NOT NULL AND user_id LIKE 'u-u-a%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, 500);
    // A few more seconds of sweeps change nothing (no duplicates), and copied entries are
    // trimmed from Redis.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        count(&url, "SELECT count(*) FROM floor_events").await,
        Some(1000)
    );
    let mut conn = ::redis::Client::open(redis().url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for ch in channels {
        let len: i64 = ::redis::cmd("XLEN")
            .arg(format!("{prefix}:{{ch:{ch}}}:audit"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(len <= 1, "{ch}: {len} entries left in the stream");
    }

    // The history through the admin API: a pre-emption says who cut in and how long the
    // interrupted holder had talked; a sync session's changes in order.
    let disp = c.join("disp", "a1").await;
    let low = c.acquire("a1", &sessions[0], 0).await;
    assert_eq!(low.outcome(), pb::AcquireOutcome::Granted);
    c.acquire("a1", &disp, 100).await;
    let mut sync = c.sync.clone();
    sync.create_sync(pb::CreateSyncRequest {
        session_id: "brief".into(),
        channel_id: "a1".into(),
        sync_mode: pb::SyncMode::PerCycle.into(),
        participants: vec![pb::SyncParticipantSpec {
            participant_id: "lead".into(),
            group_id: String::new(),
        }],
        total_time_ms: 0,
        time_per_cycle_ms: 60_000,
        increment_ms: 0,
        max_time_ms: 0,
        owner_user_id: String::new(),
    })
    .await
    .unwrap();
    use pb::mutate_sync_request::Action;
    for action in [
        Action::Start(pb::Empty {}),
        Action::Switch(pb::SyncSwitch::default()),
        Action::Complete(pb::Empty {}),
    ] {
        sync.mutate_sync(pb::MutateSyncRequest {
            session_id: "brief".into(),
            expected_version: 0,
            action: Some(action),
        })
        .await
        .unwrap();
    }
    let channel = server.channel_as(&talkgroup_common::tls::Identity::Admin);
    let mut admin_client = apb::admin_service_client::AdminServiceClient::new(channel);
    let talk = wait_until(
        Duration::from_secs(20),
        "pre-emption in the history",
        || {
            let mut admin_client = admin_client.clone();
            async move {
                admin_client
                    .talk_history(admin(apb::TalkHistoryRequest {
                        channel_id: "a1".into(),
                        user_id: String::new(),
                        from_ms: 0,
                        to_ms: 0,
                        limit: 0,
                    }))
                    .await
                    .is_ok_and(|r| {
                        r.into_inner()
                            .records
                            .iter()
                            .any(|r| r.event == "preempted")
                    })
            }
        },
    )
    .await;
    assert!(talk.is_ok());
    let records = admin_client
        .talk_history(admin(apb::TalkHistoryRequest {
            channel_id: "a1".into(),
            user_id: String::new(),
            from_ms: 0,
            to_ms: 0,
            limit: 0,
        }))
        .await
        .unwrap()
        .into_inner()
        .records;
    // 125 grant-release pairs, then a grant, its pre-emption and the pre-empting grant.
    assert_eq!(records.len(), 250 + 3);
    let cut = records.iter().find(|r| r.event == "preempted").unwrap();
    assert_eq!(cut.user_id, "u-u-a1");
    assert_eq!(cut.by, disp);
    wait_until(Duration::from_secs(20), "sync history", || {
        let mut admin_client = admin_client.clone();
        async move {
            sync_records(&mut admin_client, "brief")
                .await
                .is_ok_and(|r| r.len() == 4)
        }
    })
    .await
    .unwrap();
    let changes = sync_records(&mut admin_client, "brief").await.unwrap();
    let summary: Vec<(u64, &str, &str)> = changes
        .iter()
        .map(|r| (r.version, r.action.as_str(), r.status.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            (1, "create", "pending"),
            (2, "start", "running"),
            (3, "switch", "running"),
            (4, "complete", "completed")
        ]
    );
    // The audit keeps the whole session once, then what each change changed (with the
    // status the history reads).
    let audit_db = pg_client(&url).await.unwrap();
    let states: Vec<serde_json::Value> = audit_db
        .query(
            "SELECT state::text FROM sync_events WHERE session_id = 'brief' ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
        .collect();
    assert!(states[0]["participants"].is_array() && states[0]["created_at"].is_number());
    for change in &states[1..] {
        assert!(change["status"].is_string(), "{change}");
        assert!(
            change.get("created_at").is_none(),
            "unchanged fields are left out: {change}"
        );
    }
    // Once deleted and copied, the session's audit stream leaves Redis; its history stays.
    let stream = format!("{prefix}:{{sync:brief}}:audit");
    let exists: i64 = ::redis::cmd("EXISTS")
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 1, "a live session keeps its stream");
    sync.delete_sync(pb::DeleteSyncRequest {
        session_id: "brief".into(),
        expected_version: 0,
    })
    .await
    .unwrap();
    wait_until(Duration::from_secs(20), "the sync stream removed", || {
        let (mut conn, stream) = (conn.clone(), stream.clone());
        async move {
            let exists: i64 = ::redis::cmd("EXISTS")
                .arg(&stream)
                .query_async(&mut conn)
                .await
                .unwrap();
            exists == 0
        }
    })
    .await
    .unwrap();
    let kept = sync_records(&mut admin_client, "brief").await.unwrap();
    assert_eq!(kept.len(), 5, "create, start, switch, complete, delete");
    let err = admin_client
        .talk_history(admin(apb::TalkHistoryRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    server.stop().await;
    drop(client);
    tokio::task::spawn_blocking(move || pg.stop())
        .await
        .unwrap()
        .unwrap();
}

/// One user pressing a held channel again and again, during a PostgreSQL outage: the channel's
/// stream takes at most 20 denials a window and none once it holds `audit_backlog_max`
/// uncopied entries, counting the rest; every grant and release is kept and copied; every
/// denial is accounted for in PostgreSQL (a row each, or in a `denied_aggregate` row's count);
/// and rows past the retention are deleted when the writer comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denial_flood_leaves_the_stream_bounded_and_loses_no_grant() {
    let pg = tokio::task::spawn_blocking(PostgresServer::start)
        .await
        .unwrap()
        .unwrap();
    let url = pg.url();
    let mut config = Backend::Redis.config("audit-flood");
    config.postgres_url = Some(url.clone());
    config.audit_sweep_ms = 200;
    config.audit_backlog_max = 100;
    config.audit_denial_window_ms = 1_000;
    config.redis_timeout_ms = 5_000;
    let prefix = config.key_prefix.clone();
    let server = TestServer::start(config).await;
    let mut c = server.clients().await;
    schema_ready(&url).await;
    // A row from 1970: past any retention.
    pg_client(&url)
        .await
        .unwrap()
        .execute(
            "INSERT INTO floor_events (stream, entry_id, channel_id, event, at_ms, fields)
             VALUES ('ancient', '1-0', 'ancient', 'granted', 1000, '{}')",
            &[],
        )
        .await
        .unwrap();

    let pg = set_running(pg, false).await;
    let holder = c.join("u-hold", "flood").await;
    let presser = c.join("u-press", "flood").await;
    const ROUNDS: usize = 50;
    const PRESSES: usize = 40;
    for _ in 0..ROUNDS {
        let granted = c.acquire("flood", &holder, 0).await;
        let epoch = granted.holder.unwrap().epoch;
        for _ in 0..PRESSES {
            let denied = c.acquire("flood", &presser, 0).await;
            assert_eq!(denied.outcome(), pb::AcquireOutcome::Denied);
        }
        assert!(c.release("flood", &holder, epoch).await.released);
    }
    // 100 grants and releases, 2,000 denials: the stream holds every grant and release, and
    // denials only while it holds fewer than the ceiling (100 entries), 20 a window at most,
    // plus one aggregate per closed window (the flood takes a few seconds).
    let kept = stream_len(Backend::Redis, &prefix, "flood").await;
    assert!(
        (2 * ROUNDS as i64..=2 * ROUNDS as i64 + 100 + 20).contains(&kept),
        "{kept} entries in the stream"
    );

    let pg = set_running(pg, true).await;
    // The last window's count is written at the channel's next entry after it closes: the
    // holder goes on pressing and releasing until every denial is accounted for.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut cycles = 0;
    loop {
        let granted = c.acquire("flood", &holder, 0).await;
        let epoch = granted.holder.unwrap().epoch;
        assert!(c.release("flood", &holder, epoch).await.released);
        cycles += 1;
        let denied = count(
            &url,
            "SELECT count(*) FROM floor_events WHERE channel_id = 'flood' AND event = 'denied'",
        )
        .await;
        let aggregated = count(
            &url,
            "SELECT coalesce(sum((fields->>'count')::bigint), 0)::bigint FROM floor_events
             WHERE channel_id = 'flood' AND event = 'denied_aggregate'",
        )
        .await;
        if let (Some(denied), Some(aggregated)) = (denied, aggregated) {
            assert!(denied + aggregated <= (ROUNDS * PRESSES) as i64);
            if denied + aggregated == (ROUNDS * PRESSES) as i64 {
                assert!(denied <= 100, "{denied} denial rows");
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "denials not accounted for: {denied:?} rows, {aggregated:?} aggregated"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expected = (ROUNDS + cycles) as i64;
    wait_until(
        Duration::from_secs(30),
        "every grant and release copied",
        || {
            let url = url.clone();
            async move {
                let sql = "SELECT count(*) FILTER (WHERE event = 'granted'),
                              count(*) FILTER (WHERE event = 'released')
                       FROM floor_events WHERE channel_id = 'flood'";
                let Some(client) = pg_client(&url).await else {
                    return false;
                };
                let Ok(row) = client.query_one(sql, &[]).await else {
                    return false;
                };
                row.get::<_, i64>(0) == expected && row.get::<_, i64>(1) == expected
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM floor_events WHERE stream = 'ancient'"
        )
        .await,
        Some(0),
        "a row past the retention is deleted"
    );
    server.stop().await;
    drop(pg);
}

//! Sync session latency through state-svc's gRPC API (Redis store), one caller at a time: `GetSync`,
//! and `MutateSync` (a switch) with the expected version, which runs the atomic version check
//! in Lua. Compared with SyncKairos's published figures (0.25 ms GET, 0.46 ms UPDATE; its
//! update skipped the atomic check) and with a raw Redis `GET` of the same key in the same run.
//!
//! Run with `cargo bench -p state-svc --bench sync` (`SYNC_BENCH_CALLS`, default 3000).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use hdrhistogram::Histogram;
use talkgroup_proto::state::v1 as pb;
use testkit::{RedisServer, ServiceProcess};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SYNCKAIROS_GET_MS: f64 = 0.25;
const SYNCKAIROS_UPDATE_MS: f64 = 0.46;

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

async fn run() {
    let calls: usize = std::env::var("SYNC_BENCH_CALLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3_000);
    let redis = RedisServer::start().expect("redis-server");
    let url = redis.url();
    let state = ServiceProcess::start(
        env!("CARGO_BIN_EXE_state-svc"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--insecure-plaintext",
            "--redis-url",
            &url,
            "--key-prefix",
            "bench",
            "--log-format",
            "json",
        ],
        &[("RUST_LOG", "warn,state_svc=info")],
        "state-svc listening",
    )
    .expect("state-svc");
    let mut sync =
        pb::sync_service_client::SyncServiceClient::connect(format!("http://{}", state.addr))
            .await
            .unwrap();
    sync.create_sync(pb::CreateSyncRequest {
        session_id: "bench".into(),
        channel_id: String::new(),
        sync_mode: pb::SyncMode::PerParticipant.into(),
        participants: (0..8)
            .map(|i| pb::SyncParticipantSpec {
                participant_id: format!("p{i}"),
                group_id: String::new(),
            })
            .collect(),
        total_time_ms: 86_400_000,
        time_per_cycle_ms: 0,
        increment_ms: 1_000,
        max_time_ms: 0,
        owner_user_id: String::new(),
    })
    .await
    .unwrap();
    let mut version = sync
        .mutate_sync(pb::MutateSyncRequest {
            session_id: "bench".into(),
            expected_version: 1,
            action: Some(pb::mutate_sync_request::Action::Start(pb::Empty {})),
        })
        .await
        .unwrap()
        .into_inner()
        .version;
    let mut raw = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();

    let mut get = Histogram::<u64>::new(3).unwrap();
    let mut update = Histogram::<u64>::new(3).unwrap();
    let mut raw_get = Histogram::<u64>::new(3).unwrap();
    // Warm up, then measure, alternating so both paths see the same machine.
    for round in 0..calls + 200 {
        let t = Instant::now();
        let _: Option<String> = redis::cmd("GET")
            .arg("bench:{sync:bench}")
            .query_async(&mut raw)
            .await
            .unwrap();
        let raw_us = t.elapsed().as_micros() as u64;
        let t = Instant::now();
        let got = sync
            .get_sync(pb::GetSyncRequest {
                session_id: "bench".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let get_us = t.elapsed().as_micros() as u64;
        assert_eq!(got.version, version);
        let t = Instant::now();
        version = sync
            .mutate_sync(pb::MutateSyncRequest {
                session_id: "bench".into(),
                expected_version: version,
                action: Some(pb::mutate_sync_request::Action::Switch(
                    pb::SyncSwitch::default(),
                )),
            })
            .await
            .unwrap()
            .into_inner()
            .version;
        let update_us = t.elapsed().as_micros() as u64;
        if round >= 200 {
            raw_get.record(raw_us).unwrap();
            get.record(get_us).unwrap();
            update.record(update_us).unwrap();
        }
    }
    println!("\nsync sessions, {calls} calls each, one caller, release state-svc on Redis\n");
    println!("| call | p50 ms | p99 ms | SyncKairos (published) | ours / SyncKairos p50 |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| GetSync | {:.3} | {:.3} | {SYNCKAIROS_GET_MS} | {:.2}x |",
        ms(&get, 0.5),
        ms(&get, 0.99),
        ms(&get, 0.5) / SYNCKAIROS_GET_MS
    );
    println!(
        "| MutateSync (switch, atomic version check) | {:.3} | {:.3} | {SYNCKAIROS_UPDATE_MS} (no atomic check) | {:.2}x |",
        ms(&update, 0.5),
        ms(&update, 0.99),
        ms(&update, 0.5) / SYNCKAIROS_UPDATE_MS
    );
    println!(
        "| baseline: raw Redis GET of the same key | {:.3} | {:.3} | - | - |",
        ms(&raw_get, 0.5),
        ms(&raw_get, 0.99)
    );
    println!(
        "\nGetSync / raw GET p50: {:.2}x",
        ms(&get, 0.5) / ms(&raw_get, 0.5).max(0.001)
    );
}

fn main() {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}

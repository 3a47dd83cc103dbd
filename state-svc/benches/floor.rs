//! Floor acquire+release throughput and latency: through state-svc's gRPC API, and the raw
//! Redis round trip of the same Lua scripts, measured in the same run on the same machine.
//!
//! Run with `cargo bench -p state-svc --bench floor`. It starts its own `redis-server` and a
//! release-built `state-svc` process on ephemeral loopback ports, and prints a table.
//! `FLOOR_BENCH_SECS` sets the measuring time per run (default 3) and `FLOOR_BENCH_REPS` the
//! number of alternating raw/gRPC runs per row (default 3); each row is the median run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use state_svc::store::redis::scripts::ChannelScripts;
use state_svc::store::redis::{Conn, Keys};
use support::{Mode, PREFIX, Pids, measure, median};
use testkit::RedisServer;

/// The allocator the services use, for both client paths alike.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let (secs, reps) = support::timing();
    let duration = Duration::from_secs(secs);
    let redis = RedisServer::start().expect("redis-server");
    let url = redis.url();
    let state = support::start_state(&url);
    let endpoint = format!("http://{}", state.addr);
    let client = redis::Client::open(url.as_str()).unwrap();
    let keys = Arc::new(Keys::new(PREFIX));
    // 64 callers, each with its own channel and session; the raw ones share one multiplexed
    // connection, as the service does.
    let shared = Conn::Single(
        redis::aio::ConnectionManager::new(client.clone())
            .await
            .unwrap(),
    );
    let callers = support::callers(&endpoint, 64, &shared, ChannelScripts::get(false)).await;
    let raw_callers = callers.clone();

    let pids = Pids {
        client: std::process::id(),
        state: state.pid(),
        redis: vec![redis.pid().unwrap()],
    };
    // Raw and gRPC alternate, several times, and each row reports its median run: the machine's
    // speed drifts over a run, and alternating keeps both paths under the same drift.
    let mut rows = Vec::new();
    for concurrency in [1, 64] {
        let mut raw = Vec::new();
        let mut grpc = Vec::new();
        for _ in 0..reps {
            raw.push(
                measure(
                    &raw_callers[..concurrency],
                    Mode::Raw,
                    &keys,
                    duration,
                    &pids,
                )
                .await,
            );
            grpc.push(measure(&callers[..concurrency], Mode::Grpc, &keys, duration, &pids).await);
        }
        rows.push(median(raw));
        rows.push(median(grpc));
    }

    println!();
    println!(
        "floor acquire+release, median of {reps} alternating runs of {secs} s, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "| path | callers | pairs/s | p50 µs | p99 µs | CPU µs/pair: client | state-svc | redis |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let path = match r.mode {
            Mode::Raw => "raw Redis (same Lua scripts)",
            Mode::Grpc => "state-svc gRPC",
        };
        println!(
            "| {path} | {} | {:.0} | {:.1} | {:.1} | {:.0} | {:.0} | {:.0} |",
            r.concurrency, r.ops_per_sec, r.p50_us, r.p99_us, r.cpu_us.0, r.cpu_us.1, r.cpu_us.2
        );
    }
    let find = |mode: fn(&Mode) -> bool, c: usize| {
        rows.iter()
            .find(|r| mode(&r.mode) && r.concurrency == c)
            .unwrap()
    };
    let raw1 = find(|m| matches!(m, Mode::Raw), 1);
    let grpc1 = find(|m| matches!(m, Mode::Grpc), 1);
    let raw64 = find(|m| matches!(m, Mode::Raw), 64);
    let grpc64 = find(|m| matches!(m, Mode::Grpc), 64);
    println!();
    println!(
        "p50 ratio gRPC/raw at 1 caller:           {:.2}x (target <= 4x)",
        grpc1.p50_us / raw1.p50_us
    );
    println!(
        "throughput ratio gRPC/raw at 64 callers:  {:.2} (target >= 0.5)",
        grpc64.ops_per_sec / raw64.ops_per_sec
    );
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    for line in stats
        .lines()
        .filter(|l| l.starts_with("cmdstat_evalsha") || l.starts_with("cmdstat_zadd"))
    {
        println!("redis server time: {line}");
    }
    drop(state);
}

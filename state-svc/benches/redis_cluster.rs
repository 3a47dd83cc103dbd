//! Floor acquire+release throughput on one Redis master against a three-master Redis Cluster,
//! measured in the same run: the Lua scripts straight to Redis (one multiplexed connection, or
//! the cluster connection), and through a state-svc on each.
//!
//! Run with `cargo bench -p state-svc --bench redis_cluster`. It starts a `redis-server`, a
//! Cluster of three masters without replicas (`redis-cli --cluster create`: replicas would
//! only add replication work to both sides unevenly) and a release-built `state-svc` on each,
//! all on ephemeral loopback ports, and prints a table. The paths alternate, several times;
//! each row is the median run. `FLOOR_BENCH_SECS` and `FLOOR_BENCH_REPS` as in `floor`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use state_svc::store::redis::scripts::ChannelScripts;
use state_svc::store::redis::{Conn, Keys};
use support::{Mode, PREFIX, Pids, Row, measure, median};
use testkit::{RedisCluster, RedisServer};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Callers (each its own channel), spread by the Cluster over its three masters.
const CALLERS: usize = 256;

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

    let single = RedisServer::start().expect("redis-server");
    let single_state = support::start_state(&single.url());
    let single_conn = Conn::Single(
        redis::aio::ConnectionManager::new(redis::Client::open(single.url()).unwrap())
            .await
            .unwrap(),
    );
    let single_callers = support::callers(
        &format!("http://{}", single_state.addr),
        CALLERS,
        &single_conn,
        ChannelScripts::get(false),
    )
    .await;

    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start_with(0))
        .await
        .unwrap()
        .expect("redis cluster");
    let cluster_state = support::start_state(&cluster.url());
    let seeds: Vec<String> = cluster
        .seeds()
        .iter()
        .map(|s| format!("redis://{s}"))
        .collect();
    let cluster_conn = Conn::Cluster(
        redis::cluster::ClusterClient::new(seeds)
            .unwrap()
            .get_async_connection()
            .await
            .unwrap(),
    );
    let cluster_callers = support::callers(
        &format!("http://{}", cluster_state.addr),
        CALLERS,
        &cluster_conn,
        ChannelScripts::get(true),
    )
    .await;

    let single_keys = Arc::new(Keys::new(PREFIX));
    let cluster_keys = Arc::new(Keys::for_cluster(PREFIX));
    let single_pids = Pids {
        client: std::process::id(),
        state: single_state.pid(),
        redis: vec![single.pid().unwrap()],
    };
    let cluster_pids = Pids {
        client: std::process::id(),
        state: cluster_state.pid(),
        redis: cluster.nodes.iter().filter_map(|n| n.pid()).collect(),
    };

    // (label, rows) per path and caller count.
    let mut table: Vec<(&str, usize, Row)> = Vec::new();
    for concurrency in [64, CALLERS] {
        for mode in [Mode::Raw, Mode::Grpc] {
            let mut one = Vec::new();
            let mut three = Vec::new();
            for _ in 0..reps {
                one.push(
                    measure(
                        &single_callers[..concurrency],
                        mode,
                        &single_keys,
                        duration,
                        &single_pids,
                    )
                    .await,
                );
                three.push(
                    measure(
                        &cluster_callers[..concurrency],
                        mode,
                        &cluster_keys,
                        duration,
                        &cluster_pids,
                    )
                    .await,
                );
            }
            table.push(("one master", concurrency, median(one)));
            table.push(("Cluster, 3 masters", concurrency, median(three)));
        }
    }

    println!();
    println!(
        "floor acquire+release, median of {reps} alternating runs of {secs} s, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "| Redis | path | callers | pairs/s | p50 µs | p99 µs | CPU µs/pair: client | state-svc | redis |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for (redis, _, r) in &table {
        let path = match r.mode {
            Mode::Raw => "raw Redis (same Lua scripts)",
            Mode::Grpc => "state-svc gRPC",
        };
        println!(
            "| {redis} | {path} | {} | {:.0} | {:.1} | {:.1} | {:.0} | {:.0} | {:.0} |",
            r.concurrency, r.ops_per_sec, r.p50_us, r.p99_us, r.cpu_us.0, r.cpu_us.1, r.cpu_us.2
        );
    }
    println!();
    for pair in table.chunks(2) {
        let (_, concurrency, one) = &pair[0];
        let (_, _, three) = &pair[1];
        let path = match one.mode {
            Mode::Raw => "raw",
            Mode::Grpc => "gRPC",
        };
        println!(
            "throughput Cluster/one master, {path}, {concurrency} callers: {:.2}x",
            three.ops_per_sec / one.ops_per_sec
        );
    }
    drop((single_state, cluster_state));
}

//! Floor acquire+release throughput and latency: through state-svc's gRPC API, and the raw
//! Redis round trip of the same Lua scripts, measured in the same run on the same machine.
//!
//! Run with `cargo bench -p state-svc --bench floor`. It starts its own `redis-server` and a
//! release-built `state-svc` process on ephemeral loopback ports, and prints a table.
//! `FLOOR_BENCH_SECS` sets the measuring time per run (default 3) and `FLOOR_BENCH_REPS` the
//! number of alternating raw/gRPC runs per row (default 3); each row is the median run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use state_svc::store::redis::Keys;
use state_svc::store::redis::scripts::ChannelScripts;
use talkgroup_proto::state::v1 as pb;
use testkit::{RedisServer, ServiceProcess};
use tonic::transport::Channel;

/// The allocator the services use, for both client paths alike.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PREFIX: &str = "bench";
/// Callers sharing one HTTP/2 connection to state-svc.
const GRPC_CALLERS_PER_CONNECTION: usize = 64;
const LEASE_MS: &str = "5000";
const MAX_TALK_MS: &str = "60000";

#[derive(Clone, Copy, Debug)]
enum Mode {
    Raw,
    Grpc,
}

struct Row {
    mode: Mode,
    /// CPU microseconds per pair: (bench client, state-svc, redis).
    cpu_us: (f64, f64, f64),
    concurrency: usize,
    ops_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
}

/// One caller's channel, session and connections.
#[derive(Clone)]
struct Caller {
    channel: String,
    session: String,
    grpc: pb::floor_service_client::FloorServiceClient<Channel>,
    redis: redis::aio::MultiplexedConnection,
}

async fn raw_script(
    conn: &mut redis::aio::MultiplexedConnection,
    script: &redis::Script,
    keys: &Keys,
    channel: &str,
    extra: &[&str],
) -> String {
    let ch = state_svc::domain::ChannelId::parse(channel).unwrap();
    let mut invocation = script.prepare_invoke();
    for key in keys.channel(&ch).all() {
        invocation.key(key);
    }
    invocation
        .arg(channel)
        .arg(LEASE_MS)
        .arg(MAX_TALK_MS)
        .arg("60000")
        .arg("100000");
    for arg in extra {
        invocation.arg(*arg);
    }
    invocation.invoke_async(conn).await.unwrap()
}

async fn one_pair(caller: &mut Caller, mode: Mode, keys: &Keys) {
    match mode {
        Mode::Raw => {
            let acquired = raw_script(
                &mut caller.redis,
                &ChannelScripts::get(false).acquire,
                keys,
                &caller.channel,
                &[&caller.session, "0"],
            )
            .await;
            assert!(acquired.contains("\"granted\""), "{acquired}");
            let released = raw_script(
                &mut caller.redis,
                &ChannelScripts::get(false).release,
                keys,
                &caller.channel,
                &[&caller.session, "0"],
            )
            .await;
            assert!(released.contains("\"released\""), "{released}");
        }
        Mode::Grpc => {
            let granted = caller
                .grpc
                .acquire_floor(pb::AcquireFloorRequest {
                    channel_id: caller.channel.clone(),
                    session_id: caller.session.clone(),
                    priority: 0,
                    min_epoch: 0,
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(granted.outcome(), pb::AcquireOutcome::Granted);
            let released = caller
                .grpc
                .release_floor(pb::ReleaseFloorRequest {
                    channel_id: caller.channel.clone(),
                    session_id: caller.session.clone(),
                    epoch: granted.holder.map(|h| h.epoch).unwrap_or_default(),
                })
                .await
                .unwrap()
                .into_inner();
            assert!(released.released);
        }
    }
}

/// The processes whose CPU time is charged to each pair.
#[derive(Clone, Copy)]
struct Pids {
    client: u32,
    state: u32,
    redis: u32,
}

fn cpu(pids: Pids) -> [Duration; 3] {
    [pids.client, pids.state, pids.redis].map(|p| testkit::process_cpu_time(p).unwrap_or_default())
}

async fn measure(
    callers: &[Caller],
    mode: Mode,
    keys: &Arc<Keys>,
    duration: Duration,
    pids: Pids,
) -> Row {
    // Warm up connections, scripts and caches.
    for caller in callers {
        let mut caller = caller.clone();
        for _ in 0..20 {
            one_pair(&mut caller, mode, keys).await;
        }
    }
    let cpu_before = cpu(pids);
    let started = Instant::now();
    let deadline = started + duration;
    let tasks = callers.iter().cloned().map(|mut caller| {
        let keys = Arc::clone(keys);
        tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).unwrap();
            while Instant::now() < deadline {
                let t = Instant::now();
                one_pair(&mut caller, mode, &keys).await;
                hist.record(t.elapsed().as_nanos() as u64).unwrap();
            }
            hist
        })
    });
    let mut total = Histogram::<u64>::new(3).unwrap();
    for hist in futures::future::join_all(tasks).await {
        total.add(hist.unwrap()).unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_after = cpu(pids);
    let pairs = total.len().max(1) as f64;
    let per_pair = |i: usize| (cpu_after[i] - cpu_before[i]).as_secs_f64() * 1e6 / pairs;
    Row {
        mode,
        cpu_us: (per_pair(0), per_pair(1), per_pair(2)),
        concurrency: callers.len(),
        ops_per_sec: total.len() as f64 / elapsed,
        p50_us: total.value_at_quantile(0.50) as f64 / 1000.0,
        p99_us: total.value_at_quantile(0.99) as f64 / 1000.0,
    }
}

/// The run with the median throughput.
fn median(mut runs: Vec<Row>) -> Row {
    runs.sort_by(|a, b| a.ops_per_sec.total_cmp(&b.ops_per_sec));
    runs.swap_remove(runs.len() / 2)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let secs: u64 = std::env::var("FLOOR_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let duration = Duration::from_secs(secs);
    let reps: usize = std::env::var("FLOOR_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
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
            PREFIX,
            "--log-format",
            "json",
        ],
        &[("RUST_LOG", "warn,state_svc=info")],
        "state-svc listening",
    )
    .expect("state-svc");
    let endpoint = format!("http://{}", state.addr);
    let client = redis::Client::open(url.as_str()).unwrap();
    let keys = Arc::new(Keys::new(PREFIX));

    // 64 callers, each with its own channel and session; a gateway-like client uses a handful
    // of HTTP/2 connections, one per 16 callers here.
    let mut callers = Vec::new();
    let mut grpc_channels = Vec::new();
    for _ in 0..4 {
        grpc_channels.push(
            Channel::from_shared(endpoint.clone())
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
    }
    let mut sessions =
        pb::session_service_client::SessionServiceClient::new(grpc_channels[0].clone());
    for i in 0..64 {
        let channel = format!("bench-{i}");
        let session = sessions
            .create_session(pb::CreateSessionRequest {
                user_id: format!("u{i}"),
                user_name: format!("user {i}"),
                gateway_id: "bench".into(),
                ttl_ms: 3_600_000,
            })
            .await
            .unwrap()
            .into_inner()
            .session_id;
        sessions
            .join_channel(pb::JoinChannelRequest {
                session_id: session.clone(),
                channel_id: channel.clone(),
            })
            .await
            .unwrap();
        callers.push(Caller {
            channel,
            session,
            grpc: pb::floor_service_client::FloorServiceClient::new(
                grpc_channels[i / GRPC_CALLERS_PER_CONNECTION].clone(),
            ),
            redis: client.get_multiplexed_async_connection().await.unwrap(),
        });
    }
    // Raw callers share one multiplexed connection, as the service does.
    let shared = client.get_multiplexed_async_connection().await.unwrap();
    let raw_callers: Vec<Caller> = callers
        .iter()
        .cloned()
        .map(|mut c| {
            c.redis = shared.clone();
            c
        })
        .collect();

    let pids = Pids {
        client: std::process::id(),
        state: state.pid(),
        redis: redis.pid().unwrap(),
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
                    pids,
                )
                .await,
            );
            grpc.push(measure(&callers[..concurrency], Mode::Grpc, &keys, duration, pids).await);
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

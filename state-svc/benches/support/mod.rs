//! What the floor benchmarks share: a caller's acquire+release pair, raw (the Lua scripts
//! straight to Redis) or through state-svc's gRPC API, and a timed run of many callers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use state_svc::store::redis::scripts::ChannelScripts;
use state_svc::store::redis::{Conn, Keys};
use talkgroup_proto::state::v1 as pb;
use tonic::transport::Channel;

pub const PREFIX: &str = "bench";
/// Callers sharing one HTTP/2 connection to state-svc.
pub const GRPC_CALLERS_PER_CONNECTION: usize = 64;
const LEASE_MS: &str = "5000";
const MAX_TALK_MS: &str = "60000";

#[derive(Clone, Copy, Debug)]
pub enum Mode {
    Raw,
    Grpc,
}

pub struct Row {
    pub mode: Mode,
    /// CPU microseconds per pair: (bench client, state-svc, redis).
    pub cpu_us: (f64, f64, f64),
    pub concurrency: usize,
    pub ops_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// One caller's channel, session and connections.
#[derive(Clone)]
pub struct Caller {
    pub channel: String,
    pub session: String,
    pub grpc: pb::floor_service_client::FloorServiceClient<Channel>,
    pub redis: Conn,
    /// The channel scripts of the Redis this caller talks to (sharded under Cluster).
    pub scripts: &'static ChannelScripts,
}

async fn raw_script(
    conn: &mut Conn,
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
        .arg(state_svc::store::redis::scripts::audit_policy(
            false, 100_000, 60_000,
        ));
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
                &caller.scripts.acquire,
                keys,
                &caller.channel,
                &[&caller.session, "0"],
            )
            .await;
            assert!(acquired.contains("\"granted\""), "{acquired}");
            let released = raw_script(
                &mut caller.redis,
                &caller.scripts.release,
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
#[derive(Clone)]
pub struct Pids {
    pub client: u32,
    pub state: u32,
    /// Every Redis server process (the masters of a Cluster).
    pub redis: Vec<u32>,
}

fn cpu(pids: &Pids) -> [Duration; 3] {
    let of = |p: u32| testkit::process_cpu_time(p).unwrap_or_default();
    [
        of(pids.client),
        of(pids.state),
        pids.redis.iter().map(|p| of(*p)).sum(),
    ]
}

pub async fn measure(
    callers: &[Caller],
    mode: Mode,
    keys: &Arc<Keys>,
    duration: Duration,
    pids: &Pids,
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
pub fn median(mut runs: Vec<Row>) -> Row {
    runs.sort_by(|a, b| a.ops_per_sec.total_cmp(&b.ops_per_sec));
    runs.swap_remove(runs.len() / 2)
}

/// Starts a plaintext state-svc on `redis_url` for a benchmark.
pub fn start_state(redis_url: &str) -> testkit::ServiceProcess {
    testkit::ServiceProcess::start(
        env!("CARGO_BIN_EXE_state-svc"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--insecure-plaintext",
            "--redis-url",
            redis_url,
            "--key-prefix",
            PREFIX,
            "--log-format",
            "json",
        ],
        &[("RUST_LOG", "warn,state_svc=info")],
        "state-svc listening",
    )
    .expect("state-svc")
}

/// `count` callers on the state-svc at `endpoint`, each with its own channel and session,
/// sharing HTTP/2 connections as a gateway does (one per
/// [`GRPC_CALLERS_PER_CONNECTION`]) and `redis` for the raw path.
pub async fn callers(
    endpoint: &str,
    count: usize,
    redis: &Conn,
    scripts: &'static ChannelScripts,
) -> Vec<Caller> {
    let mut grpc_channels = Vec::new();
    for _ in 0..count.div_ceil(GRPC_CALLERS_PER_CONNECTION) {
        grpc_channels.push(
            Channel::from_shared(endpoint.to_owned())
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
    }
    let mut sessions =
        pb::session_service_client::SessionServiceClient::new(grpc_channels[0].clone());
    let mut callers = Vec::new();
    for i in 0..count {
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
            redis: redis.clone(),
            scripts,
        });
    }
    callers
}

/// `FLOOR_BENCH_SECS` (default 3) and `FLOOR_BENCH_REPS` (default 3).
pub fn timing() -> (u64, usize) {
    let secs = std::env::var("FLOOR_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let reps = std::env::var("FLOOR_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    (secs, reps)
}

//! Floor latency through the gateway: press-to-grant (a client's `ptt-start` sent to its
//! `granted` reply) and press-to-`speaker-changed` at every listener, with N clients in one
//! channel.
//!
//! Run with `cargo bench -p signaling-svc --bench floor_flow`. It starts Redis, and state-svc,
//! a media node and the gateway in this process, each on its own runtime (as separate processes
//! would be) and on ephemeral loopback ports, connects N
//! WebSocket clients, and presses `FLOOR_FLOW_PRESSES` times (default 200) per size and pace.
//! `FLOOR_FLOW_CLIENTS=50,500` picks the sizes.
//!
//! Two paces: *settled* presses once every listener has heard the previous release (how people
//! take turns: nobody presses within a millisecond of the last `speaker-changed`), and
//! *back-to-back* presses the moment the `ptt-stop` reply arrives, while the release is still
//! being fanned out to the N members (a stress figure: the press queues behind that fan-out on
//! this machine's two cores, which the benchmark's own N clients share).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SECRET: &str = "a-benchmark-secret-of-some-length";

fn token(sub: &str) -> String {
    testkit::jwt::talker(SECRET, sub, sub)
}

/// Starts a server on its own runtime, as if it were its own process: the servers and the
/// benchmark's clients are scheduled by the OS, not queued behind each other's tasks.
fn serve<F: Future<Output = ()> + Send + 'static>(
    name: &str,
    f: impl FnOnce(tokio::net::TcpListener) -> F + Send + 'static,
) -> (std::net::SocketAddr, tokio::runtime::Runtime) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    runtime.spawn(async move { f(tokio::net::TcpListener::from_std(listener).unwrap()).await });
    (addr, runtime)
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Arrivals of `speaker-changed` at the listeners: (epoch, granted, wall clock in µs; the
/// listeners are another process).
type Arrivals = Arc<Mutex<Vec<(u64, bool, u64)>>>;

fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// The part of a frame the listeners look at.
#[derive(serde::Deserialize)]
struct Push<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default)]
    data: Option<PushData<'a>>,
}

#[derive(serde::Deserialize)]
struct PushData<'a> {
    #[serde(default)]
    epoch: u64,
    #[serde(default, borrow)]
    reason: Option<&'a str>,
}

#[derive(Clone, Copy, PartialEq)]
enum Pace {
    Settled,
    BackToBack,
}

impl Pace {
    fn name(self) -> &'static str {
        match self {
            Self::Settled => "settled",
            Self::BackToBack => "back-to-back",
        }
    }
}

/// Waits (bounded) until `count` arrivals match `f`.
async fn wait_arrivals(arrivals: &Arrivals, count: usize, f: impl Fn(u64, bool) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while arrivals
        .lock()
        .unwrap()
        .iter()
        .filter(|(e, g, _)| f(*e, *g))
        .count()
        < count
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

fn main() {
    if let Ok(spec) = std::env::var(LISTENERS_ENV) {
        listeners(&spec);
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let sizes: Vec<usize> = std::env::var("FLOOR_FLOW_CLIENTS")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![50, 500]);
    let presses: usize = std::env::var("FLOOR_FLOW_PRESSES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let redis = testkit::RedisServer::start().unwrap();
    let stop = CancellationToken::new();
    let mut state_config = state_svc::Config::for_tests();
    state_config.redis_url = Some(redis.url());
    let s = stop.clone();
    let (state, state_rt) = serve("state-svc", move |l| async move {
        state_svc::run(state_config, l, s).await.unwrap()
    });
    let mut media_config = media_svc::Config::for_tests();
    media_config.state_url = Some(format!("http://{state}"));
    let s = stop.clone();
    let (_, media_rt) = serve("media-svc", move |l| async move {
        media_svc::run(media_config, l, s).await.unwrap()
    });
    let mut gw_config = signaling_svc::Config::for_tests(SECRET);
    gw_config.state_url = format!("http://{state}");
    gw_config.request_rate = 10_000;
    gw_config.ptt_rate = 10_000;
    gw_config.ping_interval_ms = 3_600_000;
    // Every client comes from 127.0.0.1: one address may hold them all.
    gw_config.max_sockets_per_address = 100_000;
    gw_config.max_connections_per_address = 100_000;
    let s = stop.clone();
    let (gw, gateway_rt) = serve("gateway", move |l| async move {
        signaling_svc::run(gw_config, l, s).await.unwrap()
    });
    tokio::time::sleep(Duration::from_millis(1_500)).await; // the media node registers (2 s heartbeat at most)

    let mut rows = Vec::new();
    for (round, &n) in sizes.iter().enumerate() {
        let channel = format!("bench{round}");
        let arrivals: Arrivals = Arc::default();
        let setup = Instant::now();
        let _listeners = spawn_listeners(gw, &channel, round, n - 1, &arrivals);
        eprintln!(
            "{n} clients joined in {:.1} s",
            setup.elapsed().as_secs_f64()
        );
        tokio::time::sleep(Duration::from_millis(500)).await; // joins and their channel-state pushes settle
        // The speaker is another device: its own thread and runtime.
        let speaker = std::thread::spawn(move || {
            raise_this_thread();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let mut ws = connect(gw, &format!("b{round}-0"), &channel).await;
                tokio::time::sleep(Duration::from_millis(100)).await; // its join settles
                let mut results = Vec::new();
                for pace in [Pace::Settled, Pace::BackToBack] {
                    let (grant, heard) =
                        presses_at(pace, n, presses, &channel, &mut ws, &arrivals).await;
                    results.push((n, pace, grant, heard));
                }
                results
            })
        });
        rows.extend(
            tokio::task::spawn_blocking(move || speaker.join().unwrap())
                .await
                .unwrap(),
        );
    }
    println!();
    println!(
        "floor latency through the gateway (Redis-backed state-svc, one media node, all in one process), {presses} presses per size"
    );
    println!(
        "| clients | pace | press-to-grant p50 | p95 | p99 | press-to-speaker-changed at listeners p50 | p95 | p99 |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    for (n, pace, g, h) in &rows {
        let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "| {n} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
            pace.name(),
            ms(g, 0.5),
            ms(g, 0.95),
            ms(g, 0.99),
            ms(h, 0.5),
            ms(h, 0.95),
            ms(h, 0.99)
        );
    }
    stop.cancel();
    for runtime in [state_rt, media_rt, gateway_rt] {
        runtime.shutdown_background();
    }
}

/// Set in the listeners' process: `gateway channel round count`.
const LISTENERS_ENV: &str = "FLOOR_FLOW_LISTENERS";

/// The child process holding the listeners.
struct Listeners(std::process::Child);

impl Drop for Listeners {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `count` listeners in a child process at the lowest CPU priority (`nice -n 19`): on
/// this machine they stand for other people's phones, which would not take the server's or the
/// speaker's CPU. Returns once all have joined; their `speaker-changed` arrivals go into
/// `arrivals`.
fn spawn_listeners(
    gw: std::net::SocketAddr,
    channel: &str,
    round: usize,
    count: usize,
    arrivals: &Arrivals,
) -> Listeners {
    use std::io::BufRead;
    let mut child = std::process::Command::new("nice")
        .args(["-n", "19"])
        .arg(std::env::current_exe().unwrap())
        .env(LISTENERS_ENV, format!("{gw} {channel} {round} {count}"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("nice and this benchmark's binary");
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let arrivals = Arc::clone(arrivals);
    std::thread::spawn(move || {
        for line in stdout.lines() {
            let Ok(line) = line else { break };
            let fields: Vec<&str> = line.split(' ').collect();
            match fields[..] {
                ["ready"] => {
                    let _ = ready_tx.send(());
                }
                [epoch, granted, at] => arrivals.lock().unwrap().push((
                    epoch.parse().unwrap(),
                    granted == "1",
                    at.parse().unwrap(),
                )),
                _ => {}
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the listeners joined");
    Listeners(child)
}

/// The listeners' process: joins, says `ready`, then prints `epoch granted(0|1) wall_us` for
/// every `speaker-changed` until killed.
fn listeners(spec: &str) {
    let fields: Vec<&str> = spec.split(' ').collect();
    let gw: std::net::SocketAddr = fields[0].parse().unwrap();
    let channel = fields[1].to_owned();
    let round: usize = fields[2].parse().unwrap();
    let count: usize = fields[3].parse().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        for i in 1..=count {
            let mut ws = connect(gw, &format!("b{round}-{i}"), &channel).await;
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(Ok(message)) = ws.next().await {
                    let Message::Text(text) = message else {
                        continue;
                    };
                    let at = wall_us();
                    let Ok(push) = serde_json::from_str::<Push>(text.as_str()) else {
                        continue;
                    };
                    if push.kind == "speaker-changed"
                        && let Some(data) = push.data
                    {
                        let granted = u8::from(data.reason == Some("granted"));
                        let _ = tx.send(format!("{} {granted} {at}", data.epoch));
                    }
                }
            });
        }
        println!("ready");
        while let Some(line) = rx.recv().await {
            println!("{line}");
        }
    });
}

/// Gives the calling thread (the speaker's device) the CPU whenever it is ready
/// (`chrt -f` on its thread id, a real-time priority; needs root, and only warns without it).
/// A phone does not wait for the server's CPU to read its reply; here, without it, the
/// server's fan-out to 500 sockets that starts right after the reply holds both cores and the
/// reply waits in the speaker's socket for up to a few milliseconds (measured: written by the
/// gateway, then read 2.3 ms later).
fn raise_this_thread() {
    let tid = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name().map(|t| t.to_string_lossy().into_owned()));
    let raised = tid.is_some_and(|tid| {
        std::process::Command::new("chrt")
            .args(["-f", "-p", "10", &tid])
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !raised {
        eprintln!(
            "note: could not give the speaker a real-time priority (not root?): its reads may wait for the servers' CPU"
        );
    }
}

/// Connects a client and joins `channel`.
async fn connect(gw: std::net::SocketAddr, user: &str, channel: &str) -> Ws {
    let url = format!("ws://{gw}/ws?token={}", token(user));
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
        .await
        .unwrap();
    ws.send(Message::Text(
        json!({"type": "join-channel", "id": "join", "data": {"channelId": channel}})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    ws
}

/// Sends a request and reads until its reply; returns the reply and when it was read.
async fn request(ws: &mut Ws, kind: &str, id: &str, channel: &str) -> (Value, Instant) {
    ws.send(Message::Text(
        json!({"type": kind, "id": id, "data": {"channelId": channel}})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    loop {
        let text = match ws.next().await {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(_)) => continue,
            other => panic!("the speaker's socket closed: {other:?}"),
        };
        let at = Instant::now();
        let v: Value = serde_json::from_str(text.as_str()).unwrap();
        if v["id"] == id {
            return (v, at);
        }
    }
}

/// Presses `presses` times at `pace`: press-to-grant at the speaker, and press to the grant's
/// `speaker-changed` at every listener.
async fn presses_at(
    pace: Pace,
    n: usize,
    presses: usize,
    channel: &str,
    ws: &mut Ws,
    arrivals: &Arrivals,
) -> (Histogram<u64>, Histogram<u64>) {
    let mut grant = Histogram::<u64>::new(3).unwrap();
    let mut heard = Histogram::<u64>::new(3).unwrap();
    for p in 0..presses {
        arrivals.lock().unwrap().clear();
        let t0 = Instant::now();
        let t0_wall = wall_us();
        let (reply, at) = request(ws, "ptt-start", &format!("s{p}"), channel).await;
        assert_eq!(reply["data"]["granted"], true, "{reply}");
        grant
            .record(at.duration_since(t0).as_micros() as u64)
            .unwrap();
        let epoch = reply["data"]["epoch"].as_u64().unwrap();
        wait_arrivals(arrivals, n - 1, |e, g| g && e == epoch).await;
        for (_, _, at) in arrivals
            .lock()
            .unwrap()
            .iter()
            .filter(|(e, g, _)| *g && *e == epoch)
        {
            heard.record(at.saturating_sub(t0_wall)).unwrap();
        }
        request(ws, "ptt-stop", &format!("x{p}"), channel).await;
        if pace == Pace::Settled {
            wait_arrivals(arrivals, n - 1, |e, g| !g && e > epoch).await;
        }
    }
    (grant, heard)
}

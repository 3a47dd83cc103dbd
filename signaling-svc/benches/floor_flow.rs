//! Floor latency through the gateway: press-to-grant (a client's `ptt-start` sent to its
//! `granted` reply) and press-to-`speaker-changed` at every listener, with N clients in one
//! channel.
//!
//! Run with `cargo bench -p signaling-svc --bench floor_flow`. It starts Redis, and state-svc,
//! a media node and the gateway in this process on ephemeral loopback ports, connects N
//! WebSocket clients, and presses `FLOOR_FLOW_PRESSES` times (default 200) per size.
//! `FLOOR_FLOW_CLIENTS=50,500` picks the sizes.

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
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3_600;
    let claims = json!({"sub": sub, "name": sub, "exp": exp, "grants": {"*": "talk"}});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn serve<F: Future<Output = ()> + Send + 'static>(
    f: impl FnOnce(tokio::net::TcpListener) -> F,
) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(f(listener));
    addr
}

type Sink = futures::stream::SplitSink<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    Message,
>;

/// Arrival times of `speaker-changed` (reason granted) by epoch, over all listeners.
type Arrivals = Arc<Mutex<Vec<(u64, Instant)>>>;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
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
    let state =
        serve(move |l| async move { state_svc::run(state_config, l, s).await.unwrap() }).await;
    let mut media_config = media_svc::Config::for_tests();
    media_config.state_url = Some(format!("http://{state}"));
    let s = stop.clone();
    serve(move |l| async move { media_svc::run(media_config, l, s).await.unwrap() }).await;
    let mut gw_config = signaling_svc::Config::for_tests(SECRET);
    gw_config.state_url = format!("http://{state}");
    gw_config.request_rate = 10_000;
    gw_config.ptt_rate = 10_000;
    gw_config.ping_interval_ms = 3_600_000;
    let s = stop.clone();
    let gw =
        serve(move |l| async move { signaling_svc::run(gw_config, l, s).await.unwrap() }).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await; // the media node registers (2 s heartbeat at most)

    let mut rows = Vec::new();
    for (round, &n) in sizes.iter().enumerate() {
        let channel = format!("bench{round}");
        let arrivals: Arrivals = Arc::default();
        let mut speaker_sink: Option<Sink> = None;
        let (reply_tx, mut reply_rx) = tokio::sync::mpsc::channel::<Value>(16);
        let setup = Instant::now();
        for i in 0..n {
            let url = format!("ws://{gw}/ws?token={}", token(&format!("b{round}-{i}")));
            let (ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
                .await
                .unwrap();
            let (mut sink, mut stream) = ws.split();
            sink.send(Message::Text(
                json!({"type": "join-channel", "id": "join", "data": {"channelId": channel}})
                    .to_string()
                    .into(),
            ))
            .await
            .unwrap();
            let arrivals = Arc::clone(&arrivals);
            let replies = (i == 0).then(|| reply_tx.clone());
            tokio::spawn(async move {
                while let Some(Ok(message)) = stream.next().await {
                    let Message::Text(text) = message else {
                        continue;
                    };
                    let at = Instant::now();
                    let v: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                    if v["type"] == "speaker-changed" && v["data"]["reason"] == "granted" {
                        if replies.is_none() {
                            arrivals
                                .lock()
                                .unwrap()
                                .push((v["data"]["epoch"].as_u64().unwrap_or(0), at));
                        }
                    } else if let Some(tx) = &replies
                        && v["id"].is_string()
                        && v["id"] != "join"
                    {
                        let _ = tx.send(v).await;
                    }
                }
            });
            if i == 0 {
                speaker_sink = Some(sink);
            } else {
                std::mem::forget(sink); // keep the socket open for the run
            }
        }
        eprintln!(
            "{n} clients joined in {:.1} s",
            setup.elapsed().as_secs_f64()
        );
        let mut sink = speaker_sink.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await; // joins and their channel-state pushes settle
        let mut grant = Histogram::<u64>::new(3).unwrap();
        let mut heard = Histogram::<u64>::new(3).unwrap();
        for p in 0..presses {
            arrivals.lock().unwrap().clear();
            let t0 = Instant::now();
            sink.send(Message::Text(
                json!({"type": "ptt-start", "id": format!("s{p}"), "data": {"channelId": channel}})
                    .to_string()
                    .into(),
            ))
            .await
            .unwrap();
            let reply = reply_rx.recv().await.unwrap();
            assert_eq!(reply["data"]["granted"], true, "{reply}");
            grant.record(t0.elapsed().as_micros() as u64).unwrap();
            let epoch = reply["data"]["epoch"].as_u64().unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            while arrivals
                .lock()
                .unwrap()
                .iter()
                .filter(|(e, _)| *e == epoch)
                .count()
                < n - 1
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            for (_, at) in arrivals.lock().unwrap().iter().filter(|(e, _)| *e == epoch) {
                heard
                    .record(at.saturating_duration_since(t0).as_micros() as u64)
                    .unwrap();
            }
            sink.send(Message::Text(
                json!({"type": "ptt-stop", "id": format!("x{p}"), "data": {"channelId": channel}})
                    .to_string()
                    .into(),
            ))
            .await
            .unwrap();
            reply_rx.recv().await.unwrap();
        }
        rows.push((n, grant, heard));
    }
    println!();
    println!(
        "floor latency through the gateway (Redis-backed state-svc, one media node, all in one process), {presses} presses per size"
    );
    println!(
        "| clients | press-to-grant p50 | p95 | p99 | press-to-speaker-changed at listeners p50 | p95 | p99 |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for (n, g, h) in &rows {
        let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "| {n} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
            ms(g, 0.5),
            ms(g, 0.95),
            ms(g, 0.99),
            ms(h, 0.5),
            ms(h, 0.95),
            ms(h, 0.99)
        );
    }
    stop.cancel();
}

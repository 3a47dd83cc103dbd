//! Gateway memory per idle authenticated WebSocket: the gateway (a release process, with
//! state-svc on Redis and a media node beside it) is sent N sockets, each signed in as its own
//! user and answered once (a `ping`), then left idle; the gateway's RSS is read before and
//! after. The baseline is the same gateway with the first `WARM` sockets open, so what the
//! runtime and allocator set up once is not counted against each socket.
//!
//! Run: `cargo build --release --bins && cargo bench -p talkgroup-e2e --bench idle_sockets`
//! (`IDLE_BENCH_SOCKETS`, default 10000; the process needs about that many file descriptors).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use talkgroup_e2e::{Stack, Topology};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

const WARM: usize = 200;

type Socket = WebSocketStream<TcpStream>;

/// One signed-in socket that has had one request answered.
async fn open(gateway: SocketAddr, i: usize) -> Socket {
    let token = talkgroup_e2e::client::token(&format!("idle-{i}"), &format!("Idle {i}"));
    let mut request = format!("ws://{gateway}/ws").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let stream = TcpStream::connect(gateway).await.unwrap();
    stream.set_nodelay(true).unwrap();
    // Small client buffers: the client side is not what is measured, but 10,000 of the
    // defaults would take gigabytes here.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(config))
        .await
        .unwrap();
    ws.send(Message::Text(r#"{"type":"ping","id":"1"}"#.into()))
        .await
        .unwrap();
    while let Some(Ok(message)) = ws.next().await {
        if let Message::Text(text) = message
            && text.as_str().contains("\"pong\"")
        {
            break;
        }
    }
    ws
}

async fn open_many(gateway: SocketAddr, range: std::ops::Range<usize>) -> Vec<Socket> {
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let tasks: Vec<_> = range
        .map(|i| {
            let gate = Arc::clone(&gate);
            tokio::spawn(async move {
                let _permit = gate.acquire().await.unwrap();
                open(gateway, i).await
            })
        })
        .collect();
    let mut sockets = Vec::with_capacity(tasks.len());
    for task in tasks {
        sockets.push(task.await.unwrap());
    }
    sockets
}

fn main() {
    let total: usize = std::env::var("IDLE_BENCH_SOCKETS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let stack = Stack::start(Topology {
            gateway_args: talkgroup_e2e::ONE_HOST_GATEWAY_ARGS.map(String::from).to_vec(),
            ..Topology::default()
        })
        .await
        .expect("stack (build the release binaries first)");
        stack.ready().await.unwrap();
        let gateway = stack.gateway(0);
        let pid = stack.gateways[0].pid().to_string();
        let rss_start = testkit::process_rss_kib(&pid);
        let warm = open_many(gateway, 0..WARM).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_warm = testkit::process_rss_kib(&pid);
        let started = Instant::now();
        let rest = open_many(gateway, WARM..total).await;
        let opened_in = started.elapsed();
        // Let the connects' transient buffers go back before reading.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_full = testkit::process_rss_kib(&pid);
        let health = talkgroup_e2e::health(gateway).await;
        assert_eq!(
            health["connections"].as_u64(),
            Some(total as u64),
            "every socket is open: {health}"
        );
        let measured = total - WARM;
        let per_socket_kib = (rss_full.saturating_sub(rss_warm)) as f64 / measured as f64;
        let per_gib = (1024.0 * 1024.0) / per_socket_kib;
        println!("| sockets | gateway RSS empty | with {WARM} | with {total} | per socket | sockets per GiB | opened in |");
        println!("|---|---|---|---|---|---|---|");
        println!(
            "| {total} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {per_socket_kib:.1} KiB | {per_gib:.0} | {:.1} s |",
            rss_start as f64 / 1024.0,
            rss_warm as f64 / 1024.0,
            rss_full as f64 / 1024.0,
            opened_in.as_secs_f64(),
        );
        drop(rest);
        drop(warm);
    });
}

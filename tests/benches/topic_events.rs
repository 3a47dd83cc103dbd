//! The events each gateway receives from state-svc when users' grants change, in a run of four
//! gateways each holding a quarter of the users: with users' topics, a gateway should receive
//! about a quarter of the per-user events; with one stream of every user's events (the design
//! before), all of them.
//!
//! Run: `cargo build --release --bins && cargo bench -p talkgroup-e2e --bench topic_events`
//! (`TOPIC_BENCH_USERS`, default 400; `TOPIC_BENCH_CHANGES`, default 2000, sent at most
//! `TOPIC_BENCH_RATE` a second, default 400). `TALKGROUP_BIN_DIR` points at another build's
//! binaries to measure it in the same run; the figures are read from each gateway's
//! `ptt_gateway_topic_events_total{kind="user"}`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use talkgroup_e2e::{Stack, Topology, http_get};
use talkgroup_proto::state::v1 as spb;

const GATEWAYS: usize = 4;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn user_events(metrics: SocketAddr) -> u64 {
    let (_, body) = http_get(metrics, "/metrics").await.expect("metrics");
    body.lines()
        .find_map(|l| l.strip_prefix("ptt_gateway_topic_events_total{kind=\"user\"} "))
        .map_or(0, |v| v.trim().parse().expect("a count"))
}

async fn all_user_events(metrics: &[SocketAddr]) -> Vec<u64> {
    let mut counts = Vec::new();
    for m in metrics {
        counts.push(user_events(*m).await);
    }
    counts
}

fn main() {
    let users = env("TOPIC_BENCH_USERS", 400);
    let changes = env("TOPIC_BENCH_CHANGES", 2_000);
    let rate = env("TOPIC_BENCH_RATE", 400).max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let stack = Stack::start(Topology {
            gateways: GATEWAYS,
            ..Topology::default()
        })
        .await
        .unwrap();
        stack.ready().await.unwrap();
        let metrics: Vec<SocketAddr> = (0..GATEWAYS)
            .map(|i| stack.gateways[i].logged_addr("metrics listening").unwrap())
            .collect();
        // User i on gateway i % 4.
        let mut clients = Vec::with_capacity(users);
        for i in 0..users {
            let mut client = stack
                .client(i % GATEWAYS, &format!("u-{i}"), &format!("User {i}"))
                .await;
            client.session().await;
            clients.push(client.into_ws().keep_reading());
        }
        // Let the users' topics settle (each subscription answers with the user's grants).
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = all_user_events(&metrics).await;

        let mut access = stack.access().await.unwrap();
        let started = Instant::now();
        let pace = Duration::from_secs_f64(1.0 / rate as f64);
        for n in 0..changes {
            let due = started + pace * u32::try_from(n).unwrap();
            tokio::time::sleep_until(due.into()).await;
            let role = if (n / users).is_multiple_of(2) {
                spb::Role::Listen
            } else {
                spb::Role::Talk
            };
            access
                .set_user_grants(spb::SetUserGrantsRequest {
                    user_id: format!("u-{}", n % users),
                    grants: vec![spb::Grant {
                        channel_id: "bench".into(),
                        role: role.into(),
                    }],
                    replace: false,
                })
                .await
                .unwrap();
        }
        let elapsed = started.elapsed().as_secs_f64();
        // What was published last is on its way: give it a moment to arrive.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = all_user_events(&metrics).await;

        println!(
            "{users} users over {GATEWAYS} gateways, {changes} grant changes in {elapsed:.1} s \
             ({:.0} per second)",
            changes as f64 / elapsed
        );
        println!("| gateway | user events received | per second | share of the changes |");
        println!("|---|---:|---:|---:|");
        let mut total = 0;
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            let got = a - b;
            total += got;
            println!(
                "| {i} | {got} | {:.0} | {:.2} |",
                got as f64 / elapsed,
                got as f64 / changes as f64
            );
        }
        println!(
            "all gateways together: {total} ({:.2} per change)",
            total as f64 / changes as f64
        );
        drop(clients);
        drop(stack);
    });
}

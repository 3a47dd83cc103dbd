//! Access time over the whole stack, every service its own release process on loopback:
//! `ptt-start` sent → first audio packet of that talk spurt received by a listener, as a client
//! that unmutes on `granted` sees it; and mouth-to-ear through the SFU (speaker's `write_rtp` →
//! listener's decrypted packet) next to the forwarding latency the media node reports.
//!
//! Run: `cargo build --release --bins && cargo bench -p talkgroup-e2e --bench access_time`
//! (`ACCESS_BENCH_PRESSES`, default 200).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use talkgroup_e2e::{Stack, Topology};
use talkgroup_proto::media::v1 as mpb;
use testkit::media::Tone;

const FRAMES_PER_PRESS: usize = 5;

fn row(name: &str, h: &Histogram<u64>) {
    let ms = |v: u64| v as f64 / 1000.0;
    println!(
        "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
        h.len(),
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.95)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max()),
    );
}

fn main() {
    let presses: usize = std::env::var("ACCESS_BENCH_PRESSES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let stack = Stack::start(Topology {
            gateway_args: ["--ptt-rate", "1000", "--request-rate", "1000"]
                .map(String::from)
                .to_vec(),
            ..Topology::default()
        })
        .await
        .expect("stack (build the release binaries first)");
        stack.ready().await.unwrap();
        let mut ana = stack.client(0, "u-ana", "Ana").await;
        let mut ben = stack.client(0, "u-ben", "Ben").await;
        ana.join("bench").await;
        ben.join("bench").await;
        let mic = ana.speaker("bench").await;
        let (ear, _) = ben.listener("bench").await;
        let mut media = mpb::media_service_client::MediaServiceClient::connect(format!(
            "http://{}",
            stack.media[0].addr
        ))
        .await
        .unwrap();
        media
            .get_node_stats(mpb::GetNodeStatsRequest {
                reset_latency: true,
            })
            .await
            .unwrap();

        let mut grant = Histogram::<u64>::new(3).unwrap();
        let mut access = Histogram::<u64>::new(3).unwrap();
        let mut m2e = Histogram::<u64>::new(3).unwrap();
        let mut tone = Tone::new(440.0);
        let mut lost = 0usize;
        for _ in 0..presses {
            let before = ear.received_count();
            let t0 = Instant::now();
            let reply = ana.ptt_start("bench").await;
            grant.record(t0.elapsed().as_micros() as u64).unwrap();
            assert_eq!(reply["granted"], true, "{reply}");
            // The client unmutes on `granted`: frames every 20 ms from now.
            let mut sent = Vec::with_capacity(FRAMES_PER_PRESS);
            let mut ticker = tokio::time::interval(Duration::from_millis(20));
            for _ in 0..FRAMES_PER_PRESS {
                ticker.tick().await;
                let frame = tone.frame();
                sent.push(Instant::now());
                mic.send(tone.seq, tone.ts, frame).await;
                tone.seq = tone.seq.wrapping_add(1);
                tone.ts = tone.ts.wrapping_add(960);
            }
            let deadline = Instant::now() + Duration::from_secs(2);
            while ear.received_count() < before + FRAMES_PER_PRESS && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let got = ear.received();
            let spurt = &got[before.min(got.len())..];
            match spurt.first() {
                Some(first) => access
                    .record(first.at.duration_since(t0).as_micros() as u64)
                    .unwrap(),
                None => lost += 1,
            }
            lost += FRAMES_PER_PRESS.saturating_sub(spurt.len());
            for (r, s) in spurt.iter().zip(&sent) {
                m2e.record(r.at.saturating_duration_since(*s).as_micros() as u64)
                    .unwrap();
            }
            ana.ptt_stop("bench").await;
        }
        let stats = media
            .get_node_stats(mpb::GetNodeStatsRequest {
                reset_latency: false,
            })
            .await
            .unwrap()
            .into_inner();
        println!(
            "\naccess time over the whole stack ({presses} presses, {FRAMES_PER_PRESS} frames each; \
             separate release processes on loopback)\n"
        );
        println!("| measure | n | p50 ms | p95 ms | p99 ms | max ms |");
        println!("|---|---|---|---|---|---|");
        row("press → granted (client)", &grant);
        row("press → first audio at listener (access time)", &access);
        row("speaker send → listener receive (mouth-to-ear through the SFU)", &m2e);
        println!(
            "| media node forwarding (node-reported) | - | {:.2} | - | {:.2} | {:.2} |",
            stats.forward_latency_p50_us as f64 / 1000.0,
            stats.forward_latency_p99_us as f64 / 1000.0,
            stats.forward_latency_max_us as f64 / 1000.0,
        );
        println!("\nframes lost: {lost}");
        let p95 = access.value_at_quantile(0.95) as f64 / 1000.0;
        println!(
            "access time p95 {p95:.2} ms: {} (target < 50 ms on loopback; MCPTT < 300 ms for 95%)",
            if p95 < 50.0 { "MET" } else { "NOT MET" }
        );
        mic.close().await;
        ear.close().await;
    });
}

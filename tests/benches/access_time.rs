//! Access time over the whole stack, every service its own release process on loopback:
//! `ptt-start` sent → first audio packet of that talk spurt received by a listener, as a client
//! that unmutes on `granted` sees it; and mouth-to-ear through the SFU (speaker's `write_rtp` →
//! listener's decrypted packet) next to the forwarding latency the media node reports, and the
//! baseline: the same two client peers connected directly, with no server between them. Then
//! press → granted with mutual TLS on every gRPC hop against the same with plaintext gRPC,
//! two stacks side by side in the same run. Last, access time at a listener whose media goes
//! through coturn over TLS against a listener on the direct path, both hearing the same presses.
//!
//! Run: `cargo build --release --bins && cargo bench -p talkgroup-e2e --bench access_time`
//! (`ACCESS_BENCH_PRESSES`, default 200).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use talkgroup_e2e::{Stack, Topology};
use talkgroup_proto::media::v1 as mpb;
use testkit::media::{Peer, Tone};

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
        let mut media = mpb::media_service_client::MediaServiceClient::new(
            stack
                .media_channel(0, &talkgroup_common::tls::Identity::Admin)
                .unwrap(),
        );
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
        let p2p = direct_baseline(presses * FRAMES_PER_PRESS).await;
        row("baseline: direct peer-to-peer send → receive (no server)", &p2p);
        let ratio = m2e.value_at_quantile(0.5) as f64 / p2p.value_at_quantile(0.5).max(1) as f64;
        println!(
            "\nmouth-to-ear through the SFU / direct peer-to-peer, p50: {ratio:.2}x \
             (p99 {:.2}x)",
            m2e.value_at_quantile(0.99) as f64 / p2p.value_at_quantile(0.99).max(1) as f64
        );
        println!("\nframes lost: {lost}");
        let p95 = access.value_at_quantile(0.95) as f64 / 1000.0;
        println!(
            "access time p95 {p95:.2} ms: {} (target < 50 ms on loopback; MCPTT < 300 ms for 95%)",
            if p95 < 50.0 { "MET" } else { "NOT MET" }
        );
        mic.close().await;
        ear.close().await;
        drop(stack);
        grant_mtls_against_plaintext(presses).await;
        access_through_turn_tls(presses).await;
    });
}

/// Press → granted through the gateway on two stacks started side by side, one with mutual TLS
/// on every gRPC hop (as shipped) and one in plaintext, presses alternating between them so
/// both see the same machine load.
async fn grant_mtls_against_plaintext(presses: usize) {
    let topology = |plaintext| Topology {
        gateway_args: ["--ptt-rate", "1000", "--request-rate", "1000"]
            .map(String::from)
            .to_vec(),
        plaintext,
        ..Topology::default()
    };
    let mtls = Stack::start(topology(false)).await.unwrap();
    let plain = Stack::start(topology(true)).await.unwrap();
    mtls.ready().await.unwrap();
    plain.ready().await.unwrap();
    let mut clients = Vec::new();
    for stack in [&mtls, &plain] {
        let mut client = stack.client(0, "u-tls", "Tls").await;
        client.join("bench-tls").await;
        // Warm up: connections established, scripts loaded.
        for _ in 0..10 {
            client.ptt_start("bench-tls").await;
            client.ptt_stop("bench-tls").await;
        }
        clients.push(client);
    }
    let mut grant = [
        Histogram::<u64>::new(3).unwrap(),
        Histogram::<u64>::new(3).unwrap(),
    ];
    for press in 0..presses * 2 {
        let which = press % 2;
        let client = &mut clients[which];
        let t0 = Instant::now();
        let reply = client.ptt_start("bench-tls").await;
        grant[which]
            .record(t0.elapsed().as_micros() as u64)
            .unwrap();
        assert_eq!(reply["granted"], true, "{reply}");
        client.ptt_stop("bench-tls").await;
    }
    println!(
        "\npress → granted, mutual TLS against plaintext gRPC ({presses} presses each, alternating)\n"
    );
    println!("| measure | n | p50 ms | p95 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|");
    row("press → granted, mutual TLS on every hop", &grant[0]);
    row("baseline: press → granted, plaintext gRPC", &grant[1]);
    let ratio =
        |q| grant[0].value_at_quantile(q) as f64 / grant[1].value_at_quantile(q).max(1) as f64;
    let p50 = ratio(0.5);
    println!(
        "\nmutual TLS / plaintext, p50: {p50:.2}x (p99 {:.2}x): {} (target: under 1.10x at p50)",
        ratio(0.99),
        if p50 < 1.10 { "MET" } else { "NOT MET" }
    );
}

/// Send → receive of `frames` frames (20 ms apart) between two client peers connected directly.
async fn direct_baseline(frames: usize) -> Histogram<u64> {
    let mut speaker = Peer::new(false).await;
    let mut listener = Peer::new(false).await;
    let offer = speaker.offer_to_send().await;
    let answer = listener.answer(&offer, false).await;
    speaker.accept_answer(&answer).await;
    speaker.wait_connected().await;
    let mut tone = Tone::new(440.0);
    let mut h = Histogram::<u64>::new(3).unwrap();
    let mut sent = Vec::with_capacity(frames);
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    for _ in 0..frames {
        ticker.tick().await;
        let frame = tone.frame();
        sent.push(Instant::now());
        speaker.send(tone.seq, tone.ts, frame).await;
        tone.seq = tone.seq.wrapping_add(1);
        tone.ts = tone.ts.wrapping_add(960);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while listener.received_count() < frames && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Align by sequence: the first packets may arrive before the track handler is up.
    let got = listener.received();
    let first_seq = tone.seq.wrapping_sub(frames as u16);
    for r in &got {
        let index = usize::from(r.packet.header.sequence_number.wrapping_sub(first_seq));
        if let Some(at) = sent.get(index) {
            h.record(r.at.saturating_duration_since(*at).as_micros() as u64)
                .unwrap();
        }
    }
    speaker.close().await;
    listener.close().await;
    h
}

/// Access time at two listeners of the same presses: one whose peer may use only a coturn relay
/// it reaches over TLS (through testkit's TURN-over-TLS bridge: the `webrtc` crate speaks TURN
/// over UDP only), one connected to the media node directly.
async fn access_through_turn_tls(presses: usize) {
    let relay_tls =
        talkgroup_e2e::relay::TestRelay::start(std::net::Ipv4Addr::LOCALHOST, true).unwrap();
    let stack = Stack::start(Topology {
        gateway_args: [
            ["--ptt-rate", "1000", "--request-rate", "1000"]
                .map(String::from)
                .to_vec(),
            relay_tls.gateway_args(),
        ]
        .concat(),
        ..Topology::default()
    })
    .await
    .unwrap();
    stack.ready().await.unwrap();
    let mut ana = stack.client(0, "u-ana", "Ana").await;
    let mut ben = stack.client(0, "u-ben", "Ben").await;
    let mut cai = stack.client(0, "u-cai", "Cai").await;
    for c in [&mut ana, &mut ben, &mut cai] {
        c.join("bench-turn").await;
    }
    let mic = ana.speaker("bench-turn").await;
    let (direct, _) = cai.listener("bench-turn").await;
    let relay = std::net::SocketAddr::from(([127, 0, 0, 1], relay_tls.port()));
    let bridge = testkit::turn_tls::TlsBridge::start(relay, "127.0.0.1", &relay_tls.ca)
        .await
        .unwrap();
    let url = bridge.url();
    let (relayed, _, answer) = ben
        .negotiate_relayed_with("bench-turn", "recv", |mut relay| async move {
            relay.urls = vec![url];
            Peer::relayed(relay).await
        })
        .await;
    assert!(answer.contains("typ relay"), "no relay candidate: {answer}");
    ben.consume("bench-turn").await;
    relayed.wait_connected().await;

    let mut tone = Tone::new(440.0);
    let mut through_turn = Histogram::<u64>::new(3).unwrap();
    let mut on_direct = Histogram::<u64>::new(3).unwrap();
    let mut lost = 0usize;
    // Warm-up presses until the relayed listener hears (its DTLS may finish a little after
    // ICE), then the measured ones.
    let mut warm = false;
    let mut measured = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while measured < presses && Instant::now() < deadline {
        let before = [relayed.received_count(), direct.received_count()];
        let t0 = Instant::now();
        let reply = ana.ptt_start("bench-turn").await;
        assert_eq!(reply["granted"], true, "{reply}");
        let mut ticker = tokio::time::interval(Duration::from_millis(20));
        for _ in 0..FRAMES_PER_PRESS {
            ticker.tick().await;
            let frame = tone.frame();
            mic.send(tone.seq, tone.ts, frame).await;
            tone.seq = tone.seq.wrapping_add(1);
            tone.ts = tone.ts.wrapping_add(960);
        }
        let wait = Instant::now() + Duration::from_secs(2);
        while (relayed.received_count() < before[0] + FRAMES_PER_PRESS
            || direct.received_count() < before[1] + FRAMES_PER_PRESS)
            && Instant::now() < wait
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        ana.ptt_stop("bench-turn").await;
        let first = |peer: &Peer, from: usize| {
            peer.received()
                .get(from)
                .map(|r| r.at.duration_since(t0).as_micros() as u64)
        };
        match (first(&relayed, before[0]), first(&direct, before[1])) {
            (Some(turn_us), Some(direct_us)) if warm => {
                through_turn.record(turn_us).unwrap();
                on_direct.record(direct_us).unwrap();
                measured += 1;
            }
            (Some(_), Some(_)) => warm = true,
            _ if warm => lost += 1,
            _ => {}
        }
    }
    println!(
        "\naccess time through coturn over TLS against the direct path ({measured} presses, \
         both listeners hearing each)\n"
    );
    println!("| measure | n | p50 ms | p95 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|");
    row(
        "press → first audio, listener relayed by coturn over TLS",
        &through_turn,
    );
    row(
        "baseline: press → first audio, listener on the direct path",
        &on_direct,
    );
    let ratio =
        |q| through_turn.value_at_quantile(q) as f64 / on_direct.value_at_quantile(q).max(1) as f64;
    println!(
        "\nTURN/TLS / direct, p50: {:.2}x (p99 {:.2}x); presses a listener missed: {lost}",
        ratio(0.5),
        ratio(0.99)
    );
}

//! Floor-switched forwarding with real peers over loopback and real Opus audio.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use media_svc::Config;
use support::{TestNode, Tone, analyse, listener, set_floor, speaker, stats};
use talkgroup_proto::media::v1 as pb;
use testkit::wait_until;

fn payloads(received: &[support::peer::Received]) -> Vec<Vec<u8>> {
    received.iter().map(|r| r.packet.payload.to_vec()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_floor_holder_is_heard_and_streams_survive_speaker_changes() {
    let node = TestNode::start(Config::for_tests()).await;
    let mut client = node.client().await;
    let (a, a_producer) = speaker(&mut client, "sa", "ops").await;
    let (b, b_producer) = speaker(&mut client, "sb", "ops").await;
    let (b_ear, _, _) = listener(&mut client, "sb", "ops", false).await;
    let (c_ear, _, c_ssrc) = listener(&mut client, "sc", "ops", false).await;

    // A holds the floor; B talks too, without it.
    assert!(
        set_floor(&mut client, "ops", Some(&a_producer), 10)
            .await
            .applied
    );
    let mut tone_a = Tone::new(440.0);
    let mut tone_b = Tone::new(1_000.0);
    tokio::join!(tone_a.play(&a, 50), tone_b.play(&b, 50));
    wait_until(Duration::from_secs(5), "A's audio at B and C", || async {
        b_ear.received().len() >= 50 && c_ear.received().len() >= 50
    })
    .await
    .unwrap();
    for ear in [&b_ear, &c_ear] {
        let got = ear.received();
        assert_eq!(got.len(), 50, "exactly A's 50 frames, none of B's");
        let (rms, freq) = analyse(&payloads(&got));
        assert!(rms > 1_000.0, "audible: rms {rms}");
        assert!(
            (400.0..480.0).contains(&freq),
            "A's 440 Hz tone, heard {freq} Hz"
        );
    }
    let dropped_before = stats(&mut client).await.packets_dropped;
    assert!(
        dropped_before >= 50,
        "B's packets were dropped and counted ({dropped_before})"
    );

    // The floor moves to B mid-stream: A keeps sending and is cut; C's one stream goes on.
    assert!(
        set_floor(&mut client, "ops", Some(&b_producer), 11)
            .await
            .applied
    );
    tokio::join!(tone_a.play(&a, 50), tone_b.play(&b, 50));
    wait_until(Duration::from_secs(5), "B's audio at C", || async {
        c_ear.received().len() >= 100
    })
    .await
    .unwrap();
    let got = c_ear.received();
    assert_eq!(got.len(), 100);
    assert_eq!(
        c_ear.track_count(),
        1,
        "no renegotiation: one track for the whole life"
    );
    assert!(
        got.iter().all(|r| r.packet.header.ssrc == c_ssrc),
        "one SSRC throughout"
    );
    for pair in got.windows(2) {
        assert_eq!(
            pair[1].packet.header.sequence_number,
            pair[0].packet.header.sequence_number.wrapping_add(1),
            "contiguous sequence numbers across the speaker change"
        );
    }
    assert!(
        got[50].packet.header.marker,
        "the new talk spurt starts with the marker bit"
    );
    let gap = got[50]
        .packet
        .header
        .timestamp
        .wrapping_sub(got[49].packet.header.timestamp);
    assert!(gap >= 960, "timestamp advanced across the switch ({gap})");
    let (rms, freq) = analyse(&payloads(&got[50..]));
    assert!(
        rms > 1_000.0 && (950.0..1_050.0).contains(&freq),
        "B's 1 kHz tone at C: {rms} rms, {freq} Hz"
    );
    assert_eq!(b_ear.received().len(), 50, "B does not hear itself");

    // A revoke (higher epoch, no holder) cuts at once: what B sends next is dropped.
    assert!(set_floor(&mut client, "ops", None, 12).await.applied);
    assert!(
        !set_floor(&mut client, "ops", Some(&a_producer), 11)
            .await
            .applied,
        "stale epoch refused"
    );
    let before = stats(&mut client).await;
    tone_b.play(&b, 20).await;
    wait_until(
        Duration::from_secs(5),
        "the node to see B's 20 packets",
        || {
            let mut client = client.clone();
            async move { stats(&mut client).await.packets_dropped >= before.packets_dropped + 20 }
        },
    )
    .await
    .unwrap();
    assert_eq!(
        stats(&mut client).await.packets_forwarded,
        before.packets_forwarded
    );
    assert_eq!(c_ear.received().len(), 100);

    // An absurd epoch (one that would fence off every real decision for good) is refused and
    // changes nothing: the next real grant still applies.
    let absurd = client
        .set_floor(pb::SetFloorRequest {
            channel_id: "ops".into(),
            producer_id: b_producer.clone(),
            epoch: u64::MAX,
            expires_at_ms: 0,
            lease_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(absurd.code(), tonic::Code::InvalidArgument);
    assert!(
        set_floor(&mut client, "ops", Some(&b_producer), 13)
            .await
            .applied,
        "the channel keeps working"
    );
    for peer in [&a, &b, &b_ear, &c_ear] {
        peer.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_listener_does_not_delay_the_others() {
    let node = TestNode::start(Config::for_tests()).await;
    let mut client = node.client().await;
    let (a, a_producer) = speaker(&mut client, "sa", "ops").await;
    let (_stalled, _, _) = listener(&mut client, "stuck", "ops", true).await;
    let mut ears = Vec::new();
    for i in 0..4 {
        ears.push(
            listener(&mut client, &format!("s{i}"), "ops", false)
                .await
                .0,
        );
    }
    set_floor(&mut client, "ops", Some(&a_producer), 1).await;
    let mut tone = Tone::new(440.0);
    const FRAMES: usize = 150;
    let mut sent_at = Vec::with_capacity(FRAMES);
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    for _ in 0..FRAMES {
        ticker.tick().await;
        let frame = tone.frame();
        sent_at.push(Instant::now());
        a.send(tone.seq, tone.ts, frame).await;
        tone.seq = tone.seq.wrapping_add(1);
        tone.ts = tone.ts.wrapping_add(960);
    }
    wait_until(
        Duration::from_secs(5),
        "every frame at every reading listener",
        || async { ears.iter().all(|e| e.received().len() >= FRAMES) },
    )
    .await
    .unwrap();
    let mut latencies: Vec<Duration> = Vec::new();
    for ear in &ears {
        let got = ear.received();
        assert_eq!(got.len(), FRAMES, "100% delivery");
        latencies.extend(
            got.iter()
                .zip(&sent_at)
                .map(|(r, s)| r.at.saturating_duration_since(*s)),
        );
    }
    latencies.sort();
    let p50 = latencies[latencies.len() / 2];
    let p99 = latencies[latencies.len() * 99 / 100];
    eprintln!(
        "with a stalled listener: {} frames x {} listeners delivered, latency p50 {p50:?} p99 {p99:?}",
        FRAMES,
        ears.len()
    );
    assert!(p99 < Duration::from_millis(100), "p99 {p99:?}");
    a.close().await;
}

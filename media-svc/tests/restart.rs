//! ICE restart mid-transmission with real peers: a listener's, then the speaker's. Audio goes on
//! with a short gap, on the same SSRC and the same transports, without a new transport.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use media_svc::Config;
use support::{TestNode, Tone, listener, restart_ice, set_floor, speaker_transport, stats};
use testkit::wait_until;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_goes_on_across_ice_restarts_of_a_listener_and_of_the_speaker() {
    const FRAMES: usize = 250;
    let node = TestNode::start(Config::for_tests()).await;
    let mut client = node.client().await;
    let (mic, mic_transport, producer) = speaker_transport(&mut client, "talker", "ops").await;
    let (ear, ear_transport, ssrc) = listener(&mut client, "ear", "ops", false).await;
    assert!(
        set_floor(&mut client, "ops", Some(&producer), 1)
            .await
            .applied
    );
    let mic = std::sync::Arc::new(mic);
    let talking = {
        let mic = std::sync::Arc::clone(&mic);
        tokio::spawn(async move { Tone::new(440.0).play(&mic, FRAMES).await })
    };
    // One second in, the listener restarts its ICE; two seconds later the speaker does.
    wait_until(Duration::from_secs(5), "a second of audio", || async {
        ear.received_count() >= 50
    })
    .await
    .unwrap();
    restart_ice(&mut client, &ear_transport, "ear", &ear).await;
    wait_until(
        Duration::from_secs(5),
        "audio after the listener's restart",
        || async { ear.received_count() >= 150 },
    )
    .await
    .unwrap();
    restart_ice(&mut client, &mic_transport, "talker", &mic).await;
    talking.await.unwrap();
    wait_until(Duration::from_secs(5), "the rest of the audio", || async {
        ear.received_count() >= FRAMES - 30
    })
    .await
    .unwrap();
    let got = ear.received();
    assert!(got.iter().all(|r| r.packet.header.ssrc == ssrc), "one SSRC");
    let gap = got
        .windows(2)
        .map(|w| w[1].at.saturating_duration_since(w[0].at))
        .max()
        .unwrap();
    eprintln!(
        "{} of {FRAMES} frames heard, longest gap {gap:?}",
        got.len()
    );
    assert!(gap < Duration::from_millis(300), "gap {gap:?}");
    assert_eq!(ear.track_count(), 1, "no renegotiated track");
    assert_eq!(stats(&mut client).await.transports, 2, "no new transport");
    mic.close().await;
    ear.close().await;
}
